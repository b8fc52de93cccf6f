"""start_from_prefix: a fresh PrefixTuningV2 or hybrid IPT adapter started from a saved, trained PrefixTuningV2 one."""

from __future__ import annotations

import json
from pathlib import Path

import peft
import pytest
import torch
from conftest import lm_labels, move_trainable_weights, tiny_model, token_batch
from safetensors.torch import load_file
from test_cli import CLASSIFICATION, assets, write_experiment  # noqa: F401  (assets: the tiny models + csv)

from peft_ipt import InstancePromptConfig, PrefixTuningV2Config, start_from_prefix
from peft_ipt.cli import main
from peft_ipt.cli.experiment import ExperimentError, validate
from peft_ipt.cli.train import evaluate_run


def call(model, task: str) -> torch.Tensor:
    """The logits on token_batch() (an encoder-decoder's with the batch's first tokens as decoder input)."""
    ids = token_batch()
    return model(
        input_ids=ids, **({"decoder_input_ids": ids[:, :3]} if task == "SEQ_2_SEQ_LM" else {})
    ).logits


def trained_prefix(folder: Path, arch: str, task: str, **config) -> tuple[Path, torch.Tensor]:
    """A PrefixTuningV2 adapter whose trainable weights (prefix and head) are moved away from their initialisation,
    saved to ``folder``; returns the folder and its logits (call())."""
    model = peft.get_peft_model(tiny_model(arch, task), PrefixTuningV2Config(task_type=task, **config))
    move_trainable_weights(model, seed=3)
    model.eval()
    logits = call(model, task)
    model.save_pretrained(folder)
    return folder, logits


def fresh(arch: str, task: str, config) -> peft.PeftModel:
    return peft.get_peft_model(tiny_model(arch, task), config).eval()


def ipt(task: str, **config) -> InstancePromptConfig:
    return InstancePromptConfig(task_type=task, **config)


@pytest.mark.parametrize(
    ("arch", "task"), [("bert", "SEQ_CLS"), ("llama", "CAUSAL_LM"), ("t5", "SEQ_2_SEQ_LM")]
)
def test_ipt_starts_as_the_saved_prefix_exactly(tmp_path, arch, task):
    folder, expected = trained_prefix(tmp_path, arch, task, prefix_length=4, reparameterize=False)
    model = fresh(arch, task, ipt(task, prompt_length=4))
    assert not torch.allclose(call(model, task), expected, atol=1e-3)
    start_from_prefix(model, folder)
    torch.testing.assert_close(call(model, task), expected, rtol=0, atol=1e-6)


def test_the_instance_part_then_trains_on_top_of_the_prefix(tmp_path):
    folder, _ = trained_prefix(tmp_path, "llama", "CAUSAL_LM", prefix_length=4, reparameterize=False)
    model = fresh("llama", "CAUSAL_LM", ipt("CAUSAL_LM", prompt_length=4, instance_scale=0.05))
    start_from_prefix(model, folder)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = token_batch(batch=4, length=9)
    losses = []
    for _ in range(8):
        loss = model(input_ids=ids, labels=lm_labels(ids)).loss
        losses.append(loss.item())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    heads = model.base_model.prompt_modules["default"].heads
    assert all(head.weight.abs().sum() > 0 for head in heads.values())  # the instance part left zero
    assert losses[-1] < losses[0]


def test_a_prefix_starts_from_its_own_saved_run(tmp_path):
    folder, expected = trained_prefix(tmp_path, "bert", "SEQ_CLS", prefix_length=4, encoder_hidden_size=8)
    model = fresh(
        "bert", "SEQ_CLS", PrefixTuningV2Config(task_type="SEQ_CLS", prefix_length=4, encoder_hidden_size=8)
    )
    start_from_prefix(model, folder)
    torch.testing.assert_close(model(input_ids=token_batch()).logits, expected, rtol=0, atol=1e-6)


def test_an_mlp_prefix_goes_under_ipt_with_the_same_task_prefix_mlp(tmp_path):
    folder, expected = trained_prefix(tmp_path, "bert", "SEQ_CLS", prefix_length=4, encoder_hidden_size=8)
    model = fresh("bert", "SEQ_CLS", ipt("SEQ_CLS", prompt_length=4, task_prefix_hidden_size=8))
    start_from_prefix(model, folder)
    torch.testing.assert_close(model(input_ids=token_batch()).logits, expected, rtol=0, atol=1e-6)


def test_a_folded_prefix_goes_under_a_flat_task_prefix(tmp_path):
    base = peft.get_peft_model(
        tiny_model("bert", "SEQ_CLS"),
        PrefixTuningV2Config(task_type="SEQ_CLS", prefix_length=4, encoder_hidden_size=8),
    ).eval()
    expected = base(input_ids=token_batch()).logits
    base.base_model.fold()
    base.save_pretrained(tmp_path)
    model = fresh("bert", "SEQ_CLS", ipt("SEQ_CLS", prompt_length=4))
    start_from_prefix(model, tmp_path)
    torch.testing.assert_close(model(input_ids=token_batch()).logits, expected, rtol=0, atol=1e-5)


# -- refusals, each before a weight is copied -------------------------------------------------------------


def unchanged_after(model, call) -> None:
    """Run ``call``, which must raise, and check that it changed no weight of ``model`` first; re-raise its error."""
    before = {k: v.clone() for k, v in model.state_dict().items()}
    try:
        call()
    finally:
        after = model.state_dict()
        assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"prompt_length": 6}, "prompt_length=4"),
        ({"prompt_length": 4, "task_prefix_hidden_size": 8}, "task_prefix_hidden_size to None"),
        ({"prompt_length": 4, "injection": "prefix"}, "injection='hybrid'"),
        ({"prompt_length": 4, "layers_to_transform": [0]}, "layers_to_transform"),
    ],
)
def test_a_mismatched_ipt_config_is_refused_by_field(tmp_path, config, message):
    folder, _ = trained_prefix(tmp_path, "bert", "SEQ_CLS", prefix_length=4, reparameterize=False)
    model = fresh("bert", "SEQ_CLS", ipt("SEQ_CLS", **config))
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        unchanged_after(model, lambda: start_from_prefix(model, folder))


def test_an_mlp_prefix_into_a_flat_task_prefix_is_refused(tmp_path):
    folder, _ = trained_prefix(tmp_path, "bert", "SEQ_CLS", prefix_length=4, encoder_hidden_size=8)
    model = fresh("bert", "SEQ_CLS", ipt("SEQ_CLS", prompt_length=4))
    with pytest.raises(ValueError, match=r"MLP-reparameterised prefix \(h=8\).*task_prefix_hidden_size to 8"):
        start_from_prefix(model, folder)


def test_another_methods_adapter_is_refused(tmp_path):
    fresh("bert", "SEQ_CLS", ipt("SEQ_CLS", prompt_length=4)).save_pretrained(tmp_path)
    model = fresh("bert", "SEQ_CLS", ipt("SEQ_CLS", prompt_length=4))
    with pytest.raises(ValueError, match="starts from a PrefixTuningV2 adapter"):
        start_from_prefix(model, tmp_path)


def test_another_task_type_or_label_count_is_refused(tmp_path):
    folder, _ = trained_prefix(tmp_path / "cls", "bert", "SEQ_CLS", prefix_length=4, reparameterize=False)
    model = fresh("bert", "TOKEN_CLS", ipt("TOKEN_CLS", prompt_length=4))
    with pytest.raises(ValueError, match="task_type is 'TOKEN_CLS'"):
        start_from_prefix(model, folder)
    base = tiny_model("bert", "SEQ_CLS")
    base.classifier, base.config.num_labels = torch.nn.Linear(32, 5), 5
    five = peft.get_peft_model(base, ipt("SEQ_CLS", prompt_length=4))
    with pytest.raises(ValueError, match="another label count"):
        start_from_prefix(five, folder)


def test_a_trained_ipt_is_not_overwritten(tmp_path):
    folder, _ = trained_prefix(tmp_path, "bert", "SEQ_CLS", prefix_length=4, reparameterize=False)
    model = fresh("bert", "SEQ_CLS", ipt("SEQ_CLS", prompt_length=4))
    with torch.no_grad():
        model.base_model.prompt_modules["default"].heads["self"].weight.fill_(0.1)
    with pytest.raises(ValueError, match="instance heads .* are not at zero"):
        unchanged_after(model, lambda: start_from_prefix(model, folder))


def test_a_folder_without_an_adapter_and_a_lora_model_are_refused(tmp_path):
    model = fresh("bert", "SEQ_CLS", ipt("SEQ_CLS", prompt_length=4))
    with pytest.raises(FileNotFoundError, match="no adapter_config.json"):
        start_from_prefix(model, tmp_path)
    folder, _ = trained_prefix(tmp_path, "bert", "SEQ_CLS", prefix_length=4, reparameterize=False)
    lora = peft.get_peft_model(tiny_model("bert", "SEQ_CLS"), peft.LoraConfig(task_type="SEQ_CLS"))
    with pytest.raises(TypeError, match="InstancePromptConfig or PrefixTuningV2Config"):
        start_from_prefix(lora, folder)


def test_weights_that_do_not_match_their_config_are_refused(tmp_path):
    folder, _ = trained_prefix(tmp_path, "bert", "SEQ_CLS", prefix_length=4, reparameterize=False)
    config = json.loads((folder / "adapter_config.json").read_text())
    config["weights_sha256"] = "0" * 64
    (folder / "adapter_config.json").write_text(json.dumps(config))
    model = fresh("bert", "SEQ_CLS", ipt("SEQ_CLS", prompt_length=4))
    with pytest.raises(ValueError, match="adapter_model.safetensors"):
        start_from_prefix(model, folder)


# -- the CLI: `start_from:` in an experiment ----------------------------------------------------------------

PREFIX_RUN = {
    **CLASSIFICATION,
    "method": "prefix_v2",
    "method_config": {"prefix_length": 4, "reparameterize": False},
}


@pytest.fixture(scope="module")
def prefix_run(assets) -> Path:  # noqa: F811
    output = assets / "prefix_run"
    assert (
        main(["train", str(write_experiment(assets, "prefix.yaml", PREFIX_RUN)), "--output-dir", str(output)])
        == 0
    )
    return output


def test_an_ipt_run_started_from_a_prefix_run_scores_as_it_before_any_step(assets, prefix_run):  # noqa: F811
    """At learning rate 0 the IPT run keeps its start: the prefix run's test scores, to the last digit."""
    config = write_experiment(assets, "ipt_start.yaml", {**CLASSIFICATION, "start_from": str(prefix_run)})
    output = assets / "ipt_start_run"
    assert main(["train", str(config), "--output-dir", str(output), "--set", "training.learning_rate=0"]) == 0
    started = json.loads((output / "metrics.json").read_text())
    assert started["test"] == json.loads((prefix_run / "metrics.json").read_text())["test"]
    assert started["experiment"]["start_from"] == str(prefix_run)
    assert (
        f"Started from the trained PrefixTuningV2 adapter in `{prefix_run}`"
        in (output / "README.md").read_text()
    )


def test_an_ipt_run_started_from_a_prefix_run_trains_its_instance_part(assets, prefix_run):  # noqa: F811
    config = write_experiment(
        assets, "ipt_start_trained.yaml", {**CLASSIFICATION, "start_from": str(prefix_run)}
    )
    output = assets / "ipt_start_trained"
    assert main(["train", str(config), "--output-dir", str(output)]) == 0
    heads = {k: v for k, v in load_file(output / "adapter_model.safetensors").items() if ".heads." in k}
    assert heads and all(v.abs().sum() > 0 for v in heads.values())


def test_start_from_is_refused_for_methods_that_cannot_start_from_a_prefix(assets, prefix_run):  # noqa: F811
    raw = {**CLASSIFICATION, "model": str(assets / "bert"), "start_from": str(prefix_run), "method": "lora"}
    raw["method_config"] = {}
    with pytest.raises(ExperimentError, match="start_from .*method 'lora' cannot start from one"):
        validate(raw)


def test_a_missing_start_folder_stops_the_run_before_anything_loads(assets, monkeypatch, capsys):  # noqa: F811
    from peft_ipt.cli import train as train_module

    def no_data(*args, **kwargs):
        raise AssertionError("the data loaded before start_from was checked")

    monkeypatch.setattr(train_module, "load_splits", no_data)
    config = write_experiment(assets, "ipt_missing.yaml", {**CLASSIFICATION, "start_from": "no/such/run"})
    assert main(["train", str(config), "--output-dir", str(assets / "never")]) != 0
    assert "start_from 'no/such/run' holds no saved adapter" in capsys.readouterr().err
    assert not (assets / "never").exists()


def test_a_finished_run_still_evaluates_after_its_start_folder_is_gone(assets, prefix_run):  # noqa: F811
    import shutil

    start = assets / "prefix_run_copy"
    shutil.copytree(prefix_run, start)
    config = write_experiment(assets, "ipt_gone.yaml", {**CLASSIFICATION, "start_from": str(start)})
    output = assets / "ipt_gone_run"
    assert main(["train", str(config), "--output-dir", str(output)]) == 0
    shutil.rmtree(start)
    recorded = json.loads((output / "metrics.json").read_text())["test"]
    assert evaluate_run(output)["accuracy"] == pytest.approx(recorded["accuracy"], abs=1e-6)
