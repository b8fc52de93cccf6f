"""The `peft-ipt` command end to end, on tiny random models and csv data written to tmp_path."""

from __future__ import annotations

import csv
import json
import random
import re
from pathlib import Path

import pytest
import torch
import yaml
from conftest import SPECIAL, WORDS, tiny_tokenizer
from safetensors.torch import load_file
from transformers import (
    BartConfig,
    BartForConditionalGeneration,
    BertConfig,
    BertForSequenceClassification,
    LlamaConfig,
    LlamaForCausalLM,
)

from peft_ipt.cli import main
from peft_ipt.cli.card import model_card, usage_snippet
from peft_ipt.cli.experiment import validate
from peft_ipt.cli.generate import generate
from peft_ipt.cli.train import CLIError, evaluate_run, load_run, push

POSITIVE, NEGATIVE = ("good", "great", "fine"), ("bad", "awful", "poor")


def write_csv(path: Path, header: list[str], rows: list[list[str]]) -> Path:
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def sentiment_rows(n: int, rng: random.Random) -> list[list[str]]:
    rows = []
    for i in range(n):
        positive = i % 2 == 1
        word = rng.choice(POSITIVE if positive else NEGATIVE)
        rows.append(
            [
                f"the {rng.choice(['movie', 'film'])} was {'very ' * rng.randint(0, 2)}{word}",
                "pos" if positive else "neg",
            ]
        )
    return rows


def restaurant_rows(n: int, rng: random.Random) -> list[list[str]]:
    rows = []
    for _ in range(n):
        name, food, area = (
            rng.choice(["pub", "cafe"]),
            rng.choice(["cheap", "french"]),
            rng.choice(["riverside", "centre"]),
        )
        rows.append(
            [
                f"name : {name} , food : {food} , area : {area}",
                f"the {name} serves {food} food in the {area} .",
            ]
        )
    return rows


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> Path:
    """Tiny BERT classifier and tiny Llama (each with its tokenizer) saved to folders, plus csv data sets."""
    root = tmp_path_factory.mktemp("cli_assets")
    torch.manual_seed(0)
    tokenizer = tiny_tokenizer(with_cls=True)
    bert = BertForSequenceClassification(
        BertConfig(
            vocab_size=len(tokenizer),
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=64,
            max_position_embeddings=64,
        )
    )
    bert.save_pretrained(root / "bert")
    tokenizer.save_pretrained(root / "bert")
    tokenizer = tiny_tokenizer(with_cls=False)
    llama = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=128,
            pad_token_id=0,
            eos_token_id=4,
            bos_token_id=None,
        )
    )
    llama.save_pretrained(root / "llama")
    tokenizer.save_pretrained(root / "llama")
    rng = random.Random(0)
    for split, n in (("train", 48), ("validation", 16), ("test", 20)):
        write_csv(root / f"{split}.csv", ["sentence", "sentiment"], sentiment_rows(n, rng))
        write_csv(root / f"gen_{split}.csv", ["mr", "ref"], restaurant_rows(n // 2, rng))
    return root


def write_experiment(folder: Path, name: str, experiment: dict) -> Path:
    path = folder / name
    path.write_text(yaml.safe_dump(experiment, sort_keys=False))
    return path


CLASSIFICATION = {
    "model": "bert",  # relative to the YAML file
    "task_type": "SEQ_CLS",
    "data": {
        "files": {"train": "train.csv", "validation": "validation.csv", "test": "test.csv"},
        "text_column": "sentence",
        "label_column": "sentiment",
        "max_length": 16,
    },
    "method": "ipt",
    "method_config": {"prompt_length": 4, "table_size": 64},
    "training": {
        "learning_rate": 0.01,
        "max_steps": 4,
        "per_device_train_batch_size": 8,
        "eval_strategy": "steps",
        "eval_steps": 2,
        "logging_steps": 1,
        "disable_tqdm": True,
    },
}


@pytest.fixture(scope="module")
def classification_run(assets) -> Path:
    config = write_experiment(assets, "cls.yaml", CLASSIFICATION)
    output = assets / "cls_run"
    assert main(["train", str(config), "--output-dir", str(output), "--set", "training.seed=7"]) == 0
    return output


@pytest.fixture(scope="module")
def generation_run(assets) -> Path:
    experiment = {
        "model": "llama",
        "task_type": "CAUSAL_LM",
        "data": {
            "files": {"train": "gen_train.csv", "validation": "gen_validation.csv", "test": "gen_test.csv"},
            "input_column": "mr",
            "target_column": "ref",
            "max_length": 16,
            "max_target_length": 12,
            "separator": " .",
        },
        "method": "ipt",
        "method_config": {"prompt_length": 4, "table_size": 64},
        "training": {
            "learning_rate": 0.01,
            "max_steps": 2,
            "per_device_train_batch_size": 4,
            "disable_tqdm": True,
        },
        "metric": "bleu",
        "generation": {"max_new_tokens": 6},
    }
    config = write_experiment(assets, "gen.yaml", experiment)
    output = assets / "gen_run"
    assert main(["train", str(config), "--output-dir", str(output)]) == 0
    return output


def set_flags(overrides: list[str]) -> list[str]:
    """``--set`` flags for the CLI, one per override."""
    return [arg for override in overrides for arg in ("--set", override)]


def train_losses(metrics: dict) -> list[float]:
    """The training losses logged in a run's metrics.json."""
    return [entry["loss"] for entry in metrics["train_history"] if "loss" in entry]


def front_matter(card: str) -> dict:
    match = re.match(r"^---\n(.*?)\n---\n", card, re.S)
    assert match, "the card starts with a YAML metadata block"
    return yaml.safe_load(match.group(1))


def python_blocks(card: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", card, re.S)


# -- classification: train, output folder, eval ---------------------------------------------------------


def test_train_writes_adapter_card_metrics_curves_and_experiment(classification_run):
    names = {p.name for p in classification_run.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "README.md", "metrics.json"} <= names
    assert {"training_curves.png", "experiment.yaml"} <= names
    assert "checkpoints" not in names  # no checkpoints asked for, no empty folder left behind
    assert (classification_run / "training_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_metrics_json_holds_test_metrics_history_params_time_and_config(classification_run):
    results = json.loads((classification_run / "metrics.json").read_text())
    assert set(results["test"]) == {"accuracy", "macro_f1", "examples"}
    assert results["test"]["examples"] == 20
    assert [e["step"] for e in results["validation_history"]] == [2, 4]
    assert all("eval_accuracy" in e for e in results["validation_history"])
    assert [e["step"] for e in results["train_history"]] == [1, 2, 3, 4]
    assert 0 < results["trainable_params"] < results["all_params"]
    assert results["wall_time_s"] > 0
    assert results["split_sizes"] == {"train": 48, "validation": 16, "test": 20}
    assert results["label_names"] == ["neg", "pos"]
    assert results["experiment"]["method_config"] == {"prompt_length": 4, "table_size": 64}


def test_saved_experiment_is_resolved_and_keeps_set_overrides(classification_run, assets):
    experiment, _ = load_run(classification_run)
    assert experiment.training["seed"] == 7  # from --set
    assert experiment.model == str(assets / "bert")  # relative paths made absolute
    assert experiment.data.files["train"] == str(assets / "train.csv")


def test_eval_reproduces_the_test_metrics_of_training(classification_run, capsys):
    recorded = json.loads((classification_run / "metrics.json").read_text())["test"]
    assert main(["eval", str(classification_run)]) == 0
    assert "largest difference" in capsys.readouterr().out
    again = evaluate_run(classification_run)
    assert again.keys() == recorded.keys()
    for key, value in recorded.items():
        assert again[key] == pytest.approx(value, abs=1e-6)


def test_model_card_has_hub_metadata(classification_run, assets):
    meta = front_matter((classification_run / "README.md").read_text())
    assert meta["library_name"] == "peft"
    assert meta["base_model"] == str(assets / "bert")
    assert {"peft-ipt", "ipt"} <= set(meta["tags"])
    assert meta["datasets"] and meta["metrics"] == ["accuracy", "f1"]
    assert meta["pipeline_tag"] == "text-classification"


def test_model_card_states_method_config_data_and_results(classification_run):
    card = (classification_run / "README.md").read_text()
    results = json.loads((classification_run / "metrics.json").read_text())
    assert "Instance-wise prompt tuning" in card and '"prompt_length": 4' in card
    assert "train 48, validation 16, test 20" in card
    assert f"| accuracy | {results['test']['accuracy']:.4f} |" in card


def test_model_card_snippet_starts_with_import_peft_ipt_and_runs(classification_run, capsys):
    card = (classification_run / "README.md").read_text()
    (snippet,) = python_blocks(card)
    assert snippet.startswith("import peft_ipt")
    assert "loading fails without it" in snippet and "KeyError" in card  # the note on the import
    capsys.readouterr()
    exec(compile(snippet, "README.md", "exec"), {})
    assert capsys.readouterr().out.strip() in {"neg", "pos"}


def test_push_to_hub_failure_says_what_failed_and_where_the_run_is(classification_run, monkeypatch):
    experiment, _ = load_run(classification_run)

    class Offline:
        def push_to_hub(self, repo):
            raise OSError("offline mode is enabled")

    with pytest.raises(
        CLIError, match=r"--push-to-hub me/tiny: the upload failed \(OSError: offline"
    ) as info:
        push(Offline(), None, classification_run, "me/tiny", experiment)
    assert str(classification_run) in str(info.value)


def test_bf16_autocast_on_the_cpu_trains_close_to_float32_with_float32_weights(assets, tmp_path):
    """The benchmarks' bf16 path (``training.bf16=true``, ``training.use_cpu=true``) through Trainer. CI's benchmark
    smoke runs train in fp32 (a CPU without native bf16 emulates it several times slower), so it is tested here."""
    config = write_experiment(assets, "bf16.yaml", CLASSIFICATION)
    curves = {}
    for precision, overrides in (("fp32", []), ("bf16", ["training.bf16=true", "training.use_cpu=true"])):
        output = tmp_path / precision
        assert main(["train", str(config), "--output-dir", str(output), *set_flags(overrides)]) == 0
        curves[precision] = torch.tensor(train_losses(json.loads((output / "metrics.json").read_text())))
        saved = load_file(output / "adapter_model.safetensors")
        assert saved and all(t.dtype == torch.float32 for t in saved.values())  # autocast: weights stay fp32
    assert len(curves["bf16"]) == 4 and torch.isfinite(curves["bf16"]).all()
    assert not torch.equal(curves["bf16"], curves["fp32"])  # autocast was on
    torch.testing.assert_close(curves["bf16"], curves["fp32"], rtol=0.05, atol=0.05)


# -- causal LM: train, generate, eval ----------------------------------------------------------------------


def early_stopping_run(assets, name: str, learning_rate: float, **stopping) -> dict:
    experiment = {
        **CLASSIFICATION,
        "training": {
            **CLASSIFICATION["training"],
            "learning_rate": learning_rate,
            "max_steps": 40,
            "early_stopping_patience": 2,
            **stopping,
        },
    }
    output = assets / name
    assert (
        main(
            ["train", str(write_experiment(assets, f"{name}.yaml", experiment)), "--output-dir", str(output)]
        )
        == 0
    )
    return json.loads((output / "metrics.json").read_text())


def test_early_stopping_ends_once_validation_stops_improving(assets):
    # At learning rate 0 the validation score never improves on the first evaluation (step 2), so the run stops
    # after 2 more evaluations, at step 6 of 40, and the checkpoints it kept for that are gone.
    metrics = early_stopping_run(assets, "es_flat", 0.0)
    assert (metrics["steps"], metrics["max_steps"], metrics["best_step"]) == (6, 40, 2)
    assert [e["step"] for e in metrics["validation_history"]] == [2, 4, 6]
    assert not (assets / "es_flat" / "checkpoints").exists()


def test_early_stopping_counts_only_from_its_minimum_step(assets):
    # the same flat run, but the evaluation at step 4 does not count: the 2 that do are at steps 6 and 8
    metrics = early_stopping_run(assets, "es_min_steps", 0.0, early_stopping_min_steps=6)
    assert (metrics["steps"], metrics["best_step"]) == (8, 2)
    assert [e["step"] for e in metrics["validation_history"]] == [2, 4, 6, 8]


def test_early_stopping_keeps_and_tests_the_best_evaluated_model(assets):
    metrics = early_stopping_run(assets, "es_best", 0.5)  # large steps: validation goes up and down
    history = metrics["validation_history"]
    best = max(history, key=lambda e: e["eval_accuracy"])  # the first best, as Trainer keeps it
    assert metrics["best_step"] == best["step"] and metrics["validation"] == best
    assert metrics["steps"] < 40 and history[-1]["step"] != best["step"]  # it stopped, on a worse model
    # The saved adapter is that model: reloaded, it scores the best evaluation's validation accuracy.
    experiment, output = load_run(assets / "es_best")
    from peft_ipt.cli.data import load_splits
    from peft_ipt.cli.evaluation import evaluate_split
    from peft_ipt.cli.models import load_tokenizer, load_trained

    splits = load_splits(experiment)
    tokenizer = load_tokenizer(experiment)
    model = load_trained(experiment, output, tokenizer, splits.label_names)
    assert (
        evaluate_split(model, tokenizer, splits.validation, experiment)["accuracy"] == best["eval_accuracy"]
    )


def test_causal_lm_run_writes_generation_metrics(generation_run):
    results = json.loads((generation_run / "metrics.json").read_text())
    assert set(results["test"]) == {"bleu", "rouge_l", "examples"}
    assert {"eval_bleu", "eval_rouge_l", "eval_loss"} <= set(results["validation_history"][-1])
    meta = front_matter((generation_run / "README.md").read_text())
    assert meta["pipeline_tag"] == "text-generation" and meta["metrics"] == ["bleu", "rouge"]


def test_generate_prints_a_continuation(generation_run, capsys):
    assert main(["generate", str(generation_run), "name : pub , food : cheap", "--max-new-tokens", "3"]) == 0
    words = capsys.readouterr().out.split()
    assert 1 <= len(words) <= 3 and set(words) <= set(WORDS + SPECIAL)


def test_causal_lm_eval_reproduces_training_metrics(generation_run):
    recorded = json.loads((generation_run / "metrics.json").read_text())["test"]
    again = evaluate_run(generation_run)
    assert again == pytest.approx(recorded, abs=1e-6)


def test_seq2seq_run_trains_generates_and_reproduces(assets, tmp_path):
    tokenizer = tiny_tokenizer(with_cls=True)  # [CLS] x [SEP]: [SEP] ends every target
    torch.manual_seed(0)
    bart = BartForConditionalGeneration(
        BartConfig(
            vocab_size=len(tokenizer),
            d_model=32,
            encoder_layers=2,
            decoder_layers=2,
            encoder_attention_heads=4,
            decoder_attention_heads=4,
            encoder_ffn_dim=64,
            decoder_ffn_dim=64,
            max_position_embeddings=64,
            pad_token_id=0,
            bos_token_id=2,
            eos_token_id=3,
            decoder_start_token_id=3,
            forced_eos_token_id=None,
        )
    )
    bart.save_pretrained(tmp_path / "bart")
    tokenizer.save_pretrained(tmp_path / "bart")
    files = {split: str(assets / f"gen_{split}.csv") for split in ("train", "validation", "test")}
    experiment = {
        "model": "bart",
        "task_type": "SEQ_2_SEQ_LM",
        "data": {"files": files, "input_column": "mr", "target_column": "ref", "max_length": 16},
        "method": "prefix_v2",
        "method_config": {"prefix_length": 4, "encoder_hidden_size": 16},
        "training": {"learning_rate": 0.01, "max_steps": 1, "disable_tqdm": True},
        "generation": {"max_new_tokens": 4},
    }
    output = tmp_path / "run"
    assert (
        main(["train", str(write_experiment(tmp_path, "s2s.yaml", experiment)), "--output-dir", str(output)])
        == 0
    )
    assert isinstance(generate(output, "name : pub , food : cheap"), str)
    recorded = json.loads((output / "metrics.json").read_text())["test"]
    assert evaluate_run(output) == pytest.approx(recorded, abs=1e-6)


def test_generate_refuses_a_classifier(classification_run, capsys):
    assert main(["generate", str(classification_run), "the movie"]) == 2
    assert "generate needs CAUSAL_LM or SEQ_2_SEQ_LM" in capsys.readouterr().err


# -- the model card on its own -----------------------------------------------------------------------------


def _card_experiment(method: str, task_type: str = "SEQ_CLS"):
    return validate(
        {"model": "minilm", "task_type": task_type, "data": "rotten_tomatoes", "method": method},
        "configs/x.yaml",
    )


def test_card_names_the_hub_base_model_of_a_bundled_model():
    results = {
        "test": {"accuracy": 0.8},
        "validation_history": [],
        "trainable_params": 10,
        "all_params": 100,
        "split_sizes": {"train": 1, "validation": 1, "test": 1},
        "wall_time_s": 1.0,
        "train_runtime_s": 1.0,
        "training_arguments": {},
    }
    card = model_card(
        _card_experiment("prefix_v2"), results, {"peft_type": "X"}, "me/repo", "a film", ["neg", "pos"]
    )
    meta = front_matter(card)
    assert meta["base_model"] == "sentence-transformers/all-MiniLM-L6-v2"
    assert meta["datasets"] == ["rotten_tomatoes"]
    assert "prefix_v2" in meta["tags"]
    assert "PeftModel.from_pretrained(base, 'me/repo')" in card


def test_snippet_of_a_peft_builtin_method_needs_no_peft_ipt_import():
    snippet = usage_snippet(_card_experiment("lora"), "me/repo", "a film", ["neg", "pos"])
    assert "import peft_ipt" not in snippet and snippet.startswith("from peft import PeftModel")


def test_snippet_of_a_causal_lm_adds_the_separator_and_cuts_the_prompt():
    experiment = validate(
        {
            "model": "smollm2",
            "task_type": "CAUSAL_LM",
            "data": {"name": "e2e_nlg", "separator": " =>"},
            "method": "ipt",
        }
    )
    snippet = usage_snippet(experiment, "me/repo", "name: Aromi", None)
    assert snippet.startswith("import peft_ipt")
    assert "tokenizer('name: Aromi =>'" in snippet and "inputs['input_ids'].shape[1]:" in snippet


# -- pretrain-table --------------------------------------------------------------------------------------------


def test_pretrained_table_learns_the_task_and_loads_into_ipt(assets, tmp_path, monkeypatch, capsys):
    """fastText-style pretraining on a word-separable corpus, then InstancePromptConfig(table_path=...)."""
    import peft
    from datasets import ClassLabel, Dataset, DatasetDict, Features, Value
    from safetensors.torch import load_file

    import peft_ipt
    from peft_ipt.cli import pretrain_table

    rows = sentiment_rows(128, random.Random(1))
    features = Features({"text": Value("string"), "label": ClassLabel(names=["neg", "pos"])})
    columns = {"text": [r[0] for r in rows], "label": [int(r[1] == "pos") for r in rows]}
    corpus = DatasetDict(
        {s: Dataset.from_dict(columns, features=features) for s in ("train", "validation", "test")}
    )
    monkeypatch.setattr(pretrain_table, "load_bundled_dataset", lambda name, seed=0: corpus)
    monkeypatch.setattr(pretrain_table, "BUNDLED_DATASETS", ("tiny_sentiment",))
    out = tmp_path / "table.safetensors"
    arguments = ["--data", "tiny_sentiment", "--out", str(out), "--table-size", "64", "--rank", "8"]
    assert main(["pretrain-table", *arguments, "--model", str(assets / "bert"), "--epochs", "30"]) == 0
    accuracy = float(re.findall(r"validation accuracy ([0-9.]+)", capsys.readouterr().out)[-1])
    assert accuracy > 0.9

    config = peft_ipt.InstancePromptConfig(
        task_type="SEQ_CLS",
        instance_source="token_table",
        table_path=str(out),
        table_size=64,
        instance_rank=8,
        freeze_table=True,
    )
    model = peft.get_peft_model(BertForSequenceClassification.from_pretrained(assets / "bert"), config)
    (table,) = [p for n, p in model.named_parameters() if n.endswith("table.weight")]
    assert torch.equal(table, load_file(out)["weight"]) and not table.requires_grad


def test_pretrain_table_refuses_an_unknown_data_set(capsys):
    assert main(["pretrain-table", "--data", "no_such_corpus"]) == 2
    assert "--data 'no_such_corpus' is not a bundled data set" in capsys.readouterr().err


# -- the real default job -----------------------------------------------------------------------------------


@pytest.mark.slow
def test_default_job_beats_chance_on_rotten_tomatoes(tmp_path, all_threads):
    """configs/default.yaml (IPT with its default instance source on MiniLM, Rotten Tomatoes), shortened to 80 steps
    and scored on 200 validation and 400 test reviews (0.68 test accuracy at seed 42 here)."""
    output = tmp_path / "default"
    shortened = [
        "training.max_steps=80",
        "data.validation_size=200",
        "data.test_size=400",
        "training.disable_tqdm=true",
    ]
    assert main(["train", "--output-dir", str(output), *set_flags(shortened)]) == 0
    metrics = json.loads((output / "metrics.json").read_text())
    losses = train_losses(metrics)
    assert losses[-1] < losses[0]  # it learned
    assert metrics["split_sizes"]["test"] == 400
    assert metrics["test"]["accuracy"] > 0.6  # balanced classes: chance is 0.5
