"""FSDP2 (`fully_shard`, CPU / gloo) + `save_pretrained` of a StoMPP model, one process per rank.

Launched by `tests/test_distributed.py` through `torch.distributed.run`, with the repository root on `PYTHONPATH`
(for `tests.testing_utils`). Rank 0 writes `result.json`: the logits of the reloaded packed and latent checkpoints
compared with the unsharded model's.
"""

from __future__ import annotations

import json
import os
import sys

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard
from transformers import BertForSequenceClassification

from stompp_hf import StoMPPConfig, binarized, prepare_model, stompp_modules
from stompp_hf.integrations.transformers.quantizer import KEEP_LATENT_ATTR
from tests.testing_utils import eval_ids, logits, tiny_bert_config, train_to_freeze


def binarized_logits(model, ids):
    with binarized(model):
        return logits(model, ids)


def main(out: str) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)
    model = BertForSequenceClassification(tiny_bert_config())
    prepare_model(model, StoMPPConfig())
    train_to_freeze(model)
    ids = eval_ids()
    expected = logits(model, ids)
    for layer in model.bert.encoder.layer:
        fully_shard(layer)
    fully_shard(model)
    sharded = type(next(iter(stompp_modules(model).values())).weight).__name__
    model.save_pretrained(os.path.join(out, "packed"), is_main_process=rank == 0)
    setattr(model, KEEP_LATENT_ATTR, True)  # what StoMPPCallback sets while training: a latent checkpoint
    model.save_pretrained(os.path.join(out, "latent"), is_main_process=rank == 0)
    dist.barrier()
    if rank == 0:
        packed = BertForSequenceClassification.from_pretrained(os.path.join(out, "packed"))
        latent = BertForSequenceClassification.from_pretrained(os.path.join(out, "latent"))
        result = {
            "sharded": sharded,
            "packed_equal": bool(torch.equal(logits(packed, ids), expected)),
            "packed_is_packed": any(type(m).__name__ == "BinaryLinear" for m in packed.modules()),
            # a latent checkpoint holds no masks (they start over): binarize fully to compare the function
            "latent_equal": bool(torch.equal(binarized_logits(latent, ids), expected)),
        }
        with open(os.path.join(out, "result.json"), "w") as f:
            json.dump(result, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
