"""Run GLUE experiment configs over seeds and write a Markdown results table.

    HF_HUB_OFFLINE=1 .venv/bin/python recipes/glue_experiments.py \\
        recipes/experiments/glue/{fp,ste_w1a1,stompp_w1a1,stompp_ste_w1a1,stompp_bwn}.json \\
        --seeds 0 1 --table benchmarks/results/glue_sst2.md

Each (config, seed) runs `recipes/glue.py` in its own process with `seed` and `output_dir` (suffixed `-seed<N>`)
overridden; a run whose `all_results.json` exists is reused, so an interrupted table resumes where it stopped.
`--compare A:B` adds the difference of two rows (the binarized metric, or the metric of a full-precision row) with
the seed spread of each; a section of the table file starting with `## Reading` is kept when the table is rewritten.
"""

from __future__ import annotations

import argparse
import os
import statistics

from stompp_hf_recipes.common import result_cells, results_header, run_config, write_markdown

HERE = os.path.dirname(os.path.abspath(__file__))


def run_one(config_path: str, seed: int, force: bool = False) -> dict:
    return run_config(os.path.join(HERE, "glue.py"), config_path, seed, force)


READING = "\n## Reading"


def final_metric(results: list[dict], metric: str) -> list[float]:
    """Per-seed final value: the binarized network's metric, or the metric of a full-precision run."""
    return [r.get(f"eval_binarized_{metric}", r[f"eval_{metric}"]) for r in results]


def comparison_lines(rows: dict[str, list[dict]], pairs: list[str], metric: str) -> list[str]:
    """One table row per `A:B`: mean of A minus mean of B, each row's half-range, and whether the difference
    exceeds the sum of the two half-ranges (the seeds' spread; not judged with fewer than 2 seeds in a row)."""
    lines = [
        "",
        "| comparison | difference (points) | half-range A | half-range B | beyond the spread |",
        "|---|---:|---:|---:|---|",
    ]
    for pair in pairs:
        a, b = pair.split(":")
        if a not in rows or b not in rows:
            continue
        va, vb = (final_metric(rows[name], metric) for name in (a, b))
        diff = 100 * (statistics.mean(va) - statistics.mean(vb))
        ha, hb = (100 * (max(v) - min(v)) / 2 for v in (va, vb))
        if min(len(va), len(vb)) < 2:
            beyond = "n/a (fewer than 2 seeds)"
        else:
            beyond = "yes" if abs(diff) > ha + hb else "no"
        lines.append(f"| {a} - {b} | {diff:+.1f} | {ha:.1f} | {hb:.1f} | {beyond} |")
    return lines if len(lines) > 3 else []


def write_table(
    rows: list[tuple[str, list[dict]]], path: str, command: str, metric: str, compare: list[str] | None = None
) -> str:
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
    lines += comparison_lines(dict(rows), compare or [], metric)
    if os.path.isfile(path):  # keep the hand-written reading below the generated table
        with open(path) as f:
            text = f.read()
        if READING in text:
            lines += ["", text[text.index(READING) + 1 :].rstrip("\n")]
    return write_markdown(path, lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("configs", nargs="+", help="Experiment JSON files (arguments of recipes/glue.py).")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--table", default="benchmarks/results/glue_sst2.md")
    parser.add_argument("--metric", default="accuracy")
    parser.add_argument("--force", action="store_true", help="Re-run even when results exist.")
    parser.add_argument(
        "--compare", nargs="*", default=[], metavar="A:B", help="Rows to compare (experiment names), e.g. x:y."
    )
    args = parser.parse_args(argv)
    command = "HF_HUB_OFFLINE=1 .venv/bin/python recipes/glue_experiments.py " + " ".join(
        [*args.configs, "--seeds", *map(str, args.seeds), "--table", args.table]
        + (["--compare", *args.compare] if args.compare else [])
    )
    rows = []
    for config in args.configs:
        name = os.path.splitext(os.path.basename(config))[0]
        rows.append((name, [run_one(config, seed, args.force) for seed in args.seeds]))
        write_table(rows, args.table, command, args.metric, args.compare)  # partial table after every experiment
    print(write_table(rows, args.table, command, args.metric, args.compare))


if __name__ == "__main__":
    main()
