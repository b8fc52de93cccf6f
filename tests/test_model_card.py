"""The model card save_pretrained writes from the Python API: the method, its key fields and the loading lines,
with the Hub metadata exactly as peft writes it."""

from __future__ import annotations

import re

import pytest
import torch
from conftest import tiny_model, token_batch
from huggingface_hub import ModelCard
from peft import get_peft_model
from transformers import AutoModelForCausalLM

from peft_ipt import InstancePromptConfig, PrefixTuningV2Config


@pytest.fixture(params=["prefix_v2", "ipt"])
def saved(request, tmp_path):
    config = (
        PrefixTuningV2Config(task_type="CAUSAL_LM", prefix_length=5, reparameterize=False)
        if request.param == "prefix_v2"
        else InstancePromptConfig(task_type="CAUSAL_LM", prompt_length=6, instance_source="frozen_model")
    )
    tiny_model("llama").save_pretrained(tmp_path / "base")  # a local base model, as AutoPeftModel needs one
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "base", attn_implementation="sdpa")
    model = get_peft_model(base, config).eval()
    model.save_pretrained(tmp_path / "adapter")
    return request.param, model, tmp_path / "adapter"


def test_the_card_names_the_method_and_its_key_fields(saved):
    method, _, folder = saved
    card = (folder / "README.md").read_text()
    assert "[More Information Needed]" not in card  # not peft's empty template
    if method == "prefix_v2":
        assert "# PrefixTuningV2 adapter" in card and "| prefix_length | `5` |" in card
        assert "| reparameterize | `False` |" in card
    else:
        assert "# InstancePrompt (IPT) adapter" in card and "| prompt_length | `6` |" in card
        assert "| instance_source | `frozen_model` |" in card


def test_the_cards_loading_lines_import_peft_ipt_first_and_load_the_adapter(saved):
    _, model, folder = saved
    (code,) = re.findall(r"```python\n(.*?)```", (folder / "README.md").read_text(), re.S)
    lines = [line for line in code.splitlines() if line.strip()]
    assert lines[0].startswith("import peft_ipt")
    namespace: dict = {}
    exec(code, namespace)  # noqa: S102 - the card's own snippet, as a user would paste it
    ids = token_batch()
    with torch.no_grad():
        torch.testing.assert_close(namespace["model"](input_ids=ids).logits, model(input_ids=ids).logits)


def test_the_hub_metadata_is_what_peft_writes(saved, tmp_path):
    _, model, folder = saved
    model.create_or_update_model_card(str(tmp_path))  # peft's own card for the same model
    assert (
        ModelCard.load(folder / "README.md").data.to_dict()
        == ModelCard.load(tmp_path / "README.md").data.to_dict()
    )


def test_saving_again_replaces_the_card_and_a_hand_written_card_is_kept(saved):
    _, model, folder = saved
    model.save_pretrained(folder)
    card = (folder / "README.md").read_text()
    assert card.count("## Loading") == 1 and card.count("- PEFT ") == 1
    (folder / "README.md").write_text("# My adapter\n\nNotes of my own.\n")
    model.save_pretrained(folder)
    assert "Notes of my own." in (folder / "README.md").read_text()
