"""Models that read no tokens: speech (Whisper, Speech2Text, Wav2Vec2, Moonshine) and vision (ViT, Pix2Struct). On
Whisper prefixes enter the encoder's, the decoder's and the cross-attention layers as on BART; the instance prompt is
built from the encoder's hidden states (only those a padded call's attention_mask keeps), and the sources that read
input_ids are refused. peft's PrefixTuning runs neither task type on Whisper."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel, get_peft_model
from transformers import (
    MoonshineConfig,
    MoonshineForConditionalGeneration,
    Pix2StructConfig,
    Pix2StructForConditionalGeneration,
    Speech2TextConfig,
    Speech2TextForConditionalGeneration,
    ViTConfig,
    ViTForImageClassification,
    Wav2Vec2Config,
    Wav2Vec2ForSequenceClassification,
    WhisperConfig,
    WhisperForAudioClassification,
    WhisperForCausalLM,
    WhisperForConditionalGeneration,
)

from peft_ipt import InstancePromptConfig, PrefixTuningV2Config
from peft_ipt.attention import SITE_ATTR

START = 1


def whisper_config(**overrides) -> WhisperConfig:
    settings = dict(
        vocab_size=60,
        num_mel_bins=8,
        encoder_layers=2,
        decoder_layers=2,
        d_model=16,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=32,
        decoder_ffn_dim=32,
        max_source_positions=16,
        max_target_positions=32,
        decoder_start_token_id=START,
        pad_token_id=0,
        bos_token_id=START,
        eos_token_id=None,  # a random model may end early; the manual loop does not
        suppress_tokens=None,
        begin_suppress_tokens=None,
    )
    return WhisperConfig(**(settings | overrides))


def whisper(seed: int = 0) -> WhisperForConditionalGeneration:
    torch.manual_seed(seed)
    return WhisperForConditionalGeneration(whisper_config()).eval()


def features(batch: int = 2, seed: int = 1) -> torch.Tensor:
    # (batch, mel bins, frames): the encoder's two convolutions halve 32 frames to its 16 positions
    return torch.randn(batch, 8, 32, generator=torch.Generator().manual_seed(seed))


def targets(batch: int = 2) -> torch.Tensor:
    return torch.randint(3, 60, (batch, 5), generator=torch.Generator().manual_seed(7))


METHODS = {  # init_weights=False: the instance heads start away from zero, so every weight gets a gradient at once
    "prefix_v2": lambda task: PrefixTuningV2Config(task_type=task, prefix_length=3, init_weights=False),
    "ipt_hidden": lambda task: InstancePromptConfig(
        task_type=task, prompt_length=3, instance_source="hidden", init_weights=False
    ),
    "ipt_hidden_prefix": lambda task: InstancePromptConfig(
        task_type=task, prompt_length=3, instance_source="hidden", injection="prefix", init_weights=False
    ),
}
TASKS = [
    None,
    "SEQ_2_SEQ_LM",
]  # SEQ_2_SEQ_LM: peft's wrapper passes input_ids=None, which Whisper hands on twice


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("method", list(METHODS))
def test_a_whisper_prefix_changes_the_logits_trains_and_disables_exactly(method, task):
    base, audio, labels = whisper(), features(), targets()
    with torch.no_grad():
        reference = base(input_features=audio, labels=labels).logits
    model = get_peft_model(base, METHODS[method](task))
    model.train()
    out = model(input_features=audio, labels=labels)
    assert out.logits.shape == reference.shape and not torch.allclose(out.logits, reference, atol=1e-4)
    out.loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads.values())
    sites = {kind for kind, _ in model.base_model._prefixes} if model.base_model._prefixes else set()
    assert sites == {"encoder", "decoder", "cross"}
    model.eval()
    with model.disable_adapter(), torch.no_grad():
        assert torch.equal(model(input_features=audio, labels=labels).logits, reference)


def test_a_whisper_prefix_lowers_the_loss_when_trained():
    base = whisper()
    torch.manual_seed(0)  # the adapter's initialisation, not whatever the worker ran before
    model = get_peft_model(base, METHODS["ipt_hidden"]("SEQ_2_SEQ_LM"))
    model.train()
    audio, labels = features(), targets()
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=3e-2)
    losses = []
    for _ in range(30):
        loss = model(input_features=audio, labels=labels).loss
        losses.append(loss.item())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert losses[-1] < losses[0] - 0.1  # a tiny random model: it falls 0.12-0.15 over adapter seeds 0-7


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("method", ["prefix_v2", "ipt_hidden"])
def test_whisper_generates_the_same_with_and_without_the_cache_and_as_a_manual_loop(method, task):
    model = get_peft_model(whisper(), METHODS[method](task)).eval()
    audio = features()
    with torch.no_grad():
        cached = model.generate(input_features=audio, max_new_tokens=5, do_sample=False)
        uncached = model.generate(input_features=audio, max_new_tokens=5, do_sample=False, use_cache=False)
        manual = torch.full((2, 1), START)
        for _ in range(5):
            step = model(input_features=audio, decoder_input_ids=manual).logits[:, -1:].argmax(-1)
            manual = torch.cat([manual, step], dim=1)
    assert torch.equal(cached, uncached)
    assert torch.equal(cached, manual[:, -cached.shape[1] :])  # Whisper's generate may drop the start token


def test_each_whisper_row_gets_its_own_instance_prompt_and_equals_that_row_alone():
    config = METHODS["ipt_hidden"]("SEQ_2_SEQ_LM")
    config.instance_scale = 1.0  # at the default 0.05 another row's prompt moves the logits by less than 1e-4
    model = get_peft_model(whisper(), config).eval()
    audio, labels = features(3), targets(3)
    with torch.no_grad():
        together = model(input_features=audio, decoder_input_ids=labels).logits
        alone = [
            model(input_features=audio[i : i + 1], decoder_input_ids=labels[i : i + 1]).logits
            for i in range(3)
        ]
        # another row's audio gives another prompt: the same decoder input scores differently
        swapped = model(input_features=audio[[1, 0, 2]], decoder_input_ids=labels).logits
    for i in range(3):
        torch.testing.assert_close(together[i : i + 1], alone[i], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(swapped[0], together[0], atol=1e-4)


@pytest.mark.parametrize("method", ["prefix_v2", "ipt_hidden"])
def test_a_whisper_adapter_saves_and_loads_with_the_same_logits(method, tmp_path):
    model = get_peft_model(whisper(), METHODS[method]("SEQ_2_SEQ_LM")).eval()
    for p in model.parameters():
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.1)  # away from the initialisation a fresh adapter would have
    audio, labels = features(), targets()
    with torch.no_grad():
        expected = model(input_features=audio, decoder_input_ids=labels).logits
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(whisper(), tmp_path).eval()
    assert type(loaded).__name__ == "PeftModelForSeq2SeqLM"
    with torch.no_grad():
        assert torch.equal(loaded(input_features=audio, decoder_input_ids=labels).logits, expected)


@pytest.mark.parametrize(
    "config, field",
    [
        ({}, "instance_source='embeddings'"),
        ({"instance_source": "token_table"}, "instance_source='token_table'"),
        ({"instance_source": "frozen_model"}, "instance_source='frozen_model'"),
        ({"injection": "input"}, "injection='input'"),
    ],
)
def test_an_instance_source_that_reads_input_ids_is_refused_on_whisper_naming_the_hidden_source(
    config, field
):
    with pytest.raises(ValueError) as refused:
        get_peft_model(whisper(), InstancePromptConfig(task_type="SEQ_2_SEQ_LM", **config))
    message = str(refused.value)
    assert field in message and "reads input_features" in message and "instance_source='hidden'" in message


@pytest.mark.parametrize("method", ["prefix_v2", "ipt_hidden"])
def test_whisper_audio_classification_takes_encoder_prefixes(method):
    torch.manual_seed(0)
    base = WhisperForAudioClassification(whisper_config(num_labels=3)).eval()
    audio = features()
    with torch.no_grad():
        reference = base(input_features=audio).logits
    model = get_peft_model(base, METHODS[method]("SEQ_CLS"))
    model.train()
    out = model(input_features=audio, labels=torch.tensor([0, 2]))
    assert not torch.allclose(out.logits, reference, atol=1e-4)
    out.loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads.values())
    model.eval()
    with model.disable_adapter(), torch.no_grad():
        assert torch.equal(model(input_features=audio).logits, reference)


@pytest.mark.parametrize("method", ["prefix_v2", "ipt_hidden"])
def test_whisper_with_more_decoder_heads_than_encoder_heads_takes_prefixes_of_each_stacks_shape(method):
    """WhisperConfig maps num_key_value_heads to the encoder's heads, so a decoder with other heads got prefixes of
    the encoder's shape and every call failed ("the adapter was built for another model")."""
    torch.manual_seed(0)
    base = WhisperForConditionalGeneration(
        whisper_config(encoder_attention_heads=2, decoder_attention_heads=4)
    )
    base.eval()
    audio, labels = features(), targets()
    with torch.no_grad():
        reference = base(input_features=audio, labels=labels).logits
    model = get_peft_model(base, METHODS[method]("SEQ_2_SEQ_LM"))
    shapes = model.peft_config[
        "default"
    ].base_model_shapes  # [layers, key/value heads, head size] of each kind
    assert shapes["encoder"] == [2, 2, 8] and shapes["decoder"] == shapes["cross"] == [2, 4, 4]  # d_model 16
    model.train()
    out = model(input_features=audio, labels=labels)
    assert not torch.allclose(out.logits, reference, atol=1e-4)
    out.loss.backward()
    model.eval()
    with torch.no_grad():
        cached = model.generate(input_features=audio, max_new_tokens=4, do_sample=False)
        uncached = model.generate(input_features=audio, max_new_tokens=4, do_sample=False, use_cache=False)
        assert torch.equal(cached, uncached)
        with model.disable_adapter():
            assert torch.equal(model(input_features=audio, labels=labels).logits, reference)


CAUSAL_METHODS = {
    "prefix_v2": lambda: PrefixTuningV2Config(task_type="CAUSAL_LM", prefix_length=3, init_weights=False),
    "ipt": lambda: InstancePromptConfig(task_type="CAUSAL_LM", prompt_length=3, init_weights=False),
}


@pytest.mark.parametrize("method", list(CAUSAL_METHODS))
def test_whispers_decoder_alone_takes_prefixes_and_generates_over_encoder_states_as_a_manual_loop(method):
    """WhisperForCausalLM (the decoder alone, distil-whisper's assistant for speculative decoding) reads tokens,
    though the wrapper around its decoder keeps Whisper's input_features as its main input: it was taken for an
    audio tower, and the model refused as having no attention."""
    torch.manual_seed(0)
    base = WhisperForCausalLM(whisper_config()).eval()
    ids, states = targets(), torch.randn(2, 16, 16, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        reference = base(input_ids=ids, encoder_outputs=(states,)).logits
    model = get_peft_model(base, CAUSAL_METHODS[method]())
    model.train()
    labels = ids.masked_fill(torch.arange(ids.shape[1]) < 3, -100)  # the first 3 tokens: the source
    out = model(input_ids=ids, encoder_outputs=(states,), labels=labels)
    assert not torch.allclose(out.logits, reference, atol=1e-4)
    out.loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads.values())
    model.eval()
    with torch.no_grad():
        generated = model.generate(
            input_ids=ids, encoder_outputs=(states,), max_new_tokens=4, do_sample=False
        )
        manual = ids
        for _ in range(4):
            step = model(input_ids=manual, encoder_outputs=(states,)).logits[:, -1:].argmax(-1)
            manual = torch.cat([manual, step], dim=1)
        assert torch.equal(generated, manual)
        with model.disable_adapter():
            assert torch.equal(model(input_ids=ids, encoder_outputs=(states,)).logits, reference)


def _speech2text():
    config = Speech2TextConfig(
        vocab_size=60,
        d_model=16,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=32,
        decoder_ffn_dim=32,
        input_feat_per_channel=8,
        input_channels=1,
        conv_channels=16,
        max_source_positions=64,
        max_target_positions=32,
    )
    inputs = {
        "input_features": torch.randn(2, 20, 8),
        "decoder_input_ids": torch.tensor([[2, 5, 6], [2, 7, 8]]),
    }
    return Speech2TextForConditionalGeneration(config), inputs, "SEQ_2_SEQ_LM", "input_features"


def _vit():
    config = ViTConfig(
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        image_size=8,
        patch_size=4,
        num_labels=3,
    )
    return ViTForImageClassification(config), {"pixel_values": torch.randn(2, 3, 8, 8)}, None, "pixel_values"


def _wav2vec2():  # no token embeddings at all: get_input_embeddings raises NotImplementedError
    config = Wav2Vec2Config(
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        conv_dim=(8, 8),
        conv_stride=(2, 2),
        conv_kernel=(3, 3),
        num_conv_pos_embeddings=4,
        num_conv_pos_embedding_groups=2,
        num_labels=3,
    )
    return (
        Wav2Vec2ForSequenceClassification(config),
        {"input_values": torch.randn(2, 200)},
        None,
        "input_values",
    )


TOKENLESS = {"speech2text": _speech2text, "vit": _vit, "wav2vec2": _wav2vec2}


def tokenless(name: str):
    torch.manual_seed(0)
    model, inputs, task, reads = TOKENLESS[name]()
    return model.eval(), inputs, task, reads


@pytest.mark.parametrize("method", ["prefix_v2", "ipt_hidden"])
@pytest.mark.parametrize("name", list(TOKENLESS))
def test_a_model_that_reads_no_tokens_takes_prefixes_trains_and_disables_exactly(name, method):
    base, inputs, task, _ = tokenless(name)
    with torch.no_grad():
        reference = base(**inputs).logits
    model = get_peft_model(base, METHODS[method](task))
    model.train()
    logits = model(**inputs).logits
    assert not torch.allclose(logits, reference, atol=1e-6)
    logits.square().sum().backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads.values())
    model.eval()
    with model.disable_adapter(), torch.no_grad():
        assert torch.equal(model(**inputs).logits, reference)


@pytest.mark.parametrize("name", list(TOKENLESS))
def test_the_embeddings_source_is_refused_on_a_model_that_reads_no_tokens(name):
    base, _, task, reads = tokenless(name)
    with pytest.raises(
        ValueError, match=f"instance_source='embeddings' on .* which reads {reads}, not input_ids"
    ):
        get_peft_model(base, InstancePromptConfig(task_type=task))


# -- padded rows of models that read no tokens: the instance prompt pools only the real frames or patches -----------


def pix2struct() -> Pix2StructForConditionalGeneration:
    """Pix2Struct: a vision encoder on 16 flattened patches (row, column, 16 values) and a T5-like text decoder."""
    text = {"vocab_size": 60, "hidden_size": 16, "d_kv": 8, "d_ff": 32, "num_layers": 2, "num_heads": 2}
    vision = {"hidden_size": 16, "patch_embed_hidden_size": 16, "d_ff": 32, "d_kv": 8, "seq_len": 16}
    config = Pix2StructConfig(
        text_config={**text, "pad_token_id": 0, "eos_token_id": 2, "decoder_start_token_id": 0},
        vision_config={**vision, "num_hidden_layers": 2, "num_attention_heads": 2},
    )
    torch.manual_seed(0)
    return Pix2StructForConditionalGeneration(config).eval()


def patches(batch: int = 2) -> torch.Tensor:
    values = torch.randn(batch, 16, 18, generator=torch.Generator().manual_seed(1))
    values[:, :, 0] = torch.arange(16) // 4 + 1  # row and column of each patch
    values[:, :, 1] = torch.arange(16) % 4 + 1
    return values


@pytest.mark.parametrize("method", ["prefix_v2", "ipt_hidden_prefix"])
def test_pix2struct_takes_prefixes_and_a_padded_row_scores_as_alone(method, tmp_path):
    """Before, "cannot read the hidden size of Pix2StructConfig" (its sizes are in its text and vision configs). As on
    Whisper, its encoder (here over image patches) takes encoder prefixes, its decoder decoder and cross prefixes. The
    instance prompt pools only the patches the attention_mask keeps: before, a padded row's prompt pooled its padding
    (0.08 off its logits alone on this model)."""
    config = METHODS[method]("SEQ_2_SEQ_LM")
    if method != "prefix_v2":
        config.instance_scale = (
            1.0  # at the default 0.05 a prompt pooled over the padding moves logits by less
        )
    base = pix2struct()
    model = get_peft_model(pix2struct(), config).eval()
    kinds = [m.__dict__[SITE_ATTR].kind for m in model.modules() if SITE_ATTR in m.__dict__]
    assert kinds == ["encoder", "encoder", "decoder", "cross", "decoder", "cross"]
    image, mask, labels = patches(), torch.ones(2, 16), targets()[:, :4]
    mask[1, 12:] = 0
    image[1, 12:, 2:] = 50.0  # padding that would move a prompt pooled over it
    call = {"flattened_patches": image, "attention_mask": mask, "decoder_input_ids": labels}
    with torch.no_grad():
        logits = model(**call).logits
        with model.disable_adapter():
            assert torch.equal(model(**call).logits, base(**call).logits)
        assert (logits - base(**call).logits).abs().max() > 1e-2
        row = {"flattened_patches": image[1:, :12], "attention_mask": mask[1:, :12]}
        alone = model(**row, decoder_input_ids=labels[1:]).logits
        torch.testing.assert_close(alone[0], logits[1], atol=1e-5, rtol=0)
        kwargs = {"flattened_patches": image, "attention_mask": mask, "max_new_tokens": 4, "do_sample": False}
        assert torch.equal(model.generate(**kwargs), model.generate(**kwargs, use_cache=False))
    model.save_pretrained(tmp_path)
    reloaded = PeftModel.from_pretrained(pix2struct(), tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**call).logits, logits, atol=1e-6, rtol=0)


def test_a_padded_speech2text_row_gets_the_instance_prompt_of_its_frames_alone():
    """Speech2Text subsamples its frames 4x; the attention_mask covers the input frames. The prompt pools the hidden
    states its own subsampling of the mask keeps (before: all of them, padding included; the row was off its logits
    alone by more than the tolerance)."""
    config = METHODS["ipt_hidden"]("SEQ_2_SEQ_LM")
    config.instance_scale = 1.0
    base, inputs, _, _ = tokenless("speech2text")
    model = get_peft_model(base, config).eval()
    audio = torch.randn(2, 32, 8, generator=torch.Generator().manual_seed(2))
    audio[1, 16:] = 0.0  # the feature extractor's padding value
    mask = torch.ones(2, 32, dtype=torch.long)
    mask[1, 16:] = 0
    labels = inputs["decoder_input_ids"]
    with torch.no_grad():
        together = model(input_features=audio, attention_mask=mask, decoder_input_ids=labels).logits
        alone = model(input_features=audio[1:, :16], decoder_input_ids=labels[1:]).logits
    torch.testing.assert_close(alone[0], together[1], atol=1e-5, rtol=0)


def moonshine() -> MoonshineForConditionalGeneration:
    sizes = {"hidden_size": 16, "intermediate_size": 32, "pad_token_id": 0, "decoder_start_token_id": 1}
    for half in ("encoder", "decoder"):
        sizes |= {f"{half}_num_hidden_layers": 2, f"{half}_num_attention_heads": 2}
        sizes |= {f"{half}_num_key_value_heads": 2}
    torch.manual_seed(0)
    return MoonshineForConditionalGeneration(MoonshineConfig(vocab_size=60, **sizes)).eval()


def test_a_padded_mask_the_hidden_source_cannot_map_is_refused_and_whisper_reads_its_padding():
    """Moonshine subsamples raw audio 384x with no helper that maps the mask: which of its hidden states are
    padding cannot be told, and a padded call is refused naming what to do (an unpadded one runs). Whisper's encoder
    documents that it ignores attention_mask: its prompt pools every frame, as the model reads them."""
    model = get_peft_model(moonshine(), METHODS["ipt_hidden_prefix"]("SEQ_2_SEQ_LM")).eval()
    audio, labels = torch.randn(2, 1600), targets()[:, :4]
    mask = torch.ones(2, 1600, dtype=torch.long)
    with torch.no_grad():
        model(input_values=audio, attention_mask=mask, decoder_input_ids=labels)
        mask[1, 1200:] = 0
        with pytest.raises(ValueError, match=r"attention_mask covers 1600 input positions .* unpadded rows"):
            model(input_values=audio, attention_mask=mask, decoder_input_ids=labels)
    model = get_peft_model(whisper(), METHODS["ipt_hidden"]("SEQ_2_SEQ_LM")).eval()
    mask = torch.ones(2, 32, dtype=torch.long)
    mask[1, 20:] = 0
    with torch.no_grad():
        masked = model(input_features=features(), attention_mask=mask, decoder_input_ids=targets()).logits
        unmasked = model(input_features=features(), decoder_input_ids=targets()).logits
    assert torch.equal(masked, unmasked)
