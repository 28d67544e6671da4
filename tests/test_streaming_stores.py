"""Streaming (non-temporal) stores of the kernels' outputs (`xnor.set_stream_min_bytes`): with the threshold at 0
every output whose layout allows it is streamed, so each case below writes the same bits streamed and not, and the
dense path's bits. The shapes cover what decides the layout: rows of whole lines (16 float32 / 32 bf16 channels) or
not, a lone last panel, rows of a register tile or an AMX tile past the last real one, conv groups, channels-last
and NCHW outputs, one thread and two."""

from __future__ import annotations

import pytest
import torch

from stompp_hf.core.packing import pack_signs
from stompp_hf.kernels import bconv, int8, xnor

from .test_binary_conv import reference as conv_reference
from .test_xnor import bf16_reference, needs_amx, needs_avx2, needs_avx512
from .testing_utils import reference


@pytest.fixture
def stream_everything():
    """Stream every eligible output for the test's duration; yields a function that runs a call both ways."""
    previous = xnor.set_stream_min_bytes(0)

    def both(call):
        xnor.set_stream_min_bytes(0)
        streamed = call()
        xnor.set_stream_min_bytes(None)
        try:
            plain = call()
        finally:
            xnor.set_stream_min_bytes(0)
        return streamed, plain

    try:
        yield both
    finally:
        xnor.set_stream_min_bytes(previous)


def linear_case(m, k, n, seed):
    g = torch.Generator().manual_seed(seed)
    weight_packed = pack_signs(torch.rand(n, k, generator=g) < 0.5)
    x = torch.randn(m, k, generator=g)
    x[torch.rand(m, k, generator=g) < 0.1] = -0.0
    return x, weight_packed, torch.rand(n, generator=g) - 0.3, torch.randn(n, generator=g)


# rows: fewer than, equal to and past a register tile (8) / an AMX tile (32); outputs: 64 (whole lines in both
# dtypes), 48 (float32 lines, an odd bf16 panel count), 40 (a partial panel: never streamed)
LINEAR = [(5, 384, 64), (64, 96, 48), (77, 384, 64), (70, 200, 40), (33, 1024, 96)]


@needs_avx512
@pytest.mark.parametrize("kernel", ["xnor", pytest.param("amx", marks=needs_amx)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("shape", LINEAR, ids=lambda s: "x".join(map(str, s)))
def test_linear_streamed_outputs_are_the_same_bits(stream_everything, kernel, dtype, threads, shape):
    m, k, n = shape
    x, weight_packed, scale, bias = linear_case(m, k, n, seed=m + k + n)
    x = x.to(dtype)
    if dtype is torch.bfloat16:
        scale, bias = scale.bfloat16().float(), bias.bfloat16().float()
    if kernel == "amx":
        weight = int8.amx_weight(weight_packed, n, k)
        call = lambda: int8.amx_linear(x, weight, n, scale, bias, num_threads=threads)  # noqa: E731
    else:
        prepared = xnor.prepare_weights(weight_packed, n, k)
        call = lambda: xnor.xnor_linear(  # noqa: E731
            x, weight_packed, k, scale, bias, threads, path="avx512", prepared=prepared
        )
    streamed, plain = stream_everything(call)
    expected = (
        bf16_reference(x.float(), weight_packed, k, scale.bfloat16(), bias.bfloat16())
        if dtype is torch.bfloat16
        else reference(x, weight_packed, k, scale, bias)
    )
    assert torch.equal(streamed, plain)
    assert torch.equal(streamed, expected)


# outputs: 64 (whole lines, one panel of two groups), 48 (whole lines, a partial group), 40 (partial lines: never
# streamed), 96 (one whole panel), 112 (a whole panel and a lone partial group); rows: past whole tiles of 3 or not
AVX2_LINEAR = [(5, 384, 64), (64, 96, 48), (70, 200, 40), (33, 1024, 96), (4, 300, 112)]


@needs_avx2
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("shape", AVX2_LINEAR, ids=lambda s: "x".join(map(str, s)))
def test_avx2_linear_streamed_outputs_are_the_same_bits(stream_everything, threads, shape):
    m, k, n = shape
    x, weight_packed, scale, bias = linear_case(m, k, n, seed=m + k + n)
    call = lambda: xnor.xnor_linear(x, weight_packed, k, scale, bias, threads, path="avx2")  # noqa: E731
    streamed, plain = stream_everything(call)
    assert torch.equal(streamed, plain)
    assert torch.equal(streamed, reference(x, weight_packed, k, scale, bias))


# (batch, in channels, size, out channels, stride, groups)
CONV = [(2, 64, 9, 64, 1, 1), (3, 32, 8, 48, 2, 1), (2, 64, 7, 64, 1, 2), (1, 40, 6, 40, 1, 1), (2, 64, 5, 96, 1, 1)]


def conv_case(case, channels_last):
    """A seeded 3x3 conv of `case`: its weight shape, packed weights, scale, bias and float32 input."""
    b, c, size, o, _, groups = case
    g = torch.Generator().manual_seed(sum(case))
    shape = (o, c // groups, 3, 3)
    weight_packed = pack_signs(torch.rand(o, shape[1] * 9, generator=g) < 0.5)
    scale, bias = torch.rand(o, generator=g) - 0.3, torch.randn(o, generator=g)
    x = torch.randn(b, c, size, size, generator=g)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return shape, weight_packed, scale, bias, x


@needs_avx512
@pytest.mark.parametrize("kernel", ["xnor", pytest.param("amx", marks=needs_amx)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [True, False], ids=["channels-last", "nchw"])
@pytest.mark.parametrize("case", CONV, ids=lambda c: "-".join(map(str, c)))
def test_conv_streamed_outputs_are_the_same_bits(stream_everything, kernel, dtype, channels_last, case):
    b, c, size, o, stride, groups = case
    if kernel == "amx" and groups != 1:
        pytest.skip("the AMX convolution takes groups = 1")
    shape, weight_packed, scale, bias, x = conv_case(case, channels_last)
    x = x.to(dtype)
    if dtype is torch.bfloat16:
        scale, bias = scale.bfloat16().float(), bias.bfloat16().float()
    if kernel == "amx":
        weight = int8.amx_weight(weight_packed, o, c, 9)
        call = lambda: int8.amx_conv2d(x, weight, shape, stride, 1, 1, scale, bias)  # noqa: E731
    else:
        prepared = bconv.prepare_conv2d(weight_packed, shape, groups)
        call = lambda: bconv.binary_conv2d(  # noqa: E731
            x, weight_packed, shape, stride, 1, 1, groups, scale, bias, path="avx512", prepared=prepared
        )
    streamed, plain = stream_everything(call)
    assert torch.equal(streamed, plain)
    if dtype is torch.float32:
        assert torch.equal(streamed, conv_reference(x, weight_packed, shape, stride, 1, 1, groups, scale, bias))


# the avx2 table path streams channels-last outputs whose groups are whole quads of 64 channels (the last two)
AVX2_CONV = [*CONV, (2, 64, 7, 128, 1, 2), (1, 128, 6, 128, 2, 1)]


@needs_avx2
@pytest.mark.parametrize("channels_last", [True, False], ids=["channels-last", "nchw"])
@pytest.mark.parametrize("case", AVX2_CONV, ids=lambda c: "-".join(map(str, c)))
def test_avx2_conv_streamed_outputs_are_the_same_bits(stream_everything, channels_last, case):
    *_, stride, groups = case
    shape, weight_packed, scale, bias, x = conv_case(case, channels_last)
    for s, bb in ((scale, bias), (None, None)):
        call = lambda s=s, bb=bb: bconv.binary_conv2d(  # noqa: E731
            x, weight_packed, shape, stride, 1, 1, groups, s, bb, path="avx2"
        )
        streamed, plain = stream_everything(call)
        expected = conv_reference(x, weight_packed, shape, stride, 1, 1, groups, s, bb)
        assert torch.equal(streamed.view(torch.int32), plain.view(torch.int32))
        assert torch.equal(streamed, expected)


@needs_avx512
def test_set_stream_min_bytes_returns_the_previous_setting_and_checks_its_argument():
    previous = xnor.set_stream_min_bytes(1 << 20)
    try:
        assert xnor.set_stream_min_bytes(None) == 1 << 20
        assert xnor.set_stream_min_bytes(0) is None
        assert xnor.set_stream_min_bytes(5) == 0
        for bad in (-1, 1.5, True, "4"):
            with pytest.raises(TypeError, match="non-negative int or None"):
                xnor.set_stream_min_bytes(bad)
    finally:
        xnor.set_stream_min_bytes(previous)
