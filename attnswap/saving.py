"""Writing converted models: everything goes to a temporary sibling directory, renamed into place."""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
from pathlib import Path

from .errors import AttnSwapError


def check_out(out: Path, overwrite: bool, flag: str = "--out") -> None:
    """Refuse an output directory that cannot be (re)placed: exists without ``overwrite``, is a file,
    is the current directory or the root, or lies under a directory that cannot be written."""
    from .paths import check_named_directory, kind, writable_parent

    check_named_directory(out, flag)
    k = kind(out)
    if k != "missing" and not overwrite:
        raise AttnSwapError(f"{out} already exists; pass --overwrite to replace it")
    if k not in ("missing", "a directory"):
        raise AttnSwapError(f"{out} exists and is not a directory")
    if writable_parent(out) is None:  # fail before hours of training, not after
        parent = Path(out).absolute().parent
        while not parent.exists() and parent != parent.parent:
            parent = parent.parent
        raise AttnSwapError(f"cannot write to {parent}: not a writable directory (read-only or no permission)")


def io_failure(e: BaseException) -> str | None:
    """Why a write failed, if ``e`` is an I/O failure: an OSError, or a library's error wrapping one
    (safetensors reports a full disk as "I/O error: No space left on device (os error 28)")."""
    if isinstance(e, OSError):
        return "the disk is full" if e.errno == errno.ENOSPC else (e.strerror or str(e))
    text = str(e)
    if "No space left on device" in text or "(os error 28)" in text:
        return "the disk is full"
    m = re.search(r"I/O error: (.*?)(?: \(os error \d+\))?$", text.strip().split("\n")[0])
    return m.group(1) if m else None


@contextlib.contextmanager
def atomic_dir(out: Path, overwrite: bool, flag: str = "--out"):
    """Yield a temporary directory; on success it replaces ``out``. On any failure ``out`` (new or
    previous) is left exactly as it was and the temporary directory is removed."""
    shown = Path(out)
    check_out(shown, overwrite, flag)
    out = Path(os.path.abspath(shown))  # '.'-free: its parent and name are what they look like
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    except OSError as e:
        raise AttnSwapError(f"cannot write to {shown.parent}: {e.strerror or e}") from None
    try:
        yield tmp
        old = None
        if out.exists():
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            out.rename(old)
        try:
            tmp.rename(out)
        except OSError:
            if old is not None:
                old.rename(out)  # put the previous output back
            raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except Exception as e:  # noqa: BLE001 - I/O failures become one line; anything else propagates
        shutil.rmtree(tmp, ignore_errors=True)
        why = io_failure(e)
        if why is None:
            raise
        raise AttnSwapError(f"could not write {shown}: {why}; nothing was changed there") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def save_converted(model, tokenizer, out: Path, *, overwrite: bool, state_dict=None) -> Path:
    """Save a converted model (safetensors, config with auto_map, remote-code shim, tokenizer). What
    was written is read back by the code that loads it before it is renamed into place.
    ``state_dict``: the weights to write in place of ``model``'s (a sharded run's, gathered)."""
    from .modeling import REMOTE_CODE_FILE, remote_code_source

    with atomic_dir(out, overwrite) as tmp:
        if getattr(model.config, "attnswap", None):
            src, auto_map = remote_code_source(model.config.model_type)
            model.config.auto_map = auto_map
            (tmp / REMOTE_CODE_FILE).write_text(src)
        from .loading import _quiet

        with _quiet():
            model.save_pretrained(tmp, max_shard_size="2GB", state_dict=state_dict)
            tokenizer.save_pretrained(tmp)
        verify_saved(tmp, out)
    return out


def verify_saved(tmp: Path, out: Path) -> None:
    """Read a saved model's config and weight index back with the loader's own checks (``load_config``:
    transformers' config, the attnswap entry through ``validate_attnswap_config``, the runtime options;
    ``check_weight_files``: safetensors only). A run must never end with an output that will not load."""
    from .loading import ModelSource, check_weight_files, load_config

    src = ModelSource(str(out), str(tmp), kind="dir")
    try:
        load_config(src)
        check_weight_files(src)
    except AttnSwapError as e:
        raise AttnSwapError(f"the model saved for {out} would not load, so it was not kept ({e}); this is a bug "
                            "in attnswap, please report it") from None
