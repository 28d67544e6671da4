"""Run vision experiment configs over seeds and write a Markdown results table (the depth study by default).

    HF_HUB_OFFLINE=1 .venv/bin/python recipes/vision_experiments.py \\
        recipes/experiments/vision/resnet{18,50}_{ste,stompp}.json \\
        recipes/experiments/vision/resnet50_stompp_reverse.json --seeds 0 1 --table benchmarks/results/vision_depth.md

Without config arguments it runs those five (the depth study).

Each (config, seed) runs `recipes/vision.py` in its own process with `seed` and `output_dir` (suffixed `-seed<N>`)
overridden; a run whose `all_results.json` exists is reused, so an interrupted table resumes where it stopped. The
table is rewritten after every run. `--threads N` sets OMP_NUM_THREADS for the runs (on a CPU shared with other
jobs, 1 thread avoids the OpenMP contention that can slow small convolutions down many times).
"""

from __future__ import annotations

import argparse
import json
import os

from stompp_hf_recipes.common import result_cells, results_header, run_config, write_markdown

HERE = os.path.dirname(os.path.abspath(__file__))

DEFAULT_CONFIGS = [
    os.path.join("recipes", "experiments", "vision", f"{name}.json")
    for name in ("resnet18_ste", "resnet18_stompp", "resnet50_ste", "resnet50_stompp", "resnet50_stompp_reverse")
]


def _rule(config: dict) -> str:
    if config.get("binarize", True) in (False, "false", "False"):
        return "full precision"
    weights, activations = config.get("weights", "stompp"), config.get("activations", "stompp")
    return f"W: {weights} / A: {activations}"


def _order(config: dict) -> str:
    rules = {str(config.get("weights", "stompp")), str(config.get("activations", "stompp"))}
    if config.get("binarize", True) in (False, "false", "False") or not rules & {"stompp", "stompp_ste"}:
        return "-"
    return str(config.get("order", "forward"))


def write_table(rows: list[tuple[str, dict, list[dict]]], path: str, command: str, metric: str) -> str:
    lines = [
        *results_header("Vision depth study: vanilla STE vs StoMPP, width-reduced ResNet-18 / ResNet-50", command),
        f"Metric: `{metric}` in %, mean ± half-range over seeds (each seed a separate run), on the evaluation set of",
        "each config. 'as trained' evaluates the network as it ends training; 'binarized' evaluates",
        "`binarized(model)` (every mask forced to 1; identical once the progression is complete).",
        "",
        "| experiment | model | rule | order | seeds | steps | as trained | binarized | per-seed binarized | "
        "train time (s) |",
        "|---|---|---|---|---:|---:|---:|---:|---|---:|",
    ]
    for name, config, results in rows:
        seeds, *cells = result_cells(results, metric)
        lines.append(
            f"| {name} | {config.get('model_name', 'resnet18')} | {_rule(config)} | {_order(config)} | {seeds} | "
            f"{' | '.join(cells)} |"
        )
    if rows:
        first = rows[0][1]
        lines += [
            "",
            f"Data: {first.get('offline_dataset') or first.get('dataset_name') or 'offline default'}, "
            f"{first.get('image_size', 32)} px, {first.get('max_train_samples', 'all')} training / "
            f"{first.get('max_eval_samples', 'all')} evaluation images"
            + (f"; model arguments `{json.dumps(first['model_args'])}`" if first.get("model_args") else "")
            + ("; CIFAR stem" if first.get("cifar_stem") else "")
            + "; see each config for the full settings.",
        ]
    return write_markdown(path, lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "configs", nargs="*", default=DEFAULT_CONFIGS, help="Experiment JSON files (arguments of recipes/vision.py)."
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--table", default="benchmarks/results/vision_depth.md")
    parser.add_argument("--metric", default="accuracy")
    parser.add_argument("--force", action="store_true", help="Re-run even when results exist.")
    parser.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS for the runs.")
    args = parser.parse_args(argv)
    command = "HF_HUB_OFFLINE=1 .venv/bin/python recipes/vision_experiments.py " + " ".join(
        [
            *args.configs,
            "--seeds",
            *map(str, args.seeds),
            "--table",
            args.table,
            *(["--threads", str(args.threads)] if args.threads else []),
        ]
    )
    env = {"OMP_NUM_THREADS": str(args.threads)} if args.threads else None
    script = os.path.join(HERE, "vision.py")
    rows = []
    for path in args.configs:
        with open(path) as f:
            config = json.load(f)
        name = os.path.splitext(os.path.basename(path))[0]
        results = []
        rows.append((name, config, results))
        for seed in args.seeds:
            results.append(run_config(script, path, seed, args.force, env=env))
            write_table(rows, args.table, command, args.metric)  # partial table after every run
    print(write_table(rows, args.table, command, args.metric))


if __name__ == "__main__":
    main()
