"""attnswap: convert pretrained transformers LLMs to efficient attention, then distil them back to quality."""

__version__ = "0.1.0"

from . import modeling  # noqa: E402,F401  (registers converted-model classes with transformers' Auto classes)
