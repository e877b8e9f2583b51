"""Runtime options of a converted model: how it runs, not what it computes.

They live in the saved config (``config.attnswap["runtime"]``) and can be given to
``from_pretrained`` as keyword arguments, which win over the saved values:

    AutoModelForCausalLM.from_pretrained(path, kernels="torch", decode_graph="off", compile_decode="model")

- ``kernels``: ``auto`` (Triton for whole sequences on CUDA, PyTorch elsewhere), ``torch``, ``triton``;
- ``decode_graph``: ``auto`` (the one-token step replayed as a CUDA graph on CUDA), ``off``,
  ``static`` (the same step without capture, any device), ``cuda``;
- ``compile_decode``: ``off``, ``attn`` (torch.compile of each layer's attention step), ``model``
  (of the whole one-token step; compiles once per batch size);
- ``prefill_graph``: ``off`` (default), ``static`` (any device) or ``cuda``: a prompt of at least
  ``prefill_piece`` tokens (default 2048) on a model recurrent in every layer is prefilled in pieces of
  fixed sizes, each replayed as a CUDA graph (``prefill.py``; ``static``: the same pieces without capture);
- ``prefill_chunk``: tokens per piece when ``generate()`` prefills a long prompt (default 8192 on CUDA,
  where a model recurrent in every layer takes prompts up to 32,768 tokens in one pass; 2048 elsewhere:
  ``classes.default_prefill_chunk``).

The environment variables ``ATTNSWAP_KERNELS``, ``ATTNSWAP_DECODE_GRAPH``, ``ATTNSWAP_PREFILL_GRAPH`` and
``ATTNSWAP_COMPILE_DECODE``, when set, override all of these (for benchmarks and debugging).
"""

from __future__ import annotations

import contextlib
import contextvars
from dataclasses import asdict, dataclass, fields

from ..errors import AttnSwapError
from ..kernels.dispatch import BACKENDS, COMPILE_SETTINGS, force_backend, force_compile

GRAPH_MODES = ("auto", "off", "static", "cuda")
PREFILL_GRAPH_MODES = ("off", "static", "cuda")
CHOICES = {"kernels": BACKENDS, "decode_graph": GRAPH_MODES, "compile_decode": COMPILE_SETTINGS,
           "prefill_graph": PREFILL_GRAPH_MODES}
_current: contextvars.ContextVar["RuntimeOptions | None"] = contextvars.ContextVar("attnswap_runtime", default=None)


@dataclass(frozen=True)
class RuntimeOptions:
    kernels: str = "auto"
    decode_graph: str = "auto"
    compile_decode: str = "off"
    prefill_chunk: int | None = None
    prefill_graph: str = "off"
    prefill_piece: int = 2048

    def __post_init__(self):
        for name, allowed in CHOICES.items():
            value = getattr(self, name)
            if value not in allowed:
                raise AttnSwapError(f"runtime option {name}={value!r}: choose from {', '.join(allowed)}")
        sizes = {"prefill_piece": self.prefill_piece}
        if self.prefill_chunk is not None:  # None: the device's default
            sizes["prefill_chunk"] = self.prefill_chunk
        for name, n in sizes.items():
            if not isinstance(n, int) or isinstance(n, bool) or n < 1:
                raise AttnSwapError(f"runtime option {name}={n!r}: give a positive integer")

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))

    @classmethod
    def from_dict(cls, d) -> "RuntimeOptions":
        if d is None:
            return cls()
        if not isinstance(d, dict):
            raise AttnSwapError(f"runtime options must be an object, not {type(d).__name__}")
        unknown = sorted(set(d) - set(cls.names()))
        if unknown:
            raise AttnSwapError(f"unknown runtime option {unknown[0]!r} (known: {', '.join(cls.names())})")
        return cls(**d)

    @classmethod
    def from_config(cls, config) -> "RuntimeOptions":
        spec = getattr(config, "attnswap", None) or {}
        return cls.from_dict(spec.get("runtime"))

    def to_dict(self) -> dict:
        return asdict(self)

    @contextlib.contextmanager
    def active(self):
        """Run the enclosed calls with these options (kernels, compile setting, decode graph)."""
        token = _current.set(self)
        try:
            with force_backend(self.kernels), force_compile(self.compile_decode):
                yield self
        finally:
            _current.reset(token)


def current() -> RuntimeOptions:
    return _current.get() or RuntimeOptions()
