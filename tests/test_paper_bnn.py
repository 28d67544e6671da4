"""The paper's BNN (StoMPP Table 6) on timm CNNs: StoMPP activations at the activation sites (the post-addition one
included), per-tensor stages in execution order, the gradient blockade, packed export of activations, masks sized at
conversion, and exact resume of a vision `Trainer` run."""

from __future__ import annotations

import math

import timm
import torch
from datasets import Dataset
from torch import nn
from transformers import Trainer, TrainingArguments

import stompp_hf.integrations.timm.io  # noqa: F401  (registers cifar_resnet* and birealnet* with timm)
from stompp_hf import ProgressionController, StoMPPCallback, StoMPPConfig, binarized, prepare_model, stompp_modules
from stompp_hf.export import pack_model
from stompp_hf.integrations.timm.io import from_pretrained, save_pretrained
from stompp_hf.nn import BinaryActivation, BinaryConv2d, StoMPPActivation, StoMPPConv2d

PAPER = StoMPPConfig(
    weights="stompp", activations="stompp", weight_scale="none", activation_scale="none", refresh_rate=1
)
SIZE = 12


def cifar_resnet8(**kwargs) -> nn.Module:
    torch.manual_seed(0)
    model = timm.create_model("cifar_resnet8", num_classes=10, in_chans=1, channels=(8, 8, 16), **kwargs)
    model.pretrained_cfg = {**model.pretrained_cfg, "input_size": (1, SIZE, SIZE)}
    return model


def images(n: int = 4, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 1, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


def test_vanilla_resnet_defaults_to_the_paper_topology():
    model = prepare_model(cifar_resnet8(), PAPER)
    config = model.stompp_config
    assert (config.activation_sites, config.granularity) == ("activation", "layer")
    modules = stompp_modules(model)
    activations = [n for n, m in modules.items() if isinstance(m, StoMPPActivation)]
    # the stem's activation and both of every block's, the one after the residual addition (act2) included
    assert activations == ["act1"] + [f"layer{s}.0.act{i}" for s in (1, 2, 3) for i in (1, 2)]
    # the convolutions after an activation binarize their weights only: their input is already +-1
    convs = [m for m in modules.values() if isinstance(m, StoMPPConv2d)]
    assert len(convs) == 6 and all(m.input_binarizer is None and m.weight_binarizer is not None for m in convs)
    # every weight and every activation its own stage, numbered in execution order
    order = ["act1", "layer1.0.conv1", "layer1.0.act1", "layer1.0.conv2", "layer1.0.act2", "layer2.0.conv1"]
    assert [modules[n].stompp_stage for n in order] == list(range(6))
    assert sorted(b.stage for m in modules.values() for b in m.binarizers()) == list(range(13))
    # masks of the per-sample shape exist from conversion on, before any forward pass
    assert modules["layer2.0.act2"].input_mask.shape == (8, SIZE // 2, SIZE // 2)


def test_other_families_keep_input_sites():
    bireal = timm.create_model("birealnet18", num_classes=10, in_chans=1, channels=(8, 8, 8, 8))
    assert prepare_model(bireal, PAPER).stompp_config.activation_sites == "input"  # its own design
    mobilenet = timm.create_model("mobilenetv2_100", num_classes=10)
    # the linear bottlenecks feed the next block without an activation: not a vanilla BNN
    assert prepare_model(mobilenet, PAPER).stompp_config.activation_sites == "input"


def _upstream_grads(model: nn.Module, x: torch.Tensor) -> dict[str, float]:
    model.zero_grad(set_to_none=True)
    nn.functional.cross_entropy(model(x), torch.arange(len(x)) % 10).backward()
    return {n: 0.0 if p.grad is None else float(p.grad.abs().sum()) for n, p in model.named_parameters()}


def test_reverse_order_mid_way_blocks_every_upstream_gradient():
    """A frozen activation under "stompp" is a constant of its input's sign: with the last stages frozen (reverse
    order, mid-way), nothing upstream of the last activation gets any gradient. The input-site topology keeps its
    real residual stream, so its early layers still learn."""
    for sites, blocked in (("activation", True), ("input", False)):
        model = prepare_model(
            cifar_resnet8(), StoMPPConfig.from_dict({**PAPER.to_dict(), "order": "reverse", "activation_sites": sites})
        )
        controller = ProgressionController(model, total_steps=100)
        controller.advance(50)  # about half the stages, the last ones, are frozen
        frozen = [b for m in stompp_modules(model).values() for b in m.binarizers() if b.frozen]
        assert 0 < len(frozen) < controller.num_stages
        grads = _upstream_grads(model.train(), images())
        upstream = {n: g for n, g in grads.items() if not n.startswith("fc.")}
        if blocked:
            assert all(g == 0.0 for g in upstream.values()), {n: g for n, g in upstream.items() if g}
        else:
            assert grads["conv1.weight"] > 0 and grads["layer1.0.conv1.weight"] > 0
        assert grads["fc.weight"] > 0


def test_forward_order_lets_gradients_reach_the_input():
    model = prepare_model(cifar_resnet8(), PAPER)
    controller = ProgressionController(model, total_steps=100)
    controller.advance(30)  # the first stages are frozen, later ones continuous
    grads = _upstream_grads(model.train(), images())
    assert grads["layer3.0.conv2.weight"] > 0 and grads["fc.weight"] > 0


def test_binarized_residual_stream_is_binary():
    model = prepare_model(cifar_resnet8(), PAPER).eval()
    outputs = []
    hooks = [
        model.get_submodule(f"layer{s}").register_forward_hook(lambda m, a, o: outputs.append(o)) for s in (1, 2, 3)
    ]
    hooks.append(model.act1.register_forward_hook(lambda m, a, o: outputs.append(o)))
    with torch.no_grad(), binarized(model):
        model(images())
    for h in hooks:
        h.remove()
    assert len(outputs) == 4
    assert all(set(torch.unique(o).tolist()) <= {-1.0, 1.0} for o in outputs)


def test_advance_before_any_forward_freezes_activation_and_conv_input_masks():
    for sites in ("activation", "input"):
        model = prepare_model(cifar_resnet8(), StoMPPConfig.from_dict({**PAPER.to_dict(), "activation_sites": sites}))
        controller = ProgressionController(model, total_steps=26)
        controller.advance(6)  # 13 (12) stages over 26 steps: the first 3 (2) are done, then one transitions
        inputs = [b for m in stompp_modules(model).values() for b in m.binarizers() if b.kind == "input"]
        assert all(b.mask is not None for b in inputs)
        tensors = [b for m in stompp_modules(model).values() for b in m.binarizers()]
        done = [b for b in tensors if controller.stage_progress(b.stage) == 1.0]
        later = [b for b in tensors if controller.stage_progress(b.stage) == 0.0]
        assert len(done) >= 2 and any(b.kind == "input" for b in done) and later
        assert all(b.mask.value is True for b in done) and all(b.mask.value is False for b in later)


def _train_to_binary(model: nn.Module, steps: int = 13) -> nn.Module:
    controller = ProgressionController(model, total_steps=steps)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(1, steps + 1):
        nn.functional.cross_entropy(model(images(8, step)), torch.arange(8) % 10).backward()
        optimizer.step()
        optimizer.zero_grad()
        controller.advance(step)
    return model.eval()


def test_packed_export_of_activation_sites_is_bit_exact(tmp_path):
    model = _train_to_binary(prepare_model(cifar_resnet8(), PAPER))
    x = images(5, 99)
    with torch.no_grad():
        expected = model(x)
    save_pretrained(model, tmp_path, model_args={"in_chans": 1, "channels": [8, 8, 16]})
    reloaded = from_pretrained(str(tmp_path)).eval()
    assert isinstance(reloaded.layer1[0].act2, BinaryActivation) and isinstance(reloaded.act1, BinaryActivation)
    conv = reloaded.layer1[0].conv1
    assert isinstance(conv, BinaryConv2d) and conv.binary_weights and not conv.binary_inputs  # reads +-1 already
    with torch.no_grad():
        assert torch.equal(reloaded(x), expected)
    pack_model(model)  # in memory too
    with torch.no_grad():
        assert torch.equal(model(x), expected)


def test_latent_save_of_activation_sites_reloads_the_same_modules(tmp_path):
    model = prepare_model(cifar_resnet8(), PAPER)
    save_pretrained(model, tmp_path, model_args={"in_chans": 1, "channels": [8, 8, 16]})
    reloaded = from_pretrained(str(tmp_path))
    assert {n: type(m) for n, m in stompp_modules(reloaded).items()} == {
        n: type(m) for n, m in stompp_modules(model).items()
    }
    assert [b.stage for m in stompp_modules(reloaded).values() for b in m.binarizers()] == [
        b.stage for m in stompp_modules(model).values() for b in m.binarizers()
    ]


# ------------------------------------------------------------------------------------------------ exact resume


class Classifier(nn.Module):
    """A timm model for `Trainer`: `forward(pixel_values, labels) -> {"loss", "logits"}`."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.stompp_config = model.stompp_config

    def forward(self, pixel_values, labels=None):
        logits = self.model(pixel_values)
        return {"loss": nn.functional.cross_entropy(logits, labels), "logits": logits}


def image_dataset(n: int = 48) -> Dataset:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 1, SIZE, SIZE, generator=g)
    y = torch.randint(0, 10, (n,), generator=g)
    return Dataset.from_dict({"pixel_values": x.tolist(), "labels": y.tolist()}).with_format("torch")


MAX_STEPS = 26  # 13 stages: a stage lasts 2 steps


def vision_trainer(out, rule: str, save_steps: int | None = None) -> Trainer:
    config = StoMPPConfig.from_dict({**PAPER.to_dict(), "weights": rule, "activations": rule, "refresh_rate": 7})
    model = Classifier(prepare_model(cifar_resnet8(), config))
    args = TrainingArguments(
        str(out),
        max_steps=MAX_STEPS,
        per_device_train_batch_size=8,
        learning_rate=0.05,
        optim="sgd",
        report_to=[],
        save_strategy="steps" if save_steps else "no",
        save_steps=save_steps or 500,
        disable_tqdm=True,
        use_cpu=True,
        seed=0,
        full_determinism=True,
    )
    return Trainer(model=model, args=args, train_dataset=image_dataset(), callbacks=[StoMPPCallback()])


def final_state(model: nn.Module) -> dict[str, torch.Tensor]:
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    for name, module in stompp_modules(model).items():
        for binarizer in module.binarizers():
            state[f"{name}.{binarizer.kind}_mask"] = module._mask_of(binarizer).clone()
    return state


def test_vision_resume_equals_uninterrupted(tmp_path):
    """Interrupted mid-stage (step 5) and at a stage boundary (step 8), resumed from another output folder: the final
    weights, BatchNorm statistics and masks equal the uninterrupted run's bit for bit."""
    uninterrupted = vision_trainer(tmp_path / "a", "stompp_ste", save_steps=1)
    uninterrupted.train()
    expected = final_state(uninterrupted.model)
    for interrupt in (5, 8):
        resumed = vision_trainer(tmp_path / f"b{interrupt}", "stompp_ste")
        resumed.train(resume_from_checkpoint=str(tmp_path / "a" / f"checkpoint-{interrupt}"))
        actual = final_state(resumed.model)
        assert actual.keys() == expected.keys()
        differing = [k for k in expected if not torch.equal(actual[k], expected[k])]
        assert not differing, f"resumed at {interrupt}: {len(differing)} tensors differ, e.g. {differing[:5]}"


def test_summary_counts_activation_site_convolutions_as_binary_macs():
    from stompp_hf import summary

    model = prepare_model(cifar_resnet8(), PAPER).eval()
    convs = {n: m for n, m in stompp_modules(model).items() if isinstance(m, StoMPPConv2d)}
    shapes = {}

    def record(name):
        def hook(module, args, output):  # returns None: the output is left alone
            shapes[name] = output.shape

        return hook

    hooks = [m.register_forward_hook(record(n)) for n, m in convs.items()]
    with torch.no_grad():
        model(images(1))
    for h in hooks:
        h.remove()
    # the six block convolutions read +-1 activations with +-1 weights: 1-bit x 1-bit MACs, output x fan-in each
    expected = sum(math.prod(shapes[n][1:]) * m.weight[0].numel() for n, m in convs.items())
    table = summary(model, example_inputs=images(1), print_fn=None)
    assert table.total.binary_macs == expected
    assert table.total.fp_macs > 0  # stem, projection shortcuts and classifier stay full precision


def test_activation_sites_on_a_model_without_a_policy_for_them_raise():
    import pytest

    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.Linear(8, 2))
    with pytest.raises(ValueError, match=r"`activation_sites` 'activation' found no activation sites in Sequential"):
        prepare_model(model, StoMPPConfig(activation_sites="activation"))


def test_torch_compile_of_the_paper_bnn_matches_eager_without_graph_breaks():
    """StoMPP activations (frozen, transitioning and continuous at once, mid-progression) compile into one graph per
    forward and train to eager mode's losses and gradients (AOT autograd: no C++ compiler needed)."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    config = StoMPPConfig.from_dict({**PAPER.to_dict(), "weights": "stompp_ste", "activations": "stompp_ste"})
    pair = []
    for _ in range(2):
        model = prepare_model(cifar_resnet8(), config).train()
        controller = ProgressionController(model, 26)
        controller.advance(7)  # stages 0-2 frozen, stage 3 mid-transition, the rest continuous
        pair.append((model, controller))
    eager, compiled = pair[0][0], torch.compile(pair[1][0], backend="aot_eager")
    x, y = images(6, 5), torch.arange(6) % 10
    for step in range(2):
        losses = []
        for model, (_, controller) in zip((eager, compiled), pair):
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            losses.append(loss.detach())
            controller.advance(8 + step)
        torch.testing.assert_close(losses[1], losses[0])
    for (name, p), q in zip(pair[0][0].named_parameters(), pair[1][0].parameters()):
        if p.grad is not None:
            torch.testing.assert_close(q.grad, p.grad, rtol=1e-5, atol=1e-6, msg=name)
    assert not torch._dynamo.utils.counters["graph_break"]


def test_packed_activation_passes_the_clipped_ste_gradient_when_tracked():
    """beta = 0.5, clip 2 -> window |x| <= 1: x = [-3, -1, 0, 0.4, 2] gives values 0.5 * [-1, -1, 1, 1, 1] and the
    gradient of sum(w * y) with w = [1, 2, 3, 4, 5] is w * 1{|x| <= 1} = [0, 2, 3, 4, 0]; untracked input: no graph."""
    act = BinaryActivation(input_scale=True, input_clip=2.0)
    act.input_scale.fill_(0.5)
    x = torch.tensor([-3.0, -1.0, 0.0, 0.4, 2.0], requires_grad=True)
    y = act(x)
    assert torch.equal(y.detach(), torch.tensor([-0.5, -0.5, 0.5, 0.5, 0.5]))
    (y * torch.arange(1.0, 6.0)).sum().backward()
    assert torch.equal(x.grad, torch.tensor([0.0, 2.0, 3.0, 4.0, 0.0]))
    assert torch.equal(act(x.detach()), y.detach()) and not act(x.detach()).requires_grad
    plain = BinaryActivation()  # +-1, window |x| <= 1
    x = torch.tensor([-1.5, 0.5], requires_grad=True)
    plain(x).sum().backward()
    assert torch.equal(x.grad, torch.tensor([0.0, 1.0]))
