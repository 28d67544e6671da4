"""Run GLUE experiment configs over seeds and write a Markdown results table.

    HF_HUB_OFFLINE=1 .venv/bin/python recipes/glue_experiments.py \\
        recipes/experiments/glue/{fp,ste_w1a1,stompp_w1a1,stompp_ste_w1a1,stompp_bwn}.json \\
        --seeds 0 1 --table benchmarks/results/glue_sst2.md

Each (config, seed) runs `recipes/glue.py` in its own process with `seed` and `output_dir` (suffixed `-seed<N>`)
overridden; a run whose `all_results.json` exists is reused, so an interrupted table resumes where it stopped.
"""

from __future__ import annotations

import argparse
import os

from stompp_hf_recipes.common import result_cells, results_header, run_config, write_markdown

HERE = os.path.dirname(os.path.abspath(__file__))


def run_one(config_path: str, seed: int, force: bool = False) -> dict:
    return run_config(os.path.join(HERE, "glue.py"), config_path, seed, force)


def write_table(rows: list[tuple[str, list[dict]]], path: str, command: str, metric: str) -> str:
    lines = [
        *results_header("GLUE results", command),
        f"Metric: `{metric}` in %, mean ± half-range over seeds (each seed a separate run).",
        "'as trained' evaluates the network as it ends training (masked, identical to binarized once the",
        "progression is complete); 'binarized' evaluates `binarized(model)` (every mask forced to 1).",
        "",
        "| experiment | seeds | steps | as trained | binarized | per-seed binarized | train time (s) |",
        "|---|---:|---:|---:|---:|---|---:|",
    ]
    lines += [f"| {name} | {' | '.join(result_cells(results, metric))} |" for name, results in rows]
    return write_markdown(path, lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("configs", nargs="+", help="Experiment JSON files (arguments of recipes/glue.py).")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--table", default="benchmarks/results/glue_sst2.md")
    parser.add_argument("--metric", default="accuracy")
    parser.add_argument("--force", action="store_true", help="Re-run even when results exist.")
    args = parser.parse_args(argv)
    command = "HF_HUB_OFFLINE=1 .venv/bin/python recipes/glue_experiments.py " + " ".join(
        [*args.configs, "--seeds", *map(str, args.seeds), "--table", args.table]
    )
    rows = []
    for config in args.configs:
        name = os.path.splitext(os.path.basename(config))[0]
        rows.append((name, [run_one(config, seed, args.force) for seed in args.seeds]))
        write_table(rows, args.table, command, args.metric)  # partial table after every experiment
    print(write_table(rows, args.table, command, args.metric))


if __name__ == "__main__":
    main()
