"""Checks on a saved adapter folder, run by our configs' ``from_pretrained`` before peft reads any weights.

``PeftModel.from_pretrained``, ``load_adapter`` and every ``AutoPeftModelFor*`` build the config through
``<OurConfig>.from_pretrained`` first and only then call peft's ``load_peft_weights``. That is the one hook we own
ahead of the weights, so the folder is vetted there:

- **No code from pickles.** peft falls back to ``adapter_model.bin`` (a pickle, what ``save_pretrained(...,
  safe_serialization=False)`` writes) when no safetensors file exists. A pickle that holds tensors only is read
  with ``torch.load(weights_only=True)``, whose unpickler builds nothing but tensors and plain containers and runs
  no code from the file; it loads. A pickle that needs anything more is refused, unread, unless the caller opts in
  with :func:`allow_pickled_adapters`.
- **Corrupt or truncated weights.** The safetensors header is parsed and its byte ranges checked against the file
  size, so a cut-off download fails here with the file's name rather than inside the loader.
- **Half-written folders.** ``save_pretrained`` writes the weights first and the config last; our config records the
  SHA-256 of the weights it was saved with (``weights_sha256``) and is itself written atomically. A folder whose
  weights do not match its config (an interrupted save, a save over an older adapter that stopped halfway, a file
  swapped by hand) is refused. The config's atomic replace is the commit point of a save.
"""

from __future__ import annotations

import contextvars
import hashlib
import json
import os
import struct
import tempfile
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

SAFETENSORS_NAME = "adapter_model.safetensors"
PICKLE_NAME = "adapter_model.bin"

_allow_pickle = contextvars.ContextVar("peft_ipt_allow_pickle", default=False)


@contextmanager
def allow_pickled_adapters():
    """Opt in to loading ``adapter_model.bin`` (a pickle) for adapters you trust, e.g. ones you saved yourself
    with ``safe_serialization=False``::

        with peft_ipt.allow_pickled_adapters():
            model = PeftModel.from_pretrained(base, "my-own-adapter")

    peft unpickles such files with ``torch.load(weights_only=True)``; a pickle from a stranger is still a risk.
    """
    token = _allow_pickle.set(True)
    try:
        yield
    finally:
        _allow_pickle.reset(token)


class AdapterFileError(ValueError):
    """A saved adapter folder that must not be loaded; the message names the file and the fix."""


def weights_digest(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def weights_file_in(folder: str | os.PathLike) -> Path | None:
    """The weights file peft would load from ``folder`` (safetensors first, as peft does), or None."""
    for name in (SAFETENSORS_NAME, PICKLE_NAME):
        path = Path(folder) / name
        if path.is_file():
            return path
    return None


def newest_weights_file_in(folder: str | os.PathLike) -> Path | None:
    """The weights file peft has just written to ``folder``, the other format's file of an older save removed.

    peft writes one file, safetensors or (``safe_serialization=False``) a pickle, and loads safetensors first: an
    older adapter's safetensors left beside a new pickle would be loaded in its place.
    """
    found = [
        Path(folder) / name for name in (SAFETENSORS_NAME, PICKLE_NAME) if (Path(folder) / name).is_file()
    ]
    if len(found) == 2:
        found.sort(key=lambda path: path.stat().st_mtime_ns)
        found.pop(0).unlink()
    return found[0] if found else None


def check_safetensors(path: Path) -> None:
    """Refuse a safetensors file whose header is unreadable or whose tensors run past the end of the file."""
    size = path.stat().st_size
    fix = "the file is corrupt or was cut off (an interrupted download or save); download or save the adapter again"
    try:
        with open(path, "rb") as f:
            (header_size,) = struct.unpack("<Q", f.read(8))
            if header_size > size - 8:
                raise ValueError(f"its header claims {header_size} bytes but the file has {size}")
            header = json.loads(f.read(header_size))
        if not isinstance(header, dict):
            raise ValueError("its header is not a JSON object")
        ends = [
            entry["data_offsets"][1] for name, entry in header.items() if name != "__metadata__"
        ]  # each (begin, end) within the data after the header
        data = size - 8 - header_size
        if max(ends, default=0) != data:
            raise ValueError(
                f"its tensors cover {max(ends, default=0)} bytes of data but the file holds {data}"
            )
    except (struct.error, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, IndexError) as error:
        raise AdapterFileError(f"{path} is not a valid safetensors file ({error!r}): {fix}") from error
    except ValueError as error:
        raise AdapterFileError(f"{path} is not a valid safetensors file: {error}; {fix}") from error


def check_tensors_only_pickle(path: Path) -> None:
    """Refuse a pickled adapter unless it is a mapping of names to tensors, read without running its code.

    ``torch.load(weights_only=True)`` unpickles with an allow-list (tensors, storages, plain containers and
    numbers): any other object in the file stops it before that object is built, so nothing of the file runs.
    """
    import pickle

    import torch

    refusal = (
        f"{path} is a pickle that holds more than tensors ({{why}}), and there is no {SAFETENSORS_NAME} beside it. "
        "Unpickling such a file runs code from it, so peft-ipt does not load it. If you trust its source, load it "
        "inside `with peft_ipt.allow_pickled_adapters():` and save it again (safetensors is the default)."
    )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise AdapterFileError(refusal.format(why=str(error).splitlines()[0][:200])) from None
    except (EOFError, RuntimeError, ValueError, OSError) as error:
        raise AdapterFileError(
            f"{path} is not a readable pickle ({type(error).__name__}: {error}): the file is corrupt or was cut off; "
            "save or download the adapter again"
        ) from None
    if not isinstance(state, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise AdapterFileError(
            refusal.format(why=f"a {type(state).__name__}, not a mapping of names to tensors")
        )


def resolve_weights(model_id: str, subfolder: str | None, hub_kwargs: dict) -> Path | None:
    """The weights file of a local folder, or of a Hub repo (downloaded to the cache peft reads it from next)."""
    folder = Path(model_id, subfolder) if subfolder else Path(model_id)
    if folder.is_dir():
        return weights_file_in(folder)
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    for name in (SAFETENSORS_NAME, PICKLE_NAME):
        try:
            return Path(hf_hub_download(model_id, name, subfolder=subfolder, **hub_kwargs))
        except EntryNotFoundError:
            continue
    return None


def check_adapter_weights(weights: Path | None, expected_digest: str | None) -> None:
    """Everything above, for the weights file that peft is about to load.

    No weights file at all is fine for a config saved on its own (``config.save_pretrained``), which has no
    checksum; a config saved by ``model.save_pretrained`` has one, so its weights are missing.
    """
    if weights is None:
        if expected_digest is not None:
            raise AdapterFileError(
                f"adapter_config.json was saved with weights ({SAFETENSORS_NAME}), but they are not there: "
                "copy the whole adapter folder, or save the adapter again"
            )
        return
    if weights.name == PICKLE_NAME:
        if not _allow_pickle.get():
            check_tensors_only_pickle(weights)
    else:
        check_safetensors(weights)
    if expected_digest is not None and weights_digest(weights) != expected_digest:
        raise AdapterFileError(
            f"{weights} does not match the checksum its adapter_config.json was saved with: the folder was not "
            "completely written (a save interrupted, or stopped halfway over an older adapter) or the weights were "
            "replaced by hand. Save the adapter again, or restore the folder from where it came; if you changed the "
            'weights on purpose, set "weights_sha256": null in adapter_config.json.'
        )


def write_config_atomically(save: Callable[[str], None], save_directory: str | os.PathLike) -> None:
    """Run ``save(tmp_dir)`` (which writes adapter_config.json there), then move the file into place in one step."""
    os.makedirs(save_directory, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=save_directory, prefix=".adapter_config-") as tmp:
        save(tmp)
        os.replace(Path(tmp) / "adapter_config.json", Path(save_directory) / "adapter_config.json")
