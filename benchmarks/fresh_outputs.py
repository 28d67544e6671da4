"""What a fresh output costs a linear layer at batch 32: the XNOR kernel and the dense FP32 peer, each writing into a
new tensor (as a layer does) and into one buffer reused call after call, timed side by side in one process.

Reproduce (from the repository root, on an otherwise idle machine; a few minutes on 2 cores):

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/fresh_outputs.py --threads 2

Writes `benchmarks/results/fresh_outputs.md` (`--output` for another file). Per weight shape of all-MiniLM-L6-v2 and
BERT-base at 4096 rows (batch 32 x sequence 128), float32, under `torch.no_grad()`, medians of interleaved rounds
(`common.interleaved`: each round runs every mode once, in a fresh order, after one warm-up call each):

* `xnor, fresh`: `xnor.xnor_linear` returning a new tensor (what `BinaryLinear` does), on the CPU's fastest path;
* `xnor, reused`: the same call with `out=` one buffer allocated once;
* `FP32, fresh`: `F.linear`; `FP32, reused`: `torch.addmm(bias, x, weight.T, out=buffer)`.

Next to the times: the minor page faults per call (`getrusage`, over all rounds of that mode) and, for the XNOR
modes, the fraction of the popcount limit (`inference.py`'s formula: threads x clock x 512 binary multiply-adds per
cycle). The fresh modes pay for whatever pages the allocator hands back; glibc maps a block above its mmap
threshold (dynamic, at most 32 MiB) fresh for every call and unmaps it on free, so such an output faults in every
page on every call.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys

import torch
import torch.nn.functional as F
from common import interleaved, iqr, results_header
from inference import median, popcount_limit, stated_clock

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "fresh_outputs.md")
SHAPES = ((384, 384), (384, 1536), (1536, 384), (768, 768), (768, 3072), (3072, 768))
MODES = ("xnor, fresh", "xnor, reused", "FP32, fresh", "FP32, reused")


def measure(k: int, n: int, rows: int, repeats: int, threads: int) -> dict:
    from stompp_hf.core.packing import pack_signs
    from stompp_hf.kernels import xnor

    g = torch.Generator().manual_seed(k * 7 + n)
    weight_packed = pack_signs(torch.rand(n, k, generator=g) < 0.5)
    scale, bias = torch.rand(n, generator=g) * 0.1, torch.randn(n, generator=g)
    weight = torch.randn(n, k, generator=g)
    x = torch.randn(rows, k, generator=g)
    out_xnor, out_fp = torch.empty(rows, n), torch.empty(rows, n)
    calls = {
        "xnor, fresh": lambda: xnor.xnor_linear(x, weight_packed, k, scale, bias, threads),
        "xnor, reused": lambda: xnor.xnor_linear(x, weight_packed, k, scale, bias, threads, out=out_xnor),
        "FP32, fresh": lambda: F.linear(x, weight, bias),
        "FP32, reused": lambda: torch.addmm(bias, x, weight.T, out=out_fp),
    }
    with torch.no_grad():
        exact = torch.equal(calls["xnor, fresh"](), calls["xnor, reused"]())
        faults: dict[str, int] = {}
        seconds = interleaved(calls, repeats, faults)
    return {
        "shape": (k, n),
        "rows": rows,
        "t": {m: median(v) for m, v in seconds.items()},
        "iqr": max(iqr(v) for v in seconds.values()),
        "faults": {m: faults[m] / repeats for m in calls},
        "exact": exact,
        "out_mib": rows * n * 4 / 2**20,
    }


def render(rows: list[dict], command: str, args: argparse.Namespace, limit: float, ghz_note: str) -> str:
    from stompp_hf.kernels import xnor

    lines = [
        *results_header("Fresh outputs against reused ones: linear layers at batch 32", command),
        f"- XNOR path: {xnor.paths()[0]} (the fastest this CPU has); {args.repeats} interleaved rounds; "
        f"popcount limit {limit / 1e12:.2f} T binary multiply-adds/s ({args.threads} threads x {ghz_note} x 512).",
        "- Fault counts are minor page faults per call (`getrusage`): a 4 KiB page each where huge pages are off.",
        "",
        "| layer | output (MiB) | "
        + " | ".join(f"{m} (ms)" for m in MODES)
        + " | "
        + " | ".join(f"{m} faults" for m in MODES)
        + " | xnor fresh: popcount limit | xnor reused: popcount limit | fresh / reused, xnor | fresh / reused, FP32 "
        "| same bits |",
        "|---|---:|" + "---:|" * (2 * len(MODES) + 4) + "---|",
    ]
    for r in rows:
        k, n = r["shape"]
        macs = r["rows"] * k * n
        t = r["t"]
        cells = [f"{k} -> {n}, {r['rows']} rows", f"{r['out_mib']:.1f}"]
        cells += [f"{t[m] * 1e3:.2f}" for m in MODES]
        cells += [f"{r['faults'][m]:.0f}" for m in MODES]
        cells += [f"{macs / t['xnor, fresh'] / limit:.1%}", f"{macs / t['xnor, reused'] / limit:.1%}"]
        cells += [f"{t['xnor, fresh'] / t['xnor, reused']:.2f}", f"{t['FP32, fresh'] / t['FP32, reused']:.2f}"]
        cells.append("**yes**" if r["exact"] else "NO")
        lines.append("| " + " | ".join(cells) + " |")
    widest = max(r["iqr"] for r in rows)
    fresh = [r["rows"] * r["shape"][0] * r["shape"][1] / r["t"]["xnor, fresh"] / limit for r in rows]
    reused = [r["rows"] * r["shape"][0] * r["shape"][1] / r["t"]["xnor, reused"] / limit for r in rows]
    lines += [
        "",
        f"Widest interquartile range: {widest * 1e3:.2f} ms.",
        "",
        "## Reading",
        "",
        f"- XNOR into fresh outputs: {min(fresh):.1%} to {max(fresh):.1%} of the popcount limit, >= 25% on "
        f"{sum(f >= 0.25 for f in fresh)} of {len(fresh)} shapes; into a reused buffer: {min(reused):.1%} to "
        f"{max(reused):.1%}, >= 25% on {sum(f >= 0.25 for f in reused)} of {len(reused)}.",
        "- The dense peer pays the same allocator: its fresh / reused column is the cost of the same pages.",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rows", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--clock-ghz", type=float, default=None, help="clock of the popcount limit")
    parser.add_argument("--output", default=RESULTS)
    args = parser.parse_args()
    from stompp_hf.kernels import xnor

    if not xnor.is_available():
        sys.exit("The XNOR kernel is not available on this machine (no C compiler?): nothing to measure.")
    torch.set_num_threads(args.threads)
    ghz, _ = stated_clock(args.clock_ghz)
    limit = popcount_limit(args.threads, ghz)
    rows = []
    for k, n in SHAPES:
        rows.append(measure(k, n, args.rows, args.repeats, args.threads))
        t = rows[-1]["t"]
        print(f"[fresh_outputs] {k}->{n}: " + ", ".join(f"{m} {t[m] * 1e3:.2f} ms" for m in MODES), flush=True)
    command = "HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/fresh_outputs.py " + shlex.join(sys.argv[1:])
    text = render(rows, command, args, limit, f"{ghz:.2f} GHz")
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    with open(args.output, "w", encoding="utf-8") as f:
        f.write(text)
    print(f"[fresh_outputs] wrote {args.output}")


if __name__ == "__main__":
    main()
