"""The binary convolution kernel (`stompp_hf.kernels.bconv`) against the dense torch path, bit for bit: the strides,
dilations, groups and kernel sizes of timm ResNets, MobileNetV2 and Bi-Real Net, zero padding (the correction of
the -1 border), channels-last or not, every forced path; `BinaryConv2d`'s dispatch, including the weights-only
layer of the paper's BNN that reads a `BinaryActivation`'s +-1 output."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from stompp_hf.core.packing import pack_signs, unpack_signs
from stompp_hf.export import set_kernel
from stompp_hf.kernels import bconv, int8, xnor
from stompp_hf.nn import BinaryConv2d
from stompp_hf.nn.activation import BinaryActivation

needs_kernel = pytest.mark.skipif(not xnor.is_available(), reason="XNOR kernel unavailable here")

PATH_PARAMS = [
    pytest.param(
        p,
        marks=pytest.mark.skipif(
            not xnor.is_available() or p not in bconv.conv_paths(), reason=f"no {p} conv path on this CPU"
        ),
    )
    for p in bconv.CONV_PATHS
]

# (batch, in channels, height, width, out channels, kernel, stride, padding, dilation, groups): what the supported
# architectures use, plus odd sizes (channels not multiples of 16 / 32, maps of 1 pixel, padding wider than reach)
CASES = {
    "resnet 3x3": (2, 64, 8, 8, 64, 3, 1, 1, 1, 1),
    "resnet 3x3 stride 2": (2, 64, 9, 7, 128, 3, 2, 1, 1, 1),
    "resnet 1x1 bottleneck": (3, 40, 5, 6, 24, 1, 1, 0, 1, 1),
    "stem 7x7 stride 2": (2, 3, 11, 13, 17, 7, 2, 3, 1, 1),
    "dilated (output stride 8)": (1, 33, 9, 9, 20, 3, 1, 2, 2, 1),
    "dilated stride 3": (2, 16, 17, 19, 16, 5, 3, 4, 2, 2),
    "mobilenet depthwise": (2, 16, 6, 6, 16, 3, 1, 1, 1, 16),
    "mobilenet depthwise stride 2": (1, 32, 7, 5, 32, 3, 2, 1, 1, 32),
    "grouped": (2, 8, 5, 6, 12, 3, 1, 1, 1, 4),
    "bi-real 3x3, 1 pixel maps": (4, 64, 1, 1, 96, 3, 1, 1, 1, 1),
    "wide channels": (1, 520, 4, 4, 33, 3, 1, 1, 1, 1),
    "padding past the kernel's reach": (1, 5, 3, 3, 7, 3, 1, 3, 1, 1),
    "rectangular kernel": (2, 24, 6, 9, 8, (1, 3), (1, 2), (0, 1), 1, 1),
    # the avx2 path's table tiles (64 channels of a group, two halves of 32): one half, one and a half, groups of 64
    "32 outputs, 1x1": (2, 70, 3, 5, 32, 1, 1, 0, 1, 1),
    "48 outputs, stride 2": (3, 64, 7, 6, 48, 3, 2, 1, 1, 1),
    "groups of 64 outputs": (1, 64, 5, 5, 128, 3, 1, 1, 1, 2),
}


def reference(x, weight_packed, shape, stride, padding, dilation, groups, scale, bias):
    """The dense formula the kernel must match bit for bit."""
    sx = torch.where(x >= 0, 1.0, -1.0)
    sw = unpack_signs(weight_packed, math.prod(shape[1:]), torch.float32).reshape(shape)
    y = F.conv2d(sx, sw, None, stride, padding, dilation, groups)
    if scale is not None:
        y = y * scale.view(-1, 1, 1)
    if bias is not None:
        y = y + bias.view(-1, 1, 1)
    return y


def make_input(shape, gen):
    """Normal values with exact zeros and negative zeros mixed in (both count +1)."""
    x = torch.randn(shape, generator=gen)
    kind = torch.randint(0, 6, shape, generator=gen)
    x = torch.where(kind == 0, torch.zeros_like(x), x)
    return torch.where(kind == 1, torch.full_like(x, -0.0), x)


def make_case(case, gen):
    b, c, h, w, o, k, stride, padding, dilation, groups = case
    kh, kw = (k, k) if isinstance(k, int) else k
    shape = (o, c // groups, kh, kw)
    weight_packed = pack_signs(torch.rand(o, math.prod(shape[1:]), generator=gen) < 0.5)
    scale = torch.rand(o, generator=gen) - 0.3
    bias = torch.randn(o, generator=gen)
    return make_input((b, c, h, w), gen), weight_packed, shape, (stride, padding, dilation, groups), scale, bias


@needs_kernel
@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("path", PATH_PARAMS)
def test_bit_identical_to_reference(name, path, monkeypatch):
    monkeypatch.setattr(bconv, "_MIN_WORK_PER_THREAD", 0)  # small problems split over threads too
    gen = torch.Generator().manual_seed(sum(map(ord, name)))
    x, weight_packed, shape, geometry, scale, bias = make_case(CASES[name], gen)
    prepared = bconv.prepare_conv2d(weight_packed, shape, geometry[-1])
    for s, b, threads in [(None, None, 1), (scale, bias, 2), (scale, None, 3), (None, bias, 2)]:
        expected = reference(x, weight_packed, shape, *geometry, s, b)
        for channels_last in (False, True):
            xi = x.contiguous(memory_format=torch.channels_last) if channels_last else x
            y = bconv.binary_conv2d(
                xi, weight_packed, shape, *geometry, s, b, num_threads=threads, path=path, prepared=prepared
            )
            assert torch.equal(y, expected), (name, channels_last, threads, s is not None, b is not None)
            if channels_last and y.shape[2] * y.shape[3] > 1:
                assert y.is_contiguous(memory_format=torch.channels_last)  # the input's memory format
            elif not channels_last:
                assert y.is_contiguous()


@needs_kernel
@pytest.mark.parametrize("runtime", xnor.THREAD_RUNTIMES)
def test_both_thread_runtimes_are_bit_identical(runtime, fresh_kernel_state, monkeypatch):
    """The convolution on torch's OpenMP threads and on the kernel's own pool (`STOMPP_HF_KERNEL_THREADS`)."""
    if runtime == "openmp" and xnor._openmp_symbols() is None:
        pytest.skip("torch does not run on GNU OpenMP here")
    fresh_kernel_state.setenv("STOMPP_HF_KERNEL_THREADS", runtime)
    monkeypatch.setattr(bconv, "_MIN_WORK_PER_THREAD", 0)
    assert xnor.thread_runtime() == runtime
    gen = torch.Generator().manual_seed(31)
    for name in ("resnet 3x3 stride 2", "grouped", "dilated stride 3"):
        x, weight_packed, shape, geometry, scale, bias = make_case(CASES[name], gen)
        expected = reference(x, weight_packed, shape, *geometry, scale, bias)
        for path in bconv.conv_paths():
            for threads in (2, 3, 5):
                y = bconv.binary_conv2d(
                    x, weight_packed, shape, *geometry, scale, bias, num_threads=threads, path=path
                )
                assert torch.equal(y, expected), (runtime, name, path, threads)


@needs_kernel
@pytest.mark.parametrize("path", PATH_PARAMS)
@pytest.mark.parametrize("name", ["resnet 3x3 stride 2", "dilated stride 3", "stem 7x7 stride 2"])
def test_whole_images_per_thread_and_shared_batches_agree(name, path, monkeypatch):
    """Batches of 1 to 9 images on 1 to 3 threads: the avx512 path gives whole images to threads where the batch
    shares out evenly enough and shares the packed batch otherwise; every split gives the reference's bits, and a
    NaN in the last image (packed after the others were computed) still raises."""
    monkeypatch.setattr(bconv, "_MIN_WORK_PER_THREAD", 0)  # small layers too run on every thread asked for
    gen = torch.Generator().manual_seed(11)
    case = CASES[name]
    for batch in (1, 2, 3, 4, 5, 8, 9):
        x, weight_packed, shape, geometry, scale, bias = make_case((batch, *case[1:]), gen)
        expected = reference(x, weight_packed, shape, *geometry, scale, bias)
        for channels_last in (False, True):
            xc = x.contiguous(memory_format=torch.channels_last) if channels_last else x
            for threads in (1, 2, 3):
                y = bconv.binary_conv2d(
                    xc, weight_packed, shape, *geometry, scale, bias, num_threads=threads, path=path
                )
                assert torch.equal(y, expected), (batch, channels_last, threads)
        nan = x.clone()
        nan[-1, 0, -1, -1] = math.nan
        with pytest.raises(ValueError, match="NaN"):
            bconv.binary_conv2d(nan, weight_packed, shape, *geometry, scale, bias, num_threads=2, path=path)


@pytest.mark.skipif(not xnor.is_available() or "avx512" not in bconv.conv_paths(), reason="no avx512 conv path")
def test_bf16_special_values():
    """bfloat16 channels-last inputs of zeros of both signs, subnormals, infinities and the largest values count as
    `x >= 0` says (the reference's sums, rounded to bf16, times a bf16 scale, plus a bf16 bias, each rounded); any
    NaN pattern raises; strict takes exactly +-1."""
    gen = torch.Generator().manual_seed(15)
    patterns = (0x0000, 0x8000, 0x0001, 0x8001, 0x0080, 0x8080, 0x3F80, 0xBF80, 0x7F7F, 0xFF7F, 0x7F80, 0xFF80)
    values = torch.tensor(patterns, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)
    for c in (40, 64):  # a partial and a whole second channel word
        x, weight_packed, shape, geometry, scale, bias = make_case((3, c, 6, 7, 24, 3, 1, 1, 1, 1), gen)
        x = values[torch.randint(0, len(values), x.shape, generator=gen)].contiguous(memory_format=torch.channels_last)
        s, b = scale.bfloat16(), bias.bfloat16()
        y = bconv.binary_conv2d(x, weight_packed, shape, *geometry, s.float(), b.float())
        sums = reference(x.float(), weight_packed, shape, *geometry, None, None).bfloat16()
        assert torch.equal(y, sums * s.view(-1, 1, 1) + b.view(-1, 1, 1))
        for nan in (0x7FC0, 0xFFC0, 0x7F81):
            bad = x.clone()
            bad[2, c - 1, 5, 6] = torch.tensor(nan, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)
            with pytest.raises(ValueError, match="NaN"):
                bconv.binary_conv2d(bad, weight_packed, shape, *geometry, s.float(), b.float())
        pm1 = torch.where(x >= 0, 1.0, -1.0).bfloat16().contiguous(memory_format=torch.channels_last)
        y = bconv.binary_conv2d(pm1, weight_packed, shape, *geometry, strict=True)
        assert torch.equal(y, reference(pm1.float(), weight_packed, shape, *geometry, None, None).bfloat16())
        bad = pm1.clone()
        bad[1, 0, 0, 0] = -0.0
        with pytest.raises(xnor.InputNotBinary):
            bconv.binary_conv2d(bad, weight_packed, shape, *geometry, strict=True)


@needs_kernel
def test_non_contiguous_input_and_unprepared_weights():
    gen = torch.Generator().manual_seed(3)
    x, weight_packed, shape, geometry, scale, bias = make_case(CASES["resnet 3x3"], gen)
    wide = torch.cat([x, x], dim=3)[..., ::2]  # width stride 2: copied
    expected = reference(wide, weight_packed, shape, *geometry, scale, bias)
    assert torch.equal(bconv.binary_conv2d(wide, weight_packed, shape, *geometry, scale, bias), expected)


@needs_kernel
@pytest.mark.parametrize("path", PATH_PARAMS)
def test_nan_and_strict_inputs(path):
    gen = torch.Generator().manual_seed(4)
    for channels_last in (False, True):
        x, weight_packed, shape, geometry, scale, bias = make_case(CASES["resnet 3x3 stride 2"], gen)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        nan = x.clone()
        nan[1, 63, 8, 6] = math.nan
        with pytest.raises(ValueError, match="NaN"):
            bconv.binary_conv2d(nan, weight_packed, shape, *geometry, scale, bias, path=path)
        signs = torch.where(x >= 0, 1.0, -1.0)
        y = bconv.binary_conv2d(signs, weight_packed, shape, *geometry, scale, bias, path=path, strict=True)
        assert torch.equal(y, reference(signs, weight_packed, shape, *geometry, scale, bias))
        for bad in (0.0, 0.25, math.nan):
            signs2 = signs.clone()
            signs2[0, 5, 2, 3] = bad
            with pytest.raises(xnor.InputNotBinary):
                bconv.binary_conv2d(signs2, weight_packed, shape, *geometry, scale, bias, path=path, strict=True)


@needs_kernel
@pytest.mark.parametrize("path", PATH_PARAMS)
def test_bad_values_anywhere_in_a_wide_row(path):
    """A NaN (or, strict, a value other than +-1) at each place the packers read in their own way: inside a full
    vector of pixels (NCHW: 8 or 16 pixels per comparison) or in the row's tail, in a full channel word or in the
    last partial one (40 channels: 32 + 8)."""
    gen = torch.Generator().manual_seed(8)
    x, weight_packed, shape, geometry, scale, bias = make_case((2, 40, 5, 19, 16, 3, 1, 1, 1, 1), gen)
    signs = torch.where(x >= 0, 1.0, -1.0)
    for channels_last in (False, True):
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        y = bconv.binary_conv2d(
            signs.contiguous(memory_format=fmt), weight_packed, shape, *geometry, path=path, strict=True
        )
        assert torch.equal(y, reference(signs, weight_packed, shape, *geometry, None, None))
        for c, w in ((5, 2), (35, 9), (12, 17), (39, 18)):
            nan = x.clone()
            nan[1, c, 3, w] = math.nan
            with pytest.raises(ValueError, match="NaN"):
                bconv.binary_conv2d(nan.contiguous(memory_format=fmt), weight_packed, shape, *geometry, path=path)
            for bad in (0.5, -0.0, math.inf):
                off = signs.clone()
                off[1, c, 3, w] = bad
                with pytest.raises(xnor.InputNotBinary):
                    bconv.binary_conv2d(
                        off.contiguous(memory_format=fmt), weight_packed, shape, *geometry, path=path, strict=True
                    )


@needs_kernel
def test_input_validation():
    gen = torch.Generator().manual_seed(5)
    x, weight_packed, shape, geometry, _, _ = make_case(CASES["resnet 3x3"], gen)
    with pytest.raises(ValueError, match="4-D float32"):
        bconv.binary_conv2d(x.double(), weight_packed, shape, *geometry)
    with pytest.raises(ValueError, match="weight_shape"):
        bconv.binary_conv2d(x, weight_packed, (64, 32, 3, 3), *geometry)
    with pytest.raises(ValueError, match="weight_packed"):
        bconv.binary_conv2d(x, weight_packed[:, :-1], shape, *geometry)
    with pytest.raises(ValueError, match="does not fit"):
        bconv.binary_conv2d(x[..., :1, :1], weight_packed, shape, 1, 0, 1, 1)
    with pytest.raises(ValueError, match="inference-only"):
        bconv.binary_conv2d(x.clone().requires_grad_(), weight_packed, shape, *geometry)
    with pytest.raises(ValueError, match="`prepared` must be"):
        bconv.binary_conv2d(x, weight_packed, shape, *geometry, prepared=torch.zeros(8, dtype=torch.uint8))
    if "avx2" in xnor.paths():  # bfloat16 inputs need the avx512 path
        with pytest.raises(ValueError, match="path"):
            bconv.binary_conv2d(x.bfloat16(), weight_packed, shape, *geometry, path="avx2")


# ---------------------------------------------------------------------------------------------------------------
# BinaryConv2d


def make_layer(gen, binary_inputs=True, **conv):
    conv = {"in_channels": 32, "out_channels": 48, "kernel_size": 3, "padding": 1, **conv}
    layer = BinaryConv2d(**conv, binary_inputs=binary_inputs)
    with torch.no_grad():
        k = math.prod(layer.weight_shape[1:])
        layer.weight.copy_(pack_signs(torch.rand(layer.weight.shape[0], k, generator=gen) < 0.5))
        layer.weight_scale.uniform_(0.1, 1.0, generator=gen)
        if layer.bias is not None:
            layer.bias.normal_(generator=gen)
        if layer.input_scale is not None:
            layer.input_scale.fill_(0.7)
    return layer.eval()


def outputs_by_kernel(layer, x):
    out = {}
    with torch.no_grad():
        for kernel in ("reference", "auto", "xnor", "int8"):
            set_kernel(layer, kernel)
            out[kernel] = layer(x)
    return out


@needs_kernel
@pytest.mark.parametrize(
    "conv",
    [
        {},
        {"stride": 2},
        {"padding": "same", "dilation": 2},
        {"padding": 2, "padding_mode": "reflect"},
        {"padding": 1, "padding_mode": "circular", "bias": False},
        {"kernel_size": 1, "padding": 0, "groups": 4},
    ],
    ids=["3x3", "stride 2", "same dilated", "reflect", "circular", "1x1 grouped"],
)
@pytest.mark.parametrize("path", PATH_PARAMS)
def test_packed_conv_kernels_are_bit_identical(conv, path):
    gen = torch.Generator().manual_seed(6)
    layer = make_layer(gen, **conv)
    x = make_input((2, 32, 9, 10), gen)
    with xnor.forced_path(path):
        out = outputs_by_kernel(layer, x)
        for kernel in ("auto", "xnor", "int8"):
            assert torch.equal(out[kernel], out["reference"]), kernel
        assert "xnor" in layer._kernel_layouts  # the kernel ran (the reference path builds no layout)


@needs_kernel
@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel lengths")
def test_asymmetric_same_padding_falls_back():
    gen = torch.Generator().manual_seed(7)
    layer = make_layer(gen, kernel_size=4, padding="same")
    x = make_input((1, 32, 6, 6), gen)
    with torch.no_grad():
        set_kernel(layer, "reference")
        expected = layer(x)
        set_kernel(layer, "auto")
        assert torch.equal(layer(x), expected)
        set_kernel(layer, "xnor")
        with pytest.raises(ValueError, match="asymmetric"):
            layer(x)


@needs_kernel
def test_depthwise_runs_the_kernel_when_asked_and_the_dense_path_under_auto():
    """Depthwise convolutions (MobileNetV2) use 1 bit of each 32-bit word and 1 lane of each panel: "xnor" runs
    them exactly, "auto" leaves them to the dense path (`conv_kernel_pays`)."""
    gen = torch.Generator().manual_seed(8)
    layer = make_layer(gen, in_channels=24, out_channels=24, groups=24)
    x = make_input((2, 24, 7, 7), gen)
    assert not layer.conv_kernel_pays()
    out = outputs_by_kernel(layer, x)
    assert all(torch.equal(y, out["reference"]) for y in out.values())


@needs_kernel
def test_weights_only_layer_after_a_binary_activation():
    """The paper's BNN: a `BinaryActivation` (no scale) feeds +-1 to a layer that binarizes only its weights; the
    kernel takes those as they are (strict), and falls back for good once an input is not +-1."""
    gen = torch.Generator().manual_seed(9)
    layer = make_layer(gen, binary_inputs=False)
    assert layer.input_scale is None
    model = nn.Sequential(BinaryActivation(), layer).eval()
    x = make_input((2, 32, 8, 8), gen)
    with torch.no_grad():
        set_kernel(model, "reference")
        expected = model(x)
        for kernel in ("auto", "xnor"):
            set_kernel(model, kernel)
            layer._kernel_layouts.clear()
            assert torch.equal(model(x), expected), kernel
            assert "xnor" in layer._kernel_layouts
        real = make_input((2, 32, 8, 8), gen)  # not +-1: a binary-weight network's real input
        set_kernel(layer, "reference")
        expected_real = layer(real)
        set_kernel(layer, "xnor")
        with pytest.raises(ValueError, match="not all"):
            layer(real)
        set_kernel(layer, "auto")
        assert torch.equal(layer(real), expected_real)
        assert layer._inputs_not_binary


@needs_kernel
def test_kernel_layout_follows_the_weight():
    gen = torch.Generator().manual_seed(10)
    layer = make_layer(gen)
    x = make_input((1, 32, 5, 5), gen)
    with torch.no_grad():
        first = outputs_by_kernel(layer, x)
        layer.weight.bitwise_not_()  # in place: a new version, so the layout is rebuilt
        second = outputs_by_kernel(layer, x)
    assert not torch.equal(first["reference"], second["reference"])
    assert all(torch.equal(y, second["reference"]) for y in second.values())


@needs_kernel
def test_tracing_takes_the_reference_path():
    """`torch.export` cannot see into a C call: under "auto" a packed conv traces its dense reference path (the
    same bits), under "xnor" it says why it cannot run."""
    gen = torch.Generator().manual_seed(11)
    layer = make_layer(gen)
    x = make_input((1, 32, 6, 6), gen)
    with torch.no_grad():
        set_kernel(layer, "auto")
        program = torch.export.export(layer, (x,))
        assert torch.equal(program.module()(x), layer(x))
        set_kernel(layer, "xnor")
        with pytest.raises(ValueError, match="tracer"):
            torch.export.export(layer, (x,))


needs_amx = pytest.mark.skipif(
    not (xnor.is_available() and int8.amx_available()), reason="no AMX int8 tiles on this CPU (or OS)"
)
AMX_CASES = {name: case for name, case in CASES.items() if case[-1] == 1}


@needs_amx
@pytest.mark.parametrize("name", list(AMX_CASES))
@pytest.mark.parametrize("threads", [1, 2])
def test_amx_conv_is_bit_identical(name, threads, monkeypatch):
    """The AMX int8 convolution against the dense formula, for every groups-1 case: NCHW and channels-last inputs
    (the output in the same format), batches of 1, 2 and 5 (shared image buffer, or one image per thread in its own
    buffer), stride 1 (tiles over the flattened padded grid) and the rest (tiles along output rows)."""
    monkeypatch.setattr(int8, "_MIN_WORK_PER_THREAD", 0)
    gen = torch.Generator().manual_seed(11)
    _, weight_packed, shape, (stride, padding, dilation, _), scale, bias = make_case(AMX_CASES[name], gen)
    o, c, kh, kw = shape
    weight = int8.amx_weight(weight_packed, o, c, kh * kw)
    h, w = AMX_CASES[name][2:4]
    for batch in (1, 2, 5):
        x = make_input((batch, c, h, w), gen)
        for s, b in [(None, None), (scale, bias)]:
            expected = reference(x, weight_packed, shape, stride, padding, dilation, 1, s, b)
            for xx in (x, x.contiguous(memory_format=torch.channels_last)):
                y = int8.amx_conv2d(xx, weight, shape, stride, padding, dilation, s, b, num_threads=threads)
                assert torch.equal(y, expected), (name, batch)
                channels_last = xx.is_contiguous(memory_format=torch.channels_last) and not xx.is_contiguous()
                assert y.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


@needs_amx
def test_amx_conv_nan_strict_and_validation():
    gen = torch.Generator().manual_seed(12)
    _, weight_packed, shape, _, scale, bias = make_case(CASES["resnet 3x3"], gen)
    weight = int8.amx_weight(weight_packed, 64, 64, 9)
    pm1 = torch.where(torch.rand(2, 64, 8, 8, generator=gen) < 0.5, 1.0, -1.0)
    for x in (pm1, pm1.contiguous(memory_format=torch.channels_last)):
        expected = reference(pm1, weight_packed, shape, 1, 1, 1, 1, scale, bias)
        assert torch.equal(int8.amx_conv2d(x, weight, shape, 1, 1, 1, scale, bias, strict=True), expected)
        bad = x.clone()
        bad[1, 7, 3, 2] = 0.25
        with pytest.raises(xnor.InputNotBinary):
            int8.amx_conv2d(bad, weight, shape, 1, 1, 1, strict=True)
        bad[1, 7, 3, 2] = math.nan
        with pytest.raises(ValueError, match="NaN"):
            int8.amx_conv2d(bad, weight, shape, 1, 1, 1)
    with pytest.raises(ValueError, match="weight_amx from amx_weight"):
        int8.amx_conv2d(pm1, weight[:-64], shape, 1, 1)
    with pytest.raises(ValueError, match="amx_conv2d expects x as a 4-D float32"):
        int8.amx_conv2d(pm1[0], weight, shape, 1, 1)
    with pytest.raises(ValueError, match="amx_conv2d expects `stride`"):
        int8.amx_conv2d(pm1, weight, shape, (1, 1, 1), 1)


@needs_amx
def test_auto_measures_the_amx_conv(monkeypatch):
    """Where "auto" may pick the AMX convolution, it times both once per shape and keeps the faster; either choice
    and "int8" (always AMX) give the reference bits; grouped layers never take it."""
    monkeypatch.setattr(int8, "worth_measuring", lambda: True)
    int8._reset_for_tests()
    gen = torch.Generator().manual_seed(13)
    layer = make_layer(gen)
    x = make_input((3, 32, 9, 10), gen).contiguous(memory_format=torch.channels_last)
    out = outputs_by_kernel(layer, x)
    for kernel in ("auto", "xnor", "int8"):
        assert torch.equal(out[kernel], out["reference"]), kernel
    (key,) = int8._choices
    assert key[0] == "conv2d" and int8._choices[key] in ("xnor", "int8")
    assert "amx" in layer._kernel_layouts  # "int8" ran the AMX path
    with torch.no_grad():
        set_kernel(layer, "auto")
        for choice in ("xnor", "int8"):
            int8._choices[key] = choice
            assert torch.equal(layer(x), out["reference"])
    grouped = make_layer(gen, groups=4)
    assert torch.equal(outputs_by_kernel(grouped, x)["int8"], outputs_by_kernel(grouped, x)["reference"])
    assert "amx" not in grouped._kernel_layouts
    int8._reset_for_tests()


@pytest.mark.skipif("avx512" not in bconv.conv_paths(), reason="no avx512 conv path on this CPU")
@pytest.mark.parametrize(
    "conv",
    [{}, {"out_channels": 24}, {"stride": 2, "bias": False}, {"kernel_size": 1, "padding": 0, "groups": 4}],
)
def test_bf16_packed_conv_is_bit_identical(conv):
    """A packed convolution of a bfloat16 model, NCHW or channels-last input, in every kernel mode: bf16 outputs
    (in the input's format) with the reference path's bits, sums past bf16's 8 bits included (288 inputs). The
    first two take the avx512 tile's paired epilogue (two panels rounded together; 24 channels: the second panel
    of the pair has 8), the others its one-panel epilogue (no bias; 3 output channels per group)."""
    gen = torch.Generator().manual_seed(14)
    layer = make_layer(gen, **conv).to(torch.bfloat16)
    x = make_input((3, 32, 9, 10), gen).bfloat16()
    for xx in (x, x.contiguous(memory_format=torch.channels_last)):
        out = outputs_by_kernel(layer, xx)
        assert out["reference"].dtype == torch.bfloat16
        for kernel in ("auto", "xnor", "int8"):
            assert torch.equal(out[kernel], out["reference"]), kernel
            assert out[kernel].stride() == out["reference"].stride(), kernel
    assert "xnor" in layer._kernel_layouts
