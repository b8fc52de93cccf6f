"""PrefixTuningV2 on every task type and architecture: the core mechanics, on tiny random models."""

from __future__ import annotations

import peft
import pytest
import torch
from conftest import lm_labels, tiny_model, token_batch
from packaging.version import Version
from peft import LoraConfig, PeftModel, get_peft_model

from peft_ipt import InstancePromptConfig, PrefixTuningV2Config

DECODER_ONLY_TASKS = ["CAUSAL_LM", "SEQ_CLS", "TOKEN_CLS", "QUESTION_ANS", "FEATURE_EXTRACTION"]
ENCODER_TASKS = ["SEQ_CLS", "TOKEN_CLS", "QUESTION_ANS", "FEATURE_EXTRACTION"]
COMBOS = (
    [(arch, task) for arch in ("gpt2", "llama") for task in DECODER_ONLY_TASKS]
    + [(arch, task) for arch in ("bert", "roberta") for task in ENCODER_TASKS]
    + [
        ("bart", "SEQ_2_SEQ_LM"),
        ("t5", "SEQ_2_SEQ_LM"),
        ("bart", "FEATURE_EXTRACTION"),
        ("t5", "FEATURE_EXTRACTION"),
    ]
)
HEADS = {
    "SEQ_CLS": ("score", "classifier"),
    "TOKEN_CLS": ("score", "classifier"),
    "QUESTION_ANS": ("qa_outputs",),
}


def model_inputs(arch: str, task: str, batch: int = 2, length: int = 7) -> dict:
    ids = token_batch(batch, length)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if arch in ("bart", "t5"):
        inputs["decoder_input_ids"] = token_batch(batch, 5, seed=3)
    return inputs


def main_output(output) -> torch.Tensor:
    for name in ("logits", "start_logits", "last_hidden_state"):
        if getattr(output, name, None) is not None:
            return getattr(output, name)
    raise AssertionError(f"no main output in {type(output).__name__}")


def prefix_model(arch="llama", task="CAUSAL_LM", attn="sdpa", seed=0, **config):
    config.setdefault("prefix_length", 4)
    return get_peft_model(
        tiny_model(arch, task, attn=attn, seed=seed), PrefixTuningV2Config(task_type=task, **config)
    )


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize(("arch", "task"), COMBOS)
def test_forward_backward_trains_only_the_prefix_and_the_task_head(arch, task, attn):
    base = tiny_model(arch, task, attn=attn)
    inputs = model_inputs(arch, task)
    with torch.no_grad():
        reference = main_output(base(**inputs))
    model = get_peft_model(base, PrefixTuningV2Config(task_type=task, prefix_length=4))
    model.train()
    output = main_output(model(**inputs))
    assert output.shape == reference.shape  # the prefix is keys/values only
    assert not torch.allclose(output, reference, atol=1e-4)  # and it does reach the output
    output.float().pow(2).mean().backward()
    with_grad = {
        name for name, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0
    }
    head_names = HEADS.get(task, ())
    assert any("prefix_v2_encoder" in name for name in with_grad)
    for name in with_grad:
        assert "prefix_v2_encoder" in name or any(
            f".{head}.modules_to_save" in name for head in head_names
        ), name
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert with_grad == trainable


def test_print_trainable_parameters_counts_the_prefix(capsys):
    model = prefix_model(reparameterize=False)
    model.print_trainable_parameters()
    # flat prefix: P * layers * 2 * kv_heads * head_dim = 4 * 2 * 2 * 2 * 8
    assert "trainable params: 256 " in capsys.readouterr().out


@pytest.mark.parametrize("arch", ["gpt2", "llama", "bart", "t5"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_generate_with_and_without_cache_and_a_manual_greedy_loop_agree(arch, attn):
    task = "SEQ_2_SEQ_LM" if arch in ("bart", "t5") else "CAUSAL_LM"
    model = prefix_model(arch, task, attn=attn, init_weights=False)
    ids = token_batch(2, 6)
    mask = torch.ones_like(ids)
    kwargs = {
        "input_ids": ids,
        "attention_mask": mask,
        "max_new_tokens": 6,
        "min_new_tokens": 6,
        "do_sample": False,
    }
    cached = model.generate(**kwargs)
    uncached = model.generate(**kwargs, use_cache=False)
    assert torch.equal(cached, uncached)
    # manual greedy loop through forward(), no cache; min_new_tokens forbids EOS, so forbid it here too
    eos = model.generation_config.eos_token_id
    eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)

    def next_token(logits):
        logits = logits[:, -1].clone()
        logits[:, [e for e in eos if e < logits.shape[-1]]] = float("-inf")
        return logits.argmax(-1, keepdim=True)

    with torch.no_grad():
        if task == "CAUSAL_LM":
            sequence = ids
            for _ in range(6):
                logits = model(input_ids=sequence, attention_mask=torch.ones_like(sequence)).logits
                sequence = torch.cat([sequence, next_token(logits)], dim=1)
        else:
            sequence = torch.full((2, 1), model.config.decoder_start_token_id)
            for _ in range(6):
                logits = model(input_ids=ids, attention_mask=mask, decoder_input_ids=sequence).logits
                sequence = torch.cat([sequence, next_token(logits)], dim=1)
    assert torch.equal(cached, sequence)


@pytest.mark.parametrize("arch", ["gpt2", "llama", "bart", "t5"])
def test_beam_search_runs_and_matches_with_and_without_cache(arch):
    task = "SEQ_2_SEQ_LM" if arch in ("bart", "t5") else "CAUSAL_LM"
    model = prefix_model(arch, task, init_weights=False)
    ids = token_batch(2, 6)
    kwargs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "max_new_tokens": 5, "num_beams": 3}
    beams = model.generate(**kwargs, num_return_sequences=2)
    assert beams.shape[0] == 4
    assert torch.equal(beams, model.generate(**kwargs, num_return_sequences=2, use_cache=False))


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_left_padded_batch_generates_what_each_prompt_generates_alone(arch):
    model = prefix_model(arch, init_weights=False)
    long, short = token_batch(1, 8, seed=4)[0], token_batch(1, 5, seed=5)[0]
    pad = model.config.pad_token_id
    batch = torch.stack([long, torch.cat([torch.full((3,), pad), short])])
    mask = torch.stack([torch.ones(8, dtype=torch.long), torch.tensor([0, 0, 0, 1, 1, 1, 1, 1])])
    together = model.generate(
        input_ids=batch, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=pad
    )
    for row, prompt in enumerate((long, short)):
        alone = model.generate(
            input_ids=prompt[None],
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            max_new_tokens=6,
            do_sample=False,
            pad_token_id=pad,
        )
        assert torch.equal(together[row, -6:], alone[0, -6:])


@pytest.mark.parametrize("arch", ["bart", "t5"])
def test_left_padded_seq2seq_batch_matches_single_examples(arch):
    model = prefix_model(arch, "SEQ_2_SEQ_LM", init_weights=False)
    long, short = token_batch(1, 8, seed=4)[0], token_batch(1, 5, seed=5)[0]
    pad = model.config.pad_token_id
    batch = torch.stack([long, torch.cat([short, torch.full((3,), pad)])])  # encoders pad on the right
    mask = (torch.arange(8)[None] < torch.tensor([[8], [5]])).long()
    together = model.generate(input_ids=batch, attention_mask=mask, max_new_tokens=5, do_sample=False)
    for row, prompt in enumerate((long, short)):
        alone = model.generate(
            input_ids=prompt[None],
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            max_new_tokens=5,
            do_sample=False,
        )
        assert torch.equal(together[row, : alone.shape[1]], alone[0])


# one architecture of each kind gradient checkpointing recomputes differently (decoder, encoder, encoder-decoder)
CHECKPOINTED = [
    ("llama", "CAUSAL_LM"),
    ("gpt2", "CAUSAL_LM"),
    ("bert", "SEQ_CLS"),
    ("bart", "SEQ_2_SEQ_LM"),
    ("t5", "SEQ_2_SEQ_LM"),
]


@pytest.mark.parametrize(("arch", "task"), CHECKPOINTED)
@pytest.mark.parametrize("reentrant", [False, True], ids=["non-reentrant", "reentrant"])
@pytest.mark.parametrize("dropout", [0.0, 0.3], ids=["no-dropout", "dropout"])
def test_gradient_checkpointing_gives_the_same_loss_and_gradients(arch, task, reentrant, dropout):
    results = []
    for checkpointing in (False, True):
        torch.manual_seed(0)  # the same dropout draws on both sides
        model = prefix_model(arch, task, init_weights=False, prefix_dropout=dropout)
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
            model.enable_input_require_grads()
        model.train()
        model.base_model.model.config.use_cache = False
        inputs = model_inputs(arch, task)
        labels = (
            torch.tensor([0, 2])
            if task == "SEQ_CLS"
            else inputs.get("decoder_input_ids", inputs["input_ids"])
        )
        with torch.random.fork_rng():
            torch.manual_seed(1)
            loss = model(**inputs, labels=labels).loss
            loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        results.append((loss.detach(), grads))
    (loss_a, grads_a), (loss_b, grads_b) = results
    torch.testing.assert_close(loss_a, loss_b)
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        assert grads_a[name].abs().sum() > 0, name
        torch.testing.assert_close(grads_a[name], grads_b[name], rtol=1e-4, atol=1e-6)


TWO_CALL_METHODS = {
    "prefix_v2_dropout": lambda task: PrefixTuningV2Config(
        task_type=task, prefix_length=4, init_weights=False, prefix_dropout=0.3
    ),
    "ipt": lambda task: InstancePromptConfig(task_type=task, prompt_length=4, init_weights=False),
    "ipt_dropout": lambda task: InstancePromptConfig(
        task_type=task, prompt_length=4, init_weights=False, prompt_dropout=0.3
    ),
    "ipt_frozen_model": lambda task: InstancePromptConfig(
        task_type=task, prompt_length=4, init_weights=False, instance_source="frozen_model"
    ),
}


def two_calls_then_backward(arch: str, task: str, method: str, checkpointing: str | None) -> dict:
    torch.manual_seed(0)
    model = get_peft_model(tiny_model(arch, task), TWO_CALL_METHODS[method](task))
    if checkpointing is not None:
        kwargs = {"use_reentrant": checkpointing == "reentrant"}
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        model.enable_input_require_grads()
    model.train()
    model.base_model.model.config.use_cache = False
    losses = []
    torch.manual_seed(1)  # the same dropout draws on both sides
    for seed in (1, 2):  # two inputs, two training calls, then one backward
        inputs = model_inputs(arch, task)
        inputs["input_ids"] = token_batch(2, 7, seed=seed)
        labels = (
            torch.tensor([0, 2])
            if task == "SEQ_CLS"
            else inputs.get("decoder_input_ids", inputs["input_ids"])
        )
        if task == "CAUSAL_LM":
            labels = lm_labels(labels)
        losses.append(model(**inputs, labels=labels).loss)
    (losses[0] + 3 * losses[1]).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize(("arch", "task"), CHECKPOINTED)
@pytest.mark.parametrize("checkpointing", ["reentrant", "non-reentrant"])
@pytest.mark.parametrize("method", list(TWO_CALL_METHODS))
def test_checkpointed_layers_recompute_with_their_own_calls_prompt_after_other_calls(
    arch, task, checkpointing, method
):
    """Two training calls before one backward (a contrastive loss, TRL's KTO): each recomputed layer once took the
    last call's prompt (inputs and dropout draws), so the first call's gradients were silently wrong."""
    expected = two_calls_then_backward(arch, task, method, None)
    got = two_calls_then_backward(arch, task, method, checkpointing)
    assert got.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-4, atol=1e-6)


def test_disable_adapter_gives_the_base_model_logits_exactly():
    base = tiny_model("llama")
    ids = token_batch()
    with torch.no_grad():
        reference = base(input_ids=ids).logits
    model = get_peft_model(base, PrefixTuningV2Config(task_type="CAUSAL_LM", prefix_length=4))
    with torch.no_grad():
        assert not torch.allclose(model(input_ids=ids).logits, reference)
        with model.disable_adapter():
            assert model.base_model.model.config._attn_implementation == "sdpa"
            assert torch.equal(model(input_ids=ids).logits, reference)
        assert not torch.allclose(model(input_ids=ids).logits, reference)


@pytest.mark.parametrize("config_class", [PrefixTuningV2Config, InstancePromptConfig])
@pytest.mark.parametrize("arch", ["bert", "llama"])
def test_disable_adapter_on_a_classifier_gives_the_base_model_and_its_own_head(config_class, arch):
    # peft 0.21.2's prompt-learning path raises UnboundLocalError here (a SEQ_CLS PeftModel has no
    # prepare_inputs_for_generation to swap); these methods go through the tuner path, as LoRA does
    base = tiny_model(arch, "SEQ_CLS", attn="eager")
    inputs = model_inputs(arch, "SEQ_CLS")
    with torch.no_grad():
        reference = base(**inputs).logits
    model = get_peft_model(base, config_class(task_type="SEQ_CLS", init_weights=False))
    head = next(
        m
        for n, m in model.named_modules()
        if n.endswith(("score", "classifier")) and hasattr(m, "modules_to_save")
    )
    with torch.no_grad():
        for weight in head.modules_to_save.parameters():  # the trained copy of the head moves too
            weight.add_(1.0)
        adapted = model(**inputs).logits
        with model.disable_adapter():
            assert torch.equal(model(**inputs).logits, reference)
        assert torch.equal(model(**inputs).logits, adapted)
    assert not torch.allclose(adapted, reference)


@pytest.mark.parametrize("config_class", [PrefixTuningV2Config, InstancePromptConfig])
@pytest.mark.parametrize(
    ("arch", "task"),
    [("gpt2", "CAUSAL_LM"), ("bart", "SEQ_2_SEQ_LM"), ("bert", "SEQ_CLS"), ("llama", "TOKEN_CLS")],
)
def test_unload_gives_back_the_base_model_as_it_was(config_class, arch, task):
    base = tiny_model(arch, task, attn="eager")
    inputs = model_inputs(arch, task)
    hooks = {name: (len(m._forward_pre_hooks), len(m._forward_hooks)) for name, m in base.named_modules()}
    with torch.no_grad():
        reference = main_output(base(**inputs))
    model = get_peft_model(base, config_class(task_type=task, init_weights=False))
    assert base.config._attn_implementation == "peft_ipt_eager"
    restored = model.unload()
    assert restored is base and restored.config._attn_implementation == "eager"
    assert not hasattr(restored, "peft_config")  # as LoRA's unload leaves it
    assert {
        name: (len(m._forward_pre_hooks), len(m._forward_hooks)) for name, m in base.named_modules()
    } == hooks
    with torch.no_grad():
        assert torch.equal(main_output(restored(**inputs)), reference)
    again = get_peft_model(restored, config_class(task_type=task, init_weights=False))  # a fresh adapter
    with torch.no_grad():
        assert not torch.allclose(main_output(again(**inputs)), reference, atol=1e-4)


def _unloaded_head_is_the_trained_copy(config) -> bool:
    """unload() on a BERT classifier whose head (modules_to_save) moved in training: True where the unloaded model
    keeps the trained copy, False where it gets its original head back."""
    base = tiny_model("bert", "SEQ_CLS", attn="eager")
    original = base.classifier.weight.detach().clone()
    model = get_peft_model(base, config)
    with torch.no_grad():
        model.base_model.model.classifier.modules_to_save["default"].weight.add_(1.0)  # as training moves it
    trained = model.base_model.model.classifier.modules_to_save["default"].weight.detach().clone()
    restored = model.unload()
    assert isinstance(restored.classifier, torch.nn.Linear)
    head = restored.classifier.weight
    assert torch.equal(head, trained) or torch.equal(head, original)
    return torch.equal(head, trained)


@pytest.mark.parametrize("config_class", [PrefixTuningV2Config, InstancePromptConfig])
def test_unload_treats_the_head_trained_beside_the_adapter_as_lora_does(config_class):
    """peft 0.21's unload() keeps the trained copy of a modules_to_save head; peft 0.22's gives the original head back
    (the trained copy stays only through merge_and_unload, which a prefix cannot do). Whichever the installed peft
    does for LoRA, these methods do."""
    lora = LoraConfig(task_type="SEQ_CLS", target_modules=["query"])
    expected = _unloaded_head_is_the_trained_copy(lora)
    assert _unloaded_head_is_the_trained_copy(config_class(task_type="SEQ_CLS")) == expected
    assert expected == (Version(peft.__version__) < Version("0.22"))  # the two behaviours this test has seen


def test_merge_and_unload_is_refused_with_the_reason():
    with pytest.raises(ValueError, match="cannot be merged"):
        prefix_model().merge_and_unload()


@pytest.mark.parametrize("config_class", [PrefixTuningV2Config, InstancePromptConfig])
def test_merge_adapter_is_refused_not_a_silent_no_op(config_class):
    model = get_peft_model(tiny_model("llama"), config_class(task_type="CAUSAL_LM", init_weights=False))
    with pytest.raises(ValueError, match="cannot be merged"):
        model.merge_adapter()
    with pytest.raises(ValueError, match="cannot be merged"):
        model.merge_and_unload()
    with pytest.raises(ValueError, match="add_weighted_adapter combines LoRA weight deltas"):
        model.add_weighted_adapter(["default"], [1.0], "combined")
    # peft's conversion to LoRA fits weight deltas, which a prefix is not: it must refuse, not return an empty LoRA
    from peft.tuners.lora.conversion import convert_to_lora

    assert model.supports_lora_conversion() is False
    with pytest.raises(TypeError, match="do not support LoRA conversion: .*PromptLayer"):
        convert_to_lora(model, rank=4)


@pytest.mark.parametrize(
    ("arch", "task"), [("llama", "CAUSAL_LM"), ("bert", "SEQ_CLS"), ("t5", "SEQ_2_SEQ_LM")]
)
def test_save_and_load_round_trip_gives_identical_logits_under_any_adapter_name(arch, task, tmp_path):
    model = prefix_model(arch, task, init_weights=False)
    inputs = model_inputs(arch, task)
    with torch.no_grad():
        expected = main_output(model(**inputs))
    model.save_pretrained(tmp_path)
    assert (tmp_path / "adapter_model.safetensors").exists()
    for name in ("default", "other"):
        loaded = PeftModel.from_pretrained(tiny_model(arch, task), tmp_path, adapter_name=name)
        with torch.no_grad():
            assert torch.equal(main_output(loaded(**inputs)), expected)


def test_auto_peft_model_loads_a_saved_adapter(tmp_path):
    from peft import AutoPeftModelForCausalLM

    base = tiny_model("llama")
    base.save_pretrained(tmp_path / "base")
    model = get_peft_model(
        base, PrefixTuningV2Config(task_type="CAUSAL_LM", prefix_length=4, init_weights=False)
    )
    model.peft_config["default"].base_model_name_or_path = str(tmp_path / "base")
    model.save_pretrained(tmp_path / "adapter")
    ids = token_batch()
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        loaded = AutoPeftModelForCausalLM.from_pretrained(tmp_path / "adapter")
        assert torch.equal(loaded(input_ids=ids).logits, expected)


def test_two_adapters_switch_and_delete():
    model = prefix_model(init_weights=False)
    model.add_adapter(
        "second", PrefixTuningV2Config(task_type="CAUSAL_LM", prefix_length=6, init_weights=False)
    )
    ids = token_batch()
    with torch.no_grad():
        first = model(input_ids=ids).logits
        model.set_adapter("second")
        second = model(input_ids=ids).logits
        assert not torch.allclose(first, second)
        model.set_adapter("default")
        assert torch.equal(model(input_ids=ids).logits, first)
        model.delete_adapter("second")
        assert "second" not in model.peft_config
        assert list(model.base_model.prompt_modules) == ["default"]
        assert torch.equal(model(input_ids=ids).logits, first)


def test_bf16_autocast_forward_and_generate_run():
    model = prefix_model(init_weights=False)
    ids = token_batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(input_ids=ids).logits
        generated = model.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, do_sample=False
        )
    assert torch.isfinite(logits.float()).all()
    assert generated.shape == (2, ids.shape[1] + 3)
    # the adapter's own parameters stay float32
    assert all(p.dtype == torch.float32 for p in model.base_model.prompt_modules.parameters())


def test_bf16_base_model_runs_with_float32_prefix_cast_at_use():
    base = tiny_model("llama").to(torch.bfloat16)
    model = get_peft_model(base, PrefixTuningV2Config(task_type="CAUSAL_LM", prefix_length=4))
    logits = model(input_ids=token_batch()).logits
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits.float()).all()
    assert all(p.dtype == torch.float32 for p in model.base_model.prompt_modules.parameters())


# -- encoder-decoder: three separately switchable prefixes --------------------------------------------------


@pytest.mark.parametrize("arch", ["bart", "t5"])
def test_seq2seq_has_encoder_decoder_and_cross_prefixes(arch):
    model = prefix_model(arch, "SEQ_2_SEQ_LM")
    assert set(model.base_model.prompt_modules["default"].tables) == {"encoder", "decoder", "cross"}


@pytest.mark.parametrize("arch", ["bart", "t5"])
@pytest.mark.parametrize("kind", ["encoder", "decoder", "cross"])
def test_each_seq2seq_prefix_alone_changes_what_it_should(arch, kind):
    inputs = model_inputs(arch, "SEQ_2_SEQ_LM")
    base = tiny_model(arch, "SEQ_2_SEQ_LM")
    with torch.no_grad():
        reference = base(**inputs, output_hidden_states=True)
    switches = {f"{k}_prefix": k == kind for k in ("encoder", "decoder", "cross")}
    model = get_peft_model(base, PrefixTuningV2Config(task_type="SEQ_2_SEQ_LM", prefix_length=4, **switches))
    assert set(model.base_model.prompt_modules["default"].tables) == {kind}
    with torch.no_grad():
        output = model(**inputs, output_hidden_states=True)
    encoder_changed = not torch.allclose(
        output.encoder_last_hidden_state, reference.encoder_last_hidden_state
    )
    assert encoder_changed == (kind == "encoder")
    assert not torch.allclose(output.logits, reference.logits)


def test_cross_prefix_on_a_decoder_only_model_is_refused():
    with pytest.raises(ValueError, match="cross_prefix=True, but the model has no cross attention"):
        get_peft_model(tiny_model("llama"), PrefixTuningV2Config(task_type="CAUSAL_LM", cross_prefix=True))


def test_layers_to_transform_limits_the_prefix_to_those_layers():
    model = prefix_model(layers_to_transform=[1], reparameterize=False)
    module = model.base_model.prompt_modules["default"]
    assert module.layer_slots == {"self": {1: 0}}
    assert module.tables["self"].weight.shape == (4, 1 * 2 * 2 * 8)
    with pytest.raises(ValueError, match=r"layers_to_transform=\[5\] names layer 5.*has 2 layers"):
        prefix_model(layers_to_transform=[5])


# -- folding the reparameterisation ---------------------------------------------------------------------------


def test_fold_keeps_outputs_and_the_folded_adapter_reloads_flat(tmp_path):
    model = prefix_model(init_weights=False)
    ids = token_batch()
    with torch.no_grad():
        before = model(input_ids=ids).logits
    model.fold()
    assert model.peft_config["default"].folded and not model.peft_config["default"].reparameterize
    assert not hasattr(model.base_model.prompt_modules["default"].tables["self"], "mlp")
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, before, rtol=1e-5, atol=1e-5)
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(tiny_model("llama"), tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, before, rtol=1e-5, atol=1e-5)
    # a folded adapter trains further as a flat prefix
    trainable = PeftModel.from_pretrained(tiny_model("llama"), tmp_path, is_trainable=True)
    trainable.train()
    trainable(input_ids=ids, labels=ids).loss.backward()
    assert trainable.base_model.prompt_modules["default"].tables["self"].weight.grad.abs().sum() > 0


def test_fold_makes_the_saved_adapter_smaller(tmp_path):
    model = prefix_model(encoder_hidden_size=64)
    model.save_pretrained(tmp_path / "mlp")
    model.fold()
    model.save_pretrained(tmp_path / "folded")
    size = lambda d: (tmp_path / d / "adapter_model.safetensors").stat().st_size  # noqa: E731
    assert size("folded") < size("mlp")


# -- initialisation from real words ---------------------------------------------------------------------------


@pytest.mark.parametrize("reparameterize", [False, True])
def test_vocab_initialisation_reproduces_the_models_own_keys_and_values(reparameterize, monkeypatch):
    token_ids = torch.tensor([5, 17, 42, 99])
    monkeypatch.setattr("peft_ipt.tuner.init_token_ids", lambda config, model, length: token_ids)
    config = PrefixTuningV2Config(
        task_type="CAUSAL_LM", prefix_length=4, prefix_init="vocab", reparameterize=reparameterize
    )
    model = get_peft_model(tiny_model("llama"), config)
    keys, values = model.base_model.prompt_modules["default"].prefixes(None)["self"]
    recorded = model.base_model.record_activations(token_ids)  # the frozen model's own keys/values, no prefix
    for layer in range(2):
        key, value = recorded[("self", layer)]
        torch.testing.assert_close(keys[layer, 0], key[0], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(values[layer, 0], value[0], rtol=1e-4, atol=1e-4)


def test_text_initialisation_needs_a_tokenizer_and_says_so():
    with pytest.raises(ValueError, match="prefix_init='text' needs prefix_init_text"):
        PrefixTuningV2Config(task_type="CAUSAL_LM", prefix_init="text")
    config = PrefixTuningV2Config(
        task_type="CAUSAL_LM",
        prefix_init="text",
        prefix_init_text="table-to-text:",
        tokenizer_name_or_path="/nonexistent",
    )
    with pytest.raises(ValueError, match="tokenizer_name_or_path"):
        get_peft_model(tiny_model("llama"), config)


# -- bad input ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("prefix_length", 0, r"prefix_length must be an integer >= 1 \(got 0\)"),
        ("encoder_hidden_size", -3, r"encoder_hidden_size must be an integer >= 1 \(got -3\)"),
        ("prefix_dropout", 1.5, r"prefix_dropout must be in \[0, 1\) \(got 1.5\)"),
        ("prefix_init", "words", r"prefix_init must be one of .* \(got 'words'\)"),
        ("layers_to_transform", [-1], r"layers_to_transform must be .* \(got \[-1\]\)"),
        ("cross_prefix", "yes", r"cross_prefix must be a bool \(got 'yes'\)"),
    ],
)
def test_invalid_config_values_are_rejected_naming_field_and_value(field, value, message):
    with pytest.raises(ValueError, match=message):
        PrefixTuningV2Config(task_type="CAUSAL_LM", **{field: value})


@pytest.mark.parametrize(
    ("config_cls", "name", "value", "fix"),
    [
        (PrefixTuningV2Config, "num_virtual_tokens", 8, "Use prefix_length"),
        (InstancePromptConfig, "num_virtual_tokens", 8, "Use prompt_length"),
        (PrefixTuningV2Config, "prefix_projection", True, "Use reparameterize"),
        (InstancePromptConfig, "prefix_projection", True, "Use task_prefix_hidden_size"),
        (InstancePromptConfig, "prompt_tuning_init", "TEXT", "Use prefix_init"),
        (PrefixTuningV2Config, "target_modules", ["q_proj"], "Use layers_to_transform"),
        (InstancePromptConfig, "num_layers", 4, "read from the model"),
    ],
)
def test_peft_field_names_are_refused_naming_ours(config_cls, name, value, fix):
    # A peft user's PrefixTuningConfig(num_virtual_tokens=...) habit: the bare dataclass error names no fix.
    with pytest.raises(TypeError) as info:
        config_cls(task_type="CAUSAL_LM", **{name: value})
    message = str(info.value)
    assert (
        f"{config_cls.__name__} has no field {name!r} (got {name}={value!r}); that is peft's name" in message
    )
    assert fix in message


@pytest.mark.parametrize(
    ("config_cls", "name", "fix"),
    [
        (PrefixTuningV2Config, "prompt_length", "Use prefix_length"),
        (InstancePromptConfig, "prefix_length", "Use prompt_length"),
        (InstancePromptConfig, "reparameterize", "Use task_prefix_hidden_size"),
        (PrefixTuningV2Config, "task_prefix_hidden_size", "Use reparameterize=True"),
        (InstancePromptConfig, "prefix_dropout", "Use prompt_dropout"),
        (PrefixTuningV2Config, "prompt_dropout", "Use prefix_dropout"),
    ],
)
def test_the_other_methods_field_names_are_refused_naming_ours(config_cls, name, fix):
    # Moving a config from one method to the other: the bare dataclass error names no fix.
    other = {InstancePromptConfig: "PrefixTuningV2Config", PrefixTuningV2Config: "InstancePromptConfig"}[
        config_cls
    ]
    with pytest.raises(TypeError) as info:
        config_cls(task_type="CAUSAL_LM", **{name: 8})
    message = str(info.value)
    assert (
        f"{config_cls.__name__} has no field {name!r} (got {name}=8); that is {other}'s name. {fix}"
        in message
    )


@pytest.mark.parametrize(
    "change",
    [
        {"num_hidden_layers": 3},
        {"hidden_size": 48, "intermediate_size": 64},
        {"num_key_value_heads": 4},
        {"vocab_size": 256},
    ],
    ids=["layers", "hidden", "kv_heads", "vocab"],
)
@pytest.mark.parametrize("method", ["prefix_v2", "ipt_token_table"])
def test_adapter_for_another_base_model_shape_is_refused_naming_both_shapes(tmp_path, change, method):
    if method == "prefix_v2":
        prefix_model().save_pretrained(tmp_path)
    else:
        config = InstancePromptConfig(task_type="CAUSAL_LM", instance_source="token_table")
        get_peft_model(tiny_model("llama"), config).save_pretrained(tmp_path)
    other = tiny_model("llama", **change)
    with pytest.raises(
        ValueError, match=r"built for a base model with shapes .* but the model has .*adapter .* vs model"
    ) as refused:
        PeftModel.from_pretrained(other, tmp_path)
    # only a change of heads, with hidden size, vocabulary and layers agreeing, may be transformers' layout change
    assert ("lays out its attention differently" in str(refused.value)) == (
        change == {"num_key_value_heads": 4}
    )


@pytest.mark.parametrize("method", ["prefix_v2", "ipt"])
def test_an_adapter_saved_after_resize_token_embeddings_reloads_on_the_resized_base(tmp_path, method):
    # new special tokens added after get_peft_model: the saved config must name the vocabulary the model has then
    config = (
        PrefixTuningV2Config(task_type="CAUSAL_LM", prefix_length=4)
        if method == "prefix_v2"
        else InstancePromptConfig(task_type="CAUSAL_LM", prompt_length=4)
    )
    model = get_peft_model(tiny_model("llama"), config)
    vocab = model.config.vocab_size
    torch.manual_seed(5)
    model.resize_token_embeddings(vocab + 8)
    ids = torch.cat([token_batch(), torch.full((2, 1), vocab + 3)], dim=1)  # reads a new token
    model.eval()
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    model.save_pretrained(tmp_path)
    saved = InstancePromptConfig if method == "ipt" else PrefixTuningV2Config
    assert saved.from_pretrained(tmp_path).base_model_shapes["vocab_size"] == vocab + 8

    base = tiny_model("llama")
    torch.manual_seed(5)
    base.resize_token_embeddings(vocab + 8)
    loaded = PeftModel.from_pretrained(base, tmp_path)
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, expected)
    with pytest.raises(ValueError, match=f"vocab_size: adapter {vocab + 8} vs model {vocab}"):
        PeftModel.from_pretrained(tiny_model("llama"), tmp_path)


@pytest.mark.parametrize(
    ("impl", "why"),
    [
        ("flash_attention_2", "flash-attention kernels take no per-layer key/value prefix"),
        ("flex_attention", "flex_attention's block mask is built over the model's own keys"),
    ],
)
def test_an_attention_without_prefixes_is_refused_at_get_peft_model_with_its_reason(impl, why):
    base = tiny_model("llama")
    base.config._attn_implementation = impl
    with pytest.raises(ValueError, match=rf"attn_implementation='{impl}' is not supported.*'sdpa'\. {why}"):
        get_peft_model(base, PrefixTuningV2Config(task_type="CAUSAL_LM"))


def test_a_model_without_attention_registry_is_refused_naming_the_architecture():
    class NotTransformers(torch.nn.Module):
        def forward(self, x):
            return x

    with pytest.raises(ValueError, match="NotTransformers is not a transformers PreTrainedModel"):
        get_peft_model(NotTransformers(), PrefixTuningV2Config(task_type="CAUSAL_LM"))
