"""The caches generation uses, beside the default dynamic one: a static cache (``cache_implementation="static"``,
what ``torch.compile``d decoding takes) and a prompt fed in chunks through ``past_key_values``. Each must give what
one full call gives: the prefix is never in the cache, and the model's own causal mask keeps its alignment."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model, token_batch
from peft import get_peft_model

from peft_ipt import InstancePromptConfig, PrefixTuningV2Config

METHODS = {
    "prefix_v2": lambda: PrefixTuningV2Config(task_type="CAUSAL_LM", prefix_length=3, init_weights=False),
    "ipt": lambda: InstancePromptConfig(task_type="CAUSAL_LM", prompt_length=3, init_weights=False),
}


def build(arch: str, attn: str, method: str):
    torch.manual_seed(0)
    return get_peft_model(tiny_model(arch, attn=attn), METHODS[method]()).eval()


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_a_static_cache_generates_what_the_dynamic_cache_generates(arch, attn, method):
    model = build(arch, attn, method)
    ids = token_batch(2, 7)
    mask = torch.ones_like(ids)
    mask[1, :2] = 0  # a left-padded row too
    kwargs = {
        "max_new_tokens": 6,
        "do_sample": False,
        "pad_token_id": 0,
        "output_scores": True,
        "return_dict_in_generate": True,
    }
    dynamic = model.generate(input_ids=ids, attention_mask=mask, **kwargs)
    static = model.generate(input_ids=ids, attention_mask=mask, cache_implementation="static", **kwargs)
    assert torch.equal(static.sequences, dynamic.sequences)
    for step_static, step_dynamic in zip(static.scores, dynamic.scores, strict=True):
        assert torch.allclose(step_static, step_dynamic, atol=1e-5)
    without_padding = model.generate(input_ids=ids[:1], attention_mask=mask[:1], **kwargs)
    static_without = model.generate(
        input_ids=ids[:1], attention_mask=mask[:1], cache_implementation="static", **kwargs
    )
    assert torch.allclose(static_without.scores[0], without_padding.scores[0], atol=1e-5)


@pytest.mark.parametrize("method", ["prefix_v2"])  # an instance prompt is built from the first chunk's tokens
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_a_prompt_fed_in_chunks_gives_the_logits_of_one_call(attn, method):
    model = build("llama", attn, method)
    ids = token_batch(2, 9)
    with torch.no_grad():
        whole = model(input_ids=ids).logits
        first = model(input_ids=ids[:, :5], use_cache=True)
        rest = model(input_ids=ids[:, 5:], past_key_values=first.past_key_values, use_cache=True).logits
    assert torch.allclose(first.logits, whole[:, :5], atol=1e-5)
    assert torch.allclose(rest, whole[:, 5:], atol=1e-5)


@pytest.mark.parametrize("method", ["prefix", "ipt"])
def test_a_mixed_adapter_batch_generates_with_a_static_cache_as_with_the_dynamic_one(method):
    from test_mixed_batches import ROWS, three_adapter_model

    model = three_adapter_model(method=method).eval()
    ids = token_batch(len(ROWS), 6)
    kwargs = {"max_new_tokens": 5, "min_new_tokens": 5, "do_sample": False, "adapter_names": ROWS}
    kwargs |= {"output_scores": True, "return_dict_in_generate": True}
    dynamic = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kwargs)
    static = model.generate(
        input_ids=ids, attention_mask=torch.ones_like(ids), cache_implementation="static", **kwargs
    )
    assert torch.equal(static.sequences, dynamic.sequences)
    for step_static, step_dynamic in zip(static.scores, dynamic.scores, strict=True):
        assert torch.allclose(step_static, step_dynamic, atol=1e-5)
