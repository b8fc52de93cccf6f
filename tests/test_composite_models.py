"""Models built of submodels with configs of their own. Multimodal models (Llava here; Gemma 3 and Qwen2-VL take
the same path): the language model's attention layers take the prefixes, the vision tower's take none, and image
inputs go through as they do without the adapter. EncoderDecoderModel (two BERTs): the encoder, decoder and
cross-attention layers take theirs, as in BART or T5."""

from __future__ import annotations

import copy

import pytest
import torch
import transformers
from conftest import CONFIGS, VOCAB, token_batch
from peft import PeftModel, get_peft_model
from test_architectures import gemma4_text_config
from transformers import (
    CLIPVisionConfig,
    EncoderDecoderConfig,
    EncoderDecoderModel,
    Gemma3Config,
    Gemma3ForConditionalGeneration,
    Gemma3TextConfig,
    Gemma4Config,
    Gemma4ForConditionalGeneration,
    Gemma4VisionConfig,
    GitConfig,
    GitForCausalLM,
    LlavaConfig,
    LlavaForConditionalGeneration,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    RemBertConfig,
    SiglipVisionConfig,
)

from peft_ipt import InstancePromptConfig, PrefixTuningV2Config
from peft_ipt.attention import NOT_TOKENS_ATTR, SITE_ATTR, UnsupportedModelError

IMAGE = 127  # the image placeholder token; a 16x16 image in 8x8 patches fills 4 of them
IMAGE_TOKENS = 4
TINY = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4}
TINY_VISION = {**TINY, "image_size": 16, "patch_size": 8}

CASES = {
    "prefix_v2": lambda: PrefixTuningV2Config(task_type="CAUSAL_LM", prefix_length=4, init_weights=False),
    "ipt": lambda: InstancePromptConfig(task_type="CAUSAL_LM", prompt_length=4, init_weights=False),
    "ipt_hidden": lambda: InstancePromptConfig(
        task_type="CAUSAL_LM",
        prompt_length=4,
        injection="prefix",
        instance_source="hidden",
        init_weights=False,
    ),
}


def tiny_llava() -> LlavaForConditionalGeneration:
    vision = CLIPVisionConfig(**TINY_VISION, projection_dim=32)
    config = LlavaConfig(text_config=CONFIGS["llama"](), vision_config=vision, image_token_index=IMAGE)
    torch.manual_seed(0)
    return LlavaForConditionalGeneration(config).eval()


def image_batch(batch: int = 2, length: int = 12) -> tuple[torch.Tensor, torch.Tensor]:
    """input_ids with the image's placeholder tokens after the first token, and one random image per row. The text
    (12 tokens) is longer than the vision tower's learned positions (5)."""
    ids = token_batch(batch, length, low=3).clamp(max=IMAGE - 1)
    ids[:, 1 : 1 + IMAGE_TOKENS] = IMAGE
    return ids, torch.randn(batch, 3, 16, 16, generator=torch.Generator().manual_seed(2))


@pytest.fixture(scope="module")
def base():
    return tiny_llava()


@pytest.mark.parametrize("case", list(CASES))
def test_the_language_model_takes_the_prefixes_and_the_vision_tower_none(base, case):
    model = get_peft_model(copy.deepcopy(base), CASES[case]()).eval()
    prefixed = [name for name, module in model.named_modules() if SITE_ATTR in module.__dict__]
    assert prefixed == [f"base_model.model.model.language_model.layers.{i}.self_attn" for i in range(2)]
    vision = model.get_base_model().model.vision_tower
    assert vision.config._attn_implementation == "sdpa"
    ids, pixels = image_batch()
    with torch.no_grad():
        logits = model(input_ids=ids, pixel_values=pixels).logits
        with model.disable_adapter():
            bare = model(input_ids=ids, pixel_values=pixels).logits
        assert torch.equal(bare, base(input_ids=ids, pixel_values=pixels).logits)
        assert (logits - bare).abs().max() > 1e-2
        # the image counts: another image, other logits
        assert (model(input_ids=ids, pixel_values=pixels.flip(0)).logits - logits).abs().max() > 1e-3
        # each row of the batch is that row alone (its own image, its own instance prompt)
        for row in range(2):
            alone = model(input_ids=ids[row : row + 1], pixel_values=pixels[row : row + 1]).logits
            torch.testing.assert_close(alone[0], logits[row], atol=1e-5, rtol=0)
        kwargs = {"input_ids": ids, "pixel_values": pixels, "max_new_tokens": 4, "do_sample": False}
        cached = model.generate(**kwargs)
        assert torch.equal(cached, model.generate(**kwargs, use_cache=False))
    # greedy decoding by hand, each step the whole sequence with its image: what generate() gives
    sequence = ids
    with torch.no_grad():
        for _ in range(4):
            step = model(input_ids=sequence, pixel_values=pixels).logits[:, -1].argmax(-1, keepdim=True)
            sequence = torch.cat([sequence, step], dim=1)
    assert torch.equal(cached, sequence)


@pytest.mark.parametrize("case", ["prefix_v2", "ipt"])
def test_training_on_images_reaches_only_the_adapter_and_the_saved_adapter_reloads(base, case, tmp_path):
    torch.manual_seed(0)  # the adapter's initialisation, not whatever the worker ran before
    model = get_peft_model(copy.deepcopy(base), CASES[case]())
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("prefix_v2_encoder" in n or "ipt_encoder" in n for n in trainable)
    ids, pixels = image_batch()
    labels = ids.clone()
    labels[:, : 1 + IMAGE_TOKENS + 3] = -100  # the image and the first words are the source
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    model.train()
    # the instance prompt starts slower: 8 steps gave it 0.04-0.07 over 12 seeds, 20 give 0.17-0.28
    for _ in range(20):
        loss = model(input_ids=ids, pixel_values=pixels, labels=labels).loss
        loss.backward()
        assert all(p.grad is None for n, p in model.named_parameters() if n not in trainable)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05
    model.eval().save_pretrained(tmp_path)
    reloaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(
            reloaded(input_ids=ids, pixel_values=pixels).logits,
            model(input_ids=ids, pixel_values=pixels).logits,
            atol=1e-6,
            rtol=0,
        )


def test_set_attn_implementation_on_the_whole_model_keeps_the_language_models_prefixes(base):
    model = get_peft_model(copy.deepcopy(base), CASES["ipt"]()).eval()
    ids, pixels = image_batch()
    with torch.no_grad():
        sdpa = model(input_ids=ids, pixel_values=pixels).logits
        model.set_attn_implementation("eager")
        torch.testing.assert_close(model(input_ids=ids, pixel_values=pixels).logits, sdpa, atol=1e-5, rtol=0)
    assert (
        model.get_base_model().model.vision_tower.config._attn_implementation == "eager"
    )  # the user's choice


@pytest.mark.parametrize(("field", "value"), [("injection", "input"), ("instance_source", "frozen_model")])
def test_what_cannot_see_the_image_is_refused_on_a_multimodal_model(base, field, value):
    with pytest.raises(
        ValueError, match=rf"{field}='{value}' on a multimodal model \(LlavaForConditionalGeneration\)"
    ):
        get_peft_model(copy.deepcopy(base), InstancePromptConfig(task_type="CAUSAL_LM", **{field: value}))


def tiny_gemma3():
    text = Gemma3TextConfig(
        **TINY,
        vocab_size=128,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=128,
        sliding_window=8,
        pad_token_id=0,
    )
    vision = SiglipVisionConfig(**TINY_VISION)
    config = Gemma3Config(
        text_config=text,
        vision_config=vision,
        mm_tokens_per_image=4,
        image_token_index=IMAGE,
        boi_token_index=125,
        eoi_token_index=126,
    )
    return Gemma3ForConditionalGeneration(config)


def tiny_qwen2_vl():
    text = {
        **TINY,
        "vocab_size": 128,
        "num_key_value_heads": 2,
        "max_position_embeddings": 128,
        "rope_scaling": {"type": "mrope", "mrope_section": [1, 1, 2]},
    }
    vision = {"depth": 2, "embed_dim": 32, "hidden_size": 32, "num_heads": 4, "patch_size": 4}
    config = Qwen2VLConfig(text_config=text, vision_config=vision, image_token_id=IMAGE, video_token_id=126)
    return Qwen2VLForConditionalGeneration(config)


def tiny_gemma4():
    """Gemma 4's language model with prefixes of two shapes (tests/test_architectures.py), a one-layer vision
    tower, no audio tower."""
    vision = Gemma4VisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=4,
        head_dim=8,
    )
    config = Gemma4Config(
        text_config=gemma4_text_config().to_dict(), vision_config=vision.to_dict(), audio_config=None
    )
    return Gemma4ForConditionalGeneration(config)


@pytest.mark.parametrize("build", [tiny_gemma3, tiny_qwen2_vl, tiny_gemma4])
@pytest.mark.parametrize("case", ["prefix_v2", "ipt"])
def test_gemma3_gemma4_and_qwen2_vl_take_the_prefixes_in_their_language_model(build, case):
    torch.manual_seed(0)
    base = build().eval()
    model = get_peft_model(copy.deepcopy(base), CASES[case]()).eval()
    prefixed = [name for name, module in model.named_modules() if SITE_ATTR in module.__dict__]
    n_layers = base.config.get_text_config().num_hidden_layers
    assert prefixed == [
        f"base_model.model.model.language_model.layers.{i}.self_attn" for i in range(n_layers)
    ]
    ids = token_batch(2, 12, low=3).clamp(max=120)  # text only, longer than Gemma 3's sliding window
    with torch.no_grad():
        logits = model(input_ids=ids).logits
        with model.disable_adapter():
            assert torch.equal(model(input_ids=ids).logits, base(input_ids=ids).logits)
        assert (logits - base(input_ids=ids).logits).abs().max() > 1e-2
        kwargs = {"input_ids": ids, "max_new_tokens": 4, "do_sample": False}
        assert torch.equal(model.generate(**kwargs), model.generate(**kwargs, use_cache=False))


def test_an_adapter_moves_to_and_from_peft_prefix_tuning_on_a_multimodal_model(base, tmp_path):
    """peft numbers real tokens from P (its prefix sits in the cache); our side gets those positions passed."""
    from peft import PrefixTuningConfig

    from peft_ipt.interop import export_to_peft_prefix_tuning, import_from_peft_prefix_tuning

    ids, pixels = image_batch()
    positions = (torch.arange(ids.shape[1]) + 4).expand(2, -1)
    ours = get_peft_model(copy.deepcopy(base), CASES["prefix_v2"]()).eval()
    export_to_peft_prefix_tuning(ours, tmp_path / "exported")
    theirs = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "exported").eval()
    peft_model = get_peft_model(
        copy.deepcopy(base), PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4)
    ).eval()
    peft_model.save_pretrained(tmp_path / "peft")
    imported = import_from_peft_prefix_tuning(copy.deepcopy(base), tmp_path / "peft").eval()
    with torch.no_grad():
        torch.testing.assert_close(
            theirs(input_ids=ids, pixel_values=pixels).logits,
            ours(input_ids=ids, pixel_values=pixels, position_ids=positions).logits,
            atol=1e-5,
            rtol=0,
        )
        torch.testing.assert_close(
            imported(input_ids=ids, pixel_values=pixels, position_ids=positions).logits,
            peft_model(input_ids=ids, pixel_values=pixels).logits,
            atol=1e-5,
            rtol=0,
        )


@pytest.mark.parametrize("case", list(CASES))
def test_the_language_model_called_on_its_own_computes_its_own_prompt(base, case):
    """The language model is one of the modules a user may call directly: on text it gives what the whole model's
    last hidden states are, whatever the whole model ran on before."""
    model = get_peft_model(copy.deepcopy(base), CASES[case]()).eval()
    language_model = model.get_base_model().model.language_model
    ids = token_batch(2, 9, low=3).clamp(max=IMAGE - 1)
    images, pixels = image_batch()
    with torch.no_grad():
        whole = model(input_ids=ids, output_hidden_states=True).hidden_states[-1]
        model(input_ids=images, pixel_values=pixels)  # another call in between
        alone = language_model(input_ids=ids).last_hidden_state
    torch.testing.assert_close(alone, whole, atol=1e-5, rtol=0)  # both after the final norm


# -- EncoderDecoderModel ---------------------------------------------------------------------------------------


def two_berts() -> EncoderDecoderModel:
    decoder = CONFIGS["bert"]()
    decoder.is_decoder, decoder.add_cross_attention = True, True
    config = EncoderDecoderConfig.from_encoder_decoder_configs(CONFIGS["bert"](), decoder)
    config.decoder_start_token_id, config.pad_token_id = 2, 0
    torch.manual_seed(0)
    return EncoderDecoderModel(config=config).eval()


def bert_with_a_rembert(half: str) -> EncoderDecoderModel:
    """Two BERTs, one half a RemBERT: a model type served on a path of its own, off the registry."""
    bert, rembert = (
        CONFIGS["bert"](),
        RemBertConfig(
            vocab_size=VOCAB,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=64,
            input_embedding_size=16,
            output_embedding_size=16,
            pad_token_id=0,
        ),
    )
    encoder, decoder = (rembert, bert) if half == "encoder" else (bert, rembert)
    decoder.is_decoder, decoder.add_cross_attention = True, True
    config = EncoderDecoderConfig.from_encoder_decoder_configs(encoder, decoder)
    config.decoder_start_token_id, config.pad_token_id = 2, 0
    torch.manual_seed(0)
    return EncoderDecoderModel(config=config).eval()


@pytest.mark.parametrize("half", ["encoder", "decoder"])
def test_an_encoder_decoder_model_with_a_half_off_the_registry_refuses_its_prefix_and_serves_the_other(half):
    """The registry path cannot open a RemBERT half inside EncoderDecoderModel: before, that half silently took no
    prefix while encoder_prefix=None means "on where the model has it"."""
    off = {"encoder_prefix": False} if half == "encoder" else {"decoder_prefix": False, "cross_prefix": False}
    with pytest.raises(ValueError, match=rf"{half}_prefix=None: EncoderDecoderModel's {half} is RemBert"):
        get_peft_model(
            bert_with_a_rembert(half), PrefixTuningV2Config(task_type="SEQ_2_SEQ_LM", prefix_length=3)
        )
    base = bert_with_a_rembert(half)
    config = PrefixTuningV2Config(task_type="SEQ_2_SEQ_LM", prefix_length=3, init_weights=False, **off)
    model = get_peft_model(copy.deepcopy(base), config).eval()
    kinds = {module.__dict__[SITE_ATTR].kind for module in model.modules() if SITE_ATTR in module.__dict__}
    assert kinds == ({"decoder", "cross"} if half == "encoder" else {"encoder"})
    call = {"input_ids": token_batch(2, 7), "decoder_input_ids": token_batch(2, 5, seed=3)}
    with torch.no_grad():
        tuned, bare = model(**call), base(**call)
    # the half that takes the prefix moves: the decoder's logits, or the encoder's states
    output = "logits" if half == "encoder" else "encoder_last_hidden_state"
    assert (tuned[output] - bare[output]).abs().max() > 1e-3


@pytest.mark.parametrize("case", ["prefix_v2", "ipt"])
def test_an_encoder_decoder_model_of_two_berts_takes_encoder_decoder_and_cross_prefixes(case, tmp_path):
    """Its config holds no sizes of its own (they are its encoder's and decoder's): before, "cannot read the hidden
    size of EncoderDecoderConfig"."""
    base = two_berts()
    config = CASES[case]()
    config.task_type = "SEQ_2_SEQ_LM"
    model = get_peft_model(copy.deepcopy(base), config).eval()
    sites = [
        (
            name.removeprefix("base_model.model."),
            module.__dict__[SITE_ATTR].kind,
            module.__dict__[SITE_ATTR].layer,
        )
        for name, module in model.named_modules()
        if SITE_ATTR in module.__dict__
    ]
    assert sites == [
        ("encoder.encoder.layer.0.attention.self", "encoder", 0),
        ("encoder.encoder.layer.1.attention.self", "encoder", 1),
        ("decoder.bert.encoder.layer.0.attention.self", "decoder", 0),
        ("decoder.bert.encoder.layer.0.crossattention.self", "cross", 0),
        ("decoder.bert.encoder.layer.1.attention.self", "decoder", 1),
        ("decoder.bert.encoder.layer.1.crossattention.self", "cross", 1),
    ]
    ids, decoder_ids = token_batch(2, 7), token_batch(2, 5, seed=3)
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    call = {"input_ids": ids, "attention_mask": mask, "decoder_input_ids": decoder_ids}
    with torch.no_grad():
        logits = model(**call).logits
        with model.disable_adapter():
            assert torch.equal(model(**call).logits, base(**call).logits)
        assert (logits - base(**call).logits).abs().max() > 1e-3
        alone = model(input_ids=ids[1:, :5], decoder_input_ids=decoder_ids[1:]).logits
        torch.testing.assert_close(alone[0], logits[1], atol=1e-5, rtol=0)
        kwargs = {"input_ids": ids, "attention_mask": mask, "max_new_tokens": 5, "do_sample": False}
        generated = model.generate(**kwargs)
        assert torch.equal(generated, model.generate(**kwargs, use_cache=False))
        by_hand = torch.full((2, 1), 2)
        for _ in range(5):
            step = model(input_ids=ids, attention_mask=mask, decoder_input_ids=by_hand).logits[:, -1]
            by_hand = torch.cat([by_hand, step.argmax(-1, keepdim=True)], dim=1)
        assert torch.equal(generated, by_hand)
    model.train()
    model(**call, labels=decoder_ids).loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and g.abs().sum() > 0 for g in grads)
    model.eval().save_pretrained(tmp_path)
    reloaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**call).logits, logits, atol=1e-6, rtol=0)


# -- multimodal encoder-decoders: BLIP-2 on Flan-T5, Florence-2 (a BART) -------------------------------------------


def blip2_on_t5() -> tuple[transformers.Blip2ForConditionalGeneration, dict, int]:
    """BLIP-2 with a T5 language model (blip2-flan-t5-*): 4 query tokens from the Q-Former in front of the text."""
    vision = {**TINY_VISION, "num_hidden_layers": 1}
    qformer = {**TINY, "vocab_size": VOCAB, "num_hidden_layers": 1, "encoder_hidden_size": 32}
    config = transformers.Blip2Config(
        vision_config=vision,
        qformer_config=qformer,
        text_config=CONFIGS["t5"]().to_dict(),
        num_query_tokens=IMAGE_TOKENS,
        image_token_index=IMAGE,
    )
    torch.manual_seed(0)
    model = transformers.Blip2ForConditionalGeneration(config).eval()
    return model, {"pixel_values": torch.randn(2, 3, 16, 16)}, IMAGE_TOKENS


def florence2() -> tuple[transformers.Florence2ForConditionalGeneration, dict, int]:
    """Florence-2: a two-stage DaViT whose 5 image tokens (a 16x16 image in 2x2 patches, and their mean) go in front
    of a BART's input."""
    vision = {"depths": [1, 1], "patch_size": [7, 3], "patch_stride": [4, 2], "patch_padding": [3, 1]}
    vision |= {
        "patch_prenorm": [False, True],
        "embed_dim": [16, 32],
        "num_heads": [2, 4],
        "num_groups": [2, 4],
    }
    vision |= {
        "window_size": 2,
        "projection_dim": 32,
        "max_position_embeddings": 8,
        "max_temporal_embeddings": 4,
    }
    config = transformers.Florence2Config(
        text_config=CONFIGS["bart"]().to_dict(), vision_config=vision, image_token_id=IMAGE
    )
    torch.manual_seed(0)
    model = transformers.Florence2ForConditionalGeneration(config).eval()
    return model, {"pixel_values": torch.randn(2, 3, 16, 16)}, IMAGE_TOKENS + 1


@pytest.mark.parametrize("build", [blip2_on_t5, florence2])
@pytest.mark.parametrize("case", list(CASES))
def test_a_multimodal_encoder_decoder_takes_the_prefixes_in_its_language_model(build, case, tmp_path):
    """BLIP-2 on Flan-T5 and Florence-2 hold an encoder-decoder language model built from their text config. Before,
    "cannot read the hidden size of Blip2Config" (or Florence2Config): the whole model was taken for the language
    model. Now its encoder, decoder and cross-attention layers take prefixes, the vision tower and Q-Former none; a
    padded row scores as alone, generation equals decoding by hand, and the saved adapter reloads."""
    base, image, image_tokens = build()
    config = CASES[case]()
    config.task_type = "SEQ_2_SEQ_LM"
    model = get_peft_model(copy.deepcopy(base), config).eval()
    sites = [
        (name, module.__dict__[SITE_ATTR].kind)
        for name, module in model.named_modules()
        if SITE_ATTR in module.__dict__
    ]
    assert all(".language_model." in name for name, _ in sites)
    assert [kind for _, kind in sites].count("encoder") == 2
    assert sorted({kind for _, kind in sites}) == ["cross", "decoder", "encoder"]
    text = token_batch(2, 7).clamp(max=IMAGE - 1)
    ids = torch.cat([torch.full((2, image_tokens), IMAGE), text], 1)
    mask = torch.ones_like(ids)
    mask[1, -2:] = 0
    decoder_ids = token_batch(2, 5, seed=3)
    call = {"input_ids": ids, "attention_mask": mask, "decoder_input_ids": decoder_ids, **image}
    with torch.no_grad():
        logits = model(**call).logits
        with model.disable_adapter():
            torch.testing.assert_close(model(**call).logits, base(**call).logits, atol=0, rtol=0)
        assert (logits - base(**call).logits).abs().max() > 1e-3
        row = {"pixel_values": image["pixel_values"][1:], "decoder_input_ids": decoder_ids[1:]}
        alone = model(input_ids=ids[1:, :-2], **row).logits
        torch.testing.assert_close(alone[0], logits[1], atol=1e-5, rtol=0)
        kwargs = {"input_ids": ids, "attention_mask": mask, "max_new_tokens": 4, "min_new_tokens": 4, **image}
        generated = model.generate(**kwargs, do_sample=False)
        start = generated[:, :1]
        by_hand = start
        for _ in range(4):
            step = model(input_ids=ids, attention_mask=mask, decoder_input_ids=by_hand, **image).logits[:, -1]
            step[:, config_eos(base)] = float("-inf")  # min_new_tokens holds the end off
            by_hand = torch.cat([by_hand, step.argmax(-1, keepdim=True)], dim=1)
        assert torch.equal(generated[:, -5:], by_hand)
    model.train()
    model(**call, labels=decoder_ids).loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)
    model.eval().save_pretrained(tmp_path)
    reloaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**call).logits, logits, atol=1e-6, rtol=0)


def config_eos(model) -> int:
    return model.config.get_text_config().eos_token_id


def test_git_is_refused_where_only_its_image_encoder_could_take_prefixes():
    """GIT's text layers compute attention themselves; only its image encoder's go through transformers' registry.
    Before, the prefixes went there alone (no effect on text-only calls) and the image encoder's 5 learned positions
    capped the text at 5 tokens."""
    config = GitConfig(
        **TINY,
        vocab_size=128,
        max_position_embeddings=64,
        pad_token_id=0,
        vision_config=TINY_VISION | {"num_hidden_layers": 1},
    )
    with pytest.raises(ValueError, match=r"GitForCausalLM \(git\): no attention modules found"):
        get_peft_model(GitForCausalLM(config), CASES["prefix_v2"]())


def tiny_moss():
    """MOSS-Transcribe-Diarize around a tiny Qwen3: its forward names no position_ids, only ``**kwargs``, which it
    hands on to the Qwen3."""
    if not hasattr(transformers, "MossTranscribeDiarizeConfig"):
        pytest.skip(f"transformers {transformers.__version__} has no MOSS-Transcribe-Diarize")
    text = {
        "model_type": "qwen3",
        **TINY,
        "num_key_value_heads": 2,
        "head_dim": 8,
        "max_position_embeddings": 64,
    }
    config = transformers.MossTranscribeDiarizeConfig(
        audio_config={
            "hidden_size": 32,
            "num_hidden_layers": 1,
            "num_attention_heads": 4,
            "intermediate_size": 64,
        },
        text_config={**text, "vocab_size": VOCAB, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2},
    )
    torch.manual_seed(0)
    return transformers.MossTranscribeDiarizeForConditionalGeneration(config).eval()


@pytest.mark.parametrize("case", ["prefix_v2", "ipt"])
@pytest.mark.parametrize("build", ["fuyu", "llava", "moss", "qwen2_vl"])
def test_a_left_padded_row_of_a_composite_rotary_model_gets_its_logits_alone(build, case):
    # A model built of submodels around a rotary language model (Fuyu around Persimmon, Llava around Llama) numbers
    # text positions along the text; the prefix's keys carry none, so a left-padded row called without
    # position_ids must be renumbered from its first token, as for a plain rotary decoder (Fuyu's row was 3.7e-2
    # off the row alone, silently; MOSS-Transcribe-Diarize's 3.1e-2, its forward taking position_ids only through
    # **kwargs).
    from transformers import FuyuConfig, FuyuForCausalLM

    if build == "moss":
        bare_model = tiny_moss()
    elif build == "qwen2_vl":  # multimodal rotary positions, numbered along the text when a call has no image
        torch.manual_seed(0)
        bare_model = tiny_qwen2_vl().eval()
    elif build == "fuyu":
        config = FuyuConfig(
            vocab_size=VOCAB,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=64,
            max_position_embeddings=64,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
            patch_size=4,
        )
        torch.manual_seed(0)
        bare_model = FuyuForCausalLM(config).eval()
    else:
        bare_model = tiny_llava()
    model = get_peft_model(bare_model, CASES[case]()).eval()
    row = token_batch(1, 6, low=3)
    padded = torch.cat([torch.zeros(1, 2, dtype=torch.long), row], 1)
    mask = torch.cat([torch.zeros(1, 2, dtype=torch.long), torch.ones_like(row)], 1)
    with torch.no_grad():
        alone = model(input_ids=row, attention_mask=torch.ones_like(row)).logits
        together = model(input_ids=padded, attention_mask=mask).logits[:, 2:]
        with model.disable_adapter():  # the bare model gives it its logits alone too
            bare = model(input_ids=padded, attention_mask=mask).logits[:, 2:]
            bare_alone = model(input_ids=row).logits
    torch.testing.assert_close(bare, bare_alone, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(together, alone, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("case", ["prefix_v2", "ipt"])
def test_qwen2_vl_numbers_a_call_with_an_image_itself_and_a_left_padded_text_row_generates_as_alone(case):
    """Qwen2-VL numbers a call with an image from its attention mask (get_rope_index, then rope_deltas in each
    decoding step), and a call with text alone along the padding: peft-ipt renumbers the latter only. A left-padded
    call with an image computes what it computes with the positions get_rope_index gives, and generates as the row
    alone; a left-padded text row generates as alone."""
    torch.manual_seed(0)
    model = get_peft_model(tiny_qwen2_vl().eval(), CASES[case]()).eval()
    model.generation_config.eos_token_id = None
    pad = torch.zeros(1, 2, dtype=torch.long)
    row = token_batch(1, 8, low=3).clamp(max=120)
    with_image = row.clone()
    with_image[0, 2:6] = IMAGE  # a 4x4 grid of 4x4 patches, merged 2x2: four image tokens on a 2x2 grid
    image = {"pixel_values": torch.randn(16, 3 * 2 * 4 * 4), "image_grid_thw": torch.tensor([[1, 4, 4]])}
    ids = torch.cat([pad, with_image], 1)
    mask = torch.cat([pad, torch.ones_like(row)], 1)
    types = (ids == IMAGE).long()
    positions, _ = model.base_model.model.model.get_rope_index(
        ids, image_grid_thw=image["image_grid_thw"], attention_mask=mask, mm_token_type_ids=types
    )
    assert not torch.equal(
        positions[1], positions[0]
    )  # the image tokens' rows and columns: not text positions
    call = {"input_ids": ids, "attention_mask": mask, "mm_token_type_ids": types, **image}
    with torch.no_grad():
        torch.testing.assert_close(model(**call).logits, model(**call, position_ids=positions).logits)
    kwargs = {"max_new_tokens": 4, "do_sample": False, "output_scores": True, "return_dict_in_generate": True}
    alone_call = {"input_ids": with_image, "attention_mask": torch.ones_like(row), **image}
    for padded_call, row_call in (
        ({"input_ids": torch.cat([pad, row], 1), "attention_mask": mask}, {"input_ids": row}),
        (call, alone_call | {"mm_token_type_ids": (with_image == IMAGE).long()}),
    ):
        with torch.no_grad():
            alone = model.generate(**row_call, **kwargs)
            padded = model.generate(**padded_call, **kwargs)
        assert torch.equal(alone.sequences[0], padded.sequences[0, 2:])
        for a, b in zip(alone.scores, padded.scores, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


# -- towers that are not the text's: Idefics' vision transformer (a plain module), Evolla's protein encoder ---------


def idefics() -> transformers.IdeficsForVisionText2Text:
    vision = {"embed_dim": 32, "image_size": 30, "patch_size": 10, "num_hidden_layers": 1}
    config = transformers.IdeficsConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,  # the vision tower's heads have the text's shape, so nothing refused it
        cross_layer_interval=2,
        max_position_embeddings=64,
        vision_config={**vision, "num_attention_heads": 4, "intermediate_size": 64},
        perceiver_config={"use_resampler": False},
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(0)
    return transformers.IdeficsForVisionText2Text(config).eval()


def evolla() -> transformers.EvollaForProteinText2Text:
    protein = {"vocab_size": 64, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4}
    config = transformers.EvollaConfig(
        protein_encoder_config={**protein, "intermediate_size": 64, "max_position_embeddings": 64},
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        aligner_num_add_layers=2,
        resampler_num_latents=4,
        resampler_depth=1,
        resampler_dim_head=8,
        resampler_heads=4,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(0)
    return transformers.EvollaForProteinText2Text(config).eval()


def phi4_multimodal() -> transformers.Phi4MultimodalForCausalLM:
    audio = {"hidden_size": 32, "intermediate_size": 64, "num_blocks": 2, "num_attention_heads": 4}
    audio |= {"ext_pw_out_channel": 32, "depthwise_seperable_out_channel": 32, "nemo_conv_channels": 32}
    vision = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 4}
    config = transformers.Phi4MultimodalConfig(
        **TINY | {"vocab_size": 200},
        num_key_value_heads=2,
        max_position_embeddings=64,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        audio_config=audio,
        vision_config=vision | {"image_size": 16, "patch_size": 8, "crop_size": 16},
    )
    torch.manual_seed(0)
    return transformers.Phi4MultimodalForCausalLM(config).eval()


@pytest.mark.parametrize(
    ("build", "tower"),
    [(idefics, "vision_model."), (evolla, "protein_encoder."), (phi4_multimodal, "audio_embed.encoder.")],
)
def test_a_tower_that_is_not_the_texts_takes_no_text_prefix(build, tower):
    """Before, Idefics' image patches (its vision transformer is a plain module, not a model with a main input)
    and Evolla's protein tokens attended to the text layers' prefixes where their heads had the text's shape;
    Phi-4-multimodal's audio encoder (a model that names no main input, inside the text model's embedding) was
    taken for text layers 0..23 beside the text's own."""
    model = get_peft_model(build(), PrefixTuningV2Config(task_type="CAUSAL_LM", prefix_length=3))
    sited = [name for name, m in model.named_modules() if SITE_ATTR in m.__dict__]
    assert sited and not [name for name in sited if f".{tower}" in f".{name}"]


def kosmos2() -> transformers.Kosmos2ForConditionalGeneration:
    text = {"vocab_size": VOCAB, "embed_dim": 32, "layers": 2, "attention_heads": 4, "ffn_dim": 64}
    config = transformers.Kosmos2Config(
        text_config={**text, "max_position_embeddings": 64, "pad_token_id": 1},
        vision_config={**TINY_VISION, "num_hidden_layers": 1},
        latent_query_num=IMAGE_TOKENS,
    )
    torch.manual_seed(0)
    return transformers.Kosmos2ForConditionalGeneration(config).eval()


@pytest.mark.parametrize("case", list(CASES))
def test_kosmos2s_image_projection_attends_as_without_the_adapter(case, tmp_path):
    """Kosmos-2's image-to-text projection is an attention module of the text's class, outside the language model,
    reading the text config: once the language model's attention implementation was switched it reached peft-ipt's
    attention, and every call with an image failed ("KosmosTextAttention was not prepared for prefixes"). It takes no
    prefix: the image features are the base model's; the text layers take theirs."""
    base = kosmos2()
    model = get_peft_model(copy.deepcopy(base), CASES[case]()).eval()
    ids = token_batch(2, 10, low=3)
    image_positions = torch.zeros_like(ids)
    image_positions[:, 1 : 1 + IMAGE_TOKENS] = 1
    mask = torch.ones_like(ids)
    mask[1, -3:] = 0
    pixels = torch.randn(2, 3, 16, 16)
    call = {"input_ids": ids, "attention_mask": mask, "pixel_values": pixels}
    call["image_embeds_position_mask"] = image_positions
    with torch.no_grad():
        out, plain = model(**call), base(**call)
        assert torch.equal(out.image_embeds, plain.image_embeds)
        assert (out.logits - plain.logits).abs().max() > 1e-2
        with model.disable_adapter():
            assert torch.equal(model(**call).logits, plain.logits)
        row = {"pixel_values": pixels[1:], "image_embeds_position_mask": image_positions[1:, :7]}
        alone = model(input_ids=ids[1:, :7], **row).logits
        torch.testing.assert_close(alone[0], out.logits[1, :7], atol=1e-5, rtol=0)
        kwargs = {**call, "max_new_tokens": 4, "min_new_tokens": 4, "do_sample": False}
        assert torch.equal(model.generate(**kwargs), model.generate(**kwargs, use_cache=False))
    model.save_pretrained(tmp_path)
    reloaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**call).logits, out.logits, atol=1e-6, rtol=0)
    unloaded = reloaded.unload()
    assert not [m for m in unloaded.modules() if NOT_TOKENS_ATTR in m.__dict__ or SITE_ATTR in m.__dict__]
    with torch.no_grad():
        assert torch.equal(unloaded(**call).logits, plain.logits)


def mllama() -> transformers.MllamaForConditionalGeneration:
    """Llama 3.2 Vision: self-attention at layers 0 and 2, cross-attention to one 16x16 image tile at 1 and 3."""
    vision = {"hidden_size": 32, "num_hidden_layers": 2, "num_global_layers": 1, "attention_heads": 4}
    vision |= {"intermediate_size": 64, "image_size": 16, "patch_size": 8, "vision_output_dim": 64}
    vision |= {"intermediate_layers_indices": [0], "max_num_tiles": 1, "supported_aspect_ratios": [[1, 1]]}
    text = {**TINY, "num_hidden_layers": 4, "num_key_value_heads": 2, "cross_attention_layers": [1, 3]}
    text |= {"vocab_size": VOCAB, "max_position_embeddings": 64, "pad_token_id": 0, "eos_token_id": 2}
    config = transformers.MllamaConfig(vision_config=vision, text_config=text, image_token_index=IMAGE)
    torch.manual_seed(0)
    return transformers.MllamaForConditionalGeneration(config).eval()


@pytest.mark.parametrize("case", list(CASES))
def test_mllamas_image_cross_attention_runs_as_without_the_adapter(case, tmp_path):
    """Mllama's cross-attention layers (to the image) carry no ``is_causal``, so they were not taken for attention
    layers, yet they call the attention interface of the language model's config: every call with an image failed
    ("MllamaTextCrossAttention was not prepared for prefixes"). They take no prefix; the self-attention layers take
    theirs, and a left-padded row with its image scores and generates as alone."""
    base = mllama()
    model = get_peft_model(copy.deepcopy(base), CASES[case]()).eval()
    sites = [name for name, module in model.named_modules() if SITE_ATTR in module.__dict__]
    assert sites == [f"base_model.model.model.language_model.layers.{i}.self_attn" for i in (0, 2)]
    ids = token_batch(2, 10, low=3).clamp(max=IMAGE - 1)
    ids[0, 0] = ids[1, 3] = IMAGE
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # row 1 is left-padded
    image = {
        "pixel_values": torch.randn(2, 1, 1, 3, 16, 16),
        "aspect_ratio_ids": torch.ones(2, 1, dtype=torch.long),
        "aspect_ratio_mask": torch.ones(2, 1, 1, dtype=torch.long),
    }
    call = {"input_ids": ids, "attention_mask": mask, "cross_attention_mask": mask[:, :, None, None], **image}
    with torch.no_grad():
        logits = model(**call).logits
        with model.disable_adapter():
            assert torch.equal(model(**call).logits, base(**call).logits)
        assert (logits - base(**call).logits).abs().max() > 1e-2
        row = {key: value[1:] for key, value in image.items()}
        alone = model(input_ids=ids[1:, 3:], cross_attention_mask=mask[1:, 3:, None, None], **row).logits
        torch.testing.assert_close(alone[0], logits[1, 3:], atol=1e-5, rtol=0)
        kwargs = {**call, "max_new_tokens": 4, "min_new_tokens": 4, "do_sample": False}
        assert torch.equal(model.generate(**kwargs), model.generate(**kwargs, use_cache=False))
    model.save_pretrained(tmp_path)
    reloaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**call).logits, logits, atol=1e-6, rtol=0)


def paligemma() -> transformers.PaliGemmaForConditionalGeneration:
    text = transformers.GemmaConfig(
        **TINY,
        vocab_size=VOCAB,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=128,
        pad_token_id=0,
    )
    config = transformers.PaliGemmaConfig(
        text_config=text.to_dict(),
        vision_config=SiglipVisionConfig(**TINY_VISION).to_dict(),
        image_token_index=IMAGE,
        projection_dim=32,
    )
    torch.manual_seed(0)
    return transformers.PaliGemmaForConditionalGeneration(config).eval()


@pytest.mark.parametrize("case", list(CASES))
def test_a_left_padded_paligemma_row_with_its_image_scores_as_alone(case):
    """PaliGemma numbers positions from 1. peft-ipt renumbered a left-padded batch from 0, so every row sat one
    position off the model's own numbering, which the prefixes' position-free keys see: the padded row was off its
    logits alone (4e-4 with prefix_v2, 7e-3 with IPT). And its config's own hidden_size (a default 2048) was taken
    for the width of the language model's hidden states: the hidden source failed at the first call."""
    model = get_peft_model(paligemma(), CASES[case]()).eval()
    ids = token_batch(2, 14, low=3).clamp(max=IMAGE - 1)
    ids[0, :IMAGE_TOKENS] = ids[1, 3 : 3 + IMAGE_TOKENS] = IMAGE
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # row 1: three padding tokens, then its image and text
    kinds = torch.zeros_like(ids)
    kinds[:, -3:] = 1  # the suffix, attended causally; the image and prompt before it bidirectionally
    pixels = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        batch = model(input_ids=ids, attention_mask=mask, pixel_values=pixels, token_type_ids=kinds).logits
        alone = model(input_ids=ids[1:, 3:], pixel_values=pixels[1:], token_type_ids=kinds[1:, 3:]).logits
        torch.testing.assert_close(alone[0], batch[1, 3:], atol=1e-5, rtol=0)
        # generate() numbers positions from the mask itself, PaliGemma's own generation path; there its padded rows
        # differ from alone by 1e-3 without an adapter too, so that is not compared
        kwargs = {"input_ids": ids, "attention_mask": mask, "pixel_values": pixels, "max_new_tokens": 4}
        assert torch.equal(model.generate(**kwargs), model.generate(**kwargs, use_cache=False))


def test_gpt2_upcast_attention_under_eager_is_refused_and_served_under_sdpa():
    """GPT-2 upcasts its scores (reorder_and_upcast_attn) only under the name "eager"; under peft-ipt's name it
    would silently attend without the upcast. sdpa never upcasts, adapter or not."""
    config = transformers.GPT2Config(
        vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, reorder_and_upcast_attn=True
    )
    eager = transformers.GPT2LMHeadModel._from_config(config, attn_implementation="eager")
    with pytest.raises(
        UnsupportedModelError, match=r"reorder_and_upcast_attn=True.*attn_implementation='sdpa'"
    ):
        get_peft_model(eager, PrefixTuningV2Config(task_type="CAUSAL_LM", prefix_length=3))
    assert not any(SITE_ATTR in m.__dict__ for m in eager.modules())  # refused before anything was installed
    sdpa = transformers.GPT2LMHeadModel._from_config(config, attn_implementation="sdpa")
    model = get_peft_model(sdpa, PrefixTuningV2Config(task_type="CAUSAL_LM", prefix_length=3)).eval()
    ids = token_batch()
    model(input_ids=ids)
    model.base_model.model.set_attn_implementation("eager")  # switched afterwards: refused at the next call
    with pytest.raises(UnsupportedModelError, match="reorder_and_upcast_attn=True"):
        model(input_ids=ids)
