"""Distillation (docs/design.md, "Distillation", Eq. 13-16): the loss terms against values computed by hand, the
weighted total, and `DistillationTrainer`: gradient accumulation and DDP give the gradient of one big batch, a
resumed run ends bit for bit as the uninterrupted one, a StoMPP student distilled from a fine-tuned teacher ends
fully binary and reloads packed with the same logits, and the teacher is never trained, saved or optimized.

Run as a module (`python -m torch.distributed.run ... -m tests.test_distillation OUT`) it is one rank of the
two-process DDP run of `test_ddp_gradient_is_the_global_batch_gradient`.
"""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
from functools import partial
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import BertForSequenceClassification, Trainer, TrainerCallback

from stompp_hf import StoMPPCallback, StoMPPConfig, stompp_modules
from stompp_hf.core.distillation import attention_mse, hidden_mse, layer_map, logit_kd
from stompp_hf.distillation import DistillationConfig, DistillationTrainer, distillation_loss

from .testing_utils import eval_ids, tiny_bert_config, toy_dataset
from .testing_utils import training_args as shared_training_args

ROOT = Path(__file__).resolve().parent.parent
NO_DROPOUT = {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}
ALL_TERMS = DistillationConfig(
    temperature=2.0, task_weight=0.5, logit_weight=1.0, hidden_weight=0.3, attention_weight=2.0
)

# ---------------------------------------------------------------------------------------------------------------
# the loss terms, by hand

# softmax([0, 0.5]) = [1 / (1 + e^0.5), e^0.5 / (1 + e^0.5)], e^0.5 = 1.6487212707
P_LOW, P_HIGH = 1 / (1 + 1.6487212707), 1.6487212707 / (1 + 1.6487212707)  # 0.3775406688, 0.6224593312


def test_logit_kd_by_hand():
    s, t = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])
    # T = 2: s / T = [0.5, 0], t / T = [0, 0.5], so p_s = [P_HIGH, P_LOW], p_t = [P_LOW, P_HIGH], and
    # KL(p_t || p_s) = P_LOW * ln(P_LOW / P_HIGH) + P_HIGH * ln(P_HIGH / P_LOW) = (P_HIGH - P_LOW) * 0.5
    # (the log ratios are -0.5 and +0.5); times T^2 = 4:
    kl = P_LOW * math.log(P_LOW / P_HIGH) + P_HIGH * math.log(P_HIGH / P_LOW)
    assert kl == pytest.approx(0.5 * (0.6224593312 - 0.3775406688), abs=1e-9)
    assert float(logit_kd(s, t, temperature=2.0)) == pytest.approx(4 * 0.1224593312, abs=1e-6)  # 0.4898373248
    # T = 1: p_t = [1 / (1 + e), e / (1 + e)] = [0.2689414214, 0.7310585786], log ratios -1 and +1
    assert float(logit_kd(s, t, temperature=1.0)) == pytest.approx(0.7310585786 - 0.2689414214, abs=1e-6)
    # the mean over rows: a second row with s = t adds 0
    both = logit_kd(torch.tensor([[1.0, 0.0], [3.0, -1.0]]), torch.tensor([[0.0, 1.0], [3.0, -1.0]]), 2.0)
    assert float(both) == pytest.approx(0.4898373248 / 2, abs=1e-6)
    # the gradient: d(T^2 KL)/ds = T * (p_s - p_t) = 2 * [P_HIGH - P_LOW, P_LOW - P_HIGH]
    s.requires_grad_(True)
    logit_kd(s, t, temperature=2.0).backward()
    torch.testing.assert_close(s.grad, torch.tensor([[0.4898373248, -0.4898373248]]), rtol=0, atol=1e-6)


def test_logit_kd_regression_is_the_mse_and_ignores_the_temperature():
    s, t = torch.tensor([[1.0], [3.0]]), torch.tensor([[0.0], [1.0]])
    for temperature in (1.0, 4.0):
        assert float(logit_kd(s, t, temperature)) == pytest.approx((1.0**2 + 2.0**2) / 2)  # 2.5


def test_logit_kd_masks_padded_token_rows():
    s = torch.tensor([[[1.0, 0.0], [50.0, -50.0]]])  # [batch 1, seq 2, classes 2]
    t = torch.tensor([[[0.0, 1.0], [-50.0, 50.0]]])
    mask = torch.tensor([[True, False]])
    assert float(logit_kd(s, t, 2.0, mask=mask)) == pytest.approx(0.4898373248, abs=1e-6)
    assert float(logit_kd(s, t, 2.0)) > 10  # the padded position would dominate


def test_layer_map():
    assert layer_map(4, 4) == [0, 1, 2, 3]
    assert layer_map(3, 6) == [1, 3, 5]  # student layer l <- teacher layer round(l * 6 / 3) = 2l (1-based)
    assert layer_map(2, 4) == [1, 3]
    assert layer_map(2, 3) == [1, 2]  # round(1.5) = 2 (halves up), round(3) = 3
    with pytest.raises(ValueError):
        layer_map(0, 2)


def test_hidden_mse_by_hand_with_padding():
    zeros = torch.zeros(1, 2, 2)  # [batch, seq, hidden]
    student = (zeros, zeros)  # the embedding output and one layer
    teacher = (torch.tensor([[[1.0, 1.0], [100.0, 100.0]]]), torch.tensor([[[2.0, -2.0], [-50.0, 7.0]]]))
    # position 1 is padding: layer 0 MSE = (1 + 1) / 2 = 1, layer 1 = (4 + 4) / 2 = 4, mean = 2.5
    assert float(hidden_mse(student, teacher, torch.tensor([[1, 0]]))) == pytest.approx(2.5)
    # unmasked: (1 + 1 + 10^4 + 10^4) / 4 = 5000.5 and (4 + 4 + 2500 + 49) / 4 = 639.25, mean 2819.875
    assert float(hidden_mse(student, teacher)) == pytest.approx(2819.875)


def test_hidden_mse_matches_layers_uniformly():
    student = [torch.zeros(1, 1, 1)] * 3  # embeddings + 2 layers
    teacher = [torch.full((1, 1, 1), float(k)) for k in range(5)]  # embeddings + 4 layers, entry k holds k
    # student entries 0, 1, 2 <- teacher entries 0, 2, 4: MSE 0, 4, 16
    assert float(hidden_mse(student, teacher)) == pytest.approx((0 + 4 + 16) / 3)
    with pytest.raises(ValueError, match="equal hidden sizes"):
        hidden_mse([torch.zeros(1, 1, 2)] * 2, [torch.zeros(1, 1, 3)] * 2)


def test_attention_mse_by_hand_with_padding():
    student = torch.tensor([[[[0.5, 0.5], [0.5, 0.5]]]])  # [batch 1, heads 1, query 2, key 2]
    teacher = torch.tensor([[[[1.0, 0.0], [0.25, 0.75]]]])
    # squared differences [[0.25, 0.25], [0.0625, 0.0625]]: mean 0.15625; a second, identical layer adds 0
    assert float(attention_mse([student], [teacher])) == pytest.approx(0.15625)
    assert float(attention_mse([student, teacher], [teacher, teacher])) == pytest.approx(0.15625 / 2)
    # position 1 padded: only (query 0, key 0) has both real: 0.25
    assert float(attention_mse([student], [teacher], torch.tensor([[1, 0]]))) == pytest.approx(0.25)


def test_distillation_loss_weighted_total():
    zeros = torch.zeros(1, 2, 2)
    student = {
        "logits": torch.tensor([[1.0, 0.0]]),
        "hidden_states": (zeros, zeros),
        "attentions": (torch.tensor([[[[0.5, 0.5], [0.5, 0.5]]]]),),
    }
    teacher = {
        "logits": torch.tensor([[0.0, 1.0]]),
        "hidden_states": (torch.ones(1, 2, 2), torch.full((1, 2, 2), 2.0)),  # MSE 1 and 4: 2.5
        "attentions": (torch.tensor([[[[1.0, 0.0], [0.25, 0.75]]]]),),  # 0.15625
    }
    cfg = DistillationConfig(
        temperature=2.0, task_weight=0.5, logit_weight=2.0, hidden_weight=0.1, attention_weight=3.0
    )
    losses = distillation_loss(student, teacher, torch.tensor(0.7), cfg)
    assert set(losses) == {"loss", "task", "logit", "hidden", "attention"}
    assert float(losses["logit"]) == pytest.approx(0.4898373248, abs=1e-6)
    assert float(losses["hidden"]) == pytest.approx(2.5)
    assert float(losses["attention"]) == pytest.approx(0.15625)
    expected = 0.5 * 0.7 + 2.0 * 0.4898373248 + 0.1 * 2.5 + 3.0 * 0.15625  # 2.0484246496
    assert float(losses["loss"]) == pytest.approx(expected, abs=1e-6)
    # terms with weight 0 are not computed; without labels the task term is left out
    only_logits = distillation_loss(student, teacher, None, DistillationConfig(temperature=2.0))
    assert set(only_logits) == {"loss", "logit"}
    assert float(only_logits["loss"]) == pytest.approx(0.4898373248, abs=1e-6)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"temperature": 0.0}, "temperature"),
        ({"hidden_weight": -1.0}, "hidden_weight"),
        ({"task_weight": 0.0, "logit_weight": 0.0}, "At least one"),
        ({"teacher_dtype": "int8"}, "teacher_dtype"),
    ],
)
def test_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DistillationConfig(**kwargs)


# ---------------------------------------------------------------------------------------------------------------
# DistillationTrainer


def padded_dataset(n: int = 64, seed: int = 0):
    """The toy task with an attention mask: the last 2 of 8 positions of every row are padding (the same count in
    every row, so per-micro-batch means over real positions average to the big batch's mean)."""
    data = toy_dataset(n, seed=seed)
    return data.add_column("attention_mask", [[1] * 6 + [0] * 2] * n)


def bert(seed: int, **overrides) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    return BertForSequenceClassification(tiny_bert_config(**NO_DROPOUT, **overrides))


#: The shared tiny-run arguments, without checkpoints unless a test asks for them.
training_args = partial(shared_training_args, save_strategy="no")


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def assert_teacher_untouched(teacher: torch.nn.Module, before: dict[str, torch.Tensor]) -> None:
    assert not teacher.training
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    after = teacher.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())


class GradRecorder(TrainerCallback):
    """The student's gradients just before the first optimizer step (after clipping, if any)."""

    def __init__(self) -> None:
        self.grads: dict[str, torch.Tensor] | None = None

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if self.grads is None:
            model = getattr(model, "module", model)
            self.grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def test_gradient_accumulation_matches_one_big_batch(tmp_path):
    """2 micro-batches of 4 give the gradient of one batch of 8, every term weighted (dropout-free tiny BERT)."""
    results = {}
    for batch, accumulation in ((8, 1), (4, 2)):
        recorder = GradRecorder()
        trainer = DistillationTrainer(
            model=bert(0),
            args=training_args(
                tmp_path / f"b{batch}",
                max_steps=1,
                per_device_train_batch_size=batch,
                gradient_accumulation_steps=accumulation,
                max_grad_norm=0.0,
            ),
            train_dataset=padded_dataset(),
            teacher=bert(1),
            distillation=ALL_TERMS,
            callbacks=[recorder],
        )
        assert trainer.model.config._attn_implementation == "eager" == trainer.teacher.config._attn_implementation
        trainer.train()
        results[accumulation] = recorder.grads, trainer.state.log_history[0]
    (big, big_log), (accumulated, acc_log) = results[1], results[2]
    assert big.keys() == accumulated.keys() and len(big) > 10
    for name in big:
        torch.testing.assert_close(accumulated[name], big[name], rtol=1e-4, atol=1e-6, msg=name)
    for key in ("loss", "distill/task", "distill/logit", "distill/hidden", "distill/attention"):
        assert acc_log[key] == pytest.approx(big_log[key], rel=1e-5), key


def test_without_teacher_it_is_trainer(tmp_path):
    def losses(cls, **kwargs):
        trainer = cls(model=bert(0), args=training_args(tmp_path, max_steps=3), train_dataset=toy_dataset(), **kwargs)
        trainer.train()
        return [e["loss"] for e in trainer.state.log_history if "loss" in e]

    reference = losses(Trainer)
    assert losses(DistillationTrainer) == reference
    assert losses(DistillationTrainer, distillation=ALL_TERMS) == reference  # a config without a teacher


def test_teacher_sharing_parameters_with_the_student_raises(tmp_path):
    student, teacher = bert(0), bert(1)
    teacher.bert.embeddings = student.bert.embeddings  # what converting a model in place and keeping it gives
    args = training_args(tmp_path, max_steps=1)
    with pytest.raises(ValueError, match="shares parameters"):
        DistillationTrainer(model=student, args=args, teacher=teacher, distillation=ALL_TERMS)
    with pytest.raises(ValueError, match="the student itself"):
        DistillationTrainer(model=student, args=args, teacher=student, distillation=ALL_TERMS)


def test_bf16_teacher_runs_and_is_never_trained(tmp_path):
    teacher = bert(1)
    trainer = DistillationTrainer(
        model=bert(0),
        args=training_args(tmp_path, max_steps=3),
        train_dataset=padded_dataset(),
        teacher=teacher,
        distillation=DistillationConfig(**{**ALL_TERMS.to_dict(), "teacher_dtype": "bfloat16"}),
    )
    assert trainer.teacher is teacher
    assert {p.dtype for p in teacher.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in trainer.model.parameters()} == {torch.float32}
    before = snapshot(teacher)
    trainer.train()
    logs = [e for e in trainer.state.log_history if "loss" in e]
    assert len(logs) == 3
    for entry in logs:
        terms = [entry[f"distill/{t}"] for t in ("task", "logit", "hidden", "attention")]
        assert all(math.isfinite(v) and v >= 0 for v in terms)
        weighted = 0.5 * terms[0] + 1.0 * terms[1] + 0.3 * terms[2] + 2.0 * terms[3]
        assert entry["loss"] == pytest.approx(weighted, rel=1e-5)
    assert_teacher_untouched(teacher, before)
    # the teacher is not among the optimizer's parameters
    optimized = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert not optimized & {id(p) for p in teacher.parameters()}


def final_state(model) -> dict[str, torch.Tensor]:
    state = snapshot(model)
    for name, module in stompp_modules(model).items():
        state[f"{name}.weight_mask"] = module.weight_mask.clone()
        state[f"{name}.input_mask"] = module.input_mask.clone()
    return state


def test_resume_with_a_teacher_equals_uninterrupted(tiny_bert_dir, tmp_path):
    """A StoMPP student distilled with every term, gradient accumulation 2, interrupted at step 3 of 8 and resumed
    (the teacher passed again, as it is in no checkpoint) ends bit for bit as the uninterrupted run."""
    teacher_dir = tmp_path / "teacher"
    bert(1).save_pretrained(teacher_dir)
    config = StoMPPConfig(weights="stompp_ste", activations="stompp_ste", refresh_rate=3, schedule="linear")

    def make(out, save_steps=None):
        student = BertForSequenceClassification.from_pretrained(tiny_bert_dir, quantization_config=config)
        args = training_args(
            out,
            max_steps=8,
            per_device_train_batch_size=4,
            gradient_accumulation_steps=2,
            save_strategy="steps" if save_steps else "no",
            save_steps=save_steps or 500,
            full_determinism=True,
        )
        teacher = BertForSequenceClassification.from_pretrained(teacher_dir)
        return DistillationTrainer(
            model=student,
            args=args,
            train_dataset=padded_dataset(),
            teacher=teacher,
            distillation=ALL_TERMS,
            callbacks=[StoMPPCallback()],
        )

    uninterrupted = make(tmp_path / "a", save_steps=3)
    uninterrupted.train()
    expected = final_state(uninterrupted.model)
    resumed = make(tmp_path / "b")
    resumed.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-3"))
    assert resumed.state.global_step == 8
    actual = final_state(resumed.model)
    assert actual.keys() == expected.keys()
    differing = [k for k in expected if not torch.equal(actual[k], expected[k])]
    assert not differing, f"differs after resume: {differing[:5]}"

    def logged(trainer):
        return [
            (e["step"], e["loss"], e["distill/logit"], e["distill/hidden"])
            for e in trainer.state.log_history
            if "loss" in e and e["step"] > 3
        ]

    assert logged(resumed) == logged(uninterrupted)


@pytest.fixture
def fine_tuned_teacher(tiny_bert_dir, tmp_path):
    """The tiny BERT fine-tuned on the toy task with a plain `Trainer` (full precision)."""
    model = BertForSequenceClassification.from_pretrained(tiny_bert_dir)
    args = training_args(tmp_path / "teacher-run", max_steps=30, learning_rate=5e-3, logging_steps=10)
    Trainer(model=model, args=args, train_dataset=padded_dataset()).train()
    path = tmp_path / "teacher"
    model.save_pretrained(path)
    return path


def test_end_to_end_kd_of_a_stompp_student(fine_tuned_teacher, tmp_path):
    teacher = BertForSequenceClassification.from_pretrained(fine_tuned_teacher)
    student = BertForSequenceClassification.from_pretrained(fine_tuned_teacher, quantization_config=StoMPPConfig())
    before = snapshot(teacher)
    seen = {}

    def metrics(prediction):
        seen["predictions"] = prediction.predictions
        return {"accuracy": float((prediction.predictions.argmax(-1) == prediction.label_ids).mean())}

    trainer = DistillationTrainer(
        model=student,
        args=training_args(tmp_path / "run", max_steps=12, save_strategy="steps", save_steps=6),
        train_dataset=padded_dataset(),
        teacher=teacher,
        distillation=DistillationConfig(temperature=2.0, logit_weight=1.0, hidden_weight=0.1),
        callbacks=[StoMPPCallback()],
        compute_metrics=metrics,
    )
    trainer.train()
    modules = stompp_modules(student)
    assert modules and all(m.fully_frozen for m in modules.values())
    logs = [e for e in trainer.state.log_history if "loss" in e]
    assert len(logs) == 12
    assert all(
        e["loss"] == pytest.approx(e["distill/task"] + e["distill/logit"] + 0.1 * e["distill/hidden"], rel=1e-5)
        for e in logs
    )
    assert "distill/attention" not in logs[0]

    # evaluation: the same objective, and the predictions are the logits alone (no hidden states)
    result = trainer.evaluate(eval_dataset=padded_dataset(16, seed=1))
    assert math.isfinite(result["eval_loss"]) and "eval_accuracy" in result
    assert seen["predictions"].shape == (16, 2)

    # packed save and reload: the same logits
    trainer.save_model(str(tmp_path / "final"))
    config = json.loads((tmp_path / "final" / "config.json").read_text())
    assert config["quantization_config"]["packed"] is True
    reloaded = BertForSequenceClassification.from_pretrained(tmp_path / "final")
    ids = eval_ids()
    with torch.no_grad():
        assert torch.equal(reloaded.eval()(input_ids=ids).logits, student.eval()(input_ids=ids).logits)

    # the checkpoints hold the student only: its tensors, one model file, an optimizer over its parameters
    checkpoint = tmp_path / "run" / "checkpoint-6"
    with safe_open(checkpoint / "model.safetensors", framework="pt") as f:
        keys = set(f.keys())
    assert keys <= set(student.state_dict()) and not [k for k in keys if "teacher" in k]
    files = {p.name for p in checkpoint.iterdir() if p.suffix in (".safetensors", ".bin", ".pt", ".pth")}
    assert files == {"model.safetensors", "optimizer.pt", "scheduler.pt", "rng_state.pth", "training_args.bin"}
    optimizer = torch.load(checkpoint / "optimizer.pt", weights_only=True)
    optimized = sum(len(group["params"]) for group in optimizer["param_groups"])
    assert optimized == sum(1 for p in student.parameters() if p.requires_grad)
    assert_teacher_untouched(teacher, before)


# ---------------------------------------------------------------------------------------------------------------
# DDP: 2 CPU ranks (gloo), each with its own teacher


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _InputRecorder(DistillationTrainer):
    """Keeps the first micro-batch this rank trained on."""

    first_inputs = None

    def compute_loss(self, model, inputs, *args, **kwargs):
        if self.first_inputs is None:
            self.first_inputs = {k: v.detach().cpu() for k, v in inputs.items()}
        return super().compute_loss(model, inputs, *args, **kwargs)


def _ddp_rank(out: str) -> None:
    rank = int(os.environ["RANK"])
    torch.distributed.init_process_group("gloo")
    recorder = GradRecorder()
    teacher = bert(1)
    before = snapshot(teacher)
    trainer = _InputRecorder(
        model=bert(0),
        args=training_args(
            os.path.join(out, "run"),
            max_steps=2,
            per_device_train_batch_size=4,
            max_grad_norm=0.0,
            ddp_backend="gloo",
            seed=0,
        ),
        train_dataset=padded_dataset(),
        teacher=teacher,
        distillation=ALL_TERMS,
        callbacks=[recorder],
    )
    trainer.train()
    wrapped = type(trainer.model_wrapped).__name__
    torch.save(
        {
            "inputs": trainer.first_inputs,
            "grads": recorder.grads,
            "weights": snapshot(trainer.model),
            "wrapped": wrapped,
            "teacher_is_plain": type(trainer.teacher) is BertForSequenceClassification,
            "logs": [e for e in trainer.state.log_history if "loss" in e],
        },
        os.path.join(out, f"rank{rank}.pt"),
    )
    assert_teacher_untouched(teacher, before)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def test_ddp_gradient_is_the_global_batch_gradient(tmp_path):
    """Under DDP (2 ranks x batch 4) the synchronised gradient is the gradient of the distillation loss of the 8
    examples both ranks saw, computed in one process; the teacher is never wrapped; the ranks stay equal."""
    pythonpath = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": pythonpath}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1"]
    cmd += ["--master_port", str(_free_port()), "-m", "tests.test_distillation", str(tmp_path)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    assert [r["wrapped"] for r in ranks] == ["DistributedDataParallel"] * 2
    assert all(r["teacher_is_plain"] for r in ranks)
    assert all(torch.equal(ranks[0]["weights"][k], ranks[1]["weights"][k]) for k in ranks[0]["weights"])
    assert ranks[0]["logs"] == ranks[1]["logs"] and "distill/attention" in ranks[0]["logs"][0]
    assert not torch.equal(ranks[0]["inputs"]["input_ids"], ranks[1]["inputs"]["input_ids"])

    inputs = {k: torch.cat([r["inputs"][k] for r in ranks]) for k in ranks[0]["inputs"]}
    student, teacher = bert(0), bert(1)
    for model in (student, teacher):
        model.set_attn_implementation("eager")
    student.train()
    flags = {"output_hidden_states": True, "output_attentions": True}
    outputs = student(**inputs, **flags)
    with torch.no_grad():
        teacher_outputs = teacher.eval()(**{k: v for k, v in inputs.items() if k != "labels"}, **flags)
    losses = distillation_loss(outputs, teacher_outputs, outputs.loss, ALL_TERMS, inputs["attention_mask"])
    losses["loss"].backward()
    for name, grad in ranks[0]["grads"].items():
        torch.testing.assert_close(grad, dict(student.named_parameters())[name].grad, rtol=1e-4, atol=1e-6, msg=name)


if __name__ == "__main__":
    _ddp_rank(sys.argv[1])
