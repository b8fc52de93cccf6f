"""Hybrid models, whose attention layers alternate with state-space or linear-attention layers (Jamba, LFM2,
Qwen3-Next; peft's PrefixTuning fails on all three): prefixes go to the attention layers only, and a layer
without attention named in a config is refused, where a prefix on it would never be read."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import TINY_DECODER, token_batch
from peft import PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, JambaConfig, Lfm2Config, Qwen3NextConfig

from peft_ipt import InstancePromptConfig, PrefixTuningV2Config

TINY = {**TINY_DECODER, "num_hidden_layers": 4, "pad_token_id": 0}
HYBRIDS = {  # attention at layers 1 and 3; layers 0 and 2 are Mamba, short convolutions, linear attention
    "jamba": lambda: JambaConfig(
        **TINY,
        attn_layer_period=2,
        attn_layer_offset=1,
        expert_layer_period=4,
        expert_layer_offset=3,
        num_experts=2,
        mamba_d_state=4,
        mamba_d_conv=2,
        mamba_expand=1,
        mamba_dt_rank=4,
        use_mamba_kernels=False,
    ),
    "lfm2": lambda: Lfm2Config(**TINY, layer_types=["conv", "full_attention"] * 2),
    "qwen3_next": lambda: Qwen3NextConfig(
        **TINY,
        head_dim=8,
        linear_num_value_heads=2,
        linear_num_key_heads=2,
        linear_key_head_dim=8,
        linear_value_head_dim=8,
        num_experts=2,
        num_experts_per_tok=1,
        moe_intermediate_size=16,
        shared_expert_intermediate_size=16,
        layer_types=["linear_attention", "full_attention"] * 2,
    ),
}
METHODS = {
    "prefix_v2": lambda **kw: PrefixTuningV2Config(
        task_type="CAUSAL_LM", prefix_length=3, init_weights=False, **kw
    ),
    "ipt": lambda **kw: InstancePromptConfig(
        task_type="CAUSAL_LM", prompt_length=3, init_weights=False, **kw
    ),
    "ipt_hidden": lambda **kw: InstancePromptConfig(
        task_type="CAUSAL_LM",
        prompt_length=3,
        init_weights=False,
        injection="prefix",
        instance_source="hidden",
        **kw,
    ),
}


def hybrid(name: str):
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(HYBRIDS[name]()).eval()


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("name", list(HYBRIDS))
def test_a_hybrid_models_attention_layers_take_the_prefixes_and_only_they(name, method, tmp_path):
    base = hybrid(name)
    model = get_peft_model(copy.deepcopy(base), METHODS[method]()).eval()
    slots = model.base_model.prompt_modules["default"].layer_slots
    # before: slots for layers 0-3, two of them never read; the hidden source's prompt enters from layer 3 on
    assert sorted(slots["self"]) == ([3] if method == "ipt_hidden" else [1, 3])
    ids = token_batch(2, 8)
    with torch.no_grad():
        logits = model(input_ids=ids).logits
        with model.disable_adapter():
            assert torch.equal(model(input_ids=ids).logits, base(input_ids=ids).logits)
        assert (logits - base(input_ids=ids).logits).abs().max() > 1e-3
        kwargs = {"input_ids": ids, "max_new_tokens": 4, "do_sample": False, "pad_token_id": 0}
        generated = model.generate(**kwargs)
        assert torch.equal(generated, model.generate(**kwargs, use_cache=False))
    model.train()
    labels = ids.clone()
    labels[:, :3] = -100
    model(input_ids=ids, labels=labels).loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters() if p.requires_grad)
    model.eval().save_pretrained(tmp_path)
    reloaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, logits, atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    ("method", "field", "value"),
    [
        ("prefix_v2", "layers_to_transform", [0, 1]),
        ("ipt_hidden", "hidden_layer", 2),
    ],
)
def test_a_layer_without_attention_named_in_a_config_is_refused_naming_the_attention_layers(
    method, field, value
):
    with pytest.raises(ValueError, match=rf"{field}=.*layer [02].*no self attention.*\[1, 3\]"):
        get_peft_model(hybrid("lfm2"), METHODS[method](**{field: value}))


def test_frozen_layers_on_a_layer_without_attention_is_refused():
    config = METHODS["ipt"](instance_source="frozen_model", frozen_layers=2)
    with pytest.raises(
        ValueError, match=r"frozen_layers=2: layer 2 of this model has no self attention.*\[1, 3\]"
    ):
        get_peft_model(hybrid("jamba"), config)


def test_the_hidden_source_reads_the_middle_attention_layer_by_default():
    """Before, the default (layer n_layers // 2 = 2, a convolution layer here) failed at get_peft_model."""
    model = get_peft_model(hybrid("lfm2"), METHODS["ipt_hidden"]())
    assert model.peft_config["default"].hidden_source(model.base_model.layout) == ("self", 3)
