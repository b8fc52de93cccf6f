"""training_curves.png: train loss and the validation metric against the optimisation step."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def _series(history: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    points = [(entry["step"], entry[key]) for entry in history if key in entry and "step" in entry]
    return [s for s, _ in points], [v for _, v in points]


def plot_training_curves(history: list[dict[str, Any]], metric: str, path: Path | str) -> None:
    """Two panels from ``Trainer.state.log_history``: losses (train, validation) and ``eval_<metric>``."""
    # The Agg canvas directly, not pyplot: no global backend switch, no display needed.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(10, 4), constrained_layout=True)
    FigureCanvasAgg(figure)
    losses, scores = figure.subplots(1, 2)
    for key, label, style in (("loss", "train loss", "-"), ("eval_loss", "validation loss", "o--")):
        steps, values = _series(history, key)
        if steps:
            losses.plot(steps, values, style, label=label)
    losses.set(xlabel="step", ylabel="loss", title="loss")
    losses.legend()
    steps, values = _series(history, f"eval_{metric}")
    scores.plot(steps, values, "o-", color="tab:green")
    scores.set(xlabel="step", ylabel=metric, title=f"validation {metric}")
    for axis in (losses, scores):
        axis.grid(alpha=0.3)
    figure.savefig(path, dpi=100)
