"""After ``import peft_ipt`` peft's own loaders rebuild our configs and models; without it they say what is missing."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from conftest import tiny_model, token_batch
from peft import PeftConfig, PeftModel, PeftType, get_peft_config, get_peft_model
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING

from peft_ipt import InstancePromptConfig, InstancePromptModel, PrefixTuningV2Config, PrefixTuningV2Model


def test_methods_are_in_peft_tables():
    for name, config_cls, model_cls, prefix in (
        ("PREFIX_TUNING_V2", PrefixTuningV2Config, PrefixTuningV2Model, "prefix_v2_"),
        ("INSTANCE_PROMPT", InstancePromptConfig, InstancePromptModel, "ipt_"),
    ):
        peft_type = PeftType[name]
        assert PEFT_TYPE_TO_CONFIG_MAPPING[peft_type] is config_cls
        assert PEFT_TYPE_TO_TUNER_MAPPING[peft_type] is model_cls
        assert PEFT_TYPE_TO_PREFIX_MAPPING[peft_type] == prefix
        assert "import peft_ipt" in peft_type.value


def test_registration_is_idempotent():
    from peft_ipt import registration

    registration.register()
    assert list(PeftType).count(PeftType["INSTANCE_PROMPT"]) == 1


@pytest.mark.parametrize("config_cls", [PrefixTuningV2Config, InstancePromptConfig])
def test_peft_config_from_pretrained_and_get_peft_config_rebuild_our_config(config_cls, tmp_path):
    model = get_peft_model(tiny_model("llama"), config_cls(task_type="CAUSAL_LM"))
    model.save_pretrained(tmp_path)
    loaded = PeftConfig.from_pretrained(tmp_path)
    assert type(loaded) is config_cls
    assert loaded.base_model_shapes == model.peft_config["default"].base_model_shapes
    rebuilt = get_peft_config(json.loads((tmp_path / "adapter_config.json").read_text()))
    assert type(rebuilt) is config_cls


def test_peft_model_from_pretrained_rebuilds_our_tuner(tmp_path):
    model = get_peft_model(
        tiny_model("llama"), InstancePromptConfig(task_type="CAUSAL_LM", init_weights=False)
    )
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(tiny_model("llama"), tmp_path)
    assert isinstance(loaded.base_model, InstancePromptModel)
    ids = token_batch()
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, model(input_ids=ids).logits)


def test_loading_without_import_peft_ipt_says_to_import_it(tmp_path):
    model = get_peft_model(tiny_model("llama"), PrefixTuningV2Config(task_type="CAUSAL_LM"))
    model.save_pretrained(tmp_path)
    script = f"from peft import PeftConfig\nPeftConfig.from_pretrained({str(tmp_path)!r})\n"
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "import peft_ipt" in result.stderr.strip().splitlines()[-1]
