"""Binarize the packaged all-MiniLM-L6-v2 (W1A1) on the packaged Rotten Tomatoes snippets, fully offline.

    python recipes/demo_minilm.py --output_dir outputs/demo

A short stand-in for the GLUE recipe: `Trainer` + `StoMPPCallback`, then the accuracy of the full-precision
baseline and of the binarized network (and the continuous network as trained), written to
`<output_dir>/all_results.json`.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field

import numpy as np
from datasets import Dataset
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    HfArgumentParser,
    Trainer,
    TrainingArguments,
)

from stompp_hf import StoMPPCallback, StoMPPConfig, binarized
from stompp_hf.assets import load_rotten_tomatoes, minilm_path


@dataclass
class DemoArguments:
    output_dir: str = field(default="outputs/demo", metadata={"help": "Where results and the checkpoint go."})
    n_train: int = field(default=3000, metadata={"help": "Training snippets (stratified)."})
    n_validation: int = field(default=1000, metadata={"help": "Validation snippets (balanced)."})
    num_hidden_layers: int = field(default=6, metadata={"help": "Encoder layers of MiniLM to keep (6 = all)."})
    epochs: float = field(default=2.0, metadata={"help": "Training epochs."})
    learning_rate: float = field(default=2e-4, metadata={"help": "AdamW learning rate (binarized run)."})
    fp_learning_rate: float = field(default=5e-5, metadata={"help": "AdamW learning rate (full-precision run)."})
    rule: str = field(default="stompp_ste", metadata={"help": "StoMPP rule for weights and activations."})
    progression_fraction: float = field(default=0.7, metadata={"help": "Share of steps spent progressing."})
    skip_fp: bool = field(default=False, metadata={"help": "Skip the full-precision baseline."})
    seed: int = field(default=0, metadata={"help": "Seed."})


def main() -> None:
    (demo,) = HfArgumentParser(DemoArguments).parse_args_into_dataclasses()
    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    train_rows, val_rows = load_rotten_tomatoes(demo.n_train, demo.n_validation, seed=42)

    def encode(rows):
        return Dataset.from_list(rows).map(
            lambda b: tokenizer(b["sentence"], truncation=True, max_length=64), batched=True
        )

    train_set, val_set = encode(train_rows), encode(val_rows)

    def accuracy(pred):
        return {"accuracy": float(np.mean(pred.predictions.argmax(-1) == pred.label_ids))}

    def run(name: str, quantization_config: StoMPPConfig | None, lr: float) -> dict:
        model = AutoModelForSequenceClassification.from_pretrained(
            minilm_path(),
            num_labels=2,
            num_hidden_layers=demo.num_hidden_layers,
            quantization_config=quantization_config,
        )
        args = TrainingArguments(
            os.path.join(demo.output_dir, name),
            per_device_train_batch_size=32,
            per_device_eval_batch_size=64,
            learning_rate=lr,
            num_train_epochs=demo.epochs,
            logging_steps=10,
            report_to=[],
            save_strategy="no",
            seed=demo.seed,
        )
        callbacks = [StoMPPCallback(progression_fraction=demo.progression_fraction)] if quantization_config else []
        trainer = Trainer(
            model=model,
            args=args,
            train_dataset=train_set,
            eval_dataset=val_set,
            processing_class=tokenizer,
            compute_metrics=accuracy,
            callbacks=callbacks,
        )
        start = time.time()
        trainer.train()
        result = {
            "train_seconds": round(time.time() - start, 1),
            "accuracy": trainer.evaluate()["eval_accuracy"],
            "steps": trainer.state.global_step,
        }
        if quantization_config is not None:
            with binarized(model):
                result["binarized_accuracy"] = trainer.evaluate()["eval_accuracy"]
            trainer.save_model(os.path.join(demo.output_dir, name, "final"))
        return result

    results = {}
    if not demo.skip_fp:
        results["full_precision"] = run("fp", None, demo.fp_learning_rate)
    config = StoMPPConfig(weights=demo.rule, activations=demo.rule)
    results[f"w1a1_{demo.rule}"] = run("stompp", config, demo.learning_rate)
    os.makedirs(demo.output_dir, exist_ok=True)
    path = os.path.join(demo.output_dir, "all_results.json")
    with open(path, "w") as f:
        json.dump(results, f, indent=2)
    print(json.dumps(results, indent=2))
    print(f"Results written to {path}; binarized checkpoint in {os.path.join(demo.output_dir, 'stompp', 'final')}")


if __name__ == "__main__":
    main()
