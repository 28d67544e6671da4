"""What the teacher costs in distillation: training-step time of a StoMPP student with and without KD.

Reproduce (from the repository root, on an otherwise idle machine; about 2 minutes on 2 cores):

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/distillation_cost.py --threads 2

Writes `benchmarks/results/distillation_cost.md`. The student is the packaged all-MiniLM-L6-v2 truncated to its
first `--layers` layers (`num_hidden_layers`, default 3) with a seeded random 2-label classifier, converted by
`from_pretrained(..., quantization_config=StoMPPConfig())` and put in the middle of the middle stage of a
10,000-step progression; the teacher is the same truncated checkpoint in full precision. One step is
`DistillationTrainer.training_step` (student forward, teacher forward, backward) + AdamW step +
`ProgressionController.advance`, at batch `--batch` x sequence `--seq`. Variants: no KD (the trainer without a
teacher, i.e. `Trainer`), logit KD, logit + hidden-state + attention KD, each with the teacher in float32 and in
bfloat16 (`teacher_dtype`). Attention KD needs eager attention (the only implementation that returns the
probabilities), so the trainer switches student and teacher to it; "no KD, eager attention" separates that cost
from the teacher's. Medians of `--steps` interleaved rounds (each round runs every variant once, in a fresh
order) after one warm-up step each; the teacher's forward pass alone is timed the same way.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile

import torch
from common import MONITOR, interleaved, iqr, results_header

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "distillation_cost.md")
PROGRESSION_STEPS = 10_000
LOGIT = {"temperature": 2.0, "task_weight": 1.0, "logit_weight": 1.0}
ALL = {**LOGIT, "hidden_weight": 1.0, "attention_weight": 1.0}
#: variant -> (DistillationConfig kwargs or None for no teacher, eager attention for the student)
VARIANTS: dict[str, tuple[dict | None, bool]] = {
    "no KD": (None, False),
    "no KD, eager attention": (None, True),
    "logit KD, teacher fp32": (LOGIT, False),
    "logit KD, teacher bf16": ({**LOGIT, "teacher_dtype": "bfloat16"}, False),
    "logit + hidden + attention KD, teacher fp32": (ALL, True),
    "logit + hidden + attention KD, teacher bf16": ({**ALL, "teacher_dtype": "bfloat16"}, True),
}


def load(layers: int, quantized: bool):
    from transformers import AutoModelForSequenceClassification

    from stompp_hf import StoMPPConfig
    from stompp_hf.assets import minilm_path

    torch.manual_seed(0)  # the same classifier for student and teacher
    extra = {"quantization_config": StoMPPConfig()} if quantized else {}
    return AutoModelForSequenceClassification.from_pretrained(
        minilm_path(), num_labels=2, num_hidden_layers=layers, **extra
    )


def make_inputs(vocab: int, batch: int, seq: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[batch // 2 :, seq * 3 // 4 :] = 0  # half the rows padded by a quarter
    return {
        "input_ids": torch.randint(1000, vocab, (batch, seq), generator=g),
        "attention_mask": mask,
        "labels": torch.randint(0, 2, (batch,), generator=g),
    }


def build(variant: str, layers: int, inputs: dict[str, torch.Tensor], out: str):
    """A step function for one variant, and its trainer."""
    from transformers import TrainingArguments

    from stompp_hf import ProgressionController
    from stompp_hf.distillation import DistillationConfig, DistillationTrainer

    kwargs, eager = VARIANTS[variant]
    student = load(layers, quantized=True)
    if eager:
        student.set_attn_implementation("eager")
    teacher = load(layers, quantized=False) if kwargs else None
    args = TrainingArguments(out, report_to=[], use_cpu=True, disable_tqdm=True, save_strategy="no")
    trainer = DistillationTrainer(
        model=student,
        args=args,
        teacher=teacher,
        distillation=DistillationConfig(**kwargs) if kwargs else None,
    )
    trainer.current_gradient_accumulation_steps = 1  # set by `train()`; the steps here are called directly
    controller = ProgressionController(student, PROGRESSION_STEPS)
    student.train()
    with torch.no_grad():
        student(**inputs)  # sizes the input masks
    stage = controller.num_stages // 2
    controller.restore(round(PROGRESSION_STEPS * (stage + 0.5) / controller.num_stages))
    optimizer = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=1e-5)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        trainer.training_step(trainer.model, dict(inputs))
        optimizer.step()
        controller.advance(controller.step + 1)

    return step, trainer


def teacher_forward(trainer, inputs: dict[str, torch.Tensor]):
    flags = trainer.distillation.output_flags()
    teacher_inputs = {k: v for k, v in inputs.items() if k != "labels"}

    def forward() -> None:
        with torch.no_grad():
            trainer.teacher(**teacher_inputs, **flags)

    return forward


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--layers", type=int, default=3)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--idle-budget", type=float, default=20.0, help="Seconds in all to wait for a quiet machine.")
    parser.add_argument("--output", default=RESULTS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    MONITOR.budget = args.idle_budget
    command = "HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/distillation_cost.py " + " ".join(sys.argv[1:])

    with tempfile.TemporaryDirectory() as out:
        inputs = make_inputs(load(args.layers, quantized=False).config.vocab_size, args.batch, args.seq)
        built = {v: build(v, args.layers, inputs, out) for v in VARIANTS}
        print(f"timing {len(VARIANTS)} variants x {args.steps} steps", flush=True)
        MONITOR.reset()
        steps = interleaved({v: step for v, (step, _) in built.items()}, args.steps)
        step_other = MONITOR.cores
        forwards = {v: teacher_forward(trainer, inputs) for v, (_, trainer) in built.items() if trainer.teacher}
        MONITOR.reset()
        teacher_times = interleaved(forwards, args.steps)
        forward_other = MONITOR.cores

    base = statistics.median(steps["no KD"])
    lines = [
        *results_header("Teacher cost of distillation", command),
        f"Student: all-MiniLM-L6-v2 truncated to {args.layers} layers (hidden 384), StoMPP (default config) in the "
        "middle of the middle stage of a 10,000-step progression; teacher: the same truncated checkpoint in full "
        f"precision. Batch {args.batch} x sequence {args.seq} (half the rows padded by a quarter). Step = "
        "`DistillationTrainer.training_step` (student forward, teacher forward under `no_grad`, backward) + AdamW "
        f"step + mask advance. Medians of {args.steps} interleaved rounds after one warm-up step each. Other "
        f"processes used {step_other:.2f} (steps) and {forward_other:.2f} (teacher forwards) of "
        f'{os.cpu_count()} cores while timing. "added" is the step\'s median minus that of the no-KD step with the '
        'same attention implementation (SDPA for logit KD, eager for the variants with attention KD); "teacher '
        "forward\" times the teacher's forward pass alone (same outputs requested, same inputs).",
        "",
        "| variant | step (s) | IQR (s) | / no KD (SDPA) | added (s) | teacher forward (s) | forward / added |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for variant, samples in steps.items():
        median = statistics.median(samples)
        cells = [f"{median:.3f}", f"{iqr(samples):.3f}", f"{median / base:.3f}"]
        if variant in teacher_times:
            reference = statistics.median(steps["no KD, eager attention" if VARIANTS[variant][1] else "no KD"])
            forward = statistics.median(teacher_times[variant])
            cells += [f"{median - reference:.3f}", f"{forward:.3f}", f"{forward / (median - reference):.2f}"]
        else:
            cells += ["-", "-", "-"]
        lines.append(f"| {variant} | " + " | ".join(cells) + " |")
    lines.append("")
    os.makedirs(os.path.dirname(args.output), exist_ok=True)
    with open(args.output, "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
