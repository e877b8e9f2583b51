"""Training and evaluation text: where it comes from, how it is split, how it is packed.

Sources (``--data``):
- ``default``: an offline corpus that ships with every Python: the reference topics of the Python
  documentation (``pydoc_data.topics``) and the docstrings of the standard library's modules,
  classes and functions, read with ``ast`` (nothing is imported), about 0.5 M SmolLM2 tokens of
  English technical prose. It needs no download and is identical on every machine with the same
  Python. (Adding the standard library's source code, 3.5 M more tokens, made the held-out prose
  perplexity worse on the GPU: see docs/HISTORY.md; ``--data default+code`` still offers it.)
- a ``.txt``/``.md`` file (one document), a ``.jsonl`` file (one document per line, from its
  ``text`` field), or a directory of such files (read recursively, in sorted order);
- ``hf:NAME[:CONFIG]``: a dataset's ``train`` split through the ``datasets`` library (online only).

Split: documents are ordered; every tenth (index % 10 == 9) is held out for evaluation and never
trained on (for ``default+code``, every tenth prose document; the code is training-only). With fewer than ten documents, the last 10% of the token stream is held out instead.
Packing: documents are tokenised, joined with EOS, and cut into ``seq_len`` sequences.
"""

from __future__ import annotations

import ast
import json
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import AttnSwapError

TEXT_SUFFIXES = (".txt", ".md", ".rst")
HELDOUT_EVERY = 10


def _read_text(path: Path) -> str:
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise AttnSwapError(f"cannot read data file {path}: {e.strerror or e}") from None
    for bom, enc in ((b"\xff\xfe\x00\x00", "UTF-32"), (b"\x00\x00\xfe\xff", "UTF-32"), (b"\xff\xfe", "UTF-16"), (b"\xfe\xff", "UTF-16")):
        if raw.startswith(bom):
            raise AttnSwapError(f"data file {path} is {enc} text; convert it to UTF-8 first (e.g. iconv -f {enc} -t UTF-8)")
    raw = raw.removeprefix(b"\xef\xbb\xbf")  # a UTF-8 byte-order mark is harmless
    if b"\x00" in raw[:65536]:
        raise AttnSwapError(f"data file {path} looks binary (it contains NUL bytes); give UTF-8 text")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise AttnSwapError(f"data file {path} is not valid UTF-8 (byte {e.start}); convert it to UTF-8 first") from None


def _jsonl_docs(path: Path) -> list[str]:
    docs = []
    for n, line in enumerate(_read_text(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            raise AttnSwapError(f"{path}:{n} is not valid JSON") from None
        text = rec.get("text") if isinstance(rec, dict) else rec if isinstance(rec, str) else None
        if not isinstance(text, str):
            raise AttnSwapError(f"{path}:{n} has no string 'text' field")
        docs.append(text)
    return docs


def _file_docs(path: Path) -> list[str]:
    if path.suffix == ".jsonl":
        return _jsonl_docs(path)
    return [_read_text(path)]


class Documents(list):
    """Documents that take part in the train/held-out split, plus ``train_only`` ones that never
    reach the held-out split."""

    def __init__(self, docs=(), train_only=()):
        super().__init__(docs)
        self.train_only = list(train_only)


def _stdlib_files() -> list[Path]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    skip = ("site-packages", "test", "idlelib", "lib2to3", "turtledemo")
    return [f for f in sorted(stdlib.rglob("*.py"))
            if f.relative_to(stdlib).parts[0] not in skip and "tests" not in f.relative_to(stdlib).parts]


def default_code() -> list[str]:
    """The standard library's source files, one document each, in a fixed order."""
    out = []
    for f in _stdlib_files():
        try:
            out.append(f.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, OSError):
            continue
    return out


def default_corpus() -> list[str]:
    """Python's documentation topics and standard-library docstrings, in a fixed order."""
    from pydoc_data.topics import topics

    docs = [topics[k] for k in sorted(topics)]
    for f in _stdlib_files():
        try:
            tree = ast.parse(f.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        parts = []
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) > 40:
                    parts.append(doc)
        if parts:
            docs.append("\n\n".join(parts))
    return docs


def load_documents(spec: str) -> list[str]:
    if spec in ("default", ""):
        return Documents(default_corpus())
    if spec == "default+code":
        return Documents(default_corpus(), default_code())
    elif spec.startswith("hf:"):
        docs = _hf_docs(spec[3:])
    else:
        from .paths import kind

        p = Path(spec).expanduser()
        k = kind(p)
        if k == "a directory":
            try:
                files = sorted(f for f in p.rglob("*") if f.is_file() and (f.suffix in TEXT_SUFFIXES or f.suffix == ".jsonl"))
            except OSError as e:
                raise AttnSwapError(f"cannot read data directory {spec}: {e.strerror or e}") from None
            if not files:
                raise AttnSwapError(f"data directory {spec} holds no .txt, .md, .rst or .jsonl files")
            docs = [d for f in files for d in _file_docs(f)]
        elif k == "a file":
            docs = _file_docs(p)
        elif k == "missing":
            raise AttnSwapError(f"data not found: {spec} (give a file, a directory, 'default' or hf:NAME[:CONFIG])")
        else:
            raise AttnSwapError(f"data {spec} is {k}; give a text file, a directory of them, 'default' or hf:NAME[:CONFIG]")
    docs = [d for d in docs if d.strip()]
    if not docs:
        raise AttnSwapError(f"data {spec!r} holds no text")
    return docs


def _hf_docs(name: str) -> list[str]:
    try:
        import datasets
    except ImportError:
        raise AttnSwapError("hf: data needs the datasets library: pip install datasets") from None
    ds_name, _, config = name.partition(":")
    from .loading import _quiet

    try:
        with _quiet():
            ds = datasets.load_dataset(ds_name, config or None, split="train")
    except Exception as e:  # noqa: BLE001 - offline, unknown name, ...
        raise AttnSwapError(f"could not load dataset {ds_name!r}: {str(e).splitlines()[0][:200]}") from None
    col = "text" if "text" in ds.column_names else ds.column_names[0]
    return [str(t) for t in ds[col]]


@dataclass
class Corpus:
    train: torch.Tensor  # 1-D token ids
    heldout: torch.Tensor

    def sequences(self, split: str, seq_len: int) -> torch.Tensor:
        ids = self.train if split == "train" else self.heldout
        n = ids.numel() // seq_len
        if n == 0:
            raise AttnSwapError(
                f"the {split} split has {ids.numel()} tokens, fewer than one --seq-len {seq_len} sequence; "
                "give more data or a shorter --seq-len"
            )
        return ids[: n * seq_len].view(n, seq_len)


def encode_documents(tokenizer, docs: list[str]) -> torch.Tensor:
    eos = tokenizer.eos_token_id
    out: list[int] = []
    batch = 256
    for i in range(0, len(docs), batch):
        for ids in tokenizer(docs[i : i + batch], add_special_tokens=False)["input_ids"]:
            out.extend(ids)
            if eos is not None:
                out.append(eos)
    return torch.tensor(out, dtype=torch.long)


def build_corpus(data: str | list[str], tokenizer, *, max_train_tokens: int | None = None) -> Corpus:
    """Tokenise and split ``data`` (a spec for ``load_documents``, or documents already loaded)."""
    docs = load_documents(data) if isinstance(data, str) else data
    extra = getattr(docs, "train_only", [])
    if len(docs) >= HELDOUT_EVERY:
        held = [d for i, d in enumerate(docs) if i % HELDOUT_EVERY == HELDOUT_EVERY - 1]
        train = [d for i, d in enumerate(docs) if i % HELDOUT_EVERY != HELDOUT_EVERY - 1]
        corpus = Corpus(encode_documents(tokenizer, train + extra), encode_documents(tokenizer, held))
    else:
        ids = encode_documents(tokenizer, list(docs))
        cut = int(ids.numel() * (1 - 1 / HELDOUT_EVERY))
        corpus = Corpus(torch.cat([ids[:cut], encode_documents(tokenizer, extra)]) if extra else ids[:cut], ids[cut:])
    if max_train_tokens is not None:
        corpus.train = corpus.train[:max_train_tokens]
    return corpus
