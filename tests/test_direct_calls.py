"""Calling a submodule directly: the backbone, the encoder or the decoder compute their own prompts from their own
inputs (sentence embeddings, cached encoder outputs), and a call below them is refused, never given an earlier
call's prefixes."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model, token_batch
from peft import get_peft_model

from peft_ipt import InstancePromptConfig, PrefixTuningV2Config

CONFIGS = {
    "prefix_v2": lambda task: PrefixTuningV2Config(task_type=task, prefix_length=4, init_weights=False),
    "ipt": lambda task: InstancePromptConfig(task_type=task, prompt_length=4, init_weights=False),
    "ipt_frozen": lambda task: InstancePromptConfig(
        task_type=task, prompt_length=4, init_weights=False, instance_source="frozen_model"
    ),
    "ipt_input": lambda task: InstancePromptConfig(
        task_type=task, prompt_length=4, init_weights=False, injection="input"
    ),
}


def adapted(arch: str, task: str, method: str):
    return get_peft_model(tiny_model(arch, task), CONFIGS[method](task)).eval()


@pytest.mark.parametrize("method", list(CONFIGS))
@pytest.mark.parametrize("arch", ["bart", "t5"])
def test_a_direct_encoder_call_computes_its_own_prompts_before_and_after_other_calls(arch, method):
    model = adapted(arch, "SEQ_2_SEQ_LM", method)
    ids, other = token_batch(2, 7, seed=1), token_batch(3, 9, seed=5)
    encoder = model.get_base_model().get_encoder()
    with torch.no_grad():
        first = encoder(input_ids=ids).last_hidden_state  # before any full forward
        full = model(input_ids=ids, decoder_input_ids=token_batch(2, 4, seed=2), output_hidden_states=True)
        model(input_ids=other, decoder_input_ids=token_batch(3, 4, seed=2))  # another batch, another size
        after = encoder(input_ids=ids).last_hidden_state
        with model.disable_adapter():
            bare = encoder(input_ids=ids).last_hidden_state
    assert first.shape == (2, 7, bare.shape[-1])
    torch.testing.assert_close(first, full.encoder_last_hidden_state)
    torch.testing.assert_close(after, first)
    assert not torch.allclose(first, bare, atol=1e-4)  # the prompt is in it


@pytest.mark.parametrize("method", list(CONFIGS))
@pytest.mark.parametrize(
    ("arch", "task"), [("llama", "CAUSAL_LM"), ("gpt2", "CAUSAL_LM"), ("bert", "SEQ_CLS")]
)
def test_a_direct_backbone_call_gives_the_hidden_states_of_a_full_call(arch, task, method):
    model = adapted(arch, task, method)
    ids, other = token_batch(2, 7, seed=1), token_batch(3, 5, seed=5)
    backbone = model.get_base_model().base_model  # LlamaModel, GPT2Model, BertModel: sentence embeddings
    with torch.no_grad():
        first = backbone(input_ids=ids).last_hidden_state
        full = model(input_ids=ids, output_hidden_states=True).hidden_states[-1]
        model(input_ids=other)
        after = backbone(input_ids=ids).last_hidden_state
        with model.disable_adapter():
            bare = backbone(input_ids=ids).last_hidden_state
    torch.testing.assert_close(first, full)
    torch.testing.assert_close(after, first)
    assert not torch.allclose(first, bare, atol=1e-4)


@pytest.mark.parametrize("method", ["prefix_v2"])
def test_a_direct_decoder_call_of_a_task_prefix_matches_the_full_model(method):
    model = adapted("bart", "SEQ_2_SEQ_LM", method)
    ids, decoder_ids = token_batch(2, 7, seed=1), token_batch(2, 4, seed=2)
    inner = model.get_base_model()
    with torch.no_grad():
        full = model(input_ids=ids, decoder_input_ids=decoder_ids, output_hidden_states=True)
        encoded = inner.get_encoder()(input_ids=ids).last_hidden_state
        decoded = inner.get_decoder()(input_ids=decoder_ids, encoder_hidden_states=encoded).last_hidden_state
    torch.testing.assert_close(decoded, full.decoder_hidden_states[-1])


@pytest.mark.parametrize("method", ["ipt", "ipt_frozen"])
def test_a_direct_decoder_call_of_an_instance_prompt_is_refused(method):
    model = adapted("bart", "SEQ_2_SEQ_LM", method)
    ids = token_batch(2, 7, seed=1)
    inner = model.get_base_model()
    with torch.no_grad():
        model(input_ids=ids, decoder_input_ids=token_batch(2, 4, seed=2))
        encoded = inner.get_encoder()(input_ids=ids).last_hidden_state
        with pytest.raises(ValueError, match="the decoder of an encoder-decoder model was called on its own"):
            inner.get_decoder()(input_ids=token_batch(2, 4, seed=2), encoder_hidden_states=encoded)


@pytest.mark.parametrize("method", ["prefix_v2", "ipt"])
def test_a_layer_called_outside_the_model_is_refused_not_given_stale_prefixes(method):
    model = adapted("llama", "CAUSAL_LM", method)
    ids = token_batch(2, 7, seed=1)
    inner = model.get_base_model().model
    with torch.no_grad():
        model(input_ids=ids)  # leaves this call's prefixes behind
        hidden = inner.embed_tokens(ids)
        positions = inner.rotary_emb(hidden, torch.arange(7)[None])
        with pytest.raises(
            RuntimeError, match="ran outside a call of the model, its backbone, encoder or decoder"
        ):
            inner.layers[0](hidden, position_embeddings=positions, attention_mask=None)


def test_the_frozen_pass_of_the_instance_source_sees_no_prefix_and_keeps_the_mode():
    """instance_source='frozen_model' reads the backbone with every prefix off, in eval mode, without gradient."""
    model = adapted("bert", "SEQ_CLS", "ipt_frozen")
    module = model.base_model.prompt_modules["default"]
    seen = []
    model.get_base_model().bert.register_forward_hook(lambda m, a, out: seen.append(out.last_hidden_state))
    ids = token_batch(2, 7, seed=1)
    model.train()
    model(input_ids=ids)
    with model.disable_adapter(), torch.no_grad():
        bare = model.get_base_model().eval().bert(input_ids=ids).last_hidden_state
    model.train()
    frozen, adapted_states = seen[0], seen[1]
    torch.testing.assert_close(frozen, bare)  # no prefix, no dropout
    assert not frozen.requires_grad and adapted_states.requires_grad
    assert model.get_base_model().bert.training and module.training
