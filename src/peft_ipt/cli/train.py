"""`peft-ipt train` and `peft-ipt eval`: fine-tune with HF Trainer, write the output folder, re-score it.

The output folder holds the adapter (``save_pretrained``), ``README.md`` (model card), ``metrics.json``,
``training_curves.png`` and ``experiment.yaml`` (the resolved experiment, which `eval` and `generate` read).
With ``training.save_strategy`` set, Trainer's checkpoints go to ``checkpoints/checkpoint-N/``, each marked
complete once fully written (see :mod:`.checkpoints`), and ``--resume`` continues from one of them.

Under a multi-process launcher (``accelerate launch``, ``torchrun``) every process trains; the main process
alone prints, scores the test split and writes the output folder.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .card import model_card
from .checkpoints import (
    CheckpointError,
    MarkCompleteCheckpoints,
    StopAtTheLastStep,
    StopWhenValidationStalls,
    TrainingFinished,
    latest_complete,
    require_complete,
    with_prompt_encoder_checkpoints,
)
from .data import Splits, collator_for, load_splits, tokenize
from .evaluation import evaluate_split, generate_texts
from .experiment import Experiment, default_config_path, load_experiment
from .metrics import generation_metrics, trainer_classification_metrics
from .models import build_model, load_tokenizer, load_trained, parameter_counts
from .plots import plot_training_curves

EXPERIMENT_FILE = "experiment.yaml"
METRICS_FILE = "metrics.json"
CARD_FILE = "README.md"
CURVES_FILE = "training_curves.png"
# Trainer's output_dir: stays empty (and is removed) unless training.save_strategy asks for checkpoints.
CHECKPOINTS = "checkpoints"
RESUME_LATEST = "auto"


class CLIError(RuntimeError):
    """A command failed for a reason the user can fix; the message says how."""


def training_arguments(experiment: Experiment, output: Path):
    from transformers import TrainingArguments

    return TrainingArguments(
        output_dir=str(output / CHECKPOINTS),
        remove_unused_columns=False,  # our rows hold model inputs only; IPT needs `labels` to find the source
        label_names=["labels"],
        dataloader_pin_memory=torch.cuda.is_available(),
        **experiment.training_settings,
    )


def make_trainer(
    experiment: Experiment,
    model: nn.Module,
    tokenizer,
    splits: Splits,
    arguments,
    score_validation: Callable,
):
    """A Trainer; for generation tasks each evaluation also decodes the validation inputs and scores them."""
    from transformers import Trainer

    class GenerationTrainer(Trainer):
        def evaluation_loop(self, *args, **kwargs):
            result = super().evaluation_loop(*args, **kwargs)
            prefix = kwargs.get("metric_key_prefix", "eval")
            result.metrics.update({f"{prefix}_{k}": v for k, v in score_validation(self.model).items()})
            return result

    classification = experiment.task_type == "SEQ_CLS"
    callbacks = [MarkCompleteCheckpoints(), StopAtTheLastStep()]
    if experiment.early_stopping_patience is not None:
        settings = experiment.training_settings
        callbacks.append(
            StopWhenValidationStalls(
                settings["metric_for_best_model"],
                settings["greater_is_better"],
                experiment.early_stopping_patience,
                experiment.training.get("early_stopping_threshold", 0.0),
                experiment.training.get("early_stopping_min_steps", 0),
            )
        )
    return with_prompt_encoder_checkpoints(Trainer if classification else GenerationTrainer)(
        model=model,
        args=arguments,
        train_dataset=tokenize(splits.train, tokenizer, experiment),
        eval_dataset=tokenize(splits.validation, tokenizer, experiment),
        data_collator=collator_for(experiment, tokenizer),
        processing_class=tokenizer,
        compute_metrics=trainer_classification_metrics if classification else None,
        callbacks=callbacks,
    )


def _is_main_process() -> bool:
    # Before Trainer sets up the process group its rank is unknown; launchers set RANK for every process.
    return os.environ.get("RANK", "0") == "0"


def _log(message: str, warning: bool = False) -> None:
    if _is_main_process():
        print(
            f"[peft-ipt] {'warning: ' if warning else ''}{message}",
            file=sys.stderr if warning else sys.stdout,
        )


def _check_data_parallel(arguments) -> None:
    """Refuse N launched processes that would each train alone (and all write the output folder)."""
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched != arguments.world_size:
        raise CLIError(
            f"launched as {launched} processes (WORLD_SIZE={launched}) but Trainer runs each one alone "
            f"({arguments.parallel_mode.value}). Without GPUs, Trainer joins them over gloo only when told "
            "to use the CPU: set ACCELERATE_USE_CPU=1 or training.use_cpu=true"
        )


def resume_checkpoint(resume: str, output: Path) -> Path | None:
    """The checkpoint ``--resume`` asks for: the folder it names, which must be complete, or for ``auto`` the
    latest complete one of the run (None, training from the start, if there is none)."""
    if resume != RESUME_LATEST:
        try:
            return require_complete(resume)
        except CheckpointError as error:
            hint = "resume from a complete one (`--resume auto` picks the latest)"
            if Path(resume).is_file():  # `peft-ipt train --resume CONFIG`: argparse gave CONFIG to --resume
                hint = "to resume the run of an experiment file, put the file first: `peft-ipt train CONFIG "
                hint += "--resume`"
            raise CLIError(f"--resume {resume}: {error}; {hint}") from None
    chosen, skipped = latest_complete(output / CHECKPOINTS)
    for folder, problem in skipped.items():
        _log(f"--resume auto skips {folder}: {problem}", warning=True)
    if chosen is None:
        _log(f"--resume auto: no complete checkpoint in {output / CHECKPOINTS}; training from the start")
    else:
        _log(f"resuming from {chosen}")
    return chosen


def check_start_from(experiment) -> None:
    """``start_from`` names a saved adapter folder: checked before data or models load."""
    if experiment.start_from and not (Path(experiment.start_from) / "adapter_config.json").is_file():
        raise CLIError(
            f"{experiment.source}: start_from {experiment.start_from!r} holds no saved adapter (adapter_config.json): "
            "give the output folder of a finished PrefixTuningV2 run"
        )


def _evaluated_at(history: list[dict[str, Any]], step: int) -> bool:
    return any("eval_loss" in entry and entry.get("step") == step for entry in history)


def train(
    config: str | Path | None = None,
    overrides: list[str] | None = None,
    output_dir: str | Path | None = None,
    push_to_hub: str | None = None,
    resume: str | None = None,
) -> dict[str, Any]:
    """Run one experiment end to end; returns what it writes to metrics.json (on the main process; other
    processes of a multi-process launch return an empty dict).

    ``resume``: a checkpoint folder to continue from, or ``"auto"`` for the run's latest complete checkpoint.
    """
    from transformers import set_seed

    start = time.time()
    experiment = load_experiment(config or default_config_path(), overrides)
    check_start_from(experiment)
    output = Path(output_dir or Path("outputs") / Path(experiment.source).stem)
    checkpoint = resume_checkpoint(resume, output) if resume else None
    if resume and experiment.training_settings["save_strategy"] == "no":
        _log(
            "--resume with training.save_strategy 'no': this run writes no checkpoint to resume from",
            warning=True,
        )
    splits = load_splits(experiment)  # checks columns and splits before any model loads
    arguments = training_arguments(experiment, output)  # joins the other processes of a launcher, if any
    _check_data_parallel(arguments)
    _log(f"{experiment.source}: {experiment.method} on {experiment.model}, rows {splits.sizes()}")

    set_seed(experiment.training_settings["seed"])  # also seeds the new task head's initialisation
    tokenizer = load_tokenizer(experiment)
    model = build_model(experiment, tokenizer, splits.label_names)
    counts = parameter_counts(model)
    _log(f"trainable parameters: {counts['trainable_params']:,} of {counts['all_params']:,}")

    def score_validation(model: nn.Module) -> dict[str, float]:
        hypotheses = generate_texts(model, tokenizer, list(splits.validation["input"]), experiment)
        return generation_metrics(hypotheses, list(splits.validation["references"]))

    trainer = make_trainer(experiment, model, tokenizer, splits, arguments, score_validation)
    try:
        train_output = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
        train_runtime = train_output.metrics["train_runtime"]
    except TrainingFinished as finished:
        _log(f"{checkpoint} holds the last step ({finished})")
        train_runtime = 0.0
    if not _evaluated_at(trainer.state.log_history, trainer.state.global_step):
        trainer.evaluate()  # the curve and the history always end with the final model
    if not trainer.is_world_process_zero():
        return {}
    test = evaluate_split(model, tokenizer, splits.test, experiment)
    print(f"[peft-ipt] test: {_format(test)}")

    history = trainer.state.log_history
    validations = [e for e in history if "eval_loss" in e]
    best_step = trainer.state.best_global_step if experiment.early_stopping_patience else None
    results = {
        "test": test,
        "main_metric": experiment.metric,
        # the validation scores of the model that was tested: the best evaluation with early stopping
        "validation": next((e for e in validations if e.get("step") == best_step), validations[-1]),
        "steps": trainer.state.global_step,
        "max_steps": trainer.state.max_steps,
        "best_step": best_step,
        "validation_history": validations,
        "train_history": [e for e in history if "loss" in e],
        **counts,
        "split_sizes": splits.sizes(),
        "label_names": splits.label_names,
        "train_runtime_s": train_runtime,  # of this invocation, if resumed
        "processes": trainer.args.world_size,
        "resumed_from": str(checkpoint) if checkpoint else None,
        "wall_time_s": time.time() - start,
        "training_arguments": {
            k: v for k, v in trainer.args.to_dict().items() if k in experiment.training_settings
        },
        "experiment": experiment.to_dict(),
    }
    example = splits.test[0]["text" if experiment.task_type == "SEQ_CLS" else "input"][:200]
    write_run(output, experiment, model, tokenizer, results, history, example, push_to_hub)
    print(f"[peft-ipt] wrote {output}/: {', '.join(sorted(p.name for p in output.iterdir()))}")
    print(
        f"[peft-ipt] wall time {results['wall_time_s']:.0f} s; "
        f"test {experiment.metric} = {test[experiment.metric]:.4f}"
    )
    if push_to_hub:
        push(model, tokenizer, output, push_to_hub, experiment)
    return results


def write_run(
    output: Path,
    experiment: Experiment,
    model: nn.Module,
    tokenizer,
    results: dict[str, Any],
    history: list[dict[str, Any]],
    example: str,
    repo: str | None,
) -> None:
    """The output folder: adapter, experiment.yaml, metrics.json, training_curves.png, README.md."""
    checkpoints = output / CHECKPOINTS
    if checkpoints.is_dir() and not any(checkpoints.iterdir()):
        checkpoints.rmdir()
    elif (
        checkpoints.is_dir()
        and experiment.early_stopping_patience
        and "save_strategy" not in experiment.training
    ):
        shutil.rmtree(checkpoints)  # written only to keep the best model: it is the adapter saved below
    model.save_pretrained(output)  # peft writes a stub README.md here; ours replaces it below
    if experiment.method == "full":
        tokenizer.save_pretrained(output)
    experiment.dump(output / EXPERIMENT_FILE)
    (output / METRICS_FILE).write_text(json.dumps(results, indent=2))
    plot_training_curves(history, experiment.metric, output / CURVES_FILE)
    card = model_card(
        experiment,
        results,
        _adapter_config(output),
        repo or str(output.resolve()),
        example,
        results["label_names"],
    )
    (output / CARD_FILE).write_text(card, encoding="utf-8")


def _adapter_config(output: Path) -> dict[str, Any] | None:
    path = output / "adapter_config.json"
    return json.loads(path.read_text()) if path.is_file() else None


def _format(metrics: dict[str, Any]) -> str:
    return ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items())


def push(model: nn.Module, tokenizer, output: Path, repo: str, experiment: Experiment) -> None:
    """Upload with peft's ``push_to_hub`` (adapter files), then our model card over peft's default one."""
    try:
        model.push_to_hub(repo)
        if experiment.method == "full":
            tokenizer.push_to_hub(repo)
        from huggingface_hub import upload_file

        upload_file(path_or_fileobj=str(output / CARD_FILE), path_in_repo=CARD_FILE, repo_id=repo)
    except Exception as error:  # noqa: BLE001 - offline, no token, no rights: the same advice
        raise CLIError(
            f"--push-to-hub {repo}: the upload failed ({type(error).__name__}: {error}). Everything is saved in "
            f"{output}; once online and logged in (`hf auth login`), upload it with `hf upload {repo} {output}`"
        ) from error
    print(f"[peft-ipt] pushed to https://huggingface.co/{repo}")


def load_run(output_dir: str | Path) -> tuple[Experiment, Path]:
    output = Path(output_dir)
    path = output / EXPERIMENT_FILE
    if not path.is_file():
        raise CLIError(f"{output} has no {EXPERIMENT_FILE}: give a folder written by `peft-ipt train`")
    return load_experiment(path), output


def evaluate_run(output_dir: str | Path) -> dict[str, Any]:
    """Reload a trained adapter onto its base model and re-score the test split it was scored on."""
    experiment, output = load_run(output_dir)
    splits = load_splits(experiment)
    tokenizer = load_tokenizer(experiment)
    model = load_trained(experiment, output, tokenizer, splits.label_names)
    test = evaluate_split(model, tokenizer, splits.test, experiment)
    print(f"[peft-ipt] {output}: test {_format(test)}")
    saved = output / METRICS_FILE
    if saved.is_file():
        recorded = json.loads(saved.read_text())["test"]
        gaps = {k: abs(test[k] - recorded[k]) for k in test if k in recorded}
        print(
            f"[peft-ipt] recorded by train: {_format(recorded)}; largest difference {max(gaps.values()):.2e}"
        )
    return test
