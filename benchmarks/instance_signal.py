"""Does IPT's instance part carry information about its input? Test-time interventions on a converged IPT model.

Usage (from the repository root, with the package installed)::

    python benchmarks/instance_signal.py --threads 2                          # Rotten Tomatoes and BBC News, seed 0
    python benchmarks/instance_signal.py --tasks rotten_tomatoes --seeds 0 1 2
    python benchmarks/instance_signal.py --method ipt_embeddings              # another IPT candidate of the tier
    python benchmarks/instance_signal.py --precision fp32 --method ipt_embeddings_scale --tasks rotten_tomatoes_256
    python benchmarks/instance_signal.py --report                             # rebuild table and plot from the JSON
    python benchmarks/instance_signal.py --quick --tasks rotten_tomatoes      # smoke run: tiny budget, quick files

For each task and seed it retrains one IPT candidate's run of the converged tier (``--method``; default the tier's
chosen IPT, ``quality.py --tier converged --print-chosen``): the exact ``peft-ipt train`` command recorded in
``results/quality_converged.json`` (``--precision fp32``: ``quality_converged_fp32.json``) at the rate chosen there, into ``outputs/instance_signal/<method>/<task>_seed<k>/``
(kept, so a rerun reuses it). It reloads the saved adapter with
``PeftModel.from_pretrained`` and scores the test split four ways, changing nothing but the instance prompt codes
(B, P, r) the encoder hands to the per-layer heads:

- ``own``: as trained; this must reproduce the test score the quality run recorded (shown side by side);
- ``shuffled``: every input gets another input's codes (the batch rolled by one: same distribution of codes, the
  wrong input);
- ``batch mean``: every input gets the mean code of its batch (an "average instance");
- ``task prefix only``: the instance part removed (codes None: the task prefix alone, as trained with it).

If the instance part carried information about its input, ``shuffled`` would fall well below ``own``; if it only acted
as a learned offset, ``batch mean`` would match ``own``. Each row gives the score, its difference from ``own`` with a
paired bootstrap 95% CI over the test examples (scipy), and the share of test predictions the intervention changes.
Two magnitudes come with it, over the test inputs: the instance part's norm over the task prefix's (keys and values,
every layer) and the input-specific share of the instance part (its norm after removing the batch mean, over its
norm). Results: ``results/instance_signal.{json,md,png}``; each (method, task, seed) is recorded as soon as it is
scored.
``--quick`` trains at quality.py's smoke budget (``QUICK_OVERRIDES``) into ``outputs/instance_signal_quick/`` and
writes ``results/instance_signal_quick.*``: it checks the code path, its numbers mean nothing.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path
from typing import Any

import quality
import torch
from harness import RESULTS, ROOT, ResultsFile, ci95, figure, markdown_table, save_figure
from quality import QUICK_OVERRIDES, find_row, library_versions

OUTPUTS = ROOT / "outputs"
INTERVENTIONS = ("own", "shuffled", "batch mean", "task prefix only")


def quality_file(precision: str) -> Path:
    """The converged tier's results for runs trained in this precision (quality.py --precision)."""
    return RESULTS / (
        "quality_converged.json" if precision == "bf16" else f"quality_converged_{precision}.json"
    )


def precision_flag(precision: str) -> str:
    return "" if precision == "bf16" else f" --precision {precision}"


def chosen_method(precision: str) -> str:
    """The converged tier's chosen IPT candidate, from its recorded rows (validation at seed 0, never test)."""
    quality.TIER = quality.TIERS["converged"]
    quality.PRECISION = precision  # which runs count as current
    source = quality_file(precision)
    chosen = quality.chosen_ipt(quality.summarize(quality.load_runs(source), quick=False))
    if chosen is None:
        raise SystemExit(
            f"{source} has no IPT candidate run on every goal task yet: pass --method, or run the converged tier "
            "first (`python benchmarks/quality.py --tier converged`)"
        )
    return chosen


def recorded_run(task: str, seed: int, method: str, precision: str) -> dict[str, Any]:
    """The converged tier's run of this IPT candidate at its chosen rate, for this task and seed."""
    source = quality_file(precision)
    document = ResultsFile(source)
    row = find_row(document.field("rows", []), task, method)
    if row is None:
        raise SystemExit(
            f"{source} has no {method} row for task {task!r}: run `python benchmarks/quality.py --tier converged "
            f"--tasks {task} --methods {method}{precision_flag(precision)}` first"
        )
    runs = [
        r
        for r in document.runs().values()
        if (r["task"], r["method"], r["seed"]) == (task, method, seed) and r["lr"] == row["best_lr"]
    ]
    if not runs:
        raise SystemExit(
            f"{source} has no {method} run for task {task!r} at seed {seed} and its chosen rate {row['best_lr']:g}: "
            f"run `python benchmarks/quality.py --tier converged --tasks {task} --methods {method} --seeds 0 {seed}"
            f"{precision_flag(precision)}`"
        )
    return runs[0]


def precision_tag(run: dict[str, Any]) -> str:
    """'' for the tier's main (bf16) runs, '_fp32' for those of its fp32 file: folders and keys stay apart."""
    precision = run.get("precision", "bf16")
    return "" if precision == "bf16" else f"_{precision}"


def trained_folder(run: dict[str, Any], quick: bool) -> Path:
    """Retrain the recorded command into a kept folder (skipped when the folder holds a finished run)."""
    from peft_ipt.cli.train import train

    folder = (
        OUTPUTS
        / ("instance_signal_quick" if quick else "instance_signal")
        / run["method"]
        / f"{run['task']}_seed{run['seed']}{precision_tag(run)}"
    )
    if (folder / "metrics.json").is_file():
        return folder
    words = shlex.split(run["command"])  # peft-ipt train CONFIG --set A --set B ...
    config, overrides = ROOT / words[2], [*words[4::2], *quality.former_default_overrides(run)]
    train(config, overrides + list(QUICK_OVERRIDES if quick else ()), output_dir=folder)
    return folder


class CodeIntervention:
    """Replaces the IPT module's prompt codes for the duration of a ``with`` block; ``own`` also measures them."""

    def __init__(self, module, kind: str):
        self.module, self.kind = module, kind
        self.sums = {"instance": 0.0, "task": 0.0, "specific": 0.0}  # squared norms over the inputs seen

    def codes(self, codes: torch.Tensor) -> torch.Tensor | None:  # (B, P, r)
        if self.kind == "shuffled":
            return codes.roll(1, dims=0)
        if self.kind == "batch mean":
            return codes.mean(0, keepdim=True).expand_as(codes)
        if self.kind == "task prefix only":
            return None
        return codes

    def __enter__(self) -> CodeIntervention:
        encode_inputs = self.module.encode_inputs

        def replaced(inputs):  # the module's prefixes() sets its task part, then combines what this returns
            codes = encode_inputs(inputs)
            if self.kind == "own":
                self._measure(codes)
            return self.codes(codes)

        self.module.encode_inputs = replaced  # an instance attribute: shadows the method until __exit__
        return self

    def __exit__(self, *exc) -> None:
        del self.module.encode_inputs

    def _measure(self, codes: torch.Tensor) -> None:
        full, task = self.module.combine(codes), self.module.combine(None)
        for kind in full:
            for side in (0, 1):  # keys, values
                for f, t in zip(
                    full[kind][side], task[kind][side], strict=True
                ):  # (B, n_kv, P, hd), (1, ...)
                    inst = f - t
                    self.sums["task"] += float((t**2).sum()) * f.shape[0]
                    self.sums["instance"] += float((inst**2).sum())
                    self.sums["specific"] += float(((inst - inst.mean(0, keepdim=True)) ** 2).sum())

    def magnitudes(self) -> dict[str, float]:
        s = self.sums
        return {
            "instance_over_task": (s["instance"] / s["task"]) ** 0.5,
            "input_specific_share": (s["specific"] / s["instance"]) ** 0.5,
        }


# Bootstrap resamples of the paired CI. Each costs two scikit-learn metric calls (most of a scored run's time: 175 of
# 260 s for the smoke run's three interventions, beside other jobs); the smoke run (--quick) is never read for its
# numbers, so it takes a tenth.
RESAMPLES = {False: 1000, True: 100}


def paired_ci(
    own: list[int], other: list[int], labels: list[int], metric: str, resamples: int
) -> tuple[float, float]:
    """95% percentile bootstrap CI of metric(other) - metric(own), resampling test examples (scipy)."""
    from scipy.stats import bootstrap

    from peft_ipt.cli.metrics import classification_metrics

    def difference(a, b, y):
        return classification_metrics(b, y)[metric] - classification_metrics(a, y)[metric]

    result = bootstrap(
        (own, other, labels),
        difference,
        paired=True,
        vectorized=False,
        n_resamples=resamples,
        method="percentile",
        rng=0,
    )
    return float(result.confidence_interval.low), float(result.confidence_interval.high)


def score(run: dict[str, Any], quick: bool) -> dict[str, Any]:
    from peft_ipt.cli.data import load_splits
    from peft_ipt.cli.evaluation import predict_labels
    from peft_ipt.cli.metrics import classification_metrics
    from peft_ipt.cli.models import load_tokenizer, load_trained
    from peft_ipt.cli.train import load_run
    from peft_ipt.instance_prompt.layer import InstancePromptModule

    folder = trained_folder(run, quick)
    experiment, _ = load_run(folder)
    if experiment.method_config.get("injection", "hybrid") != "hybrid":
        raise SystemExit(
            f"{folder}: the interventions compare against the task prefix, so they need injection='hybrid'"
        )
    splits = load_splits(experiment)
    tokenizer = load_tokenizer(experiment)
    model = load_trained(experiment, folder, tokenizer, splits.label_names)
    module = next(m for m in model.modules() if isinstance(m, InstancePromptModule))
    labels, metric = list(splits.test["label"]), run["main_metric"]
    predictions, magnitudes = {}, {}
    for kind in INTERVENTIONS:
        with CodeIntervention(module, kind) as intervention:
            predictions[kind] = predict_labels(model, splits.test, tokenizer, experiment)
        if kind == "own":
            magnitudes = intervention.magnitudes()
    own = predictions["own"]
    rows = {}
    for kind in INTERVENTIONS:
        value = classification_metrics(predictions[kind], labels)[metric]
        rows[kind] = {
            "score": value,
            "changed": sum(a != b for a, b in zip(own, predictions[kind], strict=True)) / len(own),
            "difference_ci95": None
            if kind == "own"
            else paired_ci(own, predictions[kind], labels, metric, RESAMPLES[quick]),
        }
    print(
        f"[instance_signal] {run['task']} seed {run['seed']}: "
        + ", ".join(f"{k} {100 * v['score']:.2f}" for k, v in rows.items())
        + f" ({metric}"
        + ("" if quick else f"; the quality run recorded {100 * run['test'][metric]:.2f}")
        + ")"
    )
    return {
        "method": run["method"],
        "task": run["task"],
        "seed": run["seed"],
        "precision": run.get("precision", "bf16"),
        "lr": run["lr"],
        "metric": metric,
        "recorded_test": None if quick else run["test"][metric],
        "command": run["command"],
        "folder": str(folder.relative_to(ROOT)),
        "interventions": rows,
        **magnitudes,
        "versions": library_versions(),
    }


def record(result: dict[str, Any], out: Path) -> None:
    document = ResultsFile(out)
    runs = document.runs()
    runs[f"{result['method']}/{result['task']}/{result['seed']}{precision_tag(result)}"] = result
    document.write(
        {"about": __doc__.split("\n\n")[0], "torch_threads": torch.get_num_threads(), "runs": runs}
    )


def write_report(out: Path) -> None:
    runs = ResultsFile(out).runs()
    if not runs:
        raise SystemExit(f"{out} holds no scored run yet: run `python benchmarks/instance_signal.py` first")
    panels = list(dict.fromkeys((r["method"], r["task"], r.get("precision", "bf16")) for r in runs.values()))
    lines = [
        "# Does IPT's instance part carry information about its input?",
        "",
        "IPT candidates of the converged tier (hybrid injection), each retrained from its recorded command and "
        "scored on test with its prompt codes replaced (`python benchmarks/instance_signal.py`). Points of the "
        "task's metric; difference from `own` with a paired bootstrap 95% CI over test examples (one seed) or the "
        "95% CI over seeds (several); changed: share of test predictions that differ from `own`.",
        "",
    ]
    fig, axes = figure(1, len(panels), (4.2, 3.2))
    for ax, (method, task, precision) in zip(axes[0], panels, strict=True):
        label = quality.CONVERGED_METHODS[method].label
        found = [
            r
            for r in runs.values()
            if (r["method"], r["task"], r.get("precision", "bf16")) == (method, task, precision)
        ]
        where = task if precision == "bf16" else f"{task}, {precision}"
        seeds = sorted(r["seed"] for r in found)
        metric = found[0]["metric"]
        table = []
        means = []
        for kind in INTERVENTIONS:
            scores = [100 * r["interventions"][kind]["score"] for r in found]
            gaps = [s - 100 * r["interventions"]["own"]["score"] for s, r in zip(scores, found, strict=True)]
            mean = sum(scores) / len(scores)
            means.append(mean)
            if kind == "own":
                gap = "-"
            elif len(found) == 1:
                lo, hi = found[0]["interventions"][kind]["difference_ci95"]
                gap = f"{gaps[0]:+.2f} [{100 * lo:+.2f}, {100 * hi:+.2f}]"
            else:
                gap = f"{sum(gaps) / len(gaps):+.2f} ± {ci95(gaps):.2f}"
            changed = sum(r["interventions"][kind]["changed"] for r in found) / len(found)
            spread = f" ± {ci95(scores):.2f}" if len(scores) > 1 else ""
            table.append([kind, f"{mean:.2f}{spread}", gap, f"{100 * changed:.1f}%"])
        recorded = [100 * r["recorded_test"] for r in found if r["recorded_test"] is not None]
        ratio = sum(r["instance_over_task"] for r in found) / len(found)
        specific = sum(r["input_specific_share"] for r in found) / len(found)
        lines += [
            f"## {label}: {where} ({metric}; seeds {', '.join(map(str, seeds))}; the quality run recorded "
            f"{', '.join(f'{v:.2f}' for v in recorded) or 'nothing at this budget (--quick)'})",
            "",
            markdown_table(["codes", "test", "difference from own", "changed"], table),
            f"Instance part / task prefix (norm of keys and values, every layer): {ratio:.3f}; input-specific share "
            f"of the instance part (norm without its batch mean / its norm): {specific:.3f}.",
            "",
        ]
        ax.bar(range(len(INTERVENTIONS)), means, color=["tab:blue", "tab:red", "tab:orange", "tab:gray"])
        ax.set_xticks(range(len(INTERVENTIONS)), [k.replace(" ", "\n") for k in INTERVENTIONS], fontsize=8)
        low = min(means)
        ax.set_ylim(max(0.0, low - 5), max(means) + 2)
        ax.set_title(
            f"{label}\n{where} ({metric}), {len(seeds)} seed{'s' if len(seeds) > 1 else ''}", fontsize=8
        )
        ax.set_ylabel("test points")
    save_figure(fig, out.with_suffix(".png"))
    text = "\n".join(lines)
    out.with_suffix(".md").write_text(text.rstrip("\n") + "\n")
    print(text)
    print(f"[instance_signal] wrote {out}, {out.with_suffix('.md')}, {out.with_suffix('.png')}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", nargs="+", default=["rotten_tomatoes", "bbc_news"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument(
        "--method",
        choices=list(quality.IPT_CANDIDATES),
        help="the IPT candidate to retrain (default: the converged tier's chosen one)",
    )
    parser.add_argument(
        "--precision",
        choices=quality.PRECISIONS,
        default="bf16",
        help="retrain a run of the tier's file for this precision (fp32: results/quality_converged_fp32.json)",
    )
    parser.add_argument("--threads", type=int, default=2, help="torch threads (the quality runs used 2)")
    parser.add_argument("--report", action="store_true", help="rebuild the table and plot from the JSON only")
    parser.add_argument("--quick", action="store_true", help="smoke run at quality.py's smoke budget")
    parser.add_argument(
        "--out", type=Path, help="results JSON (default results/instance_signal[_quick].json)"
    )
    args = parser.parse_args(argv)
    out = args.out or RESULTS / ("instance_signal_quick.json" if args.quick else "instance_signal.json")
    if not args.report:
        method = args.method or chosen_method(args.precision)
        torch.set_num_threads(args.threads)
        for task in args.tasks:
            for seed in args.seeds:
                record(score(recorded_run(task, seed, method, args.precision), args.quick), out)
    write_report(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
