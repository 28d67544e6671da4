"""Export of packed 1-bit models: `torch.export.export` (bit-exact against eager) and `torch.onnx.export(...,
dynamo=True)` run by onnxruntime; with `optimize=False` the ONNX graph keeps the uint8 packed weights and unpacks
them itself. The ONNX tests skip without the `onnx` extra (onnx, onnxscript, onnxruntime)."""

from __future__ import annotations

import pytest
import timm
import torch
from transformers import AutoModelForSequenceClassification

from stompp_hf import ProgressionController, StoMPPConfig, prepare_model, set_kernel
from stompp_hf.export import pack_model
from stompp_hf.integrations.timm import cifar_resnet  # noqa: F401  (registers cifar_resnet8 with timm)

from .client_utils import packed_bert

SIZE = 12


@pytest.fixture
def bert(tmp_path):
    model = AutoModelForSequenceClassification.from_pretrained(str(packed_bert(tmp_path))).eval()
    set_kernel(model, "reference")  # the XNOR kernel is a C call that tracing cannot see into
    ids = torch.randint(5, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    return model, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def _cnn():
    torch.manual_seed(0)
    model = timm.create_model("cifar_resnet8", num_classes=4, in_chans=1, channels=(4, 4, 8))
    model.pretrained_cfg = {**model.pretrained_cfg, "input_size": (1, SIZE, SIZE)}
    prepare_model(model, StoMPPConfig(refresh_rate=1)).train()
    with torch.no_grad():
        model(torch.randn(8, 1, SIZE, SIZE))  # measures the activation scales
    controller = ProgressionController(model, 2)
    controller.advance(1)
    controller.advance(2)
    pack_model(model.eval())
    return model


def test_torch_export_is_bit_exact(bert):
    model, inputs = bert
    with torch.no_grad():
        program = torch.export.export(model, (), inputs)
        other = {**inputs, "input_ids": torch.randint(5, 64, (2, 8), generator=torch.Generator().manual_seed(1))}
        exported = program.module()(**other).logits
        set_kernel(model, "auto")  # eager on the XNOR kernel: the same bits
        assert torch.equal(exported, model(**other).logits)
    assert any(p.dtype == torch.uint8 for p in program.state_dict.values())  # the weights stay packed


def test_torch_export_of_a_packed_cnn():
    with pytest.warns(UserWarning, match="refresh_rate"):
        model = _cnn()
    x = torch.randn(3, 1, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        program = torch.export.export(model, (x,))
        y = torch.randn(3, 1, SIZE, SIZE, generator=torch.Generator().manual_seed(2))
        assert torch.equal(program.module()(y), model(y))


@pytest.mark.parametrize("optimize", [False, True])
def test_onnx_dynamo_export_runs_in_onnxruntime(bert, tmp_path, optimize):
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxscript")
    ort = pytest.importorskip("onnxruntime")
    model, inputs = bert
    path = tmp_path / "model.onnx"
    with torch.no_grad():
        torch.onnx.export(
            model,
            (),
            path,
            kwargs=inputs,
            dynamo=True,
            optimize=optimize,
            input_names=list(inputs),
            output_names=["logits"],
        )
        expected = model(**inputs).logits.numpy()
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (logits,) = session.run(None, {k: v.numpy() for k, v in inputs.items()})
    assert abs(logits - expected).max() < 1e-5
    packed = {
        i.name: tuple(i.dims) for i in onnx.load(path).graph.initializer if i.data_type == onnx.TensorProto.UINT8
    }
    if not optimize:  # 1 bit per weight in the file; the graph unpacks with bitwise ops
        assert packed["bert.encoder.layer.0.attention.self.query.weight"] == (32, 4)
        assert len([k for k in packed if k.endswith(".weight")]) == 13
    else:  # the optimizer folds the unpacking into float constants
        assert not packed
