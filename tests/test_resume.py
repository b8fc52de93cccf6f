"""`peft-ipt train --resume`: checkpoints marked complete once fully written, and a run interrupted and
resumed ending with the very adapter an uninterrupted run ends with."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file
from test_cli import CLASSIFICATION, assets, write_experiment  # noqa: F401  (assets: the tiny models + csv)
from transformers import TrainerCallback

from peft_ipt.cli import _parser, main
from peft_ipt.cli import train as train_module
from peft_ipt.cli.checkpoints import (
    COMPLETE_MARKER,
    CheckpointError,
    MarkCompleteCheckpoints,
    latest_complete,
    mark_complete,
    require_complete,
)
from peft_ipt.cli.train import CHECKPOINTS, CLIError, evaluate_run, resume_checkpoint

# 48 training rows in batches of 8: 6 steps an epoch, so 8 steps cross an epoch boundary after the resume.
EXPERIMENT = {
    **CLASSIFICATION,
    "training": {
        **CLASSIFICATION["training"],
        "max_steps": 8,
        "eval_steps": 4,
        "save_strategy": "steps",
        "save_steps": 2,
    },
}
INTERRUPTED_AT = 5  # after checkpoint-4, mid-epoch
ADAPTER = "adapter_model.safetensors"


class Interrupted(Exception):
    pass


class InterruptAt(TrainerCallback):
    """Stands in for a kill: stops training with an exception at the end of a step."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise Interrupted(f"interrupted at step {self.step}")


@pytest.fixture(scope="module")
def config(assets) -> Path:  # noqa: F811
    return write_experiment(assets, "resume.yaml", EXPERIMENT)


def run(config: Path, output: Path, *extra: str) -> int:
    return main(["train", str(config), "--output-dir", str(output), *extra])


@pytest.fixture(scope="module")
def uninterrupted(config, tmp_path_factory) -> Path:
    output = tmp_path_factory.mktemp("uninterrupted") / "run"
    assert run(config, output) == 0
    return output


@pytest.fixture(scope="module")
def interrupted(config, tmp_path_factory) -> Path:
    """A run stopped after step 5: checkpoint-2 and checkpoint-4 written, no output folder contents."""
    output = tmp_path_factory.mktemp("interrupted") / "run"
    make_trainer = train_module.make_trainer

    def make_interrupted_trainer(*args, **kwargs):
        trainer = make_trainer(*args, **kwargs)
        trainer.add_callback(InterruptAt(INTERRUPTED_AT))
        return trainer

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(train_module, "make_trainer", make_interrupted_trainer)
        with pytest.raises(Interrupted):
            run(config, output)
    return output


def copy_run(run: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(run, tmp_path / "run"))


def adapter(output: Path) -> dict[str, torch.Tensor]:
    return load_file(output / ADAPTER)


def assert_same_adapter(output: Path, reference: Path) -> None:
    weights, expected = adapter(output), adapter(reference)
    assert weights.keys() == expected.keys()
    for name, tensor in expected.items():
        torch.testing.assert_close(weights[name], tensor, rtol=0, atol=0, msg=name)  # bit-identical


def losses(output: Path) -> dict[int, float]:
    history = json.loads((output / "metrics.json").read_text())["train_history"]
    return {entry["step"]: entry["loss"] for entry in history}


# -- checkpoints written by `peft-ipt train` ----------------------------------------------------------------


def test_every_checkpoint_is_marked_complete_with_the_sizes_of_its_files(interrupted):
    folders = sorted((interrupted / CHECKPOINTS).iterdir())
    assert [f.name for f in folders] == ["checkpoint-2", "checkpoint-4"]
    for folder in folders:
        manifest = json.loads((folder / COMPLETE_MARKER).read_text())["files"]
        assert {ADAPTER, "optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json"} <= set(
            manifest
        )
        assert manifest == {p.name: p.stat().st_size for p in folder.iterdir() if p.name != COMPLETE_MARKER}


def test_an_interrupted_run_writes_no_output_folder_contents(interrupted):
    assert [p.name for p in interrupted.iterdir()] == [CHECKPOINTS]


# -- resuming ------------------------------------------------------------------------------------------------


def test_resume_auto_ends_with_the_adapter_of_the_uninterrupted_run(
    interrupted, uninterrupted, config, tmp_path
):
    output = copy_run(interrupted, tmp_path)
    assert run(config, output, "--resume", "auto") == 0
    assert_same_adapter(output, uninterrupted)
    at_checkpoint, final = adapter(output / CHECKPOINTS / "checkpoint-4"), adapter(output)
    assert all(not torch.equal(at_checkpoint[name], final[name]) for name in final)  # steps 5-8 moved each
    resumed = losses(output)
    assert list(resumed) == list(range(1, 9))  # steps 1-4 from checkpoint-4's trainer state, 5-8 trained
    assert resumed == pytest.approx(losses(uninterrupted), abs=1e-6)
    results = json.loads((output / "metrics.json").read_text())
    assert results["resumed_from"] == str(output / CHECKPOINTS / "checkpoint-4")
    assert results["test"] == json.loads((uninterrupted / "metrics.json").read_text())["test"]


def test_resume_auto_skips_an_incomplete_checkpoint_with_a_warning(
    interrupted, uninterrupted, config, tmp_path, capsys
):
    output = copy_run(interrupted, tmp_path)
    newest = output / CHECKPOINTS / "checkpoint-4"
    (newest / COMPLETE_MARKER).unlink()  # killed after Trainer wrote the files, before the marker
    assert run(config, output, "--resume") == 0
    captured = capsys.readouterr()
    assert f"warning: --resume auto skips {newest}: it has no {COMPLETE_MARKER} marker" in captured.err
    assert f"resuming from {output / CHECKPOINTS / 'checkpoint-2'}" in captured.out
    assert_same_adapter(output, uninterrupted)
    assert require_complete(newest) == newest  # written again, and marked this time


def test_a_named_checkpoint_without_its_marker_is_refused(interrupted, config, tmp_path, capsys):
    output = copy_run(interrupted, tmp_path)
    folder = output / CHECKPOINTS / "checkpoint-4"
    (folder / COMPLETE_MARKER).unlink()
    assert run(config, output, "--resume", str(folder)) == 2
    error = capsys.readouterr().err
    assert (
        f"--resume {folder}: {folder} is an incomplete checkpoint: it has no {COMPLETE_MARKER} marker"
        in error
    )
    assert "--resume auto` picks the latest" in error


def test_a_named_checkpoint_with_a_truncated_file_is_refused(interrupted, config, tmp_path, capsys):
    output = copy_run(interrupted, tmp_path)
    folder = output / CHECKPOINTS / "checkpoint-4"
    size = (folder / "optimizer.pt").stat().st_size
    with open(folder / "optimizer.pt", "r+b") as f:
        f.truncate(size // 2)
    assert run(config, output, "--resume", str(folder)) == 2
    error = capsys.readouterr().err
    assert f"optimizer.pt has {size // 2} bytes, {size} when the checkpoint was completed" in error


def test_resuming_a_finished_run_rewrites_the_same_output_folder(uninterrupted, config, tmp_path):
    """The final save_pretrained into a folder already holding the adapter: same bytes, our card, eval ok."""
    output = copy_run(uninterrupted, tmp_path)
    before = (output / ADAPTER).read_bytes()
    assert run(config, output, "--resume") == 0  # from checkpoint-8: no step left to train
    assert (output / ADAPTER).read_bytes() == before
    assert losses(output) == losses(uninterrupted)  # and none trained: Trainer alone would run a 9th step
    assert "Instance-wise prompt tuning" in (output / "README.md").read_text()  # ours, not peft's stub
    recorded = json.loads((output / "metrics.json").read_text())["test"]
    assert evaluate_run(output) == pytest.approx(recorded, abs=1e-6)


def test_resume_auto_without_checkpoints_trains_from_the_start(tmp_path, capsys):
    assert resume_checkpoint("auto", tmp_path) is None
    assert (
        f"no complete checkpoint in {tmp_path / CHECKPOINTS}; training from the start"
        in capsys.readouterr().out
    )


def test_resume_given_an_experiment_file_says_to_put_the_file_first(config):
    with pytest.raises(CLIError, match="put the file first: `peft-ipt train CONFIG --resume`"):
        resume_checkpoint(str(config), config.parent)


def test_resume_alone_means_auto():
    assert _parser().parse_args(["train", "x.yaml", "--resume"]).resume == "auto"
    assert _parser().parse_args(["train", "x.yaml"]).resume is None


# -- the marker on its own ----------------------------------------------------------------------------------


def fake_checkpoint(root: Path, step: int, complete: bool = True) -> Path:
    folder = root / f"checkpoint-{step}"
    folder.mkdir(parents=True)
    (folder / ADAPTER).write_bytes(b"weights")
    (folder / "trainer_state.json").write_text("{}")
    if complete:
        mark_complete(folder)
    return folder


def test_latest_complete_orders_by_step_number_not_by_name(tmp_path):
    for step in (9, 10, 2):
        fake_checkpoint(tmp_path, step)
    assert latest_complete(tmp_path) == (tmp_path / "checkpoint-10", {})


def test_latest_complete_names_only_the_newer_incomplete_checkpoints_it_passes_over(tmp_path):
    fake_checkpoint(tmp_path, 2, complete=False)  # older than the pick: not worth a warning
    fake_checkpoint(tmp_path, 4)
    fake_checkpoint(tmp_path, 6, complete=False)
    chosen, skipped = latest_complete(tmp_path)
    assert chosen == tmp_path / "checkpoint-4"
    assert list(skipped) == [tmp_path / "checkpoint-6"]
    assert latest_complete(tmp_path / "nothing_here") == (None, {})


def test_a_file_deleted_after_the_marker_makes_the_checkpoint_incomplete(tmp_path):
    folder = fake_checkpoint(tmp_path, 2)
    (folder / "trainer_state.json").unlink()  # e.g. killed while save_total_limit removed the folder
    with pytest.raises(CheckpointError, match="trainer_state.json is missing"):
        require_complete(folder)


def test_the_marker_is_written_by_rename_and_leaves_no_temporary_file(tmp_path):
    folder = fake_checkpoint(tmp_path, 2)
    assert sorted(p.name for p in folder.iterdir()) == [COMPLETE_MARKER, ADAPTER, "trainer_state.json"]


def test_a_checkpoint_about_to_be_overwritten_loses_its_marker_first(tmp_path):
    folder = fake_checkpoint(tmp_path, 4)
    args = SimpleNamespace(output_dir=str(tmp_path), should_save=True)
    state = SimpleNamespace(global_step=4)
    callback = MarkCompleteCheckpoints()
    callback.on_step_end(args, state, SimpleNamespace(should_save=False))
    assert (folder / COMPLETE_MARKER).is_file()
    callback.on_step_end(args, state, SimpleNamespace(should_save=True))
    assert not (folder / COMPLETE_MARKER).exists()
    callback.on_save(args, state, SimpleNamespace(should_save=True))
    assert require_complete(folder) == folder
