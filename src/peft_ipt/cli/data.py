"""From the experiment's ``data:`` block to tokenised Trainer inputs and collators.

:func:`load_splits` returns train/validation/test in one canonical form, whatever the source:

- classification: ``text`` (+ ``text_pair``), ``label`` (int ids into ``label_names``);
- generation: ``input`` and ``references`` (every reference of that input; rows are distinct inputs, so a
  test input is scored against all its references and never leaks from train).

It checks splits and columns and raises :class:`ExperimentError` naming the key and the file, before any model
is loaded. Tokenisation then differs per task only in what is fed in and which tokens carry labels.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import torch

from ..assets import BUNDLED_DATASETS, load_bundled_dataset
from .experiment import ROLES, DataConfig, Experiment, ExperimentError

FILE_BUILDERS = {".csv": "csv", ".tsv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}
IGNORE_INDEX = -100  # labels that the loss skips, and that mark IPT's source tokens on causal LMs


@dataclass
class Splits:
    train: datasets.Dataset
    validation: datasets.Dataset
    test: datasets.Dataset
    label_names: list[str] | None  # classification only

    def __getitem__(self, role: str) -> datasets.Dataset:
        return getattr(self, role)

    def sizes(self) -> dict[str, int]:
        return {role: len(self[role]) for role in ROLES}


# ---------------------------------------------------------------------------------------------------------
# Loading and checking


def _read_files(files: dict[str, str], source: str) -> datasets.DatasetDict:
    """Local files, one split each. Read one at a time, so that an error names its file."""
    for split, path in files.items():
        if not Path(path).is_file():
            raise ExperimentError(f"{source}: data.files.{split}: no such file {path}")
    suffixes = {Path(path).suffix.lower() for path in files.values()}
    builders = {FILE_BUILDERS.get(suffix) for suffix in suffixes}
    if None in builders or len(builders) != 1:
        raise ExperimentError(
            f"{source}: data.files: give files of one format, one of {', '.join(FILE_BUILDERS)} (got "
            f"{', '.join(sorted(suffixes))})"
        )
    builder, kwargs = builders.pop(), {"delimiter": "\t"} if suffixes == {".tsv"} else {}
    loaded = {}
    for split, path in files.items():
        empty = ExperimentError(f"{source}: data.files.{split}: the {split} split ({split!r}) is empty")
        if Path(path).stat().st_size == 0:
            raise empty
        try:
            loaded[split] = datasets.load_dataset(builder, data_files={split: path}, split=split, **kwargs)
        except Exception as error:  # noqa: BLE001 - any reading error means the same fix
            # `datasets` refuses a file without rows (a csv with only its header) with this message.
            if "corresponds to no data" in str(error):
                raise empty from error
            raise ExperimentError(
                f"{source}: data.files.{split}: could not read {path} as {builder} ({error})"
            ) from error
    return datasets.DatasetDict(loaded)


def _read_named(data: DataConfig, source: str) -> datasets.DatasetDict:
    """A bundled data set, or any data set `datasets.load_dataset` can load by name."""
    if data.name in BUNDLED_DATASETS:
        return load_bundled_dataset(data.name, seed=data.seed)
    try:
        loaded = datasets.load_dataset(data.name, data.config_name)
    except Exception as error:  # noqa: BLE001 - offline, unknown name, bad config: the same fix
        raise ExperimentError(
            f"{source}: data.name {data.name!r} is not a bundled data set ({', '.join(BUNDLED_DATASETS)}) and "
            f"datasets.load_dataset could not load it: {type(error).__name__}: {error}"
        ) from error
    return loaded if isinstance(loaded, datasets.DatasetDict) else datasets.DatasetDict({"train": loaded})


def _pick_splits(raw: datasets.DatasetDict, data: DataConfig, where: str, source: str) -> dict:
    mapping = {role: (data.splits or {}).get(role, role) for role in ROLES}
    picked = {}
    for role in ROLES:
        name = mapping[role]
        if name in raw:
            picked[role] = raw[name]
        elif role != "validation" or "validation" in (data.splits or {}):
            key = f"data.splits.{role}" if data.splits and role in data.splits else where
            raise ExperimentError(
                f"{source}: {key}: the data has no {name!r} split for {role} (splits: {', '.join(raw)}); "
                f"name one with data.splits.{role}"
            )
    for role, split in picked.items():
        if len(split) == 0:
            key = f"data.files.{mapping[role]}" if data.files and mapping[role] in data.files else where
            raise ExperimentError(f"{source}: {key}: the {role} split ({mapping[role]!r}) is empty")
    if "validation" not in picked:
        # A validation split cut from train, seeded; test stays untouched.
        parts = picked["train"].train_test_split(test_size=data.validation_fraction, seed=data.seed)
        picked["train"], picked["validation"] = parts["train"], parts["test"]
    return picked


def _require_columns(picked: dict, columns: dict[str, str | None], source: str) -> None:
    for key, column in columns.items():
        if column is None:
            continue
        for role, split in picked.items():
            if column not in split.column_names:
                raise ExperimentError(
                    f"{source}: data.{key} {column!r} is not a column of the {role} split (columns: "
                    f"{', '.join(split.column_names)})"
                )


def _classification(picked: dict, data: DataConfig, source: str) -> tuple[dict, list[str]]:
    _require_columns(
        picked,
        {
            "text_column": data.text_column,
            "text_pair_column": data.text_pair_column,
            "label_column": data.label_column,
        },
        source,
    )
    feature = picked["train"].features[data.label_column]
    if isinstance(feature, datasets.ClassLabel):
        names = list(feature.names)
        to_id = {i: i for i in range(len(names))}
    else:
        values = sorted(set(picked["train"][data.label_column]), key=lambda v: (str(type(v)), v))
        names = [str(v) for v in values]
        to_id = {v: i for i, v in enumerate(values)}
    out = {}
    for role, split in picked.items():
        labels = split[data.label_column]
        unseen = [v for v in dict.fromkeys(labels) if v not in to_id]
        if unseen:
            raise ExperimentError(
                f"{source}: data.label_column {data.label_column!r}: the {role} split has label {unseen[0]!r}, "
                f"which never occurs in train (labels: {', '.join(names)})"
            )
        columns = {"text": list(split[data.text_column]), "label": [to_id[v] for v in labels]}
        if data.text_pair_column:
            columns["text_pair"] = list(split[data.text_pair_column])
        out[role] = datasets.Dataset.from_dict(columns)
    return out, names


def _generation(picked: dict, data: DataConfig, source: str) -> dict:
    target = data.target_column
    if target is None:
        columns = picked["train"].column_names
        target = next((c for c in ("references", "target") if c in columns), None)
        if target is None:
            raise ExperimentError(
                f"{source}: data.target_column is not set and the train split has neither a 'references' nor a "
                f"'target' column (columns: {', '.join(columns)}); set data.target_column"
            )
    _require_columns(picked, {"input_column": data.input_column, "target_column": target}, source)
    out = {}
    for role, split in picked.items():
        # Group rows by input, in order of first appearance: one row per input, all its references.
        references: dict[str, list[str]] = {}
        for text, refs in zip(split[data.input_column], split[target], strict=True):
            references.setdefault(text, []).extend([refs] if isinstance(refs, str) else list(refs))
        out[role] = datasets.Dataset.from_dict(
            {"input": list(references), "references": list(references.values())}
        )
    return out


def _subsample(split: datasets.Dataset, size: int | None, seed: int) -> datasets.Dataset:
    if size is None or size >= len(split):
        return split
    return split.shuffle(seed=seed).select(range(size))


def load_splits(experiment: Experiment) -> Splits:
    """The experiment's train/validation/test in canonical columns, checked and subsampled (module docstring)."""
    data, source = experiment.data, experiment.source
    raw = _read_files(data.files, source) if data.files else _read_named(data, source)
    where = "data.files" if data.files else "data.name"
    picked = _pick_splits(raw, data, where, source)
    if experiment.task_type == "SEQ_CLS":
        splits, label_names = _classification(picked, data, source)
    else:
        splits, label_names = _generation(picked, data, source), None
    sizes = {"train": data.train_size, "validation": data.validation_size, "test": data.test_size}
    splits = {role: _subsample(splits[role], sizes[role], data.seed) for role in ROLES}
    return Splits(**splits, label_names=label_names)


# ---------------------------------------------------------------------------------------------------------
# Tokenisation


def prompt_text(text: str, experiment: Experiment) -> str:
    """What the model reads for an input: decoder-only models read the input then the separator."""
    return text + experiment.data.separator if experiment.task_type == "CAUSAL_LM" else text


def tokenize_classification(split: datasets.Dataset, tokenizer, data: DataConfig) -> datasets.Dataset:
    def encode(batch: dict[str, list]) -> dict[str, Any]:
        pair = batch.get("text_pair")
        encoded = tokenizer(batch["text"], pair, truncation=True, max_length=data.max_length)
        return {**encoded, "labels": batch["label"]}

    return split.map(encode, batched=True, remove_columns=split.column_names)


def _pairs(split: datasets.Dataset) -> tuple[list[str], list[str]]:
    """(input, reference) training pairs: each input once per reference."""
    inputs, targets = [], []
    for text, references in zip(split["input"], split["references"], strict=True):
        inputs.extend([text] * len(references))
        targets.extend(references)
    return inputs, targets


def tokenize_generation(split: datasets.Dataset, tokenizer, experiment: Experiment) -> datasets.Dataset:
    """Teacher-forcing rows, one per (input, reference).

    CAUSAL_LM: ``input_ids`` = prompt + target + eos, ``labels`` = -100 on the prompt, so the loss reads only the
    target and IPT builds its instance prompt from the prompt alone. SEQ_2_SEQ_LM: the prompt feeds the encoder,
    the target is ``labels``.
    """
    data = experiment.data
    inputs, targets = _pairs(split)
    prompts = tokenizer(
        [prompt_text(t, experiment) for t in inputs], truncation=True, max_length=data.max_length
    )["input_ids"]
    if experiment.task_type == "SEQ_2_SEQ_LM":
        labels = tokenizer(text_target=targets, truncation=True, max_length=data.max_target_length)[
            "input_ids"
        ]
        rows = {"input_ids": prompts, "attention_mask": [[1] * len(p) for p in prompts], "labels": labels}
        return datasets.Dataset.from_dict(rows)
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    target_ids = tokenizer(
        targets, add_special_tokens=False, truncation=True, max_length=data.max_target_length
    )
    rows = {"input_ids": [], "attention_mask": [], "labels": []}
    for prompt, target in zip(prompts, target_ids["input_ids"], strict=True):
        target = target + eos
        rows["input_ids"].append(prompt + target)
        rows["attention_mask"].append([1] * (len(prompt) + len(target)))
        rows["labels"].append([IGNORE_INDEX] * len(prompt) + target)
    return datasets.Dataset.from_dict(rows)


# ---------------------------------------------------------------------------------------------------------
# Collators


@dataclass
class CausalLMCollator:
    """Right-pads ``input_ids`` with the pad id, ``attention_mask`` with 0 and ``labels`` with -100."""

    pad_token_id: int

    def __call__(self, rows: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        length = max(len(row["input_ids"]) for row in rows)
        fill = {"input_ids": self.pad_token_id, "attention_mask": 0, "labels": IGNORE_INDEX}
        return {
            key: torch.tensor([row[key] + [value] * (length - len(row[key])) for row in rows])
            for key, value in fill.items()
        }


def padded_prompts(token_ids: list[list[int]], pad_token_id: int, left: bool) -> dict[str, torch.Tensor]:
    """Prompts for batched generation. Decoder-only models need padding on the left, so that every row
    continues from its own last token; encoders read right-padded input as in training."""

    def pad(row: list[int], fill: int, length: int) -> list[int]:
        return [fill] * (length - len(row)) + row if left else row + [fill] * (length - len(row))

    length = max(len(ids) for ids in token_ids)
    return {
        "input_ids": torch.tensor([pad(ids, pad_token_id, length) for ids in token_ids]),
        "attention_mask": torch.tensor([pad([1] * len(ids), 0, length) for ids in token_ids]),
    }


def collator_for(experiment: Experiment, tokenizer):
    from transformers import DataCollatorForSeq2Seq, DataCollatorWithPadding

    if experiment.task_type == "SEQ_CLS":
        return DataCollatorWithPadding(tokenizer)
    if experiment.task_type == "SEQ_2_SEQ_LM":
        return DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=IGNORE_INDEX)
    return CausalLMCollator(tokenizer.pad_token_id)


def tokenize(split: datasets.Dataset, tokenizer, experiment: Experiment) -> datasets.Dataset:
    """Trainer inputs of one split, for the experiment's task."""
    if experiment.task_type == "SEQ_CLS":
        return tokenize_classification(split, tokenizer, experiment.data)
    return tokenize_generation(split, tokenizer, experiment)
