"""Export to and import from peft's own PrefixTuning: same keys/values, and where the logits agree."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import peft
import pytest
import torch
import transformers
from conftest import AUTO, CONFIGS, tiny_model, token_batch
from peft import LoraConfig, PeftModel, PrefixTuningConfig, get_peft_model
from safetensors.torch import load_file
from transformers import SmolLM3Config

from peft_ipt import InstancePromptConfig, PrefixTuningV2Config
from peft_ipt.interop import export_to_peft_prefix_tuning, import_from_peft_prefix_tuning

TASKS = ["CAUSAL_LM", "SEQ_CLS", "TOKEN_CLS", "QUESTION_ANS", "FEATURE_EXTRACTION"]
P = 3


def nope_model(task: str = "CAUSAL_LM", seed: int = 0):
    """A Llama-style decoder (grouped-query attention) with no position information at all: NoPE on every layer.

    peft's PrefixTuning numbers the real tokens from P, ours from 0; on this model that cannot matter.
    """
    # conftest's tiny Llama, as SmolLM3 (a Llama that can switch rotary positions off per layer)
    llama = {
        k: v
        for k, v in CONFIGS["llama"]().to_diff_dict().items()
        if k not in ("model_type", "transformers_version")
    }
    config = SmolLM3Config(**llama, no_rope_layers=[0, 0], use_sliding_window=False)
    if task in ("SEQ_CLS", "TOKEN_CLS"):
        config.num_labels = 3
    torch.manual_seed(seed)
    return AUTO[task].from_config(config, attn_implementation="sdpa").eval()


def main_output(output) -> torch.Tensor:
    for name in ("logits", "start_logits", "last_hidden_state"):
        if getattr(output, name, None) is not None:
            return getattr(output, name)
    raise AssertionError(f"no main output in {type(output).__name__}")


def padded_batch() -> dict:
    """Two rows, the second left-padded by two tokens."""
    ids = token_batch(2, 6)
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    return {"input_ids": ids, "attention_mask": mask}


def ours(make, task="CAUSAL_LM", **config):
    config = {"prefix_length": P, "init_weights": False, "reparameterize": False, **config}
    return get_peft_model(make(task), PrefixTuningV2Config(task_type=task, **config))


def perturb_head(model) -> None:
    """Make the trained task head differ from a fresh one, so the tests see it travel with the adapter."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "modules_to_save" in name:
                param.add_(torch.randn_like(param))


def peft_run(model, **inputs):
    """A forward of peft's own PrefixTuning; skipped, with peft's reason, where peft itself cannot run the model
    (peft 0.21 refuses models without a past-key-values cache, e.g. encoders under transformers 5.24)."""
    try:
        return model(**inputs)
    except ValueError as error:
        if "does not support past key values" in str(error):
            pytest.skip(
                f"peft {peft.__version__}'s PrefixTuning cannot run {type(model.get_base_model()).__name__} "
                f"with transformers {transformers.__version__}: {error}"
            )
        raise


def peft_prefix(make, task="CAUSAL_LM", **config):
    """A plain peft PrefixTuning model with a random, non-trivial prefix."""
    model = get_peft_model(make(task), PrefixTuningConfig(task_type=task, num_virtual_tokens=P, **config))
    perturb_head(model)
    return model


# -- the layout: same numbers, same order ---------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_exported_prefix_gives_peft_the_same_keys_and_values_at_every_layer(arch, tmp_path):
    model = ours(lambda task: tiny_model(arch, task))
    export_to_peft_prefix_tuning(model, tmp_path)
    loaded = PeftModel.from_pretrained(tiny_model(arch), tmp_path)
    cache = loaded.get_prompt(batch_size=1)  # what peft feeds the model as past_key_values
    keys, values = model.base_model.prompt_modules["default"].prefixes(None)["self"]  # (L, 1, n_kv, P, hd)
    for layer in range(2):
        assert torch.equal(cache.layers[layer].keys, keys[layer])
        assert torch.equal(cache.layers[layer].values, values[layer])


def test_export_writes_a_standard_peft_folder_without_peft_ipt_fields(tmp_path):
    model = ours(nope_model, "SEQ_CLS")
    config = export_to_peft_prefix_tuning(model, tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["peft_type"] == "PREFIX_TUNING"
    assert saved["prefix_projection"] is False
    # grouped-query attention: peft's heads are the key/value heads
    assert (saved["num_layers"], saved["num_attention_heads"], saved["token_dim"]) == (2, 2, 16)
    assert not {"prefix_length", "base_model_shapes", "reparameterize"} & saved.keys()
    weights = load_file(tmp_path / "adapter_model.safetensors")
    assert weights["prompt_embeddings"].shape == (P, 2 * 2 * 16)
    assert set(weights) == {"prompt_embeddings", "base_model.score.weight"}
    assert config.num_virtual_tokens == P


# -- exact equality on a model without positions -------------------------------------------------------------


@pytest.mark.parametrize("task", TASKS)
def test_export_then_plain_peft_gives_equal_logits_on_a_position_free_model(task, tmp_path):
    model = ours(nope_model, task)
    perturb_head(model)
    batch = padded_batch()
    with torch.no_grad():
        expected = main_output(model(**batch))
    export_to_peft_prefix_tuning(model, tmp_path)
    loaded = PeftModel.from_pretrained(nope_model(task), tmp_path)
    with torch.no_grad():
        reference = main_output(nope_model(task)(**batch))
        output = main_output(peft_run(loaded, **batch))
    assert not torch.allclose(output, reference, atol=1e-4)  # the prefix (and head) did arrive
    assert torch.equal(output, expected)


@pytest.mark.parametrize("task", TASKS)
def test_import_from_peft_gives_equal_logits_on_a_position_free_model(task, tmp_path):
    theirs = peft_prefix(nope_model, task)
    theirs.save_pretrained(tmp_path)
    batch = padded_batch()
    with torch.no_grad():
        expected = main_output(peft_run(theirs, **batch))
    model = import_from_peft_prefix_tuning(nope_model(task), tmp_path)
    assert isinstance(model.peft_config["default"], PrefixTuningV2Config)
    assert model.peft_config["default"].reparameterize is False
    with torch.no_grad():
        assert torch.equal(main_output(model(**batch)), expected)


def test_import_of_a_peft_adapter_trained_with_prefix_projection_gives_equal_logits(tmp_path):
    # peft saves the keys/values its MLP computes, so a projected adapter imports as a flat one
    theirs = peft_prefix(nope_model, prefix_projection=True, encoder_hidden_size=24)
    theirs.save_pretrained(tmp_path)
    batch = padded_batch()
    with torch.no_grad():
        expected = peft_run(theirs, **batch).logits
        model = import_from_peft_prefix_tuning(nope_model(), tmp_path)
        torch.testing.assert_close(model(**batch).logits, expected, rtol=1e-5, atol=1e-6)


def test_an_exported_adapter_loads_in_a_process_that_never_imports_peft_ipt(tmp_path):
    base = nope_model()
    base.save_pretrained(tmp_path / "base")
    model = ours(nope_model)
    export_to_peft_prefix_tuning(model, tmp_path / "adapter")
    ids = token_batch(2, 6)
    script = textwrap.dedent(
        f"""
        import sys, torch
        from peft import PeftModel
        from transformers import AutoModelForCausalLM
        base = AutoModelForCausalLM.from_pretrained({str(tmp_path / "base")!r}, attn_implementation="sdpa")
        model = PeftModel.from_pretrained(base, {str(tmp_path / "adapter")!r}).eval()
        with torch.no_grad():
            logits = model(input_ids=torch.tensor({ids.tolist()})).logits
        assert "peft_ipt" not in sys.modules
        torch.save(logits, {str(tmp_path / "logits.pt")!r})
        """
    )
    subprocess.run(
        [sys.executable, "-c", script],
        check=True,
        env={"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PATH": ""},
    )
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    assert torch.equal(torch.load(tmp_path / "logits.pt"), expected)


# -- where they differ: peft numbers the real tokens from P ----------------------------------------------------


@pytest.mark.parametrize(
    ("arch", "task"), [("gpt2", "CAUSAL_LM"), ("llama", "CAUSAL_LM"), ("bert", "TOKEN_CLS")]
)
def test_on_positional_models_peft_equals_ours_with_positions_shifted_by_the_prefix_length(
    arch, task, tmp_path
):
    model = ours(lambda t: tiny_model(arch, t), task)
    export_to_peft_prefix_tuning(model, tmp_path)
    theirs = PeftModel.from_pretrained(tiny_model(arch, task), tmp_path)
    ids = token_batch(2, 6)
    positions = torch.arange(6).expand(2, -1)
    with torch.no_grad():
        peft_logits = peft_run(theirs, input_ids=ids).logits
        assert not torch.allclose(model(input_ids=ids, position_ids=positions).logits, peft_logits, atol=1e-4)
        assert torch.equal(model(input_ids=ids, position_ids=positions + P).logits, peft_logits)


@pytest.mark.parametrize("name", ["bloom", "mpt", "xglm", "gpt_neox_japanese", "gpt_neo"])
def test_import_onto_a_model_with_a_path_of_its_own_takes_peft_s_keys_and_values(name, tmp_path):
    """peft's PrefixTuning runs these models too; its adapters import onto the path the model takes (the import
    read the registry's sites, and refused Bloom, MPT, XGLM and GPT-NeoX-Japanese as having no attention)."""
    from test_architectures import decoder

    shapes = {"num_attention_heads": 4, "num_layers": 2, "token_dim": 32}  # where peft cannot read them
    theirs = get_peft_model(
        decoder(name), PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P, **shapes)
    )
    perturb_head(theirs)
    theirs.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "adapter_model.safetensors")["prompt_embeddings"]
    model = import_from_peft_prefix_tuning(decoder(name), tmp_path)
    assert torch.equal(model.base_model.prompt_modules["default"].tables["self"].weight, saved)
    if name in ("xglm", "gpt_neox_japanese"):  # positions on the input or rotary: peft numbers tokens from P
        ids = token_batch(2, 6)
        positions = torch.arange(6).expand(2, -1) + P
        with torch.no_grad():
            torch.testing.assert_close(
                model(input_ids=ids, position_ids=positions).logits, peft_run(theirs, input_ids=ids).logits
            )


# -- round trip and no side effects ------------------------------------------------------------------------------


def test_export_of_a_reparameterized_adapter_leaves_the_model_untouched(tmp_path):
    model = ours(lambda task: tiny_model("llama", task), reparameterize=True, encoder_hidden_size=16)
    table = model.base_model.prompt_modules["default"].tables["self"]
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    export_to_peft_prefix_tuning(model, tmp_path)
    assert table.reparameterized and model.peft_config["default"].reparameterize
    assert all(torch.equal(p, before[name]) for name, p in model.named_parameters())
    with torch.no_grad():
        assert torch.equal(load_file(tmp_path / "adapter_model.safetensors")["prompt_embeddings"], table())


def test_export_then_import_restores_the_same_prefix_and_logits_on_any_model(tmp_path):
    model = ours(
        lambda task: tiny_model("llama", task), "SEQ_CLS", reparameterize=True, encoder_hidden_size=16
    )
    perturb_head(model)
    batch = padded_batch()
    with torch.no_grad():
        expected = model(**batch).logits
    export_to_peft_prefix_tuning(model, tmp_path)
    back = import_from_peft_prefix_tuning(tiny_model("llama", "SEQ_CLS"), tmp_path, adapter_name="other")
    with torch.no_grad():
        torch.testing.assert_close(back(**batch).logits, expected, rtol=1e-5, atol=1e-6)
    assert not any(p.requires_grad for p in back.parameters())


def test_export_writes_the_named_adapter(tmp_path):
    model = ours(lambda task: tiny_model("llama", task))
    model.add_adapter(
        "second", PrefixTuningV2Config(task_type="CAUSAL_LM", prefix_length=5, init_weights=False)
    )
    export_to_peft_prefix_tuning(model, tmp_path, adapter_name="second")
    exported = load_file(tmp_path / "adapter_model.safetensors")["prompt_embeddings"]
    with torch.no_grad():
        assert torch.equal(exported, model.base_model.prompt_modules["second"].tables["self"]())


def test_import_with_is_trainable_trains_the_prefix(tmp_path):
    peft_prefix(nope_model).save_pretrained(tmp_path)
    model = import_from_peft_prefix_tuning(nope_model(), tmp_path, is_trainable=True)
    model.train()
    ids = token_batch(2, 6)
    model(input_ids=ids, labels=ids).loss.backward()
    weight = model.base_model.prompt_modules["default"].tables["self"].weight
    assert weight.requires_grad and weight.grad.abs().sum() > 0


# -- what cannot cross over ---------------------------------------------------------------------------------------


def test_export_refuses_a_layers_to_transform_subset(tmp_path):
    model = ours(lambda task: tiny_model("llama", task), layers_to_transform=[1])
    with pytest.raises(ValueError, match=r"layers_to_transform=\[1\].*every layer"):
        export_to_peft_prefix_tuning(model, tmp_path)


@pytest.mark.parametrize("switches", [{}, {"encoder_prefix": False, "cross_prefix": False}])
def test_export_refuses_encoder_decoder_prefixes(switches, tmp_path):
    model = ours(lambda task: tiny_model("bart", task), "SEQ_2_SEQ_LM", **switches)
    with pytest.raises(ValueError, match="encoder-decoder model"):
        export_to_peft_prefix_tuning(model, tmp_path)


def test_export_refuses_cross_attention_prefixes_of_a_decoder_only_model(tmp_path):
    model = ours(lambda task: tiny_model("gpt2", task, add_cross_attention=True))
    with pytest.raises(ValueError, match=r"prefixes on \['cross', 'self'\].*cross_prefix=False"):
        export_to_peft_prefix_tuning(model, tmp_path)


def test_export_refuses_instance_prompt_adapters_task_type_none_and_unknown_names(tmp_path):
    ipt = get_peft_model(tiny_model("llama"), InstancePromptConfig(task_type="CAUSAL_LM", prompt_length=2))
    with pytest.raises(ValueError, match="uses InstancePromptConfig; only PrefixTuningV2"):
        export_to_peft_prefix_tuning(ipt, tmp_path)
    untyped = get_peft_model(tiny_model("llama"), PrefixTuningV2Config(prefix_length=2))
    with pytest.raises(ValueError, match="task_type=None cannot be exported"):
        export_to_peft_prefix_tuning(untyped, tmp_path)
    with pytest.raises(
        ValueError, match=r"adapter_name='other' not found; available adapters: \['default'\]"
    ):
        export_to_peft_prefix_tuning(untyped, tmp_path, adapter_name="other")


def test_import_refuses_other_adapter_types_and_other_model_shapes(tmp_path):
    lora = get_peft_model(tiny_model("llama"), LoraConfig(task_type="CAUSAL_LM", target_modules=["q_proj"]))
    lora.save_pretrained(tmp_path / "lora")
    with pytest.raises(ValueError, match="holds a .*LORA.* adapter"):
        import_from_peft_prefix_tuning(tiny_model("llama"), tmp_path / "lora")
    peft_prefix(lambda task: tiny_model("llama", task)).save_pretrained(tmp_path / "prefix")
    other = tiny_model("llama", num_hidden_layers=3)
    with pytest.raises(
        ValueError, match=r"saved for \(layers, heads, token_dim\) = \(2, 2, 16\).*\(3, 2, 16\)"
    ):
        import_from_peft_prefix_tuning(other, tmp_path / "prefix")
    assert other.config._attn_implementation == "sdpa"  # refused before anything was installed
    bart = get_peft_model(
        tiny_model("bart", "SEQ_2_SEQ_LM"), PrefixTuningConfig(task_type="SEQ_2_SEQ_LM", num_virtual_tokens=P)
    )
    bart.save_pretrained(tmp_path / "bart")
    with pytest.raises(ValueError, match="encoder-decoder prefixes .* cannot be imported"):
        import_from_peft_prefix_tuning(tiny_model("bart", "SEQ_2_SEQ_LM"), tmp_path / "bart")
