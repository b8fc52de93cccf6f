"""TRL's SFTTrainer with these methods as its peft_config: what a LoRA user of TRL does, on a tiny Llama."""

from __future__ import annotations

import pytest
import torch
import trl  # a dev dependency
from conftest import tiny_model, tiny_tokenizer
from datasets import Dataset
from peft import PeftModel

from peft_ipt import InstancePromptConfig, PrefixTuningV2Config

METHODS = {
    "prefix_v2": lambda: PrefixTuningV2Config(task_type="CAUSAL_LM", prefix_length=4),
    "ipt": lambda: InstancePromptConfig(task_type="CAUSAL_LM", prompt_length=4),
}
PAIRS = [
    ("the movie was", " very good ."),
    ("the film was", " awful ."),
    ("the food is", " cheap ."),
    ("the cafe is in the", " centre ."),
]


def trl_trainer(kind: str, config, rows: list[dict], tmp_path, **args):
    """A TRL trainer (``kind``: "SFT" or "DPO") on a tiny Llama with ``config``'s adapter, on CPU, one step per log."""
    settings = {"per_device_train_batch_size": 4, "learning_rate": 3e-2, "logging_steps": 1, "seed": 0}
    settings.update(save_strategy="no", report_to=[], use_cpu=True, **args)
    torch.manual_seed(0)
    return getattr(trl, f"{kind}Trainer")(
        model=tiny_model("llama"),
        args=getattr(trl, f"{kind}Config")(output_dir=str(tmp_path), **settings),
        train_dataset=Dataset.from_list(rows),
        processing_class=tiny_tokenizer(with_cls=False),
        peft_config=config,
    )


def sft_trainer(method: str, tmp_path, **args) -> trl.SFTTrainer:
    rows = [{"prompt": p, "completion": c} for p, c in PAIRS] * 4
    return trl_trainer("SFT", METHODS[method](), rows, tmp_path, max_steps=12, **args)


@pytest.mark.parametrize("method", METHODS)
def test_sft_trainer_trains_the_adapter_alone_on_the_completions(method, tmp_path):
    trainer = sft_trainer(method, tmp_path)
    model = trainer.model
    assert isinstance(model, PeftModel)
    assert model.peft_config["default"].peft_type == METHODS[method]().peft_type
    frozen = {n: p.detach().clone() for n, p in model.get_base_model().named_parameters()}
    adapter = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert adapter and all(not n.startswith("base_model.model.") for n in adapter)
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 12 and sum(losses[-3:]) < sum(losses[:3])
    changed = [n for n, p in model.named_parameters() if p.requires_grad and not torch.equal(p, adapter[n])]
    assert changed == list(adapter)  # every adapter parameter trained
    assert all(torch.equal(p, frozen[n]) for n, p in model.get_base_model().named_parameters())


def test_sft_trainer_padding_free_trains_the_prefix_as_padded_batches_do(tmp_path):
    """TRL's padding_free=True packs each batch into one row (restarting position_ids, no mask): the prefix is
    seen by each sequence as alone, so the losses are those of padded batches."""
    padded = sft_trainer("prefix_v2", tmp_path / "padded")
    padded.train()
    packed = sft_trainer("prefix_v2", tmp_path / "packed", padding_free=True, max_length=None)
    packed.train()
    loss = lambda t: torch.tensor([h["loss"] for h in t.state.log_history if "loss" in h])  # noqa: E731
    torch.testing.assert_close(loss(packed), loss(padded), rtol=2e-3, atol=0)


@pytest.mark.parametrize("args", [{"padding_free": True, "max_length": None}, {"packing": True}])
def test_sft_trainer_packed_rows_are_refused_by_the_instance_prompt(args, tmp_path):
    trainer = sft_trainer("ipt", tmp_path, **args)
    with pytest.raises(ValueError, match=r"packed into one row.*padding_free=False and packing=False"):
        trainer.train()


PREFERENCES = [
    {"prompt": "the movie was", "chosen": " very good .", "rejected": " awful ."},
    {"prompt": "the cafe is in the", "chosen": " centre .", "rejected": " bad ."},
]
DPO_METHODS = {
    **METHODS,
    "ipt_input": lambda: InstancePromptConfig(task_type="CAUSAL_LM", prompt_length=4, injection="input"),
}


@pytest.mark.parametrize("method", DPO_METHODS)
def test_dpo_trainer_scores_completions_as_the_logits_do_and_trains(method, tmp_path):
    """DPOTrainer patches the base model with a fused LM head and reads per-token log-probabilities from it, cutting
    prompt-learning's virtual positions by counting from the end; the reference is the model with the adapter
    disabled. The log-probabilities it reads equal those of the logits, and the DPO loss falls."""
    dpo = trl_trainer("DPO", DPO_METHODS[method](), PREFERENCES * 8, tmp_path, max_steps=20)
    batch = next(iter(dpo.get_train_dataloader()))
    kwargs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "use_cache": False}
    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
    model = dpo.model.eval()
    with torch.no_grad():
        fused = model(**kwargs, labels=labels, fused_lm_head=True).log_probs
        logits = model(**kwargs, labels=labels).logits
    scored = batch["completion_mask"][:, 1:].bool()
    from_logits = torch.log_softmax(logits[:, :-1], -1).gather(-1, batch["input_ids"][:, 1:, None])[..., 0]
    torch.testing.assert_close(fused[:, -scored.shape[1] :][scored], from_logits[scored], rtol=0, atol=1e-5)
    model.train()
    dpo.train()
    losses = [h["loss"] for h in dpo.state.log_history if "loss" in h]
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert len(losses) == 20 and last < first - 0.005  # the last five steps below the first five
