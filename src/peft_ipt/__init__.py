"""peft-ipt: instance-wise prompt tuning and prefix-tuning as plug-in methods for Hugging Face peft.

``import peft_ipt`` registers both methods with peft; after it, ``get_peft_model``, ``PeftModel.from_pretrained``,
``PeftConfig.from_pretrained`` and every ``AutoPeftModelFor*`` work with our configs and saved adapters.
"""

from . import registration  # noqa: F401  (registers the methods with peft)
from ._version import __version__
from .adapter_files import AdapterFileError, allow_pickled_adapters
from .instance_prompt import InstancePromptConfig, InstancePromptModel
from .prefix_tuning import PrefixTuningV2Config, PrefixTuningV2Model
from .warm_start import start_from_prefix

__all__ = [
    "AdapterFileError",
    "InstancePromptConfig",
    "InstancePromptModel",
    "PrefixTuningV2Config",
    "PrefixTuningV2Model",
    "__version__",
    "allow_pickled_adapters",
    "start_from_prefix",
]
