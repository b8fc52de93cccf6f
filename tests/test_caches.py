"""The caches generation uses, beside the default dynamic one: a static cache (``cache_implementation="static"``,
what ``torch.compile``d decoding takes) and a prompt fed in chunks through ``past_key_values``. Each must give what
one full call gives: the prefix is never in the cache, and the model's own causal mask keeps its alignment."""

from __future__ import annotations

import copy
import inspect

import pytest
import torch
import transformers
from conftest import move_trainable_weights, tiny_model, token_batch
from packaging.version import Version
from peft import get_peft_model
from transformers import LlamaForCausalLM

from peft_ipt import InstancePromptConfig, PrefixTuningV2Config
from peft_ipt.call_state import CACHE_PROMPT

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


IPT_VARIANTS = {
    "embeddings": {},
    "frozen_model": {"instance_source": "frozen_model"},
    "hidden": {"instance_source": "hidden"},
}


@pytest.mark.parametrize(
    ("arch", "variant"),
    # instance_source='hidden' is for decoder-only and encoder-only models
    [("llama", v) for v in IPT_VARIANTS] + [("bart", v) for v in IPT_VARIANTS if v != "hidden"],
)
def test_the_base_models_own_generate_keeps_the_prefill_prompt_at_every_step(arch, variant):
    """Decoding steps hand the model a cache (``cache=`` from transformers 5.24 on, ``past_key_values=`` before):
    the instance prompt built at the prefill stays, never rebuilt from the one new token."""
    task = "SEQ_2_SEQ_LM" if arch == "bart" else "CAUSAL_LM"
    torch.manual_seed(0)
    config = InstancePromptConfig(
        task_type=task, prompt_length=3, init_weights=False, **IPT_VARIANTS[variant]
    )
    model = get_peft_model(tiny_model(arch, task), config).eval()
    ids = token_batch(2, 7)
    kwargs = {"max_new_tokens": 5, "min_new_tokens": 5, "do_sample": False, "pad_token_id": 0}
    kwargs |= {"output_scores": True, "return_dict_in_generate": True}
    through_peft = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kwargs)
    inner = model.get_base_model().generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kwargs)
    assert torch.equal(inner.sequences, through_peft.sequences)
    for step_inner, step_peft in zip(inner.scores, through_peft.scores, strict=True):
        assert torch.allclose(step_inner, step_peft, atol=1e-6)


ASSISTED = {
    "a copy of the model as assistant": lambda model: {
        "assistant_model": copy.deepcopy(model)
    },  # drafts accepted
    "another model as assistant": lambda model: {
        "assistant_model": tiny_model(model.base_model.model.config.model_type)
    },
    "prompt lookup": lambda model: {"prompt_lookup_num_tokens": 3},
    "early exit": lambda model: {"assistant_early_exit": 1},  # the model's own first layer drafts
}


@pytest.mark.parametrize("variant", ["prefix_v2", *IPT_VARIANTS])
@pytest.mark.parametrize(
    ("arch", "assisted"),
    # transformers' early exit drafts through Llama's layout (GPT-2 fails there without an adapter too)
    [("llama", a) for a in ASSISTED] + [("gpt2", a) for a in ASSISTED if a != "early exit"],
)
def test_assisted_generation_generates_what_plain_greedy_decoding_generates(arch, assisted, variant):
    """Assisted decoding verifies several drafted tokens in one call on the cache and crops the cache where a draft
    is rejected: the prompt of the prefill must stay through both, so greedy output is unchanged token for token."""
    torch.manual_seed(0)
    config = (
        METHODS["prefix_v2"]()
        if variant == "prefix_v2"
        else InstancePromptConfig(
            task_type="CAUSAL_LM", prompt_length=3, init_weights=False, **IPT_VARIANTS[variant]
        )
    )
    model = get_peft_model(tiny_model(arch), config).eval()
    ids = token_batch(1, 9)
    ids = torch.cat([ids, ids[:, :5]], dim=1)  # a repeat, so prompt lookup finds drafts
    kwargs = {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "max_new_tokens": 12,
        "do_sample": False,
    }
    plain = model.generate(**kwargs, pad_token_id=0)
    assert torch.equal(model.generate(**kwargs, pad_token_id=0, **ASSISTED[assisted](model)), plain)


@pytest.mark.skipif(
    Version(transformers.__version__) < Version("5.25"),
    reason="transformers before 5.25 refuses assisted generation on a static cache itself",
)
@pytest.mark.parametrize(
    "assistant", ["a copy", "another model"]
)  # drafts accepted; drafts rejected, cache cropped
@pytest.mark.parametrize("method", ["prefix_v2", "ipt"])
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_assisted_generation_on_a_static_cache_generates_what_plain_greedy_decoding_generates(
    arch, method, assistant
):
    """transformers 5.25 lets an assistant draft into a static cache, cropping it where a draft is rejected: the
    prefix and the instance prompt must survive the crop. (Prompt lookup on a static cache fails inside transformers
    for the bare model as well, so it is not tried.)"""
    torch.manual_seed(0)
    config = (
        METHODS["prefix_v2"]()
        if method == "prefix_v2"
        else InstancePromptConfig(task_type="CAUSAL_LM", prompt_length=3, init_weights=False)
    )
    model = get_peft_model(tiny_model(arch), config).eval()
    ids = token_batch(1, 9)
    kwargs = {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "max_new_tokens": 12,
        "do_sample": False,
        "pad_token_id": 0,
    }
    plain = model.generate(**kwargs)
    drafter = copy.deepcopy(model) if assistant == "a copy" else tiny_model(arch, seed=3)
    assisted = model.generate(**kwargs, cache_implementation="static", assistant_model=drafter)
    assert torch.equal(assisted, plain)


def test_input_level_prompts_refuse_assisted_generation_and_name_what_works():
    config = InstancePromptConfig(
        task_type="CAUSAL_LM", prompt_length=3, init_weights=False, injection="input"
    )
    model = get_peft_model(tiny_model("llama"), config).eval()
    ids = token_batch(1, 9)
    kwargs = {"input_ids": ids, "max_new_tokens": 4, "do_sample": False, "pad_token_id": 0}
    for assistant in ({"assistant_model": tiny_model("llama")}, {"assistant_early_exit": 1}):
        with pytest.raises(
            ValueError, match="injection='input' cannot generate with assistant.*injection='hybrid'"
        ):
            model.generate(**kwargs, **assistant)
    # prompt lookup drafts from the tokens generated so far and stays exact
    assert torch.equal(model.generate(**kwargs, prompt_lookup_num_tokens=2), model.generate(**kwargs))


# transformers 5.24 renamed forward's past_key_values to cache (the old name still accepted); older versions know
# only past_key_values.
NEW_CACHE_NAME = "cache" in inspect.signature(LlamaForCausalLM.forward).parameters
CACHE_NAMES = ["cache", "past_key_values"] if NEW_CACHE_NAME else ["past_key_values"]


@pytest.mark.parametrize("cache_name", CACHE_NAMES)
def test_a_manual_decoding_loop_reuses_the_prompt_of_its_prefill(cache_name):
    torch.manual_seed(0)
    config = InstancePromptConfig(task_type="CAUSAL_LM", prompt_length=3, init_weights=False)
    model = get_peft_model(tiny_model("llama"), config).eval()
    ids = token_batch(2, 7)
    kwargs = {"max_new_tokens": 4, "min_new_tokens": 4, "do_sample": False, "pad_token_id": 0}
    generated = model.generate(input_ids=ids, output_logits=True, return_dict_in_generate=True, **kwargs)
    with torch.no_grad():
        out = model(input_ids=ids, use_cache=True)
        steps = [out.logits[:, -1]]
        for position in range(ids.shape[1], ids.shape[1] + 3):
            token = generated.sequences[:, position : position + 1]
            out = model(input_ids=token, use_cache=True, **{cache_name: out.past_key_values})
            steps.append(out.logits[:, -1])
    for manual, step in zip(steps, generated.logits, strict=True):
        assert torch.allclose(manual, step, atol=1e-5)


@pytest.mark.parametrize("mask_width", ["caller's tokens", "with the prompt"])
def test_an_input_prompts_manual_decoding_loop_with_a_mask_over_a_left_padded_batch_gives_generates_logits(
    mask_width,
):
    """The loop passes the attention mask of its own tokens, as with any model. An input-level prompt's P positions
    are in the cache too: such a mask was padded with zeros at its end by transformers, hiding the newest keys (a
    different third token on a tiny Llama); it is widened where the prefill put the prompt. A mask that already
    covers the prompt's positions is left as it is. (A rotary decoder needs no position_ids here: the prompt is in
    the sequence, so each row's tokens sit from it as they do alone.)"""
    config = InstancePromptConfig(
        task_type="CAUSAL_LM", prompt_length=3, injection="input", init_weights=False
    )
    model = get_peft_model(tiny_model("llama"), config).eval()
    move_trainable_weights(model)
    widened = None
    if mask_width == "with the prompt":  # the caller's own widening: the prompt after each row's padding
        widened = torch.ones(2, 10, dtype=torch.long)
        widened[1, :2] = 0
    loop_decodes_as_generate(model, pads=2, widened=widened)


def loop_decodes_as_generate(model, pads: int, widened: torch.Tensor | None = None):
    """Two rows, the second left-padded by ``pads``, decoded greedily by generate() and by a hand-written loop that
    passes the mask of its own tokens (continued from ``widened`` after the prefill, where given): their logits are
    the same at every step. Returns the batch and the loop's prefill output."""
    ids = token_batch(2, 7)
    ids[1, :pads] = 0
    mask = torch.ones_like(ids)
    mask[1, :pads] = 0
    kwargs = {"max_new_tokens": 4, "min_new_tokens": 4, "do_sample": False, "pad_token_id": 0}
    generated = model.generate(
        input_ids=ids, attention_mask=mask, output_logits=True, return_dict_in_generate=True, **kwargs
    )
    with torch.no_grad():
        out = prefill = model(input_ids=ids, attention_mask=mask, use_cache=True)
        steps = [out.logits[:, -1]]
        mask = mask if widened is None else widened
        for position in range(ids.shape[1], ids.shape[1] + 3):
            token = generated.sequences[:, position : position + 1]
            mask = torch.cat([mask, torch.ones_like(token)], dim=1)
            out = model(
                input_ids=token, attention_mask=mask, use_cache=True, **{CACHE_NAMES[0]: out.past_key_values}
            )
            steps.append(out.logits[:, -1])
    for manual, step in zip(steps, generated.logits, strict=True):
        torch.testing.assert_close(manual, step, atol=1e-5, rtol=0)
    return ids, prefill


def seq2seq_on_a_padded_batch(arch: str, **config):
    """An IPT seq2seq model whose weights are moved off their start, and two rows, the second right-padded."""
    config = InstancePromptConfig(task_type="SEQ_2_SEQ_LM", prompt_length=3, init_weights=False, **config)
    model = get_peft_model(tiny_model(arch, "SEQ_2_SEQ_LM"), config).eval()
    move_trainable_weights(model)
    ids = token_batch(2, 7)
    ids[1, 5:] = model.config.pad_token_id
    return model, ids, (ids != model.config.pad_token_id).long()


@pytest.mark.parametrize("encoder_side", ["input_ids", "encoder_outputs"])
@pytest.mark.parametrize("arch", ["bart", "t5"])
def test_an_input_prompts_seq2seq_decoding_loop_with_the_encoders_mask_gives_generates_logits(
    arch, encoder_side
):
    """A hand-written seq2seq loop passes the encoder's mask over its own tokens at every step, with the encoder's
    input again or the outputs of the encoder called alone. The cache's cross-attention holds the prompt's P
    positions too: the mask gets their columns, a re-run encoder its prompt, and encoder outputs their prompt
    states. Each step failed on a shape mismatch."""
    model, ids, mask = seq2seq_on_a_padded_batch(arch, injection="input")
    generated = model.generate(
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=4,
        min_new_tokens=4,
        do_sample=False,
        output_logits=True,
        return_dict_in_generate=True,
    )
    with torch.no_grad():
        out = model(
            input_ids=ids, attention_mask=mask, decoder_input_ids=generated.sequences[:, :1], use_cache=True
        )
        steps = [out.logits[:, -1]]
        for position in range(1, 4):
            if encoder_side == "input_ids":
                encoder = {"input_ids": ids}
            else:
                encoder = {"encoder_outputs": model.get_encoder()(input_ids=ids, attention_mask=mask)}
            out = model(
                **encoder,
                attention_mask=mask,
                decoder_input_ids=generated.sequences[:, position : position + 1],
                use_cache=True,
                **{CACHE_NAMES[0]: out.past_key_values},
            )
            steps.append(out.logits[:, -1])
            assert out.encoder_last_hidden_state.shape[1] == ids.shape[1]  # the caller's positions
    for manual, step in zip(steps, generated.logits, strict=True):
        torch.testing.assert_close(manual, step, atol=1e-5, rtol=0)


def test_input_level_prompts_refuse_the_base_models_generate_and_say_where_to_generate():
    config = InstancePromptConfig(task_type="CAUSAL_LM", prompt_length=3, injection="input")
    model = get_peft_model(tiny_model("llama"), config).eval()
    ids = token_batch(2, 7)
    with pytest.raises(ValueError, match="call generate\\(\\) on the PeftModel"):
        model.get_base_model().generate(input_ids=ids, max_new_tokens=2, do_sample=False, pad_token_id=0)


def test_the_position_check_counts_the_tokens_in_a_cache_passed_as_cache():
    model = get_peft_model(tiny_model("gpt2"), PrefixTuningV2Config(task_type="CAUSAL_LM")).eval()
    ids = token_batch(1, 120)
    with torch.no_grad():
        cache = model(input_ids=ids, use_cache=True).past_key_values
        with pytest.raises(ValueError, match=r"\+ 120 cached"):
            model(input_ids=token_batch(1, 10), use_cache=True, **{CACHE_NAMES[0]: cache})


def test_the_position_check_counts_an_input_prompts_positions_once_when_a_cache_holds_them():
    """A cache filled by a call with an input-level prompt holds its P positions: a continuing call adds only its
    own tokens. They were counted again, refusing a step that fits (131 of 128 positions for 127)."""
    config = InstancePromptConfig(task_type="CAUSAL_LM", prompt_length=4, injection="input")
    model = get_peft_model(tiny_model("gpt2"), config).eval()
    limit = model.config.n_positions
    with torch.no_grad():
        cache = model(input_ids=token_batch(1, limit - 6), use_cache=True).past_key_values
        assert cache.get_seq_length() == limit - 2
        cache = model(
            input_ids=token_batch(1, 2, seed=3), use_cache=True, **{CACHE_NAMES[0]: cache}
        ).past_key_values
        assert cache.get_seq_length() == limit  # every learned position used
        with pytest.raises(ValueError, match=rf"takes {limit + 1} positions \(1 tokens \+ {limit} cached\)"):
            model(input_ids=token_batch(1, 1, seed=4), use_cache=True, **{CACHE_NAMES[0]: cache})


# -- a cache carries the instance prompt it was filled with ---------------------------------------------------
# Continuing a cache (a decoding step, a later chunk) must use the prompt its keys and values were computed with.
# The tuner once kept "the last call's prompt", so a call on another batch in between (two sessions served in
# turns) silently switched the continuation to that batch's prompt.

CONTINUED = {
    "llama": [
        ("embeddings", {}),
        ("frozen_model", {"instance_source": "frozen_model"}),
        ("hidden", {"instance_source": "hidden"}),
        ("prefix", {"injection": "prefix"}),
        ("input", {"injection": "input"}),
    ],
    "bart": [
        ("embeddings", {}),
        ("frozen_model", {"instance_source": "frozen_model"}),
        ("input", {"injection": "input"}),
    ],
}


def continued(model, arch: str, ids: torch.Tensor, cache, split: int):
    """The logits of the call that continues ``cache`` with the rest of ``ids`` (the decoder side for BART)."""
    if arch == "bart":
        return model(
            input_ids=ids, decoder_input_ids=ids[:, split:], past_key_values=cache, use_cache=True
        ).logits
    return model(input_ids=ids[:, split:], past_key_values=cache, use_cache=True).logits


def started(model, arch: str, ids: torch.Tensor, split: int):
    if arch == "bart":
        return model(input_ids=ids, decoder_input_ids=ids[:, :split], use_cache=True)
    return model(input_ids=ids[:, :split], use_cache=True)


@pytest.mark.parametrize(("arch", "variant"), [(a, v) for a, vs in CONTINUED.items() for v, _ in vs])
def test_a_cache_is_continued_with_its_own_prompt_whatever_ran_in_between(arch, variant):
    task = "SEQ_2_SEQ_LM" if arch == "bart" else "CAUSAL_LM"
    torch.manual_seed(0)
    config = InstancePromptConfig(
        task_type=task, prompt_length=3, init_weights=False, **dict(CONTINUED[arch])[variant]
    )
    model = get_peft_model(tiny_model(arch, task), config).eval()
    a, b = token_batch(2, 8, seed=1), token_batch(2, 8, seed=2)  # equal chunk sizes: 4 and 4
    with torch.no_grad():
        right_after = continued(model, arch, a, started(model, arch, a, 4).past_key_values, 4)
        cache_a = started(model, arch, a, 4).past_key_values
        started(model, arch, b, 4)  # another session's call in between
        later = continued(model, arch, a, cache_a, 4)
        # it ran on the prompt the cache was filled with (the hidden source once rebuilt it from the new chunk)
        assert model.base_model._prefixes is getattr(cache_a, CACHE_PROMPT).prefixes
        copy_later = continued(model, arch, a, copy.deepcopy(started(model, arch, a, 4).past_key_values), 4)
    assert torch.equal(later, right_after)
    assert torch.equal(copy_later, right_after)  # transformers' prompt-reuse recipe deep-copies the cache


def test_a_cache_without_this_models_prompt_is_refused_naming_how_to_start_one():
    torch.manual_seed(0)
    model = get_peft_model(tiny_model("llama"), METHODS["ipt"]()).eval()
    ids = token_batch(2, 8)
    with torch.no_grad():
        with model.disable_adapter():
            cache = model(input_ids=ids[:, :4], use_cache=True).past_key_values
        with pytest.raises(
            ValueError, match=r"cache of 4 tokens that carries no instance prompt.*use_cache=True"
        ):
            model(input_ids=ids[:, 4:], past_key_values=cache)
        bare = tiny_model("llama")(input_ids=ids[:, :4], use_cache=True).past_key_values  # another model's
        with pytest.raises(ValueError, match="carries no instance prompt"):
            model(input_ids=ids[:, 4:], past_key_values=bare)


def test_a_cache_filled_with_another_adapter_is_refused_naming_both():
    torch.manual_seed(0)
    model = get_peft_model(tiny_model("llama"), METHODS["ipt"]()).eval()
    model.add_adapter("other", METHODS["ipt"]())
    ids = token_batch(2, 8)
    with torch.no_grad():
        cache = model(input_ids=ids[:, :4], use_cache=True).past_key_values
        model.set_adapter("other")
        with pytest.raises(
            ValueError, match=r"filled with adapter\(s\) \['default'\], but \['other'\] are active"
        ):
            model(input_ids=ids[:, 4:], past_key_values=cache)
        model.set_adapter("default")
        model(input_ids=ids[:, 4:], past_key_values=cache)  # back on its own adapter it continues


# -- generate() on from a later turn's cache --------------------------------------------------------------------
# transformers' multi-turn recipe passes the first turn's cache to generate() with the whole conversation. The
# cache's keys and values were computed with the first turn's prompt; the whole conversation builds another.

TURN_VARIANTS = {
    "hybrid": {},
    "prefix": {"injection": "prefix"},
    "input": {"injection": "input"},
    "frozen_model": {"instance_source": "frozen_model"},
}


def first_turn(config):
    torch.manual_seed(0)
    model = get_peft_model(tiny_model("llama"), config).eval()
    ids = token_batch(2, 6)
    kwargs = {"do_sample": False, "pad_token_id": 0, "return_dict_in_generate": True, "output_scores": True}
    out = model.generate(input_ids=ids, max_new_tokens=3, **kwargs)
    conversation = torch.cat([out.sequences, token_batch(2, 3, seed=5)], dim=1)
    return model, conversation, out.past_key_values, kwargs


@pytest.mark.parametrize("variant", list(TURN_VARIANTS))
def test_generate_on_from_a_first_turns_cache_is_refused_naming_source_mask(variant):
    config = InstancePromptConfig(
        task_type="CAUSAL_LM", prompt_length=3, init_weights=False, **TURN_VARIANTS[variant]
    )
    model, conversation, cache, kwargs = first_turn(config)
    with pytest.raises(
        ValueError, match=r"cache of \d+ tokens filled with another instance prompt.*source_mask"
    ):
        model.generate(input_ids=conversation, past_key_values=cache, max_new_tokens=3, **kwargs)


@pytest.mark.parametrize("variant", ["prefix_v2", *TURN_VARIANTS])
def test_a_first_turns_cache_continued_with_its_source_gives_what_no_cache_gives(variant):
    config = (
        METHODS["prefix_v2"]()
        if variant == "prefix_v2"
        else InstancePromptConfig(
            task_type="CAUSAL_LM", prompt_length=3, init_weights=False, **TURN_VARIANTS[variant]
        )
    )
    model, conversation, cache, kwargs = first_turn(config)
    source = {}
    if variant != "prefix_v2":
        source["source_mask"] = torch.zeros_like(conversation)
        source["source_mask"][:, :6] = 1  # the first turn's input, which the cache's prompt was built from
    with_cache = model.generate(
        input_ids=conversation, past_key_values=cache, max_new_tokens=3, **source, **kwargs
    )
    without = model.generate(input_ids=conversation, max_new_tokens=3, **source, **kwargs)
    assert torch.equal(with_cache.sequences, without.sequences)
    for step_cached, step_fresh in zip(with_cache.scores, without.scores, strict=True):
        assert torch.allclose(step_cached, step_fresh, atol=1e-5)


def test_the_hidden_source_refuses_to_generate_on_from_a_filled_cache():
    config = InstancePromptConfig(
        task_type="CAUSAL_LM", prompt_length=3, init_weights=False, instance_source="hidden"
    )
    model, conversation, cache, kwargs = first_turn(config)
    with pytest.raises(
        ValueError, match="instance_source='hidden' cannot generate on from a filled key/value cache"
    ):
        model.generate(input_ids=conversation, past_key_values=cache, max_new_tokens=3, **kwargs)


# -- encoder outputs carry the instance prompt too ------------------------------------------------------------
# A decoder called on encoder_outputs alone (a hand-written seq2seq loop) has no encoder input to build a prompt
# from: it takes the prompt of the encoder call that returned them, not that of whichever encoder call came last.


@pytest.mark.parametrize("variant", ["embeddings", "frozen_model", "input"])
def test_a_decoder_call_on_encoder_outputs_uses_their_prompt_whatever_ran_in_between(variant):
    """With injection='input' the encoder called alone returns its states at the caller's positions; the decoder
    called on them attends to the prompt's states too, as in the whole model (it missed them: 1.4 off on T5)."""
    torch.manual_seed(0)
    config = InstancePromptConfig(
        task_type="SEQ_2_SEQ_LM", prompt_length=3, init_weights=False, **dict(CONTINUED["bart"])[variant]
    )
    model = get_peft_model(tiny_model("bart", "SEQ_2_SEQ_LM"), config).eval()
    a, b, decoder = token_batch(2, 8, seed=1), token_batch(2, 8, seed=2), token_batch(2, 4, seed=3)
    with torch.no_grad():
        whole = model(input_ids=a, decoder_input_ids=decoder).logits
        encoded_a = model.get_encoder()(input_ids=a)
        model.get_encoder()(input_ids=b)  # another input's encoder call in between
        assert torch.equal(model(encoder_outputs=encoded_a, decoder_input_ids=decoder).logits, whole)


@pytest.mark.parametrize(
    "variant",
    [{}, {"instance_source": "frozen_model"}, {"instance_source": "hidden"}, {"injection": "input"}],
    ids=["embeddings", "frozen_model", "hidden", "input"],
)
@pytest.mark.parametrize("arch", ["bart", "t5"])
def test_generate_on_the_outputs_of_the_encoder_called_alone_decodes_as_from_the_input(arch, variant):
    """generate(encoder_outputs=...) skips the encoder: it decodes with the prompt those outputs were computed with.
    It refused ("the instance prompt needs input_ids"), and with an input-level prompt failed on a KeyError."""
    model, ids, mask = seq2seq_on_a_padded_batch(arch, **variant)
    kwargs = {"max_new_tokens": 4, "min_new_tokens": 4, "do_sample": False}
    kwargs |= {"output_logits": True, "return_dict_in_generate": True}
    expected = model.generate(input_ids=ids, attention_mask=mask, **kwargs)
    with torch.no_grad():
        encoded = model.get_encoder()(input_ids=ids, attention_mask=mask)
        model.get_encoder()(input_ids=token_batch(2, 7, seed=9))  # another input's encoder call in between
    generated = model.generate(encoder_outputs=encoded, attention_mask=mask, **kwargs)
    assert torch.equal(generated.sequences, expected.sequences)
    for step, reference in zip(generated.logits, expected.logits, strict=True):
        torch.testing.assert_close(step, reference, atol=1e-5, rtol=0)
    with model.disable_adapter():  # the bare model's encoder outputs carry no prompt, and need none
        bare = model.get_encoder()(input_ids=ids, attention_mask=mask)
        generated = model.generate(encoder_outputs=bare, attention_mask=mask, **kwargs)
        expected = model.generate(input_ids=ids, attention_mask=mask, **kwargs)
    assert torch.equal(generated.sequences, expected.sequences)


def test_encoder_outputs_rebuilt_from_their_tensors_are_refused_naming_what_to_pass():
    from transformers.modeling_outputs import BaseModelOutput

    torch.manual_seed(0)
    config = InstancePromptConfig(task_type="SEQ_2_SEQ_LM", prompt_length=3, init_weights=False)
    model = get_peft_model(tiny_model("bart", "SEQ_2_SEQ_LM"), config).eval()
    ids, decoder = token_batch(2, 8), token_batch(2, 4, seed=3)
    with torch.no_grad():
        hidden = model.get_encoder()(input_ids=ids).last_hidden_state
        for rebuilt in ((hidden,), BaseModelOutput(last_hidden_state=hidden)):
            with pytest.raises(
                ValueError, match="carry no instance prompt.*as it was returned, or input_ids along"
            ):
                model(encoder_outputs=rebuilt, decoder_input_ids=decoder)
        model(input_ids=ids, encoder_outputs=(hidden,), decoder_input_ids=decoder)  # with its input it runs


@pytest.mark.parametrize("injection", ["hybrid", "input"])
def test_a_cache_returned_in_a_tuple_carries_its_prompt_too(injection):
    torch.manual_seed(0)
    config = InstancePromptConfig(
        task_type="CAUSAL_LM", prompt_length=3, init_weights=False, injection=injection
    )
    model = get_peft_model(tiny_model("llama"), config).eval()
    ids = token_batch(2, 8)
    with torch.no_grad():
        as_tuple = model(input_ids=ids[:, :4], use_cache=True, return_dict=False)  # (logits, cache)
        continued_tuple = model(input_ids=ids[:, 4:], past_key_values=as_tuple[1], return_dict=False)[0]
        as_output = model(input_ids=ids[:, :4], use_cache=True)
        continued_output = model(input_ids=ids[:, 4:], past_key_values=as_output.past_key_values).logits
    assert torch.equal(continued_tuple, continued_output)


@pytest.mark.slow
@pytest.mark.parametrize("method", list(METHODS))
def test_generate_compiling_its_own_decoding_on_a_static_cache_generates_what_plain_generate_does(method):
    """With a static cache generate() compiles the model's forward itself (on GPUs by default; here on CPU through
    CompileConfig). The compiled decoding steps must keep each input's prompt: two batches, two prompts."""
    from transformers.generation.configuration_utils import CompileConfig

    model = build("llama", "sdpa", method)
    config = CompileConfig(backend="aot_eager")
    config._compile_all_devices = True  # generate() compiles on accelerators only, unless told
    torch._dynamo.reset()
    for seed in (1, 2):
        ids = token_batch(2, 6, seed=seed)
        kwargs = {
            "input_ids": ids,
            "attention_mask": torch.ones_like(ids),
            "max_new_tokens": 6,
            "do_sample": False,
        }
        plain = model.generate(**kwargs)
        compiled = model.generate(**kwargs, cache_implementation="static", compile_config=config)
        assert torch.equal(compiled, plain)
    assert hasattr(model.get_base_model(), "_compiled_call")  # the decoding steps did run compiled
    torch._dynamo.reset()


def llama_with(variant: str):
    """A tiny Llama with PrefixTuningV2 (``"prefix_v2"``) or IPT from one of IPT_VARIANTS' sources, in eval mode."""
    config = (
        METHODS["prefix_v2"]()
        if variant == "prefix_v2"
        else InstancePromptConfig(
            task_type="CAUSAL_LM", prompt_length=3, init_weights=False, **IPT_VARIANTS[variant]
        )
    )
    return get_peft_model(tiny_model("llama"), config).eval()


@pytest.mark.parametrize("variant", ["prefix_v2", "embeddings", "frozen_model"])
def test_chunked_prefill_generates_what_one_prefill_generates(variant):
    """transformers' prefill_chunk_size runs the prompt in pieces on one cache; the prompt built from the whole
    input once per generate() stays through every piece."""
    model = llama_with(variant)
    ids = token_batch(2, 9)
    kwargs = {"input_ids": ids, "max_new_tokens": 5, "do_sample": False, "pad_token_id": 0}
    kwargs |= {"output_scores": True, "return_dict_in_generate": True}
    whole, chunked = model.generate(**kwargs), model.generate(**kwargs, prefill_chunk_size=4)
    assert torch.equal(chunked.sequences, whole.sequences)
    for step_chunked, step_whole in zip(chunked.scores, whole.scores, strict=True):
        torch.testing.assert_close(step_chunked, step_whole, rtol=0, atol=1e-5)


@pytest.mark.parametrize("variant", ["input", "hidden"])
def test_prompts_that_chunked_prefill_would_change_refuse_it_naming_what_works(variant):
    """An input-level prompt generates from inputs_embeds, which transformers cannot chunk (a shape error inside
    it); the hidden-state source would build its prompt from the first chunk alone (7.8e-4 off on the first
    step's scores of a tiny Llama, silently). Both refuse, also when the model's generation_config sets it."""
    settings = {"injection": "input"} if variant == "input" else IPT_VARIANTS["hidden"]
    config = InstancePromptConfig(task_type="CAUSAL_LM", prompt_length=3, init_weights=False, **settings)
    model = get_peft_model(tiny_model("llama"), config).eval()
    kwargs = {"input_ids": token_batch(2, 9), "max_new_tokens": 3, "do_sample": False, "pad_token_id": 0}
    refusal = r"prefill_chunk_size=4 is refused\. Generate without it.*instance_source='embeddings'"
    with pytest.raises(ValueError, match=refusal):
        model.generate(**kwargs, prefill_chunk_size=4)
    model.get_base_model().generation_config.prefill_chunk_size = 4
    with pytest.raises(ValueError, match=refusal):
        model.generate(**kwargs)
    model.get_base_model().generation_config.prefill_chunk_size = None
    assert model.generate(**kwargs).shape == (2, 12)


def test_an_input_level_prompt_on_an_encoder_decoder_generates_chunked_as_whole():
    """There the prompt is the encoder's; the decoder's prefill may be chunked."""
    config = InstancePromptConfig(
        task_type="SEQ_2_SEQ_LM", prompt_length=3, init_weights=False, injection="input"
    )
    model = get_peft_model(tiny_model("bart", "SEQ_2_SEQ_LM"), config).eval()
    kwargs = {"input_ids": token_batch(2, 9), "max_new_tokens": 4, "do_sample": False}
    assert torch.equal(model.generate(**kwargs, prefill_chunk_size=2), model.generate(**kwargs))


@pytest.mark.parametrize("variant", ["prefix_v2", "embeddings", "frozen_model"])
def test_a_prefix_manual_decoding_loop_over_a_left_padded_batch_needs_no_position_ids(variant):
    """A rotary decoder gives a left-padded row its logits alone without position_ids, so a loop passes only the
    mask. A prefix's keys carry no position, so counted from the padding the rows' scores against them moved (a
    different first step on a tiny Llama); each row's positions are now counted from its first token, as generate()
    counts them, at the prefill and at every step."""
    model = llama_with(variant)
    move_trainable_weights(model)
    ids, prefill = loop_decodes_as_generate(model, pads=3)
    with torch.no_grad():
        alone = model(input_ids=ids[1:, 3:]).logits[0]
    torch.testing.assert_close(prefill.logits[1, 3:], alone, atol=1e-5, rtol=0)


@pytest.mark.parametrize("variant", ["prefix_v2", "embeddings"])
def test_a_row_padded_on_both_sides_gets_its_logits_alone_on_a_rotary_decoder(variant):
    """TRL's preference batches put left-padded prompts before right-padded completions: one run of tokens between
    padding. Its positions are counted from its first token too; a row with holes in its mask keeps transformers'."""
    model = llama_with(variant)
    move_trainable_weights(model)
    ids = token_batch(2, 9)
    mask = torch.ones_like(ids)
    mask[0, :3], mask[0, 7:] = 0, 0
    with torch.no_grad():
        both = model(input_ids=ids, attention_mask=mask).logits
        alone = model(input_ids=ids[:1, 3:7]).logits
        torch.testing.assert_close(both[0, 3:7], alone[0], atol=1e-5, rtol=0)
        torch.testing.assert_close(both[1], model(input_ids=ids[1:]).logits[0], atol=1e-5, rtol=0)
        holes = mask.clone()
        holes[1, 4] = 0
        numbered = torch.arange(9).expand(2, 9)
        given = model(input_ids=ids, attention_mask=holes, position_ids=numbered).logits
        torch.testing.assert_close(
            model(input_ids=ids, attention_mask=holes).logits[1], given[1], atol=1e-6, rtol=0
        )


@pytest.mark.parametrize(
    ("arch", "task", "config"),
    [
        ("bert", "QUESTION_ANS", lambda: InstancePromptConfig(task_type="QUESTION_ANS", prompt_length=3)),
        ("bert", "SEQ_CLS", lambda: PrefixTuningV2Config(task_type="SEQ_CLS", prefix_length=3)),
        ("llama", "CAUSAL_LM", lambda: InstancePromptConfig(task_type="CAUSAL_LM", prompt_length=3)),
        (
            "llama",
            "CAUSAL_LM",
            lambda: InstancePromptConfig(task_type="CAUSAL_LM", prompt_length=3, injection="input"),
        ),
        ("t5", "SEQ_2_SEQ_LM", lambda: InstancePromptConfig(task_type="SEQ_2_SEQ_LM", prompt_length=3)),
    ],
)
def test_our_calls_log_no_cache_name_deprecation(monkeypatch, arch, task, config):
    # transformers 5.25 renamed outputs' past_key_values to cache and logs a deprecation when the old name is read;
    # reading it to find a call's cache made every adapted call log it, as if the user's code used the old name.
    import transformers.utils.generic as generic

    logged = []
    monkeypatch.setattr(
        generic.logger, "warning_once", lambda message, *args, **kwargs: logged.append(message)
    )
    model = get_peft_model(tiny_model(arch, task), config()).eval()
    ids = token_batch(2, 6)
    with torch.no_grad():
        if task == "SEQ_2_SEQ_LM":
            model(input_ids=ids, decoder_input_ids=ids[:, :3])
            model.generate(input_ids=ids, max_new_tokens=3, do_sample=False)
        elif task == "CAUSAL_LM":
            model(input_ids=ids)
            model.generate(
                input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, do_sample=False
            )
        else:
            model(input_ids=ids)
    assert not [message for message in logged if "past_key_values" in str(message)]
