"""Multi-process training: every rank draws the same masks with no communication, and DDP keeps weights equal."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

WORKERS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "workers")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the workers import `tests.testing_utils`


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(worker: str, out, nproc: int = 2) -> None:
    pythonpath = os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": pythonpath}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        str(nproc),
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(free_port()),
        os.path.join(WORKERS, worker),
        str(out),
    ]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


def test_two_process_ddp_ranks_have_identical_masks_and_weights(tmp_path):
    launch("ddp_masks.py", tmp_path)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    steps0, steps1 = ranks[0]["steps"], ranks[1]["steps"]
    assert sorted(steps0, key=int) == [str(s) for s in range(1, 9)] and steps0.keys() == steps1.keys()
    for step in steps0:  # every mask and weight, at every step, identical across ranks
        assert steps0[step] == steps1[step], f"ranks differ at step {step}"
    # the run did progress: partial masks mid-run, weights changing from step to step
    assert 0 < float(steps0["4"]["frozen"]) < float(steps0["8"]["frozen"])
    weights = [k for k in steps0["1"] if k.endswith(".weight")]
    assert all(steps0["1"][k] != steps0["8"][k] for k in weights)


def test_fsdp2_sharded_model_saves_whole_packed_and_latent_checkpoints(tmp_path):
    """Under FSDP2 (2 CPU ranks, gloo) `save_pretrained` gathers the sharded weights: the packed and the latent
    checkpoints reload to the unsharded model's logits bit for bit."""
    launch("fsdp_save.py", tmp_path)
    result = json.loads((tmp_path / "result.json").read_text())
    assert result == {"sharded": "DTensor", "packed_equal": True, "packed_is_packed": True, "latent_equal": True}
