"""`make demo`: the two-phase GLUE recipe at demo size, offline, ending with FP and binarized accuracy side by side.

    HF_HUB_OFFLINE=1 .venv/bin/python recipes/demo.py

Phase 1 fine-tunes the packaged all-MiniLM-L6-v2 in full precision on the packaged Rotten Tomatoes snippets (the
SST-2 stand-in) with `recipes/experiments/glue/demo_fp.json`. Phase 2 (`demo.json`) initialises a W1A1 student from
that model and distils from it (`--teacher_model_name_or_path`), then exports it packed 1-bit. The student's rule is
the best W1A1 row of `benchmarks/results/glue_sst2.md`, vanilla STE with KD (`ste_w1a1_kd.json`), at demo size. A
phase whose `all_results.json` exists is reused (`--force` re-runs both). Outputs: `outputs/demo-fp`,
`outputs/demo` (checkpoint, `curves.png`, model card).
"""

from __future__ import annotations

import argparse
import json
import os
import time

from stompp_hf_recipes import glue

HERE = os.path.dirname(os.path.abspath(__file__))
PRESETS = os.path.join(HERE, "experiments", "glue")


def run_phase(preset: str, force: bool) -> tuple[dict, float | None]:
    """Run `recipes/glue.py` on one preset in this process; `(all_results, seconds)`, seconds None when reused."""
    path = os.path.join(PRESETS, preset)
    with open(path) as f:
        output_dir = json.load(f)["output_dir"]
    results_path = os.path.join(output_dir, "all_results.json")
    if os.path.isfile(results_path) and not force:
        print(f"[reuse] {results_path}", flush=True)
        with open(results_path) as f:
            return json.load(f), None
    start = time.time()
    results = glue.main([path])
    return results, time.time() - start


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--force", action="store_true", help="Re-run both phases even when their results exist.")
    args = parser.parse_args(argv)
    fp, fp_seconds = run_phase("demo_fp.json", args.force)
    student, student_seconds = run_phase("demo.json", args.force)
    accuracy = {"full precision": fp["eval_accuracy"], "binarized W1A1": student["eval_binarized_accuracy"]}
    seconds = {"full precision": fp_seconds, "binarized W1A1": student_seconds}
    print("\nSST-2 stand-in (1,000 Rotten Tomatoes validation snippets), all-MiniLM-L6-v2:")
    print(f"  {'model':<16} {'accuracy':>9} {'train + eval':>13}")
    for name, value in accuracy.items():
        took = f"{seconds[name]:.0f} s" if seconds[name] is not None else "reused"
        print(f"  {name:<16} {value:>9.1%} {took:>13}")
    print(f"  gap: {100 * (accuracy['full precision'] - accuracy['binarized W1A1']):.1f} points")
    return accuracy


if __name__ == "__main__":
    main()
