"""Architectures whose attention transformers does not route through its registry (in the installed version): GPT-J,
CodeGen, Bloom, Falcon (rotary and ALiBi, multi-query and grouped), GPT-Neo (global and local layers),
GPT-NeoX-Japanese, MPT, XGLM, RoFormer, RemBERT and Megatron-BERT (as encoders and as decoders), DeBERTa, DeBERTa-v2,
MVP, FSMT, LED's decoder and MPNet; and encoders on the registry whose attention carries no is_causal mark (LayoutLM,
MarkupLM, Splinter). Each takes a path of
its own (peft_ipt.architectures); where a version moves a model type onto the registry, the registry path serves it
and these tests hold the same."""

from __future__ import annotations

import inspect
import json

import pytest
import torch
import transformers
from conftest import TINY_DECODER, VOCAB, move_trainable_weights, token_batch
from peft import PeftModel, get_peft_model
from test_mixed_batches import ROWS, assert_each_row_matches_alone, three_adapter_model
from transformers import (
    AutoModelForCausalLM,
    AutoModelForQuestionAnswering,
    AutoModelForSeq2SeqLM,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
    BigBirdConfig,
    BigBirdPegasusConfig,
    BloomConfig,
    CodeGenConfig,
    DebertaConfig,
    DebertaV2Config,
    DeepseekV3Config,
    DogeConfig,
    FalconConfig,
    Gemma3nTextConfig,
    Gemma4TextConfig,
    GPTJConfig,
    GPTNeoConfig,
    GPTNeoXJapaneseConfig,
    JetMoeConfig,
    LayoutLMConfig,
    LongT5Config,
    MambaConfig,
    MarkupLMConfig,
    MegatronBertConfig,
    MiMoV2FlashConfig,
    MPNetConfig,
    MptConfig,
    PegasusXConfig,
    RemBertConfig,
    RoFormerConfig,
    SplinterConfig,
    TapasConfig,
    XGLMConfig,
    XLNetConfig,
)

from peft_ipt import InstancePromptConfig, PrefixTuningV2Config
from peft_ipt.architectures import mpnet, supported_model_types
from peft_ipt.architectures.deberta import V1, V2, _attend
from peft_ipt.attention import SITE_ATTR, UnsupportedModelError

IDS = {"vocab_size": VOCAB, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}


def gemma4_text_config(global_head_dim: int = 16) -> Gemma4TextConfig:
    """Sliding layers with 2 key/value heads of size 8, global layers with 1 of ``global_head_dim`` (keys doubling
    as values); layers 2-3 reuse layers 0-1's keys/values (KV sharing), and the window (3) is shorter than the
    tests' inputs."""
    return Gemma4TextConfig(
        **TINY_DECODER,
        num_hidden_layers=4,
        head_dim=8,
        global_head_dim=global_head_dim,
        num_global_key_value_heads=1,
        attention_k_eq_v=True,
        num_kv_shared_layers=2,
        sliding_window=3,
        hidden_size_per_layer_input=8,
        vocab_size_per_layer_input=VOCAB,
        layer_types=["sliding_attention", "full_attention"] * 2,
        **{k: v for k, v in IDS.items() if k != "vocab_size"},
    )


# BERT's sizes, shrunk: the encoders below share them
BERT_SIZES = {
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "intermediate_size": 64,
    "max_position_embeddings": 64,
}
# BERT-like models whose one attention class serves encoders and (with is_decoder) decoders: RoFormer's rotary
# positions, RemBERT's narrower input embeddings, Megatron-BERT's pre-norm layers
BERT_LIKE = {
    "roformer": lambda: RoFormerConfig(**BERT_SIZES, embedding_size=32, **IDS),
    "rembert": lambda: RemBertConfig(**BERT_SIZES, input_embedding_size=16, output_embedding_size=16, **IDS),
    "megatron-bert": lambda: MegatronBertConfig(**BERT_SIZES, **IDS),
    # full attention: block-sparse attention (the config's default) is refused
    "big_bird": lambda: BigBirdConfig(**BERT_SIZES, attention_type="original_full", **IDS),
}


def as_decoder(build):
    def decoder_config():
        config = build()
        config.is_decoder = True
        return config

    return decoder_config


DECODERS = {
    "gptj": lambda: GPTJConfig(n_embd=32, n_layer=2, n_head=4, rotary_dim=4, n_positions=64, **IDS),
    "codegen": lambda: CodeGenConfig(n_embd=32, n_layer=2, n_head=4, rotary_dim=4, n_positions=64, **IDS),
    "bloom": lambda: BloomConfig(hidden_size=32, n_layer=2, n_head=4, **IDS),
    "falcon": lambda: FalconConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, **IDS),
    "falcon-alibi": lambda: FalconConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, alibi=True, **IDS
    ),
    "falcon-multi-query": lambda: FalconConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, multi_query=True, **IDS
    ),
    "falcon-grouped": lambda: FalconConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        new_decoder_architecture=True,
        num_kv_heads=2,
        **IDS,
    ),
    # a global and a local layer; the window (3) is shorter than the tests' inputs, so it cuts in
    "gpt_neo": lambda: GPTNeoConfig(
        hidden_size=32,
        num_layers=2,
        num_heads=4,
        attention_types=[[["global", "local"], 1]],
        window_size=3,
        max_position_embeddings=64,
        **IDS,
    ),
    "gpt_neox_japanese": lambda: GPTNeoXJapaneseConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_multiple_size=2,
        max_position_embeddings=64,
        **IDS,
    ),
    "mpt": lambda: MptConfig(d_model=32, n_layers=2, n_heads=4, max_seq_len=64, **IDS),
    # Gemma 4: prefixes of two shapes in one stack (see gemma4_text_config)
    "gemma4_text": lambda: gemma4_text_config(),
    # keys wider than values: DeepSeek's latent attention (keys 4 + 4, values 6; the released models 192 and 128)
    # and MiMo-V2-Flash (keys 8, values 6)
    "deepseek_v3": lambda: deepseek_v3(value_head_dim=6),
    "mimo_v2_flash": lambda: MiMoV2FlashConfig(
        **TINY_DECODER,
        num_hidden_layers=2,
        head_dim=8,
        v_head_dim=6,
        **{k: v for k, v in IDS.items() if k != "vocab_size"},
    ),
    "xglm": lambda: XGLMConfig(
        d_model=32, num_layers=2, attention_heads=4, ffn_dim=64, max_position_embeddings=64, **IDS
    ),
    **{f"{name}-decoder": as_decoder(build) for name, build in BERT_LIKE.items()},
    # attention under a dynamic mask computed from the values, without transformers' is_causal mark
    "doge": lambda: DogeConfig(
        **TINY_DECODER, num_hidden_layers=2, **{k: v for k, v in IDS.items() if k != "vocab_size"}
    ),
    # a mixture of attention heads that tiles its 2 key/value heads top_k = 2 times itself, before the attention
    # function (other models repeat them inside it)
    "jetmoe": lambda: JetMoeConfig(
        **TINY_DECODER,
        num_hidden_layers=2,
        kv_channels=8,
        num_local_experts=4,
        num_experts_per_tok=2,
        **{k: v for k, v in IDS.items() if k != "vocab_size"},
    ),
    # two latent attentions in each decoder layer (cache slots 2i and 2i + 1), named MLA: each takes a prefix of
    # its own; keys 4 + 4 wide, values 6
    "longcat_flash": lambda: transformers.LongcatFlashConfig(
        hidden_size=32,
        num_layers=2,
        num_attention_heads=4,
        q_lora_rank=16,
        kv_lora_rank=16,
        qk_nope_head_dim=4,
        qk_rope_head_dim=4,
        head_dim=4,
        v_head_dim=6,
        ffn_hidden_size=64,
        expert_ffn_hidden_size=32,
        n_routed_experts=4,
        zero_expert_num=2,
        moe_topk=2,
        max_position_embeddings=64,
        **IDS,
    ),
}
if hasattr(transformers, "Inkling2TextConfig"):  # transformers 5.25 has it, 5.20 not
    # Attention residuals call the attention function over each layer's block states (no tokens, no mask): they
    # take no prefix. A global layer between two sliding ones, with other key/value heads and sizes; relative
    # position biases and attention sinks.
    DECODERS["inkling2_text"] = lambda: transformers.Inkling2TextConfig(
        **TINY_DECODER | {"num_key_value_heads": 1},
        num_hidden_layers=3,
        head_dim=16,
        swa_num_attention_heads=4,
        swa_num_key_value_heads=2,
        swa_head_dim=8,
        sliding_window_size=3,
        layer_types=["hybrid_sliding", "hybrid", "hybrid_sliding"],
        n_layers_per_attn_res_block=2,
        n_routed_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=32,
        d_rel=4,
        unpadded_vocab_size=VOCAB,
        **{k: v for k, v in IDS.items() if k != "vocab_size"},
    )
ENCODERS = {
    "deberta": lambda: DebertaConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        relative_attention=True,
        pos_att_type=["c2p", "p2c"],
        max_relative_positions=16,
        **IDS,
    ),
    "deberta-v2": lambda: DebertaV2Config(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        relative_attention=True,
        pos_att_type=["c2p", "p2c"],
        max_relative_positions=16,
        position_buckets=8,
        **IDS,
    ),
}
DEBERTA = list(ENCODERS)
ENCODERS |= BERT_LIKE
# relative-position bias over (query, key): a prefix key gets none
ENCODERS["mpnet"] = lambda: MPNetConfig(**BERT_SIZES, **IDS)
ENCODERS |= {
    # table question answering; its attention as RemBERT's (the cache view), token types (B, T, 7)
    "tapas": lambda: TapasConfig(**BERT_SIZES, **IDS),
    # on the registry, but their attention has no is_causal mark (peft_ipt.attention.UNMARKED_ATTENTION)
    "layoutlm": lambda: LayoutLMConfig(**BERT_SIZES, **IDS),
    "markuplm": lambda: MarkupLMConfig(**BERT_SIZES, **IDS),
}
METHODS = {
    "prefix_v2": lambda task: PrefixTuningV2Config(task_type=task, prefix_length=3, init_weights=False),
    "ipt": lambda task: InstancePromptConfig(task_type=task, prompt_length=3, init_weights=False),
    "ipt_frozen": lambda task: InstancePromptConfig(
        task_type=task, prompt_length=3, init_weights=False, instance_source="frozen_model"
    ),
    "ipt_frozen_shallow": lambda task: InstancePromptConfig(
        task_type=task, prompt_length=3, init_weights=False, instance_source="frozen_model", frozen_layers=1
    ),
}


def decoder(name: str, attn: str = "eager", seed: int = 0, **config):
    settings = DECODERS[name]()
    for key, value in config.items():
        setattr(settings, key, value)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(settings, attn_implementation=attn).eval()


def encoder(name: str, seed: int = 0):
    config = ENCODERS[name]()
    config.num_labels = 3
    torch.manual_seed(seed)
    return AutoModelForSequenceClassification.from_config(config).eval()


def trainable_grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("name", list(DECODERS))
def test_a_decoder_prefix_changes_the_logits_trains_and_disables_exactly(name, method):
    base = decoder(name)
    ids = token_batch()
    with torch.no_grad():
        reference = base(input_ids=ids).logits
    model = get_peft_model(base, METHODS[method]("CAUSAL_LM"))
    model.train()
    logits = model(input_ids=ids).logits
    assert logits.shape == reference.shape and not torch.allclose(logits, reference, atol=1e-4)
    labels = ids.clone()
    labels[:, :4] = -100  # the source the instance prompt reads
    model(input_ids=ids, labels=labels).loss.backward()
    grads = trainable_grads(model)
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads.values())
    model.eval()
    with model.disable_adapter(), torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, reference)


@pytest.mark.parametrize("method", ["prefix_v2", "ipt"])
@pytest.mark.parametrize("name", list(DECODERS))
def test_a_decoder_generates_the_same_with_and_without_the_cache_and_as_a_manual_loop(name, method):
    model = get_peft_model(decoder(name), METHODS[method]("CAUSAL_LM")).eval()
    model.generation_config.eos_token_id = None  # a random model may end early; the manual loop does not
    ids = token_batch(2, 6)
    mask = torch.ones_like(ids)
    with torch.no_grad():
        cached = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False)
        uncached = model.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False, use_cache=False
        )
        manual = ids
        for _ in range(5):
            manual = torch.cat([manual, model(input_ids=manual).logits[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(cached, uncached) and torch.equal(cached, manual)


@pytest.mark.parametrize("method", ["prefix_v2", "ipt"])
@pytest.mark.parametrize("name", list(DECODERS))
def test_a_left_padded_decoder_batch_matches_each_row_alone(name, method):
    model = get_peft_model(decoder(name), METHODS[method]("CAUSAL_LM")).eval()
    model.generation_config.eos_token_id = None
    short, long = token_batch(1, 4, seed=2), token_batch(1, 7, seed=3)
    batch = torch.cat([torch.cat([torch.zeros(1, 3, dtype=torch.long), short], 1), long])
    mask = torch.cat(
        [torch.cat([torch.zeros(1, 3, dtype=torch.long), torch.ones(1, 4, dtype=torch.long)], 1)]
    )
    mask = torch.cat([mask, torch.ones(1, 7, dtype=torch.long)])
    kwargs = {"max_new_tokens": 4, "do_sample": False, "pad_token_id": 0}
    with torch.no_grad():
        together = model.generate(input_ids=batch, attention_mask=mask, **kwargs)
        alone = [
            model.generate(input_ids=row, attention_mask=torch.ones_like(row), **kwargs)
            for row in (short, long)
        ]
    assert torch.equal(together[0, 3:], alone[0][0]) and torch.equal(together[1], alone[1][0])


@pytest.mark.parametrize(
    "name",
    [
        "gptj",
        "codegen",
        "falcon",
        "falcon-grouped",
        "gpt_neo",
        "gpt_neox_japanese",
        "xglm",
        "rembert-decoder",
        "megatron-bert-decoder",
        "big_bird-decoder",
        "gemma4_text",
        "deepseek_v3",
        "mimo_v2_flash",
        "jetmoe",
        "longcat_flash",
    ],
)
def test_a_prefix_of_the_models_own_keys_and_values_acts_as_those_tokens_in_front(name):
    """The keys and values the model computes for P tokens, as a prefix, with the input's positions moved on by P,
    give exactly the logits of those P tokens put in front of the input: rotary decoders, and GPT-Neo and XGLM, whose
    positions are added to the input (GPT-Neo's and Gemma 4's local windows made wider than the input: a prefix has
    no position, so a window never drops it, where it would drop those tokens). Gemma 4's prefixes have two shapes,
    and its last two layers reuse the first two's keys and values."""
    windows = {"gpt_neo": {"window_size": 16}, "gemma4_text": {"sliding_window": 16}}
    shifted, reference, _ = own_words_as_prefix_and_in_front(
        decoder(name, **windows.get(name, {})), "CAUSAL_LM"
    )
    torch.testing.assert_close(shifted, reference, rtol=1e-4, atol=1e-5)


def own_words_as_prefix_and_in_front(base, task: str) -> tuple[torch.Tensor, ...]:
    """The logits of 6 tokens at positions 3-8: with the model's own keys and values of 3 words as the prefix; with
    those words in front instead (no adapter); and alone (no adapter)."""
    model = get_peft_model(base, PrefixTuningV2Config(task_type=task, prefix_length=3, reparameterize=False))
    words, ids = token_batch(1, 3, seed=4), token_batch(1, 6, seed=5)
    tuner = model.base_model
    tuner.prompt_modules["default"].set_prefix(tuner.record_activations(words[0]))
    with torch.no_grad():
        shifted = model(input_ids=ids, position_ids=torch.arange(3, 9)[None]).logits
        with model.disable_adapter():
            reference = model(input_ids=torch.cat([words, ids], 1)).logits[:, 3:]
            bare = model(input_ids=ids, position_ids=torch.arange(3, 9)[None]).logits
    return shifted, reference, bare


def padded_forward(model, rows: list[torch.Tensor], **kwargs) -> list[torch.Tensor]:
    """Each row's logits from one left-padded batch, positions counted from its first token where the model takes
    positions."""
    width = max(len(row) for row in rows)
    ids = torch.stack([torch.cat([torch.zeros(width - len(r), dtype=torch.long), r]) for r in rows])
    mask = torch.stack([torch.arange(width) >= width - len(r) for r in rows]).long()
    if "position_ids" in inspect.signature(model.get_base_model().forward).parameters:
        kwargs["position_ids"] = (mask.cumsum(-1) - 1).clamp(min=0)
    logits = model(input_ids=ids, attention_mask=mask, **kwargs).logits
    return [logits[i, width - len(r) :] for i, r in enumerate(rows)]


@pytest.mark.parametrize("method", ["prefix_v2", "ipt"])
@pytest.mark.parametrize("name", list(DECODERS))
def test_a_left_padded_rows_logits_are_its_logits_alone(name, method):
    """Past GPT-Neo's local window (3) and MPT's ALiBi, which both place keys by their index: a prefix placed by
    index would move with the padding in front of a row."""
    model = get_peft_model(decoder(name), METHODS[method]("CAUSAL_LM")).eval()
    short, long = token_batch(1, 5, seed=2)[0], token_batch(1, 9, seed=3)[0]
    with torch.no_grad():
        together = padded_forward(model, [short, long])
        for row, logits in zip((short, long), together, strict=True):
            torch.testing.assert_close(logits, padded_forward(model, [row])[0], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("method", ["prefix_v2", "ipt"])
@pytest.mark.parametrize("name", list(DECODERS))
def test_without_position_ids_a_left_padded_row_gets_its_logits_alone_wherever_the_bare_model_gives_them(
    name, method
):
    """Rotary and ALiBi decoders give a left-padded row its logits alone without position_ids (positions enter
    attention as differences), as LoRA keeps them; with a prefix, whose keys carry no position, rotary ones did not
    (their positions were counted from the padding). Decoders with learned absolute positions (GPT-Neo, XGLM) need
    position_ids with or without an adapter, as do RemBERT, Megatron-BERT and BigBird."""
    model = get_peft_model(decoder(name), METHODS[method]("CAUSAL_LM")).eval()
    move_trainable_weights(model)
    short, long = token_batch(1, 5, seed=2)[0], token_batch(1, 9, seed=3)[0]
    ids = torch.stack([torch.cat([torch.zeros(4, dtype=torch.long), short]), long])
    mask = torch.stack([torch.arange(9) >= 4, torch.ones(9, dtype=torch.bool)]).long()
    with torch.no_grad():
        padded, alone = (
            model(input_ids=ids, attention_mask=mask).logits[0, 4:],
            model(input_ids=short[None]).logits[0],
        )
        with model.disable_adapter():
            bare = model(input_ids=ids, attention_mask=mask).logits[0, 4:]
            bare_alone = model(input_ids=short[None]).logits[0]
    bare_keeps_them = torch.allclose(bare, bare_alone, atol=1e-5)
    absolute = ("gpt_neo", "xglm", "rembert-decoder", "megatron-bert-decoder", "big_bird-decoder")
    assert bare_keeps_them == (name not in absolute)
    assert torch.allclose(padded, alone, atol=1e-5) == bare_keeps_them
    assert not torch.allclose(padded, bare, atol=1e-3)  # the adapter is in the call


def test_gpt_neo_local_layers_see_the_prefix_from_every_query():
    model = get_peft_model(decoder("gpt_neo"), METHODS["prefix_v2"]("CAUSAL_LM")).eval()
    assert model.get_base_model().config.attention_layers == ["global", "local"]
    table = model.get_base_model().transformer.h[1].attn.attention.bias
    with torch.no_grad():
        attentions = model(input_ids=token_batch(1, 9), output_attentions=True).attentions
        # the local layer: prefix columns seen by every query; of its own keys, the last 3 (the window) at most
        local = attentions[1][0]  # (heads, queries, 3 prefix + 9 keys)
        assert (local[..., :3] > 0).all()
        assert (local[:, 4:, 3:4] == 0).all() and (local[:, -1, -3:] > 0).all()
        with model.disable_adapter():
            assert model(input_ids=token_batch(1, 9), output_attentions=True).attentions[1].shape[-1] == 9
    assert model.get_base_model().transformer.h[1].attn.attention.bias is table  # its own table, put back


def test_xglm_with_cross_attention_prefixes_its_self_attention_only():
    """Its cache is then an encoder-decoder cache, whose self-attention half the prefix's view wraps. (transformers'
    own cached and uncached generate() differ in the last digits here, so the steps are checked one by one.)"""
    model = get_peft_model(
        decoder("xglm", add_cross_attention=True), METHODS["prefix_v2"]("CAUSAL_LM")
    ).eval()
    layer = model.get_base_model().model.layers[0]
    assert SITE_ATTR in layer.self_attn.__dict__ and SITE_ATTR not in layer.encoder_attn.__dict__
    assert_a_cached_step_over_a_memory_equals_the_whole_call(model)


def assert_a_cached_step_over_a_memory_equals_the_whole_call(model) -> None:
    """Over an encoder's states (4 of width 32): 4 tokens then 2 through the cache give the logits of the 6 at once,
    the cache holds the tokens alone, and the adapter moves the logits."""
    ids, memory = token_batch(2, 6), torch.randn(2, 4, 32)
    # transformers 5.24 renamed past_key_values to cache
    name = (
        "cache"
        if "cache" in inspect.signature(model.get_base_model().forward).parameters
        else "past_key_values"
    )
    with torch.no_grad():
        first = model(input_ids=ids[:, :4], encoder_hidden_states=memory, use_cache=True)
        cache = getattr(first, name)
        step = model(input_ids=ids[:, 4:], encoder_hidden_states=memory, use_cache=True, **{name: cache})
        whole = model(input_ids=ids, encoder_hidden_states=memory, use_cache=False).logits
        with model.disable_adapter():
            plain = model(input_ids=ids, encoder_hidden_states=memory).logits
    assert cache.self_attention_cache.get_seq_length() == 6  # the prefix never enters the cache
    torch.testing.assert_close(step.logits, whole[:, 4:], rtol=1e-4, atol=1e-5)
    assert not torch.allclose(whole, plain, atol=1e-4)


@pytest.mark.parametrize("method", ["prefix", "ipt"])
@pytest.mark.parametrize(
    "name", ["bloom", "falcon-grouped", "gpt_neo", "mpt", "xglm", "roformer-decoder", "gemma4_text"]
)
def test_each_row_of_a_mixed_batch_on_a_path_of_its_own_equals_that_row_alone(name, method):
    model = three_adapter_model(method=method, base=decoder(name)).eval()
    assert_each_row_matches_alone(model, token_batch(len(ROWS), 7), {})


@pytest.mark.parametrize("reentrant", [False, True], ids=["non-reentrant", "reentrant"])
@pytest.mark.parametrize(
    "name",
    [
        "gptj",
        "bloom",
        "falcon-alibi",
        "gpt_neo",
        "mpt",
        "xglm",
        "roformer-decoder",
        "gemma4-unshared",
        "deberta",
        "deberta-v2",
        "roformer",
        "megatron-bert",  # (MPNet does not support checkpointing in transformers)
    ],
)
def test_gradient_checkpointing_gives_the_same_gradients(name, reentrant):
    results = []
    for checkpointing in (False, True):
        is_decoder = name in DECODERS or name == "gemma4-unshared"
        if name == "gemma4-unshared":  # Gemma 4 without KV sharing: see the next test for the shared layers
            base = decoder("gemma4_text", num_kv_shared_layers=0)
        else:
            base = decoder(name) if is_decoder else encoder(name)
        task = "CAUSAL_LM" if is_decoder else "SEQ_CLS"
        model = get_peft_model(
            base, PrefixTuningV2Config(task_type=task, prefix_length=3, init_weights=False)
        )
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
            model.enable_input_require_grads()
        model.train()
        ids = token_batch()
        labels = ids if is_decoder else torch.tensor([0, 2])
        with torch.random.fork_rng():
            torch.manual_seed(1)
            model(input_ids=ids, labels=labels, use_cache=False).loss.backward()
        results.append({n: g.clone() for n, g in trainable_grads(model).items()})
    assert results[0].keys() == results[1].keys()
    for key, grad in results[0].items():
        torch.testing.assert_close(grad, results[1][key], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("method", ["prefix_v2", "ipt"])
def test_gemma4_kv_sharing_trains_under_non_reentrant_checkpointing_and_refuses_reentrant(method):
    """Gemma 4's layers 2-3 reuse layers 0-1's keys and values. Reentrant checkpointing computes those without
    gradient in the forward, so the gradients through them are lost (LoRA's too): refused, naming the fix.
    Non-reentrant checkpointing gives the gradients of a run without it."""

    def gradients(**checkpointing):
        torch.manual_seed(0)
        model = get_peft_model(decoder("gemma4_text"), METHODS[method]("CAUSAL_LM"))
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=checkpointing)
            model.enable_input_require_grads()
        model.train()
        ids = token_batch()
        labels = ids.clone()
        labels[:, :4] = -100  # the source the instance prompt reads
        model(input_ids=ids, labels=labels, use_cache=False).loss.backward()
        return {n: g.clone() for n, g in trainable_grads(model).items()}

    plain, checkpointed = gradients(), gradients(use_reentrant=False)
    assert plain.keys() == checkpointed.keys()
    for key, grad in plain.items():
        torch.testing.assert_close(grad, checkpointed[key], rtol=1e-4, atol=1e-6)
    with pytest.raises(
        ValueError, match=r"layers \[2, 3\] reuse earlier layers' keys.*use_reentrant': False"
    ):
        gradients(use_reentrant=True)


def test_gemma3n_kv_sharing_is_refused_under_reentrant_checkpointing_too():
    """Gemma 3n shares keys and values as Gemma 4 does (its last layers reuse earlier ones')."""
    config = Gemma3nTextConfig(
        **{k: v for k, v in TINY_DECODER.items() if k != "intermediate_size"},
        num_hidden_layers=4,
        head_dim=8,
        num_kv_shared_layers=2,
        hidden_size_per_layer_input=8,
        vocab_size_per_layer_input=VOCAB,
        layer_types=["sliding_attention", "full_attention"] * 2,
        laurel_rank=4,
        altup_num_inputs=2,
        activation_sparsity_pattern=[0.0] * 4,
        intermediate_size=[64] * 4,
        pad_token_id=0,
    )
    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_config(config), METHODS["prefix_v2"]("CAUSAL_LM"))
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    model.enable_input_require_grads()
    model.train()
    ids = token_batch()
    with pytest.raises(ValueError, match=r"layers \[2, 3\] reuse earlier layers' keys"):
        model(input_ids=ids, labels=ids, use_cache=False)


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("name", list(ENCODERS))
def test_an_encoder_prefix_changes_the_logits_trains_and_disables_exactly(name, method):
    base = encoder(name)
    ids = token_batch()
    mask = torch.tensor([[1] * 7, [1] * 5 + [0] * 2])
    with torch.no_grad():
        reference = base(input_ids=ids, attention_mask=mask).logits
    model = get_peft_model(base, METHODS[method]("SEQ_CLS"))
    model.train()
    output = model(input_ids=ids, attention_mask=mask, labels=torch.tensor([0, 2]))
    assert output.logits.shape == reference.shape
    output.loss.backward()
    grads = trainable_grads(model)
    assert all(g is not None and g.abs().sum() > 0 for g in grads.values())
    model.eval()
    with torch.no_grad():
        # RoFormer's tiny head gives logits near 1e-2: the prefix moves them by 1e-4
        assert not torch.allclose(model(input_ids=ids, attention_mask=mask).logits, reference, atol=1e-5)
        with model.disable_adapter():
            assert torch.equal(model(input_ids=ids, attention_mask=mask).logits, reference)


@pytest.mark.parametrize("method", ["prefix_v2", "ipt"])
@pytest.mark.parametrize("name", list(ENCODERS))
def test_a_right_padded_encoder_row_gets_its_logits_alone(name, method):
    """Every query sees the prefix in both directions, and no query sees the padding: the mask the door widens."""
    model = get_peft_model(encoder(name), METHODS[method]("SEQ_CLS")).eval()
    move_trainable_weights(model)
    short, long = token_batch(1, 4, seed=2), token_batch(1, 7, seed=3)
    ids = torch.cat([torch.cat([short, torch.zeros(1, 3, dtype=torch.long)], 1), long])
    mask = torch.tensor([[1] * 4 + [0] * 3, [1] * 7])
    with torch.no_grad():
        together = model(input_ids=ids, attention_mask=mask).logits
        alone = torch.cat([model(input_ids=row).logits for row in (short, long)])
        with model.disable_adapter():
            bare = model(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(together, alone, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(together, bare, atol=1e-3)


@pytest.mark.parametrize("method", ["prefix_v2", "ipt"])
def test_a_left_padded_roformer_encoder_row_gets_its_logits_alone_as_the_bare_models_does(method):
    """RoFormer numbers positions from the padding and takes no position_ids; its rotary positions enter attention as
    differences, so the bare model gives a left-padded row its logits alone. A prefix key carries no rotation, so
    the door counts such a row's positions from its first token (else its scores moved with the padding)."""
    torch.manual_seed(0)
    base = AutoModelForTokenClassification.from_config(ENCODERS["roformer"]()).eval()
    model = get_peft_model(base, METHODS[method]("TOKEN_CLS")).eval()
    move_trainable_weights(model)
    short, long = token_batch(1, 4, seed=2), token_batch(1, 7, seed=3)
    ids = torch.cat([torch.cat([torch.zeros(1, 3, dtype=torch.long), short], 1), long])
    mask = torch.tensor([[0] * 3 + [1] * 4, [1] * 7])

    def rows(model):  # each row's tokens' logits from the padded batch, and alone
        together = model(input_ids=ids, attention_mask=mask).logits
        alone = [model(input_ids=row).logits[0] for row in (short, long)]
        return torch.cat([together[0, 3:], together[1]]), torch.cat(alone)

    with torch.no_grad():
        together, alone = rows(model)
        with model.disable_adapter():
            bare, bare_alone = rows(model)
    torch.testing.assert_close(bare, bare_alone, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(together, alone, rtol=1e-4, atol=1e-6)
    assert not torch.allclose(together, bare, atol=1e-4)


# (Megatron-BERT's own cross-attention fails in transformers 5.25 with different query and memory lengths)
@pytest.mark.parametrize("name", ["rembert-decoder", "roformer-decoder"])
def test_a_bert_like_decoder_with_cross_attention_prefixes_its_self_attention_only(name):
    """As XGLM: the cross-attention modules (same class, under "crossattention") take no prefix, and the cache is an
    encoder-decoder cache whose self-attention half the prefix's view wraps."""
    model = get_peft_model(decoder(name, add_cross_attention=True), METHODS["prefix_v2"]("CAUSAL_LM")).eval()
    layers = [m for m in model.modules() if hasattr(m, "crossattention")]
    assert len(layers) == 2
    assert all(SITE_ATTR in layer.attention.self.__dict__ for layer in layers)
    assert not any(SITE_ATTR in layer.crossattention.self.__dict__ for layer in layers)
    assert_a_cached_step_over_a_memory_equals_the_whole_call(model)


@pytest.mark.parametrize("name", ["rembert", "megatron-bert", "big_bird"])
def test_a_one_layer_encoders_prefix_of_its_own_keys_and_values_acts_as_those_tokens_in_front(name):
    """One bidirectional layer: the keys and values it computes for P tokens alone are those it computes for them in
    front of the input, so as a prefix (the input's positions moved on by P) they give the input's outputs exactly
    as with those tokens in front. Only the words' keys and values may be seen: no causal mask, no position."""
    config = ENCODERS[name]()
    config.num_hidden_layers, config.num_labels = 1, 3
    torch.manual_seed(0)
    base = AutoModelForTokenClassification.from_config(config).eval()
    shifted, reference, bare = own_words_as_prefix_and_in_front(base, "TOKEN_CLS")
    torch.testing.assert_close(shifted, reference, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(shifted, bare, atol=1e-5)


def mpnet_attention_call(seed: int = 0):
    """A tiny MPNet's first attention module and a call of it: states, a mask hiding a padded row's last two keys,
    the encoder's position bias."""
    base = encoder("mpnet")
    attention = next(m for m in base.modules() if type(m).__name__ == mpnet.ATTENTION_CLASS)
    hidden = torch.randn(2, 7, 32, generator=torch.Generator().manual_seed(seed))
    mask = torch.zeros(2, 1, 7, 7)
    mask[1, :, :, 5:] = torch.finfo(torch.float32).min
    return attention, hidden, mask, base.mpnet.encoder.compute_position_bias(hidden)


def test_mpnet_attention_with_an_empty_prefix_is_the_original_attention():
    attention, hidden, mask, bias = mpnet_attention_call()
    empty = (torch.zeros(1, 4, 0, 8), torch.zeros(1, 4, 0, 8))
    with torch.no_grad():
        ours = mpnet._attend(attention, empty, hidden, mask, bias, True)
        theirs = attention(hidden, mask, bias, output_attentions=True)
    torch.testing.assert_close(ours[0], theirs[0], rtol=0, atol=1e-6)
    torch.testing.assert_close(ours[1], theirs[1], rtol=0, atol=1e-6)


def test_an_mpnet_prefix_key_gets_no_position_bias():
    """Raise the position bias by c: the input's keys all gain c, a prefix key gains nothing, so its attention weight
    against any input key falls by exactly exp(-c)."""
    attention, hidden, mask, bias = mpnet_attention_call()
    prefix = (torch.randn(1, 4, 2, 8), torch.randn(1, 4, 2, 8))
    with torch.no_grad():
        _, before = mpnet._attend(attention, prefix, hidden, mask, bias, True)
        _, after = mpnet._attend(attention, prefix, hidden, mask, bias + 3.0, True)
    ratio_before = before[..., :2] / before[..., 2:3]  # prefix columns against the first input key
    ratio_after = after[..., :2] / after[..., 2:3]
    torch.testing.assert_close(ratio_after, ratio_before * torch.exp(torch.tensor(-3.0)), rtol=1e-4, atol=0)
    assert (after[1, :, :, -2:] == 0).all()  # the padded keys stay hidden


def layout(name: str, ids: torch.Tensor, seed: int) -> dict[str, torch.Tensor]:
    """Each token's place on the page: LayoutLM's box (x0, y0, x1, y1), MarkupLM's XPath tag and subscript ids, and
    TAPAS's place in the table (its seven token types: segment, column, row, ranks...)."""
    generator = torch.Generator().manual_seed(seed)
    shape = ids.shape
    if name == "tapas":
        sizes = ENCODERS["tapas"]().type_vocab_sizes
        types = [torch.randint(0, size, shape, generator=generator) for size in sizes]
        return {"token_type_ids": torch.stack(types, -1)}
    if name == "layoutlm":
        corner = torch.randint(0, 50, (*shape, 2), generator=generator)
        return {
            "bbox": torch.cat([corner, corner + torch.randint(0, 50, (*shape, 2), generator=generator)], -1)
        }
    return {
        "xpath_tags_seq": torch.randint(0, 200, (*shape, 50), generator=generator),
        "xpath_subs_seq": torch.randint(0, 1000, (*shape, 50), generator=generator),
    }


@pytest.mark.parametrize("name", ["layoutlm", "markuplm", "tapas"])
def test_the_frozen_pass_sees_each_tokens_layout(name):
    """instance_source='frozen_model' is the frozen model on this call's input, layout included: LayoutLM's boxes,
    MarkupLM's XPath ids and TAPAS's token types, (B, T, k) tensors, reach the frozen pass as they reach the model."""
    model = get_peft_model(encoder(name), METHODS["ipt_frozen"]("SEQ_CLS")).eval()
    tuner = model.base_model
    seen = []
    original = tuner._run_frozen
    tuner._run_frozen = lambda inputs, depth=None: seen.append(original(inputs, depth)) or seen[-1]
    ids = token_batch(2, 6)  # not 7 long: TAPAS's token types are (B, T, 7)
    mask = torch.tensor([[1] * 6, [1] * 4 + [0] * 2])
    call = {"input_ids": ids, "attention_mask": mask} | layout(name, ids, 0)
    rows = call["attention_mask"].bool()
    with torch.no_grad():
        model(**call)
        with model.disable_adapter():
            bare = model.get_base_model().base_model(**call).last_hidden_state
        torch.testing.assert_close(seen[-1][rows], bare[rows])
        model(**(call | layout(name, ids, 1)))  # the same words elsewhere on the page
        assert not torch.allclose(seen[-1][rows], bare[rows], atol=1e-3)


@pytest.mark.parametrize("name", ["layoutlm", "markuplm", "tapas"])
def test_an_input_level_prompt_gets_its_place_in_the_layout_and_the_tokens_keep_theirs(name):
    """injection='input' puts P prompt positions after [CLS]: each per-token layout input gets P positions there too,
    with what the model fills in where a call gives none (LayoutLM's empty box, MarkupLM's padding XPath, TAPAS's
    token type 0), and every token keeps its own. Before, LayoutLM and MarkupLM failed with a shape error."""
    base = encoder(name)
    config = InstancePromptConfig(task_type="SEQ_CLS", prompt_length=3, injection="input", init_weights=False)
    model = get_peft_model(base, config).eval()
    ids = token_batch(2, 6)
    given = layout(name, ids, 0)
    seen = {}
    embeddings = model.get_base_model().base_model.embeddings
    embeddings.register_forward_pre_hook(lambda _m, _a, kwargs: seen.update(kwargs), with_kwargs=True)
    with torch.no_grad():
        model(input_ids=ids, attention_mask=torch.ones_like(ids), **given)
    fills = {"bbox": 0, "token_type_ids": 0}
    if name == "markuplm":
        fills |= {"xpath_tags_seq": base.config.tag_pad_id, "xpath_subs_seq": base.config.subs_pad_id}
    for key, tensor in given.items():
        reached = seen[key]
        assert reached.shape == (2, 9, *tensor.shape[2:])
        assert torch.equal(reached[:, :1], tensor[:, :1]) and torch.equal(reached[:, 4:], tensor[:, 1:])
        assert (reached[:, 1:4] == fills[key]).all()


def test_an_input_prompt_on_mpnet_gives_a_left_padded_row_its_outputs_alone():
    """MPNet numbers positions from input_ids after its padding (a create_position_ids_from_input_ids of its modeling
    file, not of the embeddings, as RoBERTa's is); from the prompted inputs_embeds it counted from the first column,
    so a left-padded row's outputs moved with its padding, silently."""
    config = ENCODERS["mpnet"]()  # pads with 1 whatever the config says
    config.num_labels = 3
    torch.manual_seed(0)
    base = AutoModelForTokenClassification.from_config(config).eval()
    model = get_peft_model(
        base,
        InstancePromptConfig(task_type="TOKEN_CLS", prompt_length=3, injection="input", init_weights=False),
    ).eval()
    row = token_batch(1, 5)
    padded = torch.cat([torch.ones(1, 2, dtype=torch.long), row], 1)
    mask = torch.cat([torch.zeros(1, 2, dtype=torch.long), torch.ones_like(row)], 1)
    with torch.no_grad():
        alone = model(input_ids=row).logits
        together = model(input_ids=padded, attention_mask=mask).logits[:, 2:]
        with model.disable_adapter():  # the bare model gives the padded row its outputs alone too
            bare = model(input_ids=padded, attention_mask=mask).logits[:, 2:]
            bare_alone = model(input_ids=row).logits
    torch.testing.assert_close(bare, bare_alone, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-6)


def splinter_qa():
    torch.manual_seed(0)
    config = SplinterConfig(**BERT_SIZES, **IDS, question_token_id=5)
    return AutoModelForQuestionAnswering.from_config(config).eval()


def test_an_input_level_prompt_on_splinter_moves_the_question_positions_and_needs_them():
    """Splinter reads its answer span from the [QUESTION] token's state, found in input_ids when the call names no
    question_positions. An input-level prompt hands the model inputs_embeds, so it would read position 0 ([CLS])
    silently: refused, naming question_positions. Given, they move past the P prompt positions as the span does."""
    base = splinter_qa()
    config = InstancePromptConfig(
        task_type="QUESTION_ANS", prompt_length=3, injection="input", init_weights=False
    )
    model = get_peft_model(base, config).eval()
    ids = token_batch(2, 7, low=6)
    ids[:, 2] = 5  # the question token
    with torch.no_grad(), pytest.raises(ValueError, match="Pass question_positions"):
        model(input_ids=ids)
    seen = []
    base.splinter_qass.register_forward_pre_hook(lambda _m, args: seen.append(args[1]))
    with torch.no_grad():
        model(input_ids=ids, question_positions=torch.tensor([[2], [2]]))
    assert torch.equal(seen[-1], torch.tensor([[5], [5]]))  # after [CLS] and the 3 prompt positions


def test_an_input_level_prompt_on_tapas_question_answering_is_refused_naming_the_reason():
    """TAPAS's answer labels (0/1 per token, -100 no ignore index) and numeric values have no value for prompt
    positions; its classifier takes one (its token types get type 0)."""
    torch.manual_seed(0)
    base = transformers.TapasForQuestionAnswering(
        ENCODERS["tapas"]()
    )  # (the table-QA auto class is not mapped)
    config = InstancePromptConfig(task_type="QUESTION_ANS", prompt_length=3, injection="input")
    with pytest.raises(ValueError, match="injection='input' on TapasForQuestionAnswering.*numeric_values"):
        get_peft_model(base, config)


@pytest.mark.parametrize("build", ["bert", "bart"])
def test_a_causal_lm_with_cross_attention_beside_its_self_attention_is_served(build):
    """BERT and BART as causal LMs with cross-attention: two attention modules at one layer index and one
    layer_idx. Unlike LongCat-Flash's two (distinct layer_idx), they keep sharing their layer's prefix; a check that
    refused every shared index refused these (the architecture sweep caught it)."""
    if build == "bert":
        config = transformers.BertConfig(**BERT_SIZES, **IDS, is_decoder=True, add_cross_attention=True)
        base = transformers.BertLMHeadModel(config).eval()
    else:
        sizes = {"d_model": 32, "decoder_layers": 2, "decoder_attention_heads": 4, "decoder_ffn_dim": 64}
        base = transformers.BartForCausalLM(transformers.BartConfig(**sizes, **IDS)).eval()
    ids = token_batch()
    memory = torch.randn(ids.shape[0], 5, 32)
    with torch.no_grad():
        bare = base(input_ids=ids, encoder_hidden_states=memory).logits
    model = get_peft_model(base, METHODS["prefix_v2"]("CAUSAL_LM")).eval()
    sited = [name for name, module in model.named_modules() if SITE_ATTR in module.__dict__]
    assert len(sited) == 4  # self- and cross-attention in each of 2 layers
    with torch.no_grad():
        assert not torch.allclose(model(input_ids=ids, encoder_hidden_states=memory).logits, bare, atol=1e-4)
        with model.disable_adapter():
            assert torch.equal(model(input_ids=ids, encoder_hidden_states=memory).logits, bare)


@pytest.mark.parametrize("method", ["prefix_v2", "ipt"])
@pytest.mark.parametrize("name", ["AlignText", "ClapText"])
def test_the_text_towers_of_align_and_clap_take_a_prefix(name, method):
    """Their self-attention goes through the registry without an is_causal mark (before, "no attention modules
    found"): the prefix moves the features, a right-padded row gets its features alone, the loss reaches the adapter
    and disable_adapter gives the bare model's exactly."""
    config = getattr(transformers, f"{name}Config")(**BERT_SIZES, **IDS)
    torch.manual_seed(0)
    base = getattr(transformers, f"{name}Model")(config).eval()
    ids = token_batch(2, 7)
    mask = torch.ones_like(ids)
    ids[1, 5:], mask[1, 5:] = 0, 0
    with torch.no_grad():
        bare = base(input_ids=ids, attention_mask=mask).last_hidden_state
    model = get_peft_model(base, METHODS[method]("FEATURE_EXTRACTION"))
    with torch.no_grad():
        features = model(input_ids=ids, attention_mask=mask).last_hidden_state
        alone = model(input_ids=ids[1:, :5], attention_mask=mask[1:, :5]).last_hidden_state
        with model.disable_adapter():
            assert torch.equal(model(input_ids=ids, attention_mask=mask).last_hidden_state, bare)
    assert not torch.allclose(features, bare, atol=1e-4)
    torch.testing.assert_close(features[1, :5], alone[0], rtol=1e-4, atol=1e-5)
    model.train()
    model(input_ids=ids, attention_mask=mask).last_hidden_state.pow(2).mean().backward()
    grads = trainable_grads(model)
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads.values())


@pytest.mark.parametrize("method", ["prefix_v2", "ipt", "ipt_frozen"])
def test_splinter_answers_questions_with_a_prefix(method):
    """Splinter's attention, on the registry without an is_causal mark, takes the prefix in question answering: the
    logits move, a right-padded row's equal the row's alone, the loss reaches every adapter parameter, and disabling
    gives the bare model's."""
    base = splinter_qa()
    ids, mask = token_batch(), torch.tensor([[1] * 7, [1] * 5 + [0] * 2])
    with torch.no_grad():
        reference = base(input_ids=ids, attention_mask=mask).start_logits
    model = get_peft_model(base, METHODS[method]("QUESTION_ANS"))
    model.train()
    spans = {"start_positions": torch.tensor([1, 2]), "end_positions": torch.tensor([3, 4])}
    model(input_ids=ids, attention_mask=mask, **spans).loss.backward()
    grads = trainable_grads(model)
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads.values())
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).start_logits
        alone = model(input_ids=ids[1:, :5]).start_logits
        with model.disable_adapter():
            assert torch.equal(model(input_ids=ids, attention_mask=mask).start_logits, reference)
    assert not torch.allclose(logits, reference, atol=1e-4)
    torch.testing.assert_close(logits[1, :5], alone[0], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", DEBERTA)
def test_deberta_attention_with_an_empty_prefix_is_the_original_attention(name):
    """Our disentangled attention computes what transformers' does when the prefix is empty."""
    base = encoder(name)
    attention = next(m for m in base.modules() if type(m).__name__ == "DisentangledSelfAttention")
    version = V1 if name == "deberta" else V2
    hidden = torch.randn(2, 7, 32)
    mask = torch.ones(2, 1, 7, 7, dtype=torch.bool)
    mask[1, :, :, 5:] = False
    encoder_module = base.deberta.encoder
    relative = encoder_module.get_rel_pos(hidden)
    embeddings = encoder_module.get_rel_embedding()
    empty = (torch.zeros(1, 4, 0, 8), torch.zeros(1, 4, 0, 8))
    with torch.no_grad():
        ours = _attend(version, attention, empty, hidden, mask, True, None, relative, embeddings)
        theirs = attention(hidden, mask, True, None, relative, embeddings)
    torch.testing.assert_close(ours[0], theirs[0], rtol=0, atol=1e-6)
    torch.testing.assert_close(ours[1], theirs[1], rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", DEBERTA)
def test_a_deberta_prefix_key_gets_no_relative_position_score(name):
    """Raise every relative-position score by c: the input's keys all gain c, a prefix key gains nothing, so its
    attention weight against any input key falls by exactly exp(-c)."""
    base = encoder(name)
    attention = next(m for m in base.modules() if type(m).__name__ == "DisentangledSelfAttention")
    version = V1 if name == "deberta" else V2
    scorer = "disentangled_att_bias" if name == "deberta" else "disentangled_attention_bias"
    hidden = torch.randn(1, 5, 32)
    mask = torch.ones(1, 1, 5, 5, dtype=torch.bool)
    relative, embeddings = base.deberta.encoder.get_rel_pos(hidden), base.deberta.encoder.get_rel_embedding()
    prefix = (torch.randn(1, 4, 2, 8), torch.randn(1, 4, 2, 8))
    with torch.no_grad():
        _, before = _attend(version, attention, prefix, hidden, mask, True, None, relative, embeddings)
        original = getattr(attention, scorer)
        setattr(attention, scorer, lambda *a: original(*a) + 3.0)
        _, after = _attend(version, attention, prefix, hidden, mask, True, None, relative, embeddings)
    ratio_before = before[..., :2] / before[..., 2:3]  # prefix columns against the first input key
    ratio_after = after[..., :2] / after[..., 2:3]
    torch.testing.assert_close(ratio_after, ratio_before * torch.exp(torch.tensor(-3.0)), rtol=1e-4, atol=0)


@pytest.mark.parametrize("method", ["prefix_mlp", "ipt_hybrid", "ipt_hidden"])
def test_gemma4_prefixes_of_two_shapes_save_fold_and_load_and_another_shape_is_refused(method, tmp_path):
    """The adapter records each layer's shape where they differ, so it reloads exactly onto Gemma 4 and is refused,
    naming the layers' shapes, on a Gemma 4 whose global heads differ; peft's PrefixTuning (one shape for every
    layer) can neither take it nor give one."""
    from peft_ipt.interop import export_to_peft_prefix_tuning

    configs = {
        "prefix_mlp": lambda: PrefixTuningV2Config(
            task_type="CAUSAL_LM", prefix_length=3, init_weights=False
        ),
        "ipt_hybrid": lambda: InstancePromptConfig(
            task_type="CAUSAL_LM", prompt_length=3, init_weights=False
        ),
        "ipt_hidden": lambda: InstancePromptConfig(
            task_type="CAUSAL_LM", prompt_length=3, init_weights=False, instance_source="hidden"
        ),
    }
    model = get_peft_model(decoder("gemma4_text"), configs[method]()).eval()
    shapes = model.peft_config["default"].base_model_shapes
    assert shapes["self"] == [4, 2, 8]
    assert shapes["self_layers"] == [[0, 2, 8, 8], [1, 1, 16, 16], [2, 2, 8, 8], [3, 1, 16, 16]]
    ids = token_batch()
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    if method == "prefix_mlp":
        model.fold()
        with torch.no_grad():
            torch.testing.assert_close(model(input_ids=ids).logits, expected, rtol=1e-5, atol=1e-6)
        with pytest.raises(
            ValueError, match=r"self-attention layers differ in shape.*cannot be exported to peft"
        ):
            export_to_peft_prefix_tuning(model, tmp_path / "peft")
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(decoder("gemma4_text"), tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, expected, rtol=1e-5, atol=1e-6)
    other = AutoModelForCausalLM.from_config(gemma4_text_config(global_head_dim=8)).eval()
    with pytest.raises(
        ValueError, match=r"self_layers: adapter \[\[0, 2, 8, 8\], \[1, 1, 16, 16\].*vs model"
    ):
        PeftModel.from_pretrained(other, tmp_path)
    uniform = get_peft_model(decoder("gptj"), configs[method]())
    assert (
        "self_layers" not in uniform.peft_config["default"].base_model_shapes
    )  # one shape: the config as before


@pytest.mark.parametrize("method", ["prefix_v2", "ipt"])
@pytest.mark.parametrize("name", ["bloom", "gpt_neo", "roformer-decoder", "roformer", "mpnet", "deberta-v2"])
def test_unload_on_a_path_of_its_own_gives_back_the_model_as_it_was(name, method):
    """As LoRA's unload: the doors go (hooks, replaced forwards, the sites' marks) and the model computes what it
    computed before get_peft_model, bit for bit; a fresh adapter then takes it again."""
    is_decoder = name in DECODERS
    base = decoder(name) if is_decoder else encoder(name)
    task = "CAUSAL_LM" if is_decoder else "SEQ_CLS"
    ids = token_batch()
    hooks = {n: (len(m._forward_pre_hooks), len(m._forward_hooks)) for n, m in base.named_modules()}
    with torch.no_grad():
        reference = base(input_ids=ids).logits
    model = get_peft_model(base, METHODS[method](task))
    with torch.no_grad():
        model(input_ids=ids)  # a call first: GPT-Neo's local tables are swapped in and back during it
    restored = model.unload()
    assert restored is base
    assert {n: (len(m._forward_pre_hooks), len(m._forward_hooks)) for n, m in base.named_modules()} == hooks
    assert not any(SITE_ATTR in m.__dict__ or "forward" in m.__dict__ for m in base.modules())
    with torch.no_grad():
        assert torch.equal(restored(input_ids=ids).logits, reference)
        again = get_peft_model(restored, METHODS[method](task))
        assert not torch.allclose(again(input_ids=ids).logits, reference, atol=1e-5)


@pytest.mark.parametrize("name", ["falcon", "mpt", "deberta-v2", "rembert", "mpnet"])
def test_save_and_load_round_trip_on_a_path_of_its_own(name, tmp_path):
    is_decoder = name in DECODERS
    build = (lambda: decoder(name)) if is_decoder else (lambda: encoder(name))
    task = "CAUSAL_LM" if is_decoder else "SEQ_CLS"
    model = get_peft_model(build(), METHODS["ipt"](task)).eval()
    ids = token_batch()
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(build(), tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, expected)


def test_flash_attention_is_refused_on_a_path_of_its_own_too():
    base = decoder("falcon")
    base.config._attn_implementation = "flash_attention_2"
    with pytest.raises(ValueError, match="attn_implementation='flash_attention_2' is not supported"):
        get_peft_model(base, METHODS["prefix_v2"]("CAUSAL_LM"))


def test_the_supported_model_types_are_listed():
    expected = {
        "bloom",
        "codegen",
        "deberta",
        "deberta-v2",
        "falcon",
        "fsmt",
        "gpt_neo",
        "gpt_neox_japanese",
        "gptj",
        "led",
        "megatron-bert",
        "mpnet",
        "mpt",
        "mvp",
        "rembert",
        "roformer",
        "xglm",
    }
    assert expected <= set(supported_model_types())


def deepseek_v3(value_head_dim: int) -> DeepseekV3Config:
    """Multi-head latent attention: keys of head size 4 + 4 (no rotary part, rotary part), values of value_head_dim."""
    return DeepseekV3Config(
        **TINY_DECODER | {"num_key_value_heads": 4},
        moe_intermediate_size=16,
        num_hidden_layers=2,
        n_routed_experts=2,
        num_experts_per_tok=1,
        n_group=1,
        topk_group=1,
        first_k_dense_replace=1,
        q_lora_rank=16,
        kv_lora_rank=16,
        qk_nope_head_dim=4,
        qk_rope_head_dim=4,
        v_head_dim=value_head_dim,
        pad_token_id=0,
    )


def test_latent_attention_with_keys_and_values_of_one_size_takes_prefixes_of_that_size():
    """DeepSeek's config names head_dim its rotary part (4); the keys and values are 8 wide."""
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(deepseek_v3(value_head_dim=8)).eval()
    model = get_peft_model(base, METHODS["prefix_v2"]("CAUSAL_LM")).eval()
    assert model.peft_config["default"].base_model_shapes["self"] == [2, 4, 8]
    ids = token_batch(2, 7)
    with torch.no_grad():
        logits = model(input_ids=ids).logits
        with model.disable_adapter():
            assert (logits - model(input_ids=ids).logits).abs().max() > 1e-3
        kwargs = {"input_ids": ids, "max_new_tokens": 4, "do_sample": False, "pad_token_id": 0}
        assert torch.equal(model.generate(**kwargs), model.generate(**kwargs, use_cache=False))


@pytest.mark.parametrize("method", ["prefix_v2", "ipt"])
def test_latent_attention_with_values_narrower_than_keys_takes_prefixes_of_both_sizes(method, tmp_path):
    """DeepSeek's keys are 8 wide and its values 6 (the released models: 192 and 128): the prefixes take both sizes,
    the config records them, the adapter reloads exactly and another value size is refused; peft's PrefixTuning
    (keys and values of one size) cannot take the adapter. The tests above run it through every decoder check."""
    from peft_ipt.interop import export_to_peft_prefix_tuning

    model = get_peft_model(decoder("deepseek_v3"), METHODS[method]("CAUSAL_LM")).eval()
    shapes = model.peft_config["default"].base_model_shapes
    assert shapes["self"] == [2, 4, 8] and shapes["self_layers"] == [[0, 4, 8, 6], [1, 4, 8, 6]]
    ids = token_batch()
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    if method == "prefix_v2":
        with pytest.raises(ValueError, match=r"keys and values in size.*cannot be exported to peft"):
            export_to_peft_prefix_tuning(model, tmp_path / "peft")
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(decoder("deepseek_v3"), tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, expected)
    other = AutoModelForCausalLM.from_config(deepseek_v3(value_head_dim=4))
    with pytest.raises(ValueError, match=r"self_layers: adapter \[\[0, 4, 8, 6\], \[1, 4, 8, 6\]\] vs model"):
        PeftModel.from_pretrained(other, tmp_path)


REFUSED = {  # with the error each gets
    "xlnet": (
        lambda: XLNetConfig(vocab_size=VOCAB, d_model=32, n_layer=2, n_head=4, d_inner=64),
        r"does not route attention through transformers.AttentionInterface.*bloom, .*gpt_neo",
    ),
    "mamba": (
        lambda: MambaConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2),
        r"no attention modules found",
    ),
}


@pytest.mark.parametrize("name", list(REFUSED))
def test_an_architecture_without_a_path_is_refused_naming_the_supported_ones(name):
    config, error = REFUSED[name]
    base = AutoModelForCausalLM.from_config(config())
    with pytest.raises(ValueError, match=error):
        get_peft_model(base, METHODS["prefix_v2"]("CAUSAL_LM"))


def test_supported_models_names_each_tested_model_types_path(capsys):
    from peft_ipt.cli import main

    assert main(["supported-models"]) == 0
    lines = dict(
        line.split("  ", 1) for line in capsys.readouterr().out.splitlines() if line.count("  ") == 2
    )
    registry = {"bart", "bert", "gpt2", "llama", "roberta", "t5"}
    assert all(lines[t] == "registry  yes" for t in registry)
    assert lines["deberta"] == lines["deberta-v2"] == "deberta  yes"
    assert lines["mvp"] == lines["fsmt"] == lines["led"] == "encoder_decoder  yes"
    assert (
        lines["xlnet"] == lines["mamba"] == lines["git"] == "refused  -"
    )  # GIT: tests/test_composite_models.py
    assert lines["gemma4_text"] == lines["deepseek_v3"] == lines["mimo_v2_flash"] == "registry  yes"
    tokenless = ("whisper", "speech_to_text", "vit", "wav2vec2")  # tests/test_tokenless_models.py
    assert all(lines[t] == "registry  yes" for t in tokenless)
    assert lines["llava"] == lines["encoder-decoder"] == "composite  yes"  # tests/test_composite_models.py
    # GPT-J and CodeGen moved onto the registry in transformers 5.24: either way they are served and tested
    served = ("gptj", "codegen", "bloom", "falcon", "gpt_neo", "gpt_neox_japanese", "mpt", "xglm")
    assert all(lines[t] in ("cache_view  yes", "registry  yes") for t in served)
    assert lines["roformer"] == lines["rembert"] == lines["megatron-bert"] == "cache_view  yes"
    assert lines["mpnet"] == "mpnet  yes"
    # their encoders attend off the registry: served with encoder_prefix=False (test_an_encoder_off_the_registry...)
    assert (
        lines["longt5"]
        == lines["pegasus_x"]
        == lines["bigbird_pegasus"]
        == "registry (encoder_prefix=False)  yes"
    )
    for served_now in ("longcat_flash", "align", "clap", "moss_transcribe_diarize", "phi4_multimodal"):
        assert lines[served_now] == "registry  yes"


def test_a_module_that_bypasses_the_registry_is_refused_at_its_first_call_not_ignored():
    """transformers decides a model is on the registry from its modeling file; a module there that computes its
    attention itself (T5 in transformers 5.16) would silently ignore its prefix."""
    from conftest import tiny_model

    base = tiny_model("llama")
    attention = base.model.layers[1].self_attn
    attention.forward = lambda hidden_states, **kwargs: (torch.zeros_like(hidden_states), None)
    model = get_peft_model(base, METHODS["prefix_v2"]("CAUSAL_LM"))
    with pytest.raises(ValueError, match=r"LlamaAttention \(layer 1\) computes its attention itself"):
        model(input_ids=token_batch())
    with model.disable_adapter():
        model(input_ids=token_batch())  # the user's own model runs as it is


# -- MVP: an encoder-decoder off the registry, BART's computation with its own attention modules -----------------


def bart_and_mvp():
    """A tiny BART (on the registry) and an MVP with the same weights: without an adapter they compute the same."""
    from conftest import tiny_model
    from transformers import MvpConfig, MvpForConditionalGeneration

    bart = tiny_model("bart", "SEQ_2_SEQ_LM")
    fields = MvpConfig().to_dict().keys() - {"model_type", "architectures", "transformers_version"}
    mvp = MvpForConditionalGeneration(
        MvpConfig(**{k: v for k, v in bart.config.to_dict().items() if k in fields})
    ).eval()
    mvp.load_state_dict(bart.state_dict())
    return bart, mvp


def adapted_pair(method: str, **config):
    """The adapter on BART and the same adapter weights on MVP."""
    bart, mvp = bart_and_mvp()
    build = METHODS[method] if not config else lambda task: PrefixTuningV2Config(task_type=task, **config)
    on_bart = get_peft_model(bart, build("SEQ_2_SEQ_LM")).eval()
    on_mvp = get_peft_model(mvp, build("SEQ_2_SEQ_LM")).eval()
    adapter = {
        k: v for k, v in on_bart.state_dict().items() if k not in on_bart.get_base_model().state_dict()
    }
    adapter = {k: v for k, v in adapter.items() if not k.startswith("base_model.model.")}
    assert adapter and not on_mvp.load_state_dict(adapter, strict=False).unexpected_keys
    return on_bart, on_mvp


def seq2seq_batch():
    ids = token_batch(2, 7, low=3)
    mask = torch.ones_like(ids)
    mask[1, :2] = 0  # a padded row
    return {"input_ids": ids, "attention_mask": mask, "decoder_input_ids": token_batch(2, 4, seed=3, low=3)}


@pytest.mark.parametrize("method", [*METHODS, "encoder prefix only", "cross prefix only"])
def test_mvp_with_a_prefix_computes_what_bart_computes_on_the_registry_path(method):
    only = {"encoder prefix only": "encoder", "cross prefix only": "cross"}.get(method)
    config = {}
    if only is not None:  # one attention kind at a time: each door on its own
        config = {"prefix_length": 3, "init_weights": False}
        config |= {f"{kind}_prefix": kind == only for kind in ("encoder", "decoder", "cross")}
    on_bart, on_mvp = adapted_pair("prefix_v2" if only else method, **config)
    batch = seq2seq_batch()
    with torch.no_grad():
        expected = on_bart(**batch).logits
        got = on_mvp(**batch).logits
        with on_mvp.disable_adapter():
            bare = on_mvp(**batch).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert (
        got - bare
    ).abs().max() > 1e-6  # the prefix is in (an encoder prefix alone moves the logits little)
    with torch.no_grad():  # off: MVP's own computation, exactly (the disabled doors hand nothing in)
        assert torch.equal(bare, bart_and_mvp()[1](**batch).logits)

    # the same gradient on every adapter parameter (in eval mode: the two models' dropout draws would differ)
    grads = []
    for model in (on_bart, on_mvp):
        model(**batch, labels=batch["decoder_input_ids"]).loss.backward()
        grads.append(
            {n.split("base_model.", 1)[1]: p.grad for n, p in model.named_parameters() if p.requires_grad}
        )
    assert grads[0].keys() == grads[1].keys() and all(g is not None for g in grads[1].values())
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("method", ["prefix_v2", "ipt"])
def test_mvp_generates_what_bart_generates_with_and_without_the_cache(method):
    on_bart, on_mvp = adapted_pair(method)
    batch = seq2seq_batch()
    kwargs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "do_sample": False}
    kwargs |= {"max_new_tokens": 6, "min_new_tokens": 6}
    expected = on_bart.generate(**kwargs)
    assert torch.equal(on_mvp.generate(**kwargs), expected)
    assert torch.equal(on_mvp.generate(**kwargs, use_cache=False), expected)
    assert torch.equal(on_mvp.generate(**kwargs, num_beams=2), on_bart.generate(**kwargs, num_beams=2))


@pytest.mark.parametrize("method", ["prefix", "ipt"])
def test_each_row_of_a_mixed_batch_on_mvp_equals_that_row_alone(method):
    _, mvp = bart_and_mvp()
    model = three_adapter_model(task="SEQ_2_SEQ_LM", method=method, base=mvp)
    extra = {"decoder_input_ids": token_batch(len(ROWS), 4, seed=3)}
    assert_each_row_matches_alone(model, token_batch(len(ROWS), 7), extra)


def test_mvp_records_the_keys_and_values_bart_records_for_words():
    """Initialisation from real words records each site's own keys/values: the same on both paths."""
    on_bart, on_mvp = adapted_pair("prefix_v2")
    words = token_batch(1, 5, low=3)[0]
    expected = on_bart.base_model.record_activations(words)
    got = on_mvp.base_model.record_activations(words)
    assert got.keys() == expected.keys() and {kind for kind, _ in got} == {"encoder", "decoder", "cross"}
    for site, (key, value) in expected.items():
        torch.testing.assert_close(got[site][0], key, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got[site][1], value, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("reentrant", [False, True], ids=["non-reentrant", "reentrant"])
def test_mvp_gradient_checkpointing_gives_the_same_gradients(reentrant):
    results = []
    for checkpointing in (False, True):
        _, mvp = bart_and_mvp()
        model = get_peft_model(mvp, METHODS["ipt"]("SEQ_2_SEQ_LM"))
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
            model.enable_input_require_grads()
        model.train()
        batch = seq2seq_batch()
        model(**batch, labels=batch["decoder_input_ids"], use_cache=False).loss.backward()
        results.append({n: g.clone() for n, g in trainable_grads(model).items()})
    for key, grad in results[0].items():
        torch.testing.assert_close(grad, results[1][key], rtol=1e-4, atol=1e-6)


def test_mvp_save_and_load_round_trip(tmp_path):
    _, on_mvp = adapted_pair("ipt")
    batch = seq2seq_batch()
    with torch.no_grad():
        expected = on_mvp(**batch).logits
    on_mvp.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(bart_and_mvp()[1], tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(loaded(**batch).logits, expected)


def test_mvp_keeps_its_own_prompts_beside_the_prefix():
    """An MVP trained with prompts of its own (use_prompt): the adapter adds its prefix, and off it is MVP alone."""
    from transformers import MvpForConditionalGeneration

    config = bart_and_mvp()[1].config
    config.use_prompt, config.prompt_length, config.prompt_mid_dim = True, 2, 8
    torch.manual_seed(0)
    mvp = MvpForConditionalGeneration(config).eval()
    batch = seq2seq_batch()
    with torch.no_grad():
        own = mvp(**batch).logits
        model = get_peft_model(mvp, METHODS["ipt"]("SEQ_2_SEQ_LM")).eval()
        with_prefix = model(**batch).logits
        with model.disable_adapter():
            assert torch.equal(model(**batch).logits, own)
    assert (with_prefix - own).abs().max() > 1e-3


# -- FSMT: an encoder-decoder off the registry, time-major, with a causal attn_mask and a key_padding_mask -------


# the sizes and special tokens of conftest's tiny BART, for the encoder-decoders off the registry
TINY_SEQ2SEQ = {
    "d_model": 32,
    "encoder_layers": 2,
    "decoder_layers": 2,
    "encoder_attention_heads": 4,
    "decoder_attention_heads": 4,
    "encoder_ffn_dim": 64,
    "decoder_ffn_dim": 64,
    "pad_token_id": 1,
    "bos_token_id": 0,
    "eos_token_id": 2,
    "decoder_start_token_id": 2,
}


def fsmt(seed: int = 0):
    from transformers import FSMTConfig, FSMTForConditionalGeneration

    config = FSMTConfig(
        langs=["en", "de"],
        src_vocab_size=VOCAB,
        tgt_vocab_size=VOCAB,
        max_position_embeddings=64,
        forced_eos_token_id=None,
        **TINY_SEQ2SEQ,
    )
    torch.manual_seed(seed)
    return FSMTForConditionalGeneration(config).eval()


@pytest.mark.parametrize("method", ["prefix_v2", "ipt", "ipt_frozen"])
def test_an_fsmt_prefix_changes_the_logits_trains_and_disables(method):
    batch = seq2seq_batch()
    with torch.no_grad():
        bare = fsmt()(**batch).logits
    model = get_peft_model(fsmt(), METHODS[method]("SEQ_2_SEQ_LM")).eval()
    with torch.no_grad():
        with_prefix = model(**batch).logits
        with model.disable_adapter():
            off = model(**batch).logits
    assert (with_prefix - bare).abs().max() > 1e-3
    # off: the model's own computation (to float noise: LoRA's get_peft_model + unload on FSMT moves it by 4e-8 too)
    torch.testing.assert_close(off, bare, rtol=0, atol=1e-6)
    model(**batch, labels=batch["decoder_input_ids"]).loss.backward()
    grads = trainable_grads(model)
    assert all(g is not None and g.abs().sum() > 0 for g in grads.values())
    kinds = {kind for kind, _ in model.base_model._prefixes}
    assert kinds == {"encoder", "decoder", "cross"}


@pytest.mark.parametrize("method", ["prefix_v2", "ipt"])
def test_fsmt_generates_the_same_with_and_without_the_cache(method):
    model = get_peft_model(fsmt(), METHODS[method]("SEQ_2_SEQ_LM")).eval()
    batch = seq2seq_batch()
    kwargs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "do_sample": False}
    kwargs |= {"max_new_tokens": 6, "min_new_tokens": 6}
    assert torch.equal(model.generate(**kwargs), model.generate(**kwargs, use_cache=False))
    assert torch.equal(
        model.generate(**kwargs, num_beams=2), model.generate(**kwargs, num_beams=2, use_cache=False)
    )


def test_an_input_level_prompt_on_fsmt_runs_forward_and_generate_is_refused_naming_the_reason():
    # FSMT's encoder requires input_ids; generate() runs it on the prompted inputs_embeds alone (a TypeError before)
    model = get_peft_model(
        fsmt(), InstancePromptConfig(task_type="SEQ_2_SEQ_LM", prompt_length=3, injection="input")
    ).eval()
    batch = seq2seq_batch()
    with torch.no_grad():
        assert model(**batch).logits.shape[:2] == batch["decoder_input_ids"].shape
    with pytest.raises(ValueError, match=r"injection='input' cannot generate with FSMT.*requires input_ids"):
        model.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], max_new_tokens=2)


@pytest.mark.parametrize("method", ["prefix", "ipt"])
def test_each_row_of_a_mixed_batch_on_fsmt_equals_that_row_alone(method):
    model = three_adapter_model(task="SEQ_2_SEQ_LM", method=method, base=fsmt())
    extra = {"decoder_input_ids": token_batch(len(ROWS), 4, seed=3, low=3)}
    assert_each_row_matches_alone(model, token_batch(len(ROWS), 7, low=3), extra)


@pytest.mark.parametrize("kind", ["encoder", "cross"])
def test_an_fsmt_attention_with_a_prefix_attends_over_the_prefix_in_front(kind):
    """One attention module through the door against attention written out: the prefix keys/values in front of the
    module's own, every query seeing them, the padded keys still hidden."""
    model = get_peft_model(fsmt(), METHODS["prefix_v2"]("SEQ_2_SEQ_LM")).eval()
    batch = seq2seq_batch()
    layers = model.get_base_model().model.encoder.layers if kind == "encoder" else None
    module = (
        layers[1].self_attn
        if kind == "encoder"
        else model.get_base_model().model.decoder.layers[1].encoder_attn
    )
    seen = {}
    module.register_forward_hook(
        lambda m, args, kwargs, out: seen.update(kwargs=kwargs, out=out[0]), with_kwargs=True
    )
    with torch.no_grad():
        model(**batch)
    prefix_key, prefix_value = model.base_model._prefixes[(kind, 1)][:2]  # (1, heads, P, hd)
    call = seen["kwargs"]
    query_states, source = call["query"], call["key"]  # (T, B, d), (S, B, d)
    padding = call["key_padding_mask"][:, prefix_key.shape[2] :]  # the model's own, (B, S): True hides

    def heads(x):  # (T, B, d) -> (B, H, T, hd)
        return x.view(x.shape[0], x.shape[1], module.num_heads, module.head_dim).permute(1, 2, 0, 3)

    with torch.no_grad():
        q = heads(module.q_proj(query_states)) * module.scaling
        k = torch.cat([prefix_key.expand(q.shape[0], -1, -1, -1), heads(module.k_proj(source))], dim=2)
        v = torch.cat([prefix_value.expand(q.shape[0], -1, -1, -1), heads(module.v_proj(source))], dim=2)
        scores = q @ k.transpose(-1, -2)
        hidden = torch.cat([torch.zeros_like(padding[:, :1]).expand(-1, prefix_key.shape[2]), padding], dim=1)
        scores = scores.masked_fill(hidden[:, None, None, :], torch.finfo(scores.dtype).min)
        out = scores.softmax(-1) @ v  # (B, H, T, hd)
        expected = module.out_proj(out.permute(2, 0, 1, 3).reshape(q.shape[2], q.shape[0], -1))
    assert padding.any()  # the padded row's keys are hidden here: the check covers the padding mask too
    torch.testing.assert_close(seen["out"], expected, rtol=1e-5, atol=1e-6)


def test_fsmt_save_and_load_round_trip(tmp_path):
    model = get_peft_model(fsmt(), METHODS["ipt"]("SEQ_2_SEQ_LM")).eval()
    batch = seq2seq_batch()
    with torch.no_grad():
        expected = model(**batch).logits
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(fsmt(), tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(loaded(**batch).logits, expected)


# -- LED: BART's decoder (served), a Longformer encoder (refused, with the fix) ----------------------------------


def led(seed: int = 0):
    from transformers import LEDConfig, LEDForConditionalGeneration

    config = LEDConfig(
        vocab_size=VOCAB,
        max_encoder_position_embeddings=64,
        max_decoder_position_embeddings=64,
        attention_window=4,
        **TINY_SEQ2SEQ,
    )
    torch.manual_seed(seed)
    return LEDForConditionalGeneration(config).eval()


LED_METHODS = {
    "prefix_v2": lambda **kw: PrefixTuningV2Config(task_type="SEQ_2_SEQ_LM", init_weights=False, **kw),
    "ipt": lambda **kw: InstancePromptConfig(task_type="SEQ_2_SEQ_LM", init_weights=False, **kw),
}


def test_an_led_encoder_prefix_is_refused_with_the_fix():
    for encoder_prefix in (None, True):  # None means "where the model has one": LED has one, with no door
        with pytest.raises(ValueError, match=r"Longformer's sliding windows.*Set encoder_prefix=False"):
            get_peft_model(
                led(), PrefixTuningV2Config(task_type="SEQ_2_SEQ_LM", encoder_prefix=encoder_prefix)
            )


@pytest.mark.parametrize("method", list(LED_METHODS))
def test_an_led_decoder_prefix_changes_the_logits_trains_disables_and_generates_with_the_cache(method):
    batch = seq2seq_batch()
    with torch.no_grad():
        bare = led()(**batch).logits
    model = get_peft_model(led(), LED_METHODS[method](encoder_prefix=False)).eval()
    with torch.no_grad():
        with_prefix = model(**batch).logits
        with model.disable_adapter():
            off = model(**batch).logits
    assert (with_prefix - bare).abs().max() > 1e-3
    torch.testing.assert_close(off, bare, rtol=0, atol=1e-6)  # float noise, as LoRA's unload leaves on FSMT
    assert {kind for kind, _ in model.base_model._prefixes} == {"decoder", "cross"}
    model(**batch, labels=batch["decoder_input_ids"]).loss.backward()
    assert all(g is not None and g.abs().sum() > 0 for g in trainable_grads(model).values())
    kwargs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "do_sample": False}
    kwargs |= {"max_new_tokens": 6, "min_new_tokens": 6}
    assert torch.equal(model.generate(**kwargs), model.generate(**kwargs, use_cache=False))
    assert torch.equal(
        model.generate(**kwargs, num_beams=2), model.generate(**kwargs, num_beams=2, use_cache=False)
    )


@pytest.mark.parametrize("method", list(LED_METHODS))
def test_each_row_of_a_mixed_batch_on_led_equals_that_row_alone(method):
    length = "prefix_length" if method == "prefix_v2" else "prompt_length"
    model = get_peft_model(led(), LED_METHODS[method](encoder_prefix=False, **{length: 4}))
    model.add_adapter(
        "other", LED_METHODS[method](encoder_prefix=False, layers_to_transform=[1], **{length: 2})
    )
    extra = {"decoder_input_ids": token_batch(len(ROWS), 4, seed=3, low=3)}
    assert_each_row_matches_alone(model, token_batch(len(ROWS), 7, low=3), extra)


def test_led_save_and_load_round_trip(tmp_path):
    model = get_peft_model(led(), LED_METHODS["ipt"](encoder_prefix=False)).eval()
    batch = seq2seq_batch()
    with torch.no_grad():
        expected = model(**batch).logits
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(led(), tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(loaded(**batch).logits, expected)


def test_a_grouped_falcon_adapter_from_the_other_transformers_layout_is_refused_naming_the_change(tmp_path):
    # transformers 5.25 moved grouped Falcon from caching every query head's keys to its key/value heads; an adapter
    # saved under the other layout must be refused with that reason, not only "load it onto its base model"
    model = get_peft_model(
        decoder("falcon-grouped"), PrefixTuningV2Config(task_type="CAUSAL_LM", prefix_length=3)
    )
    model.save_pretrained(tmp_path)
    config_file = tmp_path / "adapter_config.json"
    saved = json.loads(config_file.read_text())
    layers, heads, head_dim = saved["base_model_shapes"]["self"]
    saved["base_model_shapes"]["self"] = [
        layers,
        6 - heads,
        head_dim,
    ]  # 4 <-> 2: the other transformers' layout
    config_file.write_text(json.dumps(saved))
    with pytest.raises(ValueError, match=r"Falcon's grouped attention is one: before transformers 5\.25"):
        PeftModel.from_pretrained(decoder("falcon-grouped"), tmp_path)


def test_bigbirds_block_sparse_attention_is_refused_naming_full_attention():
    base = AutoModelForSequenceClassification.from_config(BigBirdConfig(**BERT_SIZES, **IDS))  # block_sparse
    with pytest.raises(
        UnsupportedModelError, match=r"block-sparse attention.*attention_type='original_full'"
    ):
        get_peft_model(base, METHODS["prefix_v2"]("SEQ_CLS"))


@pytest.mark.parametrize("method", ["prefix_v2", "ipt"])
def test_bigbird_switched_to_block_sparse_after_get_peft_model_is_refused_at_the_next_call(method):
    """set_attention_type builds new attention modules, without the doors: the model and its backbone called
    directly must refuse, not run without the prefix (also after switching back, which builds new modules again)."""
    model = get_peft_model(encoder("big_bird"), METHODS[method]("SEQ_CLS")).eval()
    ids = token_batch()
    with torch.no_grad():
        model(input_ids=ids)  # runs before the switch
    backbone = model.get_base_model().bert
    backbone.set_attention_type("block_sparse")
    with pytest.raises(UnsupportedModelError, match="replaced after get_peft_model.*unload"):
        model(input_ids=ids)
    backbone.set_attention_type("original_full")  # new full-attention modules: still without the prefix
    for call in (model, backbone):
        with pytest.raises(UnsupportedModelError, match="replaced after get_peft_model"):
            call(input_ids=ids)


def test_a_bigbird_decoder_with_cross_attention_is_refused_naming_why():
    """transformers' BigBirdLayer hands the encoder's states to the self-attention too: there is no decoder
    self-attention for a prefix to join (its outputs do not depend on earlier decoder tokens)."""
    with pytest.raises(UnsupportedModelError, match=r"add_cross_attention=True.*self-attention as well"):
        get_peft_model(
            decoder("big_bird-decoder", add_cross_attention=True), METHODS["prefix_v2"]("CAUSAL_LM")
        )


# the tiny BART's sizes, with IDS' special tokens: the encoder-decoders below share them
BART_SIZES = {
    k: v for k, v in TINY_SEQ2SEQ.items() if k not in ("pad_token_id", "bos_token_id", "eos_token_id")
}
BART_SIZES["max_position_embeddings"] = 64
# model type -> (config, what the refusal names): local / transient-global attention (LongT5), block-local attention
# with global tokens (PEGASUS-X), BigBird's attention (BigBirdPegasus)
SEQ2SEQ_WITH_ENCODERS_OFF_THE_REGISTRY = {
    "longt5": (
        lambda: LongT5Config(
            d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, decoder_start_token_id=0, **IDS
        ),
        "encoder",
    ),
    "pegasus_x": (lambda: PegasusXConfig(**BART_SIZES, **IDS), "encoder"),
    "bigbird_pegasus": (lambda: BigBirdPegasusConfig(**BART_SIZES, **IDS), "BigBirdPegasusEncoderAttention"),
}


@pytest.mark.parametrize("name", list(SEQ2SEQ_WITH_ENCODERS_OFF_THE_REGISTRY))
def test_an_encoder_off_the_registry_refuses_its_prefix_and_the_decoder_is_served(name):
    """Their decoders go through the registry, their encoders do not: before, the default encoder_prefix=None ("on
    where the model has it") left such an encoder silently without a prefix."""
    build_config, named = SEQ2SEQ_WITH_ENCODERS_OFF_THE_REGISTRY[name]
    config = build_config()
    build = lambda: AutoModelForSeq2SeqLM.from_config(config).eval()  # noqa: E731
    with pytest.raises(ValueError, match=rf"encoder_prefix=None: .*{named}.*encoder_prefix=False"):
        get_peft_model(build(), PrefixTuningV2Config(task_type="SEQ_2_SEQ_LM", prefix_length=3))
    prefix = PrefixTuningV2Config(task_type="SEQ_2_SEQ_LM", prefix_length=3, encoder_prefix=False)
    model = get_peft_model(build(), prefix)
    assert {m.__dict__[SITE_ATTR].kind for m in model.modules() if SITE_ATTR in m.__dict__} == {
        "decoder",
        "cross",
    }
