"""`peft-ipt train` under `accelerate launch`: two CPU processes over gloo train one adapter, and only the
main process writes the output folder.

The launch line: accelerate 1.x starts ``distributed_type: MULTI_CPU`` with a single process unless mpirun is
given a host file, so ``--multi_gpu`` asks for its torchrun launcher instead (the processes still run on
the CPU); that launcher does not pass ``use_cpu`` on, so ACCELERATE_USE_CPU=1 tells Trainer to join them over
gloo.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from launching import free_port, launch
from test_cli import CLASSIFICATION, assets, write_experiment  # noqa: F401  (assets: the tiny models + csv)
from transformers.training_args import ParallelMode

from peft_ipt.cli import main
from peft_ipt.cli.checkpoints import COMPLETE_MARKER, require_complete
from peft_ipt.cli.train import CHECKPOINTS, CLIError, _check_data_parallel, evaluate_run

# Under pytest-xdist (`make test`), this file's tests stay in one worker, so its launched two-process run (the module
# fixture, the file's slowest step) trains once.
pytestmark = pytest.mark.xdist_group("accelerate_cli")

REPO = Path(__file__).resolve().parents[1]
MULTI_CPU = REPO / "configs" / "accelerate" / "multi_cpu.yaml"
# 48 rows, 4 per process and step: 6 steps an epoch with 2 processes (12 with one).
EXPERIMENT = {
    **CLASSIFICATION,
    "training": {
        **CLASSIFICATION["training"],
        "per_device_train_batch_size": 4,
        "save_strategy": "steps",
        "save_steps": 2,
    },
}


def accelerate_launch(*arguments: str, cwd: Path) -> subprocess.CompletedProcess:
    def command() -> list[str]:
        line = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(MULTI_CPU)]
        line += ["--multi_gpu", "--num_processes", "2", "--main_process_port", str(free_port())]
        return line + ["-m", "peft_ipt.cli", *arguments]

    return launch(command, cwd=cwd, env={"ACCELERATE_USE_CPU": "1"}, timeout=180)


@pytest.fixture(scope="module")
def launched(assets, tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:  # noqa: F811
    config = write_experiment(assets, "ddp.yaml", EXPERIMENT)
    workdir = tmp_path_factory.mktemp("accelerate")
    result = accelerate_launch("train", str(config), "--output-dir", "run", cwd=workdir)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return workdir, result


def test_two_processes_train_one_adapter_with_the_global_batch(launched):
    workdir, _ = launched
    results = json.loads((workdir / "run" / "metrics.json").read_text())
    assert results["processes"] == 2
    # 4 steps of 2 x 4 rows: a third of the 48-row epoch (one process would have covered a sixth)
    assert results["train_history"][-1]["epoch"] == pytest.approx(4 / 6)


def test_only_the_main_process_writes_and_prints(launched):
    workdir, result = launched
    assert [p.name for p in workdir.iterdir()] == ["run"]
    names = {p.name for p in (workdir / "run").iterdir()}
    assert {"adapter_model.safetensors", "adapter_config.json", "README.md", "metrics.json"} <= names
    assert {"experiment.yaml", "training_curves.png", CHECKPOINTS} <= names
    assert result.stdout.count("[peft-ipt] wrote ") == 1
    assert result.stdout.count("[peft-ipt] trainable parameters") == 1


def test_checkpoints_are_marked_complete_after_both_processes_wrote_their_rng_state(launched):
    workdir, _ = launched
    for step in (2, 4):
        folder = require_complete(workdir / "run" / CHECKPOINTS / f"checkpoint-{step}")
        manifest = json.loads((folder / COMPLETE_MARKER).read_text())["files"]
        assert {"rng_state_0.pth", "rng_state_1.pth", "optimizer.pt", "adapter_model.safetensors"} <= set(
            manifest
        )


def test_eval_reloads_the_adapter_and_reproduces_its_test_metrics(launched):
    workdir, _ = launched
    recorded = json.loads((workdir / "run" / "metrics.json").read_text())["test"]
    assert main(["eval", str(workdir / "run")]) == 0
    assert evaluate_run(workdir / "run") == pytest.approx(recorded, abs=1e-6)


def test_processes_that_would_each_train_alone_are_refused(monkeypatch):
    """Launched without ACCELERATE_USE_CPU on a CPU-only machine, Trainer ignores the process group
    (parallel_mode not_parallel, world_size 1): two full runs writing one folder. train() stops before loading
    a model and says what to set."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    alone = SimpleNamespace(world_size=1, parallel_mode=ParallelMode.NOT_PARALLEL)
    with pytest.raises(
        CLIError, match=r"launched as 2 processes \(WORLD_SIZE=2\) but Trainer runs each one alone"
    ):
        _check_data_parallel(alone)
    _check_data_parallel(SimpleNamespace(world_size=2, parallel_mode=ParallelMode.DISTRIBUTED))
