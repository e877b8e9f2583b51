"""What a path on the command line is, and where a command will write, checked before any work.

``kind(path)`` names what is there in words a user understands ("a FIFO (named pipe)", "a symlink
loop", ...), so an input that exists but cannot be read is never reported as "not found".

``OutputPlan`` collects a command's inputs (the model, the data, ...) and every location it will
write (``--out``, the checkpoint directory, ``--json``, ``--report-dir``) and refuses, in one line and
before anything is loaded: a location that is the current directory or the root, a file where a
directory belongs (and the reverse), a directory whose parent cannot be written, two outputs that
overlap, and an output that would replace or overwrite one of the inputs (also through symlinks and
relative paths: paths are compared after resolving them).
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import stat
from pathlib import Path

from .errors import AttnSwapError

CHECKPOINT_ENTRY = re.compile(r"(step-\d+|\.step-\d+\.tmp-\d+)")


def kind(path: str | Path) -> str:
    """'missing', 'a directory', 'a file', or what else is there ('a FIFO (named pipe)', 'a symlink loop', ...)."""
    p = os.fspath(path)
    try:
        st = os.stat(p)
    except FileNotFoundError:
        return "a broken symlink" if os.path.islink(p) else "missing"
    except NotADirectoryError:
        return "missing"
    except OSError as e:
        if e.errno == errno.ELOOP:
            return "a symlink loop"
        if e.errno == errno.ENAMETOOLONG:
            return "a name too long for the file system"
        return f"unreadable ({e.strerror or e})"
    except ValueError:  # an embedded NUL byte
        return "not a valid path"
    m = st.st_mode
    if stat.S_ISDIR(m):
        return "a directory"
    if stat.S_ISREG(m):
        return "a file"
    if stat.S_ISFIFO(m):
        return "a FIFO (named pipe)"
    if stat.S_ISCHR(m):
        return "a character device"
    if stat.S_ISBLK(m):
        return "a block device"
    if stat.S_ISSOCK(m):
        return "a socket"
    return "not a regular file"


def real(path: str | Path) -> Path:
    """Absolute, normalised, with every symlink that exists resolved (a loop is left as it is)."""
    return Path(os.path.realpath(os.path.expanduser(os.fspath(path))))


def _within(a: Path, b: Path) -> bool:
    """a is b or lies inside b (both real paths)."""
    return a == b or b in a.parents


def writable_parent(path: Path) -> Path | None:
    """The nearest existing ancestor of ``path`` if it is a writable directory, else None."""
    parent = Path(os.path.abspath(path)).parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    return parent if parent.is_dir() and os.access(parent, os.W_OK | os.X_OK) else None


def check_named_directory(path: Path, flag: str) -> None:
    """Refuse ``.``, ``..``, ``/`` and the like: a directory that is replaced or deleted as a whole
    must not be the current directory, one that contains it, or the root."""
    a = real(path)
    cwd = real(os.getcwd())
    if a == a.parent or _within(cwd, a) or not Path(os.path.abspath(path)).name:
        what = "the root directory" if a == a.parent else ("the current directory" if a == cwd else
                                                           "a directory that contains the current directory")
        raise AttnSwapError(f"{flag} {path} is {what}; name a new directory for it")


class OutputPlan:
    """The inputs and outputs of one command; ``add_*`` raises AttnSwapError for a bad output."""

    def __init__(self, **inputs: str | Path | None):
        self.inputs: list[tuple[str, Path]] = []
        for flag, value in inputs.items():
            self.add_input("--" + flag.replace("_", "-"), value)
        self.dirs: list[tuple[str, Path, bool]] = []  # (flag, real path, json may go straight into it)

    def add_input(self, flag: str, value: str | Path | None) -> None:
        """A local path the command reads (ignored if it is not one, e.g. a hub id or 'default')."""
        if value is None or str(value).strip() == "" or not os.path.lexists(os.path.expanduser(str(value))):
            return
        self.inputs.append((flag, real(value)))

    def _against_inputs(self, flag: str, path: Path, a: Path, *, replaced: bool) -> None:
        for iflag, ipath in self.inputs:
            if a == ipath or (replaced and a in ipath.parents):
                how = "is" if a == ipath else "contains"
                what = "the model it is converted from must survive" if iflag == "--model" else "an input must not be overwritten"
                raise AttnSwapError(f"{flag} {path} {how} the {iflag} input ({ipath}); {what}: choose another {flag}")

    def _against_outputs(self, flag: str, path: Path, a: Path) -> None:
        for oflag, opath, _ in self.dirs:
            if _within(a, opath) or _within(opath, a):
                raise AttnSwapError(f"{flag} {path} overlaps {oflag} ({opath}); give them separate locations")

    def add_replaced_dir(self, flag: str, path: Path, *, overwrite: bool, json_inside: bool = True) -> None:
        """A directory written to a temporary sibling and renamed into place (``--out``)."""
        check_named_directory(path, flag)
        k = kind(path)
        if k != "missing" and not overwrite:
            raise AttnSwapError(f"{path} already exists; pass --overwrite to replace it")
        if k not in ("missing", "a directory"):
            raise AttnSwapError(f"{flag} {path} exists and is {k}, not a directory")
        self._writable(flag, path)
        a = real(path)
        self._against_inputs(flag, path, a, replaced=True)
        self._against_outputs(flag, path, a)
        self.dirs.append((flag, a, json_inside))

    def add_report_dir(self, flag: str, path: Path) -> None:
        """``--report-dir``: replaced as a whole, so it must be new, empty, or an earlier report."""
        check_named_directory(path, flag)
        k = kind(path)
        if k not in ("missing", "a directory"):
            raise AttnSwapError(f"{flag} {path} exists and is {k}, not a directory")
        p = Path(path)
        if k == "a directory" and any(p.iterdir()) and not (p / "report.json").is_file():
            raise AttnSwapError(f"{flag} {path} exists and is not an eval report directory; choose another")
        self._writable(flag, path)
        a = real(path)
        self._against_inputs(flag, path, a, replaced=True)
        self._against_outputs(flag, path, a)
        self.dirs.append((flag, a, True))

    def add_checkpoint_dir(self, flag: str, path: Path) -> None:
        """A checkpoint directory: it may hold only checkpoints (it is emptied after a successful run)."""
        check_named_directory(path, flag)
        k = kind(path)
        if k not in ("missing", "a directory"):
            raise AttnSwapError(f"{flag} {path} is {k}, not a directory")
        if k == "a directory":
            other = sorted(e.name for e in Path(path).iterdir() if not CHECKPOINT_ENTRY.fullmatch(e.name))
            if other:
                raise AttnSwapError(f"{flag} {path} holds files other than checkpoints (e.g. {other[0]!r}); "
                                    "give a new or checkpoint-only directory")
        self._writable(flag, path)
        a = real(path)
        self._against_inputs(flag, path, a, replaced=True)
        self._against_outputs(flag, path, a)
        self.dirs.append((flag, a, False))

    def add_file(self, flag: str, path: Path | None) -> None:
        """A file written at the end (``--json``): its directory must exist (or be an output directory
        that will) and be writable; it must not be a directory, an input, or inside a checkpoint directory."""
        if path is None:
            return
        if not Path(os.path.abspath(path)).name or str(path).endswith(os.sep):
            raise AttnSwapError(f"{flag} {path} names a directory; give a file name")
        k = kind(path)
        if k == "a directory":
            raise AttnSwapError(f"{flag} {path} is a directory; give a file name")
        if k not in ("missing", "a file", "a character device", "a FIFO (named pipe)"):
            raise AttnSwapError(f"{flag} {path} is {k}; give a file name")
        a = real(path)
        parent = a.parent
        self._against_inputs(flag, path, a, replaced=False)
        for iflag, ipath in self.inputs:
            if k != "missing" and a != ipath and _within(a, ipath):
                raise AttnSwapError(f"{flag} {path} would overwrite a file of the {iflag} input ({ipath}); write it elsewhere")
        for oflag, opath, json_inside in self.dirs:
            if a == opath or (_within(a, opath) and not (json_inside and parent == opath)):
                where = "is" if a == opath else "is inside"
                raise AttnSwapError(f"{flag} {path} {where} {oflag} ({opath}), which is replaced or deleted; write it elsewhere")
        if any(json_inside and parent == opath for _, opath, json_inside in self.dirs):
            return  # goes into an output directory that exists once the output is written
        pk = kind(parent)
        if pk == "missing":
            raise AttnSwapError(f"{flag} {path}: the directory {parent} does not exist")
        if pk != "a directory":
            raise AttnSwapError(f"{flag} {path}: {parent} is {pk}, not a directory")
        if k == "missing" and not os.access(parent, os.W_OK | os.X_OK) or k != "missing" and not os.access(a, os.W_OK):
            raise AttnSwapError(f"{flag} {path} cannot be written (read-only or no permission)")

    def _writable(self, flag: str, path: Path) -> None:
        if writable_parent(path) is None:
            parent = Path(os.path.abspath(path)).parent
            while not parent.exists() and parent != parent.parent:
                parent = parent.parent
            raise AttnSwapError(f"cannot write to {parent}: not a writable directory (read-only or no permission)")


def write_text(path: Path, text: str, flag: str = "--json") -> None:
    """Write ``text`` to ``path`` atomically (temporary sibling, then rename) when ``path`` is or will
    be a regular file; devices and pipes (/dev/stdout) are written directly. I/O errors: one line."""
    path = Path(path)
    try:
        if kind(path) not in ("missing", "a file"):
            with open(path, "w", encoding="utf-8") as f:
                f.write(text)
            return
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        try:
            with open(tmp, "w", encoding="utf-8") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
    except OSError as e:
        why = "the disk is full" if e.errno == errno.ENOSPC else (e.strerror or str(e))
        raise AttnSwapError(f"could not write {flag} {path}: {why}") from None

