"""The experiment YAML: its schema, ``--set`` overrides, and validation that runs before any model is loaded.

One file describes one run::

    model: minilm                  # a bundled model (minilm, smollm2), a local folder or a Hub id
    task_type: SEQ_CLS             # SEQ_CLS | CAUSAL_LM | SEQ_2_SEQ_LM
    data: rotten_tomatoes          # or a mapping: see DataConfig
    method: ipt                    # see METHODS
    method_config: {prompt_length: 16}
    training: {learning_rate: 0.01, num_train_epochs: 3}   # a whitelist of TrainingArguments fields
    metric: accuracy               # accuracy | macro_f1 (classification); bleu | rouge_l (generation)
    generation: {max_new_tokens: 64}

Every error names the file and the dotted key, e.g.
``configs/x.yaml: training.learning_rte is not a known key (did you mean learning_rate?)``.
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

TASK_TYPES = ("SEQ_CLS", "CAUSAL_LM", "SEQ_2_SEQ_LM")
ROLES = ("train", "validation", "test")
GENERATION_TASKS = ("CAUSAL_LM", "SEQ_2_SEQ_LM")
METRICS = {"SEQ_CLS": ("accuracy", "macro_f1"), "CAUSAL_LM": ("bleu", "rouge_l")}
METRICS["SEQ_2_SEQ_LM"] = METRICS["CAUSAL_LM"]

# Bundled model name -> the Hub id it is a copy of (the model card's `base_model`).
BUNDLED_MODELS = {
    "minilm": "sentence-transformers/all-MiniLM-L6-v2",
    "smollm2": "HuggingFaceTB/SmolLM2-135M-Instruct",
}


def model_path(name: str) -> str:
    """Folder or Hub id to load: a bundled name resolves to its folder, anything else passes through."""
    if name in BUNDLED_MODELS:
        from ..assets import bundled_model_path

        return str(bundled_model_path(name))
    return name


# TrainingArguments fields an experiment may set; their types are read from TrainingArguments itself.
TRAINING_KEYS = (
    "learning_rate",
    "num_train_epochs",
    "max_steps",
    "per_device_train_batch_size",
    "per_device_eval_batch_size",
    "gradient_accumulation_steps",
    "weight_decay",
    "warmup_steps",
    "lr_scheduler_type",
    "lr_scheduler_kwargs",
    "optim",
    "adam_beta1",
    "adam_beta2",
    "adam_epsilon",
    "max_grad_norm",
    "label_smoothing_factor",
    "seed",
    "data_seed",
    "train_sampling_strategy",
    "logging_steps",
    "logging_first_step",
    "eval_strategy",
    "eval_steps",
    "eval_on_start",
    "save_strategy",
    "save_steps",
    "save_total_limit",
    "load_best_model_at_end",
    "metric_for_best_model",
    "greater_is_better",
    "bf16",
    "fp16",
    "gradient_checkpointing",
    "activation_checkpointing",  # transformers 5.25's name for gradient_checkpointing
    "dataloader_num_workers",
    "disable_tqdm",
    "use_cpu",
    "report_to",
    "neftune_noise_alpha",
)
# Keys of `training:` that are ours, not TrainingArguments fields: early stopping on the validation metric. With
# a patience set, the run evaluates and saves at the same cadence, keeps the best checkpoint and ends on it
# (load_best_model_at_end); the test split is scored on that model. It stops after `patience` evaluations without
# improvement (by more than `threshold`), counted from `early_stopping_min_steps` on (default 0).
EARLY_STOPPING_KEYS = {
    "early_stopping_patience": int | None,
    "early_stopping_threshold": float,
    "early_stopping_min_steps": int,
}

# Our defaults where TrainingArguments' own do not suit short adapter runs; `training:` overrides each.
TRAINING_DEFAULTS = {
    "eval_strategy": "epoch",
    "save_strategy": "no",  # the adapter is saved once, at the end, into the output folder
    "logging_steps": 10,
    "per_device_eval_batch_size": 64,
    "report_to": "none",
    "seed": 42,
}

# Config fields the model fills in (shapes, peft bookkeeping) or the experiment sets elsewhere (task_type).
NOT_USER_FIELDS = frozenset(
    {
        "peft_type",
        "task_type",
        "auto_mapping",
        "peft_version",
        "base_model_name_or_path",
        "revision",
        "inference_mode",
        "token_dim",
        "num_transformer_submodules",
        "num_attention_heads",
        "num_layers",
        "base_model_shapes",
        "folded",
    }
)


class ExperimentError(ValueError):
    """An experiment file (or a --set override) is invalid; the message names the file and the key."""


@dataclass(frozen=True)
class Method:
    """How a ``method:`` name maps to a peft config class, and which of its fields must be given."""

    config_path: str | None  # "module:Class"; None for full fine-tuning
    required: tuple[str, ...] = ()

    def config_class(self) -> type | None:
        if self.config_path is None:
            return None
        module, _, name = self.config_path.partition(":")
        return getattr(__import__(module, fromlist=[name]), name)


METHODS: dict[str, Method] = {
    "ipt": Method("peft_ipt.instance_prompt.config:InstancePromptConfig"),
    "prefix_v2": Method("peft_ipt.prefix_tuning.config:PrefixTuningV2Config"),
    "peft_prompt_tuning": Method("peft:PromptTuningConfig", required=("num_virtual_tokens",)),
    "peft_p_tuning": Method("peft:PromptEncoderConfig", required=("num_virtual_tokens",)),
    "peft_prefix_tuning": Method("peft:PrefixTuningConfig", required=("num_virtual_tokens",)),
    "lora": Method("peft:LoraConfig"),
    "full": Method(None),
}


@dataclass
class DataConfig:
    """Where the examples come from and how they become model inputs (``data: NAME`` = ``{name: NAME}``)."""

    name: str | None = field(
        default=None,
        metadata={"help": "A bundled data set (peft_ipt.assets.BUNDLED_DATASETS) or a `datasets` Hub name."},
    )
    config_name: str | None = field(
        default=None, metadata={"help": "Configuration of a `datasets` Hub data set (e.g. 'sst2')."}
    )
    files: dict[str, str] | None = field(
        default=None,
        metadata={
            "help": "Local csv/tsv/json/jsonl/parquet files by split, e.g. {train: a.csv, test: b.csv}; relative "
            "paths are relative to the YAML file."
        },
    )
    splits: dict[str, str] | None = field(
        default=None,
        metadata={
            "help": "Which split of the source plays train/validation/test, e.g. {test: validation}. A missing "
            "validation split is cut from train (validation_fraction)."
        },
    )
    validation_fraction: float = field(
        default=0.1, metadata={"help": "Share of train held out when the source has no validation split."}
    )
    seed: int = field(default=0, metadata={"help": "Seed of the bundled splits and of every subsample."})
    train_size: int | None = field(default=None, metadata={"help": "Subsample train to this many rows."})
    validation_size: int | None = field(default=None, metadata={"help": "Subsample validation rows."})
    test_size: int | None = field(default=None, metadata={"help": "Subsample test rows (None: all)."})
    max_length: int = field(default=128, metadata={"help": "Tokens kept of the text / generation prompt."})
    max_target_length: int = field(default=64, metadata={"help": "Tokens kept of a generation target."})
    text_column: str = field(default="text", metadata={"help": "Classification: the text."})
    text_pair_column: str | None = field(
        default=None, metadata={"help": "Classification: an optional second text (sentence pairs)."}
    )
    label_column: str = field(default="label", metadata={"help": "Classification: the label."})
    input_column: str = field(default="input", metadata={"help": "Generation: the source text."})
    target_column: str | None = field(
        default=None,
        metadata={
            "help": "Generation: the target, a string or a list of references. None: 'references' if present, "
            "else 'target'."
        },
    )
    separator: str = field(
        default="\n", metadata={"help": "CAUSAL_LM: appended to the input to form the prompt."}
    )


@dataclass
class GenerationConfig:
    """Decoding for generation tasks (validation, test and `peft-ipt generate`)."""

    max_new_tokens: int = field(default=64, metadata={"help": "Tokens generated per input."})
    num_beams: int = field(default=1, metadata={"help": "1: greedy decoding."})
    batch_size: int = field(default=16, metadata={"help": "Inputs decoded together."})


@dataclass
class Experiment:
    model: str = field(metadata={"help": "Bundled name (minilm, smollm2), local folder or Hub id."})
    task_type: str = field(metadata={"help": f"One of {TASK_TYPES}."})
    data: DataConfig = field(metadata={"help": "A bundled data set name, or a mapping (see DataConfig)."})
    method: str = field(metadata={"help": f"One of {tuple(METHODS)}."})
    method_config: dict[str, Any] = field(
        default_factory=dict, metadata={"help": "Fields of the method's config class."}
    )
    training: dict[str, Any] = field(
        default_factory=dict, metadata={"help": "TrainingArguments fields (see TRAINING_KEYS)."}
    )
    metric: str | None = field(
        default=None, metadata={"help": "Main metric; None: accuracy (classification) or bleu (generation)."}
    )
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    description: str | None = field(default=None, metadata={"help": "Free text for the model card."})
    start_from: str | None = field(
        default=None,
        metadata={
            "help": "A trained PrefixTuningV2 adapter folder (e.g. another run's output) to start from: method "
            "prefix_v2 trains that prefix on; method ipt (injection hybrid) adds its instance part on top of it "
            "(peft_ipt.start_from_prefix)."
        },
    )
    source: str = field(default="<dict>", metadata={"help": "The file this came from (not a YAML key)."})

    def __post_init__(self):
        if self.metric is None:
            self.metric = METRICS[self.task_type][0]

    @property
    def method_spec(self) -> Method:
        return METHODS[self.method]

    @property
    def early_stopping_patience(self) -> int | None:
        return self.training.get("early_stopping_patience")

    @property
    def training_settings(self) -> dict[str, Any]:
        """The TrainingArguments fields of the run: ours (TRAINING_DEFAULTS) updated by ``training:``.

        With ``early_stopping_patience`` the run also keeps its best checkpoint by the main validation metric:
        checkpoints at the evaluation cadence (unless ``save_strategy`` is set), the best one loaded at the end.
        """
        settings = {**TRAINING_DEFAULTS, **self.training}
        for key in EARLY_STOPPING_KEYS:
            settings.pop(key, None)
        if self.early_stopping_patience is not None:
            settings["load_best_model_at_end"] = True
            settings.setdefault("metric_for_best_model", f"eval_{self.metric}")
            settings.setdefault("greater_is_better", True)
            if "save_strategy" not in self.training:
                settings["save_strategy"] = settings["eval_strategy"]
                if "eval_steps" in settings:
                    settings["save_steps"] = settings["eval_steps"]
            settings.setdefault("save_total_limit", 1)  # Trainer keeps the best one besides
        return settings

    @property
    def model_path(self) -> str:
        return model_path(self.model)

    def peft_config(self):
        """The method's peft config, or None for full fine-tuning."""
        config_class = self.method_spec.config_class()
        if config_class is None:
            return None
        kwargs = dict(self.method_config)
        if self.method == "peft_prompt_tuning" and str(kwargs.get("prompt_tuning_init")).upper() == "TEXT":
            kwargs.setdefault("tokenizer_name_or_path", self.model_path)  # peft needs it for the init text
        return config_class(task_type=self.task_type, **kwargs)

    def to_dict(self) -> dict[str, Any]:
        """The resolved experiment, as YAML-ready plain data (``source`` dropped)."""
        out = dataclasses.asdict(self)
        out.pop("source")
        return out

    def dump(self, path: Path | str) -> None:
        with open(path, "w", encoding="utf-8") as f:
            f.write(f"# resolved experiment, from {self.source}\n")
            yaml.dump(self.to_dict(), f, Dumper=_Dumper, sort_keys=False, allow_unicode=True)


# ---------------------------------------------------------------------------------------------------------
# YAML reading


class _Loader(yaml.SafeLoader):
    """PyYAML follows YAML 1.1, where ``1e-2`` is a string and ``no``/``on`` are booleans; read both as YAML 1.2
    does (``1e-2`` a float, ``eval_strategy: no`` the string transformers expects, only true/false booleans)."""


_Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)

_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


class _Dumper(yaml.SafeDumper):
    """Writes strings holding newlines double-quoted ("\\n"), so a separator reads as what it is."""


_Dumper.add_representer(
    str,
    lambda dumper, text: dumper.represent_scalar(
        "tag:yaml.org,2002:str", text, style='"' if "\n" in text else None
    ),
)


def parse_value(text: str) -> Any:
    """A ``--set`` value, typed as YAML would type it (``0.01`` float, ``true`` bool, ``[1, 2]`` list)."""
    return yaml.load(text, Loader=_Loader)


def read_yaml(path: Path | str) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            raw = yaml.load(f, Loader=_Loader)
    except FileNotFoundError:
        raise ExperimentError(f"{path}: no such experiment file") from None
    except yaml.YAMLError as error:
        raise ExperimentError(f"{path}: not valid YAML ({error})") from None
    if not isinstance(raw, dict):
        raise ExperimentError(
            f"{path}: an experiment file must be a mapping of keys (got {type(raw).__name__})"
        )
    return raw


def apply_overrides(raw: dict[str, Any], overrides: list[str], source: str) -> set[str]:
    """Apply ``key.sub=value`` overrides in place; returns the dotted keys they set."""
    keys = set()
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise ExperimentError(f"{source}: --set {item!r} must look like key.sub=value")
        parts = key.strip().split(".")
        node = raw
        for depth, part in enumerate(parts[:-1]):
            child = node.get(part)
            if isinstance(child, str) and depth == 0 and part == "data":
                child = {"name": child}  # `data: NAME` is shorthand for {name: NAME}
            if child is None:
                child = {}
            if not isinstance(child, dict):
                raise ExperimentError(
                    f"{source}: --set {key}: {'.'.join(parts[: depth + 1])} is not a mapping (it is {child!r})"
                )
            node[part] = child
            node = child
        node[parts[-1]] = parse_value(text)
        keys.add(key.strip())
    return keys


# ---------------------------------------------------------------------------------------------------------
# Validation


def _describe(annotation: Any) -> str:
    if annotation is type(None):
        return "null"
    if isinstance(annotation, type):
        return annotation.__name__
    return str(annotation).replace("typing.", "")


def _matches(value: Any, annotation: Any) -> bool:
    """Whether a YAML value fits a type annotation. Types we cannot check (classes) accept anything: the
    config's own ``__post_init__`` has the last word."""
    if annotation is Any or annotation is dataclasses.MISSING:
        return True
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, arm) for arm in typing.get_args(annotation))
    if origin is typing.Literal:
        return value in typing.get_args(annotation)
    if origin in (list, tuple, set):
        args = typing.get_args(annotation)
        return isinstance(value, list) and (not args or all(_matches(v, args[0]) for v in value))
    if origin is dict:
        args = typing.get_args(annotation)
        if not isinstance(value, dict):
            return False
        return not args or all(_matches(k, args[0]) and _matches(v, args[1]) for k, v in value.items())
    if annotation is type(None):
        return value is None
    if annotation is bool:
        return isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation in (str, dict, list):
        return isinstance(value, annotation)
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        return isinstance(value, str)
    return True


def _renamed_fields(config_class: type | None) -> dict[str, tuple[str, str]] | None:
    """Our configs' table of names peft or the other method uses for their fields; peft's own configs have none."""
    renamed = getattr(config_class, "renamed_fields", None)
    return renamed() if renamed else None


def _unknown_key(
    source: str,
    key: str,
    known: list[str],
    from_set: set[str],
    renamed: dict[str, tuple[str, str]] | None = None,
) -> ExperimentError:
    name = key.rpartition(".")[2]
    close = difflib.get_close_matches(name, known, n=1)
    if renamed and name in renamed:
        whose, fix = renamed[name]
        hint = f" (that is {whose} name; use {fix})"
    elif close:
        hint = f" (did you mean {close[0]}?)"
    else:
        hint = f" (known keys: {', '.join(sorted(known))})"
    origin = " (from --set)" if key in from_set else ""
    return ExperimentError(f"{source}: {key}{origin} is not a known key{hint}")


class _Checker:
    def __init__(self, source: str, from_set: set[str]):
        self.source = source
        self.from_set = from_set

    def error(self, key: str, message: str) -> ExperimentError:
        origin = " (from --set)" if key in self.from_set else ""
        return ExperimentError(f"{self.source}: {key}{origin} {message}")

    def fields(
        self,
        raw: Any,
        hints: dict[str, Any],
        prefix: str,
        required: tuple[str, ...] = (),
        renamed: dict[str, tuple[str, str]] | None = None,
    ) -> dict:
        """Check a mapping against ``name -> annotation``: known keys, types, required keys; ``renamed``: keys
        peft or the other method names differently: whose name each is, and the name to use here."""
        if not isinstance(raw, dict):
            raise self.error(prefix.rstrip("."), f"must be a mapping (got {raw!r})")
        for key, value in raw.items():
            dotted = f"{prefix}{key}"
            if key not in hints:
                raise _unknown_key(self.source, dotted, list(hints), self.from_set, renamed)
            if not _matches(value, hints[key]):
                raise self.error(
                    dotted, f"must be {_describe(hints[key])} (got {value!r}, a {type(value).__name__})"
                )
        for key in required:
            if key not in raw:
                raise self.error(f"{prefix}{key}", "is required")
        return raw

    def dataclass(self, cls: type, raw: Any, prefix: str, required: tuple[str, ...] = ()) -> dict:
        hints = typing.get_type_hints(cls)
        names = {f.name: hints[f.name] for f in dataclasses.fields(cls) if f.init and f.name != "source"}
        return self.fields(raw, names, prefix, required)

    def choice(self, key: str, value: Any, allowed: tuple[str, ...]) -> None:
        if value not in allowed:
            close = difflib.get_close_matches(str(value), allowed, n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise self.error(key, f"must be one of {', '.join(allowed)} (got {value!r}){hint}")

    def positive(self, key: str, value: Any, allow_none: bool = True) -> None:
        if (value is None and not allow_none) or (value is not None and value < 1):
            raise self.error(key, f"must be an integer >= 1 (got {value!r})")


def training_hints() -> dict[str, Any]:
    from transformers import TrainingArguments

    hints = typing.get_type_hints(TrainingArguments)
    # the keys this transformers' TrainingArguments has (activation_checkpointing is 5.25's)
    return {**{name: hints[name] for name in TRAINING_KEYS if name in hints}, **EARLY_STOPPING_KEYS}


def training_choices() -> dict[str, tuple[str, ...]]:
    """The values TrainingArguments declares for those of our keys that have a fixed set."""
    from transformers import TrainingArguments

    fields = {f.name: f for f in dataclasses.fields(TrainingArguments) if f.name in TRAINING_KEYS}
    return {name: tuple(f.metadata["choices"]) for name, f in fields.items() if "choices" in f.metadata}


def method_hints(method: Method) -> dict[str, Any]:
    config_class = method.config_class()
    if config_class is None:
        return {}
    hints = typing.get_type_hints(config_class)
    return {f.name: hints[f.name] for f in dataclasses.fields(config_class) if f.name not in NOT_USER_FIELDS}


def resolve_path(path: str, base: Path) -> str:
    """A path from the YAML, relative to the YAML's folder, made absolute."""
    candidate = Path(path).expanduser()
    return str(candidate if candidate.is_absolute() else (base / candidate).resolve())


def _base_folder(source: str) -> Path:
    """Relative paths in an experiment are relative to its file (or to the working directory for a dict)."""
    return Path(source).parent if source != "<dict>" else Path.cwd()


def _validate_data(check: _Checker, raw: Any, source: str) -> DataConfig:
    data = dict(check.dataclass(DataConfig, raw, "data."))
    if (data.get("name") is None) == (data.get("files") is None):
        raise check.error(
            "data", "needs exactly one of data.name (a data set name) and data.files (local files)"
        )
    for key in ("train_size", "validation_size", "test_size"):
        check.positive(f"data.{key}", data.get(key))
    for key in ("max_length", "max_target_length"):
        check.positive(f"data.{key}", data.get(key, 1), allow_none=False)
    fraction = data.get("validation_fraction", 0.1)
    if not 0 < fraction < 1:
        raise check.error("data.validation_fraction", f"must be in (0, 1) (got {fraction!r})")
    for role in data.get("splits") or {}:
        check.choice(f"data.splits.{role}", role, ROLES)
    if data.get("files"):
        for split in data["files"]:
            check.choice(f"data.files.{split}", split, ROLES)
        data["files"] = {
            split: resolve_path(path, _base_folder(source)) for split, path in data["files"].items()
        }
    return DataConfig(**data)


def _validate_early_stopping(check: _Checker, training: dict[str, Any]) -> None:
    patience = training.get("early_stopping_patience")
    check.positive("training.early_stopping_patience", patience)
    if "early_stopping_threshold" in training and patience is None:
        raise check.error(
            "training.early_stopping_threshold",
            "needs training.early_stopping_patience (the evaluations to wait)",
        )
    if patience is None:
        return
    strategy = training.get("eval_strategy", TRAINING_DEFAULTS["eval_strategy"])
    if strategy == "no":
        raise check.error(
            "training.early_stopping_patience",
            "needs validation during training, but training.eval_strategy is 'no'; set it to 'epoch' or 'steps'",
        )
    saving = training.get("save_strategy")
    if saving is not None and saving != strategy:
        raise check.error(
            "training.save_strategy",
            f"must match training.eval_strategy ({strategy!r}) with early stopping, which keeps the best evaluated "
            f"checkpoint (got {saving!r}); leave save_strategy unset",
        )


def _resolve_model(check: _Checker, model: str, source: str) -> str:
    """A bundled name stays as it is; a local folder (relative to the file or the working directory) becomes
    absolute, so the saved experiment works from anywhere; anything else is taken as a Hub id."""
    if not model.strip():
        raise check.error("model", "must name a bundled model (minilm, smollm2), a folder or a Hub id")
    if model in BUNDLED_MODELS:
        return model
    for candidate in (_base_folder(source) / model, Path(model)):
        if candidate.expanduser().is_dir():
            return str(candidate.expanduser().resolve())
    return model


def validate(raw: dict[str, Any], source: str = "<dict>", from_set: set[str] | None = None) -> Experiment:
    """Turn a raw YAML mapping into an :class:`Experiment`, or raise :class:`ExperimentError`.

    Checks keys, types, choices and the method config (its own ``__post_init__``), without loading any model
    or data: columns and splits are checked by :func:`peft_ipt.cli.data.load_splits`, also before the model.
    """
    check = _Checker(source, from_set or set())
    raw = dict(raw)
    if isinstance(raw.get("data"), str):
        raw["data"] = {"name": raw["data"]}
    check.dataclass(Experiment, raw, "", required=("model", "task_type", "data", "method"))
    check.choice("task_type", raw["task_type"], TASK_TYPES)
    check.choice("method", raw["method"], tuple(METHODS))
    task_type, method = raw["task_type"], METHODS[raw["method"]]
    if raw.get("metric") is not None:
        check.choice("metric", raw["metric"], METRICS[task_type])
    data = _validate_data(check, raw["data"], source)
    generation = check.dataclass(GenerationConfig, raw.get("generation") or {}, "generation.")
    for key, value in generation.items():
        check.positive(f"generation.{key}", value, allow_none=False)
    training = check.fields(raw.get("training") or {}, training_hints(), "training.")
    for key, allowed in training_choices().items():
        if key in training:  # Trainer itself would fall back to its default on an unknown value
            check.choice(f"training.{key}", training[key], allowed)
    _validate_early_stopping(check, training)
    if method.config_path is None and raw.get("method_config"):
        raise check.error(
            "method_config", f"must be empty for method {raw['method']!r} (got {raw['method_config']})"
        )
    method_config = check.fields(
        raw.get("method_config") or {},
        method_hints(method),
        "method_config.",
        method.required,
        _renamed_fields(method.config_class()),
    )

    experiment = Experiment(
        model=_resolve_model(check, raw["model"], source),
        task_type=task_type,
        data=data,
        method=raw["method"],
        method_config=dict(method_config),
        training=dict(training),
        metric=raw.get("metric"),
        generation=GenerationConfig(**generation),
        description=raw.get("description"),
        start_from=_validate_start_from(check, raw.get("start_from"), raw["method"]),
        source=source,
    )
    try:
        experiment.peft_config()  # the config's own checks (ranges, choices, combinations)
    except (TypeError, ValueError) as error:
        raise ExperimentError(f"{source}: method_config: {error}") from None
    return experiment


STARTS_FROM_PREFIX = ("prefix_v2", "ipt")  # the methods peft_ipt.start_from_prefix can start


def _validate_start_from(check: _Checker, value: str | None, method: str) -> str | None:
    if value is None:
        return None
    if method not in STARTS_FROM_PREFIX:
        raise check.error(
            "start_from",
            f"starts a {' or '.join(STARTS_FROM_PREFIX)} adapter from a trained PrefixTuningV2 prefix; method "
            f"{method!r} cannot start from one (remove start_from)",
        )
    # Whether the folder holds an adapter is checked when a run starts (train.check_start_from), not here:
    # a finished run's experiment.yaml must still load for `peft-ipt eval` after the folder it started from is gone.
    return str(Path(value).expanduser())


def load_experiment(path: Path | str, overrides: list[str] | None = None) -> Experiment:
    """Read, override and validate an experiment file."""
    source = str(path)
    raw = read_yaml(path)
    from_set = apply_overrides(raw, list(overrides or []), source)
    return validate(raw, source, from_set)


# The repository's configs/, which the package carries: src/peft_ipt/cli/configs links to it, and the wheel
# holds a copy (pyproject's package-data).
PACKAGED_CONFIGS = Path(__file__).parent / "configs"


def default_config_path() -> Path:
    """``configs/default.yaml``: in the working directory if there is one, else the packaged one."""
    candidates = [Path.cwd() / "configs" / "default.yaml", PACKAGED_CONFIGS / "default.yaml"]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise ExperimentError(
        "no experiment file given and no configs/default.yaml found (looked in: "
        + ", ".join(str(c) for c in candidates)
        + "); pass one: `peft-ipt train CONFIG.yaml`"
    )
