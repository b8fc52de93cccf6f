"""peft's reparameterised prompt encoders (P-tuning, PrefixTuning with prefix_projection) through `peft-ipt
train`'s checkpoints: the best-model restore and --resume give back the encoder that was saved, where peft's own
loading (Trainer's path) feeds the saved prompts through the encoder a second time."""

from __future__ import annotations

import json

import peft
import pytest
import torch
from test_cli import CLASSIFICATION, assets, write_experiment  # noqa: F401  (assets: the tiny models + csv)
from test_resume import InterruptAt, Interrupted, assert_same_adapter, copy_run, run
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    LlamaConfig,
    LlamaForCausalLM,
)

from peft_ipt.cli import train as train_module
from peft_ipt.cli.checkpoints import (
    TRAINABLE_FILE,
    CheckpointError,
    mark_complete,
    reparameterized_prompt_encoder,
    restore_trainable_weights,
    save_trainable_weights,
)
from peft_ipt.cli.train import CHECKPOINTS

P_TUNING = {"num_virtual_tokens": 4, "encoder_hidden_size": 16}


def tiny_classifier(config: peft.PeftConfig) -> peft.PeftModel:
    """A tiny BERT classifier; for peft's PrefixTuning, which refuses BERT and sequence classifiers under
    transformers 5.24 ("Model does not support past key values"), a tiny Llama language model."""
    torch.manual_seed(0)
    sizes = {"vocab_size": 50, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4}
    if config.peft_type == peft.PeftType.PREFIX_TUNING:
        base = LlamaForCausalLM(LlamaConfig(**sizes, intermediate_size=64, pad_token_id=0))
    else:
        base = BertForSequenceClassification(BertConfig(**sizes, intermediate_size=64))
    return peft.get_peft_model(base, config).eval()


INPUTS = torch.randint(3, 50, (2, 7), generator=torch.Generator().manual_seed(1))
REPARAMETERIZED = {
    "p_tuning_mlp": lambda: peft.PromptEncoderConfig(task_type="SEQ_CLS", **P_TUNING),
    "p_tuning_lstm": lambda: peft.PromptEncoderConfig(
        task_type="SEQ_CLS", encoder_reparameterization_type="LSTM", **P_TUNING
    ),
    "prefix_projection": lambda: peft.PrefixTuningConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=4, prefix_projection=True, encoder_hidden_size=16
    ),
}


def test_peft_alone_reloads_p_tuning_into_a_training_model_wrongly(tmp_path):
    """The reason for the workaround: Trainer restores the best model and resumes through load_adapter."""
    model = tiny_classifier(REPARAMETERIZED["p_tuning_mlp"]())
    expected = model(input_ids=INPUTS).logits
    model.save_pretrained(tmp_path)
    model.load_adapter(tmp_path, "default")
    assert not torch.allclose(model(input_ids=INPUTS).logits, expected, atol=1e-4)


@pytest.mark.parametrize("method", sorted(REPARAMETERIZED))
def test_restoring_the_trainable_weights_gives_back_the_saved_logits(method, tmp_path):
    model = tiny_classifier(REPARAMETERIZED[method]())
    assert reparameterized_prompt_encoder(model) is not None
    expected = model(input_ids=INPUTS).logits
    save_trainable_weights(model, tmp_path)
    with torch.no_grad():  # training moves every trainable weight, the task head included
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p))
    assert not torch.allclose(model(input_ids=INPUTS).logits, expected, atol=1e-4)
    restore_trainable_weights(model, tmp_path)
    torch.testing.assert_close(model(input_ids=INPUTS).logits, expected, rtol=0, atol=0)


@pytest.mark.parametrize(
    "config",
    [
        lambda: peft.PromptTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=4),
        lambda: peft.PrefixTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=4),
        lambda: peft.PromptEncoderConfig(task_type="SEQ_CLS", inference_mode=True, **P_TUNING),
        lambda: peft.LoraConfig(task_type="SEQ_CLS", target_modules=["query"]),
    ],
    ids=["prompt_tuning", "prefix_tuning", "p_tuning_inference_mode", "lora"],
)
def test_methods_whose_adapter_file_restores_them_keep_trainers_own_loading(config):
    assert reparameterized_prompt_encoder(tiny_classifier(config())) is None


def test_a_checkpoint_without_the_trainable_weights_is_refused(tmp_path):
    model = tiny_classifier(REPARAMETERIZED["p_tuning_mlp"]())
    model.save_pretrained(tmp_path)  # what Trainer alone writes
    with pytest.raises(CheckpointError, match=f"{tmp_path} has no {TRAINABLE_FILE}: its P_TUNING prompt"):
        restore_trainable_weights(model, tmp_path)


def test_trainable_weights_of_another_model_are_refused(tmp_path):
    save_trainable_weights(tiny_classifier(REPARAMETERIZED["p_tuning_lstm"]()), tmp_path)
    with pytest.raises(CheckpointError, match="does not match this P_TUNING model"):
        restore_trainable_weights(tiny_classifier(REPARAMETERIZED["p_tuning_mlp"]()), tmp_path)


# -- through `peft-ipt train` ---------------------------------------------------------------------------------

PEFT_P_TUNING = {**CLASSIFICATION, "method": "peft_p_tuning", "method_config": P_TUNING}


def test_early_stopping_keeps_the_best_p_tuning_checkpoints_adapter(assets):  # noqa: F811
    experiment = {
        **PEFT_P_TUNING,
        "training": {
            **CLASSIFICATION["training"],
            "learning_rate": 0.3,  # large steps: validation goes up and down
            "max_steps": 40,
            "early_stopping_patience": 2,
            "save_strategy": "steps",  # keeps the checkpoints, to compare with
            "save_steps": 2,
        },
    }
    output = assets / "p_tuning_es"
    assert run(write_experiment(assets, "p_tuning_es.yaml", experiment), output) == 0
    metrics = json.loads((output / "metrics.json").read_text())
    assert metrics["steps"] > metrics["best_step"]  # it stopped on a later, worse model and restored the best
    # The adapter written at the end (the restored model's prompts, encoded again by save_pretrained) is
    # bit-identical to the one Trainer wrote at the best step; peft's own restore would encode them twice.
    assert_same_adapter(output, output / CHECKPOINTS / f"checkpoint-{metrics['best_step']}")


def test_resuming_p_tuning_ends_with_the_adapter_of_the_uninterrupted_run(assets, tmp_path):  # noqa: F811
    experiment = {
        **PEFT_P_TUNING,
        "training": {**CLASSIFICATION["training"], "max_steps": 8, "save_strategy": "steps", "save_steps": 2},
    }
    config = write_experiment(assets, "p_tuning_resume.yaml", experiment)
    uninterrupted = tmp_path / "uninterrupted"
    assert run(config, uninterrupted) == 0
    interrupted = tmp_path / "interrupted"
    make_trainer = train_module.make_trainer

    def make_interrupted_trainer(*args, **kwargs):
        trainer = make_trainer(*args, **kwargs)
        trainer.add_callback(InterruptAt(5))
        return trainer

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(train_module, "make_trainer", make_interrupted_trainer)
        with pytest.raises(Interrupted):
            run(config, interrupted)
    assert (interrupted / CHECKPOINTS / "checkpoint-4" / TRAINABLE_FILE).is_file()
    resumed = copy_run(interrupted, tmp_path / "resumed")
    assert run(config, resumed, "--resume", "auto") == 0
    assert_same_adapter(resumed, uninterrupted)


def test_resuming_p_tuning_from_a_checkpoint_trainer_wrote_alone_is_refused(assets, tmp_path, capsys):  # noqa: F811
    experiment = {
        **PEFT_P_TUNING,
        "training": {**CLASSIFICATION["training"], "max_steps": 4, "save_strategy": "steps", "save_steps": 2},
    }
    config = write_experiment(assets, "p_tuning_refuse.yaml", experiment)
    output = tmp_path / "run"
    assert run(config, output) == 0
    folder = output / CHECKPOINTS / "checkpoint-2"
    (folder / TRAINABLE_FILE).unlink()
    mark_complete(folder)  # complete as far as the marker knows: only the encoder's weights are missing
    assert run(config, output, "--resume", str(folder)) == 2
    assert f"{folder} has no {TRAINABLE_FILE}" in capsys.readouterr().err
