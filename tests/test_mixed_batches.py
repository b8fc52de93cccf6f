"""Serving several adapters in one batch: peft's ``adapter_names=[...]``, one adapter per row."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model, token_batch
from peft import get_peft_model

from peft_ipt import InstancePromptConfig, PrefixTuningV2Config


def three_adapter_model(arch="llama", task="CAUSAL_LM", method="prefix", base=None):
    """Two adapters of one method (peft does not mix methods on one model) plus the base model (``base``, else a
    tiny ``arch`` model)."""
    if method == "prefix":
        first = PrefixTuningV2Config(task_type=task, prefix_length=4, init_weights=False)
        second = PrefixTuningV2Config(
            task_type=task, prefix_length=2, layers_to_transform=[1], init_weights=False
        )
    else:
        first = InstancePromptConfig(task_type=task, prompt_length=4, init_weights=False)
        second = InstancePromptConfig(task_type=task, prompt_length=3, injection="prefix", init_weights=False)
    model = get_peft_model(tiny_model(arch, task) if base is None else base, first)
    model.add_adapter("other", second)
    return model


ROWS = ["default", "__base__", "other", "other", "default"]
CASES = [("llama", "CAUSAL_LM"), ("bert", "SEQ_CLS"), ("bart", "SEQ_2_SEQ_LM")]


@pytest.mark.parametrize("method", ["prefix", "ipt"])
@pytest.mark.parametrize(("arch", "task"), CASES)
def test_each_row_of_a_mixed_batch_equals_that_row_run_alone_with_its_adapter(arch, task, method):
    model = three_adapter_model(arch, task, method)
    extra = {"decoder_input_ids": token_batch(len(ROWS), 4, seed=3)} if arch == "bart" else {}
    assert_each_row_matches_alone(model, token_batch(len(ROWS), 7), extra)


def assert_each_row_matches_alone(model, ids: torch.Tensor, extra: dict) -> None:
    """Each row of one ``adapter_names=ROWS`` batch gives the logits of that row run alone with its adapter."""
    with torch.no_grad():
        mixed = model(input_ids=ids, adapter_names=ROWS, **extra).logits
        for row, name in enumerate(ROWS):
            one = {k: v[row : row + 1] for k, v in extra.items()}
            if name == "__base__":
                with model.disable_adapter():
                    alone = model(input_ids=ids[row : row + 1], **one).logits
            else:
                model.set_adapter(name)
                alone = model(input_ids=ids[row : row + 1], **one).logits
            torch.testing.assert_close(mixed[row : row + 1], alone, rtol=1e-5, atol=1e-5)
    model.set_adapter("default")


@pytest.mark.parametrize("method", ["prefix", "ipt"])
def test_mixed_batch_generate_matches_each_row_alone(method):
    model = three_adapter_model(method=method)
    ids = token_batch(len(ROWS), 6)
    kwargs = {"max_new_tokens": 5, "min_new_tokens": 5, "do_sample": False}
    mixed = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), adapter_names=ROWS, **kwargs)
    for row, name in enumerate(ROWS):
        one = {"input_ids": ids[row : row + 1], "attention_mask": torch.ones(1, 6, dtype=torch.long)}
        if name == "__base__":
            with model.disable_adapter():
                alone = model.generate(**one, **kwargs)
        else:
            model.set_adapter(name)
            alone = model.generate(**one, **kwargs)
        assert torch.equal(mixed[row], alone[0])
    model.set_adapter("default")


def test_adapter_names_are_checked():
    model = three_adapter_model()
    ids = token_batch(2, 5)
    with pytest.raises(ValueError, match=r"adapter_names names \['nope'\], which are not loaded"):
        model(input_ids=ids, adapter_names=["default", "nope"])
    with pytest.raises(ValueError, match="adapter_names has 3 entries but the batch has 2 rows"):
        model(input_ids=ids, adapter_names=["default", "other", "other"])


def test_input_level_prompts_cannot_share_a_batch_and_say_so():
    model = three_adapter_model(method="ipt")
    model.add_adapter("inp", InstancePromptConfig(task_type="CAUSAL_LM", injection="input", prompt_length=2))
    with pytest.raises(ValueError, match="adapter 'inp' cannot share a batch"):
        model(input_ids=token_batch(2, 5), adapter_names=["default", "inp"])
