"""Run GLUE experiment configs over seeds and write a Markdown results table.

    HF_HUB_OFFLINE=1 .venv/bin/python recipes/glue_experiments.py \\
        recipes/experiments/glue/{fp,ste_w1a1,stompp_w1a1,stompp_ste_w1a1,stompp_bwn}.json \\
        --seeds 0 1 --table benchmarks/results/glue_sst2.md

Each (config, seed) runs `recipes/glue.py` in its own process with `seed` and `output_dir` (suffixed `-seed<N>`)
overridden; a run whose `all_results.json` exists is reused, so an interrupted table resumes where it stopped.
`--compare A:B` adds the difference of two rows (the binarized metric, or the metric of a full-precision row) with
the seed spread of each; a section of the table file starting with `## Reading` is kept when the table is rewritten.

`--collect` runs nothing: it writes the table from the runs that have finished (their `all_results.json`), e.g.
while another invocation or another checkout (the same `output_dir`s) is still running the rest.

`--jobs N` runs N of them at once, each with `OMP_NUM_THREADS` = cores / N; a run whose teacher is the output of
another run of the same invocation (`teacher_model_name_or_path`, e.g. `outputs/glue/fp-seed{seed}`) starts once
that run has finished. Whether that beats one run at a time with every core depends on how well one run uses the
cores: measure before relying on it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import threading
from concurrent.futures import Future, ThreadPoolExecutor

from stompp_hf_recipes.common import (
    resolve_config,
    result_cells,
    results_header,
    results_path,
    run_config,
    write_markdown,
)

HERE = os.path.dirname(os.path.abspath(__file__))


def run_one(config_path: str, seed: int, force: bool = False, env: dict[str, str] | None = None) -> dict:
    return run_config(os.path.join(HERE, "glue.py"), config_path, seed, force, env)


def run_all(
    configs: list[str], seeds: list[int], force: bool = False, jobs: int = 1, on_done=None
) -> dict[tuple[str, int], dict]:
    """Every (config, seed) run, `jobs` at a time (see the module docstring); `on_done(results so far)` after each.
    A failed run raises once the others have ended."""
    tasks = [(config, seed) for config in configs for seed in seeds]
    resolved = {task: resolve_config(*task) for task in tasks}
    producers = {resolved[task]["output_dir"]: task for task in tasks}
    teachers = {task: producers.get(resolved[task].get("teacher_model_name_or_path")) for task in tasks}
    # teachers first: a run waits only on runs before it (in parallel: submitted before it, FIFO)
    ordered = sorted(tasks, key=lambda t: teachers[t] is not None)
    results: dict[tuple[str, int], dict] = {}
    if jobs <= 1:
        for task in ordered:
            results[task] = run_one(*task, force)
            if on_done:
                on_done(results)
        return results
    threads = str(max(1, (os.cpu_count() or 1) // jobs))
    env = {"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
    futures: dict[tuple[str, int], Future] = {}
    lock = threading.Lock()

    def run(task: tuple[str, int]) -> dict:
        teacher = teachers[task]
        if teacher is not None and teacher != task:
            futures[teacher].result()  # submitted earlier (FIFO), so running or done: no deadlock
        result = run_one(*task, force, env)
        with lock:
            results[task] = result
            if on_done:
                on_done(dict(results))
        return result

    with ThreadPoolExecutor(jobs) as pool:
        for task in ordered:
            futures[task] = pool.submit(run, task)
    for future in futures.values():
        future.result()
    return results


def finished_runs(configs: list[str], seeds: list[int]) -> dict[tuple[str, int], dict]:
    """The `all_results.json` of every (config, seed) run that has finished; nothing runs."""
    results = {}
    for config in configs:
        for seed in seeds:
            path = results_path(resolve_config(config, seed))
            if os.path.isfile(path):
                with open(path) as f:
                    results[(config, seed)] = json.load(f)
    return results


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
    parser.add_argument("--jobs", type=int, default=1, help="Runs at once, each with cores / jobs threads.")
    parser.add_argument(
        "--compare", nargs="*", default=[], metavar="A:B", help="Rows to compare (experiment names), e.g. x:y."
    )
    parser.add_argument(
        "--collect", action="store_true", help="Run nothing: write the table from the runs that have finished."
    )
    args = parser.parse_args(argv)
    # the command that runs (or resumes) the whole table, whatever this invocation does
    command = "HF_HUB_OFFLINE=1 .venv/bin/python recipes/glue_experiments.py " + " ".join(
        [*args.configs, "--seeds", *map(str, args.seeds)]
        + (["--jobs", str(args.jobs)] if args.jobs > 1 else [])
        + ["--table", args.table]
        + (["--compare", *args.compare] if args.compare else [])
    )
    if args.jobs < 1:
        parser.error(f"--jobs must be at least 1, got {args.jobs}")

    def table(results: dict[tuple[str, int], dict]) -> str:
        rows = []
        for config in args.configs:
            runs = [results[(config, seed)] for seed in args.seeds if (config, seed) in results]
            if runs:
                rows.append((os.path.splitext(os.path.basename(config))[0], runs))
        return write_table(rows, args.table, command, args.metric, args.compare)

    if args.collect:
        if args.force:
            parser.error("--collect runs nothing, so --force has nothing to re-run")
        print(table(finished_runs(args.configs, args.seeds)))
        return
    # a partial table after every run, so an interrupted invocation leaves what it finished
    print(table(run_all(args.configs, args.seeds, args.force, args.jobs, on_done=table)))


if __name__ == "__main__":
    main()
