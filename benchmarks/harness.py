"""What every benchmark script shares: training runs, the results files, statistics, tables and plots.

- :func:`train_run`: one ``peft-ipt train`` in this process, into a temporary folder, returning what the CLI writes to
  metrics.json (quality.py, prefix_init.py);
- :class:`ResultsFile`: runs merged by key into one JSON document, written atomically after every run, so a script can
  be stopped and rerun in pieces (quality.py, prefix_init.py);
- :func:`write_outputs`: a measurement's JSON and markdown side by side (speed.py, processes.py);
- :func:`ci95`, :func:`quartiles`: the spread the tables report;
- :func:`markdown_table`, :func:`figure` / :func:`save_figure`: the tables and the PNG plots.
"""

from __future__ import annotations

import json
import math
import os
import shlex
import statistics
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
RESULTS = Path(__file__).resolve().parent / "results"


# ---------------------------------------------------------------------------------------------------------
# Runs


def train_run(config: Path, overrides: Sequence[str]) -> dict[str, Any]:
    """``peft-ipt train CONFIG --set ...`` in this process, into a temporary output folder (removed after)."""
    from peft_ipt.cli.train import train

    with tempfile.TemporaryDirectory(prefix="benchmark_") as output:
        return train(config, list(overrides), output_dir=output)


def train_command(config: Path, overrides: Sequence[str]) -> str:
    """The shell command that reproduces :func:`train_run` (stored with each run)."""
    path = config.relative_to(ROOT) if config.is_relative_to(ROOT) else config
    return f"peft-ipt train {path} " + " ".join(f"--set {shlex.quote(o)}" for o in overrides)


class ResultsFile:
    """A JSON document whose ``runs`` are merged by key: each finished run is merged into the file as it is on disk
    (another piece of the benchmark may have written since), and the file is replaced in one step."""

    def __init__(self, path: Path):
        self.path = path

    def field(self, name: str, empty: Any) -> Any:
        return json.loads(self.path.read_text()).get(name, empty) if self.path.is_file() else empty

    def runs(self) -> dict[str, dict[str, Any]]:
        return self.field("runs", {})

    def write(self, document: dict[str, Any]) -> None:
        write_json(self.path, document)


def library_versions() -> dict[str, str]:
    """The versions a run trained under: peft's own PrefixTuning, for one, refuses BERT-family models and decoder
    classifiers from transformers 5.24 on, so its rows may come from another environment than the rest."""
    import peft
    import torch
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__}


def write_json(path: Path, document: Any) -> None:
    """Write JSON through a temporary file and a rename: readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(path.suffix + ".tmp")
    temporary.write_text(json.dumps(document, indent=2, default=str) + "\n")
    os.replace(temporary, path)


def write_outputs(stem: str, data: dict, markdown: str, out_dir: Path) -> None:
    """``<stem>.json`` and ``<stem>.md`` in ``out_dir`` (a plot, if any, is ``<stem>.png``); the markdown printed."""
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(out_dir / f"{stem}.json", data)
    (out_dir / f"{stem}.md").write_text(markdown.rstrip("\n") + "\n")
    print(markdown)
    print(f"\nwrote {out_dir / stem}.json / .md" + (" / .png" if (out_dir / f"{stem}.png").exists() else ""))


# ---------------------------------------------------------------------------------------------------------
# Statistics


def ci95(values: Sequence[float]) -> float:
    """Half-width of the 95% confidence interval of the mean (Student's t, n - 1 degrees of freedom); 0 for n < 2."""
    if len(values) < 2:
        return 0.0
    from scipy.stats import t

    return float(t.ppf(0.975, len(values) - 1) * statistics.stdev(values) / math.sqrt(len(values)))


def mean_ci(values: Sequence[float]) -> str:
    """A signed mean with its 95% CI half-width, "+1.21 ± 2.34"; one value has no CI and says so."""
    mean = statistics.mean(values)
    return f"{mean:+.2f} ± {ci95(values):.2f}" if len(values) > 1 else f"{mean:+.2f} (one seed, no CI)"


def quartiles(values: Sequence[float]) -> tuple[float, float]:
    """(p25, p75); one value gives itself twice, none gives NaNs."""
    if len(values) < 2:
        return (values[0], values[0]) if values else (float("nan"), float("nan"))
    q = statistics.quantiles(values, n=4, method="inclusive")
    return q[0], q[2]


# ---------------------------------------------------------------------------------------------------------
# Tables and plots


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def figure(rows: int, columns: int, panel: tuple[float, float], extra_width: float = 0.0):
    """A matplotlib Figure on the Agg canvas (no display needed) and its axes, a ``rows x columns`` grid."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(panel[0] * columns + extra_width, panel[1] * rows), constrained_layout=True)
    FigureCanvasAgg(fig)
    return fig, fig.subplots(rows, columns, squeeze=False)


def save_figure(fig, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
