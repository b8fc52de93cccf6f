"""InstancePrompt (IPT): the prompt comes from each input's source side, on every task type."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import lm_labels, move_trainable_weights, tiny_model, token_batch
from peft import PeftModel, get_peft_model
from test_prefix_tuning import COMBOS, main_output, model_inputs
from transformers import AlbertConfig, AutoModelForSequenceClassification, ElectraConfig

from peft_ipt import InstancePromptConfig, PrefixTuningV2Config
from peft_ipt.instance_prompt.encoders import HashedTokenTable, PHMLinear
from peft_ipt.tuner import PromptInputs

VARIANTS = [
    {"injection": "hybrid"},
    {"injection": "prefix", "instance_source": "token_table", "instance_encoder": "cnn"},
    {"injection": "prefix", "instance_source": "embeddings", "instance_encoder": "lstm"},
    {"injection": "hybrid", "instance_source": "hidden", "instance_encoder": "mlp"},
    {"injection": "input", "instance_encoder": "none"},
    {"injection": "hybrid", "instance_source": "frozen_model"},
    {"injection": "hybrid", "instance_source": "frozen_model", "instance_encoder": "mixture"},
    {"injection": "prefix", "instance_source": "frozen_model", "frozen_layers": 1},
    {"injection": "hybrid", "instance_encoder": "attention"},
    {"injection": "input", "instance_source": "token_table", "instance_encoder": "attention"},
    # IDPG: the frozen model's states through a generator of PHM layers
    {"injection": "hybrid", "instance_source": "frozen_model", "instance_phm": 4},
]
# the variants whose prompt enters as key/value prefixes, where prefix_snapshot can see it
PREFIX_VARIANTS = [v for v in VARIANTS if v["injection"] != "input"]


def ipt_model(arch="llama", task="CAUSAL_LM", **config):
    config.setdefault("prompt_length", 4)
    config.setdefault("init_weights", False)  # a random instance head, so the instance visibly matters
    return get_peft_model(tiny_model(arch, task), InstancePromptConfig(task_type=task, **config))


def ipt_or_prefix_model(arch: str, task: str, variant: dict):
    """An IPT variant, or with ``{"prefix_v2": True}`` a PrefixTuningV2 adapter of the same length, in eval mode."""
    if "prefix_v2" in variant:
        config = PrefixTuningV2Config(task_type=task, prefix_length=4, init_weights=False)
        return get_peft_model(tiny_model(arch, task), config).eval()
    return ipt_model(arch, task, **variant).eval()


def prefix_snapshot(model) -> dict:
    """The prefix keys of the last call per (attention kind, layer), detached."""
    return {site: keys.detach().clone() for site, (keys, *_) in model.base_model._prefixes.items()}


def assert_same_prefixes(a: dict, b: dict, same: bool = True):
    assert a.keys() == b.keys()
    assert all(torch.allclose(a[site], b[site], atol=1e-6) for site in a) == same


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: "-".join(map(str, v.values())))
@pytest.mark.parametrize(("arch", "task"), COMBOS)
def test_forward_backward_on_every_task_type(arch, task, variant):
    if variant["injection"] == "input" and task == "SEQ_CLS" and arch in ("gpt2", "llama"):
        with pytest.raises(ValueError, match="injection='input' with SEQ_CLS on a decoder model"):
            ipt_model(arch, task, **variant)
        return
    base = tiny_model(arch, task)
    inputs = model_inputs(arch, task)
    with torch.no_grad():
        reference = main_output(base(**inputs))
    model = get_peft_model(
        base, InstancePromptConfig(task_type=task, prompt_length=4, init_weights=False, **variant)
    )
    model.train()
    output = main_output(model(**inputs))
    assert output.shape == reference.shape  # per-token outputs keep the input's length in every mode
    assert not torch.allclose(output, reference, atol=1e-4)
    output.float().pow(2).mean().backward()
    for name, param in model.named_parameters():
        if param.requires_grad:
            assert "ipt_encoder" in name or "modules_to_save" in name, name
            assert param.grad is not None and param.grad.abs().sum() > 0, name


def test_the_prompt_differs_between_instances_and_not_between_calls():
    model = ipt_model()
    a, b = token_batch(1, 7, seed=1), token_batch(1, 7, seed=2)
    with torch.no_grad():
        model(input_ids=a)
        first = prefix_snapshot(model)
        model(input_ids=a)
        assert_same_prefixes(first, prefix_snapshot(model))
        model(input_ids=b)
        assert_same_prefixes(first, prefix_snapshot(model), same=False)


@pytest.mark.parametrize("variant", PREFIX_VARIANTS, ids=lambda v: "-".join(map(str, v.values())))
def test_changing_only_the_target_tokens_leaves_the_prompt_unchanged(variant):
    """Causal LM with teacher forcing: tokens with a label are targets and never feed the prompt."""
    model = ipt_model(**variant)
    source = token_batch(2, 5, seed=1)
    target_a, target_b = token_batch(2, 4, seed=2), token_batch(2, 4, seed=3)
    prompts = []
    for target in (target_a, target_b):
        ids = torch.cat([source, target], dim=1)
        labels = torch.cat([torch.full_like(source, -100), target], dim=1)
        with torch.no_grad():
            model(input_ids=ids, labels=labels)
        prompts.append(prefix_snapshot(model))
    assert_same_prefixes(*prompts)
    # without labels marking the source, the targets would feed the prompt: the test can fail
    with torch.no_grad():
        model(input_ids=torch.cat([source, target_b], dim=1))
    assert_same_prefixes(prompts[0], prefix_snapshot(model), same=False)


def test_an_explicit_source_mask_overrides_labels():
    model = ipt_model()
    source, target = token_batch(2, 5, seed=1), token_batch(2, 4, seed=2)
    ids = torch.cat([source, target], dim=1)
    with torch.no_grad():
        model(input_ids=source)
        alone = prefix_snapshot(model)
        model(
            input_ids=ids, source_mask=torch.cat([torch.ones_like(source), torch.zeros_like(target)], dim=1)
        )
    assert_same_prefixes(alone, prefix_snapshot(model))


def test_labels_that_make_every_token_a_target_are_refused_naming_the_fix():
    """Plain language-modelling labels (labels == input_ids, as DataCollatorForLanguageModeling makes them) leave the
    instance prompt nothing to read in training, while generate() reads the whole input: refused, not trained."""
    model = ipt_model().train()
    ids = token_batch(2, 6)
    with pytest.raises(ValueError, match=r"every token of this batch a target.*-100.*source_mask"):
        model(input_ids=ids, labels=ids)
    padded = torch.where(torch.arange(6) < 4, ids, -100)  # targets up to the padding: still no source
    with pytest.raises(ValueError, match="every token of this batch a target"):
        model(input_ids=ids, attention_mask=(padded != -100).long(), labels=padded)
    # what works: a source part labelled -100, an explicit source_mask, or one row with a source
    model(input_ids=ids, labels=lm_labels(ids)).loss.backward()
    model(input_ids=ids, labels=ids, source_mask=torch.arange(6).expand(2, 6) < 3)
    one_row = ids.clone()
    one_row[0, :2] = -100
    model(input_ids=ids, labels=one_row)


def test_a_source_mask_column_that_trainer_drops_is_named_in_the_refusal(tmp_path):
    """Trainer keeps only the dataset columns the base model's forward names, so a `source_mask` column vanishes
    before the model sees it; the refusal says so, and with remove_unused_columns=False the column trains."""
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments

    ids = token_batch(8, 6)
    source = (torch.arange(6) < 3).expand(8, 6).long()
    rows = Dataset.from_dict(
        {"input_ids": ids.tolist(), "labels": ids.tolist(), "source_mask": source.tolist()}
    )

    def trainer(remove_unused_columns: bool) -> Trainer:
        args = TrainingArguments(
            tmp_path / str(remove_unused_columns),
            per_device_train_batch_size=4,
            max_steps=2,
            report_to=[],
            use_cpu=True,
            disable_tqdm=True,
            remove_unused_columns=remove_unused_columns,
        )
        return Trainer(model=ipt_model().train(), args=args, train_dataset=rows)

    with pytest.raises(
        ValueError, match=r"source_mask.*Trainer drops a dataset column.*remove_unused_columns=False"
    ):
        trainer(True).train()
    assert trainer(False).train().training_loss > 0


@pytest.mark.parametrize("injection", ["hybrid", "input"])
@pytest.mark.parametrize("arch", ["bert", "llama"])
def test_a_token_classifiers_labels_never_change_its_logits(arch, injection):
    """Token-classification labels tag the input; they are not targets the model reads, so the prompt a training
    call builds is the one inference (no labels) builds."""
    model = ipt_model(arch, "TOKEN_CLS", injection=injection).eval()
    ids = token_batch(2, 6)
    tags = torch.randint(0, 3, (2, 6), generator=torch.Generator().manual_seed(2))
    tags[:, 0] = -100  # a special token, as a tokenizer-aligned dataset marks it
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids, labels=tags).logits, model(input_ids=ids).logits)


@pytest.mark.parametrize("arch", ["bart", "t5"])
def test_seq2seq_prompt_comes_from_the_encoder_input_only(arch):
    model = ipt_model(arch, "SEQ_2_SEQ_LM")
    ids = token_batch(2, 6)
    prompts = []
    for seed in (3, 4):
        with torch.no_grad():
            model(
                input_ids=ids,
                decoder_input_ids=token_batch(2, 5, seed=seed),
                labels=token_batch(2, 5, seed=seed),
            )
        prompts.append(prefix_snapshot(model))
    assert_same_prefixes(*prompts)


@pytest.mark.parametrize("variant", PREFIX_VARIANTS, ids=lambda v: "-".join(map(str, v.values())))
def test_padding_never_enters_the_instance_representation(variant):
    model = ipt_model("bert", "SEQ_CLS", **variant)
    ids = token_batch(1, 6)
    with torch.no_grad():
        model(input_ids=ids, attention_mask=torch.ones_like(ids))
        unpadded = prefix_snapshot(model)
        for filler in (0, 77):
            padded = torch.cat([ids, torch.full((1, 5), filler)], dim=1)
            mask = torch.cat([torch.ones_like(ids), torch.zeros(1, 5, dtype=torch.long)], dim=1)
            model(input_ids=padded, attention_mask=mask)
            assert_same_prefixes(unpadded, prefix_snapshot(model))


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: "-".join(map(str, v.values())))
@pytest.mark.parametrize("arch", ["llama", "t5"])
def test_generate_computes_the_prompt_once_and_cache_does_not_matter(arch, variant):
    task = "SEQ_2_SEQ_LM" if arch == "t5" else "CAUSAL_LM"
    model = ipt_model(arch, task, **variant)
    calls = []
    model.base_model.prompt_modules["default"].encoder.register_forward_hook(lambda *a: calls.append(1))
    ids = token_batch(2, 6)
    kwargs = {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "max_new_tokens": 5,
        "min_new_tokens": 5,
        "do_sample": False,
    }
    cached = model.generate(**kwargs)
    assert len(calls) == 1
    uncached = model.generate(**kwargs, use_cache=False)
    assert len(calls) == 2
    assert torch.equal(cached, uncached)
    assert cached.shape == (2, (6 if task == "CAUSAL_LM" else 1) + 5)


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: "-".join(map(str, v.values())))
def test_a_manual_greedy_loop_that_marks_the_source_agrees_with_generate(variant):
    model = ipt_model(**variant)
    ids = token_batch(2, 6)
    expected = model.generate(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=5,
        min_new_tokens=5,
        do_sample=False,
    )
    eos = model.generation_config.eos_token_id
    sequence = ids
    with torch.no_grad():
        for _ in range(5):
            source_mask = torch.zeros_like(sequence)
            source_mask[:, : ids.shape[1]] = 1  # the tokens generated so far are not part of the instance
            logits = model(input_ids=sequence, source_mask=source_mask).logits[:, -1].clone()
            logits[:, eos] = float("-inf")
            sequence = torch.cat([sequence, logits.argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(expected, sequence)


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: "-".join(map(str, v.values())))
def test_left_padded_batch_matches_single_examples(variant):
    model = ipt_model(**variant)
    long, short = token_batch(1, 8, seed=4)[0], token_batch(1, 5, seed=5)[0]
    pad = model.config.pad_token_id
    batch = torch.stack([long, torch.cat([torch.full((3,), pad), short])])
    mask = torch.stack([torch.ones(8, dtype=torch.long), torch.tensor([0, 0, 0, 1, 1, 1, 1, 1])])
    kwargs = {"max_new_tokens": 5, "min_new_tokens": 5, "do_sample": False, "pad_token_id": pad}
    together = model.generate(input_ids=batch, attention_mask=mask, **kwargs)
    for row, prompt in enumerate((long, short)):
        alone = model.generate(
            input_ids=prompt[None], attention_mask=torch.ones(1, len(prompt), dtype=torch.long), **kwargs
        )
        assert torch.equal(together[row, -5:], alone[0, -5:])


@pytest.mark.parametrize("task", ["CAUSAL_LM", "TOKEN_CLS", "QUESTION_ANS"])
def test_input_injection_puts_a_left_padded_rows_prompt_after_its_padding(task):
    """A left-padded row's prompt goes right before its first token, so on a rotary decoder a forward gives each
    row's own logits, hidden states and loss, as without an adapter. In front of the padding it sat at another
    distance from the tokens: 3e-4 off on the logits of a tiny Llama, 6e-2 for token classification."""
    model = ipt_model("llama", task, injection="input", instance_encoder="none").eval()
    move_trainable_weights(model)
    pad = model.config.pad_token_id
    long, short = token_batch(1, 8, seed=4), token_batch(1, 5, seed=5)
    batch = torch.cat([long, torch.cat([torch.full((1, 3), pad), short], 1)])
    mask = torch.ones_like(batch)
    mask[1, :3] = 0
    labels = [lm_labels(long), lm_labels(short)] if task == "CAUSAL_LM" else [None, None]
    with torch.no_grad():
        batch_labels = None
        if task == "CAUSAL_LM":
            batch_labels = torch.cat([labels[0], torch.cat([torch.full((1, 3), -100), labels[1]], 1)])
        both = model(input_ids=batch, attention_mask=mask, labels=batch_labels, output_hidden_states=True)
        losses, counts = [], []
        for row, (ids, row_labels) in enumerate(zip((long, short), labels, strict=True)):
            alone = model(input_ids=ids, labels=row_labels, output_hidden_states=True)
            columns = slice(0, 8) if row == 0 else slice(3, 8)
            for name in ("logits", "start_logits", "end_logits"):
                if getattr(alone, name, None) is not None:
                    torch.testing.assert_close(getattr(both, name)[row, columns], getattr(alone, name)[0])
            torch.testing.assert_close(both.hidden_states[-1][row, columns], alone.hidden_states[-1][0])
            if row_labels is not None:  # every target token counts once, in the batch as alone
                losses.append(alone.loss * (row_labels != -100).sum())
                counts.append((row_labels != -100).sum())
        if losses:
            torch.testing.assert_close(both.loss, sum(losses) / sum(counts))
    if task == "CAUSAL_LM":  # generate()'s first-step hidden states: each row's own positions, with beams too
        kwargs = {"max_new_tokens": 2, "num_beams": 2, "num_return_sequences": 2, "pad_token_id": pad}
        kwargs |= {"output_hidden_states": True, "return_dict_in_generate": True}
        together = model.generate(input_ids=batch, attention_mask=mask, **kwargs).hidden_states[0][-1]
        alone = model.generate(input_ids=short, attention_mask=torch.ones_like(short), **kwargs)
        torch.testing.assert_close(together[2:, 3:], alone.hidden_states[0][-1])


@pytest.mark.parametrize("variant", [{}, {"injection": "input"}, {"instance_source": "frozen_model"}])
def test_generate_without_a_mask_infers_it_from_the_pad_token_as_transformers_does(variant):
    """generate(input_ids) on a padded batch with no attention_mask: transformers infers the mask from the pad token,
    but only after the prompt was built, which then read the padding (5e-3 off the logits with the mask for hybrid,
    4e-2 with an input-level prompt). A pad token that is also end-of-sequence infers nothing, in both."""
    model = ipt_model("llama", **variant).eval()
    move_trainable_weights(model)
    ids = token_batch(2, 7)
    ids[1, :2] = 0
    kwargs = {"max_new_tokens": 3, "min_new_tokens": 3, "do_sample": False}
    kwargs |= {"output_logits": True, "return_dict_in_generate": True, "pad_token_id": 0}

    def logits(**call):
        return torch.stack(model.generate(input_ids=ids, **call, **kwargs).logits)

    torch.testing.assert_close(logits(), logits(attention_mask=(ids != 0).long()), atol=1e-6, rtol=0)
    # the pad token as end-of-sequence too: no mask inferred, every token read
    torch.testing.assert_close(
        logits(eos_token_id=0), logits(attention_mask=torch.ones_like(ids), eos_token_id=0), atol=1e-6, rtol=0
    )


@pytest.mark.parametrize("arch, task", [("llama", "CAUSAL_LM"), ("bart", "SEQ_2_SEQ_LM")])
@pytest.mark.parametrize("variant", [{}, {"injection": "input"}], ids=["hybrid", "input"])
def test_generate_takes_its_input_as_inputs_too(arch, task, variant):
    """generate(inputs=ids), transformers' own name for the main input: the same prompt as from input_ids. Hybrid
    refused it ("needs input_ids"); an input-level prompt generated without its prompt."""
    model = ipt_model(arch, task, **variant).eval()
    move_trainable_weights(model)
    ids = token_batch(2, 7)
    kwargs = {"max_new_tokens": 3, "do_sample": False, "output_logits": True, "return_dict_in_generate": True}
    expected = torch.stack(model.generate(input_ids=ids, **kwargs).logits)
    torch.testing.assert_close(torch.stack(model.generate(inputs=ids, **kwargs).logits), expected)
    with model.disable_adapter():  # the prompt matters here
        assert not torch.allclose(
            torch.stack(model.generate(inputs=ids, **kwargs).logits), expected, atol=1e-3
        )


def test_beam_search_expands_each_rows_prompt():
    model = ipt_model("llama")
    ids = token_batch(2, 6)
    kwargs = {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "max_new_tokens": 4,
        "num_beams": 3,
        "num_return_sequences": 2,
    }
    beams = model.generate(**kwargs)
    assert beams.shape[0] == 4
    assert torch.equal(beams, model.generate(**kwargs, use_cache=False))


def test_input_injection_refuses_sequence_classification_on_an_encoder_decoder_too():
    """BART's classifier reads the last end-of-sequence token, found from input_ids, which the prompt replaces."""
    with pytest.raises(
        ValueError, match="injection='input' with SEQ_CLS on an encoder-decoder model.*'hybrid'"
    ):
        ipt_model("bart", "SEQ_CLS", injection="input")


# -- where the prompt goes --------------------------------------------------------------------------------


def test_input_injection_keeps_cls_first_for_encoders():
    model = ipt_model("bert", "SEQ_CLS", injection="input")
    seen = {}
    embeddings = model.base_model.model.bert.embeddings
    embeddings.register_forward_pre_hook(lambda m, a, k: seen.update(k), with_kwargs=True)
    ids = token_batch(2, 6)
    with torch.no_grad():
        model(input_ids=ids, attention_mask=torch.ones_like(ids))
    word = embeddings.word_embeddings(ids)
    inputs_embeds = seen["inputs_embeds"]
    assert inputs_embeds.shape[1] == 6 + 4
    torch.testing.assert_close(inputs_embeds[:, 0], word[:, 0])  # [CLS] stays at position 0
    torch.testing.assert_close(inputs_embeds[:, 5:], word[:, 1:])


def test_input_injection_gives_the_prompt_segment_zero_and_keeps_a_pairs_segments_on_their_tokens():
    """A sentence pair's token_type_ids (BERT's segments) get the P inserted positions as segment 0, after [CLS],
    so the second sentence's tokens keep segment 1 at their shifted positions."""
    model = ipt_model("bert", "SEQ_CLS", injection="input").eval()
    seen = {}
    embeddings = model.base_model.model.bert.embeddings
    embeddings.register_forward_pre_hook(lambda m, a, k: seen.update(k), with_kwargs=True)
    ids = token_batch(2, 6)
    types = torch.tensor([[0, 0, 0, 1, 1, 1], [0, 0, 1, 1, 1, 1]])
    with torch.no_grad():
        paired = model(input_ids=ids, token_type_ids=types).logits
    expected = torch.tensor([[0, 0, 0, 0, 0, 0, 0, 1, 1, 1], [0, 0, 0, 0, 0, 0, 1, 1, 1, 1]])
    assert torch.equal(seen["token_type_ids"], expected)
    with torch.no_grad():
        single = model(input_ids=ids).logits
    assert not torch.equal(paired, single)


def test_input_injection_token_classification_loss_uses_the_original_labels():
    model = ipt_model("bert", "TOKEN_CLS", injection="input")
    ids = token_batch(2, 6)
    labels = torch.randint(0, 3, (2, 6))
    with torch.no_grad():
        output = model(input_ids=ids, labels=labels)
    expected = torch.nn.functional.cross_entropy(output.logits.reshape(-1, 3), labels.reshape(-1))
    torch.testing.assert_close(output.loss, expected)


@pytest.mark.parametrize(
    ("arch", "task"), [("llama", "CAUSAL_LM"), ("bert", "TOKEN_CLS"), ("t5", "SEQ_2_SEQ_LM")]
)
def test_input_injection_returns_the_callers_positions_in_every_per_token_output_and_as_a_tuple(arch, task):
    """The prompt's P positions are cut out of the logits and of every layer's hidden states (the encoder's too),
    and return_dict=False gets the same tensors as a tuple, not the (B, T + P) ones."""
    model = ipt_model(arch, task, injection="input").eval()
    ids = token_batch(2, 7)
    kwargs = {"input_ids": ids, "output_hidden_states": True}
    if task == "SEQ_2_SEQ_LM":
        kwargs["decoder_input_ids"] = ids[:, :3]
    with torch.no_grad():
        output = model(**kwargs)
        as_tuple = model(**kwargs, return_dict=False)
    states = output.encoder_hidden_states if task == "SEQ_2_SEQ_LM" else output.hidden_states
    assert {h.shape[1] for h in states} == {7}
    last = output.encoder_last_hidden_state if task == "SEQ_2_SEQ_LM" else None
    if last is not None:
        assert torch.equal(states[-1], last)
    assert isinstance(as_tuple, tuple)
    expected = output.to_tuple()
    assert len(as_tuple) == len(expected)
    for got, want in zip(as_tuple, expected, strict=True):
        if torch.is_tensor(want):
            assert torch.equal(got, want)
        elif isinstance(want, tuple) and want and torch.is_tensor(want[0]):
            assert all(torch.equal(g, w) for g, w in zip(got, want, strict=True))


def test_input_injection_generate_counts_max_and_min_length_in_the_callers_tokens():
    """A decoder generates from inputs_embeds, which hold the P prompt tokens too; transformers counts max_length and
    min_length from there, so each must be moved by P to mean what it means without the prompt."""
    model = ipt_model("llama", injection="input").eval()
    ids = token_batch(1, 7)
    greedy = {"input_ids": ids, "do_sample": False, "pad_token_id": 0, "eos_token_id": None}
    five_new = model.generate(**greedy, max_new_tokens=5)
    assert torch.equal(model.generate(**greedy, max_length=12), five_new)
    model.generation_config.max_length = 12  # the model's own setting, as a generation_config.json gives it
    assert torch.equal(model.generate(**greedy), five_new)
    model.generation_config.max_length = None
    # the first new token as end of sequence: without a minimum, generation stops there
    stop = int(five_new[0, 7])
    greedy["eos_token_id"] = stop
    assert model.generate(**greedy, max_new_tokens=8).shape[1] == 8
    held = model.generate(**greedy, max_new_tokens=8, min_length=7 + 5)
    assert stop not in held[0, 7:12].tolist()


def test_input_injection_generate_returns_the_input_in_a_generate_output_too():
    """return_dict_in_generate=True: sequences hold the input and the new tokens, as the plain tensor does, and the
    first step's hidden states are the forward's, the prompt's positions cut."""
    model = ipt_model("llama", injection="input").eval()
    ids = token_batch(2, 7)
    kwargs = {"input_ids": ids, "do_sample": False, "pad_token_id": 0, "max_new_tokens": 3}
    output = model.generate(**kwargs, return_dict_in_generate=True, output_hidden_states=True)
    assert torch.equal(output.sequences, model.generate(**kwargs))
    with torch.no_grad():
        forward = model(input_ids=ids, output_hidden_states=True).hidden_states
    for step, call in zip(output.hidden_states[0], forward, strict=True):
        torch.testing.assert_close(step, call)
    beams = model.generate(**kwargs, num_beams=2, num_return_sequences=2, return_dict_in_generate=True)
    assert torch.equal(beams.sequences[:, :7], ids.repeat_interleave(2, dim=0))

    # a generate() that raised leaves nothing behind for the next one, here with the adapter off
    with pytest.raises(ValueError, match="not_a_generate_argument"):
        model.generate(**kwargs, not_a_generate_argument=1)
    with model.disable_adapter():
        bare = model.generate(**kwargs)
    assert torch.equal(bare, tiny_model("llama").generate(**kwargs))  # the same base weights, never wrapped


def test_input_injection_generate_cuts_the_prompt_out_of_an_encoders_states():
    model = ipt_model("t5", "SEQ_2_SEQ_LM", injection="input").eval()
    ids = token_batch(2, 7)
    output = model.generate(
        input_ids=ids,
        max_new_tokens=2,
        do_sample=False,
        return_dict_in_generate=True,
        output_hidden_states=True,
    )
    with torch.no_grad():
        forward = model(
            input_ids=ids, decoder_input_ids=ids[:, :1], output_hidden_states=True
        ).encoder_hidden_states
    for step, call in zip(output.encoder_hidden_states, forward, strict=True):
        torch.testing.assert_close(step, call)


def test_hidden_source_enters_from_its_layer_on():
    model = ipt_model("llama", injection="prefix", instance_source="hidden", hidden_layer=1)
    module = model.base_model.prompt_modules["default"]
    assert module.instance_layers == {"self": [1]}
    assert module.layer_slots == {"self": {1: 0}}
    with pytest.raises(
        ValueError, match=r"hidden_layer=5 is out of range: the model's self stack has 2 layers"
    ):
        ipt_model("llama", injection="prefix", instance_source="hidden", hidden_layer=5)


def test_hybrid_puts_the_instance_part_in_every_layer_by_default():
    assert ipt_model("llama").base_model.prompt_modules["default"].instance_layers == {"self": [0, 1]}


def test_hybrid_with_the_papers_first_layer_only_keeps_later_layers_task_level():
    model = ipt_model("llama", injection="hybrid", instance_layers=[0])
    a, b = token_batch(1, 7, seed=1), token_batch(1, 7, seed=2)
    with torch.no_grad():
        model(input_ids=a)
        first = prefix_snapshot(model)
        model(input_ids=b)
        second = prefix_snapshot(model)
    assert not torch.allclose(first[("self", 0)], second[("self", 0)])  # instance-wise
    torch.testing.assert_close(first[("self", 1)], second[("self", 1)])  # task-level only


def test_default_hybrid_starts_as_the_task_prefix():
    model = ipt_model("llama", init_weights=True)
    a, b = token_batch(1, 7, seed=1), token_batch(1, 7, seed=2)
    with torch.no_grad():
        model(input_ids=a)
        first = prefix_snapshot(model)
        model(input_ids=b)
    assert_same_prefixes(first, prefix_snapshot(model))


def test_instance_drop_leaves_out_whole_instance_parts_in_training_only():
    model = ipt_model("llama", instance_drop=0.5)
    module = model.base_model.prompt_modules["default"]
    inputs = PromptInputs(input_ids=token_batch(16, 6), embedder=model.get_input_embeddings())
    module.eval()
    full = module.prefixes(inputs)["self"]  # task + scale x instance, for every row
    task = module.combine(None)["self"]  # the task part alone, (1, ...) per slot
    module.train()
    torch.manual_seed(0)
    dropped = module.prefixes(inputs)["self"]
    left_out = []
    for part in (0, 1):  # keys, values
        for slot, got in enumerate(dropped[part]):
            alone, kept = (
                task[part][slot],
                2.0 * full[part][slot] - task[part][slot],
            )  # kept: rescaled by 1 / (1 - p)
            rows_alone = [torch.allclose(got[b], alone[0], atol=1e-6) for b in range(16)]
            rows_kept = [torch.allclose(got[b], kept[b], atol=1e-5) for b in range(16)]
            assert all(
                a != k for a, k in zip(rows_alone, rows_kept, strict=True)
            )  # every row one or the other
            left_out.append(rows_alone)
    assert all(rows == left_out[0] for rows in left_out)  # one draw per example, shared by every layer
    assert 0 < sum(left_out[0]) < 16


def test_instance_drop_changes_nothing_in_evaluation_and_saves_with_the_adapter(tmp_path):
    torch.manual_seed(0)
    model = ipt_model("bert", "SEQ_CLS", instance_drop=0.3).eval()
    plain = ipt_model("bert", "SEQ_CLS").eval()
    plain.load_state_dict(model.state_dict())
    ids = token_batch()
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        assert torch.equal(plain(input_ids=ids).logits, expected)
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(tiny_model("bert", "SEQ_CLS"), tmp_path)
    assert loaded.peft_config["default"].instance_drop == 0.3
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, expected)


@pytest.mark.parametrize("arch", ["llama", "bart"])
def test_hybrid_task_prefix_starts_as_the_models_own_keys_and_values_of_real_words(arch, monkeypatch):
    token_ids = torch.tensor([5, 17, 42, 99])
    monkeypatch.setattr("peft_ipt.tuner.init_token_ids", lambda config, model, length: token_ids)
    task = "SEQ_2_SEQ_LM" if arch == "bart" else "CAUSAL_LM"
    config = InstancePromptConfig(task_type=task, prompt_length=4, prefix_init="vocab")
    model = get_peft_model(tiny_model(arch, task), config)
    module = model.base_model.prompt_modules["default"]
    ids = token_batch(2, 6)
    inputs = PromptInputs(
        input_ids=ids, is_encoder_decoder=arch == "bart", embedder=model.get_input_embeddings()
    )
    prefixes = module.prefixes(inputs)  # the instance head starts at zero: task part only
    recorded = model.base_model.record_activations(token_ids)
    assert set(prefixes) == {kind for kind, _ in recorded}
    for (kind, layer), (key, value) in recorded.items():
        keys, values = prefixes[kind]
        slot = module.layer_slots[kind][layer]
        torch.testing.assert_close(keys[slot][0], key[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(values[slot][0], value[0], rtol=1e-5, atol=1e-5)


def test_prefix_init_needs_the_task_prefix_of_hybrid_injection():
    with pytest.raises(
        ValueError, match=r"prefix_init='vocab' initialises the task-level prefix.*injection='prefix'"
    ):
        InstancePromptConfig(task_type="CAUSAL_LM", injection="prefix", prefix_init="vocab")


# -- peft machinery ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: "-".join(map(str, v.values())))
def test_save_and_load_round_trip_under_another_adapter_name(variant, tmp_path):
    model = ipt_model("bert", "TOKEN_CLS", **variant)
    ids = token_batch()
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(tiny_model("bert", "TOKEN_CLS"), tmp_path, adapter_name="other")
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, expected)


def test_auto_peft_model_for_sequence_classification(tmp_path):
    from peft import AutoPeftModelForSequenceClassification

    base = tiny_model("bert", "SEQ_CLS")
    base.save_pretrained(tmp_path / "base")
    model = get_peft_model(
        base, InstancePromptConfig(task_type="SEQ_CLS", prompt_length=4, init_weights=False)
    )
    model.peft_config["default"].base_model_name_or_path = str(tmp_path / "base")
    model.save_pretrained(tmp_path / "adapter")
    ids = token_batch()
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        loaded = AutoPeftModelForSequenceClassification.from_pretrained(tmp_path / "adapter")
        assert torch.equal(loaded(input_ids=ids).logits, expected)


def test_two_adapters_disable_and_unload():
    base = tiny_model("llama")
    ids = token_batch()
    with torch.no_grad():
        reference = base(input_ids=ids).logits
    model = get_peft_model(
        base, InstancePromptConfig(task_type="CAUSAL_LM", prompt_length=4, init_weights=False)
    )
    model.add_adapter(
        "b",
        InstancePromptConfig(task_type="CAUSAL_LM", injection="prefix", prompt_length=3, init_weights=False),
    )
    with torch.no_grad():
        first = model(input_ids=ids).logits
        model.set_adapter("b")
        assert not torch.allclose(model(input_ids=ids).logits, first)
        with model.disable_adapter():
            assert torch.equal(model(input_ids=ids).logits, reference)
        model.set_adapter("default")
        model.delete_adapter("b")
        assert torch.equal(model(input_ids=ids).logits, first)
        assert torch.equal(model.unload()(input_ids=ids).logits, reference)


CHECKPOINTED = [
    *VARIANTS,
    {"injection": "hybrid", "instance_source": "token_table", "instance_encoder": "lstm"},
    {"injection": "hybrid", "instance_source": "frozen_model", "prompt_dropout": 0.3},  # replayed draws
    {"injection": "hybrid", "instance_drop": 0.5},  # replayed draws
]


def checkpointed_step(arch: str, task: str, variant: dict, checkpointing: str | None):
    torch.manual_seed(0)
    model = ipt_model(arch, task, **variant)
    if checkpointing:
        reentrant = checkpointing == "reentrant"
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
        model.enable_input_require_grads()
    model.train()
    model.base_model.model.config.use_cache = False
    inputs = model_inputs(arch, task)
    labels = (
        torch.tensor([0, 1])
        if task == "SEQ_CLS"
        else inputs.get("decoder_input_ids", lm_labels(inputs["input_ids"]))
    )
    with torch.random.fork_rng():
        torch.manual_seed(1)
        loss = model(**inputs, labels=labels).loss
        loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("variant", CHECKPOINTED, ids=lambda v: "-".join(map(str, v.values())))
@pytest.mark.parametrize(
    ("arch", "task"), [("llama", "CAUSAL_LM"), ("bert", "SEQ_CLS"), ("bart", "SEQ_2_SEQ_LM")]
)
@pytest.mark.parametrize("checkpointing", ["non-reentrant", "reentrant"])
def test_gradient_checkpointing_gives_the_same_loss_and_gradients(variant, arch, task, checkpointing):
    if variant["injection"] == "input" and task == "SEQ_CLS" and arch == "llama":
        return  # refused at get_peft_model (test_forward_backward_on_every_task_type)
    if variant.get("instance_source") == "hidden" and checkpointing == "reentrant":
        with pytest.raises(ValueError, match="instance_source='hidden' cannot train under reentrant"):
            checkpointed_step(arch, task, variant, checkpointing)
        return
    loss, grads = checkpointed_step(arch, task, variant, None)
    loss_checkpointed, grads_checkpointed = checkpointed_step(arch, task, variant, checkpointing)
    torch.testing.assert_close(loss, loss_checkpointed)
    assert grads.keys() == grads_checkpointed.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, grads_checkpointed[name], rtol=1e-4, atol=1e-6)
    assert any(g.abs().sum() > 0 for n, g in grads.items() if "ipt_encoder" in n)


@pytest.mark.parametrize("source", ["embeddings", "frozen_model", "hidden"])
def test_reentrant_checkpointing_of_only_the_later_layers_is_exact_or_refused(source):
    # transformers 5.25's every_n_layers (or flags set by hand) checkpoints some layers only. With the layer that reads
    # the hidden states outside a checkpoint and a later one inside, the hidden source's gradients came back wrong
    # (2.6e-3 off on this model), silently: the recomputed layer rebuilt its prefix without the instance part.
    ids = token_batch(2, 7)

    def step(checkpointed: bool):
        torch.manual_seed(0)
        model = get_peft_model(
            tiny_model("llama", num_hidden_layers=4),
            InstancePromptConfig(task_type="CAUSAL_LM", instance_source=source, init_weights=False),
        )
        if checkpointed:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
            for layer in model.base_model.model.model.layers[:3]:  # the hidden states are read at layer 2
                layer.gradient_checkpointing = False
        model.train()
        model(input_ids=ids, labels=lm_labels(ids)).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    reference = step(False)
    if source == "hidden":
        with pytest.raises(ValueError, match="instance_source='hidden' cannot train under reentrant"):
            step(True)
        return
    checkpointed = step(True)
    assert checkpointed.keys() == reference.keys()
    for name, grad in reference.items():
        torch.testing.assert_close(checkpointed[name], grad, rtol=1e-4, atol=1e-6)


def test_bf16_autocast_forward_and_generate():
    model = ipt_model()
    ids = token_batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(input_ids=ids).logits
        generated = model.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, do_sample=False
        )
    assert torch.isfinite(logits.float()).all() and generated.shape == (2, ids.shape[1] + 3)


# -- pretrained table ---------------------------------------------------------------------------------------


def test_a_pretrained_table_is_loaded_and_can_be_frozen(tmp_path):
    table = HashedTokenTable(64, 8)
    table.save(str(tmp_path / "table.safetensors"))
    model = ipt_model(
        instance_source="token_table",
        table_size=64,
        instance_rank=8,
        table_path=str(tmp_path / "table.safetensors"),
        freeze_table=True,
    )
    loaded = model.base_model.prompt_modules["default"].table.weight
    assert torch.equal(loaded, table.weight.detach()) and not loaded.requires_grad
    with pytest.raises(
        ValueError, match=r"holds a table of shape \(64, 8\), but the config asks for \(32, 8\)"
    ):
        ipt_model(
            instance_source="token_table",
            table_size=32,
            instance_rank=8,
            table_path=str(tmp_path / "table.safetensors"),
        )


# -- bad input ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        (
            {"instance_encoder": "transformer"},
            r"instance_encoder must be one of \('none', 'mlp', 'cnn', 'lstm', 'mixture', 'attention'\) "
            r"\(got 'transformer'\)",
        ),
        ({"instance_source": "audio"}, r"instance_source must be one of .* \(got 'audio'\)"),
        ({"injection": "output"}, r"injection must be one of .* \(got 'output'\)"),
        ({"prompt_length": 0}, r"prompt_length must be an integer >= 1 \(got 0\)"),
        ({"hidden_layer": 1}, r"hidden_layer=1 needs instance_source='hidden'"),
        ({"task_prefix_hidden_size": 0}, r"task_prefix_hidden_size must be an integer >= 1 \(got 0\)"),
        (
            {"task_prefix_hidden_size": 8, "injection": "prefix"},
            r"task_prefix_hidden_size=8 reparameterises the task-level prefix, which only injection='hybrid' has",
        ),
        ({"instance_source": "hidden", "injection": "input"}, r"needs injection='prefix' or 'hybrid'"),
        (
            {"instance_source": "token_table", "freeze_table": True},
            r"freeze_table=True freezes a random table",
        ),
        (
            {"freeze_table": True},
            r"table_path / freeze_table need instance_source=.token_table. \(got .embeddings.\)",
        ),
        ({"prompt_dropout": 1.0}, r"prompt_dropout must be in \[0, 1\) \(got 1.0\)"),
        ({"instance_drop": 1.0}, r"instance_drop must be in \[0, 1\) \(got 1.0\); 0.0 keeps every"),
        (
            {"instance_drop": 0.2, "injection": "prefix"},
            r"instance_drop=0.2 leaves an example's instance part out.*only injection='hybrid' has \(got "
            r"injection='prefix'\); use prompt_dropout",
        ),
    ],
)
def test_invalid_configs_are_rejected_naming_field_and_value(fields, message):
    with pytest.raises(ValueError, match=message):
        InstancePromptConfig(task_type="CAUSAL_LM", **fields)


def test_token_table_with_inputs_embeds_only_says_what_to_do():
    model = ipt_model(injection="prefix", instance_source="token_table")
    embeds = model.get_input_embeddings()(token_batch())
    with pytest.raises(ValueError, match="pass input_ids, or use instance_source='embeddings'"):
        model(inputs_embeds=embeds)
    model = ipt_model(injection="prefix", instance_source="embeddings")
    with torch.no_grad():
        from_embeds = model(inputs_embeds=model.get_input_embeddings()(token_batch())).logits
        from_ids = model(input_ids=token_batch()).logits
    torch.testing.assert_close(from_embeds, from_ids)


@pytest.mark.parametrize(
    "generation", [{}, {"use_cache": False}, {"num_beams": 3}], ids=["cache", "no-cache", "beams"]
)
@pytest.mark.parametrize(("arch", "task"), [("llama", "CAUSAL_LM"), ("bart", "SEQ_2_SEQ_LM")])
def test_the_frozen_models_extra_forward_runs_once_per_generate(arch, task, generation):
    model = ipt_model(arch, task, instance_source="frozen_model")
    tuner = model.base_model
    runs = []
    original = tuner._run_frozen
    tuner._run_frozen = lambda inputs, depth=None: runs.append(inputs) or original(inputs, depth)
    ids = token_batch(2, 6)
    kwargs = {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "max_new_tokens": 4,
        "do_sample": False,
    }
    model.generate(**kwargs, **generation)
    assert len(runs) == 1 and runs[0].tokens.shape == (2, 6)  # the prompt's source, before beams expand it
    model.train()
    model(input_ids=ids, labels=lm_labels(ids) if task == "CAUSAL_LM" else token_batch(2, 4, seed=3))
    assert len(runs) == 2  # and once per training forward


def test_the_frozen_model_source_reads_inputs_embeds_when_that_is_all_the_call_has():
    model = ipt_model("llama", instance_source="frozen_model").eval()
    ids = token_batch(2, 6)
    with torch.no_grad():
        from_ids = model(input_ids=ids).logits
        from_embeds = model(inputs_embeds=model.get_input_embeddings()(ids)).logits
    torch.testing.assert_close(from_embeds, from_ids)


@pytest.mark.parametrize("task", ["SEQ_CLS", "TOKEN_CLS"])
def test_the_frozen_pass_sees_the_calls_segment_ids_and_an_encoders_positions(task):
    """The frozen pass is the frozen model on this call's input: a sentence pair's segment ids (BERT's
    token_type_ids) and an encoder's explicit position_ids (a left-padded batch) reach it as they reach the model.
    It ran without them, so a pair's second text looked like more of its first to the instance signal."""
    model = ipt_model("bert", task, instance_source="frozen_model").eval()
    tuner = model.base_model
    seen = []
    original = tuner._run_frozen
    tuner._run_frozen = lambda inputs, depth=None: seen.append(original(inputs, depth)) or seen[-1]
    pad = model.config.pad_token_id
    ids = torch.cat([torch.full((2, 2), pad), token_batch(2, 6)], dim=1)  # left-padded
    mask = (ids != pad).long()
    segments = torch.zeros_like(ids)
    segments[:, 5:] = 1  # the pair's second text
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    call = {"input_ids": ids, "attention_mask": mask, "token_type_ids": segments, "position_ids": positions}
    with torch.no_grad():
        model(**call)
        with model.disable_adapter():
            bare = model.get_base_model().base_model(**call).last_hidden_state
        rows = mask.bool()
        torch.testing.assert_close(seen[-1][rows], bare[rows])
        # and the prompt follows them: the same tokens as one segment give another output
        model(**(call | {"token_type_ids": torch.zeros_like(ids)}))
        assert not torch.allclose(seen[-1][rows], bare[rows], atol=1e-3)


@pytest.mark.parametrize("swap", ["modules_to_save", "set_input_embeddings"])
@pytest.mark.parametrize("injection", ["hybrid", "input"])
def test_the_embeddings_source_reads_the_embedding_layer_the_model_reads_now(swap, injection):
    """A trained copy of the embeddings (modules_to_save) or a layer set after get_peft_model is what the model embeds
    its input with, so the instance signal reads it too: ids and their embeddings give one answer."""
    extra = {"modules_to_save": ["embed_tokens"]} if swap == "modules_to_save" else {}
    model = ipt_model("llama", instance_source="embeddings", injection=injection, **extra).eval()
    if swap == "modules_to_save":
        layer = model.get_input_embeddings().modules_to_save["default"]
    else:
        layer = torch.nn.Embedding.from_pretrained(model.get_input_embeddings().weight.clone(), freeze=False)
        model.get_base_model().set_input_embeddings(layer)
    with torch.no_grad():
        layer.weight.mul_(-3.0)  # the table the model now reads differs from the one it had at get_peft_model
    ids = token_batch(2, 6)
    with torch.no_grad():
        from_ids = model(input_ids=ids).logits
        from_embeds = model(inputs_embeds=model.get_input_embeddings()(ids)).logits
    torch.testing.assert_close(from_ids, from_embeds)


@pytest.mark.parametrize(
    "variant", [*VARIANTS, {"prefix_v2": True}], ids=lambda v: "-".join(map(str, v.values()))
)
def test_generating_from_inputs_embeds_gives_the_tokens_of_generating_from_ids(variant):
    """generate(inputs_embeds=...) on a decoder: the prompt comes from the embeddings, once, and decoding goes on
    from the new tokens' ids; it returns only the new tokens, as transformers does without an adapter."""
    model = ipt_or_prefix_model("llama", "CAUSAL_LM", variant)
    ids = token_batch(2, 6)
    mask = torch.ones_like(ids)
    embeds = model.get_input_embeddings()(ids).detach()
    greedy = {"max_new_tokens": 4, "do_sample": False}
    if variant.get("instance_source") == "token_table":
        with pytest.raises(ValueError, match="pass input_ids"):
            model.generate(inputs_embeds=embeds, attention_mask=mask, **greedy)
        return
    from_ids = model.generate(input_ids=ids, attention_mask=mask, **greedy)
    from_embeds = model.generate(inputs_embeds=embeds, attention_mask=mask, **greedy)
    assert torch.equal(from_embeds, from_ids[:, ids.shape[1] :])


@pytest.mark.parametrize(
    "variant",
    [{"injection": "hybrid"}, {"injection": "input"}, {"prefix_v2": True}],
    ids=lambda v: "-".join(map(str, v.values())),
)
def test_seq2seq_trainer_predict_with_generate_gives_each_inputs_own_generation(variant, tmp_path):
    """Seq2SeqTrainer(predict_with_generate=True) generates from right-padded batches of inputs of several lengths:
    every row's tokens are the ones generate() gives that input alone."""
    from datasets import Dataset
    from transformers import Seq2SeqTrainer, Seq2SeqTrainingArguments

    model = ipt_or_prefix_model("bart", "SEQ_2_SEQ_LM", variant)
    generator = torch.Generator().manual_seed(0)
    rows = [
        {"input_ids": torch.randint(3, 128, (n,), generator=generator).tolist(), "labels": [5, 6, 7, 8]}
        for n in (4, 8, 6, 5, 7)
    ]

    def collate(features):  # right padding with BART's pad id 1, as a tokenizer's collator pads
        width = max(len(f["input_ids"]) for f in features)
        pad = lambda f: [1] * (width - len(f["input_ids"]))  # noqa: E731
        return {
            "input_ids": torch.tensor([f["input_ids"] + pad(f) for f in features]),
            "attention_mask": torch.tensor([[1] * len(f["input_ids"]) + [0] * len(pad(f)) for f in features]),
            "labels": torch.tensor([f["labels"] for f in features]),
        }

    args = Seq2SeqTrainingArguments(
        str(tmp_path), per_device_eval_batch_size=3, predict_with_generate=True, report_to=[], use_cpu=True
    )
    trainer = Seq2SeqTrainer(model=model, args=args, data_collator=collate)
    predictions = trainer.predict(Dataset.from_list(rows), max_new_tokens=5, do_sample=False).predictions
    for row, predicted in zip(rows, predictions, strict=True):
        ids = torch.tensor([row["input_ids"]])
        alone = model.generate(input_ids=ids, max_new_tokens=5, do_sample=False)[0].tolist()
        assert predicted[: len(alone)].tolist() == alone


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: "-".join(map(str, v.values())))
def test_logits_to_keep_returns_the_last_positions_of_the_full_logits(variant):
    """transformers' logits_to_keep (what generate passes) keeps the caller's last positions, never a prompt's."""
    model = ipt_model("llama", **variant).eval()
    ids = token_batch(2, 6)
    with torch.no_grad():
        full = model(input_ids=ids).logits
        for keep in (1, 3):
            torch.testing.assert_close(model(input_ids=ids, logits_to_keep=keep).logits, full[:, -keep:])


def test_a_mixture_prompt_is_a_convex_mix_of_its_learned_prompts():
    from peft_ipt.instance_prompt.encoders import MixtureEncoder

    encoder = MixtureEncoder(dim=8, prompt_length=3, rank=4, hidden=5)
    x, valid = torch.randn(6, 7, 8), torch.ones(6, 7, dtype=torch.bool)
    codes = encoder(x, valid)  # (B, P, r)
    weights = torch.softmax(encoder.router(x.mean(1)), -1)
    torch.testing.assert_close(codes, torch.einsum("bk,kpr->bpr", weights, encoder.codes))
    with torch.no_grad():
        encoder.codes.copy_(encoder.codes[:1].expand_as(encoder.codes))  # K copies of one prompt
    same = encoder(x, valid)
    torch.testing.assert_close(same, same[:1].expand_as(same))  # then no input can have a prompt of its own


def test_attention_pooling_gives_each_prompt_position_its_own_pool_of_the_valid_tokens():
    from peft_ipt.instance_prompt.encoders import AttentionEncoder, masked_mean

    torch.manual_seed(0)
    encoder = AttentionEncoder(dim=8, prompt_length=3, rank=4, hidden=5)
    x = torch.randn(2, 6, 8)
    valid = torch.tensor([[True] * 6, [True] * 4 + [False] * 2])
    codes = encoder(x, valid)  # (B, P, r)
    assert codes.shape == (2, 3, 4)
    assert not torch.allclose(codes[:, 0], codes[:, 1])  # positions read different mixes
    # each position's code is a convex mix of the valid tokens' value vectors, nothing of the padding
    padded = x.clone()
    padded[1, 4:] = 1e3
    torch.testing.assert_close(encoder(padded, valid), codes)
    with torch.no_grad():
        encoder.keys.weight.zero_()  # every token scored alike: each position reads the plain mean
    mean = masked_mean(encoder.values(x), valid)  # (B, r)
    torch.testing.assert_close(encoder(x, valid), mean[:, None].expand(-1, 3, -1))
    # a row with no valid token has nothing to read: zeros, not NaN
    empty = encoder(x, torch.zeros_like(valid))
    assert torch.equal(empty, torch.zeros_like(empty))


@pytest.mark.parametrize(
    ("arch", "task"), [("llama", "CAUSAL_LM"), ("bert", "SEQ_CLS"), ("bart", "SEQ_2_SEQ_LM")]
)
def test_a_shallow_frozen_pass_stops_at_its_layer_and_reads_what_enters_it(arch, task):
    model = ipt_model(arch, task, instance_source="frozen_model", frozen_layers=1).eval()
    tuner = model.base_model
    attention = {(kind, layer): m for m, kind, layer, *_ in tuner._injection.sites}
    kind = "encoder" if arch == "bart" else "self"
    entering, called = [], []
    attention[(kind, 1)].register_forward_pre_hook(
        lambda m, a, k: entering.append(k.get("hidden_states", a[0] if a else None)), with_kwargs=True
    )
    attention[(kind, 1)].register_forward_hook(lambda *a: called.append(1))
    ids = token_batch(2, 6)
    inputs = tuner._inputs_from_call((), {"input_ids": ids})
    with torch.no_grad():
        states = tuner._run_frozen(inputs, 1)
        assert not called  # layer 1 never ran: the pass stopped where its attention begins
        with model.disable_adapter():
            (encoder_call if arch == "bart" else backbone_call)(model, ids)
    torch.testing.assert_close(states, entering[-1])  # what the bare model feeds layer 1


def backbone_call(model, ids):
    model.get_base_model().base_model(input_ids=ids, attention_mask=torch.ones_like(ids))


def encoder_call(model, ids):
    model.get_base_model().get_encoder()(input_ids=ids, attention_mask=torch.ones_like(ids))


def test_frozen_layers_is_checked_against_the_source_and_the_model():
    with pytest.raises(ValueError, match="frozen_layers=1 needs instance_source='frozen_model'"):
        InstancePromptConfig(frozen_layers=1)
    with pytest.raises(
        ValueError, match=r"frozen_layers=2 must be below the model's 2 self-attention layers \(1..1\)"
    ):
        ipt_model(instance_source="frozen_model", frozen_layers=2)


# -- IDPG's PHM generator (instance_phm) ------------------------------------------------------------------------


def test_a_phm_layer_is_a_linear_layer_with_a_sum_of_kronecker_products_as_its_weight():
    layer = PHMLinear(12, 8, n=4)
    expected = sum(torch.kron(layer.rules[i], layer.factors[i]) for i in range(4))
    assert layer.weight.shape == (8, 12)
    torch.testing.assert_close(layer.weight, expected)
    x = torch.randn(3, 12)
    torch.testing.assert_close(layer(x), x @ expected.T + layer.bias)
    assert sum(p.numel() for p in layer.parameters()) == 12 * 8 // 4 + 4**3 + 8


def test_a_phm_layer_starts_with_the_spread_of_a_linear_layer():
    torch.manual_seed(0)
    phm, linear = PHMLinear(384, 512, n=8).weight, torch.nn.Linear(384, 512).weight
    assert abs(phm.std().item() / linear.std().item() - 1) < 0.05


@pytest.mark.parametrize("injection", ["hybrid", "prefix", "input"])
def test_instance_phm_shrinks_the_generator_and_trains_and_reloads(injection, tmp_path):
    plain = ipt_model(injection=injection)
    model = ipt_model(injection=injection, instance_phm=4)
    count = lambda m: sum(p.numel() for p in m.parameters() if p.requires_grad)  # noqa: E731
    assert count(model) < count(plain)
    module = model.base_model.prompt_modules["default"]
    phm_layers = [m for m in module.modules() if isinstance(m, PHMLinear)]
    assert (
        len(phm_layers) == 3
    )  # the mlp encoder's two layers and the head (one attention kind, or the embedding)
    ids = token_batch()
    model.train()
    model(input_ids=ids, labels=lm_labels(ids)).loss.backward()
    for layer in phm_layers:
        assert layer.rules.grad.abs().sum() > 0 and layer.factors.grad.abs().sum() > 0
    model.eval()
    with torch.no_grad():
        reference = model(input_ids=ids).logits
        other = model(input_ids=token_batch(seed=7)).logits
    assert not torch.allclose(reference[:, -1], other[:, -1])  # each input its own prompt
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(tiny_model("llama"), tmp_path).eval()
    assert loaded.peft_config["default"].instance_phm == 4
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, reference)


def test_a_phm_instance_part_starts_at_zero_under_the_task_prefix():
    """init_weights: the PHM heads output zero, so IPT starts as its task prefix alone, as with linear heads."""
    model = get_peft_model(
        tiny_model("llama"), InstancePromptConfig(task_type="CAUSAL_LM", prompt_length=4, instance_phm=4)
    ).eval()
    module = model.base_model.prompt_modules["default"]
    codes = torch.randn(2, 4, 32)
    for head in module.heads.values():
        assert isinstance(head, PHMLinear) and head(codes).abs().max() == 0
    ids = token_batch()
    with torch.no_grad():
        full = model(input_ids=ids).logits
        module.config.instance_scale = 0.0
        task_only = model(input_ids=ids).logits
    assert torch.equal(full, task_only)


def test_instance_phm_refuses_widths_it_does_not_divide_and_encoders_it_cannot_factorise():
    with pytest.raises(ValueError, match=r"instance_phm must be an integer >= 1 \(got 0\)"):
        InstancePromptConfig(task_type="CAUSAL_LM", instance_phm=0)
    with pytest.raises(ValueError, match=r"instance_phm=4 factorises.*got instance_encoder='lstm'.*'mlp'"):
        InstancePromptConfig(task_type="CAUSAL_LM", instance_phm=4, instance_encoder="lstm")
    # instance_rank 30: the heads map 30 codes -> keys/values, which 4 does not divide
    config = InstancePromptConfig(task_type="CAUSAL_LM", instance_phm=4, instance_rank=30)
    with pytest.raises(ValueError, match=r"instance_phm=4 must divide .* 30 -> .*n dividing both.*\[2"):
        get_peft_model(tiny_model("llama"), config)


# -- a reparameterised task prefix ----------------------------------------------------------------------------


@pytest.mark.parametrize(("arch", "task"), [("llama", "CAUSAL_LM"), ("bart", "SEQ_2_SEQ_LM")])
def test_with_a_zero_instance_part_ipt_is_its_reparameterised_task_prefix_alone(arch, task):
    """task_prefix_hidden_size: IPT's task prefix is PrefixTuningV2's MLP-reparameterised prefix, weight for weight;
    with the instance part at its zero start the two models give the same logits (the controlled comparison)."""
    torch.manual_seed(0)
    ipt = get_peft_model(
        tiny_model(arch, task),
        InstancePromptConfig(task_type=task, prompt_length=4, task_prefix_hidden_size=8),
    ).eval()
    prefix = get_peft_model(
        tiny_model(arch, task),
        PrefixTuningV2Config(task_type=task, prefix_length=4, reparameterize=True, encoder_hidden_size=8),
    ).eval()
    tables = ipt.base_model.prompt_modules["default"].task
    assert all(table.reparameterized for table in tables.values())
    prefix_tables = prefix.base_model.prompt_modules["default"].tables
    assert tables.keys() == prefix_tables.keys()
    for kind, table in tables.items():
        table.load_state_dict(prefix_tables[kind].state_dict())
    inputs = {"input_ids": token_batch()}
    if task == "SEQ_2_SEQ_LM":
        inputs["decoder_input_ids"] = token_batch(2, 4, seed=3)
    with torch.no_grad():
        torch.testing.assert_close(ipt(**inputs).logits, prefix(**inputs).logits, rtol=1e-5, atol=1e-5)
        with ipt.disable_adapter():
            bare = ipt(**inputs).logits
        assert not torch.allclose(ipt(**inputs).logits, bare, atol=1e-4)


def test_a_reparameterised_task_prefix_trains_and_reloads(tmp_path):
    model = ipt_model(task_prefix_hidden_size=8)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any(".task." in n and ".mlp." in n for n in trainable)
    ids = token_batch()
    model.train()
    model(input_ids=ids, labels=lm_labels(ids)).loss.backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if ".task." in n)
    model.eval()
    with torch.no_grad():
        reference = model(input_ids=ids).logits
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(tiny_model("llama"), tmp_path).eval()
    assert loaded.peft_config["default"].task_prefix_hidden_size == 8
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, reference)


@pytest.mark.parametrize(
    "variant",
    [
        {"instance_source": "embeddings"},
        {"instance_source": "embeddings", "injection": "input"},
        {"instance_source": "token_table", "injection": "input"},
    ],
    ids=["embeddings source", "embeddings source, input prompt", "token table, input prompt"],
)
@pytest.mark.parametrize("config_cls", [AlbertConfig, ElectraConfig])
def test_models_that_embed_narrower_than_their_hidden_states_read_and_take_embeddings(config_cls, variant):
    """ALBERT and ELECTRA embed tokens in 16 dimensions here (128 in the released models) and project them to the
    hidden size: the embeddings source reads 16-dimensional vectors, an input prompt enters as 16-dimensional
    embeddings. Before, both failed with a shape error at the first call."""
    config = config_cls(
        vocab_size=128,
        embedding_size=16,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        num_labels=3,
    )
    torch.manual_seed(0)
    base = AutoModelForSequenceClassification.from_config(config).eval()
    model = get_peft_model(
        copy.deepcopy(base),
        InstancePromptConfig(task_type="SEQ_CLS", prompt_length=4, init_weights=False, **variant),
    )
    ids = token_batch(2, 7)
    with torch.no_grad():
        logits = model.eval()(input_ids=ids).logits
        with model.disable_adapter():
            assert torch.equal(model(input_ids=ids).logits, base(input_ids=ids).logits)
    assert (logits - base(input_ids=ids).logits).abs().max() > 1e-5
    model.train()(input_ids=ids, labels=torch.tensor([0, 2])).loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_input_injection_keeps_the_logits_a_tensor_of_logits_to_keep_names(arch):
    """transformers' ``logits_to_keep`` as a tensor names positions of the caller's sequence; with the prompt's P
    positions inserted in front of a row's first token, the model's own slicing picked other positions, silently
    (another token's logits). An int keeps the last tokens, which the prompt does not move."""
    model = ipt_model(arch, "CAUSAL_LM", injection="input").eval()
    move_trainable_weights(model)
    ids = token_batch(2, 7)
    mask = torch.ones_like(ids)
    mask[0, :2] = 0  # left padding: the rows' prompts sit at different columns
    with torch.no_grad():
        full = model(input_ids=ids, attention_mask=mask).logits
        for keep in (torch.tensor([1, 4]), torch.tensor([6, -1, 3]), 1, 3):
            kept = model(input_ids=ids, attention_mask=mask, logits_to_keep=keep).logits
            expected = full[:, keep] if torch.is_tensor(keep) else full[:, -keep:]
            torch.testing.assert_close(kept, expected)


@pytest.mark.parametrize("task", ["CAUSAL_LM", "TOKEN_CLS"])
def test_an_input_prompt_on_roberta_gives_a_left_padded_row_its_outputs_alone(task):
    # RoBERTa numbers positions from input_ids after the padding; from the prompted inputs_embeds it counted from the
    # first column, so a left-padded row's logits were 0.3 off the row alone (RoBERTa decoder), silently.
    model = get_peft_model(
        tiny_model("roberta", task, is_decoder=task == "CAUSAL_LM"),
        InstancePromptConfig(task_type=task, prompt_length=3, injection="input", init_weights=False),
    ).eval()
    row = token_batch(1, 5, low=3)
    padded = torch.cat([torch.ones(1, 2, dtype=torch.long), row], 1)  # RoBERTa pads with 1
    mask = torch.cat([torch.zeros(1, 2, dtype=torch.long), torch.ones_like(row)], 1)
    with torch.no_grad():
        alone = model(input_ids=row, attention_mask=torch.ones_like(row)).logits
        together = model(input_ids=padded, attention_mask=mask).logits
        with model.disable_adapter():  # the bare model gives the padded row its outputs alone too
            bare = model(input_ids=padded, attention_mask=mask).logits
            bare_alone = model(input_ids=row).logits
    together, bare = together[:, 2:], bare[:, 2:]  # per-token outputs: the row's own
    torch.testing.assert_close(bare, bare_alone, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-6)


def test_an_input_prompt_on_a_hash_routed_model_is_refused_and_prefixes_run():
    # DeepSeek-V4 routes tokens to experts by their ids, so it cannot run from inputs_embeds: an input-level prompt
    # failed inside the model with "'NoneType' object has no attribute 'reshape'"
    from transformers import AutoModelForCausalLM, DeepseekV4Config

    config = DeepseekV4Config(
        vocab_size=128,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        head_dim=8,
        max_position_embeddings=64,
        pad_token_id=0,
    )
    torch.manual_seed(0)
    with pytest.raises(ValueError, match=r"injection='input' on DeepseekV4ForCausalLM: .*hash routing"):
        get_peft_model(
            AutoModelForCausalLM.from_config(config),
            InstancePromptConfig(task_type="CAUSAL_LM", prompt_length=3, injection="input"),
        )
    model = get_peft_model(
        AutoModelForCausalLM.from_config(config).eval(),
        InstancePromptConfig(task_type="CAUSAL_LM", prompt_length=3, init_weights=False),
    )
    ids = token_batch()
    with torch.no_grad():
        adapted = model(input_ids=ids).logits
        with model.disable_adapter():
            assert not torch.allclose(model(input_ids=ids).logits, adapted, atol=1e-4)
