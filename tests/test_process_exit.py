"""How a process of a multi-process run ends (cli._close_process_group, cli.main): a finished run waits
at a barrier (gloo) until every process is done before any closes its group, and a process that
closed a group leaves through os._exit with the command's exit status, skipping the interpreter's
teardown (where gloo's threads aborted a finished run, exit -6)."""

import pytest
import torch.distributed as dist

from attnswap import cli


class FakeGroup:
    def __init__(self, monkeypatch, world=2, backend="gloo", broken=False):
        self.calls = []
        monkeypatch.setattr(dist, "is_available", lambda: True)
        monkeypatch.setattr(dist, "is_initialized", lambda: True)
        monkeypatch.setattr(dist, "get_world_size", lambda *a, **k: world)
        monkeypatch.setattr(dist, "get_backend", lambda *a, **k: backend)

        def barrier(*a, **k):
            self.calls.append("barrier")
            if broken:
                raise RuntimeError("Connection closed by peer")

        monkeypatch.setattr(dist, "barrier", barrier)
        monkeypatch.setattr(dist, "destroy_process_group", lambda *a, **k: self.calls.append("destroy"))
        monkeypatch.setattr(cli, "_GROUP_CLOSED", False)


@pytest.mark.parametrize("done, world, backend, want", [
    (True, 2, "gloo", ["barrier", "destroy"]),
    (False, 2, "gloo", ["destroy"]),  # a failed process must not wait for peers that may never come
    (True, 1, "gloo", ["destroy"]),
    (True, 2, "nccl", ["destroy"]),  # an NCCL barrier could outlast its timeout while the main process saves
])
def test_the_group_is_closed_after_a_barrier_only_when_the_run_finished(monkeypatch, done, world, backend, want):
    g = FakeGroup(monkeypatch, world, backend)
    cli._close_process_group(done)
    assert g.calls == want and cli._GROUP_CLOSED


def test_a_peer_gone_at_the_barrier_still_closes_the_group(monkeypatch):
    g = FakeGroup(monkeypatch, broken=True)
    cli._close_process_group(True)
    assert g.calls == ["barrier"] and cli._GROUP_CLOSED  # the error ends the attempt; the exit follows


def test_no_group_nothing_to_close(monkeypatch):
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(cli, "_GROUP_CLOSED", False)
    cli._close_process_group(True)
    assert not cli._GROUP_CLOSED


class Exited(Exception):
    pass


@pytest.mark.parametrize("raised, status", [(SystemExit(0), 0), (SystemExit(None), 0), (SystemExit(3), 3),
                                            (SystemExit("bad"), 1), (None, 0)])
def test_main_leaves_through_os_exit_with_the_commands_status_once_a_group_was_closed(monkeypatch, capsys, raised, status):
    def app():
        print("summary")
        if raised is not None:
            raise raised

    def fake_exit(code):
        raise Exited(code)

    monkeypatch.setattr(cli, "app", app)
    monkeypatch.setattr(cli.os, "_exit", fake_exit)
    monkeypatch.setattr(cli, "_GROUP_CLOSED", True)
    with pytest.raises(Exited) as e:
        cli.main()
    assert e.value.args == (status,) and "summary" in capsys.readouterr().out


def test_main_exits_as_usual_without_a_group(monkeypatch):
    def app():
        raise SystemExit(2)

    monkeypatch.setattr(cli, "app", app)
    monkeypatch.setattr(cli.os, "_exit", lambda code: pytest.fail("os._exit without a process group"))
    monkeypatch.setattr(cli, "_GROUP_CLOSED", False)
    with pytest.raises(SystemExit) as e:
        cli.main()
    assert e.value.code == 2
