"""The GLUE recipe on tiny local GLUE-format files: every task's preprocessing, an end-to-end run, the presets."""

from __future__ import annotations

import csv
import glob
import json
import os

import pytest
import torch
from safetensors import safe_open
from stompp_hf_recipes import glue, glue_experiments
from stompp_hf_recipes.common import size_refresh_rate
from transformers import AutoTokenizer, BertForSequenceClassification, TrainingArguments

from stompp_hf import StoMPPConfig
from stompp_hf.assets import minilm_path
from stompp_hf.progression import count_stages, find_config

from .conftest import tiny_bert_config

RECIPES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "recipes")

ROWS = {
    "cola": [{"sentence": "the cat sat .", "label": 1}, {"sentence": "sat the cat on .", "label": 0}],
    "sst2": [{"sentence": "a gorgeous film", "label": 1}, {"sentence": "dull and tired", "label": 0}],
    "mrpc": [{"sentence1": "he left .", "sentence2": "he went away .", "label": 1}],
    "qqp": [{"question1": "how to cook rice ?", "question2": "what is a cat ?", "label": 0}],
    "stsb": [{"sentence1": "a man plays .", "sentence2": "a man is playing .", "label": 4.6}],
    "mnli": [{"premise": "it rains .", "hypothesis": "the ground is wet .", "label": 0}],
    "qnli": [{"question": "who wrote it ?", "sentence": "it was written by ann .", "label": 0}],
    "rte": [{"sentence1": "ann owns a car .", "sentence2": "ann has a car .", "label": 0}],
    "wnli": [{"sentence1": "the cup fell , it broke .", "sentence2": "the cup broke .", "label": 1}],
}


def _write(path: str, rows: list[dict], fmt: str) -> str:
    if fmt == "jsonl":
        with open(path, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    else:
        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]), delimiter="\t" if fmt == "tsv" else ",")
            writer.writeheader()
            writer.writerows(rows)
    return path


def _files(tmp_path, task: str, fmt: str, repeat: int = 1) -> dict[str, str]:
    rows = ROWS[task] * repeat
    files = {"train_file": _write(str(tmp_path / f"train.{fmt}"), rows, fmt)}
    files["validation_file"] = _write(str(tmp_path / f"dev.{fmt}"), rows, fmt)
    if task == "mnli":
        files["validation_mismatched_file"] = _write(str(tmp_path / f"dev_mm.{fmt}"), rows, fmt)
    return files


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(minilm_path())


@pytest.mark.parametrize("task", sorted(glue.TASKS))
def test_every_task_preprocesses_local_files(task, tmp_path, tokenizer):
    fmt = {"sst2": "tsv", "mnli": "jsonl", "stsb": "csv"}.get(task, "tsv")
    data = glue.DataArguments(task_name=task, **_files(tmp_path, task, fmt))
    raw = glue.load_raw_datasets(data)
    names = glue.eval_split_names(task, raw)
    assert names == (["validation_matched", "validation_mismatched"] if task == "mnli" else ["validation"])
    encoded = glue.preprocess(raw, task, tokenizer, max_seq_length=16)
    first, second, num_labels = glue.TASKS[task]
    row = ROWS[task][0]
    example = encoded["train"][0]
    expected = tokenizer(row[first], row[second], truncation=True, max_length=16) if second else tokenizer(row[first])
    assert example["input_ids"] == expected["input_ids"]
    if second is not None:  # pair tasks: both segments present
        assert 1 in example["token_type_ids"]
    if num_labels == 1:
        assert example["labels"] == pytest.approx(4.6)
    else:
        assert example["labels"] == row["label"] and isinstance(example["labels"], int)


def test_missing_columns_and_bad_task_are_clear(tmp_path, tokenizer):
    data = glue.DataArguments(task_name="rte", **_files(tmp_path, "sst2", "tsv"))
    with pytest.raises(ValueError, match="needs columns"):
        glue.preprocess(glue.load_raw_datasets(data), "rte", tokenizer, 16)
    with pytest.raises(ValueError, match="task_name"):
        glue.DataArguments(task_name="squad")


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory, tokenizer):
    path = tmp_path_factory.mktemp("tiny-minilm")
    torch.manual_seed(0)
    config = tiny_bert_config(vocab_size=tokenizer.vocab_size, max_position_embeddings=128)
    BertForSequenceClassification(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def _run(tmp_path, tiny_model_dir, task: str, *extra: str) -> tuple[str, dict]:
    out = str(tmp_path / f"out-{task}")
    files = _files(tmp_path, task, "csv", repeat=8)
    argv = [
        "--model_name_or_path",
        tiny_model_dir,
        "--task_name",
        task,
        *[x for k, v in files.items() for x in (f"--{k}", v)],
        "--output_dir",
        out,
        "--max_steps",
        "4",
        "--per_device_train_batch_size",
        "4",
        "--learning_rate",
        "1e-3",
        "--eval_strategy",
        "steps",
        "--eval_steps",
        "2",
        "--logging_steps",
        "1",
        "--save_strategy",
        "no",
        "--report_to",
        "none",
        "--use_cpu",
        "true",
        *extra,
    ]
    return out, glue.main(argv)


def test_recipe_end_to_end_on_local_files(tmp_path, tiny_model_dir):
    out, results = _run(tmp_path, tiny_model_dir, "rte", "--progression_fraction", "1.0")
    files = set(os.listdir(out))
    assert {
        "model.safetensors",
        "config.json",
        "tokenizer.json",
        "all_results.json",
        "curves.png",
        "README.md",
    } <= files
    config = json.load(open(os.path.join(out, "config.json")))
    assert config["quantization_config"]["packed"] is True  # the final checkpoint is packed 1-bit
    with safe_open(os.path.join(out, "model.safetensors"), "pt") as f:
        assert any(k.endswith(".weight") and f.get_slice(k).get_dtype() == "U8" for k in f.keys())
    saved = json.load(open(os.path.join(out, "all_results.json")))
    assert saved["train_steps"] == 4 and saved["task"] == "rte" and saved["train_precision"] == "float32"
    assert 0.0 <= saved["eval_accuracy"] <= 1.0 and "eval_binarized_accuracy" in saved
    # The curve data: the binarized network was evaluated mid-progression (step 2 of 4), next to the trained one.
    history = json.load(open(os.path.join(out, "trainer_state.json")))["log_history"]
    at_step_2 = {k for e in history if e.get("step") == 2 for k in e}
    assert {"eval_accuracy", "eval_binarized_accuracy", "stompp/weight_frozen_fraction"} <= at_step_2
    card = open(os.path.join(out, "README.md")).read()
    assert "stompp" in card and "eval_accuracy" in card
    with open(os.path.join(out, "curves.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_recipe_regression_and_mnli(tmp_path, tiny_model_dir):
    _, results = _run(
        tmp_path, tiny_model_dir, "stsb", "--eval_binarized", "false", "--ignore_mismatched_sizes", "true"
    )
    assert {"eval_pearson", "eval_spearmanr"} <= set(results)
    _, results = _run(tmp_path, tiny_model_dir, "mnli", "--binarize", "false", "--ignore_mismatched_sizes", "true")
    assert "eval_accuracy" in results and "eval_mismatched_accuracy" in results


@pytest.mark.parametrize("task", ["rte", "stsb"])
def test_two_phase_distillation_on_local_files(tmp_path, tiny_model_dir, task):
    """Phase 1 fine-tunes the full-precision teacher; phase 2 initialises the StoMPP student from it and distils."""
    head = ["--ignore_mismatched_sizes", "true"] if task == "stsb" else []
    (tmp_path / "fp").mkdir()
    (tmp_path / "kd").mkdir()
    teacher, _ = _run(tmp_path / "fp", tiny_model_dir, task, "--binarize", "false", *head)
    out, results = _run(
        tmp_path / "kd",
        tiny_model_dir,
        task,
        "--teacher_model_name_or_path",
        teacher,
        "--kd_hidden_weight",
        "0.5",
        "--progression_fraction",
        "1.0",
    )
    assert json.load(open(os.path.join(out, "config.json")))["quantization_config"]["packed"] is True
    history = json.load(open(os.path.join(out, "trainer_state.json")))["log_history"]
    logged = {k for e in history for k in e}
    assert {"distill/logit", "distill/hidden"} <= logged
    metric = "eval_pearson" if task == "stsb" else "eval_accuracy"
    assert metric in results
    with safe_open(os.path.join(out, "model.safetensors"), "pt") as f:  # the teacher is not in the export
        assert not any("teacher" in k for k in f.keys())


def test_refresh_rate_is_sized_from_the_stage_length(tmp_path, tiny_model_dir):
    model = BertForSequenceClassification.from_pretrained(tiny_model_dir, quantization_config=StoMPPConfig())
    config = find_config(model)
    stages = count_stages(model)
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=160 * stages, report_to="none", use_cpu=True)
    # 0.5 of 160 * S steps progress: 80 steps per stage, r = 80 / 8
    assert size_refresh_rate(config, model, args, train_samples=100, fraction=0.5) == 10
    assert find_config(model).refresh_rate == 10  # the config the controller reads


def test_explicit_refresh_rate_wins_over_the_stage_length_rule(tmp_path):
    base = json.load(open(os.path.join(RECIPES, "experiments", "glue", "stompp_ste_w1a1.json")))
    for extra, expected in [
        ({}, True),
        ({"refresh_rate": 7}, False),
        ({"refresh_rate": 7, "refresh_from_stage": True}, True),
    ]:
        path = tmp_path / "run.json"
        path.write_text(json.dumps({**base, **extra}))
        stompp_args = glue.parse_args([str(path)])[2]
        assert stompp_args.refresh_from_stage is expected
    stompp_args = glue.parse_args(["--output_dir", str(tmp_path), "--refresh_rate", "7"])[2]
    assert stompp_args.refresh_from_stage is False and stompp_args.refresh_rate == 7


def test_presets_parse():
    demo = glue.parse_args([os.path.join(RECIPES, "experiments", "glue", "demo.json")])
    model_args, data, stompp_args, distill, training = demo
    assert model_args.model_name_or_path is None and data.task_name == "sst2" and glue._uses_embedded(data)
    assert stompp_args.binarize and training.output_dir == "outputs/demo"
    # the demo runs the best W1A1 row of benchmarks/results/glue_sst2.md (vanilla STE + KD) at demo size
    best = glue.parse_args([os.path.join(RECIPES, "experiments", "glue", "ste_w1a1_kd.json")])
    assert stompp_args.config(0) == best[2].config(0) and distill.config() == best[3].config()
    assert model_args.teacher_model_name_or_path == "outputs/demo-fp"  # phase 2 of `recipes/demo.py`
    phase1 = glue.parse_args([os.path.join(RECIPES, "experiments", "glue", "demo_fp.json")])
    assert phase1[4].output_dir == "outputs/demo-fp" and phase1[2].config(0) is None
    experiments = sorted(glob.glob(os.path.join(RECIPES, "experiments", "glue", "*.json")))
    assert len(experiments) >= 6
    configs = {os.path.basename(p): glue.parse_args([p])[2].config(0) for p in experiments}
    assert configs["fp.json"] is None
    assert configs["stompp_bwn.json"].activations is None
    assert configs["ste_w1a1.json"].weights == "ste"
    kd = glue.parse_args([os.path.join(RECIPES, "experiments", "glue", "stompp_ste_w1a1_kd.json")])
    assert kd[0].teacher_model_name_or_path == "outputs/glue/fp-seed{seed}" and kd[3].config().logit_weight == 1.0


def test_results_table_compares_rows_and_keeps_the_reading(tmp_path):
    def runs(values, binarized=True):
        key = "eval_binarized_accuracy" if binarized else "eval_accuracy"
        return [{"eval_accuracy": v, key: v, "train_steps": 8, "train_runtime": 1.0} for v in values]

    rows = [("fp", runs([0.90, 0.92], binarized=False)), ("a", runs([0.80, 0.82])), ("b", runs([0.70, 0.79]))]
    path = str(tmp_path / "table.md")
    with open(path, "w") as f:
        f.write("# old table\n\n## Reading\n\nhand-written notes\n")
    text = glue_experiments.write_table(rows, path, "cmd", "accuracy", ["a:b", "fp:a", "a:missing"])
    # a - b = 81.0 - 74.5 = +6.5 with half-ranges 1.0 and 4.5: beyond the spread; fp - a = +10.0 (1.0, 1.0): beyond
    assert "| a - b | +6.5 | 1.0 | 4.5 | yes |" in text
    assert "| fp - a | +10.0 | 1.0 | 1.0 | yes |" in text
    assert "missing" not in text and "old table" not in text
    assert text.rstrip().endswith("## Reading\n\nhand-written notes")
    rows[1] = ("a", runs([0.80]))  # one seed: no spread to judge against
    assert "| a - b | +5.5 | 0.0 | 4.5 | n/a (fewer than 2 seeds) |" in glue_experiments.write_table(
        rows, path, "cmd", "accuracy", ["a:b"]
    )
    rows[1] = ("a", runs([0.80, 0.82]))
    rows[2] = ("b", runs([0.70, 0.90]))  # a - b = +1.0 within the half-ranges 1.0 + 10.0
    assert "| a - b | +1.0 | 1.0 | 10.0 | no |" in glue_experiments.write_table(rows, path, "cmd", "accuracy", ["a:b"])


@pytest.mark.parametrize("jobs", [1, 2, 3])
def test_parallel_runs_wait_for_their_teacher(tmp_path, monkeypatch, jobs):
    """`--jobs N`: N runs at once with cores / N threads each; a run distilled from another run of the same
    invocation starts only after that run has finished, and every (config, seed) runs once."""
    import threading
    import time

    fp = tmp_path / "fp.json"
    fp.write_text(json.dumps({"output_dir": str(tmp_path / "fp")}))
    kd = tmp_path / "kd.json"
    kd.write_text(
        json.dumps({"output_dir": str(tmp_path / "kd"), "teacher_model_name_or_path": str(tmp_path / "fp-seed{seed}")})
    )
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"output_dir": str(tmp_path / "other")}))
    events, lock = [], threading.Lock()

    def fake_run_one(config, seed, force=False, env=None):
        name = os.path.splitext(os.path.basename(config))[0]
        with lock:
            events.append(("start", name, seed, (env or {}).get("OMP_NUM_THREADS")))
        time.sleep(0.05 if name == "fp" else 0.01)
        with lock:
            events.append(("end", name, seed, None))
        return {"name": name, "seed": seed}

    monkeypatch.setattr(glue_experiments, "run_one", fake_run_one)
    seen = []
    results = glue_experiments.run_all(
        [str(kd), str(other), str(fp)], [0, 1], jobs=jobs, on_done=lambda r: seen.append(len(r))
    )
    assert sorted(results) == sorted((str(c), s) for c in (kd, other, fp) for s in (0, 1))
    assert sorted(seen) == list(range(1, 7))
    for seed in (0, 1):
        fp_end = events.index(("end", "fp", seed, None))
        kd_start = next(i for i, e in enumerate(events) if e[:3] == ("start", "kd", seed))
        assert fp_end < kd_start
    threads = {e[3] for e in events if e[0] == "start"}
    assert threads == ({None} if jobs == 1 else {str(max(1, (os.cpu_count() or 1) // jobs))})


def test_collect_writes_the_table_from_finished_runs_only(tmp_path, monkeypatch):
    """`--collect` runs nothing: rows from the `all_results.json` that exist (a missing seed is left out, a config
    with none has no row), the hand-written reading kept, and the table's command the one that runs everything."""

    def fail(*args, **kwargs):
        raise AssertionError("--collect must not run anything")

    monkeypatch.setattr(glue_experiments, "run_one", fail)
    configs = []
    for name, accuracies in (("a", [0.8, 0.82, None]), ("b", [None, None, None])):
        config = tmp_path / f"{name}.json"
        config.write_text(json.dumps({"output_dir": str(tmp_path / "out" / name)}))
        configs.append(str(config))
        for seed, accuracy in enumerate(accuracies):
            if accuracy is not None:
                run = tmp_path / "out" / f"{name}-seed{seed}"
                run.mkdir(parents=True)
                result = {"eval_accuracy": accuracy, "eval_binarized_accuracy": accuracy, "train_steps": 8}
                (run / "all_results.json").write_text(json.dumps({**result, "train_runtime": 1.0}))
    table = tmp_path / "table.md"
    table.write_text("old\n\n## Reading\n\nnotes\n")
    glue_experiments.main([*configs, "--seeds", "0", "1", "2", "--jobs", "2", "--table", str(table), "--collect"])
    text = table.read_text()
    assert "| a | 2 | 8 | 81.0 ± 1.0 | 81.0 ± 1.0 | 80.0, 82.0 |" in text
    assert "| b |" not in text and text.rstrip().endswith("## Reading\n\nnotes")
    assert "--seeds 0 1 2 --jobs 2 --table" in text and "--collect" not in text
    with pytest.raises(SystemExit):
        glue_experiments.main([*configs, "--table", str(table), "--collect", "--force"])


@pytest.mark.parametrize(
    "native, keep, expected",
    [(False, False, False), (False, True, True), (True, False, True), (None, False, True)],
    ids=["no-bf16-cpu", "no-bf16-cpu-kept", "bf16-cpu", "flags-unknown"],
)
def test_bf16_presets_train_in_float32_on_a_cpu_without_bf16(monkeypatch, tmp_path, native, keep, expected):
    from stompp_hf_recipes import common

    monkeypatch.setattr(common, "has_native_bf16", lambda: native)
    preset = json.load(open(os.path.join(RECIPES, "experiments", "glue", "demo_fp.json")))
    assert preset["bf16"] is True and preset["use_cpu"] is True
    path = tmp_path / "run.json"
    path.write_text(json.dumps({**preset, "output_dir": str(tmp_path), "bf16_on_any_cpu": keep}))
    training = glue.parse_args([str(path)])[-1]
    assert training.bf16 is expected and training.mixed_precision == ("bf16" if expected else "no")
    assert training.max_steps == preset["max_steps"] and training.output_dir == str(tmp_path)  # nothing else lost
    flags = ["--output_dir", str(tmp_path), "--use_cpu", "--bf16", "--bf16_full_eval"]
    training = glue.parse_args(flags + (["--bf16_on_any_cpu"] if keep else []))[-1]
    assert training.bf16 is expected and training.bf16_full_eval is expected
