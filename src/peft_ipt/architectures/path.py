"""What every architecture's own path shares: matching a model by its type, and doors that stay put."""

from __future__ import annotations

from torch import nn


class ArchitecturePath:
    """A path for one model type; ``new()`` gives the installation for one model (it holds that model's hooks)."""

    model_type: str
    installation: type

    def handles(self, model: nn.Module) -> bool:
        return getattr(model.config, "model_type", None) == self.model_type

    def new(self):
        return self.installation(self)


class Installation:
    """One model's doors. They stay installed while the adapter is disabled: a disabled provider hands them no
    prefix, so the user's own attention runs untouched."""

    causal: bool

    def __init__(self, spec: ArchitecturePath):
        self.spec = spec
        self.name = spec.model_type

    def enable(self, model: nn.Module) -> None:
        pass

    def disable(self, model: nn.Module) -> None:
        pass
