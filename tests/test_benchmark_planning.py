"""How benchmarks/quality.py plans a resumed converged-tier call: more seeds never rerun a grid recorded whole."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import quality  # noqa: E402


@pytest.fixture
def converged(monkeypatch):
    monkeypatch.setattr(quality, "TIER", quality.TIERS["converged"])


def recorded(cells: list[tuple[float, int]], method: str = "prefix_mlp", task: str = "rotten_tomatoes_256"):
    setup = quality.current_setup(task, method, False)
    return {
        quality.run_key(task, method, lr, seed): {
            "task": task,
            "method": method,
            "lr": lr,
            "seed": seed,
            "setup": setup,
        }
        for lr, seed in cells
    }


GRID = (1e-3, 3e-3, 1e-2)


def test_the_seed_with_the_whole_grid_is_found(converged):
    runs = recorded([(lr, 0) for lr in GRID] + [(1e-3, 1), (1e-3, 2)])
    assert quality.recorded_grid_seed(runs, "rotten_tomatoes_256", "prefix_mlp", GRID, False) == 0


def test_a_partial_grid_or_another_cell_is_no_grid(converged):
    partial = recorded([(1e-3, 0), (3e-3, 0), (1e-3, 5), (3e-3, 5)])
    assert quality.recorded_grid_seed(partial, "rotten_tomatoes_256", "prefix_mlp", GRID, False) is None
    other = recorded([(lr, 0) for lr in GRID], method="ipt_mlp_scale")
    assert quality.recorded_grid_seed(other, "rotten_tomatoes_256", "prefix_mlp", GRID, False) is None


def test_a_run_from_an_older_setup_does_not_count(converged):
    runs = recorded([(lr, 0) for lr in GRID])
    runs[quality.run_key("rotten_tomatoes_256", "prefix_mlp", 1e-2, 0)]["setup"] = "an older budget"
    assert quality.recorded_grid_seed(runs, "rotten_tomatoes_256", "prefix_mlp", GRID, False) is None


def test_more_seeds_run_at_the_chosen_rate_only(converged, tmp_path, monkeypatch):
    """`--seeds 5 6` after a grid at seed 0: two runs, both at the rate seed 0's validation chose."""
    path = tmp_path / "q.json"
    trained = []

    def fake_run(self, cells):
        trained.extend(cells)

    monkeypatch.setattr(quality, "load_runs", lambda _: recorded([(lr, 0) for lr in GRID]))
    monkeypatch.setattr(quality.Runner, "run", fake_run)
    monkeypatch.setattr(
        quality,
        "summarize",
        lambda runs, quick: [{"task": "rotten_tomatoes_256", "method": "prefix_mlp", "best_lr": 1e-3}],
    )
    monkeypatch.setattr(quality, "record_invocation", lambda *a, **k: ("", []))
    common = [
        "--tier",
        "converged",
        "--tasks",
        "rotten_tomatoes_256",
        "--methods",
        "prefix_mlp",
        "--out",
        str(path),
    ]
    quality.main([*common, "--seeds", "5", "6"])
    assert trained == [
        ("rotten_tomatoes_256", "prefix_mlp", 1e-3, 5),
        ("rotten_tomatoes_256", "prefix_mlp", 1e-3, 6),
    ]

    trained.clear()  # with no grid on record, the first seed asked for runs it, as before
    monkeypatch.setattr(quality, "load_runs", lambda _: {})
    quality.main([*common, "--seeds", "5", "6"])
    assert trained == [
        *(("rotten_tomatoes_256", "prefix_mlp", lr, 5) for lr in GRID),
        ("rotten_tomatoes_256", "prefix_mlp", 1e-3, 6),
    ]
