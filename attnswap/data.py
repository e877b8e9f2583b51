"""Training and evaluation text: where it comes from, how it is split, how it is packed.

Sources (``--data``):
- ``general`` (the default of ``linearize`` and ``gqa``): multi-domain English text that Debian and
  PyPI packages ship (dictionaries, technical manuals, speeches, plays, conversations; about 24 M
  SmolLM2 tokens; ``attnswap/sources.py`` lists the sources), mixed into one stream, tokenised once
  and cached under ``$ATTNSWAP_CACHE/data``. ``general`` takes as many training tokens from the start
  of that stream as the run will use (the next power of two, at least 256 K), so a short run builds
  only a slice; ``general[:2M]`` takes exactly the first 2 M, ``general[:all]`` all of it. Each
  source's every tenth document is held out (the in-domain held-out split), and two sources are never
  trained on at all (the out-of-domain set: The Devil's Dictionary and the World English Bible);
  ``general:ood`` evaluates on that set.
- ``default``: an offline corpus that ships with every Python: the reference topics of the Python
  documentation (``pydoc_data.topics``) and the docstrings of the standard library's modules,
  classes and functions, read with ``ast`` (nothing is imported), about 0.5 M SmolLM2 tokens of
  English technical prose. It needs no download and is identical on every machine with the same
  Python. (Adding the standard library's source code, 3.5 M more tokens, made the held-out prose
  perplexity worse on the GPU: see docs/HISTORY.md; ``--data default+code`` still offers it.)
- a ``.txt``/``.md`` file (one document), a ``.jsonl`` file (one document per line, from its
  ``text`` field), or a directory of such files (read recursively, in sorted order);
- ``hf:NAME[:CONFIG][@SPLIT]``: a dataset's ``train`` split (or SPLIT, e.g. ``train[:20000]``) through
  the ``datasets`` library (online only); its ``text`` column, else its first.

Split: documents are ordered; every tenth (index % 10 == 9) is held out for evaluation and never
trained on (for ``default+code``, every tenth prose document; the code is training-only). With fewer than ten documents, the last 10% of the token stream is held out instead.
Packing: documents are tokenised, joined with EOS, and cut into ``seq_len`` sequences.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import re
import sysconfig
from dataclasses import dataclass, field
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
    if parse_general(spec) is not None:
        raise AttnSwapError(f"--data {spec} is built and cached as tokens: use training_data() or heldout_ids()")
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
            raise AttnSwapError(f"data not found: {spec} (give a file, a directory, 'general', 'default' or hf:NAME[:CONFIG])")
        else:
            raise AttnSwapError(f"data {spec} is {k}; give a text file, a directory of them, 'general', 'default' or hf:NAME[:CONFIG]")
    docs = [d for d in docs if d.strip()]
    if not docs:
        raise AttnSwapError(f"data {spec!r} holds no text")
    return docs


def _hf_docs(name: str) -> list[str]:
    try:
        import datasets
    except ImportError:
        raise AttnSwapError("hf: data needs the datasets library: pip install datasets") from None
    name, _, split = name.partition("@")  # hf:NAME[:CONFIG][@SPLIT], e.g. @train[:20000] (the first 20,000 rows)
    ds_name, _, config = name.partition(":")
    from .loading import _quiet

    try:
        with _quiet():
            ds = datasets.load_dataset(ds_name, config or None, split=split or "train")
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
    """Tokenise and split ``data`` (a spec for ``load_documents``, or documents already loaded). For
    ``general[:N]`` (``general``: 256 K) the first N training tokens and N / 9 held-out ones."""
    g = parse_general(data) if isinstance(data, str) else None
    if g is not None:
        n = min(train_budget(g, MIN_TRAIN_TOKENS), max_train_tokens or 1 << 40)
        gt = general_tokens(tokenizer, train=n, heldout=max(2, n // (HELDOUT_EVERY - 1)))
        return Corpus(gt.train, gt.heldout)
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


# --- --data general: the mixed, cached, tokenised corpus ------------------------------------------------
GENERAL_VERSION = 1  # the corpus id also hashes sources.py and the mixing/packing code, so edits there rebuild
MIN_TRAIN_TOKENS = 1 << 18
DEFAULT_DATA = "general"
_SIZE = re.compile(r"^(\d+(?:\.\d+)?)([kmg]?)$", re.I)


@dataclass(frozen=True)
class GeneralSpec:
    ood: bool = False  # general:ood (the out-of-domain set, for evaluation)
    limit: int | None = None  # general[:N]: exactly the first N training tokens
    everything: bool = False  # general[:all]


def parse_general(spec: str) -> GeneralSpec | None:
    """``general``, ``general[:2M]``, ``general[:all]`` or ``general:ood`` -> GeneralSpec; anything else None."""
    s = spec.strip()
    if s == "general":
        return GeneralSpec()
    if s == "general:ood":
        return GeneralSpec(ood=True)
    m = re.fullmatch(r"general\[:([^\]]*)\]", s)
    if not m:
        if s.startswith("general") and not Path(s).exists():
            raise AttnSwapError(f"--data {spec!r}: write general, general[:N] (N like 2M, 500K), general[:all] or general:ood")
        return None
    n = m.group(1).replace("_", "").strip()
    if n.lower() == "all":
        return GeneralSpec(everything=True)
    size = _SIZE.match(n)
    count = int(float(size.group(1)) * {"": 1, "k": 1e3, "m": 1e6, "g": 1e9}[size.group(2).lower()]) if size else 0
    if count < 1:
        raise AttnSwapError(f"--data {spec!r}: the slice must be a positive token count like 2M, 500K or 20000, or all")
    return GeneralSpec(limit=count)


def is_general(spec: str) -> bool:
    return parse_general(spec) is not None


def check_general(spec: str = "general") -> None:
    """Fail fast (before any model loads) when a source of ``--data general`` is missing."""
    from . import sources

    parse_general(spec)
    absent = sources.missing()
    if absent and not _prebuilt_dirs():
        raise AttnSwapError(sources.missing_message(absent))


def _tokenizer_id(tokenizer) -> str:
    vocab = tokenizer.get_vocab()
    h = hashlib.sha256(json.dumps(sorted(vocab.items()), ensure_ascii=False).encode())
    h.update(f"eos={tokenizer.eos_token_id};cls={type(tokenizer).__name__}".encode())
    return h.hexdigest()


def _source_files() -> list[tuple[object, list[Path]]]:
    from . import sources

    out = []
    for s in sources.SOURCES:
        files = sources.locate(s)
        if files is None:
            raise AttnSwapError(sources.missing_message(sources.missing()))
        out.append((s, files))
    return out


_FILE_SHA: dict[tuple, bytes] = {}


def _file_sha(path: Path) -> bytes:
    from . import sources

    st = path.stat()
    key = (str(path), st.st_size, st.st_mtime_ns)
    if key not in _FILE_SHA:
        _FILE_SHA[key] = hashlib.sha256(sources.read_bytes(path, raw=True)).digest()
    return _FILE_SHA[key]


def corpus_id(tokenizer, located=None) -> str:
    """sha256 of what determines the tokens: the builder's version and code (readers, mixing, packing),
    every source file's bytes, the mixing weights, and the tokenizer."""
    import inspect

    from . import sources

    h = hashlib.sha256(f"attnswap-general-v{GENERAL_VERSION};split={HELDOUT_EVERY}".encode())
    h.update(_file_sha(Path(sources.__file__)))  # the readers: a changed reader is a different corpus
    h.update(inspect.getsource(_interleave).encode() + inspect.getsource(_extend).encode())
    for s, files in located or _source_files():
        h.update(f"|{s.name};{s.role};{s.weight};{s.package}".encode())
        for f in files:
            h.update(f"|{f.name}:".encode())
            h.update(_file_sha(f))
    h.update(_tokenizer_id(tokenizer).encode())
    return h.hexdigest()


def _interleave(located, role: str):
    """The documents of the sources with ``role`` mixed into one stream: next comes the source that is
    furthest behind its share (characters so far / weight; ties by registry order). Yields
    (source name, the document's index within its source, text)."""
    live = [[0.0, i, s, iter(s.reader(files)), 0] for i, (s, files) in enumerate(located) if s.role == role]
    while live:
        entry = min(live, key=lambda e: (e[0] / e[2].weight, e[1]))
        doc = next(entry[3], None)
        if doc is None:
            live.remove(entry)
            continue
        entry[0] += len(doc)
        entry[4] += 1
        yield entry[2].name, entry[4] - 1, doc


class _Store:
    """Append-only token files of one stream (``train``+``held``, or ``ood``) and a JSON record of how
    far the stream has been tokenised. A crash between the two leaves a longer file than the record
    says; the next extension cuts it back."""

    def __init__(self, root: Path, name: str, parts: tuple[str, ...], dtype):
        self.root, self.name, self.parts, self.dtype = root, name, parts, dtype
        self.meta_path = root / f"{name}.json"

    def meta(self) -> dict:
        try:
            return json.loads(self.meta_path.read_text())
        except (OSError, ValueError):
            return {"docs": 0, "complete": False, "tokens": {p: 0 for p in self.parts}, "by_source": {}}

    def path(self, part: str) -> Path:
        return self.root / f"{self.name}.{part}.bin"

    def write_meta(self, meta: dict) -> None:
        tmp = self.meta_path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(meta, indent=1, sort_keys=True))
        os.replace(tmp, self.meta_path)

    def read(self, part: str, n: int) -> torch.Tensor:
        import numpy as np

        arr = np.fromfile(self.path(part), dtype=self.dtype, count=n) if n else np.zeros(0, self.dtype)
        return torch.from_numpy(arr.astype(np.int64))


def _extend(store: _Store, stream, tokenizer, want: dict[str, int], split: bool, label: str) -> dict:
    """Tokenise more of ``stream`` until every part has ``want`` tokens (or the stream ends)."""
    import numpy as np

    meta = store.meta()
    if meta["complete"] or all(meta["tokens"][p] >= n for p, n in want.items()):
        return meta
    for p in store.parts:  # cut back what a crash may have appended after the last record
        with open(store.path(p), "ab") as f:
            f.truncate(meta["tokens"][p] * np.dtype(store.dtype).itemsize)
    from .progress import progress_bar

    eos = tokenizer.eos_token_id
    start = sum(min(meta["tokens"][p], n) for p, n in want.items())
    with progress_bar("tokens") as bar:
        task = bar.add_task(label, total=sum(want.values()), completed=start, tokens=f"{start:,}")
        skipped, batch, size = 0, [], 0

        def flush():
            ids = tokenizer([d for _, _, d in batch], add_special_tokens=False)["input_ids"]
            out: dict[str, list[int]] = {p: [] for p in store.parts}
            for (src, idx, _), t in zip(batch, ids):
                part = store.parts[0] if not split else ("held" if idx % HELDOUT_EVERY == HELDOUT_EVERY - 1 else "train")
                out[part].extend(t)
                if eos is not None:
                    out[part].append(eos)
                count = meta["by_source"].setdefault(src, {})
                count[part] = count.get(part, 0) + len(t) + (eos is not None)
            for p, toks in out.items():
                if toks:
                    with open(store.path(p), "ab") as f:
                        f.write(np.asarray(toks, dtype=store.dtype).tobytes())
                    meta["tokens"][p] += len(toks)
            meta["docs"] += len(batch)
            store.write_meta(meta)
            batch.clear()
            done = sum(min(meta["tokens"][p], n) for p, n in want.items())
            bar.update(task, completed=done, tokens=f"{sum(meta['tokens'].values()):,}")

        done_before = meta["docs"]
        for doc in stream:
            if skipped < done_before:  # already tokenised by an earlier build
                skipped += 1
                continue
            batch.append(doc)
            size += len(doc[2])
            left = sum(max(0, n - meta["tokens"][p]) for p, n in want.items())
            if size >= min(1 << 20, max(1 << 14, 5 * left)) or len(batch) >= 256:  # ~4 characters a token
                flush()
                size = 0
                if all(meta["tokens"][p] >= n for p, n in want.items()):
                    break
        else:
            if batch:
                flush()
            meta["complete"] = True
            store.write_meta(meta)
    return meta


@dataclass
class GeneralTokens:
    id: str
    train: torch.Tensor | None
    heldout: torch.Tensor | None
    ood: torch.Tensor | None
    complete: bool
    by_source: dict = field(default_factory=dict)
    prebuilt: bool = False  # read from a prebuilt directory, the sources being absent here


def _prebuilt_dirs() -> list[Path]:
    """Corpus directories built elsewhere (or earlier) that record their tokenizer: usable without the
    sources, read-only, for a machine with no package registry (copy ``$ATTNSWAP_CACHE/data`` there)."""
    from .sources import cache_root

    return sorted(p.parent for p in (cache_root() / "data").glob(f"general-v{GENERAL_VERSION}-*/sources.json"))


def _prebuilt_tokens(tokenizer, *, train: int, heldout: int, ood: int) -> GeneralTokens:
    """``general_tokens`` without the sources: from a prebuilt directory made with the same tokenizer.
    Asking for more than it holds (unless it holds the whole corpus) is an error, never a silent cut."""
    from . import sources

    tid = _tokenizer_id(tokenizer)
    found = []
    for root in _prebuilt_dirs():
        try:
            rec = json.loads((root / "sources.json").read_text())
        except (OSError, ValueError):
            continue
        if rec.get("tokenizer") == tid and rec.get("version") == GENERAL_VERSION:
            found.append((root, rec))
    if not found:
        raise AttnSwapError(sources.missing_message(sources.missing()))
    dtype = "<u2" if len(tokenizer) <= 65535 else "<i4"
    best = None
    for root, rec in found:
        main, o = _Store(root, "main", ("train", "held"), dtype), _Store(root, "ood", ("ood",), dtype)
        m, om = main.meta(), o.meta()
        enough = ((m["complete"] or (m["tokens"]["train"] >= train and m["tokens"]["held"] >= heldout))
                  and (om["complete"] or om["tokens"]["ood"] >= ood))
        if enough:
            best = (rec, main, o, m, om)
            break
    if best is None:
        have = ", ".join(f"{r.name}: {_Store(r, 'main', ('train', 'held'), dtype).meta()['tokens']}" for r, _ in found)
        raise AttnSwapError(f"the prebuilt --data general corpus is shorter than this run needs (train {train:,}, "
                            f"held-out {heldout:,}, out-of-domain {ood:,} tokens; have {have}); "
                            + sources.missing_message(sources.missing()))
    rec, main, o, m, om = best
    return GeneralTokens(
        rec["id"], main.read("train", min(train, m["tokens"]["train"])) if train else None,
        main.read("held", min(heldout, m["tokens"]["held"])) if heldout else None,
        o.read("ood", min(ood, om["tokens"]["ood"])) if ood else None,
        m["complete"], {**m["by_source"], **om["by_source"]}, prebuilt=True)


def general_tokens(tokenizer, *, train: int = 0, heldout: int = 0, ood: int = 0) -> GeneralTokens:
    """The first ``train`` / ``heldout`` / ``ood`` tokens of the general corpus (fewer if it is shorter),
    built as far as needed, once, under ``$ATTNSWAP_CACHE/data/general-v<version>-<id>``. Where the
    sources are not installed, a directory built earlier with the same tokenizer serves (read-only)."""
    import fcntl

    from . import sources
    from .sources import cache_root

    if sources.missing():
        return _prebuilt_tokens(tokenizer, train=train, heldout=heldout, ood=ood)
    located = _source_files()
    cid = corpus_id(tokenizer, located)
    root = cache_root() / "data" / f"general-v{GENERAL_VERSION}-{cid[:16]}"
    root.mkdir(parents=True, exist_ok=True)
    dtype = "<u2" if len(tokenizer) <= 65535 else "<i4"
    main, out_of_domain = _Store(root, "main", ("train", "held"), dtype), _Store(root, "ood", ("ood",), dtype)
    with open(root / "lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # processes building the same corpus take turns
        want = {k: v for k, v in (("train", train), ("held", heldout)) if v}
        m = _extend(main, _interleave(located, "train"), tokenizer, want, True, "building --data general") if want else main.meta()
        o = (_extend(out_of_domain, _interleave(located, "ood"), tokenizer, {"ood": ood}, False,
                     "building the out-of-domain set") if ood else out_of_domain.meta())
        (root / "sources.json").write_text(json.dumps({"id": cid, "version": GENERAL_VERSION, "tokenizer": _tokenizer_id(tokenizer), "sources": [
            {"name": s.name, "role": s.role, "domain": s.domain, "licence": s.licence, "package": s.package,
             "files": len(files), "dir": os.path.commonpath([str(f.parent) for f in files])} for s, files in located]}, indent=1))
        got = GeneralTokens(
            cid, main.read("train", min(train, m["tokens"]["train"])) if train else None,
            main.read("held", min(heldout, m["tokens"]["held"])) if heldout else None,
            out_of_domain.read("ood", min(ood, o["tokens"]["ood"])) if ood else None,
            m["complete"], {**m["by_source"], **o["by_source"]})
    return got


def train_budget(spec: GeneralSpec, tokens_needed: int | None) -> int:
    """How many training tokens ``spec`` takes for a run that will read ``tokens_needed``."""
    if spec.limit is not None:
        return spec.limit
    if spec.everything or tokens_needed is None:
        return 1 << 40
    return max(MIN_TRAIN_TOKENS, 1 << max(0, int(tokens_needed) - 1).bit_length())


def _sha(ids: torch.Tensor) -> str:
    return hashlib.sha256(ids.to(torch.int64).contiguous().numpy().tobytes()).hexdigest()


@dataclass
class TrainingData:
    train: torch.Tensor  # (n, seq_len) sequences
    heldout: torch.Tensor | None  # in-domain held-out sequences (at most eval_tokens)
    ood: torch.Tensor | None  # out-of-domain sequences, or None where there is no such set
    info: dict  # name, hash (sha256 of the training tokens), tokens, corpus id, ...


def _sequences(ids: torch.Tensor, seq_len: int, what: str) -> torch.Tensor:
    n = ids.numel() // seq_len
    if n == 0:
        raise AttnSwapError(f"the {what} has {ids.numel()} tokens, fewer than one --seq-len {seq_len} sequence; "
                            "give more data or a shorter --seq-len")
    return ids[: n * seq_len].view(n, seq_len)


def ood_tokens(tokenizer, tokens: int) -> tuple[torch.Tensor | None, str | None]:
    """The first ``tokens`` of the out-of-domain set, or (None, why not)."""
    from . import sources

    absent = sources.missing()
    if absent and not _prebuilt_dirs():
        return None, sources.missing_message(absent)
    return general_tokens(tokenizer, ood=tokens).ood, None


def training_data(spec: str, tokenizer, seq_len: int, *, eval_tokens: int, tokens_needed: int | None = None) -> TrainingData:
    """Training sequences, in-domain held-out sequences and out-of-domain sequences for ``--data spec``.
    Out of domain is general's held-out set for every ``--data`` (None where its sources are missing)."""
    g = parse_general(spec)
    n_eval = max(1, eval_tokens // seq_len) * seq_len if eval_tokens else 0
    if g is not None and g.ood:
        raise AttnSwapError("--data general:ood is for evaluation (convert eval); train on general")
    if g is not None:
        budget = train_budget(g, tokens_needed)
        gt = general_tokens(tokenizer, train=budget, heldout=n_eval, ood=n_eval)
        train_ids, held_ids, ood_ids = gt.train, gt.heldout, gt.ood
        info = {"name": spec, "corpus": f"general-v{GENERAL_VERSION}-{gt.id[:16]}", "corpus_sha256": gt.id,
                "slice": "all" if budget >= (1 << 40) else budget, "complete": gt.complete}
        if gt.prebuilt:
            info["prebuilt"] = True  # the sources are absent here: read from a corpus built elsewhere
        ood_note = None
    else:
        corpus = build_corpus(spec, tokenizer)
        train_ids, held_ids = corpus.train, corpus.heldout[:n_eval] if n_eval else None
        ood_ids, ood_note = ood_tokens(tokenizer, n_eval) if n_eval else (None, None)
        info = {"name": spec}
    train = _sequences(train_ids, seq_len, f"training split of --data {spec}")
    held = _sequences(held_ids, seq_len, "held-out split")[: max(1, eval_tokens // seq_len)] if n_eval else None
    ood = _sequences(ood_ids, seq_len, "out-of-domain set") if n_eval and ood_ids is not None and ood_ids.numel() >= seq_len else None
    info.update(hash=_sha(train), tokens={"train": train.numel(), "heldout": 0 if held is None else held.numel(),
                                          "out_of_domain": 0 if ood is None else ood.numel()})
    if ood is None and n_eval:
        info["out_of_domain_note"] = ood_note or "the out-of-domain set is shorter than one sequence"
    return TrainingData(train, held, ood, info)


def heldout_sets(tokenizer, seq_len: int, tokens: int = 32768, data: str = DEFAULT_DATA) -> dict[str, torch.Tensor | None]:
    """{"in_domain": held-out sequences of ``data``, "out_of_domain": general's out-of-domain sequences},
    each at most ``tokens`` tokens in ``seq_len`` windows."""
    d = training_data(data, tokenizer, seq_len, eval_tokens=tokens, tokens_needed=MIN_TRAIN_TOKENS)
    return {"in_domain": d.heldout, "out_of_domain": d.ood}


def heldout_ids(data: str, tokenizer, tokens: int | None = None) -> torch.Tensor:
    """The held-out tokens of ``data`` (1-D): for ``general`` the first ``tokens`` of its in-domain
    held-out split, for ``general:ood`` of its out-of-domain set; otherwise the whole held-out split,
    tokenised exactly as ``convert linearize`` splits it."""
    g = parse_general(data)
    if g is not None:
        n = tokens or 1 << 16
        ids = general_tokens(tokenizer, ood=n).ood if g.ood else general_tokens(tokenizer, heldout=n).heldout
    else:
        docs = load_documents(data)
        if len(docs) >= HELDOUT_EVERY:  # encode only the held-out documents (the same ids build_corpus makes)
            ids = encode_documents(tokenizer, [d for i, d in enumerate(docs) if i % HELDOUT_EVERY == HELDOUT_EVERY - 1])
        else:
            ids = build_corpus(docs, tokenizer).heldout
    if ids.numel() < 2:
        raise AttnSwapError(f"the held-out split of --data {data!r} is empty; give more text")
    return ids
