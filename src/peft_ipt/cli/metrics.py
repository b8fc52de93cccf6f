"""Task metrics, computed with scikit-learn, sacrebleu and rouge-score directly (no Hub download)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def classification_metrics(predictions: Sequence[int], labels: Sequence[int]) -> dict[str, float]:
    """Accuracy and macro-averaged F1, both in [0, 1]."""
    from sklearn.metrics import accuracy_score, f1_score

    return {
        "accuracy": float(accuracy_score(labels, predictions)),
        "macro_f1": float(f1_score(labels, predictions, average="macro", zero_division=0)),
    }


def trainer_classification_metrics(eval_prediction) -> dict[str, float]:
    """``Trainer(compute_metrics=...)`` for classification: logits -> accuracy, macro F1."""
    logits = eval_prediction.predictions
    logits = logits[0] if isinstance(logits, tuple) else logits
    return classification_metrics(np.argmax(logits, axis=-1), eval_prediction.label_ids)


def generation_metrics(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> dict[str, float]:
    """Corpus BLEU against every reference of each input, and ROUGE-L F1 (best reference, averaged), 0-100.

    Inputs have different numbers of references: sacrebleu takes reference *streams*, and a stream holds None
    where an input has fewer references than the most.
    """
    import sacrebleu
    from rouge_score import rouge_scorer

    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} reference lists")
    depth = max(len(refs) for refs in references)
    streams = [[refs[i] if i < len(refs) else None for refs in references] for i in range(depth)]
    bleu = sacrebleu.corpus_bleu(list(hypotheses), streams).score
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    rouge = [
        scorer.score_multi(list(refs), hyp)["rougeL"].fmeasure
        for hyp, refs in zip(hypotheses, references, strict=True)
    ]
    return {"bleu": float(bleu), "rouge_l": float(100 * np.mean(rouge))}
