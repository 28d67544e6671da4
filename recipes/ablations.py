"""Run the StoMPP ablation tables (the papers' tables in miniature) and write `benchmarks/results/ablations.md`.

    HF_HUB_OFFLINE=1 .venv/bin/python recipes/ablations.py rules_glue surge_eta --jobs 2 --threads 1
    HF_HUB_OFFLINE=1 .venv/bin/python recipes/ablations.py --list

A table is a JSON file in `recipes/experiments/ablations/` (pass its name or a path):

    {
      "title": "...", "description": "...",
      "recipe": "vision",                      # recipes/vision.py or recipes/glue.py
      "metric": "accuracy", "seeds": [0, 1],
      "columns": {"ResNet-18": {"base": "<experiment JSON>", "overrides": {...}, "output_root": "outputs/..."}},
      "rows": {"forward / BNN": {"order": "forward"}, ...}
    }

Each cell (row, column) is the column's base experiment with the column's and then the row's overrides, run once
per seed by the recipe in its own process (`recipes/common.run_config`). A run's output folder is named after
the settings it changes relative to the base (`<output_root>/<key>-seed<N>`), so a run shared by several tables
(e.g. forward-order StoMPP in both the ordering and the rule table) runs once, and a run whose `all_results.json`
exists is reused: an interrupted table resumes where it stopped. After every finished run the Markdown file is
rewritten with every table (cells not run yet show as `...`) and one bar chart per table
(`benchmarks/results/ablations_<table>.png`). Hand-written text from a `## Reading` heading on is kept.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from stompp_hf_recipes.common import mean_half_range, run_config, write_markdown

HERE = os.path.dirname(os.path.abspath(__file__))

TABLES_DIR = os.path.join("recipes", "experiments", "ablations")
RECIPES = {"vision": "vision.py", "glue": "glue.py"}
READING = "## Reading"
#: Order of the tables in the report (the ones the papers' claims rest on first); others follow alphabetically.
REPORT_ORDER = [
    "rules_glue",
    "surge_eta",
    "policy_bwn",
    "schedule_refresh",
    "learning_rate",
]


@dataclass
class Table:
    """One ablation table: rows x columns of experiment configs, each run over `seeds`."""

    name: str
    path: str
    title: str
    recipe: str
    metric: str
    seeds: list[int]
    columns: dict[str, dict[str, Any]]
    rows: dict[str, dict[str, Any]]
    description: str = ""
    results: dict[tuple[str, str], list[dict]] = field(default_factory=dict)

    @property
    def size(self) -> int:
        return len(self.rows) * len(self.columns) * len(self.seeds)

    @property
    def done(self) -> int:
        """Finished runs (after `collect`)."""
        return sum(len(v) for v in self.results.values())

    @classmethod
    def load(cls, name_or_path: str) -> Table:
        path = name_or_path if name_or_path.endswith(".json") else os.path.join(TABLES_DIR, f"{name_or_path}.json")
        if not os.path.isfile(path):
            available = sorted(os.path.splitext(f)[0] for f in os.listdir(TABLES_DIR) if f.endswith(".json"))
            raise SystemExit(f"No ablation table {name_or_path!r} ({path}); available: {', '.join(available)}.")
        with open(path) as f:
            spec = json.load(f)
        if spec.get("recipe") not in RECIPES:
            raise SystemExit(f"{path}: `recipe` must be one of {sorted(RECIPES)}, got {spec.get('recipe')!r}.")
        return cls(
            name=os.path.splitext(os.path.basename(path))[0],
            path=path,
            title=spec["title"],
            recipe=spec["recipe"],
            metric=spec.get("metric", "accuracy"),
            seeds=list(spec.get("seeds", [0, 1])),
            columns=spec["columns"],
            rows=spec["rows"],
            description=spec.get("description", ""),
        )

    def cell_config(self, row: str, column: str) -> dict[str, Any]:
        """The experiment config of one cell (its `output_dir` without the seed suffix)."""
        col = self.columns[column]
        with open(col["base"]) as f:
            base = json.load(f)
        config = {**base, **col.get("overrides", {}), **self.rows[row]}
        reference = {**base, **col.get("overrides", {})}
        config["output_dir"] = os.path.join(col["output_root"], run_key(reference, config))
        return config


def run_key(reference: dict[str, Any], config: dict[str, Any]) -> str:
    """A readable folder name from the settings `config` changes relative to `reference` ('base' when none)."""
    changed = sorted(k for k in config if k not in ("output_dir", "seed") and config[k] != reference.get(k))
    if not changed:
        return "base"
    return "__".join(f"{k}={json.dumps(config[k], sort_keys=True)}".replace('"', "").replace(" ", "") for k in changed)


def run_cell(table: Table, row: str, column: str, seed: int, force: bool, env: dict[str, str] | None) -> dict:
    config = table.cell_config(row, column)
    os.makedirs(os.path.dirname(config["output_dir"]) or ".", exist_ok=True)
    config_path = f"{config['output_dir']}.config.json"  # the cell's experiment file, next to its runs
    # Atomic: the seeds of one cell may be written and read by parallel jobs.
    with open(f"{config_path}.{seed}.tmp", "w") as f:
        json.dump(config, f, indent=2)
    os.replace(f"{config_path}.{seed}.tmp", config_path)
    return run_config(os.path.join(HERE, RECIPES[table.recipe]), config_path, seed, force, env=env)


def render_table(table: Table, folder: str, prefix: str = "ablations") -> list[str]:
    metric = table.metric
    columns = list(table.columns)
    lines = [f"## {table.title}", "", f"Table `{table.name}` ({table.path}); {table.description}".rstrip("; "), ""]
    lines += [
        f"`binarized` {metric} in %, mean ± half-range over seeds {table.seeds} (per-seed values in brackets).",
        "",
        "| row | " + " | ".join(columns) + " |",
        "|---|" + "---:|" * len(columns),
    ]
    for row in table.rows:
        cells = []
        for column in columns:
            results = table.results.get((row, column), [])
            values = [r[f"eval_binarized_{metric}"] for r in results if f"eval_binarized_{metric}" in r]
            if not values:
                cells.append("...")
                continue
            seeds = ", ".join(f"{100 * v:.1f}" for v in values)
            partial = "" if len(values) == len(table.seeds) else f" ({len(values)}/{len(table.seeds)} seeds)"
            cells.append(f"{mean_half_range(values)} [{seeds}]{partial}")
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    lines += ["", "Settings per row (on top of each column's base experiment):", ""]
    lines += [f"- {row}: `{json.dumps(overrides)}`" for row, overrides in table.rows.items()]
    lines += ["", "Columns:", ""]
    for column, spec in table.columns.items():
        overrides = f" with `{json.dumps(spec['overrides'])}`" if spec.get("overrides") else ""
        lines.append(f"- {column}: `{spec['base']}`{overrides}")
    plot = plot_table(table, folder, prefix)
    if plot:
        lines += ["", f"![{table.title}]({os.path.basename(plot)})"]
    return lines + [""]


def plot_table(table: Table, folder: str, prefix: str = "ablations") -> str | None:
    """Grouped bars (rows x columns) with the seed range as error bars; None without matplotlib or results."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    metric = f"eval_binarized_{table.metric}"
    rows, columns = list(table.rows), list(table.columns)
    if not any(table.results.get((r, c)) for r in rows for c in columns):
        return None
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(rows) * len(columns)), 3.6))
    width = 0.8 / len(columns)
    for j, column in enumerate(columns):
        xs, means, low, high = [], [], [], []
        for i, row in enumerate(rows):
            values = [100 * r[metric] for r in table.results.get((row, column), []) if metric in r]
            if values:
                mean = sum(values) / len(values)
                xs.append(i + (j - (len(columns) - 1) / 2) * width)
                means.append(mean)
                low.append(mean - min(values))
                high.append(max(values) - mean)
        ax.bar(xs, means, width, yerr=[low, high], capsize=3, label=column)
    ax.set_xticks(range(len(rows)), rows, rotation=20, ha="right", fontsize="small")
    ax.set_ylabel(f"binarized {table.metric} (%)")
    ax.set_title(table.title, fontsize="medium")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    path = os.path.join(folder, f"{prefix}_{table.name}.png")
    os.makedirs(folder, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def collect(table: Table) -> None:
    """Read every finished run of `table` from disk (nothing is run)."""
    for row in table.rows:
        for column in table.columns:
            base_dir = table.cell_config(row, column)["output_dir"]
            results = []
            for seed in table.seeds:
                path = os.path.join(f"{base_dir}-seed{seed}", "all_results.json")
                if os.path.isfile(path):
                    with open(path) as f:
                        results.append(json.load(f))
            table.results[(row, column)] = results


DEFAULT_TITLE = "Ablations: StoMPP rules, orderings and SURGE in miniature"


def _table_argument(table: Table) -> str:
    """How a command line names `table`: its name when it is in the default folder, else its path."""
    inside = os.path.abspath(os.path.dirname(table.path)) == os.path.abspath(TABLES_DIR)
    return table.name if inside else table.path


def write_report(tables: list[Table], path: str, options: str = "", title: str = DEFAULT_TITLE) -> str:
    """Rewrite `path` with every table (from the runs on disk), keeping the text from `## Reading` on.

    `options` (e.g. ' --jobs 2 --threads 1') is appended to each table's command in the file; bar charts are
    written next to it as `<report name>_<table>.png`.
    """
    prefix = os.path.splitext(os.path.basename(path))[0]
    reading = ""
    if os.path.isfile(path):
        with open(path) as f:
            text = f.read()
        if READING in text:
            reading = text[text.index(READING) :].rstrip("\n")
    for table in tables:
        collect(table)
    lines = [
        f"# {title}",
        "",
        "Commands (each runs what is missing of its table, reuses finished runs and rewrites everything above the",
        "Reading section; `recipes/ablations.py` alone only rewrites this file):",
        "",
        "```bash",
        *(
            f"HF_HUB_OFFLINE=1 .venv/bin/python recipes/ablations.py {_table_argument(t)}{options}"
            f"  # {t.done}/{t.size} runs done"
            for t in tables
        ),
        "```",
        "",
        "'binarized' evaluates `binarized(model)` (every mask forced to 1), i.e. the deployed 1-bit network.",
        "",
    ]
    for table in tables:
        lines += render_table(table, os.path.dirname(os.path.abspath(path)), prefix)
    if reading:
        lines.append(reading)
    return write_markdown(path, lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("tables", nargs="*", help="Table names (files in recipes/experiments/ablations) or paths.")
    parser.add_argument("--list", action="store_true", help="List the tables and how many runs each has left.")
    parser.add_argument("--report", default=os.path.join("benchmarks", "results", "ablations.md"))
    parser.add_argument(
        "--report-tables",
        nargs="*",
        default=None,
        help="Tables written to the report (default: every table in recipes/experiments/ablations).",
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="Override every table's seeds.")
    parser.add_argument("--jobs", type=int, default=1, help="Runs in parallel (use with --threads 1 on a small CPU).")
    parser.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS of every run.")
    parser.add_argument("--force", action="store_true", help="Re-run even when results exist.")
    parser.add_argument("--title", default=DEFAULT_TITLE, help="Title of the report.")
    args = parser.parse_args(argv)

    names = args.report_tables
    if names is None:
        found = sorted(os.path.splitext(f)[0] for f in os.listdir(TABLES_DIR) if f.endswith(".json"))
        names = [n for n in REPORT_ORDER if n in found] + [n for n in found if n not in REPORT_ORDER]
    report_tables = [Table.load(n) for n in names]
    chosen = [Table.load(n) for n in args.tables]
    for table in [*report_tables, *chosen]:
        if args.seeds:
            table.seeds = list(args.seeds)
    options = "".join(
        [
            *([" --seeds", *(f" {seed}" for seed in args.seeds)] if args.seeds else []),
            *([f" --jobs {args.jobs}"] if args.jobs > 1 else []),
            *([f" --threads {args.threads}"] if args.threads else []),
            *([f" --report {args.report}"] if args.report != parser.get_default("report") else []),
            *([f" --report-tables {' '.join(args.report_tables)}"] if args.report_tables is not None else []),
            *([f" --title {json.dumps(args.title)}"] if args.title != DEFAULT_TITLE else []),
        ]
    )
    if args.list or not chosen:
        for table in report_tables:
            collect(table)
            print(f"{table.name:24s} {table.done:3d}/{table.size} runs done  {table.title}")
        if not args.list:
            write_report(report_tables, args.report, options, args.title)
        return

    env = {"OMP_NUM_THREADS": str(args.threads)} if args.threads else None
    # Unique runs, column by column (one model size complete before the next), then table, row and seed.
    runs: dict[tuple[str, int], tuple[Table, str, str, int]] = {}
    for position in range(max(len(t.columns) for t in chosen)):
        for table in chosen:
            if position >= len(table.columns):
                continue
            column = list(table.columns)[position]
            for row in table.rows:
                for seed in table.seeds:
                    key = (table.cell_config(row, column)["output_dir"], seed)
                    runs.setdefault(key, (table, row, column, seed))
    lock = threading.Lock()
    failed: list[str] = []

    def job(item: tuple[Table, str, str, int]) -> None:
        table, row, column, seed = item
        try:
            run_cell(table, row, column, seed, force=args.force, env=env)
        except subprocess.CalledProcessError as error:
            failed.append(f"{table.name}: {row} / {column} / seed {seed} (exit {error.returncode})")
        with lock:
            write_report(report_tables, args.report, options, args.title)

    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        list(pool.map(job, runs.values()))
    print(write_report(report_tables, args.report, options, args.title))
    if failed:
        raise SystemExit("Failed runs (the report shows the others):\n  " + "\n  ".join(failed))


if __name__ == "__main__":
    main()
