"""Saved adapter folders that must not load: pickles, corrupt or half-written files, configs from other versions;
and saving, which never leaves a folder that loads as something it is not."""

from __future__ import annotations

import json
import shutil

import peft.peft_model
import pytest
import torch
from conftest import tiny_model, token_batch
from peft import PeftConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file

import peft_ipt
from peft_ipt import AdapterFileError, InstancePromptConfig, PrefixTuningV2Config

WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"


@pytest.fixture(params=[PrefixTuningV2Config, InstancePromptConfig], ids=["prefix_v2", "ipt"])
def saved(request, tmp_path):
    """A trained-looking adapter saved to tmp_path/adapter; returns (folder, model)."""
    model = get_peft_model(tiny_model("llama"), request.param(task_type="CAUSAL_LM", init_weights=False))
    folder = tmp_path / "adapter"
    model.save_pretrained(folder)
    return folder, model


def load(folder):
    return PeftModel.from_pretrained(tiny_model("llama"), folder)


def adapter_weights(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if ".prompt." in n}


def edit_config(folder, **changes) -> None:
    config = json.loads((folder / CONFIG).read_text())
    config.update(changes)
    (folder / CONFIG).write_text(json.dumps(config))


# -- untrusted and broken folders --------------------------------------------------------------------------


def test_an_adapter_saved_as_a_pickle_loads_back_identically(saved):
    folder, model = saved
    with torch.no_grad():
        next(iter(model.base_model.prompt_modules["default"].parameters())).add_(1.0)  # unlike the first save
    model.save_pretrained(folder, safe_serialization=False)  # over the safetensors adapter of the fixture
    assert (folder / "adapter_model.bin").is_file() and not (
        folder / WEIGHTS
    ).exists()  # it would shadow the pickle
    loaded = load(folder)
    for name, value in adapter_weights(model).items():
        torch.testing.assert_close(adapter_weights(loaded)[name], value, rtol=0, atol=0)


class Payload:
    """Pickles as a call of print: what a malicious adapter would hide in its weights file."""

    def __reduce__(self):
        return (print, ("code from the pickle ran",))


def test_a_pickle_that_holds_more_than_tensors_is_refused_without_running_it(saved, capsys):
    folder, model = saved
    weights = load_file(folder / WEIGHTS)
    torch.save({**weights, "extra": Payload()}, folder / "adapter_model.bin")
    (folder / WEIGHTS).unlink()
    edit_config(folder, weights_sha256=None)  # as saved with safe_serialization=False by another tool
    with pytest.raises(
        AdapterFileError, match=r"adapter_model\.bin is a pickle that holds more than tensors.*allow_pickled"
    ):
        load(folder)
    assert "code from the pickle ran" not in capsys.readouterr().out
    with peft_ipt.allow_pickled_adapters(), pytest.raises(Exception):  # noqa: B017 - peft's own weights_only load
        load(folder)  # the opt-in hands it to peft, whose torch.load(weights_only=True) refuses it too
    assert "code from the pickle ran" not in capsys.readouterr().out


def test_a_corrupt_pickle_is_refused_naming_the_file(saved):
    folder, model = saved
    model.save_pretrained(folder, safe_serialization=False)
    data = (folder / "adapter_model.bin").read_bytes()
    (folder / "adapter_model.bin").write_bytes(data[: len(data) // 2])
    edit_config(folder, weights_sha256=None)
    with pytest.raises(AdapterFileError, match=r"adapter_model\.bin is not a readable pickle"):
        load(folder)


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_corrupt_or_truncated_weights_are_refused_naming_the_file(saved, damage):
    folder, _ = saved
    data = (folder / WEIGHTS).read_bytes()
    broken = {"truncated": data[: len(data) // 2], "garbage": b"\x00not safetensors" * 8, "empty": b""}[
        damage
    ]
    (folder / WEIGHTS).write_bytes(broken)
    edit_config(folder, weights_sha256=None)  # the header check alone catches it
    with pytest.raises(AdapterFileError, match=r"adapter_model\.safetensors is not a valid safetensors file"):
        load(folder)


def test_a_malformed_adapter_config_is_refused_naming_the_file(saved):
    folder, _ = saved
    (folder / CONFIG).write_text('{"peft_type": "PREFIX_TUNING_V2 (needs: import peft_ipt)", ')
    with pytest.raises(ValueError, match=r"adapter_config\.json is not valid JSON.*save the adapter again"):
        load(folder)
    with pytest.raises(ValueError, match="is not valid JSON"):
        PeftConfig.from_pretrained(folder)


def test_a_missing_adapter_config_is_refused(saved):
    folder, _ = saved
    (folder / CONFIG).unlink()
    with pytest.raises(ValueError, match=r"Can't find 'adapter_config\.json'"):
        load(folder)


def test_fields_from_a_newer_version_are_refused_naming_them_and_the_upgrade(saved):
    folder, _ = saved
    edit_config(folder, prefix_schedule="cosine", peft_ipt_version="9.0.0")
    with pytest.raises(ValueError, match=r"\['prefix_schedule'\].*peft-ipt 9\.0\.0.*pip install -U peft-ipt"):
        load(folder)


def test_missing_weights_are_refused_when_the_config_was_saved_with_them(saved):
    folder, model = saved
    (folder / WEIGHTS).unlink()
    with pytest.raises(AdapterFileError, match="saved with weights"):
        load(folder)
    # A config saved on its own has no weights and no checksum: it still loads as a config.
    config_only = folder.parent / "config_only"
    model.peft_config["default"].__class__(task_type="CAUSAL_LM").save_pretrained(config_only)
    assert type(PeftConfig.from_pretrained(config_only)) is type(model.peft_config["default"])


def test_weights_that_do_not_match_their_checksum_are_refused(saved):
    folder, _ = saved
    weights = load_file(folder / WEIGHTS)
    weights = {
        k: v + 1 for k, v in weights.items()
    }  # a valid file, but not the one the config was saved with
    save_file(weights, folder / WEIGHTS)
    with pytest.raises(AdapterFileError, match="does not match the checksum"):
        load(folder)


@pytest.mark.parametrize("change", ["missing", "shape", "stray"])
def test_weights_that_do_not_fit_the_config_are_refused_before_any_is_copied(saved, change):
    folder, _ = saved
    weights = load_file(folder / WEIGHTS)
    key = sorted(weights)[0]
    if change == "missing":
        del weights[key]
    elif change == "shape":
        weights[key] = torch.zeros(3, 3)
    else:
        weights[key.rpartition(".")[0] + ".unknown_tensor"] = torch.zeros(2)
    save_file(weights, folder / WEIGHTS)
    edit_config(folder, weights_sha256=None)  # e.g. a folder assembled by hand: only the keys can tell
    expected = {"missing": "missing", "shape": r"has shape \(3, 3\)", "stray": "no adapter of this method"}
    with pytest.raises(AdapterFileError, match=expected[change]):
        load(folder)


def test_a_hub_repo_with_only_a_pickle_is_refused_before_peft_downloads_weights(saved, monkeypatch):
    folder, _ = saved
    torch.save(load_file(folder / WEIGHTS), folder / "adapter_model.bin")
    (folder / WEIGHTS).unlink()
    edit_config(folder, weights_sha256=None)
    import huggingface_hub
    from huggingface_hub.errors import EntryNotFoundError

    def fake_download(repo_id, filename, subfolder=None, **kwargs):
        assert repo_id == "someone/adapter"
        if not (folder / filename).is_file():
            raise EntryNotFoundError(f"{filename} not in {repo_id}")
        return str(folder / filename)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    monkeypatch.setattr(peft.config, "hf_hub_download", fake_download)
    config_cls = type(PeftConfig.from_pretrained(folder))
    config_cls.from_pretrained("someone/adapter")  # a tensors-only pickle passes the checks
    torch.save({**load_file_from_pickle(folder), "extra": Payload()}, folder / "adapter_model.bin")
    with pytest.raises(AdapterFileError, match="is a pickle that holds more than tensors"):
        config_cls.from_pretrained("someone/adapter")


def load_file_from_pickle(folder):
    return torch.load(folder / "adapter_model.bin", weights_only=True)


# -- saving ----------------------------------------------------------------------------------------------


def test_saving_twice_to_one_folder_gives_the_second_adapter_and_no_leftovers(saved):
    folder, model = saved
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(0.5)
    model.save_pretrained(folder)
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", CONFIG, WEIGHTS]
    loaded = load(folder)
    for name, value in adapter_weights(model).items():
        torch.testing.assert_close(adapter_weights(loaded)[name], value, rtol=0, atol=0)
    ids = token_batch()
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits)


def half_written_weights(monkeypatch):
    """Make peft's weights write stop halfway through the file, as a crash or a full disk would."""
    original = peft.peft_model.safe_save_file

    def crash(tensors, filename, metadata=None):
        original(tensors, filename, metadata=metadata)
        data = open(filename, "rb").read()
        open(filename, "wb").write(data[: len(data) // 2])
        raise KeyboardInterrupt("interrupted while writing the weights")

    monkeypatch.setattr(peft.peft_model, "safe_save_file", crash)


def test_an_interrupted_first_save_leaves_no_loadable_adapter(tmp_path, monkeypatch):
    model = get_peft_model(tiny_model("llama"), PrefixTuningV2Config(task_type="CAUSAL_LM"))
    half_written_weights(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        model.save_pretrained(tmp_path / "adapter")
    with pytest.raises(ValueError, match=r"Can't find 'adapter_config\.json'"):
        load(tmp_path / "adapter")


def test_a_save_interrupted_over_an_older_adapter_is_refused_not_mixed(saved, monkeypatch):
    folder, model = saved
    with torch.no_grad():
        next(p for p in model.parameters() if p.requires_grad).add_(1.0)
    half_written_weights(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        model.save_pretrained(folder)
    with pytest.raises(AdapterFileError):  # the old config, half of the new weights
        load(folder)


def test_a_save_interrupted_after_the_weights_is_refused_until_the_config_is_written(saved, monkeypatch):
    folder, model = saved
    with torch.no_grad():
        next(p for p in model.parameters() if p.requires_grad).add_(1.0)

    def crash(*args, **kwargs):
        raise KeyboardInterrupt("interrupted while writing the config")

    monkeypatch.setattr(json, "dumps", crash)  # peft's config writer serialises with json.dumps
    with pytest.raises(KeyboardInterrupt):
        model.save_pretrained(folder)
    monkeypatch.undo()
    assert not [p for p in folder.iterdir() if p.name.startswith(".")]  # the temporary config is gone
    json.loads((folder / CONFIG).read_text())  # the old config, whole: never a half-written one
    with pytest.raises(AdapterFileError, match="does not match the checksum"):
        load(folder)
    model.save_pretrained(folder)  # saving again repairs the folder
    load(folder)


def test_an_adapter_copied_whole_still_loads(saved, tmp_path):
    folder, _ = saved
    shutil.copytree(folder, tmp_path / "copy")
    load(tmp_path / "copy")


# -- defaults that changed ----------------------------------------------------------------------------------


def silent_on_the_scale(tmp_path, version: str | None):
    """An IPT adapter trained at instance_scale 1.0 (the default before peft-ipt 0.2.0), its config as a writer
    silent on the scale left it, claiming peft-ipt ``version`` (None: no version either); returns (folder, logits)."""
    model = get_peft_model(
        tiny_model("llama"),
        InstancePromptConfig(task_type="CAUSAL_LM", init_weights=False, instance_scale=1.0),
    ).eval()
    folder = tmp_path / "adapter"
    model.save_pretrained(folder)
    config = json.loads((folder / CONFIG).read_text())
    assert config["instance_scale"] == 1.0  # save_pretrained names every field
    del config["instance_scale"], config["peft_ipt_version"]
    (folder / CONFIG).write_text(json.dumps(config | ({"peft_ipt_version": version} if version else {})))
    with torch.no_grad():
        return folder, model(input_ids=token_batch()).logits


def test_an_adapter_from_before_the_scale_default_changed_loads_at_the_scale_it_was_trained_with(tmp_path):
    folder, trained = silent_on_the_scale(tmp_path, "0.1.0")
    loaded = load(folder).eval()
    assert loaded.peft_config["default"].instance_scale == 1.0
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=token_batch()).logits, trained, rtol=0, atol=0)


def test_an_adapter_from_since_the_change_silent_on_the_scale_takes_todays_default(tmp_path):
    folder, trained = silent_on_the_scale(tmp_path, "0.2.0")
    loaded = load(folder).eval()
    assert loaded.peft_config["default"].instance_scale == 0.05
    with torch.no_grad():
        assert not torch.allclose(loaded(input_ids=token_batch()).logits, trained, atol=1e-4)


def test_an_adapter_silent_on_the_scale_and_on_its_version_is_refused_naming_the_field(tmp_path):
    folder, _ = silent_on_the_scale(tmp_path, None)
    with pytest.raises(
        ValueError, match=r"names neither instance_scale nor the peft-ipt version.*1\.0 to 0\.05.*Add"
    ):
        load(folder)
