"""Model cards rendered from `model_cards/` and Hub uploads of StoMPP checkpoints.

* `model_card(model, ...)` renders the card: base model, task, dataset, StoMPP settings, the size table of
  `summary`, evaluation metrics when known, how to load, tags `stompp` / `binarized` / `1-bit`, license. Its title
  says what the model is (never the output folder's name), its snippet loads the Hub repository or the folder given,
  `pipeline_tag` comes from the model's head, and the metrics fill `model-index` when a Hub dataset id is known (no
  `model-index` at all otherwise: the Hub rejects an empty one).
* `push_to_hub(model, repo_id, ...)` saves the checkpoint (packed once every tensor is frozen) and the card in a
  temporary folder and uploads it. `model.push_to_hub(repo_id)` calls it on StoMPP models loaded through the
  quantizer or `prepare_model` (`attach_hub_support` binds it on the instance).
* `trainer.push_to_hub()`: Transformers' `Trainer` writes its own card right before uploading, with no hook to
  replace it, so `Trainer.create_model_card` is wrapped (`wrap_trainer_model_card`) once a StoMPP model is attached
  (`attach_hub_support`, when `transformers.trainer` is loaded) or a `StoMPPCallback` is created, never at import:
  for StoMPP models only, the Trainer's card (hyperparameters, results) is kept as the "Training details" section
  of the StoMPP card. Other models are untouched.

Uploads go through `transformers.utils.hub.hf_api()`, the same client `PreTrainedModel.push_to_hub` and `Trainer`
use.
"""

from __future__ import annotations

import functools
import importlib.resources
import os
import sys
import tempfile
import types
from pathlib import Path
from typing import Any

from huggingface_hub import EvalResult, ModelCard, ModelCardData
from torch import nn

from ...export import checkpoint_format
from ...progression import find_config
from ...sizes import summary
from ..timm import is_timm_model

TAGS = ["stompp", "binarized", "1-bit"]
DEFAULT_TEMPLATE = "stompp_model_card.md"


def template_path(name: str = DEFAULT_TEMPLATE) -> Path:
    """The card template `name` from the top-level `model_cards/` folder (a checkout, or the installed wheel)."""
    local = Path(__file__).resolve().parents[3] / "model_cards" / name
    if local.is_file():
        return local
    packaged = importlib.resources.files("stompp_hf.model_cards") / name
    if packaged.is_file():
        return Path(str(packaged))
    raise FileNotFoundError(f"StoMPP model card template {name!r} not found in model_cards/.")


def is_stompp_model(model: nn.Module) -> bool:
    try:
        find_config(model)
    except ValueError:
        return False
    return True


def _base_model(model: nn.Module) -> str | None:
    """The Hub id the model was loaded from, when it was a Hub id (not a local folder)."""
    name = getattr(getattr(model, "config", None), "_name_or_path", None)
    if not name or os.path.isdir(name) or os.path.isabs(name) or name.count("/") > 1:
        return None
    return name


#: Transformers head class suffix -> (its auto class, its Hub pipeline tag or None).
_HEADS = (
    ("ForSequenceClassification", "AutoModelForSequenceClassification", "text-classification"),
    ("ForTokenClassification", "AutoModelForTokenClassification", "token-classification"),
    ("ForQuestionAnswering", "AutoModelForQuestionAnswering", "question-answering"),
    ("ForMaskedLM", "AutoModelForMaskedLM", "fill-mask"),
    ("ForMultipleChoice", "AutoModelForMultipleChoice", None),
)
#: Where the loading snippet points when neither a Hub id nor a folder was given.
PLACEHOLDER_LOCATION = "path/to/checkpoint"


def _auto_class(model: nn.Module) -> str:
    name = type(model).__name__
    return next((auto for suffix, auto, _ in _HEADS if name.endswith(suffix)), "AutoModel")


def infer_task(model: nn.Module) -> str | None:
    """The Hub pipeline tag of `model`: from its head class (Transformers), `image-classification` for timm models."""
    if is_timm_model(model):
        return "image-classification"
    name = type(model).__name__
    return next((task for suffix, _, task in _HEADS if name.endswith(suffix)), None)


def _is_hub_id(location: str) -> bool:
    """A Hub repository id (`name` or `owner/name`), as opposed to a local folder."""
    return not (os.path.isabs(location) or os.path.exists(location) or location.startswith(".")) and (
        location.count("/") <= 1
    )


def _precision_short(config) -> str:
    """`W1A1`, `W1A32` (binary weights only) or `W32A1` (binary activations only)."""
    return f"W{1 if config.weights is not None else 32}A{1 if config.activations is not None else 32}"


def default_title(model: nn.Module, config, base_model: str | None, datasets: list[str]) -> str:
    """`<base model> StoMPP W1A1 on <dataset>`: what the model is, never the name of the folder it was saved in."""
    if base_model:
        base = base_model.split("/")[-1]
    elif is_timm_model(model):
        base = model.pretrained_cfg.get("architecture") or type(model).__name__
    else:
        base = getattr(getattr(model, "config", None), "model_type", None) or type(model).__name__
    return f"{base} StoMPP {_precision_short(config)}" + (f" on {datasets[0].split('/')[-1]}" if datasets else "")


def _eval_results(task: str | None, datasets: list[str], dataset_name: str | None, metrics: dict[str, Any]):
    """The model-index entries of `metrics` (`{"eval_accuracy": 0.8, ...}`) on the first dataset, or None when the
    task, the dataset or numeric metrics are missing (the Hub rejects partial entries)."""
    numeric = {
        k.removeprefix("eval_"): v
        for k, v in metrics.items()
        if isinstance(v, (int, float)) and not isinstance(v, bool) and not k.endswith(("runtime", "per_second"))
    }
    if not (task and datasets and numeric):
        return None
    return [
        EvalResult(
            task_type=task,
            dataset_type=datasets[0],
            dataset_name=dataset_name or datasets[0],
            metric_type=name,
            metric_value=value,
        )
        for name, value in numeric.items()
    ]


def _precision_text(config, vision: bool = False) -> str:
    weights = "1-bit weights" if config.weights is not None else "full-precision weights"
    activations = "1-bit activations" if config.activations is not None else "full-precision activations"
    surge = (
        f", trained with SURGE gradient compensation (eta {config.surge_eta}; its auxiliary weights are training-only "
        "and not in this checkpoint)"
        if getattr(config, "compensation", None) == "surge"
        else ""
    )
    rules = f"(weight rule `{config.weights}`, activation rule `{config.activations}`{surge})"
    if vision:
        return (
            f"{weights} and {activations} in every convolution of the residual blocks {rules}; the first "
            "convolution, the downsampling / projection shortcuts, batch norm and the classifier stay full precision."
        )
    return (
        f"{weights} and {activations} in every encoder linear layer {rules}; embeddings, normalisation, attention "
        "matmuls and the classifier stay full precision."
    )


def _format_metric(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def model_card(
    model: nn.Module,
    repo_id: str | os.PathLike | None = None,
    *,
    base_model: str | None = None,
    task: str | None = None,
    dataset: str | list[str] | None = None,
    dataset_name: str | None = None,
    metrics: dict[str, Any] | None = None,
    license: str = "apache-2.0",
    model_name: str | None = None,
    training_details: str | None = None,
    card_data: ModelCardData | None = None,
    template: str | os.PathLike | None = None,
) -> ModelCard:
    """Render the model card of a StoMPP `model` from the `model_cards/` template.

    Args:
        repo_id: where the checkpoint lives, which the loading snippet loads: its Hub repository (`owner/name`) or
            the local folder it is saved in (a placeholder when neither is given).
        base_model: Hub id of the model it was fine-tuned from (default: read from the config when it is one).
        task: the Hub pipeline tag (default: inferred from the model's head, e.g. `text-classification`).
        dataset: Hub dataset id(s), for the metadata and the model-index.
        dataset_name: how the text names the dataset (default: the ids).
        metrics: evaluation results, e.g. `{"eval_accuracy": 0.81}`; with a task and a dataset they also fill the
            card's `model-index`.
        model_name: the title (default: `<base model> StoMPP W1A1 (<dataset>)`, or the repository's name).
        training_details: Markdown appended as "Training details" (e.g. the `Trainer`'s card body).
        card_data: metadata to start from (e.g. the `Trainer` card's); tags, license and library are added.
        template: a template path instead of `model_cards/stompp_model_card.md`.
    """
    config = find_config(model)
    base_model = base_model or _base_model(model)
    task = task or infer_task(model)
    datasets = [dataset] if isinstance(dataset, str) else list(dataset or [])
    data = card_data or ModelCardData()
    timm_cfg = model.pretrained_cfg if is_timm_model(model) else None
    data.library_name = "timm" if timm_cfg else "transformers"
    data.license = data.license or license
    data.tags = list(dict.fromkeys([*(data.tags or []), *TAGS]))
    if base_model:
        data.base_model = data.base_model or base_model
    if datasets:
        data.datasets = list(dict.fromkeys([*(data.datasets or []), *datasets]))
    if task and not data.pipeline_tag:
        data.pipeline_tag = task

    location = os.fspath(repo_id) if repo_id is not None else None
    hub_id = location if location is not None and _is_hub_id(location) else None
    name = model_name or (hub_id.split("/")[-1] if hub_id else None)
    name = name or default_title(model, config, base_model, datasets)
    if not data.eval_results:  # keep the results a Trainer card brought; never write an empty model-index
        data.eval_results = _eval_results(task, datasets, dataset_name, metrics or {})
    if data.eval_results:
        data.model_name = name
    else:
        data.eval_results, data.model_name = None, None

    packed, reason = checkpoint_format(model)
    packed = packed == "packed"
    example = None
    if timm_cfg:
        from ..timm.policy import example_input

        example = example_input(model, size=timm_cfg.get("input_size", (0, 224, 224))[-1])
    table = summary(model, example_inputs=example, print_fn=None)
    settings = {k: v for k, v in config.to_dict().items() if k not in ("quant_method", "packed")}
    location = location or PLACEHOLDER_LOCATION
    return ModelCard.from_template(
        data,
        template_path=str(template or template_path()),
        model_name=name,
        repo_id=location,
        timm_location=f"hf-hub:{hub_id}" if hub_id else location,
        base_model_text=f"[{base_model}](https://huggingface.co/{base_model})" if base_model else "model",
        task=task,
        dataset_text=dataset_name or ", ".join(datasets),
        precision_text=_precision_text(config, vision=bool(timm_cfg)),
        checkpoint_format="packed 1-bit checkpoint" if packed else "latent (still training) checkpoint",
        format_text=(
            "Binarized weights are stored 8 per byte"
            + (" with their per-channel scales" if config.weight_scale == "channel" else "")
            + "; logits after loading equal those of the trained model bit for bit."
            if packed
            else f"It holds latent full-precision weights to resume training from: {reason} when it was saved."
        ),
        auto_class=_auto_class(model),
        xnor_note=packed and config.weights is not None and config.activations is not None,
        timm_architecture=timm_cfg.get("architecture") if timm_cfg else None,
        metrics={k: _format_metric(v) for k, v in (metrics or {}).items()},
        settings=settings,
        summary_table=table.to_markdown(),
        training_details=training_details,
    )


def push_to_hub(
    model: nn.Module,
    repo_id: str,
    *,
    commit_message: str | None = None,
    commit_description: str | None = None,
    private: bool | None = None,
    token: bool | str | None = None,
    revision: str | None = None,
    create_pr: bool = False,
    max_shard_size: int | str | None = "50GB",
    tags: list[str] | None = None,
    tokenizer=None,
    **card_kwargs: Any,
):
    """Upload `model` (packed when fully binary) with a StoMPP model card and, if given, its tokenizer.

    `card_kwargs` go to `model_card` (base_model, task, dataset, metrics, license, ...).
    """
    from transformers.utils.hub import hf_api

    api = hf_api()
    repo_id = api.create_repo(repo_id, private=private, token=token, exist_ok=True).repo_id
    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder, max_shard_size=max_shard_size)
        if tokenizer is not None:
            tokenizer.save_pretrained(folder)
        card = model_card(model, repo_id, **card_kwargs)
        if tags:
            card.data.tags = list(dict.fromkeys([*card.data.tags, *tags]))
        card.save(os.path.join(folder, "README.md"))
        return api.upload_folder(
            repo_id=repo_id,
            folder_path=folder,
            commit_message=commit_message or "Upload StoMPP binarized model",
            commit_description=commit_description,
            token=token,
            revision=revision,
            create_pr=create_pr,
        )


def _bound_push_to_hub(self, repo_id: str, **kwargs):
    return push_to_hub(self, repo_id, **kwargs)


def attach_hub_support(model: nn.Module) -> None:
    """Tag `model` for the Hub and make `model.push_to_hub(repo_id)` upload the StoMPP card (instance only)."""
    if hasattr(model, "add_model_tags"):
        model.add_model_tags(TAGS)
    if hasattr(model, "push_to_hub"):
        model.push_to_hub = types.MethodType(_bound_push_to_hub, model)
    if "transformers.trainer" in sys.modules:  # never import Trainer just for this: `StoMPPCallback` wraps it too
        wrap_trainer_model_card()


def _training_details(trainer_card_text: str) -> str:
    """The Trainer card's "Training procedure" part (hyperparameters, results, versions), without its heading."""
    text = trainer_card_text.strip()
    start = text.find("## Training procedure")
    if start < 0:
        return ""
    return "\n".join(text[start:].splitlines()[1:]).strip()


def _last_eval_metrics(log_history: list[dict]) -> dict[str, Any]:
    for entry in reversed(log_history):
        metrics = {
            k: v for k, v in entry.items() if k.startswith("eval_") and not k.endswith(("_runtime", "per_second"))
        }
        if metrics:
            return metrics
    return {}


def _first(value: str | list[str] | None) -> str | None:
    return value if isinstance(value, str) or value is None else (value[0] if value else None)


def wrap_trainer_model_card() -> None:
    """Make `Trainer.create_model_card` write the StoMPP card for StoMPP models (idempotent; imports `Trainer`)."""
    from transformers import Trainer

    original = Trainer.create_model_card
    if getattr(original, "_stompp_wrapped", False):
        return

    @functools.wraps(original)
    def create_model_card(self, *args, **kwargs):
        original(self, *args, **kwargs)
        model = self.accelerator.unwrap_model(self.model)
        if not self.is_world_process_zero() or not is_stompp_model(model):
            return
        path = os.path.join(self.args.output_dir, "README.md")
        trainer_card = ModelCard.load(path)
        tasks = kwargs.get("tasks")
        card = model_card(
            model,
            self.hub_model_id or self.args.output_dir,
            model_name=kwargs.get("model_name"),
            task=(tasks if isinstance(tasks, str) else (tasks or [None])[0]) or None,
            dataset=trainer_card.data.datasets,
            dataset_name=_first(kwargs.get("dataset")),
            metrics=_last_eval_metrics(self.state.log_history),
            license=kwargs.get("license") or trainer_card.data.license or "apache-2.0",
            training_details=_training_details(trainer_card.text) or None,
            card_data=trainer_card.data,
        )
        card.save(path)

    create_model_card._stompp_wrapped = True
    Trainer.create_model_card = create_model_card
