"""`stompp/*` progress reaches every tracker through the Trainer's own logs: the reporting callbacks, which `Trainer`
calls before the callbacks a user passes, see it; TensorBoard gets it in the Trainer's own timestamped run folder,
with no side folder."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from transformers import AutoModelForSequenceClassification, Trainer, TrainerCallback

from stompp_hf import StoMPPCallback, StoMPPConfig
from stompp_hf.distillation import DistillationConfig, DistillationTrainer

from .testing_utils import load_stompp, toy_dataset, training_args

PROGRESS = {
    "stompp/stage",
    "stompp/num_stages",
    "stompp/weight_frozen_fraction",
    "stompp/input_frozen_fraction",
    "stompp/stage_frozen_fraction",
}


class Reporter(TrainerCallback):
    """Stands for wandb / MLflow / any `report_to` integration: what its `on_log` receives."""

    def __init__(self) -> None:
        self.logs: list[dict] = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append(dict(logs))


def _train(model, output_dir, callbacks, trainer_cls=Trainer, **kwargs):
    args = training_args(output_dir, max_steps=4, **kwargs.pop("args", {}))
    trainer = trainer_cls(model=model, args=args, train_dataset=toy_dataset(), callbacks=callbacks, **kwargs)
    trainer.train()
    return trainer


def test_reporting_callbacks_see_the_progress(tiny_bert_dir, tmp_path):
    reporter = Reporter()
    stompp = StoMPPCallback(progression_fraction=0.5)
    # the reporter runs first, as Trainer runs the `report_to` integrations before the callbacks passed to it
    trainer = _train(load_stompp(tiny_bert_dir, StoMPPConfig()), tmp_path, [reporter, stompp])
    training = [entry for entry in reporter.logs if "loss" in entry]
    assert len(training) == 4 and all(PROGRESS <= set(entry) for entry in training)
    # 2 progression steps over 3 stages: stage 1 is transitioning after step 1, all are done from step 2
    assert [entry["stompp/stage"] for entry in training] == [1.0, 3.0, 3.0, 3.0]
    assert training[-1]["stompp/stage_frozen_fraction"] == 1.0
    history = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert [{k: v for k, v in h.items() if k.startswith("stompp/")} for h in history] == [
        {k: v for k, v in entry.items() if k.startswith("stompp/")} for entry in training
    ]
    eval_entries = [entry for entry in reporter.logs if "loss" not in entry]
    assert all(not any(k.startswith("stompp/") for k in entry) for entry in eval_entries)


def test_distillation_trainer_logs_progress_and_terms_together(tiny_bert_dir, tmp_path):
    reporter = Reporter()
    teacher = AutoModelForSequenceClassification.from_pretrained(tiny_bert_dir)
    _train(
        load_stompp(tiny_bert_dir, StoMPPConfig()),
        tmp_path,
        [reporter, StoMPPCallback()],
        trainer_cls=DistillationTrainer,
        teacher=teacher,
        distillation=DistillationConfig(),
    )
    training = [entry for entry in reporter.logs if "loss" in entry]
    assert training and all(PROGRESS | {"distill/logit"} <= set(entry) for entry in training)


def _scalars(folder) -> list[set[str]]:
    """The scalar tags of each event file under `folder`."""
    files = []
    for root, _, names in os.walk(folder):
        for name in names:
            if "tfevents" in name:
                events = EventAccumulator(os.path.join(root, name))
                events.Reload()
                files.append(set(events.Tags()["scalars"]))
    return files


def test_tensorboard_gets_progress_in_the_trainers_own_run_folders(tiny_bert_dir, tmp_path, monkeypatch):
    monkeypatch.delenv("TENSORBOARD_LOGGING_DIR", raising=False)
    for seed in (0, 1):  # two runs in one output_dir: each has its own event file, none is overwritten
        model = load_stompp(tiny_bert_dir, StoMPPConfig())
        _train(model, tmp_path, [StoMPPCallback()], args={"report_to": ["tensorboard"], "seed": seed})
    assert not (tmp_path / "runs" / "stompp").exists()  # no side folder: the Trainer's timestamped runs/<time_host>
    runs = _scalars(tmp_path / "runs")
    assert len(runs) == 2
    for tags in runs:
        assert {f"train/{key}" for key in PROGRESS} | {"train/loss"} <= tags


def test_trainer_log_is_wrapped_only_once_a_stompp_callback_exists():
    code = (
        "import json, stompp_hf\n"
        "from transformers import Trainer\n"
        "wrapped = lambda: getattr(Trainer.log, '_stompp_wrapped', False)\n"
        "before = wrapped()\n"
        "stompp_hf.StoMPPCallback()\n"
        "print(json.dumps([before, wrapped()]))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == [False, True]
