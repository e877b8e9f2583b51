"""Conversion: replace attention modules in place (one file per method, a registry by name).

Every module of this package is imported here, so a method registers itself just by living in its
own file (``@register_method`` in lolcats.py, lizard.py, ...): adding one needs no edit elsewhere.
"""

import importlib
import pkgutil

from .architectures import FAMILIES, family_of
from .base import METHODS, KVCacheAttention, SwappedAttention, attention_mode, register_method, swapped_modules
from .swap import apply_swaps, parse_layers

for _mod in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_mod.name}")

__all__ = [
    "FAMILIES",
    "METHODS",
    "KVCacheAttention",
    "SwappedAttention",
    "apply_swaps",
    "attention_mode",
    "family_of",
    "parse_layers",
    "register_method",
    "swapped_modules",
]
