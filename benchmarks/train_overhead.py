"""Training-step cost of StoMPP against full-precision fine-tuning and vanilla STE, and the cost of a soft refresh.

Reproduce (from the repository root, on an otherwise idle machine):

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/train_overhead.py --threads 2

Writes `benchmarks/results/train_overhead.md`. For each model (the packaged all-MiniLM-L6-v2 at batch 32 x
sequence 128, and a BERT-base-sized `BertConfig()` with seeded random weights at `--base-batch` x 128) and each
rule (FP, vanilla STE, StoMPP and StoMPP+STE with a stage mid-transition, SURGE on STE):

* step time: one optimizer step (forward, backward, AdamW step, `ProgressionController.advance`), each rule in a
  process of its own (`workers.py`), in `--sets` sets of fresh processes, every rule stepped once a round in a fresh
  order, `--warmup` untimed rounds then `--steps` (MiniLM) or `--base-steps` (BERT-base-sized) timed ones per set;
  the table gives medians over the rounds of every set and the ratios to FP and to STE of steps timed in the same
  round, with a 95% confidence interval that counts each set's own speed, and each step's minor page faults;
* peak memory: each rule runs `--memory-steps` steps in its own fresh process; the peak resident set size
  (`VmHWM`) of that process, and its ratio to FP's;
* the mask advance of each step (the soft refresh of the transitioning stage at r = 100), timed inside the step;
* the soft refresh of one mask of n entries at refresh rate r (n / r entries re-drawn), median time, as n and r
  vary.

The progressive rules are measured at the middle of the middle stage of a 10,000-step progression: earlier
stages are frozen, later ones continuous, and the transitioning stage's masks are soft-refreshed every step.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import torch
from common import iqr, reproduce_command, results_header, vm_status_kib
from workers import Ratio, Setup, SetupSet, pooled, run_sets, values

RULES = {
    "FP": None,
    "STE": {"weights": "ste", "activations": "ste"},
    "StoMPP": {"weights": "stompp", "activations": "stompp"},
    "StoMPP+STE": {"weights": "stompp_ste", "activations": "stompp_ste"},
    "SURGE (STE)": {"weights": "ste", "activations": "ste", "compensation": "surge"},
}
PROGRESSION_STEPS = 10_000


def build(model_name: str, rule: str, batch: int, seq: int, position: str = "middle"):
    """(model, optimizer, controller or None, batch) for one rule, seeded; a StoMPP model at the middle of its
    first, middle or last stage (`position`)."""
    from transformers import AutoModelForSequenceClassification, BertConfig, BertForSequenceClassification

    from stompp_hf import ProgressionController, StoMPPConfig, prepare_model
    from stompp_hf.assets import minilm_path

    torch.manual_seed(0)
    if model_name == "minilm":
        model = AutoModelForSequenceClassification.from_pretrained(minilm_path(), num_labels=2)
    else:
        model = BertForSequenceClassification(BertConfig(num_labels=2))
    controller = None
    if RULES[rule] is not None:
        prepare_model(model, StoMPPConfig(**RULES[rule]))
        controller = ProgressionController(model, PROGRESSION_STEPS)
    model.train()
    g = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    inputs = {
        "input_ids": torch.randint(1000 if vocab > 2000 else 5, vocab, (batch, seq), generator=g),
        "attention_mask": torch.ones(batch, seq, dtype=torch.long),
        "labels": torch.randint(0, 2, (batch,), generator=g),
    }
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    if controller is not None:
        stage = {"first": 0, "middle": controller.num_stages // 2, "last": controller.num_stages - 1}[position]
        start = round(PROGRESSION_STEPS * (stage + 0.5) / controller.num_stages)
        model(**inputs)  # sizes the input masks
        controller.restore(start)
    return model, optimizer, controller, inputs


def one_step(model, optimizer, controller, inputs, autocast: torch.dtype | None = None) -> float:
    """One optimizer step (the forward under CPU autocast to `autocast` when given, as `Trainer` with
    `bf16=True, use_cpu=True`); returns the seconds spent advancing the masks (the soft refresh)."""
    optimizer.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=autocast, enabled=autocast is not None):
        loss = model(**inputs).loss
    loss.backward()
    optimizer.step()
    if controller is None:
        return 0.0
    start = time.perf_counter()
    controller.advance(controller.step + 1)
    return time.perf_counter() - start


def time_rules(model_name: str, batch: int, seq: int, sets: int, warmup: int, steps: int, threads: int) -> dict:
    """rule -> one list of `workers.Step`s per set of processes (every rule in a process of its own, `sets` sets of
    fresh processes built one after another, each running `warmup` untimed and `steps` timed rounds)."""
    setups = {rule: Setup(model_name, rule, batch, seq) for rule in RULES}
    return run_sets(setups, sets, warmup, steps, [threads], label=f"{model_name}, ")[threads]


def time_compiled(
    model_name: str, batch: int, seq: int, rules: list[str], sets: int, warmup: int, steps: int, threads: int
) -> tuple[dict, dict]:
    """Eager against `torch.compile` (inductor) per rule, every setup in a process of its own over `sets` sets of
    fresh processes: (key -> step times, one list per set; rule -> the compiled setup's first step of each set, the
    compilation included). Keys are (rule, "eager" or "compiled")."""
    setups = {
        (rule, mode): Setup(model_name, rule, batch, seq, compiled=mode == "compiled")
        for rule in rules
        for mode in ("eager", "compiled")
    }
    first: dict[str, list[float]] = {rule: [] for rule in rules}

    def compile_(members: SetupSet) -> None:
        for rule in rules:  # the step that compiles forward and backward
            first[rule].append(members.step((rule, "compiled")).seconds)

    samples = run_sets(setups, sets, warmup, steps, [threads], f"compiled {model_name}, ", before_rounds=compile_)
    return {key: values(groups, "seconds") for key, groups in samples[threads].items()}, first


def peak_memory_child(model_name: str, rule: str, batch: int, seq: int, steps: int) -> None:
    setup = build(model_name, rule, batch, seq)
    for _ in range(steps):
        one_step(*setup)
    print(json.dumps({"maxrss_kb": vm_status_kib("VmHWM")}))


#: Fixed glibc mmap threshold for the second memory measurement: every block above it is mmapped and returned to
#: the OS when freed, so the peak RSS follows the peak of live memory instead of the allocator's heap growth.
MMAP_THRESHOLD = 131072


def peak_memory(
    model_name: str, rule: str, batch: int, seq: int, steps: int, threads: int, fixed_mmap: bool = False
) -> float:
    """Peak RSS in MiB of a fresh process running `steps` steps of `rule`."""
    cmd = [sys.executable, os.path.abspath(__file__), "--child", model_name, rule, str(batch), str(seq), str(steps)]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    if fixed_mmap:
        env["MALLOC_MMAP_THRESHOLD_"] = str(MMAP_THRESHOLD)
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout
    return json.loads(out.strip().splitlines()[-1])["maxrss_kb"] / 1024


def refresh_costs(sizes: list[int], rates: list[int], repeats: int) -> dict[tuple[int, int], float]:
    from stompp_hf.core.masks import MaskState, make_generator

    costs = {}
    device = torch.device("cpu")
    for n in sizes:
        for r in rates:
            mask = MaskState((n,))
            mask.materialize(device)
            samples = []
            for i in range(repeats + 2):
                gen = make_generator(device, 0, 0, i, 0)
                start = time.perf_counter()
                mask.soft_refresh(0.5, r, gen, device)
                if i >= 2:
                    samples.append(time.perf_counter() - start)
            costs[(n, r)] = statistics.median(samples)
    return costs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--sets", type=int, default=4, help="sets of worker processes (a process per rule), built one after another"
    )
    parser.add_argument("--warmup", type=int, default=2, help="untimed rounds per set")
    parser.add_argument("--steps", type=int, default=8, help="timed rounds per set (MiniLM)")
    parser.add_argument("--base-batch", type=int, default=8, help="Batch of the BERT-base-sized model.")
    parser.add_argument("--base-steps", type=int, default=4, help="Timed rounds per set of the BERT-base-sized model.")
    parser.add_argument("--memory-steps", type=int, default=3)
    parser.add_argument(
        "--compile-rules",
        nargs="*",
        default=["FP", "StoMPP+STE"],
        choices=list(RULES),
        help="Rules also timed under torch.compile (MiniLM); none to skip (inductor needs a C++ compiler).",
    )
    parser.add_argument("--compile-steps", type=int, default=5, help="timed rounds per set under torch.compile")
    parser.add_argument("--output", default="benchmarks/results/train_overhead.md")
    parser.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        name, rule, batch, seq, steps = args.child
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
        peak_memory_child(name, rule, int(batch), int(seq), int(steps))
        return
    if args.sets < 1 or args.steps < 1 or args.base_steps < 1 or args.warmup < 0 or args.threads < 1:
        parser.error("--sets, --steps, --base-steps and --threads take positive integers, --warmup a non-negative one")
    torch.set_num_threads(args.threads)
    command = reproduce_command("benchmarks/train_overhead.py")
    models = [
        ("minilm", "all-MiniLM-L6-v2", 32, args.steps),
        ("base", "BERT-base-sized", args.base_batch, args.base_steps),
    ]
    lines = [
        *results_header("Training-step overhead of StoMPP", command),
        " ".join(
            [
                f"Machine: {platform.machine()}, {args.threads} threads, no GPU.",
                "Step = forward + backward + AdamW step + mask advance.",
                f"Every rule trains in a process of its own, {args.sets} sets of fresh processes built one after",
                "another (`benchmarks/workers.py`: a process keeps its own speed for its life), the rules",
                "stepped in a fresh order every round; a step is timed in its process.",
                "Steps: median (interquartile range) over the timed rounds of every set.",
                "Ratios: median of the ratios of two steps timed in the same round (interquartile range; 95%",
                "confidence interval of the median from a two-stage bootstrap over the sets and their rounds; sets:",
                "the lowest and highest median of one set).",
                "Faults: the median of the minor page faults of a step.",
                "Peak memory = peak RSS (`VmHWM`) of a fresh process per rule (model, optimizer state and one step's",
                "activations; includes the Python / torch baseline), measured twice: with glibc's default allocator",
                "settings, whose dynamic mmap threshold keeps freed activation blocks in the heap (so the peak RSS",
                f"also depends on the order of allocations), and with `MALLOC_MMAP_THRESHOLD_={MMAP_THRESHOLD}`,",
                "which returns every freed block above 128 KiB to the OS, so the peak RSS follows the peak of live",
                "memory.",
            ]
        ),
        "",
    ]
    verdicts = []
    for key, title, batch, steps in models:
        print(f"timing {title}", flush=True)
        samples = time_rules(key, batch, 128, args.sets, args.warmup, steps, args.threads)
        times = {rule: values(groups, "seconds") for rule, groups in samples.items()}
        ratios = {
            (rule, base): Ratio.of(times[rule], times[base])
            for rule in RULES
            for base in ("FP", "STE")
            if rule != base
        }
        memory = {rule: peak_memory(key, rule, batch, 128, args.memory_steps, args.threads) for rule in RULES}
        live = {rule: peak_memory(key, rule, batch, 128, args.memory_steps, args.threads, True) for rule in RULES}
        lines += [
            f"## {title}, batch {batch} x sequence 128 ({args.sets} sets of {steps} timed rounds, each after "
            f"{args.warmup} warm-up)",
            "",
            "| rule | step (s) | / FP | / STE | faults | mask advance (ms) | advance / step | peak RSS, default (MiB) "
            "| / FP | peak RSS, fixed mmap threshold (MiB) | / FP |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        medians = {}
        for rule, groups in samples.items():
            steps_ = pooled(groups)
            median = statistics.median(step.seconds for step in steps_)
            advance = statistics.median(step.advance for step in steps_)
            faults = statistics.median(step.faults for step in steps_)
            medians[rule] = median, advance
            vs_fp, vs_ste = (ratios[(rule, base)].cell() if rule != base else "1" for base in ("FP", "STE"))
            lines.append(
                f"| {rule} | {median:.3f} ({iqr([step.seconds for step in steps_]):.3f}) | {vs_fp} | {vs_ste} | "
                f"{faults:,.0f} | {1000 * advance:.2f} | {100 * advance / median:.2f}% | {memory[rule]:.0f} | "
                f"{memory[rule] / memory['FP']:.3f} | {live[rule]:.0f} | {live[rule] / live['FP']:.3f} |"
            )
        lines.append("")
        for rule in ("StoMPP", "StoMPP+STE"):
            step, advance = medians[rule]
            vs_fp, vs_ste = ratios[(rule, "FP")], ratios[(rule, "STE")]
            checks = [
                (f"step {vs_fp.median:.3f}x FP (95% CI {vs_fp.lo:.3f}-{vs_fp.hi:.3f})", vs_fp.median <= 1.10),
                (f"{vs_ste.median:.3f}x STE ({vs_ste.lo:.3f}-{vs_ste.hi:.3f})", vs_ste.median <= 1.03),
                (f"peak live memory {live[rule] / live['FP']:.3f}x FP", live[rule] / live["FP"] <= 1.05),
                (f"mask advance {100 * advance / step:.2f}% of a step", advance / step <= 0.01),
            ]
            verdicts.append(
                f"- {title}, {rule}: "
                + "; ".join(f"{text} ({'met' if ok else '**not met**'})" for text, ok in checks)
                + "."
            )
    if args.compile_rules:
        print("timing torch.compile", flush=True)
        ctimes, first = time_compiled(
            "minilm", 32, 128, args.compile_rules, args.sets, args.warmup, args.compile_steps, args.threads
        )
        lines += [
            f"## torch.compile (inductor), all-MiniLM-L6-v2, batch 32 x sequence 128 ({args.sets} sets of "
            f"{args.compile_steps} timed rounds, each after the compiling step and {args.warmup} warm-up; eager and "
            "compiled in processes of their own, interleaved)",
            "",
            "| rule | eager step (s) | compiled step (s) | compiled / eager | compiled / eager FP | first step "
            "(compilation included; each set, s) |",
            "|---|---:|---:|---:|---:|---|",
        ]
        for rule in args.compile_rules:
            eager, compiled = (statistics.median(pooled(ctimes[(rule, m)])) for m in ("eager", "compiled"))
            vs_fp = (
                Ratio.of(ctimes[(rule, "compiled")], ctimes[("FP", "eager")]).cell()
                if ("FP", "eager") in ctimes
                else "-"
            )
            lines.append(
                f"| {rule} | {eager:.3f} | {compiled:.3f} | "
                f"{Ratio.of(ctimes[(rule, 'compiled')], ctimes[(rule, 'eager')]).cell()} | {vs_fp} | "
                + ", ".join(f"{seconds:.0f}" for seconds in first[rule])
                + " |"
            )
        lines += [
            "",
            "The first set compiles with inductor's on-disk cache as earlier runs left it; later sets find this "
            "run's graphs there.",
            "",
        ]
    print("refresh costs", flush=True)
    sizes, rates = [10**5, 10**6, 10**7], [10, 100, 1000, 10000]
    costs = refresh_costs(sizes, rates, repeats=7)
    lines += [
        "## Soft refresh of one mask (n entries, n / r re-drawn), median of 7 (ms)",
        "",
        "| n \\ r | " + " | ".join(str(r) for r in rates) + " |",
        "|---|" + "---:|" * len(rates),
    ]
    for n in sizes:
        lines.append(f"| {n:.0e} | " + " | ".join(f"{1000 * costs[(n, r)]:.3f}" for r in rates) + " |")
    lines += [
        "",
        "## Targets (issue 8: step <= 1.10x FP and <= 1.03x STE, peak memory <= 1.05x FP, refresh <= 1% of a step)",
        "",
        *verdicts,
        "",
    ]
    os.makedirs(os.path.dirname(args.output), exist_ok=True)
    with open(args.output, "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
