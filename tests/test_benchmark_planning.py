"""How benchmarks/quality.py plans a resumed converged-tier call (more seeds never rerun a grid recorded whole), and
how it pairs the recorded runs."""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import numpy as np
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


def scored(task: str, method: str, seed: int, main: float, other: float, val: float | None = None) -> dict:
    """A recorded run with test scores ``main`` (the task's metric) and ``other`` (its other one), in points, and
    validation ``val`` in the main metric (``main`` unless given)."""
    metric = (
        "accuracy" if task.startswith("rotten") else "macro_f1"
    )  # the tier's: macro F1 on BBC and VitaminC
    second = "macro_f1" if metric == "accuracy" else "accuracy"
    run = recorded([(1e-3, seed)], method=method, task=task)
    [entry] = run.values()
    entry |= {
        "main_metric": metric,
        "test": {metric: main / 100, second: other / 100, "examples": 100},
        "validation": {metric: (main if val is None else val) / 100, second: other / 100},
        "trainable_params": 1,
        "all_params": 100,
        "wall_time_s": 1.0,
    }
    return run


def test_the_paired_table_shows_the_other_metric_and_the_mean_with_vitaminc_at_its_longer_cap(converged):
    # IPT ahead by 1 in the main metric on RT and BBC; on VitaminC +3 macro F1 at the 25-epoch cap, accuracy -1
    gains = {
        "rotten_tomatoes": (1, 1),
        "bbc_news": (1, 0),
        "vitaminc": (0, 0),
        "vitaminc_25ep": (3, -1),
        "twitter_sentiment": (-2, 1),
        "twitter_sentiment_25ep": (4, 2),
        "bbc_news_256": (2, 0),
    }
    runs = {}
    for task, (main, other) in gains.items():
        for seed in (0, 1):
            runs |= scored(task, "prefix_mlp", seed, 50 + seed, 60)
            # validation gains twice the test gain, so the validation column is told from the test one
            runs |= scored(
                task, "ipt_mlp_scale", seed, 50 + seed + main, 60 + other, val=50 + seed + 2 * main
            )
    table = quality.paired_table(quality.summarize(runs, False), "ipt_mlp_scale")
    lines = {
        line.split(" | ")[0].strip("| "): line.split(" | ") for line in table.splitlines() if "|" in line
    }
    assert lines["VitC-25ep"][3:] == ["+3.00 ± 0.00", "2", "-1.00 ± 0.00", "+6.00 ± 0.00 |"]
    assert lines["mean of 3"][3] == "+0.67 ± 0.00"  # (1 + 1 + 0) / 3, the goal's columns
    assert lines["mean of 3, VitC-25ep for VitC (not a goal)"][3:5] == ["+1.67 ± 0.00", "2"]
    # Twitter sentiment in VitaminC's place: (1 + 1 - 2) / 3
    assert lines["mean of 3, Tweets for VitC (rerunnable without BIG-bench; not a goal)"][3:5] == [
        "+0.00 ± 0.00",
        "2",
    ]
    assert lines["Tweets"][3:] == ["-2.00 ± 0.00", "2", "+1.00 ± 0.00", "-4.00 ± 0.00 |"]
    # and at its 25-epoch cap: (1 + 1 + 4) / 3
    assert lines["Tweets-25ep"][3:] == ["+4.00 ± 0.00", "2", "+2.00 ± 0.00", "+8.00 ± 0.00 |"]
    assert lines["mean of 3, Tweets-25ep for VitC (not a goal)"][3:5] == ["+2.00 ± 0.00", "2"]
    # two stand-ins at once, BBC News at 256 and Twitter: (1 + 2 - 2) / 3, other metric (1 + 0 + 1) / 3
    affordable = lines[
        "mean of 3, BBC-256 for BBC and Tweets for VitC (rerunnable, 5-10 min a run; not a goal)"
    ]
    assert affordable[3:] == ["+0.33 ± 0.00", "2", "+0.67 ± 0.00", "+0.67 ± 0.00 |"]


@pytest.mark.parametrize("classes", [2, 3, 5])
def test_a_run_that_predicts_one_class_is_told_from_its_scores(classes):
    from sklearn.metrics import accuracy_score, f1_score

    rng = np.random.default_rng(classes)
    labels = rng.integers(0, classes, size=997)
    stalled = np.full_like(labels, classes - 1)
    near = stalled.copy()
    near[:3] = (near[:3] + 1) % classes  # three items leave the constant class

    def scores(predictions):
        return {
            "accuracy": accuracy_score(labels, predictions),
            "macro_f1": f1_score(labels, predictions, average="macro"),
        }

    assert quality.predicts_one_class(scores(stalled))
    assert not quality.predicts_one_class(scores(near))
    assert not quality.predicts_one_class(scores(labels))  # every item right: one "class count", not a stall
    assert not quality.predicts_one_class({"bleu": 30.0})


@pytest.mark.parametrize("method", ["ipt_pretrained_table", "ipt_pretrained_pooled", "imdb_table_floor"])
@pytest.mark.parametrize("task", ["bbc_news", "rotten_tomatoes_smollm2"])
def test_the_imdb_table_runs_on_minilm_rotten_tomatoes_only(task, method, capsys):
    """A MiniLM sentiment table is refused on a topic task and on another model's token ids, naming the fix."""
    argv = ["--tier", "converged", "--tasks", task, "--methods", method, "--report"]
    with pytest.raises(SystemExit):
        quality.main(argv)
    error = capsys.readouterr().err
    assert f"not {task}" in error and "--tasks rotten_tomatoes" in error


def test_a_row_whose_runs_all_failed_says_so_with_the_error(converged):
    runs = scored("rotten_tomatoes", "prefix_mlp", 0, 80, 80)
    runs["rotten_tomatoes/peft_prefix_tuning/0.01/0"] = {
        "task": "rotten_tomatoes",
        "method": "peft_prefix_tuning",
        "lr": 0.01,
        "seed": 0,
        "error": "ValueError('Model does not support past key values which are required for prefix tuning.')",
    }
    text = quality.markdown(
        quality.summarize(runs, False), ["rotten_tomatoes"], False, quality.failed_cells(runs)
    )
    lines = {line.split(" | ")[0].strip("| "): line for line in text.splitlines() if line.startswith("| ")}
    assert "| failed: ValueError('Model does not support past key values" in lines["peft PrefixTuning"]
    assert "| not run |" in lines["LoRA r=8"]


def test_a_task_whose_bigbench_data_was_not_fetched_is_refused_before_any_run(tmp_path, monkeypatch, capsys):
    from peft_ipt import assets

    monkeypatch.setattr(assets, "CACHE_DIR", tmp_path)  # no BIG-bench file fetched
    monkeypatch.setattr(quality.Runner, "run", lambda *a: pytest.fail("no run may start"))
    argv = [
        "--tier",
        "converged",
        "--tasks",
        "rotten_tomatoes",
        "vitaminc",
        "--quick",
        "--out",
        str(tmp_path / "q.json"),
    ]
    with pytest.raises(SystemExit):
        quality.main(argv)
    error = capsys.readouterr().err
    assert "no data for vitaminc: BIG-bench task 'vitaminc_fact_verification' is not in the cache" in error
    assert "--bigbench PATH" in error and "leave them out with --tasks" in error
    assert quality.unfetched_data(["rotten_tomatoes", "bbc_news"]) == {}


def test_the_imdb_table_is_trained_once_and_appears_whole(tmp_path, monkeypatch):
    from peft_ipt.cli import pretrain_table

    table = tmp_path / "tables" / "imdb_minilm.safetensors"
    calls = []

    def fake_pretrain(data, out):
        calls.append(data)
        assert not table.exists()  # written under another name first
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_bytes(b"table")

    monkeypatch.setattr(quality, "IMDB_TABLE", table)
    monkeypatch.setattr(pretrain_table, "pretrain_table", fake_pretrain)
    quality.build_imdb_table()
    quality.build_imdb_table()
    assert calls == ["imdb"]
    assert [p.name for p in table.parent.iterdir()] == [table.name]
    assert table.read_bytes() == b"table"


def test_the_imdb_table_floor_runs_once_and_only_when_asked(converged, tmp_path, monkeypatch):
    trained = []
    monkeypatch.setattr(quality, "load_runs", lambda _: {})
    monkeypatch.setattr(quality.Runner, "run", lambda self, cells: trained.extend(cells))
    monkeypatch.setattr(quality, "summarize", lambda runs, quick: [])
    monkeypatch.setattr(quality, "record_invocation", lambda *a, **k: ("", []))
    common = ["--tier", "converged", "--tasks", "rotten_tomatoes_256", "--out", str(tmp_path / "q.json")]
    quality.main([*common, "--methods", "imdb_table_floor", "--seeds", "0", "1"])
    assert trained == [("rotten_tomatoes_256", "imdb_table_floor", None, 0)]
    trained.clear()  # the tier's own floor does not bring it along
    quality.main([*common, "--methods", "floor"])
    assert trained == [("rotten_tomatoes_256", "floor", None, 0)]


def test_a_two_stage_row_names_its_first_stage_in_its_setup_and_folder(converged, monkeypatch):
    monkeypatch.setattr(quality, "PRECISION", "fp32")
    setup = json.loads(quality.current_setup("rotten_tomatoes_256", "ipt_on_prefix", False))
    first = quality.current_setup("rotten_tomatoes_256", "prefix_alone", False)
    digest = hashlib.sha256(first.encode()).hexdigest()[:12]
    assert setup["start"] == f"prefix_alone_0.01_{digest}"
    assert "start" not in json.loads(first) and "start_from" not in setup
    folders = {
        quality.start_folder("rotten_tomatoes_256", method, seed, False)
        for method in ("ipt_on_prefix", "prefix_continued")
        for seed in (0, 1)
    }
    assert len(folders) == 2  # both rows of a seed share one first stage; each seed has its own
    assert all("/fp32/rotten_tomatoes_256/" in str(folder) for folder in folders)


def test_the_mlp_two_stage_pair_starts_from_the_mlp_prefix_and_shares_its_shape(converged, monkeypatch):
    monkeypatch.setattr(quality, "PRECISION", "fp32")
    first = quality.current_setup("rotten_tomatoes", "prefix_mlp", False)
    digest = hashlib.sha256(first.encode()).hexdigest()[:12]
    for method in ("ipt_mlp_on_prefix", "prefix_mlp_continued"):
        assert json.loads(quality.current_setup("rotten_tomatoes", method, False))["start"] == (
            f"prefix_mlp_0.001_{digest}"
        )
    # start_from_prefix refuses a flat table into an MLP prefix: both sides carry the first stage's hidden size
    ipt, prefix = quality.CONVERGED_METHODS["ipt_mlp_on_prefix"], quality.CONVERGED_METHODS["prefix_mlp"]
    assert "method_config.task_prefix_hidden_size=56" in ipt.overrides
    assert "method_config.encoder_hidden_size=56" in prefix.overrides
    assert ipt.own_prefix == "prefix_mlp_continued"
    assert (
        quality.start_folder("rotten_tomatoes", "ipt_mlp_on_prefix", 0, False)
        == quality.start_folder("rotten_tomatoes", "prefix_mlp_continued", 0, False)
        != quality.start_folder("rotten_tomatoes", "ipt_on_prefix", 0, False)
    )


def test_a_first_stage_is_trained_once_and_appears_whole(converged, tmp_path, monkeypatch):
    from peft_ipt.cli import train as train_module

    calls = []

    def fake_train(config, overrides, output_dir):
        calls.append(overrides)
        output = Path(output_dir)
        assert ".partial" in output.name
        (output / "checkpoints" / "checkpoint-4").mkdir(parents=True)
        metrics = {"validation": {}, "test": {"accuracy": 0.5}, "steps": 8, "best_step": 4}
        (output / "metrics.json").write_text(json.dumps(metrics))

    monkeypatch.setattr(quality, "STARTS", tmp_path)
    monkeypatch.setattr(train_module, "train", fake_train)
    first = quality.train_start("rotten_tomatoes_256", "ipt_on_prefix", 3, False)
    again = quality.train_start("rotten_tomatoes_256", "prefix_continued", 3, False)
    assert len(calls) == 1 and "training.seed=3" in calls[0] and "training.learning_rate=0.01" in calls[0]
    assert first[0] == again[0] and first[1]["test"] == {"accuracy": 0.5}
    assert [p.name for p in first[0].iterdir()] == ["metrics.json"]  # the checkpoints removed
    assert [p.name for p in first[0].parent.iterdir()] == [first[0].name]  # no partial folder left
    assert f"--output-dir {first[0]}" in first[2]


def silent_on_the_scale(setup: str) -> str:
    """A setup as a run recorded before peft-ipt 0.2.0 wrote it: the instance scale left out where it was defaulted."""
    resolved = json.loads(setup)
    del resolved["method_config"]["instance_scale"]
    return json.dumps(resolved, sort_keys=True)


def test_a_run_recorded_silent_on_the_instance_scale_counts_as_the_former_default_1(converged, monkeypatch):
    """InstancePromptConfig's instance_scale moved from 1.0 to 0.05 in 0.2.0: a run recorded before, silent on it,
    trained at 1.0, so it stays current for a row that now sets 1.0 and counts for no row that takes 0.05."""
    monkeypatch.setitem(
        quality.TIERS["converged"].methods,
        "ipt_today",
        quality.MethodSpec("IPT, today's default", "ipt", GRID),
    )
    for method, scale in (("ipt_embeddings", 1.0), ("ipt_embeddings_scale", 0.05), ("ipt_today", 0.05)):
        setup = quality.current_setup("rotten_tomatoes", method, False)
        assert json.loads(setup)["method_config"]["instance_scale"] == scale  # named, defaulted or not
        run = {"task": "rotten_tomatoes", "method": method, "lr": 1e-2, "seed": 0, "setup": setup}
        assert quality.is_current(run, False) and quality.former_default_overrides(run) == []
        old = {**run, "setup": silent_on_the_scale(setup)}
        assert quality.is_current(old, False) is (scale == 1.0)
        assert quality.former_default_overrides(old) == ["method_config.instance_scale=1.0"]
    prefix = quality.current_setup("rotten_tomatoes", "prefix_alone", False)
    assert "instance_scale" not in json.loads(prefix)["method_config"]  # another method's setup is left alone


def test_the_architecture_sweep_tells_a_served_model_from_a_refused_one():
    import architectures

    served = architectures.sweep("CAUSAL_LM", "llama")
    assert served["built"] == "yes"
    assert all(served[method] == ("ok", "") for method in architectures.METHODS)
    assert served["peft_prefix_tuning"] == "moves"
    assert served["images"] == ("-", "")  # no vision tower: no call with an image
    assert architectures.check_images("llava", architectures.IMAGE_TEXT) == ("ok", "")
    refused = architectures.sweep("SEQ_CLS", "convbert")  # computes its attention itself
    assert all(refused[method][0] == "refused" for method in architectures.METHODS)
    assert "does not route attention through transformers.AttentionInterface" in refused["prefix_v2"][1]
    assert architectures.sweep("CAUSAL_LM", "gpt2")["prefix_v2"] == (
        "ok",
        "needs position_ids, as the bare model does",
    )


def test_the_sweep_gives_a_model_slow_without_the_adapter_time_in_proportion_and_still_fails_a_hang(
    monkeypatch,
):
    """Falcon-H1 on the reference Mamba kernels took about 40 s for its bare runs on a loaded CPU, and its method
    checks (the bare runs again, then the adapter's) were reported FAIL at a fixed 60 s."""
    import time

    import architectures

    monkeypatch.setattr(architectures, "TIMEOUT_S", 1)
    monkeypatch.setattr(architectures, "bare_runs", lambda model_type, task: time.sleep(0.3))
    monkeypatch.setattr(architectures, "check_images", lambda model_type, task: ("-", ""))
    monkeypatch.setattr(architectures, "check_peft", lambda model_type, task: "moves")

    def check(model_type, task, method):
        time.sleep(100 if method == "ipt_input" else 1.5)  # longer than TIMEOUT_S; a hang
        return ("ok", "")

    monkeypatch.setattr(architectures, "check_method", check)
    row = architectures.sweep("CAUSAL_LM", "slow")
    assert row["prefix_v2"] == row["ipt"] == ("ok", "")
    # the hang fails 1 s beyond three times the bare runs (0.3 s, rounded up to 1)
    assert row["ipt_input"] == ("FAIL", "timed out after 4 s")


@pytest.mark.parametrize(
    "method", [m for m in quality.TIERS["converged"].methods if m not in quality.UNTRAINED]
)
def test_each_converged_row_resolves_to_a_config_holding_its_own_settings(converged, method):
    from peft_ipt.cli.experiment import load_experiment, parse_value

    task = quality.TIER.tasks["rotten_tomatoes"]
    experiment = load_experiment(
        quality.config_path(task, method), quality.run_overrides(task, method, 0.01, 0, False)
    )
    config = experiment.peft_config()
    settings = [o.partition("=") for o in quality.TIER.methods[method].overrides]
    for key, _, value in settings:
        if key.startswith("method_config."):
            field = key.removeprefix("method_config.")
            assert getattr(config, field) == parse_value(value), (method, field)
    assert experiment.training_settings["learning_rate"] == 0.01
