"""Model surgery: finding and swapping the linear layers of a ``torch.nn.Module`` in place."""
from __future__ import annotations

from torch import nn

from .nn import CMPQLinear


def replace_module(root: nn.Module, name: str, module: nn.Module) -> None:
    """Put ``module`` at dotted path ``name`` inside ``root`` (e.g. ``model.layers.0.mlp.up_proj``)."""
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, module)


def quantized_modules(model: nn.Module) -> dict[str, CMPQLinear]:
    """Every :class:`CMPQLinear` in ``model`` by dotted name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, CMPQLinear)}
