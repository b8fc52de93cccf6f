"""`peft-ipt generate`: load a trained causal-LM / seq2seq adapter and continue a text."""

from __future__ import annotations

from pathlib import Path

from .evaluation import generate_texts
from .experiment import GENERATION_TASKS
from .models import load_tokenizer, load_trained
from .train import CLIError, load_run


def generate(output_dir: str | Path, text: str, max_new_tokens: int | None = None) -> str:
    """The model's continuation of ``text``, formatted as in training (input + separator for causal LMs)."""
    experiment, output = load_run(output_dir)
    if experiment.task_type not in GENERATION_TASKS:
        raise CLIError(
            f"{output} holds a {experiment.task_type} model; generate needs CAUSAL_LM or SEQ_2_SEQ_LM "
            f"(use `peft-ipt eval {output}` for classifiers)"
        )
    tokenizer = load_tokenizer(experiment)
    model = load_trained(experiment, output, tokenizer, label_names=None)
    (continuation,) = generate_texts(model, tokenizer, [text], experiment, max_new_tokens=max_new_tokens)
    return continuation
