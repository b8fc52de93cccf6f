"""Inputs that often break prompt methods: rows that are all padding, sequences past the model's positions, and
non-finite values while training."""

from __future__ import annotations

import pytest
import torch
from conftest import lm_labels, tiny_model, token_batch
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


# -- sequences longer than the model's positions -------------------------------------------------------------
# The tiny models have learned positions for 128 tokens (BERT, GPT-2, BART; RoBERTa after its padding offset).


@pytest.mark.parametrize(
    ("arch", "task"), [("bert", "SEQ_CLS"), ("roberta", "TOKEN_CLS"), ("gpt2", "CAUSAL_LM")]
)
def test_an_input_longer_than_the_learned_positions_is_refused_with_the_length_to_cut_to(arch, task):
    model = get_peft_model(tiny_model(arch, task), PrefixTuningV2Config(task_type=task, prefix_length=8))
    with torch.no_grad():
        model(input_ids=token_batch(1, 128))  # the prefix takes no positions: all 128 remain usable
        with pytest.raises(ValueError, match=r"129 positions.*learned positions for 128.*max_length=128"):
            model(input_ids=token_batch(1, 129))


def test_an_input_prompt_counts_against_the_learned_positions():
    config = InstancePromptConfig(task_type="SEQ_CLS", injection="input", prompt_length=8)
    model = get_peft_model(tiny_model("bert", "SEQ_CLS"), config)
    with torch.no_grad():
        model(input_ids=token_batch(1, 120))
        with pytest.raises(ValueError, match=r"121 tokens \+ 8 prompt tokens.*max_length=120"):
            model(input_ids=token_batch(1, 121))


def test_a_decoder_input_longer_than_the_learned_positions_is_refused():
    model = get_peft_model(tiny_model("bart", "SEQ_2_SEQ_LM"), PrefixTuningV2Config(task_type="SEQ_2_SEQ_LM"))
    with torch.no_grad(), pytest.raises(ValueError, match="the decoder input takes 129 positions"):
        model(input_ids=token_batch(1, 8), decoder_input_ids=token_batch(1, 129))


def test_generate_refuses_a_prompt_longer_than_the_learned_positions():
    model = get_peft_model(tiny_model("gpt2"), PrefixTuningV2Config(task_type="CAUSAL_LM"))
    with pytest.raises(ValueError, match="learned positions for 128"):
        model.generate(input_ids=token_batch(1, 130), max_new_tokens=2)


@pytest.mark.parametrize("config_cls", [PrefixTuningV2Config, InstancePromptConfig])
def test_rotary_models_have_no_position_limit_to_check(config_cls):
    model = get_peft_model(tiny_model("llama"), config_cls(task_type="CAUSAL_LM"))
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=token_batch(1, 300)).logits).all()


# -- NaN / inf while training ---------------------------------------------------------------------------------


@pytest.mark.parametrize("config_cls", [PrefixTuningV2Config, InstancePromptConfig])
def test_a_non_finite_adapter_parameter_stops_training_naming_it(config_cls):
    model = get_peft_model(tiny_model("llama"), config_cls(task_type="CAUSAL_LM", init_weights=False))
    name, param = next((n, p) for n, p in model.base_model.prompt_modules["default"].named_parameters())
    with torch.no_grad():
        param.view(-1)[0] = float("nan")
    model.train()
    ids = token_batch()
    with pytest.raises(
        FloatingPointError, match=rf"NaN/inf.*its parameter {name} is non-finite.*learning rate"
    ):
        model(input_ids=ids, labels=lm_labels(ids))


def test_a_non_finite_input_to_the_instance_encoder_names_the_module_it_surfaced_in():
    config = InstancePromptConfig(task_type="CAUSAL_LM", instance_source="embeddings", init_weights=False)
    model = get_peft_model(tiny_model("llama"), config)
    ids = token_batch()
    with torch.no_grad():
        model.get_input_embeddings().weight[ids[0, 0]] = float(
            "inf"
        )  # the frozen embeddings the encoder reads
    model.train()
    with pytest.raises(
        FloatingPointError, match=r"adapter 'default', module \S+ \(its parameters are finite"
    ):
        model(input_ids=ids)  # no labels: every token is source, the infinite one included


def test_evaluation_does_not_check_for_non_finite_prefixes():
    model = get_peft_model(
        tiny_model("llama"), PrefixTuningV2Config(task_type="CAUSAL_LM", init_weights=False)
    )
    with torch.no_grad():
        next(iter(model.base_model.prompt_modules["default"].parameters())).view(-1)[0] = float("nan")
        model.eval()
        model(input_ids=token_batch())  # no host sync at inference: outputs are the caller's to check


def test_a_non_finite_value_outside_the_source_never_reaches_the_prompt():
    """Targets and padding are masked out of the instance signal by value, not only by weight: an infinite
    embedding there (0 * inf is NaN) must leave the prompt finite."""
    config = InstancePromptConfig(task_type="CAUSAL_LM", instance_source="embeddings", init_weights=False)
    model = get_peft_model(tiny_model("llama"), config)
    ids = token_batch()
    with torch.no_grad():
        model.get_input_embeddings().weight[ids[:, -1]] = float("inf")  # the last token: a target below
    labels = torch.full_like(ids, -100)
    labels[:, -1] = ids[:, -1]
    model.train()
    model(
        input_ids=ids, labels=labels
    )  # raises FloatingPointError if the target's inf leaked into the prompt
    assert all(torch.isfinite(keys).all() for keys, *_ in model.base_model._prefixes.values())


# -- a call that raised leaves nothing behind -------------------------------------------------------------------


def test_a_call_that_raised_leaves_no_trim_for_the_next_call():
    """An input-level prompt's call marks its outputs to be cut by P positions on the way out; one that raised
    inside the model once left the mark, and the next call as long as it plus P came back cut short."""
    config = InstancePromptConfig(task_type="CAUSAL_LM", prompt_length=3, injection="input")
    model = get_peft_model(tiny_model("llama"), config).eval()
    short, long = token_batch(2, 5), token_batch(2, 8, seed=3)  # 8 = 5 + P
    with torch.no_grad():
        with pytest.raises(ValueError):
            model(
                input_ids=short, labels=torch.zeros(2, 3, 4, dtype=torch.long)
            )  # the loss refuses these labels
        with model.disable_adapter():
            assert model(input_ids=long).logits.shape[1] == 8
        assert model(input_ids=long).logits.shape[1] == 8


@pytest.mark.parametrize("source", ["embeddings", "frozen_model", "token_table"])
def test_a_call_without_input_ids_or_inputs_embeds_is_refused_naming_what_to_pass(source):
    model = get_peft_model(
        tiny_model("llama"), InstancePromptConfig(task_type="CAUSAL_LM", instance_source=source)
    )
    with pytest.raises(ValueError, match=r"gave neither; pass input_ids \(or inputs_embeds\)"):
        model(attention_mask=torch.ones(2, 5, dtype=torch.long))
