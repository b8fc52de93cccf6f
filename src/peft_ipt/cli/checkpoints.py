"""Trainer checkpoints that say when they are complete, and the one ``peft-ipt train --resume`` picks.

Trainer writes ``checkpoint-N/`` file by file: the adapter, then the optimizer, the scheduler, the RNG states
of every process and ``trainer_state.json``; a run killed in between leaves a folder that looks like a
checkpoint and cannot be resumed from (or, worse, resumes from a truncated optimizer state). So
:class:`MarkCompleteCheckpoints` writes ``checkpoint-N/CHECKPOINT_COMPLETE`` once Trainer has finished: a JSON
manifest of every file in the folder and its size, written to a temporary file and renamed into place. A
checkpoint is complete when the marker is there and every file it lists has the recorded size, which also
catches a file truncated or deleted afterwards (e.g. a kill while ``save_total_limit`` removes an old one).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

COMPLETE_MARKER = "CHECKPOINT_COMPLETE"
_CHECKPOINT_NAME = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-(\d+)$")


class CheckpointError(ValueError):
    """A checkpoint cannot be resumed from; the message names the folder and what is missing."""


class TrainingFinished(Exception):
    """Raised by :class:`StopAtTheLastStep` when the checkpoint resumed from already holds the last step."""


def checkpoint_folder(output_dir: str | Path, step: int) -> Path:
    """The folder Trainer writes the checkpoint of ``step`` to."""
    return Path(output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{step}"


def _files(folder: Path) -> dict[str, int]:
    """Every file under ``folder`` (the marker aside) -> its size in bytes, by path relative to ``folder``."""
    return {
        path.relative_to(folder).as_posix(): path.stat().st_size
        for path in sorted(folder.rglob("*"))
        if path.is_file() and path.name != COMPLETE_MARKER and not path.name.startswith(f".{COMPLETE_MARKER}")
    }


def mark_complete(folder: str | Path) -> Path:
    """Write ``folder/CHECKPOINT_COMPLETE`` (the manifest of its files) atomically; returns the marker."""
    folder = Path(folder)
    files = _files(folder)
    for name in files:  # on disk before the marker that vouches for them, so a power cut cannot reorder them
        fd = os.open(folder / name, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    marker = folder / COMPLETE_MARKER
    temporary = folder / f".{COMPLETE_MARKER}.tmp"
    with open(temporary, "w", encoding="utf-8") as f:
        json.dump({"files": files}, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(temporary, marker)
    return marker


def unmark(folder: str | Path) -> None:
    """Remove the marker of a checkpoint about to be overwritten: until the new one is finished, it is not."""
    Path(folder, COMPLETE_MARKER).unlink(missing_ok=True)


def incompleteness(folder: str | Path) -> str | None:
    """None if ``folder`` is a complete checkpoint, else what is wrong with it, in words."""
    folder = Path(folder)
    marker = folder / COMPLETE_MARKER
    if not marker.is_file():
        present = ", ".join(_files(folder)) or "no files"
        return (
            f"it has no {COMPLETE_MARKER} marker, so Trainer did not finish writing it (it holds: {present})"
        )
    try:
        recorded = json.loads(marker.read_text(encoding="utf-8"))["files"]
    except (ValueError, KeyError, TypeError) as error:
        return f"its {COMPLETE_MARKER} marker is unreadable ({type(error).__name__}: {error})"
    for name, size in recorded.items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing (listed in its {COMPLETE_MARKER} marker)"
        if path.stat().st_size != size:
            return f"{name} has {path.stat().st_size} bytes, {size} when the checkpoint was completed"
    return None


def require_complete(folder: str | Path) -> Path:
    """``folder`` if it is a complete checkpoint, else :class:`CheckpointError` saying what is wrong."""
    folder = Path(folder)
    if not folder.is_dir():
        kind = "a file" if folder.exists() else "not there"
        raise CheckpointError(f"{folder} is not a checkpoint folder (it is {kind})")
    problem = incompleteness(folder)
    if problem is not None:
        raise CheckpointError(f"{folder} is an incomplete checkpoint: {problem}")
    return folder


def checkpoints(output_dir: str | Path) -> list[Path]:
    """The ``checkpoint-N`` folders of a Trainer output dir, by step."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    found = [p for p in output_dir.iterdir() if p.is_dir() and _CHECKPOINT_NAME.match(p.name)]
    return sorted(found, key=lambda p: int(_CHECKPOINT_NAME.match(p.name).group(1)))


def latest_complete(output_dir: str | Path) -> tuple[Path | None, dict[Path, str]]:
    """The newest complete checkpoint of a Trainer output dir (None if there is none), and the newer,
    incomplete ones passed over on the way, each with what is wrong with it."""
    skipped = {}
    for folder in reversed(checkpoints(output_dir)):
        problem = incompleteness(folder)
        if problem is None:
            return folder, skipped
        skipped[folder] = problem
    return None, skipped


class MarkCompleteCheckpoints(TrainerCallback):
    """Marks each checkpoint complete once Trainer has written all of it; unmarks one it will overwrite."""

    def _unmark_if_saving(self, args, state, control) -> None:
        # Trainer decides to save in on_step_end / on_epoch_end (DefaultFlowCallback runs before us) and
        # writes right after; a marker left from an earlier run would vouch for a half-overwritten folder.
        if control.should_save and args.should_save:
            unmark(checkpoint_folder(args.output_dir, state.global_step))

    def on_step_end(self, args, state, control, **kwargs):
        self._unmark_if_saving(args, state, control)

    def on_epoch_end(self, args, state, control, **kwargs):
        self._unmark_if_saving(args, state, control)

    def on_save(self, args, state, control, **kwargs):
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.barrier()  # every process has written its own rng_state_<rank>.pth
        if args.should_save:
            mark_complete(checkpoint_folder(args.output_dir, state.global_step))


class StopAtTheLastStep(TrainerCallback):
    """Ends a run resumed from its last checkpoint before it trains again.

    Trainer (transformers 5.23) checks ``max_steps`` only after an optimizer step, so resuming from
    ``checkpoint-<max_steps>`` mid-epoch runs one step more than the run asked for. This raises
    :class:`TrainingFinished` from ``on_train_begin``, where the weights, optimizer and ``trainer.state`` are
    already restored from the checkpoint, so the caller can go on as after ``train()``.
    """

    def on_train_begin(self, args, state, control, **kwargs):
        if 0 < state.max_steps <= state.global_step:  # global_step > 0 before training: resumed
            raise TrainingFinished(f"step {state.global_step} of {state.max_steps}: nothing left to train")


class StopWhenValidationStalls(TrainerCallback, ExportableState):
    """Early stopping on the main validation metric: stop once it has not improved (by more than ``threshold``) for
    ``patience`` evaluations, counting only from ``min_steps`` on; before that the run always goes on. The best
    checkpoint is kept either way (``load_best_model_at_end``). Its counters travel in checkpoints, so a resumed run
    stops where the uninterrupted one would."""

    def __init__(
        self, metric: str, greater_is_better: bool, patience: int, threshold: float = 0.0, min_steps: int = 0
    ):
        self.metric = metric
        self.greater_is_better = greater_is_better
        self.patience = patience
        self.threshold = threshold
        self.min_steps = min_steps
        self.best: float | None = None
        self.stalled = 0

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        value = (metrics or {}).get(self.metric)
        if value is None:
            return
        margin = self.threshold if self.greater_is_better else -self.threshold
        improved = self.best is None or (
            value > self.best + margin if self.greater_is_better else value < self.best + margin
        )
        if improved:
            self.best, self.stalled = value, 0
        elif state.global_step >= self.min_steps:
            self.stalled += 1
        if self.stalled >= self.patience:
            control.should_training_stop = True

    def state(self) -> dict:
        return {
            "args": {
                "metric": self.metric,
                "greater_is_better": self.greater_is_better,
                "patience": self.patience,
                "threshold": self.threshold,
                "min_steps": self.min_steps,
            },
            "attributes": {"best": self.best, "stalled": self.stalled},
        }


# -- peft's prompt encoders that its checkpoints cannot restore ----------------------------------------------
#
# peft saves a reparameterised prompt encoder (P-tuning's MLP or LSTM, PrefixTuning's prefix_projection) as its
# *output*, the prompts inference needs, and `load_adapter` loads that into the encoder's *input* embedding. On a
# model still training, which keeps the encoder, every later forward passes the saved prompts through the encoder a
# second time. For PrefixTuning the shapes differ and loading fails (peft issue 2256); for P-tuning they agree, so
# Trainer's best-model restore and its resume load the wrong prompts without a word (peft issue 1247): a converged
# P-tuning run on Rotten Tomatoes tested 64.9 on the restored model, 76.2 with the restore below (same training).
# So for these methods the CLI's Trainer also saves every trainable weight under its own name, and restores from
# that file instead of through peft's loading. The adapter file itself stays what peft writes: inference loads it.
TRAINABLE_FILE = "trainable_weights.safetensors"


def reparameterized_prompt_encoder(model):
    """The training prompt encoder of a peft prompt method whose adapter file cannot restore it; else None."""
    from peft import PeftModel, PeftType

    if not isinstance(model, PeftModel):
        return None
    config = model.active_peft_config
    if not config.is_prompt_learning or config.inference_mode:
        return None  # in inference mode the encoder is the saved prompts themselves
    if config.peft_type == PeftType.P_TUNING or getattr(config, "prefix_projection", False):
        return model.prompt_encoder[model.active_adapter]
    return None


def _trainable_parameters(model) -> dict:
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def save_trainable_weights(model, folder: str | Path) -> None:
    """Every trainable weight (the prompt encoder whole, the task head), under its name in ``model``."""
    from safetensors.torch import save_file

    weights = {name: p.detach().cpu().contiguous() for name, p in _trainable_parameters(model).items()}
    save_file(weights, str(Path(folder) / TRAINABLE_FILE))


def restore_trainable_weights(model, folder: str | Path) -> None:
    """Load what :func:`save_trainable_weights` wrote into ``folder`` back into ``model``, in place."""
    import torch
    from safetensors.torch import load_file

    path = Path(folder) / TRAINABLE_FILE
    method = model.active_peft_config.peft_type.value
    if not path.is_file():
        raise CheckpointError(
            f"{folder} has no {TRAINABLE_FILE}: its {method} prompt encoder cannot be restored from "
            "adapter_model.safetensors alone (peft saves the encoder's output there, and loading it into a "
            "model that is training passes the prompts through the encoder twice). The checkpoint was not "
            "written by `peft-ipt train`; train from the start, or resume from a checkpoint peft-ipt wrote"
        )
    saved = load_file(str(path))
    trainable = _trainable_parameters(model)
    if saved.keys() != trainable.keys() or any(saved[k].shape != p.shape for k, p in trainable.items()):
        raise CheckpointError(
            f"{path} does not match this {method} model: it holds {sorted(saved)[:4]}..., the model trains "
            f"{sorted(trainable)[:4]}... (or their shapes differ). Resume with the experiment that wrote it"
        )
    with torch.no_grad():
        for name, p in trainable.items():
            p.copy_(saved[name])


def with_prompt_encoder_checkpoints(trainer_class: type) -> type:
    """``trainer_class`` whose checkpoints restore a reparameterised peft prompt encoder correctly."""

    class PromptEncoderCheckpointsTrainer(trainer_class):
        def _takes_over(self, model) -> bool:
            if reparameterized_prompt_encoder(model) is None:
                return False
            if self.is_deepspeed_enabled or self.is_fsdp_enabled:
                raise CheckpointError(
                    f"{model.active_peft_config.peft_type.value} checkpoints under DeepSpeed or FSDP: peft cannot "
                    "restore its prompt encoder and peft-ipt restores it only from whole weights. Train without "
                    "training.load_best_model_at_end / early stopping and without --resume, or use one process"
                )
            return True

        def _save(self, output_dir: str | None = None, state_dict=None) -> None:
            super()._save(output_dir, state_dict)
            if reparameterized_prompt_encoder(self.model) is not None:
                save_trainable_weights(self.model, output_dir or self.args.output_dir)

        def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
            target = self.model if model is None else model
            if self._takes_over(target):
                restore_trainable_weights(target, resume_from_checkpoint)
            else:
                super()._load_from_checkpoint(resume_from_checkpoint, model)

        def _load_best_model(self) -> None:
            if self._takes_over(self.model):
                restore_trainable_weights(self.model, self.state.best_model_checkpoint)
            else:
                super()._load_best_model()

    PromptEncoderCheckpointsTrainer.__name__ = trainer_class.__name__
    return PromptEncoderCheckpointsTrainer
