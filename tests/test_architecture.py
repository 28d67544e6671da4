"""The layering of docs/design.md ("Layout"), checked on the source: the package's import graph (imports inside
functions and the lazy `importlib.import_module` exports included) has no cycle, the core imports torch only, the
generic layers import no integration, and `import stompp_hf` loads no Trainer, peft, timm or datasets."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

import stompp_hf

PACKAGE = Path(stompp_hf.__file__).resolve().parent
FRAMEWORKS = ("transformers", "timm", "peft", "datasets", "accelerate", "evaluate", "huggingface_hub", "safetensors")


def _module_name(path: Path) -> str:
    parts = ["stompp_hf", *path.relative_to(PACKAGE).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_package(path: Path) -> bool:
    return path.name == "__init__.py"


def _resolve(module: str, is_package: bool, level: int, target: str | None) -> str:
    """The absolute name of `from <level dots><target> import ...` written in `module`."""
    if level == 0:
        return target or ""
    base = module.split(".")
    if not is_package:
        base = base[:-1]
    base = base[: len(base) - (level - 1)]
    return ".".join([*base, target] if target else base)


def _under_type_checking(node: ast.AST, parents: dict[ast.AST, ast.AST]) -> bool:
    while node in parents:
        node = parents[node]
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            return True
    return False


def _assigns(node: ast.AST, *names: str) -> bool:
    """Whether `node` assigns (with or without an annotation) one of `names`."""
    if isinstance(node, ast.Assign):
        targets = node.targets
    elif isinstance(node, ast.AnnAssign) and node.value is not None:
        targets = [node.target]
    else:
        return False
    return any(isinstance(t, ast.Name) and t.id in names for t in targets)


def _imports(path: Path, modules: set[str]) -> set[str]:
    """Every module `path` imports at run time, anywhere in the file (not under `if TYPE_CHECKING:`), plus the
    modules named by its lazy-export tables (`_LAZY` values, `OLD_MODULES` targets) and `importlib.import_module`
    calls with a literal name."""
    name, package = _module_name(path), _is_package(path)
    tree = ast.parse(path.read_text())
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)) and _under_type_checking(node, parents):
            continue
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = _resolve(name, package, node.level, node.module)
            submodules = {f"{base}.{alias.name}" for alias in node.names} & modules
            found.update(submodules)  # `from . import submodule` imports the submodule ...
            if len(submodules) < len(node.names):  # ... and names that are not submodules come from `base`
                found.add(base)
        elif _assigns(node, "_LAZY", "OLD_MODULES") and isinstance(node.value, ast.Dict):
            for value in (v for entry in node.value.values for v in ast.walk(entry)):
                if isinstance(value, ast.Constant) and isinstance(value.value, str):
                    text = value.value
                    found.add(text if text.startswith("stompp_hf") else _resolve(name, package, 1, text))
        elif (
            isinstance(node, ast.Call)
            and ast.unparse(node.func).endswith("import_module")
            and node.args
            and isinstance(node.args[0], ast.Constant)
        ):
            found.add(node.args[0].value)
        elif _assigns(node, "_OLD_MODULES"):
            found.update(f"stompp_hf.{c.value}" for c in ast.walk(node.value) if isinstance(c, ast.Constant))
    return found


def _graph() -> dict[str, set[str]]:
    files = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for module, path in files.items():
        targets = _imports(path, set(files))
        # an import of `a.b.c` inside the package is an edge to the deepest known module it names
        edges = set()
        for target in targets:
            while target and target not in files and target.startswith("stompp_hf"):
                target = target.rpartition(".")[0]
            if target in files and target != module:
                edges.add(target)
        graph[module] = edges | {t for t in targets if not t.startswith("stompp_hf")}
    return graph


GRAPH = _graph()
INTERNAL = {m: {t for t in ts if t in GRAPH} for m, ts in GRAPH.items()}


def _closure(module: str) -> set[str]:
    """Every module `module` imports, directly or through other modules of the package (external ones included)."""
    seen, stack = set(), [module]
    while stack:
        for target in GRAPH[stack.pop()]:
            if target not in seen:
                seen.add(target)
                if target in GRAPH:
                    stack.append(target)
    return seen


def _top(name: str) -> str:
    return name.split(".", 1)[0]


def test_graph_sees_lazy_and_function_level_imports():
    # the checks below are only as good as the graph: it must see imports made inside functions and lazy exports
    assert "stompp_hf.integrations.transformers.callback" in INTERNAL["stompp_hf"]  # a `_LAZY` entry
    assert "stompp_hf.integrations.timm.policy" in INTERNAL["stompp_hf.integrations"]  # inside a function
    assert "stompp_hf.nn" in INTERNAL["stompp_hf._deprecation"]  # an OLD_MODULES target
    assert "stompp_hf.layers" in INTERNAL["stompp_hf"]  # `_OLD_MODULES`, imported on attribute access
    assert "stompp_hf.nn.training" not in INTERNAL["stompp_hf.nn.packed"]  # under `if TYPE_CHECKING:` only


def test_import_graph_has_no_cycle():
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def visit(module: str) -> None:
        state[module] = 1
        path.append(module)
        for target in sorted(INTERNAL[module]):
            if state.get(target) == 1:
                cycle = path[path.index(target) :] + [target]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if target not in state:
                visit(target)
        path.pop()
        state[module] = 2

    for module in sorted(INTERNAL):
        if module not in state:
            visit(module)


@pytest.mark.parametrize("module", sorted(m for m in GRAPH if m.startswith("stompp_hf.core")))
def test_core_imports_torch_and_the_standard_library_only(module):
    external = {_top(t) for t in _closure(module) if not t.startswith("stompp_hf")}
    allowed = {"torch", "__future__", *sys.stdlib_module_names}
    assert external <= allowed, f"{module} imports {sorted(external - allowed)}"
    assert all(t.startswith("stompp_hf.core") for t in _closure(module) if t.startswith("stompp_hf"))


GENERIC = (
    "stompp_hf.nn",
    "stompp_hf.kernels",
    "stompp_hf.conversion",
    "stompp_hf.progression",
    "stompp_hf.export",
    "stompp_hf.sizes",
    "stompp_hf.config",
)


@pytest.mark.parametrize("module", sorted(m for m in GRAPH if m.startswith(GENERIC)))
def test_generic_layers_import_no_integration(module):
    closure = _closure(module)
    assert not [t for t in closure if t.startswith("stompp_hf.integrations")], module
    # `config` subclasses Transformers' QuantizationConfigMixin; nothing generic imports timm, peft or datasets
    assert not {_top(t) for t in closure} & {"timm", "peft", "datasets", "accelerate", "evaluate"}, module


def test_only_integrations_and_the_cli_import_frameworks():
    for module, targets in GRAPH.items():
        if module.startswith(("stompp_hf.integrations", "stompp_hf.metrics")) or module == "stompp_hf.__main__":
            continue
        direct = {_top(t) for t in targets} & {"timm", "peft", "datasets"}
        assert not direct, f"{module} imports {sorted(direct)} directly"


def _fresh_python(code: str) -> dict:
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_import_loads_no_trainer_peft_timm_or_datasets_and_patches_nothing():
    result = _fresh_python(
        "import json, sys, stompp_hf\n"
        "from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING\n"
        "loaded = sorted(m for m in ('transformers.trainer', 'peft', 'timm', 'datasets') "
        "if m in sys.modules)\n"
        "registered = AUTO_QUANTIZATION_CONFIG_MAPPING['stompp'] is stompp_hf.StoMPPConfig and "
        "AUTO_QUANTIZER_MAPPING['stompp'] is stompp_hf.StoMPPHfQuantizer\n"
        "from transformers import Trainer\n"
        "fn = Trainer.create_model_card\n"
        "print(json.dumps({'loaded': loaded, 'registered': registered, "
        "'patched': getattr(fn, '_stompp_wrapped', False) or fn.__module__ != 'transformers.trainer'}))"
    )
    assert result == {"loaded": [], "registered": True, "patched": False}


def test_trainer_card_is_wrapped_once_a_stompp_callback_exists():
    result = _fresh_python(
        "import json, stompp_hf\n"
        "from transformers import Trainer\n"
        "before = getattr(Trainer.create_model_card, '_stompp_wrapped', False)\n"
        "stompp_hf.StoMPPCallback()\n"
        "print(json.dumps([before, getattr(Trainer.create_model_card, '_stompp_wrapped', False)]))"
    )
    assert result == [False, True]


def test_registered_schedule_is_accepted_by_the_config():
    from stompp_hf import SCHEDULES, StoMPPConfig, register_schedule

    with pytest.raises(ValueError, match=r"`schedule` must be one of .* but got 'sqrt_test'"):
        StoMPPConfig(schedule="sqrt_test")
    register_schedule("sqrt_test", lambda tau: tau**0.5)
    try:
        config = StoMPPConfig(schedule="sqrt_test")
        assert StoMPPConfig.from_dict(config.to_dict()).schedule == "sqrt_test"
        with pytest.raises(ValueError, match="already registered"):
            register_schedule("sqrt_test", lambda tau: tau)
    finally:
        del SCHEDULES["sqrt_test"]


def test_config_choices_come_from_the_registries():
    from stompp_hf.config import field_choices
    from stompp_hf.core import EXPORT_DTYPES, ORDERS, RULES, SCHEDULES

    choices = field_choices()
    assert choices["schedule"] == tuple(SCHEDULES)
    assert choices["weights"] == (*RULES, None) == choices["activations"]
    assert choices["order"] == ORDERS
    assert choices["export_dtype"] == (None, *EXPORT_DTYPES)


def test_package_cites_no_file_outside_the_repository():
    cited = [str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py") if "DESIGN.md" in p.read_text()]
    assert cited == []
