"""A real fine-tune: the packaged all-MiniLM-L6-v2 (first 2 layers) on real Rotten Tomatoes snippets, W1A1."""

import numpy as np
import pytest
import torch
from datasets import Dataset
from transformers import AutoModelForSequenceClassification, AutoTokenizer, Trainer, TrainingArguments

from stompp_hf import StoMPPCallback, StoMPPConfig, binarized, stompp_modules
from stompp_hf.assets import load_rotten_tomatoes, minilm_path


@pytest.mark.slow
def test_minilm_bnn_finetune_ends_binary_and_above_chance(tmp_path):
    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    train_rows, val_rows = load_rotten_tomatoes(n_train=800, n_validation=400)

    def encode(rows):
        return Dataset.from_list(rows).map(
            lambda b: tokenizer(b["sentence"], truncation=True, max_length=64), batched=True
        )

    config = StoMPPConfig(weights="stompp_ste", activations="stompp_ste")
    model = AutoModelForSequenceClassification.from_pretrained(
        minilm_path(), num_labels=2, num_hidden_layers=2, quantization_config=config
    )
    assert len(stompp_modules(model)) == 2 * 6 + 1

    def accuracy(pred):
        return {"accuracy": float(np.mean(pred.predictions.argmax(-1) == pred.label_ids))}

    args = TrainingArguments(
        str(tmp_path),
        per_device_train_batch_size=32,
        learning_rate=5e-4,
        num_train_epochs=3,
        logging_steps=5,
        report_to=[],
        save_strategy="no",
        disable_tqdm=True,
        seed=0,
    )
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=encode(train_rows),
        eval_dataset=encode(val_rows),
        processing_class=tokenizer,
        compute_metrics=accuracy,
        callbacks=[StoMPPCallback(progression_fraction=0.7)],
    )
    trainer.train()

    # every StoMPP tensor is frozen: the trained network *is* the binary network
    for module in stompp_modules(model).values():
        assert module.weight_frozen_fraction == 1.0 and module.input_frozen_fraction == 1.0
    acc = trainer.evaluate()["eval_accuracy"]
    with binarized(model):
        assert trainer.evaluate()["eval_accuracy"] == acc
    # 400 balanced validation snippets: chance is 0.5 with a standard error of 0.025
    assert acc > 0.56, acc
