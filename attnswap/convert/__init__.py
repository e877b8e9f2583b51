"""Conversion: replace attention modules in place (one file per method, a registry by name)."""

from . import lizard, lolcats  # noqa: F401  (register the methods)
from .architectures import FAMILIES, family_of
from .base import METHODS, SwappedAttention, attention_mode, swapped_modules
from .swap import apply_swaps, parse_layers

__all__ = [
    "FAMILIES",
    "METHODS",
    "SwappedAttention",
    "apply_swaps",
    "attention_mode",
    "family_of",
    "parse_layers",
    "swapped_modules",
]
