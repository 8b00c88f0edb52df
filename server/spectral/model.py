"""Attach routed spectral layers to any Hugging Face causal LM."""

from __future__ import annotations

import fnmatch

from torch import nn
from transformers.pytorch_utils import Conv1D

from server.spectral.bank import AdapterBank
from server.spectral.layer import RoutedSpectralLinear


def linear_shape(module: nn.Module) -> tuple[int, int] | None:
    """``(d_out, d_in)`` of an ``nn.Linear`` or ``Conv1D`` (stored ``(d_in, d_out)``); else None."""
    if isinstance(module, nn.Linear):
        return module.out_features, module.in_features
    if isinstance(module, Conv1D):
        d_in, d_out = module.weight.shape
        return d_out, d_in
    return None


def routable_modules(model: nn.Module, patterns: list[str] | None = None) -> dict[str, tuple[int, int]]:
    """Name -> ``(d_out, d_in)`` of every linear layer except the output embedding.

    ``patterns`` (fnmatch on the full module name or its last component) restricts the set.
    """
    output_embeddings = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    found = {}
    for name, module in model.named_modules():
        shape = linear_shape(module)
        if shape is None or module is output_embeddings or isinstance(module, RoutedSpectralLinear):
            continue
        if patterns and not any(
            fnmatch.fnmatchcase(name, pattern) or fnmatch.fnmatchcase(name.rsplit(".", 1)[-1], pattern)
            for pattern in patterns
        ):
            continue
        found[name] = shape
    return found


def attach_routed_layers(
    model: nn.Module, bank: AdapterBank, patterns: list[str] | None = None
) -> dict[str, tuple[int, int]]:
    """Replace each routable layer by a :class:`RoutedSpectralLinear` and register it in ``bank``.

    Returns the routed modules' shapes: the base-model fingerprint adapters are checked against.
    """
    shapes = routable_modules(model, patterns)
    for name, shape in shapes.items():
        parent_name, _, child_name = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        base_layer = getattr(parent, child_name)
        setattr(parent, child_name, RoutedSpectralLinear(base_layer, bank.register_layer(name, shape), bank))
    return shapes
