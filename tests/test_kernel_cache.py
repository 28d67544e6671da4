"""The kernel cache loads nothing that someone else could have written, or that is not whole: planted, truncated and
corrupt libraries are rebuilt (never mapped), unsafe cache directories are stepped around; NaN inputs to the XNOR
kernel are an error. Loads that could run foreign code or crash run in a subprocess."""

from __future__ import annotations

import ctypes
import math
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from stompp_hf.core.packing import pack_signs, unpack_signs
from stompp_hf.kernels import build, xnor

needs_cc = pytest.mark.skipif(
    not build.compiler() or shutil.which(build.compiler()[0]) is None,
    reason=f"no C compiler found ({os.environ.get('CC') or 'cc'})",
)
needs_kernel = pytest.mark.skipif(not xnor.is_available(), reason="XNOR kernel unavailable here")

# A library with the kernel's name and symbol that announces itself when loaded and computes garbage.
PLANTED_C = r"""
#include <stdint.h>
#include <stdio.h>
__attribute__((constructor)) static void planted(void)
{
    FILE *f = fopen(MARKER, "w");
    if (f) { fputs("the planted library ran\n", f); fclose(f); }
}
int xnor_linear_f32(const float *x, int64_t M, int64_t ldx, int64_t K, const void *w, int64_t N,
                    const float *scale, const float *bias, float *y, int nthreads, int64_t min_work, int64_t simd)
{
    for (int64_t i = 0; i < M * N; i++) y[i] = 42.0f;
    return 0;
}
"""

# Loads the kernel in a fresh process, compares it with the dense formula, and prints the library it loaded.
CHECK_PY = r"""
import torch
import torch.nn.functional as F
from stompp_hf.core.packing import pack_signs
from stompp_hf.kernels import xnor

gen = torch.Generator().manual_seed(0)
for m in (1, 16):  # the scalar and the AVX2 path
    x = torch.randn(m, 100, generator=gen)
    w = torch.rand(24, 100, generator=gen) < 0.5
    scale, bias = torch.rand(24, generator=gen), torch.randn(24, generator=gen)
    expected = F.linear(torch.where(x >= 0, 1.0, -1.0), w.float() * 2 - 1) * scale + bias
    y = xnor.xnor_linear(x, pack_signs(w), 100, scale, bias)
    assert torch.equal(y, expected), "wrong results"
print(xnor._kernel_path)
"""


def reference(x, weight_packed, in_features, out_scale=None, bias=None):
    y = F.linear(torch.where(x >= 0, 1.0, -1.0), unpack_signs(weight_packed, in_features).float() * 2 - 1)
    if out_scale is not None:
        y = y * out_scale
    return y if bias is None else y + bias


def kernel_path(directory: Path) -> Path:
    """Where `load_kernel` looks for the XNOR library in `directory`."""
    return build.library_path("xnor", build.read_source("xnor.c"), build._resolved_compiler(), directory)


def run_check(cache: Path, tmp_path: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "STOMPP_HF_KERNEL_CACHE": str(cache), "XDG_CACHE_HOME": str(tmp_path / "xdg")}
    return subprocess.run(
        [sys.executable, "-c", CHECK_PY], env=env, capture_output=True, text=True, timeout=300, check=False
    )


def loaded_from(proc: subprocess.CompletedProcess) -> Path:
    assert proc.returncode == 0, f"exit status {proc.returncode}\n{proc.stderr[-3000:]}"
    return Path(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def sealed_library(tmp_path_factory) -> bytes:
    """The bytes of a real XNOR library as the build publishes it (digest appended)."""
    if not build.compiler() or shutil.which(build.compiler()[0]) is None:
        pytest.skip("no C compiler")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("STOMPP_HF_KERNEL_CACHE", str(tmp_path_factory.mktemp("built")))
        _, path = build.load_kernel("xnor.c", "xnor_linear_f32", xnor._ARGTYPES, ctypes.c_int)
    return path.read_bytes()


def plant(path: Path, tmp_path: Path, marker: Path, seal: bool = False) -> None:
    """Compile the planted library into `path` (with a valid digest if `seal`), after checking that loading it
    does run its constructor."""
    lib = tmp_path / "planted.so"
    cmd = [*build._resolved_compiler(), "-shared", "-fPIC", f'-DMARKER="{marker}"', "-x", "c", "-", "-o", str(lib)]
    subprocess.run(cmd, input=PLANTED_C, text=True, check=True, capture_output=True, timeout=120)
    subprocess.run([sys.executable, "-c", f"import ctypes; ctypes.CDLL({str(lib)!r})"], check=True, timeout=60)
    assert marker.exists()
    marker.unlink()
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    shutil.copyfile(lib, path)
    if seal:
        build._seal(str(path))
    os.chmod(path, 0o700)


@pytest.fixture
def fresh_kernel_state(monkeypatch):
    """Drop the loaded kernel for one test, and restore the real one (via a fresh load) afterwards."""
    xnor._reset_for_tests()
    yield monkeypatch
    monkeypatch.undo()
    xnor._reset_for_tests()
    assert xnor.is_available()


@needs_cc
def test_planted_library_never_runs(tmp_path, monkeypatch):
    cache = tmp_path / "kernels"
    monkeypatch.setenv("STOMPP_HF_KERNEL_CACHE", str(cache))
    path = build.library_path("xnor", build.read_source("xnor.c"), build._resolved_compiler())
    marker = tmp_path / "constructor-ran"
    plant(path, tmp_path, marker)
    assert loaded_from(run_check(cache, tmp_path)) == path
    assert not marker.exists(), "the planted library's constructor ran in the loading process"
    assert build._library_problem(path) is None  # replaced by a real build


@needs_cc
def test_truncated_library_is_rebuilt_not_mapped(tmp_path, sealed_library):
    cache = tmp_path / "kernels"
    cache.mkdir(mode=0o700)
    path = kernel_path(cache)
    path.write_bytes(sealed_library[: len(sealed_library) // 2])
    os.chmod(path, 0o700)
    proc = run_check(cache, tmp_path)
    assert proc.returncode != -signal.SIGBUS, "loading the truncated library died with SIGBUS"
    assert loaded_from(proc) == path
    assert build._library_problem(path) is None and path.stat().st_size == len(sealed_library)


@needs_cc
@pytest.mark.parametrize("mode", [0o777, 0o770, 0o722], ids=oct)
def test_unsafe_cache_dir_is_stepped_around(mode, tmp_path):
    """Even a library with a valid digest is not loaded from a directory that others can write."""
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, mode)
    path = kernel_path(shared)
    marker = tmp_path / "constructor-ran"
    plant(path, tmp_path, marker, seal=True)
    proc = run_check(shared, tmp_path)
    used = loaded_from(proc)
    assert not marker.exists(), "the planted library's constructor ran in the loading process"
    assert used == kernel_path(tmp_path / "xdg" / "stompp_hf" / "kernels")  # the default location, made private
    assert stat.S_IMODE(used.parent.stat().st_mode) == 0o700
    assert stat.S_IMODE((tmp_path / "xdg" / "stompp_hf").stat().st_mode) == 0o700  # created parents too
    assert proc.stderr.count("does not use the kernel cache") == 1
    assert f"{shared} (it is writable by group or others (mode {mode:#o}))" in proc.stderr
    assert sorted(p.name for p in shared.iterdir()) == [path.name]  # nothing built there either


def test_private_cache_dir_fallbacks(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    own = tmp_path / "own"
    monkeypatch.setenv("STOMPP_HF_KERNEL_CACHE", str(own / "kernels"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert build.private_cache_dir() == own / "kernels"  # created, mode 0o700, no warning
    assert stat.S_IMODE(own.stat().st_mode) == stat.S_IMODE((own / "kernels").stat().st_mode) == 0o700
    assert not (tmp_path / "xdg").exists()

    os.chmod(own / "kernels", 0o757)
    with pytest.warns(
        RuntimeWarning, match=r"mode 0o757\)\): another user .* Using .*xdg/stompp_hf/kernels instead"
    ) as rec:
        assert build.private_cache_dir() == tmp_path / "xdg" / "stompp_hf" / "kernels"
    assert len(rec) == 1

    monkeypatch.delenv("STOMPP_HF_KERNEL_CACHE")  # the default location itself unsafe: a private temp directory
    os.chmod(tmp_path / "xdg" / "stompp_hf" / "kernels", 0o775)
    with pytest.warns(RuntimeWarning, match="xdg/stompp_hf/kernels .*mode 0o775") as rec:
        used = build.private_cache_dir()
    assert used == tmp_path / "tmp" / f"stompp_hf-kernels-{os.getuid()}" and len(rec) == 1
    assert stat.S_IMODE(used.stat().st_mode) == 0o700


def test_foreign_owned_cache_dir_is_stepped_around(tmp_path, monkeypatch):
    foreign = tmp_path / "foreign"
    foreign.mkdir(mode=0o700)
    monkeypatch.setenv("STOMPP_HF_KERNEL_CACHE", str(foreign))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    real_stat = os.stat

    def stat_owned_by_someone_else(path, *args, **kwargs):
        st = real_stat(path, *args, **kwargs)
        if not isinstance(path, (str, os.PathLike)) or Path(path) != foreign:
            return st
        fields = list(st[:10])
        fields[stat.ST_UID] = st.st_uid + 1
        return os.stat_result(fields)

    monkeypatch.setattr(os, "stat", stat_owned_by_someone_else)
    uid = os.getuid()
    with pytest.warns(RuntimeWarning, match=rf"it is owned by uid {uid + 1}, not by this user \(uid {uid}\)"):
        assert build.private_cache_dir() == tmp_path / "xdg" / "stompp_hf" / "kernels"


def test_no_private_cache_dir_is_unavailable(tmp_path, monkeypatch, fresh_kernel_state):
    """Every candidate owned by someone else (as for a process whose uid owns none of them): nothing is loaded."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    monkeypatch.setenv("STOMPP_HF_KERNEL_CACHE", str(tmp_path / "kernels"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    fake_uid = os.getuid() + 4242
    monkeypatch.setattr(os, "getuid", lambda: fake_uid)
    with pytest.raises(xnor.XnorUnavailable, match=rf"not by this user \(uid {fake_uid}\)") as info:
        xnor.xnor_linear(torch.zeros(1, 8), torch.zeros(1, 1, dtype=torch.uint8), 8)
    assert "STOMPP_HF_KERNEL_CACHE" in str(info.value) and str(tmp_path / "kernels") in str(info.value)
    assert not xnor.is_available()


@needs_cc
def test_library_file_checks(tmp_path, sealed_library, monkeypatch):
    cache = tmp_path / "kernels"
    cache.mkdir(mode=0o700)
    path = cache / "lib.so"
    assert build._library_problem(path) == "it is missing"
    path.write_bytes(sealed_library)
    os.chmod(path, 0o700)
    assert build._library_problem(path) is None
    os.chmod(path, 0o720)
    assert "writable by group or others (mode 0o720)" in build._library_problem(path)
    os.chmod(path, 0o700)
    flipped = bytearray(sealed_library)
    flipped[len(flipped) // 3] ^= 0x10
    path.write_bytes(bytes(flipped))  # the same size, one bit off
    assert "digest" in build._library_problem(path)
    path.write_bytes(sealed_library[:-1])
    assert "digest" in build._library_problem(path)
    path.write_bytes(b"")
    assert "digest" in build._library_problem(path)

    path.unlink()
    real = tmp_path / "real.so"
    real.write_bytes(sealed_library)
    os.chmod(real, 0o700)
    path.symlink_to(real)
    assert build._library_problem(path) == "it is a symbolic link"
    path.unlink()
    os.mkfifo(path, 0o600)  # opening it must not block
    assert build._library_problem(path) == "it is not a regular file"
    path.unlink()

    path.write_bytes(sealed_library)
    os.chmod(path, 0o700)
    real_fstat = os.fstat

    def fstat_owned_by_someone_else(fd):
        fields = list(real_fstat(fd)[:10])
        fields[stat.ST_UID] += 1
        return os.stat_result(fields)

    monkeypatch.setattr(os, "fstat", fstat_owned_by_someone_else)
    assert "owned by uid" in build._library_problem(path)


@needs_cc
@pytest.mark.parametrize("damage", ["elf-header", "no-symbol"])
def test_library_that_fails_to_load_is_rebuilt(damage, tmp_path, sealed_library, fresh_kernel_state):
    """A whole library (its digest matches) that still does not load is rebuilt once, in the same process."""
    cache = tmp_path / "kernels"
    fresh_kernel_state.setenv("STOMPP_HF_KERNEL_CACHE", str(cache))
    cache.mkdir(mode=0o700)
    path = kernel_path(cache)
    if damage == "elf-header":  # the right size, not loadable
        path.write_bytes(b"\0\0\0\0" + sealed_library[4 : -build._TRAILER_BYTES])
    else:
        source = "int not_the_kernel(void) { return 0; }"
        cmd = [*build._resolved_compiler(), "-shared", "-fPIC", "-x", "c", "-", "-o", str(path)]
        subprocess.run(cmd, input=source, text=True, check=True, capture_output=True, timeout=120)
    build._seal(str(path))
    assert build._library_problem(path) is None
    assert xnor.is_available()
    assert xnor._kernel_path == path and build._library_problem(path) is None
    assert path.read_bytes()[:4] == b"\x7fELF" and path.stat().st_size == len(sealed_library)
    x = torch.randn(5, 70)
    weight_packed = pack_signs(torch.randn(9, 70) >= 0)
    assert torch.equal(xnor.xnor_linear(x, weight_packed, 70), reference(x, weight_packed, 70))


@needs_cc
def test_build_that_does_not_load_is_not_published(tmp_path, fresh_kernel_state):
    cache = tmp_path / "kernels"
    fresh_kernel_state.setenv("STOMPP_HF_KERNEL_CACHE", str(cache))
    fresh_kernel_state.setenv("CC", "cc -Dxnor_linear_f32=renamed_entry_point")
    with pytest.raises(xnor.XnorUnavailable, match="freshly built kernel does not load"):
        xnor.xnor_linear(torch.zeros(1, 8), torch.zeros(1, 1, dtype=torch.uint8), 8)
    assert list(cache.iterdir()) == []


@needs_kernel
@pytest.mark.parametrize("simd_min_rows", [1, 10**9], ids=["simd", "scalar"])
@pytest.mark.parametrize("threads", [1, 2])
def test_nan_input_raises(simd_min_rows, threads, monkeypatch):
    monkeypatch.setattr(xnor, "_SIMD_MIN_ROWS", simd_min_rows)
    monkeypatch.setattr(xnor, "_MIN_WORK_PER_THREAD", 0)
    gen = torch.Generator().manual_seed(0)
    weight_packed = pack_signs(torch.rand(16, 70, generator=gen) < 0.5)
    scale, bias = torch.rand(16, generator=gen), torch.randn(16, generator=gen)
    for m, row, col in [(1, 0, 3), (1, 0, 69), (2, 1, 0), (64, 63, 64), (64, 0, 10), (7, 6, 69)]:
        x = torch.randn(m, 70, generator=gen)
        x[row, col] = math.nan
        with pytest.raises(ValueError, match=rf"shape \({m}, 70\) with NaN values"):
            xnor.xnor_linear(x, weight_packed, 70, scale, bias, num_threads=threads)
        x[row, col] = -math.inf if col % 2 else math.inf  # infinities have a sign
        y = xnor.xnor_linear(x, weight_packed, 70, scale, bias, num_threads=threads)
        assert torch.equal(y, reference(x, weight_packed, 70, scale, bias))
    x = torch.full((3, 4, 70), math.nan)
    with pytest.raises(ValueError, match=r"shape \(3, 4, 70\) with NaN values"):
        xnor.xnor_linear(x, weight_packed, 70, num_threads=threads)


@needs_kernel
def test_nan_outside_the_rows_is_not_read():
    """NaN between the rows of a strided input is not part of x."""
    gen = torch.Generator().manual_seed(1)
    weight_packed = pack_signs(torch.rand(8, 96, generator=gen) < 0.5)
    wide = torch.randn(6, 200, generator=gen)
    wide[:, :10] = math.nan
    wide[:, 106:] = math.nan
    x = wide[:, 10:106]
    assert torch.equal(xnor.xnor_linear(x, weight_packed, 96), reference(x, weight_packed, 96))
