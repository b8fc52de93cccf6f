"""The gaps of peft's built-in prefix tuning listed in DESIGN.md that the other test files do not already cover.

Covered elsewhere: gradient checkpointing, Llama generate(use_cache=False), encoder/cross prefixes for seq2seq and
the [CLS] position (test_prefix_tuning.py, test_instance_prompt.py), per-token output shapes with input prompts.
"""

from __future__ import annotations

import copy
import re

import pytest
import torch
from conftest import lm_labels, move_trainable_weights, tiny_model, token_batch
from peft import PeftModel, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from transformers.generation.continuous_batching.cache import PagedAttentionCache

from peft_ipt import InstancePromptConfig, PrefixTuningV2Config


@pytest.mark.parametrize("config_cls", [PrefixTuningV2Config, InstancePromptConfig])
def test_left_padded_forward_and_generate_see_the_same_logits(config_cls):
    """peft's PrefixTuning shifts absolute positions by the prefix, so forward and generate disagree there."""
    kwargs = {"prefix_length": 4} if config_cls is PrefixTuningV2Config else {"prompt_length": 4}
    model = get_peft_model(
        tiny_model("llama"), config_cls(task_type="CAUSAL_LM", init_weights=False, **kwargs)
    )
    pad = model.config.pad_token_id
    ids = torch.cat([torch.full((1, 3), pad), token_batch(1, 5)], dim=1)
    ids = torch.cat([ids, token_batch(1, 8, seed=9)])
    mask = (ids != pad).long()
    mask[1] = 1
    with torch.no_grad():
        position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
        forward = model(input_ids=ids, attention_mask=mask, position_ids=position_ids).logits[:, -1]
    generated = model.generate(
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=1,
        do_sample=False,
        output_scores=True,
        return_dict_in_generate=True,
        pad_token_id=pad,
    )
    torch.testing.assert_close(generated.scores[0], forward, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("config_cls", [PrefixTuningV2Config, InstancePromptConfig])
def test_a_loaded_adapter_trains_further_with_is_trainable(config_cls, tmp_path):
    model = get_peft_model(tiny_model("llama"), config_cls(task_type="CAUSAL_LM", init_weights=False))
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(tiny_model("llama"), tmp_path, is_trainable=True)
    trainable = [p for p in loaded.parameters() if p.requires_grad]
    assert trainable and all(p.dtype == torch.float32 for p in trainable)
    before = [p.detach().clone() for p in trainable]
    optimizer = torch.optim.SGD(trainable, lr=0.1)
    loaded.train()
    ids = token_batch()
    loaded(input_ids=ids, labels=lm_labels(ids)).loss.backward()
    optimizer.step()
    assert any(not torch.equal(a, b) for a, b in zip(before, trainable, strict=True))
    frozen = PeftModel.from_pretrained(tiny_model("llama"), tmp_path)
    assert not any(p.requires_grad for p in frozen.parameters())


LOW_MEMORY_CASES = [
    (PrefixTuningV2Config, "CAUSAL_LM", "llama"),
    (InstancePromptConfig, "CAUSAL_LM", "llama"),
    (InstancePromptConfig, "SEQ_CLS", "bert"),  # with the classifier head peft keeps beside the adapter
]


@pytest.mark.parametrize(("config_cls", "task", "arch"), LOW_MEMORY_CASES)
def test_low_cpu_mem_usage_loads_the_same_adapter(config_cls, task, arch, tmp_path):
    """peft's low_cpu_mem_usage=True: empty weights on the meta device, then the file's tensors assigned."""
    model = get_peft_model(tiny_model(arch, task), config_cls(task_type=task, init_weights=False)).eval()
    ids = token_batch()
    with torch.no_grad():
        reference = model(input_ids=ids).logits
    model.save_pretrained(tmp_path)

    loaded = PeftModel.from_pretrained(tiny_model(arch, task), tmp_path, low_cpu_mem_usage=True).eval()
    assert not any(p.is_meta for p in loaded.parameters())
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, reference)

    other = get_peft_model(tiny_model(arch, task), config_cls(task_type=task, init_weights=False)).eval()
    other.load_adapter(tmp_path, adapter_name="loaded", low_cpu_mem_usage=True)
    other.set_adapter("loaded")
    with torch.no_grad():
        assert torch.equal(other(input_ids=ids).logits, reference)


@pytest.mark.parametrize("config_cls", [PrefixTuningV2Config, InstancePromptConfig])
def test_an_adapter_created_empty_refuses_to_run_until_its_weights_are_loaded(config_cls, tmp_path):
    from peft import get_peft_model_state_dict, set_peft_model_state_dict

    trained = get_peft_model(
        tiny_model("llama"), config_cls(task_type="CAUSAL_LM", init_weights=False)
    ).eval()
    ids = token_batch()
    with torch.no_grad():
        reference = trained(input_ids=ids).logits
    empty = get_peft_model(
        tiny_model("llama"), config_cls(task_type="CAUSAL_LM"), low_cpu_mem_usage=True
    ).eval()
    assert all(p.is_meta for p in empty.parameters() if p.requires_grad)
    with pytest.raises(RuntimeError, match="has no weights yet: it was created with low_cpu_mem_usage=True"):
        empty(input_ids=ids)
    set_peft_model_state_dict(empty, get_peft_model_state_dict(trained), low_cpu_mem_usage=True)
    with torch.no_grad():
        assert torch.equal(empty(input_ids=ids).logits, reference)


def _trainable_adapters(model) -> set[str]:
    return {
        name.split(".prompt.")[1].split(".")[0]
        for name, p in model.named_parameters()
        if p.requires_grad and ".prompt." in name
    }


@pytest.mark.parametrize("config_cls", [PrefixTuningV2Config, InstancePromptConfig])
def test_set_requires_grad_trains_the_adapters_named(config_cls):
    model = get_peft_model(tiny_model("bert", "SEQ_CLS"), config_cls(task_type="SEQ_CLS"))
    model.add_adapter("other", config_cls(task_type="SEQ_CLS"))
    assert _trainable_adapters(model) == {"default"}
    model.set_requires_grad("other", requires_grad=True)
    assert _trainable_adapters(model) == {"default", "other"}
    head = model.base_model.model.classifier.modules_to_save
    assert all(p.requires_grad for p in head["other"].parameters())
    model.set_requires_grad(["default"], requires_grad=False)
    assert _trainable_adapters(model) == {"other"}
    with pytest.raises(ValueError, match="adapter 'nope' not found; available"):
        model.set_requires_grad("nope")


def test_set_requires_grad_keeps_a_frozen_token_table_frozen(tmp_path):
    from peft_ipt.instance_prompt.encoders import HashedTokenTable

    HashedTokenTable(64, 8).save(str(tmp_path / "table.safetensors"))
    config = InstancePromptConfig(
        task_type="CAUSAL_LM",
        instance_source="token_table",
        table_size=64,
        instance_rank=8,
        table_path=str(tmp_path / "table.safetensors"),
        freeze_table=True,
    )
    model = get_peft_model(tiny_model("llama"), config)
    model.set_requires_grad("default", requires_grad=True)
    table = model.base_model.prompt_modules["default"].table.weight
    assert not table.requires_grad
    assert _trainable_adapters(model) == {"default"}


@pytest.mark.parametrize("config_cls", [PrefixTuningV2Config, InstancePromptConfig])
def test_disable_input_dtype_casting_runs_the_same_model(config_cls):
    from peft.helpers import disable_input_dtype_casting

    model = get_peft_model(tiny_model("llama"), config_cls(task_type="CAUSAL_LM", init_weights=False)).eval()
    ids = token_batch()
    with torch.no_grad():
        reference = model(input_ids=ids).logits
        with disable_input_dtype_casting(model):
            assert torch.equal(model(input_ids=ids).logits, reference)


@pytest.mark.parametrize("config_cls", [PrefixTuningV2Config, InstancePromptConfig])
def test_inject_adapter_in_model_refuses_and_names_get_peft_model(config_cls):
    """peft's low-level API returns the bare model and drops the tuner, which holds these adapters' weights: the
    prompt would still change the outputs, but no optimizer or state dict of the returned model would see it."""
    from peft import inject_adapter_in_model

    model = tiny_model("gpt2")
    with pytest.raises(
        ValueError, match=r"PeftModel.from_pretrained.*AutoPeftModelForCausalLM.*get_peft_model"
    ):
        inject_adapter_in_model(config_cls(task_type="CAUSAL_LM"), model)
    # nothing was left behind: the model runs as before
    ids = token_batch()
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, tiny_model("gpt2")(input_ids=ids).logits)


@pytest.mark.parametrize("config_cls", [PrefixTuningV2Config, InstancePromptConfig])
def test_peft_prompt_learning_accessors_refuse_saying_the_prompt_is_computed_inside(config_cls):
    """PeftModel.get_prompt / get_prompt_embedding_to_save read .prompt_encoder, which only peft's prompt-learning
    methods have; the lookup fell through to the base model ("'LlamaForCausalLM' object has no attribute")."""
    model = get_peft_model(tiny_model("llama"), config_cls(task_type="CAUSAL_LM"))
    why = r"'prompt_encoder'.*peft's own prompt-learning methods.*inside the model's forward.*prompt_modules"
    with pytest.raises(AttributeError, match=why):
        model.get_prompt(batch_size=2)
    with pytest.raises(AttributeError, match=why):
        model.get_prompt_embedding_to_save("default")
    assert not hasattr(model, "prompt_tokens")
    # a base model with an attribute of that name (SAM's prompt encoder) still gives its own
    base = tiny_model("llama")
    base.prompt_encoder = torch.nn.Linear(2, 2)
    model = get_peft_model(base, config_cls(task_type="CAUSAL_LM"))
    assert model.base_model.prompt_encoder is base.prompt_encoder


@pytest.mark.parametrize("config_cls", [PrefixTuningV2Config, InstancePromptConfig])
def test_peft_status_and_base_state_dict_helpers_see_the_adapter(config_cls):
    """get_model_status / get_layer_status count the adapter; get/set_base_model_state_dict hold the base alone."""
    from peft import get_base_model_state_dict, set_base_model_state_dict

    model = get_peft_model(tiny_model("llama"), config_cls(task_type="CAUSAL_LM", init_weights=False)).eval()
    trainable, total = model.get_nb_trainable_parameters()
    status = model.get_model_status()
    assert (status.trainable_params, status.total_params) == (trainable, total) and trainable > 0
    assert status.peft_types == {
        "default": model.peft_config["default"].peft_type.name
    } and status.requires_grad == {"default": True}
    (layer,) = model.get_layer_status()
    assert layer.available_adapters == ["default"] and layer.enabled
    model.set_requires_grad("default", False)
    assert model.get_model_status().requires_grad == {"default": False}
    with model.disable_adapter():
        assert not model.get_model_status().enabled

    base_state = get_base_model_state_dict(model)
    assert base_state.keys() == tiny_model("llama").state_dict().keys()
    other = tiny_model("llama", seed=3)
    ids = token_batch()
    with torch.no_grad():
        before = model(input_ids=ids).logits
        set_base_model_state_dict(model, other.state_dict())
        after = model(input_ids=ids).logits
        fresh = get_peft_model(other, config_cls(task_type="CAUSAL_LM", init_weights=False))
        set_peft_model_state_dict(fresh, get_peft_model_state_dict(model))
        # the adapter kept its weights, the base took the new ones: the same outputs as the adapter on that base
        torch.testing.assert_close(after, fresh.eval()(input_ids=ids).logits)
    assert not torch.allclose(before, after)


@pytest.mark.parametrize(
    ("arch", "task"), [("llama", "CAUSAL_LM"), ("bert", "SEQ_CLS"), ("t5", "SEQ_2_SEQ_LM")]
)
@pytest.mark.parametrize("config_cls", [PrefixTuningV2Config, InstancePromptConfig])
def test_transformers_parameter_counts_include_the_adapter_as_loras_do(config_cls, arch, task):
    """num_parameters / get_memory_footprint reach the base model through PeftModel, which counts its own modules:
    LoRA's weights are among them, a prompt adapter's are not (peft's own prompt methods answer 0 trainable)."""
    from transformers import Trainer, TrainingArguments

    model = get_peft_model(tiny_model(arch, task), config_cls(task_type=task))
    trainable, total = model.get_nb_trainable_parameters()
    assert model.num_parameters(only_trainable=True) == trainable > 0
    assert model.num_parameters() == total == sum(p.numel() for p in model.parameters())
    tables = {
        id(m.weight): m.weight for m in model.modules() if isinstance(m, torch.nn.Embedding)
    }  # T5 shares one
    assert model.num_parameters(exclude_embeddings=True) == total - sum(w.numel() for w in tables.values())
    tensors = {id(t): t for t in [*model.parameters(), *model.buffers()]}.values()
    assert model.get_memory_footprint() == sum(t.numel() * t.element_size() for t in tensors)
    assert model.get_memory_footprint(return_buffers=False) == sum(
        p.numel() * p.element_size() for p in model.parameters()
    )
    # Trainer's FLOPs count: 6 x tokens x the non-embedding parameters, the adapter's among them
    trainer = Trainer(model=model, args=TrainingArguments("unused", report_to=[], use_cpu=True))
    ids = token_batch(2, 5)
    assert trainer.floating_point_ops({"input_ids": ids}) == 6 * ids.numel() * model.num_parameters(
        exclude_embeddings=True
    )
    model.set_requires_grad("default", False)
    assert model.num_parameters(only_trainable=True) == model.get_nb_trainable_parameters()[0]


def test_num_parameters_without_embeddings_leaves_ipts_token_table_out():
    config = InstancePromptConfig(task_type="CAUSAL_LM", instance_source="token_table", table_size=64)
    model = get_peft_model(tiny_model("llama"), config)
    table = model.base_model.prompt_modules["default"].table.weight
    base = model.get_base_model().num_parameters(exclude_embeddings=True)
    assert (
        model.num_parameters(exclude_embeddings=True)
        == base + model.get_nb_trainable_parameters()[0] - table.numel()
    )


@pytest.mark.parametrize("config_cls", [PrefixTuningV2Config, InstancePromptConfig])
def test_transformers_adapter_loading_refuses_naming_the_peft_loaders(config_cls, tmp_path):
    """transformers loads an adapter folder itself through peft's inject_adapter_in_model
    (AutoModelForCausalLM.from_pretrained(adapter_folder), model.load_adapter(path)). peft's own refusal there named
    get_peft_model only, which for a trained adapter gives a new, untrained one; the refusal names the loaders."""
    from transformers import AutoModelForCausalLM

    tiny_model("llama").save_pretrained(tmp_path / "base")
    kwargs = {"prefix_length": 4} if config_cls is PrefixTuningV2Config else {"prompt_length": 4}
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    model = get_peft_model(base, config_cls(task_type="CAUSAL_LM", init_weights=False, **kwargs))
    model.save_pretrained(tmp_path / "adapter")
    fix = r"PeftModel.from_pretrained\(base_model, path\) or AutoPeftModelForCausalLM"
    with pytest.raises(ValueError, match=fix):
        AutoModelForCausalLM.from_pretrained(tmp_path / "adapter")
    fresh = AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    with pytest.raises(ValueError, match=fix):
        fresh.load_adapter(str(tmp_path / "adapter"))
    # the loader the message names gives the trained adapter's logits
    ids = token_batch()
    loaded = PeftModel.from_pretrained(fresh, tmp_path / "adapter").eval()
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, model.eval()(input_ids=ids).logits)


# -- calls from several threads ----------------------------------------------------------------------------------
# A threaded web server may share one model between threads. LoRA is stateless there; a prompt computed per call
# is state, so a second thread's call while one runs (between two decoding steps, or inside a forward) is refused.


@pytest.mark.parametrize("during", ["generate", "forward"])
@pytest.mark.parametrize("config_cls", [PrefixTuningV2Config, InstancePromptConfig])
def test_a_second_threads_call_while_one_runs_is_refused_and_the_first_finishes_right(config_cls, during):
    import threading

    from transformers import LogitsProcessor, LogitsProcessorList

    model = get_peft_model(tiny_model("llama"), config_cls(task_type="CAUSAL_LM", init_weights=False)).eval()
    ids, other = token_batch(2, 6, seed=1), token_batch(2, 6, seed=2)
    kwargs = {"max_new_tokens": 4, "do_sample": False, "pad_token_id": 0}
    with torch.no_grad():
        expected = (
            model.generate(input_ids=ids, **kwargs) if during == "generate" else model(input_ids=ids).logits
        )
    started, resume, result, errors = threading.Event(), threading.Event(), {}, []

    def pause():
        if not started.is_set():
            started.set()
            resume.wait(timeout=30)

    class Pause(LogitsProcessor):
        def __call__(self, input_ids, scores):
            pause()
            return scores

    hook = None
    if during == "forward":  # paused inside the first decoder layer
        hook = model.get_base_model().model.layers[0].register_forward_hook(lambda *_: pause())

    def first():
        with torch.no_grad():
            if during == "generate":
                result["out"] = model.generate(
                    input_ids=ids, logits_processor=LogitsProcessorList([Pause()]), **kwargs
                )
            else:
                result["out"] = model(input_ids=ids).logits

    thread = threading.Thread(target=first)
    thread.start()
    assert started.wait(timeout=30)
    try:
        with torch.no_grad():
            model(input_ids=other)
    except RuntimeError as error:
        errors.append(str(error))
    finally:
        resume.set()
        thread.join(timeout=60)
        if hook is not None:
            hook.remove()
    assert errors and "called from a second thread" in errors[0] and "threading.Lock" in errors[0]
    assert torch.equal(result["out"], expected)  # the running call was left alone
    with torch.no_grad():
        model(input_ids=other)  # once it has finished, any thread may call


# -- a base model dispatched with device_map, a layer offloaded to disk (accelerate's big-model inference) --------


@pytest.mark.parametrize(
    "config",
    [
        PrefixTuningV2Config(task_type="CAUSAL_LM", prefix_length=3, init_weights=False),
        InstancePromptConfig(task_type="CAUSAL_LM", prompt_length=3, init_weights=False),
        InstancePromptConfig(
            task_type="CAUSAL_LM", prompt_length=3, init_weights=False, instance_source="frozen_model"
        ),
        InstancePromptConfig(task_type="CAUSAL_LM", prompt_length=3, init_weights=False, injection="input"),
    ],
    ids=["prefix_v2", "ipt", "ipt_frozen_model", "ipt_input"],
)
def test_an_adapter_on_a_base_with_a_layer_offloaded_to_disk_gives_the_in_memory_outputs(config, tmp_path):
    from transformers import AutoModelForCausalLM

    tiny_model("llama").save_pretrained(tmp_path / "base")
    torch.manual_seed(0)
    in_memory = get_peft_model(AutoModelForCausalLM.from_pretrained(tmp_path / "base"), config).eval()
    device_map = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk"}
    device_map |= {"model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"}
    dispatched = AutoModelForCausalLM.from_pretrained(
        tmp_path / "base", device_map=device_map, offload_folder=tmp_path / "offload"
    )
    assert dispatched.model.layers[1].self_attn.q_proj.weight.is_meta  # really offloaded
    # (PeftModel.from_pretrained re-dispatches a model with disk offload, which on a machine without a GPU fails
    # inside accelerate for LoRA too: "Cannot copy out of meta tensor"; so the weights are set directly.)
    offloaded = get_peft_model(dispatched, copy.deepcopy(config)).eval()
    set_peft_model_state_dict(offloaded, get_peft_model_state_dict(in_memory))
    ids = token_batch(2, 6)
    kwargs = {"max_new_tokens": 4, "do_sample": False, "pad_token_id": 0}
    with torch.no_grad():
        torch.testing.assert_close(offloaded(input_ids=ids).logits, in_memory(input_ids=ids).logits)
        assert torch.equal(
            offloaded.generate(input_ids=ids, **kwargs), in_memory.generate(input_ids=ids, **kwargs)
        )


# -- get_peft_model twice on one base model object ---------------------------------------------------------------


@pytest.mark.parametrize("second_cls", [PrefixTuningV2Config, InstancePromptConfig])
def test_a_second_get_peft_model_on_the_same_base_is_refused_and_leaves_the_first_alone(second_cls):
    base = tiny_model("llama")
    torch.manual_seed(0)
    first = get_peft_model(base, InstancePromptConfig(task_type="CAUSAL_LM", init_weights=False)).eval()
    ids = token_batch(2, 6)
    with torch.no_grad():
        before = first(input_ids=ids).logits
    with pytest.raises(
        ValueError, match=r"already carries a peft-ipt adapter.*add_adapter.*copy.deepcopy\(base\)"
    ):
        get_peft_model(base, second_cls(task_type="CAUSAL_LM", init_weights=False))
    assert type(first.peft_config["default"]) is InstancePromptConfig  # peft would have replaced it
    with torch.no_grad():
        assert torch.equal(first(input_ids=ids).logits, before)
    get_peft_model(
        first.unload(), second_cls(task_type="CAUSAL_LM")
    )  # after unload() the base takes a new one


# -- the attention implementation switched after get_peft_model; continuous batching ----------------------------


@pytest.mark.parametrize("config_cls", [PrefixTuningV2Config, InstancePromptConfig])
def test_set_attn_implementation_after_get_peft_model_keeps_every_layers_prefix(config_cls):
    """``model.set_attn_implementation("eager")`` replaced the name the layers look their attention up by, and every
    layer ran without its prefix: the bare model's logits, silently."""
    model = get_peft_model(tiny_model("llama"), config_cls(task_type="CAUSAL_LM", init_weights=False))
    ids = token_batch(2, 7)
    kwargs = {"max_new_tokens": 4, "do_sample": False, "pad_token_id": 0}
    with torch.no_grad():
        sdpa = model(input_ids=ids).logits
        tokens = model.generate(input_ids=ids, **kwargs)
        with model.disable_adapter():
            bare = model(input_ids=ids).logits
        assert (sdpa - bare).abs().max() > 1e-2
        model.set_attn_implementation("eager")
        torch.testing.assert_close(model(input_ids=ids).logits, sdpa, atol=1e-5, rtol=0)
        assert torch.equal(model.generate(input_ids=ids, **kwargs), tokens)
        model.set_attn_implementation("sdpa")
        torch.testing.assert_close(model(input_ids=ids).logits, sdpa, atol=1e-5, rtol=0)
        # chosen while the adapter is off: the bare model runs it, and the prefixes go through it once it is back on
        with model.disable_adapter():
            model.set_attn_implementation("eager")
            torch.testing.assert_close(model(input_ids=ids).logits, bare, atol=1e-5, rtol=0)
        torch.testing.assert_close(model(input_ids=ids).logits, sdpa, atol=1e-5, rtol=0)
        assert model.config._attn_implementation == "peft_ipt_eager"


@pytest.mark.parametrize("impl", ["flex_attention", "paged|eager"])
@pytest.mark.parametrize("config_cls", [PrefixTuningV2Config, InstancePromptConfig])
def test_an_attn_implementation_without_prefixes_set_after_get_peft_model_is_refused(config_cls, impl):
    model = get_peft_model(tiny_model("llama"), config_cls(task_type="CAUSAL_LM", init_weights=False))
    ids = token_batch(2, 7)
    with torch.no_grad():
        before = model(input_ids=ids).logits
        model.set_attn_implementation(impl)
        refused = rf"changed to '{re.escape(impl)}' after get_peft_model.*set_attn_implementation\('sdpa'\)"
        with pytest.raises(ValueError, match=refused):
            model(input_ids=ids)
        with pytest.raises(ValueError, match=refused):
            model.generate(input_ids=ids, max_new_tokens=2, pad_token_id=0)
        model.set_attn_implementation("sdpa")
        torch.testing.assert_close(model(input_ids=ids).logits, before, atol=1e-6, rtol=0)


@pytest.mark.parametrize("config_cls", [PrefixTuningV2Config, InstancePromptConfig])
def test_continuous_batching_is_refused_naming_generate(config_cls, monkeypatch):
    """transformers packs the requests of continuous batching into one row of a paged cache, where no request can
    have its own prefix; reached through the base model with its attention set to sdpa, it ran without them."""
    model = get_peft_model(tiny_model("llama"), config_cls(task_type="CAUSAL_LM"))
    for name in ("generate_batch", "init_continuous_batching", "continuous_batching_context_manager"):
        with pytest.raises(ValueError, match=r"continuous batching .* Use model.generate\(\)"):
            getattr(model, name)()
    # the batching loop's own forward calls, on its paged cache (built empty: the refusal comes first)
    paged = PagedAttentionCache.__new__(PagedAttentionCache)
    with pytest.raises(ValueError, match=r"continuous batching .* Use model.generate\(\)"):
        model.get_base_model()(input_ids=token_batch(1, 5), past_key_values=paged)
    monkeypatch.setattr(model.get_base_model(), "generate_batch", lambda *args, **kwargs: "the bare model's")
    with model.disable_adapter():
        assert model.generate_batch() == "the bare model's"


# -- padding-free batching: several sequences packed into one row ------------------------------------------------


def _packed_and_alone():
    from transformers import DataCollatorWithFlattening

    features = [{"input_ids": [5, 6, 7, 8, 12]}, {"input_ids": [9, 10, 11]}]
    return DataCollatorWithFlattening()(features), [torch.tensor([f["input_ids"]]) for f in features]


def test_prefix_v2_serves_packed_rows_as_their_sequences_alone():
    """DataCollatorWithFlattening (TRL's padding_free=True) packs sequences into one row with restarting
    position_ids; transformers then keeps each sequence to itself, and each sees the same prefix it sees alone."""
    model = get_peft_model(
        tiny_model("llama"), PrefixTuningV2Config(task_type="CAUSAL_LM", prefix_length=4, init_weights=False)
    ).eval()
    packed, alone = _packed_and_alone()
    with torch.no_grad():
        logits = model(**packed, use_cache=False).logits
        first, second = (model(input_ids=ids).logits for ids in alone)
    torch.testing.assert_close(logits[:, :5], first, rtol=0, atol=1e-5)
    torch.testing.assert_close(logits[:, 5:], second, rtol=0, atol=1e-5)
    with torch.no_grad(), model.disable_adapter():  # the prefix moved both sequences
        assert not torch.allclose(model(input_ids=alone[1]).logits, second, atol=1e-3)


@pytest.mark.parametrize(
    "variant",
    [{}, {"instance_source": "hidden"}, {"instance_source": "token_table"}, {"injection": "input"}],
    ids=["embeddings", "hidden", "token_table", "input"],
)
def test_instance_prompt_refuses_packed_rows_naming_padding_and_prefix_v2(variant):
    """An instance prompt is read from its whole row, so a packed row would give each sequence a prompt read from
    all of them (6e-4 off the sequence alone on this tiny Llama, before the refusal), with no error."""
    config = InstancePromptConfig(task_type="CAUSAL_LM", prompt_length=4, init_weights=False, **variant)
    model = get_peft_model(tiny_model("llama"), config).eval()
    packed, alone = _packed_and_alone()
    with pytest.raises(
        ValueError, match=r"packed into one row.*DataCollatorWithPadding.*PrefixTuningV2Config"
    ):
        model(**packed, use_cache=False)
    model.train()
    with pytest.raises(ValueError, match="packed into one row"):
        model(**packed, use_cache=False)
    model.eval()
    with torch.no_grad():  # the same positions with a mask are one sequence to transformers: served
        model(input_ids=packed["input_ids"], attention_mask=torch.ones_like(packed["input_ids"]))
        if (
            "injection" not in variant
        ):  # (an input-level prompt numbers the positions itself: refuses them all)
            model(
                input_ids=alone[0], position_ids=torch.arange(5)[None]
            )  # positions that count up: one sequence


def _block_diagonal(lengths: list[int], dtype: torch.dtype) -> torch.Tensor:
    """A (1, 1, T, T) mask keeping each packed sequence causal and to itself: bool, or additive in ``dtype``."""
    total = sum(lengths)
    keep = torch.zeros(total, total, dtype=torch.bool)
    start = 0
    for length in lengths:
        keep[start : start + length, start : start + length] = torch.ones(length, length).tril().bool()
        start += length
    if dtype == torch.bool:
        return keep[None, None]
    return torch.zeros(total, total, dtype=dtype).masked_fill(~keep, torch.finfo(dtype).min)[None, None]


@pytest.mark.parametrize(
    ("attn", "dtype"), [("sdpa", torch.bool), ("sdpa", torch.float32), ("eager", torch.float32)]
)
def test_prefix_v2_takes_a_4d_mask_over_packed_sequences(attn, dtype):
    """A custom 4-D mask (here block-diagonal over two packed sequences, with restarting positions): each sequence
    sees its own tokens and the prefix, as it does alone. (transformers' eager attention adds a bool 4-D mask as
    numbers, wrong without an adapter too, so eager takes the additive form.)"""
    model = get_peft_model(
        tiny_model("llama", attn=attn),
        PrefixTuningV2Config(task_type="CAUSAL_LM", prefix_length=4, init_weights=False),
    ).eval()
    first, second = token_batch(1, 4, seed=1), token_batch(1, 5, seed=2)
    positions = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 3, 4]])
    with torch.no_grad():
        packed = model(
            input_ids=torch.cat([first, second], 1),
            attention_mask=_block_diagonal([4, 5], dtype),
            position_ids=positions,
        ).logits
        torch.testing.assert_close(packed[:, :4], model(input_ids=first).logits, rtol=0, atol=1e-5)
        torch.testing.assert_close(packed[:, 4:], model(input_ids=second).logits, rtol=0, atol=1e-5)


@pytest.mark.parametrize("injection", ["hybrid", "input"])
def test_instance_prompt_refuses_a_4d_mask_naming_the_padding_mask(injection):
    """An instance prompt reads each row's input tokens from a (batch, length) mask; a 4-D one failed deep in
    torch ("The size of tensor a (2) must match the size of tensor b (6)")."""
    config = InstancePromptConfig(task_type="CAUSAL_LM", prompt_length=4, injection=injection)
    model = get_peft_model(tiny_model("llama"), config).eval()
    ids = token_batch(2, 6)
    mask = torch.ones(6, 6).tril().bool()[None, None].expand(2, 1, 6, 6)
    why = r"attention_mask has shape \(2, 1, 6, 6\).*\(batch, length\) padding mask.*PrefixTuningV2Config"
    with pytest.raises(ValueError, match=why):
        model(input_ids=ids, attention_mask=mask)
    with pytest.raises(ValueError, match=why):
        model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=2)
    with torch.no_grad():  # the padding mask is served
        model(input_ids=ids, attention_mask=torch.ones_like(ids))


@pytest.mark.parametrize(
    "arch, task, config",
    [
        (
            "llama",
            "CAUSAL_LM",
            PrefixTuningV2Config(task_type="CAUSAL_LM", prefix_length=4, init_weights=False),
        ),
        (
            "llama",
            "CAUSAL_LM",
            InstancePromptConfig(
                task_type="CAUSAL_LM", prompt_length=4, instance_source="frozen_model", init_weights=False
            ),
        ),
        ("bert", "SEQ_CLS", InstancePromptConfig(task_type="SEQ_CLS", prompt_length=4, init_weights=False)),
    ],
    ids=["prefix_v2_mlp", "ipt_frozen_model", "ipt_bert"],
)
def test_torch_export_runs_each_inputs_prompt_and_leaves_the_eager_model_as_it_was(arch, task, config):
    """torch.export of the adapted model (or of its base, the adapter inside) computes each input's prompt in the
    graph. Before, PrefixTuningV2 failed on its inference cache's parameter addresses (fake tensors have none), and
    the frozen-model source on its data-dependent cut; a prefix cached while tracing then reached eager calls."""
    model = get_peft_model(tiny_model(arch, task), config).eval()
    move_trainable_weights(model)  # a trained adapter moves the logits well above the tolerance
    traced, other = token_batch(2, 8), token_batch(2, 8, seed=5)
    mask = torch.ones_like(other)
    mask[:, 6:] = 0  # every row right-padded: the eager frozen pass is cut there, the exported one is not
    mask[0, 3:] = 0
    extra = {"use_cache": False} if task == "CAUSAL_LM" else {}
    with torch.no_grad():
        eager = model(input_ids=other, attention_mask=mask, **extra).logits
        for target in (model, model.get_base_model()):
            program = torch.export.export(
                target, (), {"input_ids": traced, "attention_mask": torch.ones_like(traced), **extra}
            )
            exported = program.module()(input_ids=other, attention_mask=mask, **extra)
            torch.testing.assert_close(exported["logits"], eager, rtol=1e-5, atol=1e-5)
        after = model(input_ids=other, attention_mask=mask, **extra).logits
        with model.disable_adapter():
            bare = model(input_ids=other, attention_mask=mask, **extra).logits
    assert type(after) is torch.Tensor
    assert torch.equal(after, eager)
    assert not torch.allclose(eager, bare, atol=1e-3)  # the prompt is in the graph, not left out
