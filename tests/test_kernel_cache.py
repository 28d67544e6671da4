"""The kernel cache loads nothing that someone else could have written, or that is not whole: planted, truncated and
corrupt libraries are rebuilt (never mapped), unsafe cache directories are stepped around; NaN inputs to the XNOR
kernel are an error. Loads that could run foreign code or crash run in a subprocess."""

from __future__ import annotations

import math
import os
import stat
import subprocess
import tempfile
import warnings
from pathlib import Path

import pytest
import torch

from stompp_hf.core.packing import pack_signs
from stompp_hf.kernels import build, xnor

from .testing_utils import kernel_path, loaded_from, needs_cc, plant, reference, run_check

needs_kernel = pytest.mark.skipif(not xnor.is_available(), reason="XNOR kernel unavailable here")


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
