"""Pieces shared by the recipes (`glue.py`, `vision.py`) and their experiment runners.

* `BinarizedEvalTrainer`: a `Trainer` whose evaluation also reports the fully binarized network
  (`eval_binarized_*`, the paper's "quantized network" curve) for StoMPP models.
* `StageProgressCallback`: records the frozen fraction of the stage that is transitioning at every step, the sawtooth
  of `curves.png` (`StoMPPCallback` logs it as `stompp/stage_frozen_fraction` at logging steps).
* `plot_curves`: `curves.png` from a `Trainer` log history.
* `StoMPPArguments` / `recipe_stompp_arguments` / `stompp_callbacks`: the StoMPP command-line options of the recipes
  (generated from `StoMPPConfig` by `stompp_hf.integrations.transformers.arguments.stompp_arguments`, each recipe
  with its own defaults) and the callbacks that drive and record the progression.
* `run_config` / `result_cells` / `results_header` / `write_markdown`: one (experiment config, seed) run of a recipe in
  its own process, reused when its `all_results.json` exists, and the runners' table cells and file.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import field
from typing import Any

import torch
from transformers import HfArgumentParser, TrainerCallback, TrainingArguments

from stompp_hf import StoMPPCallback, StoMPPConfig, binarized
from stompp_hf.conversion import stompp_modules
from stompp_hf.distillation import DistillationTrainer
from stompp_hf.export import binarization_progress
from stompp_hf.integrations.transformers.arguments import stompp_arguments
from stompp_hf.integrations.transformers.hub import is_stompp_model
from stompp_hf.kernels.cpu import cpu_model, has_native_bf16
from stompp_hf.progression import (
    count_stages,
    recalibrate_batchnorm,
    stage_length,
    suggested_refresh_rate,
)

logger = logging.getLogger("recipes.common")


#: The StoMPP defaults of the recipes, where they differ from (or deliberately restate) `StoMPPConfig`'s: they suit
#: fine-tuning pretrained transformers; `recipes/vision.py` overrides them with the paper's CNN defaults.
#: `activation_clip=1000`: the continuous input path never clips, so a pretrained model keeps its function until its
#: stage binarizes it (the paper's clip at 1 beta leaves a fine-tuned MiniLM at chance:
#: `benchmarks/results/continuous_proxy.md`, docs/design.md "The continuous proxy of a pretrained transformer").
RECIPE_DEFAULTS: dict[str, Any] = {
    "weights": "stompp_ste",
    "activations": "stompp_ste",
    "granularity": "block",
    "activation_clip": 1000.0,
}


def recipe_fields() -> list[tuple[str, Any, Any]]:
    """The recipe options that are not `StoMPPConfig` fields, as `stompp_arguments(extra_fields=...)` entries (fresh
    `Field` objects on every call: a dataclass takes ownership of the ones it is built from)."""
    return [
        ("binarize", bool, field(default=True, metadata={"help": "False trains the full-precision baseline."})),
        (
            "progression_fraction",
            float,
            field(
                default=0.7,
                metadata={"help": "Share of training steps spent progressing; the rest trains fully binary."},
            ),
        ),
        (
            "refresh_from_stage",
            bool,
            field(
                default=True,
                metadata={
                    "help": "Size the soft-refresh rate from the stage length, r = stage steps / 8 (at least 1), so "
                    "every mask entry is redrawn about 8 times per stage and follows p(tau); False uses "
                    "`refresh_rate` as given (the default whenever `refresh_rate` is given explicitly)."
                },
            ),
        ),
        (
            "bf16_on_any_cpu",
            bool,
            field(
                default=False,
                metadata={
                    "help": "Keep `bf16` when training on a CPU without bf16 instructions (avx512_bf16, amx_bf16, Arm "
                    "bf16). By default the recipes train in float32 there: PyTorch emulates bf16 on such a CPU, 24x "
                    "slower per MiniLM step than float32 on an AVX2-only AMD EPYC."
                },
            ),
        ),
        (
            "eval_binarized",
            bool,
            field(
                default=True,
                metadata={"help": "Also evaluate `binarized(model)` at every evaluation (the paper's curve)."},
            ),
        ),
    ]


def parse_recipe_args(parser: HfArgumentParser, argv: list[str]) -> tuple:
    """`parser`'s dataclasses from `argv`: one JSON file, or command-line flags. A `refresh_rate` given explicitly
    (flag or JSON key) turns `refresh_from_stage` off unless that is given too: an explicit rate wins."""
    if len(argv) == 1 and argv[0].endswith(".json"):
        parsed = parser.parse_json_file(os.path.abspath(argv[0]))
        with open(argv[0]) as f:
            given = set(json.load(f))
    else:
        parsed = parser.parse_args_into_dataclasses(argv)
        given = {a[2:].split("=", 1)[0] for a in argv if a.startswith("--")}
    if "refresh_rate" in given and "refresh_from_stage" not in given:
        for args in parsed:
            if hasattr(args, "refresh_from_stage"):
                args.refresh_from_stage = False
    keep_bf16 = any(getattr(args, "bf16_on_any_cpu", False) for args in parsed)
    return tuple(
        args if keep_bf16 or not isinstance(args, TrainingArguments) else float32_without_cpu_bf16(args)
        for args in parsed
    )


def float32_without_cpu_bf16(args: TrainingArguments) -> TrainingArguments:
    """`args` with `bf16` / `bf16_full_eval` off where they would run on a CPU without bf16 instructions (where
    PyTorch emulates bf16, docs/design.md "bf16 on CPUs without bf16 instructions"); else `args` itself."""
    if not (args.bf16 or args.bf16_full_eval) or has_native_bf16() is not False:
        return args
    accelerator = getattr(torch, "accelerator", None)  # torch >= 2.6
    if not args.use_cpu and (accelerator.is_available() if accelerator else torch.cuda.is_available()):
        return args  # trains on an accelerator
    logger.warning(
        f"This CPU ({cpu_model()}) has no bf16 instructions: training in float32 instead of bf16 "
        "(`--bf16_on_any_cpu` keeps bf16)."
    )
    return dataclasses.replace(args, bf16=False, bf16_full_eval=False)


def planned_steps(args: TrainingArguments, train_samples: int) -> int:
    """The optimizer steps `Trainer` will run (as `Trainer` computes them on one process)."""
    if args.max_steps > 0:
        return args.max_steps
    batches = math.ceil(train_samples / (args.per_device_train_batch_size * max(1, args.world_size)))
    return max(1, math.ceil(args.num_train_epochs * max(1, batches // args.gradient_accumulation_steps)))


def size_refresh_rate(
    config: StoMPPConfig, model: torch.nn.Module, args: TrainingArguments, train_samples: int, fraction: float
) -> int:
    """Set `config.refresh_rate` (the config the model trains with) from the stage length of the planned run:
    r = stage steps / 8, at least 1 (`suggested_refresh_rate`, for the largest tensor), so a transitioning mask is
    redrawn about 8 times per entry within its stage and follows p(tau) (docs/design.md, "Soft refresh").
    Returns r."""
    progression_steps = max(1, int(planned_steps(args, train_samples) * fraction))
    stage_steps = int(stage_length(progression_steps, count_stages(model), config.order))
    sizes = [b.mask.numel for m in stompp_modules(model).values() for b in m.binarizers() if b.mask is not None]
    config.refresh_rate = suggested_refresh_rate(max(1, stage_steps), max(sizes, default=1))
    logger.info(
        f"StoMPP: refresh rate r = {config.refresh_rate} (sized from {stage_steps} steps per stage; "
        "`--refresh_rate` to set it)"
    )
    return config.refresh_rate


def _config(self, seed: int) -> StoMPPConfig | None:
    """The `StoMPPConfig` to train with (seeded with `seed`), or None for the full-precision baseline."""
    if not self.binarize:
        return None
    return self.to_config(seed=seed)


def recipe_stompp_arguments(
    name: str,
    defaults: dict[str, Any] | None = None,
    doc: str | None = None,
    module: str = __name__,
    extra_fields: list[tuple[str, Any, Any]] | None = None,
) -> type:
    """The StoMPP options of a recipe (a dataclass for `HfArgumentParser`): one per `StoMPPConfig` training option,
    generated by `stompp_arguments` with `RECIPE_DEFAULTS` and then `defaults`, plus `recipe_fields()`,
    `extra_fields` and a `config(seed)` method. `module` names the module defining it."""
    cls = stompp_arguments(
        name,
        defaults={**RECIPE_DEFAULTS, **(defaults or {})},
        extra_fields=recipe_fields() + list(extra_fields or []),
        doc=doc,
    )
    cls.config = _config
    cls.__module__ = module
    return cls


StoMPPArguments = recipe_stompp_arguments(
    "StoMPPArguments",
    doc="StoMPP options of a recipe. Defaults suit fine-tuning pretrained transformers (StoMPP + STE on frozen "
    "entries for weights and inputs, block stages); `recipes/vision.py` builds its own with the paper's CNN defaults.",
)


class BinarizedEvalTrainer(DistillationTrainer):
    """`Trainer` whose evaluation also reports the fully binarized network (`eval_binarized_*`) for StoMPP models,
    and which distils from `teacher=` when given (`stompp_hf.distillation.DistillationTrainer`; without a teacher it
    trains like `Trainer`).

    Once every mask is frozen the binarized network *is* the network as trained, so its metrics are copied instead
    of evaluating a second time.
    """

    def __init__(self, *args, eval_binarized: bool = True, bn_recalibration_batches: int = 0, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.eval_binarized = eval_binarized
        self.bn_recalibration_batches = bn_recalibration_batches

    def _recalibration_batches(self):
        """The first `bn_recalibration_batches` training batches of a fixed shuffle (the same batches at every
        evaluation, and no draw from the global RNG, so evaluating does not change the training run)."""
        loader = torch.utils.data.DataLoader(
            self.train_dataset,
            batch_size=self.args.per_device_train_batch_size,
            shuffle=True,
            generator=torch.Generator().manual_seed(self.args.seed),
            collate_fn=self.data_collator,
        )
        for index, batch in enumerate(loader):
            if index >= self.bn_recalibration_batches:
                return
            yield batch

    def _recalibrate(self, model) -> None:
        if self.bn_recalibration_batches > 0 and self.train_dataset is not None:
            recalibrate_batchnorm(model, self._recalibration_batches())

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval"):
        """Evaluate the network as trained and, for StoMPP models, the fully binarized one; with
        `bn_recalibration_batches`, BatchNorm statistics are first recomputed for each (a CNN trained at a constant
        learning rate has running statistics that lag its weights by many points). The model keeps the statistics
        of the network as trained."""
        model = self.accelerator.unwrap_model(self.model)
        self._recalibrate(model)
        metrics = super().evaluate(eval_dataset, ignore_keys, metric_key_prefix)
        if self.eval_binarized and is_stompp_model(model) and "binarized" not in metric_key_prefix:
            prefix = f"{metric_key_prefix}_binarized"
            if binarization_progress(model).complete:
                # Every mask is already 1: the binarized network is the network as trained; reuse its metrics.
                head = f"{metric_key_prefix}_"
                binary = {f"{prefix}_{k[len(head) :]}": v for k, v in metrics.items() if k.startswith(head)}
                self.log(binary)
                metrics.update(binary)
            else:
                saved = {k: v.clone() for k, v in model.state_dict().items() if _is_bn_statistic(model, k)}
                with binarized(model):
                    self._recalibrate(model)
                    metrics.update(super().evaluate(eval_dataset, ignore_keys, prefix))
                if saved:
                    model.load_state_dict(saved, strict=False)
        return metrics


def _is_bn_statistic(model, key: str) -> bool:
    """Whether state-dict `key` is a BatchNorm running statistic (what recalibration changes)."""
    module_name, _, buffer = key.rpartition(".")
    if buffer not in ("running_mean", "running_var", "num_batches_tracked"):
        return False
    return isinstance(model.get_submodule(module_name), torch.nn.modules.batchnorm._BatchNorm)


class StageProgressCallback(TrainerCallback):
    """Record `stompp/stage_frozen_fraction` (the frozen fraction of the stage now transitioning, which
    `StoMPPCallback` logs to every tracker) after every optimizer step, for the curves.

    It restarts at 0 at every stage (1.0 once the progression is complete), which shows the stage-by-stage
    progression as a sawtooth. Add it after the `StoMPPCallback` it reads from.
    """

    KEY = "stompp/stage_frozen_fraction"

    def __init__(self, stompp_callback) -> None:
        self.stompp_callback = stompp_callback
        #: (step, value) after every optimizer step: logging steps alone alias a sawtooth whose stages last only a
        #: few steps, so `plot_curves(..., stage_points=callback.points)` draws from these.
        self.points: list[tuple[int, float]] = []

    def value(self) -> float | None:
        from stompp_hf.integrations.transformers.callback import stage_frozen_fraction

        controller = self.stompp_callback.controller
        return None if controller is None else stage_frozen_fraction(controller)

    def on_step_end(self, args, state, control, **kwargs) -> None:
        value = self.value()
        if value is not None:
            self.points.append((state.global_step, value))


def rank_checkpoints_by_binarized(args: TrainingArguments, metric: str, config: StoMPPConfig | None) -> None:
    """With `load_best_model_at_end`, rank checkpoints by the binarized network's `metric`
    (`eval_binarized_<metric>`, higher is better), the network that gets exported, unless a binarized metric was
    named already. Ranking by the loss of the network in progression would pick a partly continuous checkpoint."""
    if config is None or not args.load_best_model_at_end or "binarized" in (args.metric_for_best_model or ""):
        return
    args.metric_for_best_model = f"binarized_{metric}"
    args.greater_is_better = True


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
        "current stage (its weights, or its activation)": stage_points or series(StageProgressCallback.KEY),
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


def resolve_config(config_path: str, seed: int) -> dict[str, Any]:
    """The arguments `run_config` runs `config_path` with for `seed`: `{seed}` in any string value becomes N, `seed`
    is set and `output_dir` gets the suffix `-seed<N>`."""
    with open(config_path) as f:
        config = json.load(f)
    # `{seed}` in a value names a per-seed input, e.g. the teacher `outputs/glue/fp-seed{seed}` of a two-phase run
    config = {k: v.replace("{seed}", str(seed)) if isinstance(v, str) else v for k, v in config.items()}
    config["seed"] = seed
    config["output_dir"] = f"{config['output_dir']}-seed{seed}"
    return config


def results_path(config: dict[str, Any]) -> str:
    """The `all_results.json` a run of the resolved `config` (`resolve_config`) writes."""
    return os.path.join(config["output_dir"], "all_results.json")


def run_config(
    script: str, config_path: str, seed: int, force: bool = False, env: dict[str, str] | None = None
) -> dict[str, Any]:
    """Run `script` (a recipe taking one JSON file) on `config_path` with `seed`, in its own process.

    `output_dir` gets the suffix `-seed<N>`, and `{seed}` in any string value becomes N; a run whose
    `all_results.json` exists is reused unless `force`.
    `env` adds environment variables for the run. Returns the run's `all_results.json`.
    """
    config = resolve_config(config_path, seed)
    path = results_path(config)
    if os.path.isfile(path) and not force:
        print(f"[reuse] {path}", flush=True)
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
    with open(path) as f:
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
    """The opening lines of a results file: its title and the command that wrote it."""
    return [f"# {title}", "", "Command:", "", "```bash", command, "```", ""]


def write_markdown(path: str, lines: list[str]) -> str:
    """Write `lines` to `path` (creating its folder); return the text."""
    text = "\n".join(lines) + "\n"
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)
    return text
