"""The XNOR-popcount kernel against the dense torch reference: bit-identical outputs, validation, build cache;
its C source compiles without warnings, and the CPU-features helper reads this machine."""

from __future__ import annotations

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
from pathlib import Path

import pytest
import torch

from stompp_hf.core.packing import pack_signs
from stompp_hf.export import set_kernel
from stompp_hf.kernels import build, cpu, xnor
from stompp_hf.nn import BinaryLinear

from .testing_utils import reference

needs_kernel = pytest.mark.skipif(
    not xnor.is_available(), reason="XNOR kernel unavailable here (no working C compiler to build it)"
)

KS = (1, 7, 8, 9, 63, 64, 65, 100, 384, 1536)
NS = (1, 3, 64, 384)
MS = (1, 2, 5, 128)


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


@pytest.fixture
def every_path(monkeypatch):
    """Let even tiny problems use every thread they are given (so threaded splits are exercised)."""
    monkeypatch.setattr(xnor, "_MIN_WORK_PER_THREAD", 0)


@needs_kernel
@pytest.mark.parametrize("k", KS)
@pytest.mark.parametrize("simd_min_rows", [1, 10**9], ids=["simd", "scalar"])
def test_bit_identical_to_reference(k, simd_min_rows, every_path, monkeypatch):
    monkeypatch.setattr(xnor, "_SIMD_MIN_ROWS", simd_min_rows)
    gen = torch.Generator().manual_seed(1000 + k)
    variants = itertools.cycle([(False, False, 1), (True, False, 2), (False, True, 3), (True, True, 2)])
    for n, m in itertools.product(NS, MS):
        weight_packed, out_scale, bias = make_layer(n, k, gen)
        x = make_input((m, k), gen)
        with_scale, with_bias, threads = next(variants)
        s = out_scale if with_scale else None
        b = bias if with_bias else None
        y = xnor.xnor_linear(x, weight_packed, k, s, b, num_threads=threads)
        assert y.dtype == torch.float32 and y.shape == (m, n)
        assert torch.equal(y, reference(x, weight_packed, k, s, b)), (k, n, m, with_scale, with_bias, threads)


@needs_kernel
@pytest.mark.parametrize("threads", [1, 2, 3, 8])
@pytest.mark.parametrize("simd_min_rows", [1, 10**9], ids=["simd", "scalar"])
def test_threads_and_leading_dims(threads, simd_min_rows, every_path, monkeypatch):
    monkeypatch.setattr(xnor, "_SIMD_MIN_ROWS", simd_min_rows)
    gen = torch.Generator().manual_seed(7)
    for k, n in [(65, 3), (384, 64), (100, 1)]:  # 8 threads and 1 to 3 weight rows: more threads than work
        weight_packed, out_scale, bias = make_layer(n, k, gen)
        x = make_input((2, 3, k), gen)
        y = xnor.xnor_linear(x, weight_packed, k, out_scale, bias, num_threads=threads)
        assert y.shape == (2, 3, n)
        assert torch.equal(y, reference(x, weight_packed, k, out_scale, bias))
        x1 = make_input((k,), gen)  # no leading dims at all
        assert torch.equal(
            xnor.xnor_linear(x1, weight_packed, k, num_threads=threads), reference(x1, weight_packed, k)
        )


@needs_kernel
def test_large_batch_split_over_rows(every_path):
    """Many rows and few weight rows: the work is split over the activation rows."""
    gen = torch.Generator().manual_seed(3)
    weight_packed, out_scale, bias = make_layer(5, 130, gen)
    x = make_input((301, 130), gen)
    for threads in (1, 2, 3):
        y = xnor.xnor_linear(x, weight_packed, 130, out_scale, bias, num_threads=threads)
        assert torch.equal(y, reference(x, weight_packed, 130, out_scale, bias))


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
    if pid == 0:  # the child: the parent's pool threads do not exist here
        ok = xnor.xnor_linear(x, weight_packed, 200, out_scale, bias, num_threads=2).numpy().tobytes() == expected
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
@pytest.mark.parametrize("simd_min_rows", [1, 10**9], ids=["simd", "scalar"])
def test_padding_bits_of_weights_are_ignored(simd_min_rows, monkeypatch):
    """Set bits past in_features in the last byte must not count (the reference drops them too)."""
    monkeypatch.setattr(xnor, "_SIMD_MIN_ROWS", simd_min_rows)
    gen = torch.Generator().manual_seed(6)
    for k in (7, 63, 100):
        weight_packed, _, _ = make_layer(9, k, gen)
        dirty = weight_packed.clone()
        dirty[:, -1] |= torch.tensor(0xFF << (k % 8 or 8) & 0xFF, dtype=torch.uint8)
        x = make_input((3, k), gen)
        assert torch.equal(xnor.xnor_linear(x, dirty, k), reference(x, weight_packed, k))


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
def test_empty_batch():
    gen = torch.Generator().manual_seed(9)
    weight_packed, _, _ = make_layer(4, 20, gen)
    y = xnor.xnor_linear(torch.zeros(0, 20), weight_packed, 20)
    assert y.shape == (0, 4)


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
    source = build.read_source("xnor.c")
    assert source == (Path(xnor.__file__).parent / "xnor.c").read_text(encoding="utf-8")
    assert "int xnor_linear_f32(" in source


# -DXN_NO_SIMD: the scalar-only build of a CPU without AVX2; -march=x86-64: no AVX at all (the portable sign loop).
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
