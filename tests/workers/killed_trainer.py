"""A `Trainer` + `StoMPPCallback` run on a tiny BERT that SIGKILLs itself at a chosen point of a checkpoint write.

Launched by `tests/test_fault_injection.py` with the repository root on `PYTHONPATH`:

    python -m tests.workers.killed_trainer MODEL_DIR OUTPUT_DIR KILL_AT [RESUME]

KILL_AT is where the process dies while writing `checkpoint-4` (the second of saves every 2 steps, of 6 steps):
"model" (half of model.safetensors written), "disk_full" (the same, then `OSError(ENOSPC)` instead of a kill),
"optimizer" (weights written, optimizer not), "trainer_state" (all but
half of trainer_state.json written), "after_save" (the checkpoint complete), or "none". RESUME ("latest" or a
checkpoint folder) resumes instead of starting. A run that finishes prints one JSON line: the sha256 of every
tensor of the final state dict and every mask.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import signal
import sys

import torch
from transformers import BertForSequenceClassification, Trainer, TrainerCallback, TrainerState, TrainingArguments

from stompp_hf import StoMPPCallback, StoMPPConfig, stompp_modules
from tests.testing_utils import toy_dataset

KILL_STEP = 4


def die() -> None:
    sys.stdout.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def half_then_die(write, disk_full: bool = False):
    """Wrap a `write(obj, path, ...)`: at the kill step, write it, cut the file to half its size, and die (or raise
    the error of a full disk)."""

    def wrapped(obj, path, *args, **kwargs):
        result = write(obj, path, *args, **kwargs)
        if f"checkpoint-{KILL_STEP}" in str(path):
            size = os.path.getsize(path)
            with open(path, "r+b") as f:
                f.truncate(size // 2)
            if disk_full:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
            die()
        return result

    return wrapped


class KillAfterSave(TrainerCallback):
    def on_save(self, args, state, control, **kwargs):
        if state.global_step == KILL_STEP:
            die()


def main() -> None:
    model_dir, output_dir, kill_at = sys.argv[1:4]
    resume = sys.argv[4] if len(sys.argv) > 4 else None
    callbacks: list[TrainerCallback] = [StoMPPCallback()]
    if kill_at in ("model", "disk_full"):
        import transformers.modeling_utils as modeling_utils

        modeling_utils.safe_save_file = half_then_die(modeling_utils.safe_save_file, kill_at == "disk_full")
    elif kill_at == "optimizer":
        original = Trainer._save_optimizer_and_scheduler

        def save_optimizer(self, output_dir):
            if output_dir.endswith(f"checkpoint-{KILL_STEP}"):
                die()
            return original(self, output_dir)

        Trainer._save_optimizer_and_scheduler = save_optimizer
    elif kill_at == "trainer_state":
        original_json = TrainerState.save_to_json

        def save_json(self, path):
            original_json(self, path)
            if f"checkpoint-{KILL_STEP}" in path:
                with open(path, "r+b") as f:
                    f.truncate(os.path.getsize(path) // 2)
                die()

        TrainerState.save_to_json = save_json
    elif kill_at == "after_save":
        callbacks.append(KillAfterSave())

    config = StoMPPConfig(refresh_rate=4, schedule="linear")
    model = BertForSequenceClassification.from_pretrained(model_dir, quantization_config=config)
    args = TrainingArguments(
        output_dir,
        max_steps=6,
        per_device_train_batch_size=8,
        learning_rate=1e-3,
        report_to=[],
        save_strategy="steps",
        save_steps=2,
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
        full_determinism=True,
    )
    trainer = Trainer(model=model, args=args, train_dataset=toy_dataset(), callbacks=callbacks)
    trainer.train(resume_from_checkpoint=True if resume == "latest" else resume)
    state = model.state_dict()
    digests = {k: hashlib.sha256(v.detach().contiguous().numpy().tobytes()).hexdigest() for k, v in state.items()}
    for name, module in stompp_modules(model).items():
        for kind in ("weight_mask", "input_mask"):
            mask = getattr(module, kind)
            digests[f"{name}.{kind}"] = hashlib.sha256(mask.numpy().tobytes()).hexdigest()
    print(json.dumps(digests, sort_keys=True))


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
