"""Registration of peft-ipt's methods with peft: the one place that touches peft's method tables.

peft's ``register_peft_method`` only accepts names that already exist in the ``PeftType`` enum, and peft offers
no public way to extend that enum. This module therefore adds our members to ``PeftType`` at import time and
fills peft's four method tables exactly as ``register_peft_method`` does.

Each member's *value* is what ``save_pretrained`` writes as ``"peft_type"`` into ``adapter_config.json``. We make
that value self-describing (``"INSTANCE_PROMPT (needs: import peft_ipt)"``): peft itself, when ``peft_ipt`` was not
imported, fails with ``KeyError: 'INSTANCE_PROMPT (needs: import peft_ipt)'``, so the fix is in the message even
though peft raises it. Because the value is not ``name.upper()``, ``register_peft_method``'s own check would reject
it; the table writes below are its body, minus that check. ``tests/test_registration.py`` pins this behaviour, so
a peft release that changes these internals fails loudly in CI rather than silently for users.

One more small wrap, of ``PeftConfig.from_json_file`` (public): peft reads ``adapter_config.json`` with a bare
``json.load`` before it knows which method the adapter is, so a malformed file surfaces as "Expecting value: line 1
column 1 (char 0)" without the file's name. The wrap re-raises that as a ``ValueError`` naming the file and the fix;
a valid file is returned exactly as peft returns it. It applies to every peft method, ours or not.

And one of ``peft.inject_adapter_in_model``, for our methods only. peft refuses tuners with shared state there and
names ``get_peft_model``, but transformers' own adapter loading goes through it too
(``AutoModelForCausalLM.from_pretrained(adapter_folder)``, ``model.load_adapter(path)``): a user loading trained
weights who followed "use get_peft_model" would get a new, untrained adapter. The wrap raises first, naming the
loaders (``PeftModel.from_pretrained``, ``AutoPeftModelFor*``) as well as ``get_peft_model``.
"""

from __future__ import annotations

import functools
import json

import peft
import peft.mapping
from peft.config import PeftConfig
from peft.mapping import (
    PEFT_TYPE_TO_CONFIG_MAPPING,
    PEFT_TYPE_TO_PREFIX_MAPPING,
    PEFT_TYPE_TO_TUNER_MAPPING,
)
from peft.utils import PeftType

from .instance_prompt import InstancePromptConfig, InstancePromptModel
from .prefix_tuning import PrefixTuningV2Config, PrefixTuningV2Model

IMPORT_HINT = "(needs: import peft_ipt)"

# enum member name -> (config class, tuner class, state-dict prefix)
METHODS = {
    "PREFIX_TUNING_V2": (PrefixTuningV2Config, PrefixTuningV2Model, "prefix_v2_"),
    "INSTANCE_PROMPT": (InstancePromptConfig, InstancePromptModel, "ipt_"),
}


def peft_type_value(name: str) -> str:
    """The string written to ``adapter_config.json`` for the method ``name``."""
    return f"{name} {IMPORT_HINT}"


def _add_enum_member(enum_cls: type, name: str, value: str) -> PeftType:
    """Add ``name = value`` to an existing ``(str, Enum)`` class, the way ``EnumType`` builds its members."""
    if name in enum_cls._member_map_:
        return enum_cls._member_map_[name]
    member = str.__new__(enum_cls, value)
    member._name_ = name
    member._value_ = value
    member.__objclass__ = enum_cls
    member._sort_order_ = len(enum_cls._member_names_)
    # type.__setattr__: EnumType.__setattr__ refuses to touch member names.
    type.__setattr__(enum_cls, name, member)
    enum_cls._member_map_[name] = member
    enum_cls._value2member_map_[value] = member
    enum_cls._member_names_.append(name)
    return member


def _wrap_config_reader() -> None:
    read = PeftConfig.from_json_file.__func__
    if getattr(read, "_peft_ipt_wrapped", False):
        return

    def from_json_file(cls, path_json_file: str, **kwargs):
        try:
            return read(cls, path_json_file, **kwargs)
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise ValueError(
                f"{path_json_file} is not valid JSON ({error}): the adapter folder is corrupt or was not completely "
                "written. Download or save the adapter again."
            ) from error

    from_json_file._peft_ipt_wrapped = True
    from_json_file.__doc__ = read.__doc__
    PeftConfig.from_json_file = classmethod(from_json_file)


def _wrap_injector() -> None:
    inject = peft.mapping.inject_adapter_in_model
    if getattr(inject, "_peft_ipt_wrapped", False):
        return

    @functools.wraps(inject)
    def inject_adapter_in_model(peft_config, model, *args, **kwargs):
        if peft_config.peft_type in {PeftType[name] for name in METHODS}:
            raise ValueError(
                f"{type(peft_config).__name__} adapters cannot be injected into a bare model: their weights live on "
                "the PeftModel that get_peft_model returns, not in the model's modules, so peft's "
                "inject_adapter_in_model, and transformers' adapter loading that calls it "
                "(AutoModelForCausalLM.from_pretrained(adapter_folder), model.load_adapter(path), "
                "model.add_adapter(config)), cannot hold them. To load a saved adapter: "
                "PeftModel.from_pretrained(base_model, path) or AutoPeftModelForCausalLM.from_pretrained(path) (and "
                "the other AutoPeftModelFor* classes), after `import peft_ipt`. To create a new adapter: "
                "get_peft_model(base_model, config)."
            )
        return inject(peft_config, model, *args, **kwargs)

    inject_adapter_in_model._peft_ipt_wrapped = True
    peft.mapping.inject_adapter_in_model = inject_adapter_in_model
    peft.inject_adapter_in_model = inject_adapter_in_model  # transformers imports it from peft when it loads


def register() -> None:
    """Make our configs and tuners known to peft (idempotent)."""
    for name, (config_cls, model_cls, prefix) in METHODS.items():
        peft_type = _add_enum_member(PeftType, name, peft_type_value(name))
        if PEFT_TYPE_TO_CONFIG_MAPPING.get(peft_type) is config_cls:
            continue
        if prefix in PEFT_TYPE_TO_PREFIX_MAPPING.values():
            raise KeyError(f"peft already has a method with the state-dict prefix {prefix!r}")
        PEFT_TYPE_TO_PREFIX_MAPPING[peft_type] = prefix
        PEFT_TYPE_TO_CONFIG_MAPPING[peft_type] = config_cls
        PEFT_TYPE_TO_TUNER_MAPPING[peft_type] = model_cls
    _wrap_config_reader()
    _wrap_injector()


register()
