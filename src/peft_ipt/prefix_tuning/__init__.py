from .config import PrefixTuningV2Config
from .model import PrefixTuningV2Model

__all__ = ["PrefixTuningV2Config", "PrefixTuningV2Model"]
