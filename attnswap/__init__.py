"""attnswap: convert pretrained transformers LLMs to efficient attention, then distil them back to quality."""

__version__ = "0.1.0"

from . import hf_compat  # noqa: E402
from . import modeling  # noqa: E402,F401  (registers converted-model classes with transformers' Auto classes)

hf_compat.check_version()
