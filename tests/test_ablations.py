"""Every training rule and setting of the config through the vision recipe, and the ablation runner."""

from __future__ import annotations

import json
import os

import pytest
from stompp_hf_recipes import ablations, vision

from .test_vision_recipe import TINY, _argv, one_thread  # noqa: F401  (module-scoped fixture)

DATA = ["--offline_dataset", "mnist_5k", "--max_train_samples", "64", "--max_eval_samples", "32"]

SETTINGS = {
    "stompp_ste": {"weights": "stompp_ste", "activations": "stompp_ste"},
    "ste": {"weights": "ste", "activations": "ste"},
    "surge_ste": {"weights": "ste", "activations": "ste", "compensation": "surge"},
    "surge_stompp_ste": {"weights": "stompp_ste", "activations": "stompp_ste", "compensation": "surge"},
    "hybrid_wa": {"weights": "stompp", "activations": "ste"},
    "hybrid_aw": {"weights": "ste", "activations": "stompp"},
    "global": {"order": "global"},
    "reverse": {"order": "reverse"},
    "bwn_deterministic": {"activations": None, "policy": "deterministic"},
    "quadratic_r10": {"schedule": "quadratic", "refresh_rate": 10},
    "linear_r10000": {"schedule": "linear", "refresh_rate": 10000},
    "cosine": {"schedule": "cosine"},
    "flipped_quadratic": {"schedule": "flipped_quadratic"},
    "module_granularity": {"granularity": "module"},
}


@pytest.mark.parametrize("name", list(SETTINGS))
def test_every_setting_trains_to_an_exact_packed_model(tmp_path, name):
    """The recipe trains each rule / order / policy / schedule / refresh rate to a fully binary model whose packed
    reload gives the trained model's logits bit for bit, and records the setting in the checkpoint."""
    out = str(tmp_path / "out")
    flags = [
        item for key, value in SETTINGS[name].items() for item in (f"--{key}", "none" if value is None else str(value))
    ]
    results = vision.main([*_argv(out, *DATA), "--progression_fraction", "1.0", *flags])
    assert results["reload_bit_identical"] is True
    config = json.load(open(os.path.join(out, "config.json")))["quantization_config"]
    assert config["packed"] is True
    for key, value in SETTINGS[name].items():
        assert config[key] == value, key


def _table(tmp_path, rows: dict) -> str:
    base = {
        "offline_dataset": "mnist_5k",
        "model_name": "resnet18",
        "model_args": json.loads(TINY),
        "image_size": 16,
        "max_train_samples": 32,
        "max_eval_samples": 16,
        "max_steps": 2,
        "per_device_train_batch_size": 8,
        "per_device_eval_batch_size": 16,
        "eval_strategy": "no",
        "save_strategy": "no",
        "report_to": "none",
        "use_cpu": True,
        "disable_tqdm": True,
        "progression_fraction": 1.0,
        "order": "forward",
        "output_dir": "unused",
    }
    base_path = tmp_path / "base.json"
    base_path.write_text(json.dumps(base))
    spec = {
        "title": "Tiny table",
        "recipe": "vision",
        "seeds": [0],
        "columns": {"tiny": {"base": str(base_path), "output_root": str(tmp_path / "runs")}},
        "rows": rows,
    }
    path = tmp_path / "tiny.json"
    path.write_text(json.dumps(spec))
    return str(path)


def test_run_key_names_what_changes():
    base = {"order": "forward", "weights": "stompp", "output_dir": "x", "seed": 0}
    assert ablations.run_key(base, {**base, "seed": 3, "output_dir": "y"}) == "base"
    assert ablations.run_key(base, {**base, "order": "global", "weights": None}) == "order=global__weights=null"


def test_ablation_table_runs_shared_cells_once_resumes_and_keeps_the_reading(tmp_path, capsys):
    table = _table(
        tmp_path,
        {"StoMPP": {}, "StoMPP (explicit forward)": {"order": "forward"}, "reverse": {"order": "reverse"}},
    )
    report = tmp_path / "results" / "ablations.md"
    argv = [table, "--report", str(report), "--report-tables", table, "--threads", "1"]
    ablations.main(argv)
    # two rows with the same effective config share one run
    assert sorted(p for p in os.listdir(tmp_path / "runs") if not p.endswith(".json")) == [
        "base-seed0",
        "order=reverse-seed0",
    ]
    text = report.read_text()
    rows = {line.split("|")[1].strip(): line for line in text.splitlines() if line.startswith("| ")}
    assert "[" in rows["StoMPP"] and "..." not in rows["reverse"]
    assert rows["StoMPP"].split("|")[2] == rows["StoMPP (explicit forward)"].split("|")[2]
    assert (tmp_path / "results" / "ablations_tiny.png").is_file()

    report.write_text(text + "\n## Reading\n\nhand-written notes\n")
    capsys.readouterr()
    ablations.main(argv)  # resume: everything is reused
    out = capsys.readouterr().out
    assert "[run]" not in out and out.count("[reuse]") == 2
    assert report.read_text().rstrip().endswith("## Reading\n\nhand-written notes")


def test_unfinished_cells_and_unknown_tables(tmp_path, capsys):
    table = _table(tmp_path, {"not run": {"order": "global"}})
    report = tmp_path / "ablations.md"
    ablations.main(["--list", "--report-tables", table, "--report", str(report)])
    assert "0/1 runs done" in capsys.readouterr().out
    lines = ablations.write_report([ablations.Table.load(table)], str(report)).splitlines()
    assert "| not run | ... |" in lines
    with pytest.raises(SystemExit, match="No ablation table 'nope'"):
        ablations.Table.load("nope")
