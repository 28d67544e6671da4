"""`accelerate launch` on CPU: the command the README gives starts two processes (`--cpu --num_processes 2` would
start one: accelerate's simple launcher), and `Trainer` + `StoMPPCallback` keep masks and weights equal on both."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from .test_distributed import ROOT, WORKERS, free_port

#: The README's command, up to the script (`--multi_gpu` selects the multi-process launcher, here on CPU / gloo).
COMMAND = "--multi_gpu --num_processes 2 --num_machines 1 --mixed_precision no --dynamo_backend no".split()


@pytest.mark.slow
def test_accelerate_launch_runs_two_cpu_ranks_with_identical_masks(tmp_path):
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "HF_HOME": str(tmp_path / "hf"),  # no user `accelerate config` file changes the launch
        "PYTHONPATH": os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p),
    }
    port = ["--main_process_ip", "127.0.0.1", "--main_process_port", str(free_port())]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", *COMMAND, *port, os.path.join(WORKERS, "ddp_masks.py")]
    done = subprocess.run([*cmd, str(tmp_path)], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    assert ranks[0]["steps"] == ranks[1]["steps"] and len(ranks[0]["steps"]) == 8
