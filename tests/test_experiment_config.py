"""The experiment YAML: schema, --set overrides, and errors naming key and file before any model loads."""

from __future__ import annotations

from pathlib import Path

import pytest
import transformers
import yaml

from peft_ipt.cli import main
from peft_ipt.cli.experiment import (
    ExperimentError,
    default_config_path,
    load_experiment,
    parse_value,
    validate,
)
from peft_ipt.cli.train import train, training_arguments

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))

BASE = {
    "model": "tiny-model-that-is-never-loaded",
    "task_type": "SEQ_CLS",
    "data": {
        "files": {"train": "train.csv", "validation": "validation.csv", "test": "test.csv"},
        "text_column": "sentence",
        "label_column": "sentiment",
    },
    "method": "ipt",
    "method_config": {"prompt_length": 4},
    "training": {"learning_rate": 0.01, "max_steps": 1},
}


@pytest.fixture
def no_model_loads(monkeypatch):
    """Fail the test if anything loads a model or tokenizer."""

    def refuse(*args, **kwargs):
        pytest.fail("a model or tokenizer was loaded before the experiment was validated")

    for name in (
        "AutoModelForSequenceClassification",
        "AutoModelForCausalLM",
        "AutoModelForSeq2SeqLM",
        "AutoTokenizer",
    ):
        monkeypatch.setattr(getattr(transformers, name), "from_pretrained", refuse)


@pytest.fixture
def folder(tmp_path) -> Path:
    """csv splits with columns sentence, sentiment."""
    for split in ("train", "validation", "test"):
        rows = "\n".join(f"the film was {w},{w}" for w in ("good", "bad", "good", "bad"))
        (tmp_path / f"{split}.csv").write_text(f"sentence,sentiment\n{rows}\n")
    return tmp_path


def write(folder: Path, experiment: dict, name: str = "x.yaml") -> Path:
    path = folder / name
    path.write_text(yaml.safe_dump(experiment, sort_keys=False))
    return path


def changed(**changes) -> dict:
    """BASE with dotted keys changed (value None deletes the key)."""
    experiment = yaml.safe_load(yaml.safe_dump(BASE))
    for dotted, value in changes.items():
        *parents, key = dotted.split("__")
        node = experiment
        for parent in parents:
            node = node[parent]
        if value is None:
            del node[key]
        else:
            node[key] = value
    return experiment


def train_error(path: Path, overrides: list[str] | None = None) -> str:
    with pytest.raises(ExperimentError) as info:
        train(path, overrides, output_dir=path.parent / "out")
    return str(info.value)


# -- schema errors name the file and the key ---------------------------------------------------------------


def test_unknown_training_key_is_named_with_a_suggestion(folder, no_model_loads):
    path = write(folder, changed(training__learning_rte=0.01))
    message = train_error(path)
    assert message == f"{path}: training.learning_rte is not a known key (did you mean learning_rate?)"


def test_a_training_choice_is_checked_before_trainer_ignores_it(folder, no_model_loads):
    message = train_error(write(folder, changed(training__train_sampling_strategy="by_length")))
    assert message == (
        f"{folder / 'x.yaml'}: training.train_sampling_strategy must be one of random, sequential, group_by_length, "
        "batch_rebalance (got 'by_length') (did you mean group_by_length?)"
    )


def test_activation_checkpointing_is_taken_where_transformers_has_it(folder, no_model_loads):
    # transformers 5.25 renamed TrainingArguments.gradient_checkpointing to activation_checkpointing; the old name
    # is taken on every version.
    path = write(folder, BASE)
    old = load_experiment(path, ["training.gradient_checkpointing=true"])
    assert training_arguments(old, folder).gradient_checkpointing is True
    if "activation_checkpointing" in transformers.TrainingArguments.__dataclass_fields__:
        new = load_experiment(path, ["training.activation_checkpointing=true"])
        assert training_arguments(new, folder).activation_checkpointing is True
    else:
        message = train_error(path, ["training.activation_checkpointing=true"])
        assert "training.activation_checkpointing (from --set) is not a known key" in message


def test_length_grouped_batches_reach_the_trainer(folder):
    experiment = load_experiment(write(folder, BASE), ["training.train_sampling_strategy=group_by_length"])
    assert training_arguments(experiment, folder).train_sampling_strategy == "group_by_length"


def test_unknown_top_level_key_is_named(folder, no_model_loads):
    message = train_error(write(folder, changed(metrics="accuracy")))
    assert message.startswith(f"{folder / 'x.yaml'}: metrics is not a known key (did you mean metric?)")


def test_unknown_method_config_key_is_checked_against_the_method(folder, no_model_loads):
    message = train_error(write(folder, changed(method_config={"prompt_lenght": 8})))  # a typo
    assert "x.yaml: method_config.prompt_lenght is not a known key (did you mean prompt_length?)" in message


def test_a_peft_field_name_in_method_config_names_ours(folder, no_model_loads):
    message = train_error(write(folder, changed(method_config={"num_virtual_tokens": 8})))
    assert (
        "x.yaml: method_config.num_virtual_tokens is not a known key (that is peft's name; use prompt_length)"
        in (message)
    )


def test_the_other_methods_field_name_in_method_config_names_ours(folder, no_model_loads):
    message = train_error(write(folder, changed(method_config={"prefix_length": 8})))
    assert (
        "x.yaml: method_config.prefix_length is not a known key (that is PrefixTuningV2Config's name; use "
        "prompt_length)" in message
    )


def test_wrong_type_is_named_with_the_expected_type(folder, no_model_loads):
    message = train_error(write(folder, changed(training__learning_rate="fast")))
    assert message == f"{folder / 'x.yaml'}: training.learning_rate must be float (got 'fast', a str)"


def test_wrong_type_in_data_and_method_config(folder, no_model_loads):
    assert "x.yaml: data.train_size must be" in train_error(write(folder, changed(data__train_size="many")))
    assert "x.yaml: method_config.prompt_length must be int" in train_error(
        write(folder, changed(method_config={"prompt_length": 2.5}))
    )


def test_a_bool_is_not_an_int(folder):
    with pytest.raises(ExperimentError, match=r"training.max_steps must be int \(got True"):
        validate(changed(training__max_steps=True), "x.yaml")


def test_missing_column_is_named_with_the_split_and_its_columns(folder, no_model_loads):
    message = train_error(write(folder, changed(data__text_column="review")))
    assert message == (
        f"{folder / 'x.yaml'}: data.text_column 'review' is not a column of the train split "
        "(columns: sentence, sentiment)"
    )


def test_empty_split_is_named_with_its_file(folder, no_model_loads):
    (folder / "validation.csv").write_text("sentence,sentiment\n")
    message = train_error(write(folder, BASE))
    assert (
        message == f"{folder / 'x.yaml'}: data.files.validation: the validation split ('validation') is empty"
    )


def test_missing_data_file_is_named(folder, no_model_loads):
    (folder / "test.csv").unlink()
    assert f"x.yaml: data.files.test: no such file {folder / 'test.csv'}" in train_error(write(folder, BASE))


def test_test_label_unseen_in_train_is_refused(folder, no_model_loads):
    (folder / "test.csv").write_text("sentence,sentiment\nthe film was fine,neutral\n")
    message = train_error(write(folder, BASE))
    assert (
        "data.label_column 'sentiment': the test split has label 'neutral', which never occurs in train"
        in message
    )


def test_missing_required_key_is_named(folder):
    with pytest.raises(ExperimentError, match=r"^x.yaml: method is required$"):
        validate(changed(method=None), "x.yaml")


def test_method_config_is_checked_by_the_config_class(folder):
    with pytest.raises(
        ExperimentError, match=r"^x.yaml: method_config: prompt_length must be an integer >= 1 \(got 0\)"
    ):
        validate(changed(method_config={"prompt_length": 0}), "x.yaml")


def test_peft_prompt_methods_require_num_virtual_tokens():
    with pytest.raises(ExperimentError, match=r"method_config.num_virtual_tokens is required"):
        validate(changed(method="peft_prompt_tuning", method_config={}), "x.yaml")


def test_full_fine_tuning_takes_no_method_config():
    with pytest.raises(ExperimentError, match=r"method_config must be empty for method 'full'"):
        validate(changed(method="full"), "x.yaml")


def test_metric_must_suit_the_task():
    with pytest.raises(ExperimentError, match=r"metric must be one of accuracy, macro_f1 \(got 'bleu'\)"):
        validate(changed(metric="bleu"), "x.yaml")


def test_unknown_method_suggests_the_closest():
    with pytest.raises(
        ExperimentError, match=r"method must be one of .* \(got 'prefix_v3'\) \(did you mean prefix_v2\?\)"
    ):
        validate(changed(method="prefix_v3"), "x.yaml")


def test_data_needs_a_name_or_files():
    with pytest.raises(ExperimentError, match=r"data needs exactly one of data.name"):
        validate(changed(data={"name": "rotten_tomatoes", "files": {"train": "a.csv"}}), "x.yaml")


def test_cli_reports_a_config_error_on_stderr_with_status_2(folder, no_model_loads, capsys):
    path = write(folder, changed(training__learning_rte=0.01))
    assert main(["train", str(path)]) == 2
    assert capsys.readouterr().err.strip() == (
        f"peft-ipt train: error: {path}: training.learning_rte is not a known key (did you mean learning_rate?) "
        "(--debug shows the traceback)"
    )


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"method_config__prompt_length": 0}, "method_config: prompt_length must be an integer >= 1 (got 0)"),
        ({"training__learning_rate": "fast"}, "training.learning_rate must be float (got 'fast', a str)"),
        ({"data__files__train": "missing.csv"}, "data.files.train: no such file"),
    ],
    ids=["bad-value", "wrong-type", "missing-data-file"],
)
def test_every_user_error_is_one_line_naming_the_key_and_debug_shows_the_traceback(
    folder, no_model_loads, capsys, changes, expected
):
    path = write(folder, changed(**changes))
    assert main(["train", str(path)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"peft-ipt train: error: {path}") and expected in lines[0]
    with pytest.raises(ExperimentError):
        main(["--debug", "train", str(path)])


def test_a_missing_experiment_file_is_one_line(tmp_path, capsys):
    assert main(["train", str(tmp_path / "nope.yaml")]) == 2
    assert capsys.readouterr().err.strip() == (
        f"peft-ipt train: error: {tmp_path / 'nope.yaml'}: no such experiment file (--debug shows the traceback)"
    )


# -- --set overrides -----------------------------------------------------------------------------------------


def test_set_values_are_yaml_typed(folder):
    path = write(folder, BASE)
    overrides = ["training.learning_rate=1e-3", "method_config.prompt_length=8", "data.max_length=32"]
    experiment = load_experiment(path, overrides + ["method_config.instance_layers=[0, 1]"])
    assert experiment.training["learning_rate"] == 0.001
    assert experiment.method_config == {"prompt_length": 8, "instance_layers": [0, 1]}
    assert experiment.data.max_length == 32


def test_set_of_an_unknown_key_says_it_came_from_set(folder, no_model_loads):
    message = train_error(write(folder, BASE), ["training.learning_rte=0.1"])
    assert message == (
        f"{folder / 'x.yaml'}: training.learning_rte (from --set) is not a known key "
        "(did you mean learning_rate?)"
    )


def test_set_on_a_data_shorthand_expands_it(folder):
    experiment = load_experiment(write(folder, changed(data="rotten_tomatoes")), ["data.train_size=100"])
    assert experiment.data.name == "rotten_tomatoes" and experiment.data.train_size == 100


def test_set_without_equals_is_refused(folder):
    with pytest.raises(ExperimentError, match=r"--set 'training.seed' must look like key.sub=value"):
        load_experiment(write(folder, BASE), ["training.seed"])


def test_exponent_floats_read_as_floats():
    assert parse_value("1e-2") == 0.01 and parse_value("3E4") == 30000.0
    assert parse_value("7") == 7 and parse_value("true") is True and parse_value("abc") == "abc"


def test_yaml_1_1_booleans_read_as_the_strings_transformers_expects(folder):
    experiment = load_experiment(
        write(folder, BASE), ["training.eval_strategy=no", "training.save_strategy=no"]
    )
    assert experiment.training["eval_strategy"] == "no" and experiment.training["save_strategy"] == "no"
    assert parse_value("on") == "on" and parse_value("False") is False


# -- shipped configs -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_validate(path):
    experiment = load_experiment(path)
    assert experiment.method_config == (experiment.method_config or {})
    assert experiment.training["learning_rate"] > 0


def test_shipped_configs_cover_every_method_on_every_task():
    pairs = {
        (load_experiment(p).data.name, load_experiment(p).method) for p in CONFIGS if p.name != "default.yaml"
    }
    data_sets = {
        "rotten_tomatoes",
        "bbc_news",
        "twitter_sentiment",
        "presuppositions_nli",
        "vitaminc",
        "e2e_nlg",
    }
    methods = {
        "ipt",
        "prefix_v2",
        "peft_prompt_tuning",
        "peft_p_tuning",
        "peft_prefix_tuning",
        "lora",
        "full",
    }
    assert pairs == {(d, m) for d in data_sets for m in methods}


def test_default_config_is_ipt_on_minilm_and_rotten_tomatoes():
    experiment = load_experiment(default_config_path())
    assert (experiment.model, experiment.task_type, experiment.method) == ("minilm", "SEQ_CLS", "ipt")
    assert experiment.data.name == "rotten_tomatoes" and experiment.method_config == {}
    assert experiment.metric == "accuracy"


def test_early_stopping_needs_validation_during_training(folder, no_model_loads):
    path = write(folder, changed(training__early_stopping_patience=2, training__eval_strategy="no"))
    assert train_error(path) == (
        f"{path}: training.early_stopping_patience needs validation during training, but training.eval_strategy is "
        "'no'; set it to 'epoch' or 'steps'"
    )


def test_early_stopping_threshold_without_patience_is_refused(folder, no_model_loads):
    path = write(folder, changed(training__early_stopping_threshold=0.01))
    assert train_error(path) == (
        f"{path}: training.early_stopping_threshold needs training.early_stopping_patience (the evaluations to wait)"
    )


def test_early_stopping_saves_at_the_evaluation_cadence_and_keeps_the_best_by_the_main_metric(folder):
    experiment = load_experiment(
        write(folder, BASE),
        ["training.early_stopping_patience=3", "training.eval_strategy=steps", "training.eval_steps=5"],
    )
    arguments = training_arguments(experiment, folder)
    assert (arguments.save_strategy, arguments.save_steps, arguments.eval_steps) == ("steps", 5, 5)
    assert arguments.load_best_model_at_end and arguments.metric_for_best_model == "eval_accuracy"
    assert arguments.greater_is_better
