"""The two spellings of the DINO head's weight-normalised last layer, and the translation.

`torch.nn.utils.parametrizations.weight_norm` (what we use) names its tensors
`last_layer.parametrizations.weight.original0/1`; the public reference checkpoints (the old
`torch.nn.utils.weight_norm`) call them `last_layer.weight_g/_v`. Pure key renaming: no timm,
so checkpoint export can use it without importing the model code.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TypeVar

T = TypeVar("T")

G_KEY = "last_layer.parametrizations.weight.original0"
V_KEY = "last_layer.parametrizations.weight.original1"
REF_G_KEY = "last_layer.weight_g"
REF_V_KEY = "last_layer.weight_v"


def reference_state_dict(module_state: Mapping[str, T]) -> dict[str, T]:
    """Rename weight-norm parametrization keys to the reference's `last_layer.weight_g/_v`."""
    out: dict[str, T] = {}
    for key, value in module_state.items():
        if key.endswith(G_KEY):
            key = key[: -len(G_KEY)] + REF_G_KEY
        elif key.endswith(V_KEY):
            key = key[: -len(V_KEY)] + REF_V_KEY
        out[key] = value
    return out


def from_reference_state_dict(reference_state: Mapping[str, T]) -> dict[str, T]:
    """Inverse of `reference_state_dict`: reference `weight_g/_v` -> parametrization keys."""
    out: dict[str, T] = {}
    for key, value in reference_state.items():
        if key.endswith(REF_G_KEY):
            key = key[: -len(REF_G_KEY)] + G_KEY
        elif key.endswith(REF_V_KEY):
            key = key[: -len(REF_V_KEY)] + V_KEY
        out[key] = value
    return out
