"""The old import paths (`stompp_hf.layers`, `stompp_hf.lora`, ...) keep working for one release: importing one warns
`DeprecationWarning` naming its new module, and its names are the new modules' very objects.

Each check runs in a fresh interpreter: an old module warns once, when it is first imported.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from stompp_hf._deprecation import OLD_MODULES

#: old module -> (the new module its warning names, [(module now defining the name, name), ...])
REPRESENTATIVES: dict[str, tuple[str, list[tuple[str, str]]]] = {
    "layers": ("stompp_hf.nn", [("stompp_hf.nn", "BinaryLinear"), ("stompp_hf.nn", "StoMPPLinear")]),
    "functional": (
        "stompp_hf.core.functional",
        [("stompp_hf.core.functional", "masked_binarize"), ("stompp_hf.core.surge", "surge")],
    ),
    "masks": (
        "stompp_hf.core.masks",
        [("stompp_hf.core.masks", "MaskState"), ("stompp_hf.core.packing", "pack_signs")],
    ),
    "schedules": ("stompp_hf.core.schedules", [("stompp_hf.core.schedules", "get_schedule")]),
    "xnor": ("stompp_hf.kernels.xnor", [("stompp_hf.kernels.xnor", "is_available")]),
    "hf_quantizer": (
        "stompp_hf.integrations.transformers.quantizer",
        [
            ("stompp_hf.integrations.transformers.quantizer", "StoMPPHfQuantizer"),
            ("stompp_hf.integrations.transformers.quantizer", "KEEP_LATENT_ATTR"),
        ],
    ),
    "callback": (
        "stompp_hf.integrations.transformers.callback",
        [("stompp_hf.integrations.transformers.callback", "StoMPPCallback")],
    ),
    "hub": ("stompp_hf.integrations.transformers.hub", [("stompp_hf.integrations.transformers.hub", "model_card")]),
    "vision": (
        "stompp_hf.integrations.timm.io",
        [
            ("stompp_hf.integrations.timm.policy", "prepare_vision_model"),
            ("stompp_hf.integrations.timm.io", "from_pretrained"),
            ("stompp_hf.integrations.timm", "is_timm_model"),
        ],
    ),
    "birealnet": ("stompp_hf.integrations.timm.birealnet", [("stompp_hf.integrations.timm.birealnet", "BiRealNet")]),
    "lora": ("stompp_hf.integrations.peft", [("stompp_hf.integrations.peft", "merge_lora_into_latent")]),
}

IMPORT_OLD = """\
import importlib, json, sys, warnings

names = json.loads(sys.argv[1])
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import stompp_hf.{old} as old_module
result = {{
    "warnings": [
        {{"category": w.category.__name__, "message": str(w.message), "filename": w.filename}}
        for w in caught
        if "stompp_hf" in str(w.message)
    ],
    "same": {{f"{{m}}.{{n}}": getattr(old_module, n) is getattr(importlib.import_module(m), n) for m, n in names}},
    "in_dir": {{n: n in dir(old_module) for _, n in names}},
}}
print(json.dumps(result))
"""


def run_script(path, *args) -> dict:
    done = subprocess.run([sys.executable, str(path), *args], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_every_old_module_has_a_representative():
    assert set(REPRESENTATIVES) == set(OLD_MODULES)
    for old, (named, names) in REPRESENTATIVES.items():
        assert OLD_MODULES[old][0] == named, old  # the warning names the first target
        assert all(module in OLD_MODULES[old] for module, _ in names), old


@pytest.mark.parametrize("old", sorted(REPRESENTATIVES))
def test_old_module_import_warns_and_forwards(old, tmp_path):
    named, names = REPRESENTATIVES[old]
    script = tmp_path / "import_old.py"
    script.write_text(IMPORT_OLD.format(old=old))
    result = run_script(script, json.dumps(names))

    assert len(result["warnings"]) == 1, result["warnings"]
    warning = result["warnings"][0]
    assert warning["category"] == "DeprecationWarning"
    assert f"`stompp_hf.{old}` is deprecated" in warning["message"]
    assert f"import from `{named}` instead" in warning["message"]
    # attributed to the importing line, so the default filters show it when a script imports the old path
    assert warning["filename"] == str(script)
    assert result["same"] == {f"{m}.{n}": True for m, n in names}
    assert result["in_dir"] == {n: True for _, n in names}


ACCESS_OLD = """\
import json, sys, warnings

with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import stompp_hf
    import stompp_hf.nn
    on_import = [str(w.message) for w in caught if "stompp_hf" in str(w.message)]
    imported_eagerly = "stompp_hf.layers" in sys.modules
    layers = stompp_hf.layers
    first = [w for w in caught if "stompp_hf" in str(w.message)]
    again = stompp_hf.layers
    second = [w for w in caught if "stompp_hf" in str(w.message)]
try:
    layers.no_such_name
    missing = None
except AttributeError as e:
    missing = str(e)
print(json.dumps({
    "on_import": on_import,
    "imported_eagerly": imported_eagerly,
    "warnings": [{"category": w.category.__name__, "message": str(w.message)} for w in first],
    "warned_again": len(second) > len(first),
    "same_module": layers is again is sys.modules["stompp_hf.layers"],
    "same_object": layers.BinaryLinear is stompp_hf.nn.BinaryLinear,
    "missing": missing,
}))
"""


def test_old_module_as_an_attribute_of_the_package(tmp_path):
    """`import stompp_hf; stompp_hf.layers` imports the old module on first access (as `import stompp_hf` used
    to bind it): it warns once, and forwards to the new modules."""
    script = tmp_path / "access_old.py"
    script.write_text(ACCESS_OLD)
    result = run_script(script)
    assert result["on_import"] == [] and not result["imported_eagerly"]  # `import stompp_hf` alone warns nothing
    assert len(result["warnings"]) == 1
    assert result["warnings"][0]["category"] == "DeprecationWarning"
    assert "`stompp_hf.layers` is deprecated" in result["warnings"][0]["message"]
    assert "import from `stompp_hf.nn` instead" in result["warnings"][0]["message"]
    assert not result["warned_again"]
    assert result["same_module"] and result["same_object"]
    assert "no_such_name" in result["missing"] and "stompp_hf.nn" in result["missing"]


def test_unknown_old_module_attribute_is_an_attribute_error():
    import stompp_hf

    with pytest.raises(AttributeError, match="has no attribute 'no_such_module'"):
        stompp_hf.no_such_module  # noqa: B018
