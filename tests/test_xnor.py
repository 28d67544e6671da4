"""The XNOR-popcount kernel against the dense torch reference: bit-identical outputs on every code path (avx512, avx2,
scalar, each forced), validation, build cache; the exact int8 path and how "auto" picks between them; its C sources
compile without warnings, and the CPU-features helper reads this machine."""

from __future__ import annotations

import ctypes
import itertools
import math
import os
import platform
import shlex
import shutil
import signal
import subprocess
import threading
import time
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from stompp_hf.core.packing import pack_signs, unpack_signs
from stompp_hf.export import set_kernel
from stompp_hf.kernels import build, cpu, int8, xnor
from stompp_hf.nn import BinaryLinear

from .testing_utils import reference

needs_kernel = pytest.mark.skipif(
    not xnor.is_available(), reason="XNOR kernel unavailable here (no working C compiler to build it)"
)

KS = (1, 7, 8, 9, 31, 33, 63, 64, 65, 100, 384, 513, 1536)
NS = (1, 3, 17, 33, 64, 100)
MS = (1, 2, 7, 9, 33, 128)


def available_paths():
    return xnor.paths() if xnor.is_available() else ()


needs_avx2 = pytest.mark.skipif("avx2" not in available_paths(), reason="no avx2 path on this CPU")

# every code path, forced; the ones this CPU cannot run are skipped (and listed as such)
PATH_PARAMS = [
    pytest.param(p, marks=pytest.mark.skipif(p not in available_paths(), reason=f"no {p} path on this CPU"))
    for p in xnor.PATHS
]


def make_input(shape, gen):
    """Normal values with exact zeros, negative zeros, and tiny and huge magnitudes mixed in."""
    x = torch.randn(shape, generator=gen)
    kind = torch.randint(0, 8, shape, generator=gen)
    x = torch.where(kind == 0, torch.zeros_like(x), x)
    x = torch.where(kind == 1, torch.full_like(x, -0.0), x)
    x = torch.where(kind == 2, x * 1e-38, x)
    x = torch.where(kind == 3, x * 1e30, x)
    return x


def make_layer(n, k, gen):
    weight_packed = pack_signs(torch.rand(n, k, generator=gen) < 0.5)
    out_scale = torch.rand(n, generator=gen) * 0.1 + 1e-3
    out_scale[::3] *= -1
    bias = torch.randn(n, generator=gen)
    return weight_packed, out_scale, bias


def packed_linear(k, n, gen, input_scale=None):
    """A `BinaryLinear` holding `make_layer`'s packed weight and bias; with `input_scale`, also seeded weight scales
    in [0.01, 0.2] and that activation scale (else the layer's defaults)."""
    layer = BinaryLinear(k, n)
    weight_packed, _, bias = make_layer(n, k, gen)
    with torch.no_grad():
        layer.weight.copy_(weight_packed)
        layer.bias.copy_(bias)
        if input_scale is not None:
            layer.weight_scale.uniform_(0.01, 0.2, generator=gen)
            layer.input_scale.fill_(input_scale)
    return layer


@pytest.fixture
def every_path(monkeypatch):
    """Let even tiny problems use every thread they are given (so threaded splits are exercised)."""
    monkeypatch.setattr(xnor, "_MIN_WORK_PER_THREAD", 0)


@needs_kernel
@pytest.mark.parametrize("k", KS)
@pytest.mark.parametrize("path", PATH_PARAMS)
def test_bit_identical_to_reference(k, path, every_path):
    gen = torch.Generator().manual_seed(1000 + k)
    variants = itertools.cycle([(False, False, 1), (True, False, 2), (False, True, 3), (True, True, 2)])
    for n, m in itertools.product(NS, MS):
        weight_packed, out_scale, bias = make_layer(n, k, gen)
        prepared = xnor.prepare_weights(weight_packed, n, k)
        x = make_input((m, k), gen)
        with_scale, with_bias, threads = next(variants)
        s = out_scale if with_scale else None
        b = bias if with_bias else None
        expected = reference(x, weight_packed, k, s, b)
        for prep in (None, prepared):
            y = xnor.xnor_linear(x, weight_packed, k, s, b, num_threads=threads, path=path, prepared=prep)
            assert y.dtype == torch.float32 and y.shape == (m, n)
            assert torch.equal(y, expected), (k, n, m, with_scale, with_bias, threads, prep is not None)
            # bit for bit, signed zeros too: a zero sum times a negative scale is -0.0 when there is no bias
            assert torch.equal(y.view(torch.int32), expected.view(torch.int32)), (k, n, m, with_scale, with_bias)


@needs_kernel
@pytest.mark.parametrize("simd_min_rows", [1, 10**9], ids=["simd", "scalar"])
def test_default_path_choice_is_bit_identical(simd_min_rows, every_path, monkeypatch):
    """Unforced calls: the path the kernel picks from the CPU and the row count (with and without prepared
    weights, so that every default branch runs)."""
    monkeypatch.setattr(xnor, "_SIMD_MIN_ROWS", simd_min_rows)
    gen = torch.Generator().manual_seed(21)
    for k, n, m in [(100, 17, 1), (384, 64, 12), (65, 33, 128)]:
        weight_packed, out_scale, bias = make_layer(n, k, gen)
        x = make_input((m, k), gen)
        expected = reference(x, weight_packed, k, out_scale, bias)
        for prep in (None, xnor.prepare_weights(weight_packed, n, k)):
            assert torch.equal(xnor.xnor_linear(x, weight_packed, k, out_scale, bias, prepared=prep), expected)


@needs_kernel
@pytest.mark.parametrize("threads", [1, 2, 3, 8])
@pytest.mark.parametrize("path", PATH_PARAMS)
def test_threads_and_leading_dims(threads, path, every_path):
    gen = torch.Generator().manual_seed(7)
    for k, n in [(65, 3), (384, 64), (100, 1)]:  # 8 threads and 1 to 3 weight rows: more threads than work
        weight_packed, out_scale, bias = make_layer(n, k, gen)
        x = make_input((2, 3, k), gen)
        y = xnor.xnor_linear(x, weight_packed, k, out_scale, bias, num_threads=threads, path=path)
        assert y.shape == (2, 3, n)
        assert torch.equal(y, reference(x, weight_packed, k, out_scale, bias))
        x1 = make_input((k,), gen)  # no leading dims at all
        assert torch.equal(
            xnor.xnor_linear(x1, weight_packed, k, num_threads=threads, path=path), reference(x1, weight_packed, k)
        )


@needs_kernel
@pytest.mark.parametrize("path", PATH_PARAMS)
def test_large_batch_split_over_rows(path, every_path):
    """Many rows and few weight rows: the work is split over the activation rows (and, on the avx512 path, swept
    in several row blocks; the last case in several panel blocks)."""
    gen = torch.Generator().manual_seed(3)
    for n, k, m in [(5, 130, 301), (200, 3000, 700), (1000, 3000, 37)]:
        weight_packed, out_scale, bias = make_layer(n, k, gen)
        x = make_input((m, k), gen)
        for threads in (1, 2, 3):
            y = xnor.xnor_linear(x, weight_packed, k, out_scale, bias, num_threads=threads, path=path)
            assert torch.equal(y, reference(x, weight_packed, k, out_scale, bias))


@needs_kernel
@pytest.mark.parametrize("path", PATH_PARAMS)
def test_panels_and_row_tiles_of_the_avx2_layout(path, every_path):
    """Outputs in whole panels of 96 (the avx2 path's register tile: 3 groups of 32 weight rows), a last panel of one
    or two groups with a partial group, rows past the last whole tile of 3, and K over several 63-step runs of the
    byte counts (252 inputs each), a partial nibble at the end; one thread and two."""
    gen = torch.Generator().manual_seed(11)
    for n, k, m in [(96, 252, 3), (192, 253, 7), (131, 1001, 11), (64, 510, 4), (33, 4, 2)]:
        weight_packed, out_scale, bias = make_layer(n, k, gen)
        x = make_input((m, k), gen)
        for threads in (1, 2):
            y = xnor.xnor_linear(x, weight_packed, k, out_scale, bias, num_threads=threads, path=path)
            assert torch.equal(y, reference(x, weight_packed, k, out_scale, bias)), (n, k, m, threads)


@needs_kernel
@needs_avx2
def test_avx2_path_takes_inputs_past_its_16_bit_sums():
    """Counts past 65535 inputs do not fit the avx2 path's 16-bit sums: such a layer is computed on the scalar path,
    with the same bits. All-equal signs make every count 0 or K, the extremes."""
    k = 65536 + 70
    gen = torch.Generator().manual_seed(5)
    weight_packed, out_scale, bias = make_layer(4, k, gen)
    weight_packed[0] = 255  # all +1
    weight_packed[1] = 0  # all -1
    x = make_input((3, k), gen).abs()  # all +1 (+0.0 and tiny values included)
    y = xnor.xnor_linear(x, weight_packed, k, out_scale, bias, num_threads=2, path="avx2")
    expected = reference(x, weight_packed, k, out_scale, bias)
    assert torch.equal(y, expected)
    assert torch.equal(y[:, :2], torch.tensor([k, -k], dtype=torch.float32).expand(3, 2) * out_scale[:2] + bias[:2])


@needs_kernel
def test_default_threads_and_thresholds():
    gen = torch.Generator().manual_seed(4)
    weight_packed, out_scale, bias = make_layer(384, 384, gen)
    for m in (1, 128):
        x = make_input((m, 384), gen)
        y = xnor.xnor_linear(x, weight_packed, 384, out_scale, bias)
        assert torch.equal(y, reference(x, weight_packed, 384, out_scale, bias))


@needs_kernel
def test_concurrent_callers_share_the_worker_pool(every_path):
    """Python threads calling at once: one owns the worker pool, the others run on their own thread."""
    gen = torch.Generator().manual_seed(12)
    cases = []
    for m, k, n in [(1, 100, 64), (37, 300, 130), (128, 384, 96), (3, 65, 7)]:
        weight_packed, out_scale, bias = make_layer(n, k, gen)
        x = make_input((m, k), gen)
        cases.append((x, weight_packed, k, out_scale, bias, reference(x, weight_packed, k, out_scale, bias)))
    failures = []

    def hammer(seed):
        for i in range(40):
            x, weight_packed, k, out_scale, bias, expected = cases[(i + seed) % len(cases)]
            y = xnor.xnor_linear(x, weight_packed, k, out_scale, bias, num_threads=1 + i % 3)
            if not torch.equal(y, expected):
                failures.append((seed, i))

    threads = [threading.Thread(target=hammer, args=(seed,)) for seed in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert failures == []


@needs_kernel
@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_forked_child_gets_a_fresh_pool(every_path):
    gen = torch.Generator().manual_seed(13)
    weight_packed, out_scale, bias = make_layer(64, 200, gen)
    x = make_input((40, 200), gen)
    expected = xnor.xnor_linear(x, weight_packed, 200, out_scale, bias, num_threads=2).numpy().tobytes()
    pid = os.fork()
    if pid == 0:  # the child: the parent's pool threads (or OpenMP team) do not exist here
        ok = xnor.xnor_linear(x, weight_packed, 200, out_scale, bias, num_threads=2).numpy().tobytes() == expected
        ok = ok and xnor.thread_runtime() == "pthreads"
        os._exit(0 if ok else 1)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            assert os.waitstatus_to_exitcode(status) == 0
            return
        time.sleep(0.01)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    pytest.fail("the forked child hung in xnor_linear")


needs_gomp = pytest.mark.skipif(
    not xnor.is_available() or xnor._openmp_symbols() is None, reason="torch does not run on GNU OpenMP here"
)


def thread_count() -> int:
    return len(os.listdir("/proc/self/task"))


@needs_kernel
@needs_gomp
@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="needs /proc")
def test_calls_run_on_torchs_own_openmp_threads(every_path):
    """By default a multi-threaded call runs on the OpenMP team torch's ops use: it starts no thread of its own
    (the kernel's pthread pool would add one per extra thread)."""
    assert xnor.thread_runtime() == "openmp"
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        gen = torch.Generator().manual_seed(21)
        weight_packed, out_scale, bias = make_layer(96, 300, gen)
        x = make_input((64, 300), gen)
        torch.nn.functional.gelu(torch.randn(256, 1024))  # torch's team exists
        threads = thread_count()
        for n in (2, 2, 2):
            y = xnor.xnor_linear(x, weight_packed, 300, out_scale, bias, num_threads=n)
            assert torch.equal(y, reference(x, weight_packed, 300, out_scale, bias))
        assert thread_count() == threads
    finally:
        torch.set_num_threads(before)


@needs_kernel
@pytest.mark.parametrize("runtime", xnor.THREAD_RUNTIMES)
def test_both_thread_runtimes_are_bit_identical(runtime, fresh_kernel_state, every_path):
    """`STOMPP_HF_KERNEL_THREADS` picks the runtime; either gives the reference's bits for every thread count, more
    threads than cores included (an OpenMP team smaller than asked shrinks the split)."""
    if runtime == "openmp" and xnor._openmp_symbols() is None:
        pytest.skip("torch does not run on GNU OpenMP here")
    fresh_kernel_state.setenv("STOMPP_HF_KERNEL_THREADS", runtime)
    assert xnor.thread_runtime() == runtime
    gen = torch.Generator().manual_seed(22)
    for n, k, m in [(64, 200, 40), (130, 384, 129), (7, 65, 300)]:
        weight_packed, out_scale, bias = make_layer(n, k, gen)
        x = make_input((m, k), gen)
        expected = reference(x, weight_packed, k, out_scale, bias)
        for path in xnor.paths():
            prepared = xnor.prepare_weights(weight_packed, n, k) if path == "avx512" else None
            for threads in (1, 2, 3, 5):
                y = xnor.xnor_linear(
                    x, weight_packed, k, out_scale, bias, num_threads=threads, path=path, prepared=prepared
                )
                assert torch.equal(y, expected), (runtime, path, threads, n, k, m)


@needs_kernel
def test_unknown_thread_runtime_warns_and_uses_the_default(fresh_kernel_state):
    fresh_kernel_state.setenv("STOMPP_HF_KERNEL_THREADS", "fibers")
    with pytest.warns(UserWarning, match="STOMPP_HF_KERNEL_THREADS='fibers'"):
        assert xnor.is_available()
    assert xnor.thread_runtime() == ("pthreads" if xnor._openmp_symbols() is None else "openmp")


@needs_kernel
@pytest.mark.parametrize("path", PATH_PARAMS)
def test_nan_input_is_refused_on_every_path(path):
    gen = torch.Generator().manual_seed(15)
    for m, k, at in [(4, 70, (0, 3)), (40, 300, (37, 299)), (1, 33, (0, 32))]:  # the last one: a tail word
        weight_packed, out_scale, bias = make_layer(16, k, gen)
        x = make_input((m, k), gen)
        x[at] = math.nan
        with pytest.raises(ValueError, match="NaN"):
            xnor.xnor_linear(x, weight_packed, k, out_scale, bias, path=path, num_threads=2)


@needs_kernel
@pytest.mark.parametrize("path", PATH_PARAMS)
def test_strict_inputs_must_be_plus_minus_one(path):
    """`strict=True` (inputs that a binary activation produced): +-1 computes as usual, anything else (0, NaN, a
    scaled sign) raises `InputNotBinary` without computing."""
    gen = torch.Generator().manual_seed(16)
    weight_packed, out_scale, bias = make_layer(24, 100, gen)
    x = torch.where(make_input((9, 100), gen) >= 0, 1.0, -1.0)
    y = xnor.xnor_linear(x, weight_packed, 100, out_scale, bias, path=path, strict=True)
    assert torch.equal(y, reference(x, weight_packed, 100, out_scale, bias))
    for bad in (0.0, math.nan, 0.5, -2.0):
        x2 = x.clone()
        x2[8, 99] = bad
        with pytest.raises(xnor.InputNotBinary, match="strict"):
            xnor.xnor_linear(x2, weight_packed, 100, out_scale, bias, path=path, strict=True)


@needs_kernel
def test_nan_input_is_refused_by_the_kernel_and_propagated_by_the_reference_path():
    gen = torch.Generator().manual_seed(5)
    weight_packed, out_scale, bias = make_layer(16, 70, gen)
    layer = BinaryLinear(70, 16)
    layer.weight.copy_(weight_packed)
    x = make_input((4, 70), gen)
    x[0, 3] = math.nan
    with pytest.raises(ValueError, match="NaN"):
        xnor.xnor_linear(x, weight_packed, 70, out_scale, bias)
    for kernel in ("auto", "xnor"):
        set_kernel(layer, kernel)
        with torch.no_grad(), pytest.raises(ValueError, match="NaN"):
            layer(x)
    set_kernel(layer, "reference")
    with torch.no_grad():
        y = layer(x)
    assert torch.isnan(y[0]).all() and not torch.isnan(y[1:]).any()  # only the row that read a NaN


@needs_kernel
@pytest.mark.parametrize("path", PATH_PARAMS)
def test_padding_bits_of_weights_are_ignored(path):
    """Set bits past in_features in the last byte must not count (the reference drops them too)."""
    gen = torch.Generator().manual_seed(6)
    for k in (7, 63, 100):
        weight_packed, _, _ = make_layer(9, k, gen)
        dirty = weight_packed.clone()
        dirty[:, -1] |= torch.tensor(0xFF << (k % 8 or 8) & 0xFF, dtype=torch.uint8)
        x = make_input((3, k), gen)
        expected = reference(x, weight_packed, k)
        assert torch.equal(xnor.xnor_linear(x, dirty, k, path=path), expected)
        prepared = xnor.prepare_weights(dirty, 9, k)
        assert torch.equal(xnor.xnor_linear(x, dirty, k, path=path, prepared=prepared), expected)


@needs_kernel
def test_non_contiguous_inputs():
    gen = torch.Generator().manual_seed(8)
    weight_packed, out_scale, bias = make_layer(12, 96, gen)
    wide = make_input((6, 200), gen)
    x = wide[:, 10:106]  # rows with a stride of 200
    xt = make_input((96, 6), gen).t()  # column-major
    w_nc = torch.cat([weight_packed, weight_packed], dim=1)[:, : weight_packed.shape[1]]
    s_nc = torch.stack([out_scale, out_scale], dim=1)[:, 0]
    for inp in (x, xt):
        y = xnor.xnor_linear(inp, w_nc, 96, s_nc, bias)
        assert torch.equal(y, reference(inp, weight_packed, 96, out_scale, bias))


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_pack_signs_matches_the_torch_packing(dtype):
    """`xnor.pack_signs(x)` is `pack_signs(x >= 0)` bit for bit: +-0 pack as +1, NaN as -1 (binary_sign's values),
    for widths around the 8-bit bytes and 64-bit words, strided and transposed rows, bfloat16 special values."""
    gen = torch.Generator().manual_seed(21)
    special = torch.tensor([0.0, -0.0, float("nan"), float("inf"), -float("inf"), 1e-40, -1e-40, -1.0, 1.0])
    for rows, k in ((1, 1), (3, 7), (2, 8), (5, 9), (4, 63), (4, 64), (3, 65), (2, 130), (17, 384)):
        x = torch.randn(rows, k, generator=gen).to(dtype)
        x.view(-1)[: min(x.numel(), special.numel())] = special[: x.numel()].to(dtype)
        assert torch.equal(xnor.pack_signs(x), pack_signs(x >= 0)), (rows, k)
    wide = torch.randn(6, 200, generator=gen).to(dtype)
    for view in (wide[:, 10:107], wide.t(), wide[::2]):
        assert torch.equal(xnor.pack_signs(view), pack_signs(view >= 0))
    assert xnor.pack_signs(torch.zeros(0, 5, dtype=dtype)).shape == (0, 1)
    for bad in (torch.zeros(3, dtype=dtype), torch.zeros(2, 2, dtype=torch.float16), torch.zeros(2, 2, 2)):
        with pytest.raises(ValueError, match="pack_signs expects"):
            xnor.pack_signs(bad)


@needs_kernel
def test_empty_batch():
    gen = torch.Generator().manual_seed(9)
    weight_packed, _, _ = make_layer(4, 20, gen)
    y = xnor.xnor_linear(torch.zeros(0, 20), weight_packed, 20)
    assert y.shape == (0, 4)


@needs_kernel
@pytest.mark.parametrize("path", PATH_PARAMS)
def test_output_into_a_reused_buffer(path, every_path):
    gen = torch.Generator().manual_seed(12)
    weight_packed, out_scale, bias = make_layer(100, 384, gen)
    out = torch.full((2, 33, 100), float("nan"))  # stale contents: every entry must be overwritten
    for seed in range(2):
        x = make_input((2, 33, 384), torch.Generator().manual_seed(seed))
        y = xnor.xnor_linear(x, weight_packed, 384, out_scale, bias, 2, path=path, out=out)
        assert y is out
        expected = xnor.xnor_linear(x, weight_packed, 384, out_scale, bias, 2, path=path)
        assert torch.equal(out.view(torch.int32), expected.view(torch.int32))
        assert torch.equal(out, reference(x, weight_packed, 384, out_scale, bias))


@needs_kernel
def test_output_buffer_validation():
    gen = torch.Generator().manual_seed(13)
    weight_packed, _, _ = make_layer(8, 40, gen)
    x = make_input((4, 40), gen)
    bad = {
        "shape": torch.empty(4, 9),
        "dtype": torch.empty(4, 8, dtype=torch.float64),
        "contiguous": torch.empty(8, 4).t(),
        "type": [[0.0] * 8] * 4,
    }
    for out in bad.values():
        with pytest.raises(ValueError, match="out"):
            xnor.xnor_linear(x, weight_packed, 40, out=out)
    shared = torch.empty(4 * 40 + 4 * 8)
    with pytest.raises(ValueError, match="shares its storage"):
        xnor.xnor_linear(shared[:160].view(4, 40), weight_packed, 40, out=shared[160:].view(4, 8))
    with pytest.raises(ValueError, match="requires grad"):
        xnor.xnor_linear(x, weight_packed, 40, out=torch.empty(4, 8, requires_grad=True))


@needs_kernel
def test_no_grad_and_inference_mode():
    gen = torch.Generator().manual_seed(10)
    weight_packed, out_scale, _ = make_layer(8, 40, gen)
    x = make_input((2, 40), gen).requires_grad_()
    with torch.no_grad():
        y = xnor.xnor_linear(x, weight_packed, 40, out_scale)
    assert not y.requires_grad
    with torch.inference_mode():
        y2 = xnor.xnor_linear(x.detach(), weight_packed, 40, out_scale)
    assert torch.equal(y, y2)


@needs_kernel
def test_input_validation():
    gen = torch.Generator().manual_seed(11)
    weight_packed, out_scale, bias = make_layer(8, 40, gen)
    x = make_input((2, 40), gen)
    with pytest.raises(ValueError, match="float32"):
        xnor.xnor_linear(x.double(), weight_packed, 40)
    with pytest.raises(ValueError, match="float32"):
        xnor.xnor_linear(x.half(), weight_packed, 40)
    with pytest.raises(ValueError, match=r"\[\.\.\., 41\]"):
        xnor.xnor_linear(x, weight_packed, 41)
    with pytest.raises(ValueError, match="weight_packed"):
        xnor.xnor_linear(make_input((2, 48), gen), weight_packed, 48)  # 6 bytes per row needed, 5 given
    with pytest.raises(ValueError, match="weight_packed"):
        xnor.xnor_linear(x, weight_packed.to(torch.int8), 40)
    with pytest.raises(ValueError, match="out_scale"):
        xnor.xnor_linear(x, weight_packed, 40, out_scale[:4])
    with pytest.raises(ValueError, match="out_scale"):
        xnor.xnor_linear(x, weight_packed, 40, out_scale.double())
    with pytest.raises(ValueError, match="bias"):
        xnor.xnor_linear(x, weight_packed, 40, None, bias.view(2, 4))
    with pytest.raises(ValueError, match="num_threads"):
        xnor.xnor_linear(x, weight_packed, 40, num_threads=0)
    with pytest.raises(ValueError, match="inference-only"):
        xnor.xnor_linear(x.clone().requires_grad_(), weight_packed, 40)
    with pytest.raises(ValueError, match="inference-only"):
        xnor.xnor_linear(x, weight_packed, 40, out_scale.clone().requires_grad_())
    with pytest.raises(ValueError, match="`path` must be one of"):
        xnor.xnor_linear(x, weight_packed, 40, path="sse9")
    with pytest.raises(ValueError, match="`prepared` must be"):
        xnor.xnor_linear(x, weight_packed, 40, prepared=torch.zeros(3, dtype=torch.uint8))
    with pytest.raises(ValueError, match="prepare_weights expects"):
        xnor.prepare_weights(weight_packed, 8, 41)
    missing = [p for p in xnor.PATHS if p not in xnor.paths()]
    for path in missing:
        with pytest.raises(ValueError, match="does not run on this CPU"):
            xnor.xnor_linear(x, weight_packed, 40, path=path)


@needs_kernel
def test_build_into_fresh_cache_dir(tmp_path, fresh_kernel_state):
    cache = tmp_path / "kernels"
    fresh_kernel_state.setenv("STOMPP_HF_KERNEL_CACHE", str(cache))
    assert xnor.is_available()
    built = sorted(p.name for p in cache.iterdir())
    assert len(built) == 1 and built[0].startswith("xnor_") and built[0].endswith(".so")  # no temp files left
    x = torch.randn(3, 20)
    weight_packed = pack_signs(torch.randn(5, 20) >= 0)
    assert torch.equal(xnor.xnor_linear(x, weight_packed, 20), reference(x, weight_packed, 20))
    xnor._reset_for_tests()  # a second process-level load reuses the cached library
    mtime = (cache / built[0]).stat().st_mtime_ns
    assert xnor.is_available()
    assert (cache / built[0]).stat().st_mtime_ns == mtime


@needs_kernel
def test_broken_compiler_raises_unavailable(tmp_path, fresh_kernel_state):
    fresh_kernel_state.setenv("STOMPP_HF_KERNEL_CACHE", str(tmp_path / "kernels"))
    fresh_kernel_state.setenv("CC", "/nonexistent/cc")
    with pytest.raises(xnor.XnorUnavailable, match="/nonexistent/cc"):
        xnor.xnor_linear(torch.zeros(1, 8), torch.zeros(1, 1, dtype=torch.uint8), 8)
    assert not xnor.is_available()  # the failure is remembered, and is_available never raises


@needs_kernel
def test_failing_compiler_reports_its_output(tmp_path, fresh_kernel_state):
    fresh_kernel_state.setenv("STOMPP_HF_KERNEL_CACHE", str(tmp_path / "kernels"))
    fresh_kernel_state.setenv("CC", "cc -DXN_BROKEN_BUILD=1 -include /nonexistent/header.h")
    with pytest.raises(xnor.XnorUnavailable, match="header.h") as info:
        xnor.xnor_linear(torch.zeros(1, 8), torch.zeros(1, 1, dtype=torch.uint8), 8)
    assert "CC" in str(info.value)
    assert [p.name for p in (tmp_path / "kernels").iterdir()] == []  # the failed build left no files behind


def test_source_ships_as_package_data():
    """`read_source` gives the translation unit the build compiles and hashes: xnor.c with the sibling files it
    #includes pasted in place, between #line markers."""
    here = Path(xnor.__file__).parent
    source = build.read_source("xnor.c")
    main = (here / "xnor.c").read_text(encoding="utf-8")
    for name in ("xnor_avx512.c", "xnor_conv.c"):
        assert f'#include "{name}"' in main and f'#include "{name}"' not in source
        assert f'#line 1 "{name}"\n' + (here / name).read_text(encoding="utf-8") in source
    assert source.startswith(main[: main.index("#include <stdint.h>")])
    assert "int xnor_linear_f32(" in source and "int xnor_conv2d_f32(" in source


def test_read_source_refuses_an_include_cycle(monkeypatch):
    texts = {"a.c": '#include "b.c"\n', "b.c": 'int b;\n#include "a.c"\n'}
    monkeypatch.setattr(build, "_read_one", texts.__getitem__)
    with pytest.raises(build.XnorUnavailable, match=r"cycle \(a.c -> b.c -> a.c\)"):
        build.read_source("a.c")


# -DXN_NO_SIMD: the scalar-only build; -march=x86-64: no AVX at all in the baseline code (the portable sign loop), the
# AVX2 and AVX-512 paths compiled through their target attributes.
_WARNING_BUILDS = [(), ("-DXN_NO_SIMD",)]
if platform.machine() in ("x86_64", "AMD64"):
    _WARNING_BUILDS.append(("-march=x86-64",))


@pytest.mark.parametrize("extra", _WARNING_BUILDS, ids=lambda e: " ".join(e) or "native")
def test_source_compiles_without_warnings(extra, tmp_path):
    cc = build.compiler()
    if not cc or shutil.which(cc[0]) is None:
        pytest.skip(f"no C compiler found ({os.environ.get('CC') or 'cc'})")
    flags = [*build.CFLAGS, *extra]
    if any(f.startswith("-march=") for f in extra):
        flags.remove("-march=native")
    assert {"-Wall", "-Wextra"} <= set(build.CFLAGS)
    source = Path(xnor.__file__).parent / "xnor.c"
    cmd = [*cc, *flags, "-Werror", str(source), "-o", str(tmp_path / "xnor.so")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0 and "warning" not in proc.stderr, f"{shlex.join(cmd)}\n{proc.stderr}{proc.stdout}"


def test_cpu_features_of_this_machine():
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            info = f.read()
    except OSError:
        pytest.skip("no /proc/cpuinfo here")
    flags = cpu.cpu_flags()
    assert isinstance(flags, frozenset) and flags
    assert cpu.cpu_flags() is flags  # cached
    assert flags <= set(info.lower().split())
    model = cpu.cpu_model()
    assert model and model != "unknown CPU"
    if "model name" in info:
        assert model in info
    text = cpu.describe_cpu()  # "<model> (<n> cores); avx2, avx512f, ...; no amx_bf16, ..."
    parts = text.split("; ")
    assert parts[0].startswith(model) and f"{os.cpu_count()} cores" in parts[0]
    listed = set() if parts[1].startswith("none of") else set(parts[1].split(", "))
    assert listed == {f for f in cpu.FEATURES_OF_INTEREST if f in flags}
    missing = set(parts[2].removeprefix("no ").split(", ")) if len(parts) > 2 else set()
    assert missing == ({f for f in cpu.FEATURES_OF_INTEREST if f not in flags} if listed else set())


def test_cache_key_covers_source_compiler_cpu_and_flags(monkeypatch, tmp_path):
    monkeypatch.setenv("STOMPP_HF_KERNEL_CACHE", str(tmp_path))
    cc = ["/usr/bin/cc"]
    path = build.library_path("xnor", "int f(void);", cc)
    assert path.parent == tmp_path and path.name.startswith("xnor_") and path.suffix == ".so"
    assert build.library_path("xnor", "int f(void);", cc) == path
    assert build.library_path("xnor", "int g(void);", cc) != path
    assert build.library_path("xnor", "int f(void);", ["/usr/bin/clang"]) != path
    monkeypatch.setattr(build, "cpu_flags", lambda: frozenset({"sse2"}))
    other_cpu = build.library_path("xnor", "int f(void);", cc)
    assert other_cpu != path
    monkeypatch.setattr(build, "CFLAGS", (*build.CFLAGS, "-DX"))
    assert build.library_path("xnor", "int f(void);", cc) not in (path, other_cpu)


# ---------------------------------------------------------------------------------------------------------------
# run-time dispatch, the packed module's kernel layouts, and the exact int8 path


@needs_kernel
def test_paths_follow_the_cpu_flags():
    flags = cpu.cpu_flags()
    if not flags:
        pytest.skip("the OS lists no CPU flags here")
    have = xnor.paths()
    assert have[-1] == "scalar" and list(have) == [p for p in xnor.PATHS if p in have]
    avx512 = {"avx512f", "avx512bw", "avx512dq", "avx512vl", "avx512_vpopcntdq"} <= flags
    assert ("avx512" in have) == avx512
    assert ("avx2" in have) == ("avx2" in flags and "popcnt" in flags)


@needs_kernel
@pytest.mark.parametrize("path", PATH_PARAMS)
def test_packed_linear_under_a_forced_path(path):
    """`forced_path` reaches the packed modules; their kernel layout is rebuilt when the weight changes."""
    gen = torch.Generator().manual_seed(30)
    layer = BinaryLinear(100, 33)
    weight_packed, out_scale, bias = make_layer(33, 100, gen)
    with torch.no_grad():
        layer.weight.copy_(weight_packed)
        layer.weight_scale.copy_(out_scale.abs())
        layer.input_scale.fill_(0.5)
        layer.bias.copy_(bias)
    x = make_input((2, 7, 100), gen)
    set_kernel(layer, "reference")
    with torch.no_grad():
        expected = layer(x)
        set_kernel(layer, "xnor")
        with xnor.forced_path(path):
            assert torch.equal(layer(x), expected)
            other, _, _ = make_layer(33, 100, gen)
            layer.load_state_dict({**layer.state_dict(), "weight": other})  # an in-place copy: a new version
            y = layer(x)
            set_kernel(layer, "reference")
            assert torch.equal(y, layer(x))


def test_forced_path_validates():
    with pytest.raises(ValueError, match="`path` must be one of"), xnor.forced_path("neon"):
        pass


@needs_kernel
@pytest.mark.skipif(not int8.available(), reason="no torch._int_mm")
def test_int8_path_is_bit_identical():
    gen = torch.Generator().manual_seed(40)
    for m, k, n in [(1, 7, 3), (2, 100, 17), (33, 513, 64), (128, 384, 100)]:
        weight_packed, out_scale, bias = make_layer(n, k, gen)
        weight = int8.int8_weight(weight_packed, k)
        assert weight.dtype == torch.int8 and weight.shape == (k, n)
        x = make_input((m, k), gen)
        for s, b in [(None, None), (out_scale, None), (None, bias), (out_scale, bias)]:
            assert torch.equal(int8.int8_linear(x, weight, s, b), reference(x, weight_packed, k, s, b))
        x[0, k // 2] = math.nan
        with pytest.raises(ValueError, match="NaN"):
            int8.int8_linear(x, weight, out_scale, bias)


@needs_kernel
@pytest.mark.skipif(not int8.available(), reason="no torch._int_mm")
def test_auto_measures_int8_where_it_may_win(monkeypatch):
    """On a CPU where the int8 path may win (AMX int8; forced here), "auto" times both paths once per shape and
    then keeps the faster one; "int8" runs it always. Every choice gives the reference path's bits."""
    monkeypatch.setattr(int8, "worth_measuring", lambda: True)
    int8._reset_for_tests()
    gen = torch.Generator().manual_seed(41)
    layer = packed_linear(96, 40, gen)
    x = make_input((6, 96), gen)
    set_kernel(layer, "reference")
    with torch.no_grad():
        expected = layer(x)
        set_kernel(layer, "auto")
        assert torch.equal(layer(x), expected)
        key = (8, 40, 96, torch.float32)
        assert set(int8._choices) == {key} and int8._choices[key] in ("xnor", "int8")
        for choice in ("xnor", "int8"):
            int8._choices[key] = choice
            assert torch.equal(layer(x), expected)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "slow without AMX": test_int8_without_amx_tiles_warns_it_is_slow
            set_kernel(layer, "int8")
        assert torch.equal(layer(x), expected)
        assert ("amx" if int8.amx_available() else "int8") in layer._kernel_layouts
    int8._reset_for_tests()


needs_amx = pytest.mark.skipif(
    not (xnor.is_available() and int8.amx_available()), reason="no AMX int8 tiles on this CPU (or OS)"
)


@needs_amx
@pytest.mark.parametrize("threads", [1, 2])
def test_amx_linear_is_bit_identical(threads, monkeypatch):
    """The AMX int8 path against the dense formula: K and N not multiples of 64 / 32, rows split by row pairs (each
    thread packing blocks into its own buffer: several blocks at K = 1536) or by output channels (few rows, one
    shared buffer), several weight blocks (N = 700 at K = 1536), every scale / bias combination."""
    monkeypatch.setattr(int8, "_MIN_WORK_PER_THREAD", 0)
    gen = torch.Generator().manual_seed(44)
    for m, k, n in [(1, 7, 3), (2, 100, 17), (33, 513, 64), (128, 384, 100), (200, 65, 33), (1000, 1536, 700)]:
        weight_packed, out_scale, bias = make_layer(n, k, gen)
        weight = int8.amx_weight(weight_packed, n, k)
        assert weight.dtype == torch.uint8 and weight.numel() == -(-n // 32) * 32 * -(-k // 64) * 64
        x = make_input((m, k), gen)
        for s, b in [(None, None), (out_scale, None), (None, bias), (out_scale, bias)]:
            y = int8.amx_linear(x, weight, n, s, b, num_threads=threads)
            assert torch.equal(y, reference(x, weight_packed, k, s, b)), (m, k, n)
        x3 = x.view(1, m, k)[:, :, :]
        assert torch.equal(
            int8.amx_linear(x3, weight, n, out_scale, bias),
            reference(x, weight_packed, k, out_scale, bias).view(1, m, n),
        )
        x[m // 2, k // 2] = math.nan
        with pytest.raises(ValueError, match="NaN"):
            int8.amx_linear(x, weight, n, out_scale, bias, num_threads=threads)


@needs_amx
def test_amx_linear_strict_and_validation():
    gen = torch.Generator().manual_seed(45)
    weight_packed, out_scale, bias = make_layer(40, 96, gen)
    weight = int8.amx_weight(weight_packed, 40, 96)
    x = torch.where(torch.rand(8, 96, generator=gen) < 0.5, 1.0, -1.0)
    assert torch.equal(int8.amx_linear(x, weight, 40, strict=True), reference(x, weight_packed, 96, None, None))
    x[3, 5] = 0.5
    with pytest.raises(xnor.InputNotBinary):
        int8.amx_linear(x, weight, 40, strict=True)
    with pytest.raises(ValueError, match="weight_amx from amx_weight"):
        int8.amx_linear(x, weight[:-1], 40)
    with pytest.raises(ValueError, match="weight_amx from amx_weight"):
        int8.amx_linear(x, weight, 65)
    with pytest.raises(ValueError, match="float32 or bfloat16 CPU tensor"):
        int8.amx_linear(x.double(), weight, 40)
    with pytest.raises(ValueError, match=r"uint8 CPU tensor \[40, 12\]"):
        int8.amx_weight(weight_packed[:, :-1], 40, 96)
    with pytest.raises(ValueError, match="inference-only"):
        int8.amx_linear(x.requires_grad_(), weight, 40)


@needs_kernel
def test_auto_does_not_measure_int8_without_amx(monkeypatch):
    monkeypatch.setattr(cpu, "cpu_flags", lambda: frozenset({"avx2", "avx512_vnni"}))
    monkeypatch.setattr(int8, "cpu_flags", cpu.cpu_flags)
    assert not int8.worth_measuring()
    monkeypatch.setattr(int8, "cpu_flags", lambda: frozenset({"amx_int8"}))
    assert int8.worth_measuring() == int8.available()


def _fake_virtio(root: Path, devices: dict[str, tuple[str, str]]) -> str:
    for name, (device, features) in devices.items():
        (root / name).mkdir(parents=True)
        (root / name / "device").write_text(device + "\n")
        (root / name / "features").write_text(features + "\n")
    return str(root)


def test_free_page_reporting_reads_the_balloon_feature_bit(tmp_path):
    """A virtio balloon (device 0x0005) whose feature string has bit 5 (VIRTIO_BALLOON_F_REPORTING) set reports
    free pages; the same bit on another device, a balloon without it, or no virtio bus at all does not."""
    reporting = "0110010100000000000000000000000010"
    quiet = "0110000100000000000000000000000010"
    assert xnor.free_page_reporting(_fake_virtio(tmp_path / "a", {"virtio0": ("0x0005", reporting)}))
    assert xnor.free_page_reporting(
        _fake_virtio(tmp_path / "b", {"virtio0": ("0x0002", reporting), "virtio1": ("0x0005", reporting)})
    )
    assert not xnor.free_page_reporting(_fake_virtio(tmp_path / "c", {"virtio0": ("0x0005", quiet)}))
    assert not xnor.free_page_reporting(_fake_virtio(tmp_path / "d", {"virtio0": ("0x0002", reporting)}))
    assert not xnor.free_page_reporting(str(tmp_path / "missing"))


def test_hugepage_default_follows_the_environment_then_the_machine(monkeypatch):
    """`STOMPP_HF_KERNEL_HUGEPAGES` "1" / "0" decides; unset, the advice is on unless the balloon reports free
    pages; any other value warns and falls back to the machine."""
    monkeypatch.setattr(xnor, "free_page_reporting", lambda: True)
    monkeypatch.setenv("STOMPP_HF_KERNEL_HUGEPAGES", "1")
    assert xnor._hugepages_default() == 1
    monkeypatch.setenv("STOMPP_HF_KERNEL_HUGEPAGES", "0")
    assert xnor._hugepages_default() == 0
    monkeypatch.delenv("STOMPP_HF_KERNEL_HUGEPAGES")
    assert xnor._hugepages_default() == 0
    monkeypatch.setattr(xnor, "free_page_reporting", lambda: False)
    assert xnor._hugepages_default() == 1
    monkeypatch.setenv("STOMPP_HF_KERNEL_HUGEPAGES", "yes")
    with pytest.warns(UserWarning, match="not '0' or '1'"):
        assert xnor._hugepages_default() == 1


@needs_kernel
def test_hugepage_advice_changes_no_value():
    """With and without the huge-page advice (an output of 8 MiB, so it applies) the kernel writes the same bits;
    `set_hugepages` returns the previous setting and takes only a bool."""
    g = torch.Generator().manual_seed(3)
    k, n, m = 256, 1024, 2048
    w = pack_signs(torch.rand(n, k, generator=g) < 0.5)
    x = torch.randn(m, k, generator=g)
    previous = xnor.set_hugepages(True)
    try:
        on = xnor.xnor_linear(x, w, k)
        assert xnor.set_hugepages(False) is True
        off = xnor.xnor_linear(x, w, k)
        assert xnor.set_hugepages(False) is False
        assert torch.equal(on, off)
        with pytest.raises(TypeError, match="must be a bool"):
            xnor.set_hugepages(1)
    finally:
        xnor.set_hugepages(previous)


needs_avx512 = pytest.mark.skipif("avx512" not in available_paths(), reason="no avx512 path on this CPU")


def bf16_reference(x, weight_packed, k, out_scale, bias):
    """What a bfloat16 model's dense path computes: the bf16 matmul of +-1 (exact sums, rounded once to bf16), then
    the bf16 multiply and add, each rounded to bf16."""
    y = F.linear(torch.where(x >= 0, 1.0, -1.0).bfloat16(), unpack_signs(weight_packed, k, torch.bfloat16))
    if out_scale is not None:
        y = y * out_scale
    if bias is not None:
        y = y + bias
    return y


@needs_avx512
@pytest.mark.parametrize("kernel", ["xnor", "amx"])
def test_bf16_activations_round_like_torch(kernel):
    """bfloat16 in, bfloat16 out, bit-identical to torch's bf16 path: sums up to 3072 (past bf16's 8 bits, so the
    first rounding matters), bf16 scales and biases, the row and column splits of both kernels."""
    if kernel == "amx" and not int8.amx_available():
        pytest.skip("no AMX int8 tiles on this CPU (or OS)")
    gen = torch.Generator().manual_seed(46)
    for m, k, n in [(1, 7, 3), (33, 513, 64), (128, 384, 100), (300, 3072, 200)]:
        weight_packed, out_scale, bias = make_layer(n, k, gen)
        out_scale, bias = out_scale.bfloat16(), bias.bfloat16()
        x = make_input((m, k), gen).bfloat16()
        for s, b in [(None, None), (out_scale, None), (None, bias), (out_scale, bias)]:
            args = (s.float() if s is not None else None, b.float() if b is not None else None)
            if kernel == "xnor":
                y = xnor.xnor_linear(x, weight_packed, k, *args, prepared=xnor.prepare_weights(weight_packed, n, k))
            else:
                y = int8.amx_linear(x, int8.amx_weight(weight_packed, n, k), n, *args)
            assert y.dtype == torch.bfloat16
            assert torch.equal(y, bf16_reference(x, weight_packed, k, s, b)), (m, k, n)
    with pytest.raises(ValueError, match="bfloat16 needs the avx512"):
        xnor.xnor_linear(x, weight_packed, k, path="scalar")


@needs_kernel
def test_popcount_rate_times_the_register_loop():
    """`popcount_rate` (the benchmark's ceiling probe) gives a positive, finite rate where a vector path runs and
    None elsewhere, and checks its argument."""
    rate = xnor.popcount_rate(1 << 10)
    done = xnor.popcount_probe(1 << 10)
    if {"avx512", "avx2"} & set(available_paths()):
        assert rate is not None and 0 < rate < math.inf
        # what a benchmark divides its own timing by: the same every call, and at least 32 per step asked for
        assert done == xnor.popcount_probe(1 << 10) >= 32 * (1 << 10)
        assert xnor.popcount_probe(1 << 12) > done
    else:
        assert rate is None and done is None
    for bad in (0, -1, 1.5, True, "8"):
        with pytest.raises(TypeError, match="steps"):
            xnor.popcount_rate(bad)
        with pytest.raises(TypeError, match="steps"):
            xnor.popcount_probe(bad)


@needs_kernel
def test_clock_ghz_times_a_chain_of_dependent_multiplies(monkeypatch):
    """`clock_ghz` (the benchmark's clock measure) runs exactly `steps` dependent multiplies (the chain's value
    proves it: none folded away), gives a clock no CPU exceeds only if the chain were skipped, None off x86, and
    checks its argument."""
    probe = xnor._library().clock_probe
    assert probe(3) == 6561  # 3 -> 9 -> 81 -> 6561
    assert probe(64) == ctypes.c_int64(pow(65, 2**64, 2**64)).value  # 65 squared 64 times, as an int64
    ghz = xnor.clock_ghz(1 << 20)
    if platform.machine().lower() in ("x86_64", "amd64"):
        assert ghz is not None and 0 < ghz < 20
    monkeypatch.setattr(platform, "machine", lambda: "aarch64")
    assert xnor.clock_ghz(1 << 10) is None
    for bad in (0, -1, 1.5, True, "8"):
        with pytest.raises(TypeError, match="steps"):
            xnor.clock_ghz(bad)


def bf16_kernel(kernel: str, weight_packed: torch.Tensor, n: int, k: int):
    """`kernel(x, scale, bias)`: the bfloat16 linear of the XNOR kernel (avx512 path) or of the AMX int8 one."""
    if kernel == "amx":
        if not int8.amx_available():
            pytest.skip("no AMX int8 tiles on this CPU (or OS)")
        weight = int8.amx_weight(weight_packed, n, k)
        return lambda x, s, b: int8.amx_linear(x, weight, n, s, b)
    prepared = xnor.prepare_weights(weight_packed, n, k)
    return lambda x, s, b: xnor.xnor_linear(x, weight_packed, k, s, b, prepared=prepared)


@needs_avx512
@pytest.mark.parametrize("kernel", ["xnor", "amx"])
def test_bf16_sums_up_to_the_full_length(kernel):
    """Sums from -K to K in steps of 2, past 256 where bfloat16 stops holding every integer: the epilogue skips the
    rounding of the sum only where it is exact (K <= 256, or even K <= 512: every sum then has K's parity), and
    rounds it everywhere else, with and without a scale and a bias (the four ways the avx512 epilogue takes two
    panels' roundings at once; 24 outputs: the pair's second panel has 8)."""
    gen = torch.Generator().manual_seed(49)
    for k in (255, 256, 257, 383, 384, 511, 512, 513, 514, 700):
        n = 24
        weight_packed, out_scale, bias = make_layer(n, k, gen)
        signs = unpack_signs(weight_packed, k, torch.float32)
        flips = torch.arange(0, k + 1, max(1, k // 47))  # row r agrees with weight row r % n but for flips[r] entries
        x = signs[torch.arange(len(flips)) % n].clone()
        for r, f in enumerate(flips.tolist()):
            x[r, :f] *= -1
        x = (x * (torch.rand(x.shape, generator=gen) + 0.5)).bfloat16()
        run = bf16_kernel(kernel, weight_packed, n, k)
        for s in (None, out_scale.bfloat16()):
            for b in (None, bias.bfloat16()):
                y = run(x, s.float() if s is not None else None, b.float() if b is not None else None)
                assert torch.equal(y, bf16_reference(x, weight_packed, k, s, b)), (k, s is None, b is None)


def bf16_bits(*values: int) -> torch.Tensor:
    """bfloat16 values from their 16-bit patterns."""
    return torch.tensor(values, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)


# +-0, +-subnormals, +-smallest normal, +-1, +-largest finite, +-inf: each counts as `x >= 0` says
BF16_SPECIALS = (0x0000, 0x8000, 0x0001, 0x8001, 0x007F, 0x807F, 0x0080, 0x8080, 0x3F80, 0xBF80, 0x7F7F, 0xFF7F)
BF16_INFS = (0x7F80, 0xFF80)
BF16_NANS = (0x7FC0, 0xFFC0, 0x7F81, 0xFF81, 0x7FFF)


@needs_avx512
def test_bf16_signs_of_special_values():
    """The bfloat16 sign words read the 16-bit patterns: zeros of both signs, subnormals, infinities and the
    largest values count as `x >= 0` says; every NaN pattern raises; strict accepts exactly +-1."""
    gen = torch.Generator().manual_seed(47)
    k, n = 70, 20  # three sign words, the last one partial
    weight_packed, out_scale, bias = make_layer(n, k, gen)
    prepared = xnor.prepare_weights(weight_packed, n, k)
    values = bf16_bits(*BF16_SPECIALS, *BF16_INFS)
    x = values[torch.randint(0, len(values), (9, k), generator=gen)]
    s, b = out_scale.bfloat16(), bias.bfloat16()
    y = xnor.xnor_linear(x, weight_packed, k, s.float(), b.float(), prepared=prepared)
    assert torch.equal(y, bf16_reference(x, weight_packed, k, s, b))
    for nan, at in itertools.product(BF16_NANS, (5, 40, 66)):  # in each of the three words
        bad = x.clone()
        bad[4, at] = bf16_bits(nan)[0]
        with pytest.raises(ValueError, match="NaN"):
            xnor.xnor_linear(bad, weight_packed, k, prepared=prepared)
    pm1 = torch.where(x >= 0, 1.0, -1.0).bfloat16()
    y = xnor.xnor_linear(pm1, weight_packed, k, prepared=prepared, strict=True)
    assert torch.equal(y, bf16_reference(pm1, weight_packed, k, None, None))
    for other in (0x0000, 0x8000, 0x3F81, 0xBF7F, 0x7F80, 0x0001):
        bad = pm1.clone()
        bad[8, 69] = bf16_bits(other)[0]
        with pytest.raises(xnor.InputNotBinary):
            xnor.xnor_linear(bad, weight_packed, k, prepared=prepared, strict=True)


@needs_avx512
@pytest.mark.parametrize("kernel", ["xnor", "amx"])
def test_bf16_epilogue_with_wild_scales_and_biases(kernel):
    """Scales and biases with infinities or NaNs take the epilogue's rounding with its NaN case: NaNs where torch's
    bf16 path has them (its NaN bits differ between its scalar and vector code: 0x7FC0 / 0xFFFF) and its bits
    everywhere else; finite ones (subnormal and tiny values included) take the rounding without it, same bits."""
    gen = torch.Generator().manual_seed(48)
    k, n = 300, 40
    weight_packed, out_scale, bias = make_layer(n, k, gen)
    run = bf16_kernel(kernel, weight_packed, n, k)
    x = make_input((17, k), gen).bfloat16()
    wild = {
        "inf scale": (out_scale.clone().index_fill_(0, torch.tensor([3]), math.inf), bias),
        "nan bias": (out_scale, bias.clone().index_fill_(0, torch.tensor([5]), math.nan)),
        "subnormal scale": (out_scale.clone().index_fill_(0, torch.tensor([7]), 1e-39), bias),
        "subnormal outputs": (
            out_scale.clone().index_fill_(0, torch.tensor([7]), 1e-39),
            bias.clone().index_fill_(0, torch.tensor([7]), 0.0),
        ),
        "tiny bias": (out_scale, bias.clone().index_fill_(0, torch.tensor([9]), 2.0**-110)),
        # around the smallest magnitude the CPU's bf16 conversion takes (xz_native_ok): 2**-100 on either side
        "small scales": (
            out_scale.clone()
            .index_fill_(0, torch.tensor([1, 2]), 2.0**-100)
            .index_fill_(0, torch.tensor([4]), -(2.0**-101)),
            bias.clone().index_fill_(0, torch.tensor([11]), 2.0**-100),
        ),
        "zero scale and bias": (
            out_scale.clone().index_fill_(0, torch.tensor([6]), 0.0),
            bias.clone().index_fill_(0, torch.tensor([8]), -0.0),
        ),
        "tame": (out_scale, bias),
    }
    for name, (s, b) in wild.items():
        s, b = s.bfloat16(), b.bfloat16()
        y = run(x, s.float(), b.float())
        expected = bf16_reference(x, weight_packed, k, s, b)
        assert torch.equal(y.isnan(), expected.isnan()), name
        assert bool(y.isnan().any()) == (name in ("inf scale", "nan bias"))  # 0 * inf, x + NaN
        finite = ~expected.isnan()
        assert torch.equal(y[finite].view(torch.int16), expected[finite].view(torch.int16)), name


@needs_avx512
@pytest.mark.parametrize("convert", [True, False], ids=["bf16 model", "bf16 input only"])
def test_bf16_packed_linear_is_bit_identical(convert):
    """A packed layer fed bfloat16 (its model cast with `.to(torch.bfloat16)`, or only its input) computes in bf16
    in every kernel mode, with the reference path's bits."""
    gen = torch.Generator().manual_seed(47)
    layer = packed_linear(200, 70, gen, input_scale=0.37)
    if convert:
        layer = layer.to(torch.bfloat16)
    x = make_input((3, 40, 200), gen).bfloat16()
    with torch.no_grad():
        set_kernel(layer, "reference")
        expected = layer(x)
        assert expected.dtype == torch.bfloat16
        for kernel in ("auto", "xnor", "int8"):
            set_kernel(layer, kernel)
            assert torch.equal(layer(x), expected), kernel
    assert "xnor" in layer._kernel_layouts  # a kernel ran (the reference path builds no layout)


@needs_kernel
def test_kernel_scale_follows_the_layer_state():
    """The kernels' cached scale and bias (`kernel_vectors`) follow in-place changes, replaced tensors (a state
    dict load, a dtype cast) and the input dtype: every kernel call keeps the reference path's bits."""
    gen = torch.Generator().manual_seed(48)
    layer = packed_linear(96, 40, gen, input_scale=0.5)
    x = make_input((5, 96), gen)

    def check(inputs=x):
        with torch.no_grad():
            set_kernel(layer, "xnor")
            got = layer(inputs)
            set_kernel(layer, "reference")
            assert torch.equal(got, layer(inputs))
        return got

    first = check()
    with torch.no_grad():
        layer.weight_scale.mul_(3)
    second = check()
    assert not torch.equal(first, second)
    with torch.no_grad():
        layer.input_scale.fill_(0.25)
        layer.bias.add_(1)
    check()
    layer.load_state_dict({k: v.clone() * (2 if v.is_floating_point() else 1) for k, v in layer.state_dict().items()})
    check()
    if "avx512" in available_paths():
        check(x.bfloat16())
        layer.to(torch.bfloat16)
        check(x.bfloat16())


@pytest.mark.parametrize(
    "flags, expected",
    [
        (set(), None),
        ({"avx2", "avx512f"}, False),
        ({"avx2", "avx512_bf16"}, True),
        ({"amx_bf16"}, True),
        ({"fp", "asimd", "bf16"}, True),
    ],
)
def test_native_bf16_from_the_cpu_flags(monkeypatch, flags, expected):
    monkeypatch.setattr(cpu, "cpu_flags", lambda: frozenset(flags))
    assert cpu.has_native_bf16() is expected


@pytest.mark.parametrize("amx", [False, True])
def test_int8_without_amx_tiles_warns_it_is_slow(monkeypatch, amx):
    monkeypatch.setattr(int8, "amx_available", lambda: amx)
    layer = packed_linear(64, 8, torch.Generator().manual_seed(0))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert set_kernel(layer, "int8") == 1
        set_kernel(layer, "auto")
    messages = [str(w.message) for w in caught if "torch._int_mm" in str(w.message)]
    assert len(messages) == int(not amx) and (amx or "kernel='auto'" in messages[0])


def test_bf16_on_the_reference_path_warns_once(monkeypatch):
    from stompp_hf.nn import packed

    monkeypatch.setattr(packed, "_warned_bf16_fallback", False)
    monkeypatch.setattr(xnor, "paths", lambda: ("avx2", "scalar"))  # as on a CPU without AVX-512
    gen = torch.Generator().manual_seed(1)
    layer = packed_linear(64, 8, gen).to(torch.bfloat16)
    x = make_input((3, 64), gen).to(torch.bfloat16)
    with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = layer(x)
        assert torch.equal(layer(x), first)
        set_kernel(layer, "reference")  # asked for: no warning
        assert torch.equal(layer(x), first)
        layer.float()
        set_kernel(layer, "auto")
        layer(x.float())  # float32 on the kernels: no warning
    messages = [str(w.message) for w in caught if "bfloat16 inputs" in str(w.message)]
    assert len(messages) == 1 and "model.float()" in messages[0]
