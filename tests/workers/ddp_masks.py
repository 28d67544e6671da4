"""One rank of a 2-process CPU (gloo) DDP run of `Trainer` + `StoMPPCallback` on a tiny BERT.

Launched by `tests/test_distributed.py` through `torch.distributed.run`, with the repository root on `PYTHONPATH`
(for `tests.testing_utils`). After every optimizer step it records a digest of every mask and every StoMPP weight;
each rank writes `rank<N>.json` into the output folder.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys

import torch
from transformers import BertForSequenceClassification, Trainer, TrainerCallback, TrainingArguments

from stompp_hf import StoMPPCallback, StoMPPConfig, stompp_modules
from tests.testing_utils import tiny_bert_config, toy_dataset


def digest(tensor: torch.Tensor) -> str:
    return hashlib.sha256(tensor.detach().cpu().contiguous().numpy().tobytes()).hexdigest()[:16]


class Recorder(TrainerCallback):
    def __init__(self) -> None:
        self.steps: dict[int, dict[str, str]] = {}

    def on_step_end(self, args, state, control, model=None, **kwargs):
        model = getattr(model, "module", model)
        snap = {}
        for name, module in stompp_modules(model).items():
            snap[f"{name}.weight_mask"] = digest(module.weight_mask)
            snap[f"{name}.input_mask"] = digest(module.input_mask)
            snap[f"{name}.weight"] = digest(module.weight)
        snap["frozen"] = str(sum(float(m.weight_mask.float().mean()) for m in stompp_modules(model).values()))
        self.steps[state.global_step] = snap


def main(out: str) -> None:
    rank = int(os.environ["RANK"])
    torch.manual_seed(0)
    model_dir = os.path.join(out, "tiny-bert")
    if rank == 0:
        BertForSequenceClassification(tiny_bert_config()).save_pretrained(model_dir)
    torch.distributed.init_process_group("gloo")
    torch.distributed.barrier()
    config = StoMPPConfig(refresh_rate=4, schedule="linear", seed=7)
    model = BertForSequenceClassification.from_pretrained(model_dir, quantization_config=config)
    args = TrainingArguments(
        os.path.join(out, "run"),
        max_steps=8,
        per_device_train_batch_size=4,
        learning_rate=1e-3,
        report_to=[],
        save_strategy="no",
        disable_tqdm=True,
        use_cpu=True,
        seed=rank,  # different seeds per rank: masks must still agree (they depend on the config seed only)
        ddp_backend="gloo",
    )
    recorder = Recorder()
    trainer = Trainer(model=model, args=args, train_dataset=toy_dataset(), callbacks=[StoMPPCallback(), recorder])
    trainer.train()
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump({"world_size": trainer.args.world_size, "steps": recorder.steps}, f)
    # A clean teardown: exiting with the gloo process group alive can abort a rank in its destructor
    # ("terminate called without an active exception"), seen once in a full-suite run.
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
