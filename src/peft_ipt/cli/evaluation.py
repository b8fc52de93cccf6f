"""Scoring a model on a split: one function shared by `train` (test metrics) and `eval` (their reproduction)."""

from __future__ import annotations

from collections.abc import Sequence

import datasets
import torch
from torch import nn

from .data import collator_for, padded_prompts, prompt_text, tokenize_classification
from .experiment import Experiment
from .metrics import classification_metrics, generation_metrics


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def predict_labels(model: nn.Module, split: datasets.Dataset, tokenizer, experiment: Experiment) -> list[int]:
    """Argmax class of each row of a canonical classification split, in order."""
    rows = tokenize_classification(split, tokenizer, experiment.data).remove_columns("labels")
    loader = torch.utils.data.DataLoader(
        rows,
        batch_size=experiment.training_settings["per_device_eval_batch_size"],
        collate_fn=collator_for(experiment, tokenizer),
    )
    was_training = model.training
    model.eval()
    predictions = []
    for batch in loader:
        batch = {k: v.to(_device(model)) for k, v in batch.items()}
        predictions.extend(model(**batch).logits.argmax(-1).tolist())
    model.train(was_training)
    return predictions


@torch.no_grad()
def generate_texts(
    model: nn.Module,
    tokenizer,
    texts: Sequence[str],
    experiment: Experiment,
    max_new_tokens: int | None = None,
) -> list[str]:
    """Decoded continuations of each input (greedy unless generation.num_beams > 1), without the prompt."""
    settings = experiment.generation
    prompts = tokenizer(
        [prompt_text(t, experiment) for t in texts], truncation=True, max_length=experiment.data.max_length
    )["input_ids"]
    causal = experiment.task_type == "CAUSAL_LM"
    was_training = model.training
    model.eval()
    outputs = []
    for start in range(0, len(prompts), settings.batch_size):
        chunk = prompts[start : start + settings.batch_size]
        batch = {
            k: v.to(_device(model))
            for k, v in padded_prompts(chunk, tokenizer.pad_token_id, left=causal).items()
        }
        generated = model.generate(
            **batch,
            max_new_tokens=max_new_tokens or settings.max_new_tokens,
            num_beams=settings.num_beams,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
        )
        if causal:  # a decoder-only model's output starts with the (padded) prompt
            generated = generated[:, batch["input_ids"].shape[1] :]
        outputs.extend(text.strip() for text in tokenizer.batch_decode(generated, skip_special_tokens=True))
    model.train(was_training)
    return outputs


def evaluate_split(
    model: nn.Module, tokenizer, split: datasets.Dataset, experiment: Experiment
) -> dict[str, float]:
    """Every metric of the task on a canonical split (see :mod:`peft_ipt.cli.data`), plus its size."""
    if experiment.task_type == "SEQ_CLS":
        metrics = classification_metrics(
            predict_labels(model, split, tokenizer, experiment), list(split["label"])
        )
    else:
        hypotheses = generate_texts(model, tokenizer, list(split["input"]), experiment)
        metrics = generation_metrics(hypotheses, list(split["references"]))
    return {**metrics, "examples": len(split)}
