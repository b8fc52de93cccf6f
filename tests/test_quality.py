"""Quality on a real model (marked slow): both methods learn Rotten Tomatoes on the bundled all-MiniLM-L6-v2, through
the CLI's own training, at a small budget (1,000 reviews, 2 epochs, the shipped configs' rate). IPT's default
instance source (the model's embeddings) is the default job's, tested in tests/test_cli.py
(``test_default_job_beats_chance_on_rotten_tomatoes``); here its frozen-model source and PrefixTuningV2.

The quality claims themselves (IPT against its own task prefix, peft's methods, LoRA, full fine-tuning) are measured
at converged budgets over three seeds by ``benchmarks/quality.py --tier converged``, not here.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from harness import CONFIGS, train_run  # noqa: E402

pytestmark = pytest.mark.slow
BUDGET = [
    "data.train_size=1000",
    "data.validation_size=400",
    "training.num_train_epochs=2",
    "training.eval_strategy='no'",
    "training.seed=0",
]


@pytest.mark.parametrize(
    ("config", "overrides"),
    [
        ("rotten_tomatoes_ipt.yaml", ["method_config.instance_source=frozen_model"]),
        ("rotten_tomatoes_prefix_v2.yaml", []),
    ],
    ids=["ipt-frozen-model", "prefix-v2"],
)
def test_the_method_learns_the_task_well_above_chance(config, overrides, all_threads):
    results = train_run(CONFIGS / config, [*BUDGET, *overrides])
    losses = [entry["loss"] for entry in results["train_history"] if "loss" in entry]
    assert losses[-1] < losses[0]  # it learned
    assert results["test"]["accuracy"] > 0.65  # balanced classes: chance is 0.5
