"""Copies of a model with an adapter, as LoRA users make them: ``copy.deepcopy`` (an EMA copy, TRL's reference
model), a whole-model pickle (``torch.save(model)``), and a cast of the whole model to bf16. Each copy must run its
own adapter: never the original's prefixes, never an error about a call it did not make. And a model built from the
adapted model's config object, which has no adapter, runs as one without."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from conftest import lm_labels, tiny_model, token_batch
from peft import get_peft_model
from test_architectures import decoder, encoder

from peft_ipt import InstancePromptConfig, PrefixTuningV2Config

MODELS = {
    "llama": (lambda: tiny_model("llama"), "CAUSAL_LM"),
    "bart": (lambda: tiny_model("bart", "SEQ_2_SEQ_LM"), "SEQ_2_SEQ_LM"),
    "bert": (lambda: tiny_model("bert", "SEQ_CLS"), "SEQ_CLS"),
    "bloom": (lambda: decoder("bloom"), "CAUSAL_LM"),  # a path of its own: a hook on each attention module
    "deberta-v2": (lambda: encoder("deberta-v2"), "SEQ_CLS"),  # a path of its own: a forward per module
    "mpnet": (lambda: encoder("mpnet"), "SEQ_CLS"),  # the same door, its own attention
    # a hook per module whose door holds the model's rotary table (left-padded rows renumbered)
    "roformer": (lambda: encoder("roformer"), "SEQ_CLS"),
}
METHODS = {
    "prefix_v2": lambda task: PrefixTuningV2Config(task_type=task, prefix_length=3, init_weights=False),
    "ipt": lambda task: InstancePromptConfig(task_type=task, prompt_length=3, init_weights=False),
    "ipt_frozen": lambda task: InstancePromptConfig(
        task_type=task, prompt_length=3, init_weights=False, instance_source="frozen_model"
    ),
}
IDS = token_batch()


def build(name: str, method: str):
    make, task = MODELS[name]
    torch.manual_seed(0)
    return get_peft_model(make(), METHODS[method](task)).eval(), task


def logits(model, task: str) -> torch.Tensor:
    kwargs = {"input_ids": IDS}
    if task == "SEQ_2_SEQ_LM":
        kwargs["decoder_input_ids"] = IDS[:, :3]
    with torch.no_grad():
        return model(**kwargs).logits


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("name", list(MODELS))
def test_a_deep_copy_runs_its_own_adapter(name, method):
    model, task = build(name, method)
    uncalled = copy.deepcopy(model)  # before the first call: the first call's checks travel with the copy
    reference = logits(model, task)
    with model.disable_adapter():
        bare = logits(model, task)
    called = copy.deepcopy(model)
    assert torch.equal(logits(uncalled, task), reference)
    assert torch.equal(logits(called, task), reference)

    with torch.no_grad():  # the copy's adapter is its own: changing its prompts moves the copy alone
        for path, parameter in called.named_parameters():
            if parameter.requires_grad and "modules_to_save" not in path:  # the classifier head stays
                parameter.add_(0.5)
    assert not torch.allclose(logits(called, task), reference, atol=1e-4)
    assert torch.equal(logits(model, task), reference)

    restored = called.unload()  # and unloading the copy leaves the original's prefixes in place
    assert torch.equal(logits(restored, task), bare)
    assert torch.equal(logits(model, task), reference)


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("name", list(MODELS))
def test_a_pickled_model_loads_back_with_its_adapter(name, method):
    model, task = build(name, method)
    reference = logits(model, task)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert torch.equal(logits(loaded, task), reference)
    with torch.no_grad():
        next(p for p in loaded.parameters() if p.requires_grad).add_(0.5)
    assert torch.equal(logits(model, task), reference)


IPT_SOURCES = {
    "embeddings": {},
    "token_table": {"instance_source": "token_table"},
    "frozen_model": {"instance_source": "frozen_model"},
    "hidden": {"instance_source": "hidden"},
    "attention_encoder": {"instance_encoder": "attention"},
    "input": {"injection": "input"},
    "prefix_v2": None,
}


def _bf16_model(variant: str, **kwargs):
    torch.manual_seed(0)
    options = IPT_SOURCES[variant]
    config = (
        PrefixTuningV2Config(task_type="CAUSAL_LM", prefix_length=3, init_weights=False)
        if options is None
        else InstancePromptConfig(task_type="CAUSAL_LM", prompt_length=3, init_weights=False, **options)
    )
    return get_peft_model(tiny_model("llama"), config, **kwargs).eval()


def _pickled(model):
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


@pytest.mark.parametrize("when", ["after a training step", "after generate"])
@pytest.mark.parametrize("variant", [*IPT_SOURCES, "prefix_v2_mlp"])
def test_a_copy_made_between_training_steps_or_after_generate_runs_the_same_adapter(variant, when):
    """An EMA copy or TRL's reference model is made mid-training, or after sampling, as LoRA users make them: the
    last call's prompts then carry autograd history, which ``copy.deepcopy`` refuses. The copy must be made, and
    run what the original runs."""
    if variant == "prefix_v2_mlp":
        torch.manual_seed(0)
        config = PrefixTuningV2Config(
            task_type="CAUSAL_LM", prefix_length=3, reparameterize=True, init_weights=False
        )
        model = get_peft_model(tiny_model("llama"), config)
    else:
        model = _bf16_model(variant)
    if when == "after a training step":
        model.train()
        model(input_ids=IDS, labels=lm_labels(IDS)).loss.backward()
    else:
        model.eval()
        model.generate(input_ids=IDS, attention_mask=torch.ones_like(IDS), max_new_tokens=3, do_sample=False)
    copies = [copy.deepcopy(model), _pickled(model)]
    reference = logits(model.eval(), "CAUSAL_LM")
    for copied in copies:
        assert torch.equal(logits(copied.eval(), "CAUSAL_LM"), reference)


@pytest.mark.parametrize("variant", list(IPT_SOURCES))
def test_a_model_cast_to_bf16_as_a_whole_runs_close_to_float32(variant):
    model = _bf16_model(variant)
    reference = logits(model, "CAUSAL_LM")
    model.to(torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    cast = logits(model, "CAUSAL_LM")
    assert cast.dtype == torch.bfloat16
    assert torch.allclose(cast.float(), reference, atol=0.05)


@pytest.mark.parametrize("variant", list(IPT_SOURCES))
def test_adapters_in_the_base_models_dtype_train_in_bf16(variant):
    """autocast_adapter_dtype=False (peft's convention): the prompt modules take the base model's dtype."""
    torch.manual_seed(0)
    base = tiny_model("llama").to(torch.bfloat16)
    options = IPT_SOURCES[variant]
    config = (
        PrefixTuningV2Config(task_type="CAUSAL_LM", prefix_length=3, init_weights=False)
        if options is None
        else InstancePromptConfig(task_type="CAUSAL_LM", prompt_length=3, init_weights=False, **options)
    )
    model = get_peft_model(base, config, autocast_adapter_dtype=False)
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert {p.dtype for p in trainable} == {torch.bfloat16}
    model.train()
    loss = model(input_ids=IDS, labels=lm_labels(IDS)).loss
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in trainable)
    assert any(p.grad.abs().sum() > 0 for p in trainable)


@pytest.mark.parametrize("name", ["llama", "bart", "bert"])
def test_a_model_built_from_the_adapted_models_config_runs_without_an_adapter(name):
    """``AutoModelForCausalLM.from_config(peft_model.config)`` (a reference or teacher model): that config object
    names peft-ipt's attention, and the new model has no adapter. It runs the attention the config named before."""
    model, task = build(name, "ipt")
    reference = logits(model, task)
    base = model.get_base_model()
    torch.manual_seed(1)
    fresh = type(base)(base.config).eval()  # the same config object
    clean = type(base)(type(base.config).from_dict(base.config.to_dict())).eval()
    clean.set_attn_implementation(base.config._attn_implementation.removeprefix("peft_ipt_"))
    clean.load_state_dict(fresh.state_dict())
    assert torch.equal(logits(fresh, task), logits(clean, task))
    assert torch.equal(logits(model, task), reference)  # and the adapted model keeps its prefixes


def test_an_attention_module_added_after_get_peft_model_is_refused_not_run_without_its_prefix():
    model, task = build("llama", "prefix_v2")
    layer = model.get_base_model().model.layers[1]
    torch.manual_seed(2)
    layer.self_attn = type(layer.self_attn)(layer.self_attn.config, layer_idx=1)
    with pytest.raises(RuntimeError, match="LlamaAttention was not prepared for prefixes"):
        logits(model, task)
