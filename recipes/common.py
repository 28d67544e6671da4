"""Pieces shared by the recipes (`glue.py`, `vision.py`) and their experiment runners.

* `BinarizedEvalTrainer`: a `Trainer` whose evaluation also reports the fully binarized network
  (`eval_binarized_*`, the paper's "quantized network" curve) for StoMPP models.
* `StageProgressCallback`: logs the frozen fraction of the stage that is transitioning (`stompp/stage_frozen_fraction`,
  a sawtooth that restarts at every stage) next to `StoMPPCallback`'s averages.
* `plot_curves`: `curves.png` from a `Trainer` log history.
* `StoMPPArguments` / `stompp_callbacks`: the StoMPP command-line options of both recipes (each recipe sets its own
  defaults) and the callbacks that drive and record the progression.
* `run_config` / `result_cells` / `results_header` / `write_markdown`: one (experiment config, seed) run of a recipe in
  its own process, reused when its `all_results.json` exists, and the runners' table cells and file (the header with
  the command is shared with `benchmarks/`).
"""

from __future__ import annotations

import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

from transformers import Trainer, TrainerCallback

from stompp_hf import StoMPPCallback, StoMPPConfig, binarized
from stompp_hf.export import binarization_progress
from stompp_hf.hub import is_stompp_model

logger = logging.getLogger("recipes.common")


def none_str(value: str | None) -> str | None:
    """None for a missing value or the strings 'none' / 'null' / '' (how a command line spells None)."""
    return None if value is None or str(value).lower() in ("none", "null", "") else value


@dataclass
class StoMPPArguments:
    """StoMPP options of a recipe. Defaults suit fine-tuning pretrained transformers; `recipes/vision.py` subclasses
    it with the paper's CNN defaults."""

    binarize: bool = field(default=True, metadata={"help": "False trains the full-precision baseline."})
    weights: str | None = field(
        default="stompp_ste", metadata={"help": "'stompp', 'stompp_ste' (StoMPP + STE on frozen), 'ste' or 'none'."}
    )
    activations: str | None = field(default="stompp_ste", metadata={"help": "Same values; 'none' = BWN."})
    schedule: str = field(default="cubic", metadata={"help": "p(tau) shape."})
    refresh_rate: int = field(default=100, metadata={"help": "Soft refresh rate r."})
    order: str = field(default="forward", metadata={"help": "'forward', 'global' or 'reverse'."})
    policy: str = field(default="stochastic", metadata={"help": "'stochastic' or 'deterministic' (BWN)."})
    granularity: str = field(default="block", metadata={"help": "'block' or 'module'."})
    weight_scale: str = field(default="channel", metadata={"help": "'channel' or 'none'."})
    activation_scale: str = field(default="tensor", metadata={"help": "'tensor' or 'none'."})
    activation_clip: float = field(
        default=1.0, metadata={"help": "Clip bound of the continuous input path, in units of beta."}
    )
    compensation: str | None = field(
        default=None, metadata={"help": "'surge' adds the SURGE dual-path gradient compensator ('none': off)."}
    )
    surge_eta: float = field(default=0.5, metadata={"help": "SURGE eta: compensation norm / STE gradient norm."})
    export_dtype: str | None = field(default=None, metadata={"help": "Packed remainder dtype, e.g. 'float16'."})
    progression_fraction: float = field(
        default=0.7, metadata={"help": "Share of training steps spent progressing; the rest trains fully binary."}
    )
    eval_binarized: bool = field(
        default=True, metadata={"help": "Also evaluate `binarized(model)` at every evaluation (the paper's curve)."}
    )

    def config(self, seed: int) -> StoMPPConfig | None:
        if not self.binarize:
            return None
        return StoMPPConfig(
            weights=none_str(self.weights),
            activations=none_str(self.activations),
            schedule=self.schedule,
            refresh_rate=self.refresh_rate,
            order=self.order,
            policy=self.policy,
            granularity=self.granularity,
            weight_scale=self.weight_scale,
            activation_scale=self.activation_scale,
            activation_clip=self.activation_clip,
            compensation=none_str(self.compensation),
            surge_eta=self.surge_eta,
            export_dtype=none_str(self.export_dtype),
            seed=seed,
        )


class BinarizedEvalTrainer(Trainer):
    """`Trainer` whose evaluation also reports the fully binarized network (`eval_binarized_*`) for StoMPP models.

    Once every mask is frozen the binarized network *is* the network as trained, so its metrics are copied instead
    of evaluating a second time.
    """

    def __init__(self, *args, eval_binarized: bool = True, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.eval_binarized = eval_binarized

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval"):
        metrics = super().evaluate(eval_dataset, ignore_keys, metric_key_prefix)
        model = self.accelerator.unwrap_model(self.model)
        if self.eval_binarized and is_stompp_model(model) and "binarized" not in metric_key_prefix:
            prefix = f"{metric_key_prefix}_binarized"
            if binarization_progress(model).complete:
                # Every mask is already 1: the binarized network is the network as trained; reuse its metrics.
                head = f"{metric_key_prefix}_"
                binary = {f"{prefix}_{k[len(head) :]}": v for k, v in metrics.items() if k.startswith(head)}
                self.log(binary)
                metrics.update(binary)
            else:
                with binarized(model):
                    metrics.update(super().evaluate(eval_dataset, ignore_keys, prefix))
        return metrics


class StageProgressCallback(TrainerCallback):
    """Log `stompp/stage_frozen_fraction`: the mean weight frozen fraction of the stage now transitioning.

    `StoMPPCallback` logs the average over all tensors, which rises smoothly; this one restarts at 0 at every stage
    (1.0 once the progression is complete), which shows the stage-by-stage progression as a sawtooth. Add it after
    the `StoMPPCallback` it reads from.
    """

    KEY = "stompp/stage_frozen_fraction"

    def __init__(self, stompp_callback) -> None:
        self.stompp_callback = stompp_callback
        #: (step, value) after every optimizer step: logging steps alone alias a sawtooth whose stages last only a
        #: few steps, so `plot_curves(..., stage_points=callback.points)` draws from these.
        self.points: list[tuple[int, float]] = []

    def value(self) -> float | None:
        controller = self.stompp_callback.controller
        if controller is None:
            return None
        stage = controller.current_stage
        if stage >= controller.num_stages:
            return 1.0
        tensors = [t for t in controller.tensors if t.stage == stage and t.binarizer.mask is not None]
        weights = [t for t in tensors if t.binarizer.kind == "weight"]
        fractions = [t.binarizer.mask.frozen_fraction for t in (weights or tensors)]
        return sum(fractions) / len(fractions) if fractions else None

    def on_step_end(self, args, state, control, **kwargs) -> None:
        value = self.value()
        if value is not None:
            self.points.append((state.global_step, value))

    def on_log(self, args, state, control, logs=None, **kwargs) -> None:
        if logs is None or "loss" not in logs:
            return
        value = self.value()
        if value is None:
            return
        logs[self.KEY] = value
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1][self.KEY] = value


def stompp_callbacks(
    config: StoMPPConfig | None, progression_fraction: float
) -> tuple[list[TrainerCallback], StageProgressCallback | None]:
    """`[StoMPPCallback, StageProgressCallback]` for a StoMPP run (none for full precision), and the latter."""
    if config is None:
        return [], None
    stompp_callback = StoMPPCallback(progression_fraction=progression_fraction)
    stage_callback = StageProgressCallback(stompp_callback)
    return [stompp_callback, stage_callback], stage_callback


def plot_curves(
    log_history: list[dict], path: str, metric: str, stage_points: list[tuple[int, float]] | None = None
) -> str | None:
    """`metric` of the network as trained and binarized, the training loss and the frozen fractions over steps.

    `stage_points` (`StageProgressCallback.points`, one per step) draws the current stage's frozen fraction at
    every step instead of at logging steps only. Returns the path, or None if matplotlib is missing.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("matplotlib is not installed: no curves.png (pip install matplotlib).")
        return None

    def series(key: str) -> list[tuple[int, float]]:
        return [(e["step"], e[key]) for e in log_history if key in e and "step" in e]

    trained = series(f"eval_{metric}")
    binary = series(f"eval_binarized_{metric}")
    loss = series("loss")
    frozen = {
        "weights, all stages (mean)": series("stompp/weight_frozen_fraction"),
        "inputs, all stages (mean)": series("stompp/input_frozen_fraction"),
        "weights, current stage": stage_points or series(StageProgressCallback.KEY),
    }
    frozen = {k: v for k, v in frozen.items() if v}
    rows = 3 if frozen else 2
    fig, axes = plt.subplots(rows, 1, figsize=(7, 3 * rows), sharex=True)
    ax_metric, ax_loss = axes[0], axes[1]
    if trained:
        ax_metric.plot(*zip(*trained), marker="o", label="as trained (masked)")
    if binary:
        ax_metric.plot(*zip(*binary), marker="s", linestyle="--", label="binarized(model)")
    ax_metric.set_ylabel(metric)
    if trained or binary:
        ax_metric.legend(loc="lower right")
    ax_metric.grid(alpha=0.3)
    if loss:
        ax_loss.plot(*zip(*loss), label="training loss")
    ax_loss.set_ylabel("training loss")
    ax_loss.grid(alpha=0.3)
    if frozen:
        ax_frozen = axes[2]
        for label, points in frozen.items():
            ax_frozen.plot(*zip(*points), label=label, alpha=0.8)
        ax_frozen.set_ylabel("frozen fraction")
        ax_frozen.set_ylim(-0.03, 1.05)
        ax_frozen.legend(loc="lower right", fontsize="small")
        ax_frozen.grid(alpha=0.3)
    axes[-1].set_xlabel("optimizer step")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def run_config(
    script: str, config_path: str, seed: int, force: bool = False, env: dict[str, str] | None = None
) -> dict[str, Any]:
    """Run `script` (a recipe taking one JSON file) on `config_path` with `seed`, in its own process.

    `output_dir` gets the suffix `-seed<N>`; a run whose `all_results.json` exists is reused unless `force`.
    `env` adds environment variables for the run. Returns the run's `all_results.json`.
    """
    with open(config_path) as f:
        config = json.load(f)
    config["seed"] = seed
    config["output_dir"] = f"{config['output_dir']}-seed{seed}"
    results_path = os.path.join(config["output_dir"], "all_results.json")
    if os.path.isfile(results_path) and not force:
        print(f"[reuse] {results_path}", flush=True)
    else:
        with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as tmp:
            json.dump(config, tmp)
        start = time.time()
        print(f"[run] {os.path.basename(config_path)} seed {seed} -> {config['output_dir']}", flush=True)
        try:
            subprocess.run([sys.executable, script, tmp.name], check=True, env={**os.environ, **(env or {})})
        finally:
            os.unlink(tmp.name)
        print(f"[done] {time.time() - start:.0f} s", flush=True)
    with open(results_path) as f:
        return json.load(f)


def mean_half_range(values: list[float], scale: float = 100.0, digits: int = 1) -> str:
    """'mean ± half-range' of `values` times `scale` ('n/a' when empty)."""
    if not values:
        return "n/a"
    mean = scale * statistics.mean(values)
    spread = scale * (max(values) - min(values)) / 2
    return f"{mean:.{digits}f} ± {spread:.{digits}f}"


def result_cells(results: list[dict], metric: str) -> list[str]:
    """Table cells of one experiment's runs: seeds, steps, as trained, binarized, per-seed binarized, train time."""
    trained = [r[f"eval_{metric}"] for r in results if f"eval_{metric}" in r]
    binary = [r[f"eval_binarized_{metric}"] for r in results if f"eval_binarized_{metric}" in r]
    steps = sorted({r.get("train_steps", r.get("global_step", "?")) for r in results}, key=str)
    runtime = statistics.mean(r.get("train_runtime", float("nan")) for r in results)
    per_seed = ", ".join(f"{100 * v:.1f}" for v in binary) if binary else "n/a (full precision)"
    return [
        str(len(results)),
        ", ".join(map(str, steps)),
        mean_half_range(trained),
        mean_half_range(binary),
        per_seed,
        f"{runtime:.0f}",
    ]


def results_header(title: str, command: str) -> list[str]:
    """The opening lines of a results file: its title and the command that wrote it (recipes and benchmarks)."""
    return [f"# {title}", "", "Command:", "", "```bash", command, "```", ""]


def write_markdown(path: str, lines: list[str]) -> str:
    """Write `lines` to `path` (creating its folder); return the text."""
    text = "\n".join(lines) + "\n"
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)
    return text
