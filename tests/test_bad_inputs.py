"""Inputs that often break prompt methods: rows that are all padding."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model, token_batch
from peft import get_peft_model

from peft_ipt import InstancePromptConfig, PrefixTuningV2Config


@pytest.mark.parametrize("config_cls", [PrefixTuningV2Config, InstancePromptConfig])
@pytest.mark.parametrize(("arch", "task"), [("llama", "CAUSAL_LM"), ("bert", "SEQ_CLS")])
def test_an_all_padding_row_gives_finite_outputs_and_leaves_other_rows_alone(config_cls, arch, task):
    model = get_peft_model(tiny_model(arch, task), config_cls(task_type=task, init_weights=False))
    ids = token_batch(2, 6)
    mask = torch.ones_like(ids)
    mask[1] = 0  # nothing to attend to but the prefix, and no source tokens for an instance prompt
    with torch.no_grad():
        batch = model(input_ids=ids, attention_mask=mask).logits
        alone = model(input_ids=ids[:1], attention_mask=mask[:1]).logits
    assert torch.isfinite(batch).all()
    torch.testing.assert_close(batch[:1], alone, rtol=1e-5, atol=1e-5)
