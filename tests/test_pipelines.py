"""transformers' `pipeline()` on a PeftModel, as LoRA users call it: each input gets what the model gives it alone."""

from __future__ import annotations

import pytest
import torch
import transformers
from conftest import tiny_model, tiny_tokenizer
from peft import get_peft_model

from peft_ipt import InstancePromptConfig, PrefixTuningV2Config

CONFIGS = {
    "prefix_v2": lambda task: PrefixTuningV2Config(task_type=task, prefix_length=4, init_weights=False),
    "ipt_hybrid": lambda task: InstancePromptConfig(task_type=task, prompt_length=4, init_weights=False),
    "ipt_input": lambda task: InstancePromptConfig(
        task_type=task, prompt_length=4, injection="input", init_weights=False
    ),
}
TEXTS = ["the movie was very good great", "a film", "pub cafe cheap french riverside"]


def adapted(arch: str, task: str, method: str):
    model = get_peft_model(tiny_model(arch, task), CONFIGS[method](task))
    return model.eval()


@pytest.mark.parametrize("padding_side", ["left", "right"])
@pytest.mark.parametrize("method", sorted(CONFIGS))
def test_text_generation_pipeline_batched_gives_each_input_its_own_generate(method, padding_side):
    model = adapted("llama", "CAUSAL_LM", method)
    tokenizer = tiny_tokenizer(with_cls=False)
    tokenizer.padding_side = padding_side
    generator = transformers.pipeline("text-generation", model=model, tokenizer=tokenizer)
    options = {"max_new_tokens": 6, "do_sample": False, "return_full_text": False}
    batched = [out[0]["generated_text"] for out in generator(TEXTS, batch_size=3, **options)]
    for text, got in zip(TEXTS, batched, strict=True):
        inputs = tokenizer(text, return_tensors="pt")
        with torch.no_grad():
            tokens = model.generate(**inputs, max_new_tokens=6, do_sample=False)
        assert got == tokenizer.decode(tokens[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert len(set(batched)) > 1  # the adapter's random init gives the inputs different continuations


@pytest.mark.parametrize("method", sorted(CONFIGS))
def test_text_classification_pipeline_scores_are_the_models_probabilities(method):
    model = adapted("bert", "SEQ_CLS", method)
    tokenizer = tiny_tokenizer(with_cls=True)
    classifier = transformers.pipeline("text-classification", model=model, tokenizer=tokenizer, top_k=None)
    results = classifier(TEXTS, batch_size=3)
    with torch.no_grad():
        expected = model(**tokenizer(TEXTS, return_tensors="pt", padding=True)).logits.softmax(-1)
    label_ids = model.config.label2id
    got = torch.zeros(len(results), 3)
    for i, row in enumerate(results):
        for entry in row:
            got[i, label_ids[entry["label"]]] = entry["score"]
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", sorted(CONFIGS))
def test_token_classification_pipeline_tags_each_word_from_the_models_logits(method):
    model = adapted("bert", "TOKEN_CLS", method)
    tokenizer = tiny_tokenizer(with_cls=True)
    tagger = transformers.pipeline("token-classification", model=model, tokenizer=tokenizer)
    text = TEXTS[0]
    entities = tagger(text)
    with torch.no_grad():
        probs = model(**tokenizer(text, return_tensors="pt")).logits.softmax(-1)[
            0, 1:-1
        ]  # the words, not [CLS]/[SEP]
    # The pipeline leaves out words tagged with label 0 when it is "O"; the tiny model's labels are LABEL_k, so
    # every word comes back, in order, with the model's own top label and probability.
    assert [e["word"] for e in entities] == text.split()
    assert [model.config.label2id[e["entity"]] for e in entities] == probs.argmax(-1).tolist()
    torch.testing.assert_close(
        torch.tensor([float(e["score"]) for e in entities]), probs.max(-1).values, rtol=1e-5, atol=1e-6
    )


@pytest.mark.parametrize("method", sorted(CONFIGS))
def test_feature_extraction_pipeline_gives_the_models_own_states(method):
    """Sentence-embedding users' path: one state per token of the input (an input-level prompt's cut out)."""
    model = adapted("bert", "FEATURE_EXTRACTION", method)
    tokenizer = tiny_tokenizer(with_cls=True)
    extractor = transformers.pipeline("feature-extraction", model=model, tokenizer=tokenizer)
    for text in TEXTS:
        got = extractor(text, return_tensors=True)
        inputs = tokenizer(text, return_tensors="pt")
        with torch.no_grad():
            expected = model(**inputs).last_hidden_state
            with model.disable_adapter():
                bare = model(**inputs).last_hidden_state
        assert got.shape == (1, inputs["input_ids"].shape[1], 32)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
        assert not torch.allclose(got, bare, atol=1e-3)  # the adapter moved them
