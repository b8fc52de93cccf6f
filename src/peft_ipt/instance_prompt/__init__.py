from .config import InstancePromptConfig
from .model import InstancePromptModel

__all__ = ["InstancePromptConfig", "InstancePromptModel"]
