"""Progress bars written to a file: a long stage prints its line as it goes, not only when it ends."""

from __future__ import annotations

from attnswap.progress import progress_bar


def _run(steps: int) -> None:
    with progress_bar("loss") as bar:
        task = bar.add_task("stage", total=steps, loss="-")
        for i in range(steps):
            bar.update(task, advance=1, loss=f"{i}.5")


def test_off_a_terminal_each_update_prints_its_line_when_asked(monkeypatch, capsys):
    monkeypatch.setenv("ATTNSWAP_PROGRESS_EVERY", "0")
    _run(3)
    err = capsys.readouterr().err
    assert "1/3" in err and "2/3" in err and "loss 1.5" in err  # as it went
    assert "3/3" in err  # and the finished bar, drawn once when it stopped
    assert err.count("3/3") == 1


def test_off_a_terminal_the_default_prints_at_most_every_30_seconds(monkeypatch, capsys):
    monkeypatch.delenv("ATTNSWAP_PROGRESS_EVERY", raising=False)
    _run(50)
    err = capsys.readouterr().err
    assert "3/50" not in err and "50/50" in err  # a fast stage: only its final line
