"""What every architecture's own path shares: matching a model by its type, and doors that stay put."""

from __future__ import annotations

import functools
import inspect

from torch import nn

from ..attention import SELF, SITE_ATTR, AttentionSite, UnsupportedModelError, _first_int


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

    def check_routed(self, model: nn.Module) -> None:
        """The doors are the modules' own: no setting of the model takes them away."""


class HookedInstallation(Installation):
    """An installation whose doors are hooks on the attention modules, keyed by the module's site; ``remove`` takes
    both away again."""

    def __init__(self, spec: ArchitecturePath):
        super().__init__(spec)
        self._handles: list = []

    def cache_keyword(self, module: nn.Module) -> str:
        """The keyword this module takes its layer's cache by: the first of the spec's ``cache_args`` its forward
        accepts (transformers 5.24 renamed some from ``past_key_values`` to ``cache``)."""
        accepted = inspect.signature(module.forward).parameters
        for name in self.spec.cache_args:
            if name in accepted:
                return name
        raise UnsupportedModelError(
            f"{type(module).__name__}.forward takes its cache by none of {', '.join(self.spec.cache_args)} in "
            "this transformers version, so peft-ipt cannot put a prefix in front of its keys; use a transformers "
            "version from the range pyproject admits"
        )

    def remove(self, model: nn.Module, sites) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for module, *_ in sites:
            module.__dict__.pop(SITE_ATTR, None)


class ForwardDoorInstallation(Installation):
    """Doors that replace the forward of each attention module of the spec's ``attention_class`` (DeBERTa, MPNet):
    the spec's ``door_forward(module, *args)`` runs instead, on this instance only; ``remove`` restores the class's.
    Encoder self-attention only, with the module's ``num_attention_heads`` and ``attention_head_size``."""

    causal = False

    def sites(self, model: nn.Module) -> list[tuple[nn.Module, str, int, int, int]]:
        return [
            (module, SELF, _first_int(name), module.num_attention_heads, module.attention_head_size)
            for name, module in model.named_modules()
            if type(module).__name__ == self.spec.attention_class
        ]

    def install(self, model: nn.Module, sites, provider_ref) -> None:
        for module, kind, layer, n_kv, head_dim in sites:
            site = AttentionSite(kind, layer, n_kv, head_dim, inner=None, provider=provider_ref)
            site.door = self.spec
            # The door finds its site through the module, so a copied model's doors serve the copy's sites.
            module.__dict__[SITE_ATTR] = site
            # (a partial, not a bound method: a copied or pickled module keeps its door)
            module.forward = functools.partial(self.spec.door_forward, module)

    def remove(self, model: nn.Module, sites) -> None:
        for module, *_ in sites:
            module.__dict__.pop("forward", None)
            module.__dict__.pop(SITE_ATTR, None)
