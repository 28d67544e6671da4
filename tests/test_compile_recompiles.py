"""`torch.compile` over a whole progression: one graph for every mask state, whatever the number of stages, with
eager mode's losses and gradients at every step (docs/design.md, "torch.compile")."""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable

import pytest
import timm
import torch
from torch import nn
from transformers import BertForSequenceClassification

import stompp_hf.integrations.timm.io  # noqa: F401  (registers cifar_resnet* with timm)
from stompp_hf import ProgressionController, StoMPPConfig, binarized, prepare_model, stompp_modules
from stompp_hf.core.masks import MaskState
from stompp_hf.progression import count_stages

from .testing_utils import tiny_bert_config

SIZE = 8


def _bert(granularity: str) -> tuple[nn.Module, Callable[[nn.Module], torch.Tensor]]:
    torch.manual_seed(0)
    model = BertForSequenceClassification(tiny_bert_config(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))
    # transformers sets `problem_type` in the first forward, which recompiles once on its own: set it beforehand
    model.config.problem_type = "single_label_classification"
    config = StoMPPConfig(weights="stompp_ste", activations="stompp", granularity=granularity, refresh_rate=1)
    prepare_model(model, config).train()
    ids = torch.randint(5, 60, (3, 8), generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([0, 1, 1])
    return model, lambda m: m(input_ids=ids, labels=labels).loss


def _resnet(granularity: str) -> tuple[nn.Module, Callable[[nn.Module], torch.Tensor]]:
    torch.manual_seed(0)
    model = timm.create_model("cifar_resnet8", num_classes=4, in_chans=1, channels=(4, 4, 8))
    model.pretrained_cfg = {**model.pretrained_cfg, "input_size": (1, SIZE, SIZE)}
    # the paper's BNN: StoMPP activations at the activation sites, 'stompp' everywhere (a frozen activation blocks
    # all gradient upstream), with both scales (the factored form of frozen layers)
    prepare_model(model, StoMPPConfig(granularity=granularity, refresh_rate=1)).train()
    x = torch.randn(4, 1, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    y = torch.arange(4)
    return model, lambda m: nn.functional.cross_entropy(m(x), y)


MODELS = {"bert": _bert, "cifar_resnet8": _resnet}


class CountingBackend:
    """`aot_eager` (AOT autograd, no C++ compiler needed), counting the graphs it compiles and the calls of each."""

    def __init__(self) -> None:
        self.calls: list[int] = []

    def __call__(self, gm, example_inputs):
        from torch._dynamo.backends.debugging import aot_eager

        index = len(self.calls)
        self.calls.append(0)
        compiled = aot_eager(gm, example_inputs)

        def run(*args):
            self.calls[index] += 1
            return compiled(*args)

        return run


def _compiled_progression(name: str, granularity: str) -> tuple[int, list[int]]:
    """Train an eager model and its compiled twin side by side over a whole progression (two steps per stage, then
    one more with every stage frozen), checking equal losses and gradients at every step; return the number of
    stages and the calls of each compiled graph."""
    model, loss_of = MODELS[name](granularity)
    twin = copy.deepcopy(model)
    models = (model, twin)
    steps = 2 * count_stages(model)
    controllers = [ProgressionController(m, total_steps=steps) for m in models]
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.05) for m in models]
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    backend = CountingBackend()
    compiled = torch.compile(twin, backend=backend)
    for step in range(1, steps + 2):
        losses = []
        for run in (model, compiled):
            loss = loss_of(run)
            loss.backward()
            losses.append(loss.detach())
        torch.testing.assert_close(losses[1], losses[0], msg=f"step {step}")
        for (n, p), q in zip(model.named_parameters(), twin.parameters()):
            if p.grad is not None:
                torch.testing.assert_close(q.grad, p.grad, rtol=1e-5, atol=1e-6, msg=f"step {step}: {n}")
            else:  # 'stompp' frozen (or blocked upstream): eager gives no gradient, the compiled graph a zero one
                assert q.grad is None or not q.grad.any(), f"step {step}: {n}"
        for optimizer, controller in zip(optimizers, controllers):
            optimizer.step()  # plain SGD: a zero gradient changes nothing, as no gradient does
            optimizer.zero_grad(set_to_none=True)
            controller.advance(min(step, steps))
    assert all(m.fully_frozen for m in stompp_modules(twin).values())
    assert not torch._dynamo.utils.counters["graph_break"]
    return count_stages(model), backend.calls


@pytest.mark.parametrize("name, granularities", [("bert", ("block", "module")), ("cifar_resnet8", ("block", "layer"))])
def test_a_whole_progression_compiles_once_whatever_the_stage_count(name, granularities):
    """Before, every stage transition recompiled (the graph was specialized to each mask being the constant
    False, a tensor or the constant True), and past 8 recompiles dynamo fell back to eager. Now the masks are read
    when the graph runs: one graph for the whole progression, for few stages as for many."""
    (few, calls_few), (many, calls_many) = (_compiled_progression(name, g) for g in granularities)
    assert few <= 4 and many >= 12, (few, many)
    # one graph, run by every training step (2 per stage, plus the one after the end): no recompile, no fallback
    assert calls_few == [2 * few + 1] and calls_many == [2 * many + 1]


def test_moving_masks_between_a_compiled_forward_and_its_backward_raises():
    model, loss_of = _resnet("layer")
    controller = ProgressionController(model, total_steps=26)
    controller.advance(1)  # stage 0 mid-transition
    torch._dynamo.reset()
    loss = loss_of(torch.compile(model, backend="aot_eager"))
    controller.advance(2)  # re-draws the transitioning mask before the backward pass
    with pytest.raises(RuntimeError, match="mask changed between a compiled forward pass and its backward"):
        loss.backward()


def test_a_copied_mask_state_has_its_own_handle():
    state = MaskState((3, 4))
    state.materialize(torch.device("cpu"))
    copied = copy.deepcopy(state)
    assert copied.handle != state.handle and MaskState.from_handle(copied.handle) is copied
    assert MaskState.from_handle(state.handle) is state and torch.equal(copied.value, state.value)


def test_evaluation_and_binarized_compile_once_each():
    """Training, evaluation and `binarized(model)` (every mask treated as frozen) are one graph each, whatever the
    stage, with eager mode's outputs."""
    model, _ = _resnet("layer")
    twin = copy.deepcopy(model)
    controllers = [ProgressionController(m, total_steps=26) for m in (model, twin)]
    x = torch.randn(4, 1, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    torch._dynamo.reset()
    backend = CountingBackend()
    compiled = torch.compile(twin, backend=backend)
    for step in (3, 13, 26):  # early, mid-progression, every stage frozen
        for controller in controllers:
            controller.advance(step)
        for mode in ("eval", "binarized"):
            outputs = []
            for m, run in ((model, model), (twin, compiled)):
                m.eval()
                with torch.no_grad(), binarized(m) if mode == "binarized" else contextlib.nullcontext():
                    outputs.append(run(x))
            torch.testing.assert_close(outputs[1], outputs[0], msg=f"step {step}, {mode}")
    assert backend.calls == [3, 3]
