"""fastspawn._api.launch / launch_programs: the engine under launchers (elastic, CLI,
pytest plugin). Per-rank environment in place before the call is loaded, per-rank stdio,
return values through the result pipe, and foreign programs with an exact environment.
"""

from __future__ import annotations

import os
import sys

import psutil
import pytest

import _launch_workers as w
from fastspawn import ProcessRaisedException, _api

methods = pytest.mark.parametrize("method", ["spawn", "fork", "forkserver"])
KEY = "FASTSPAWN_TEST_RANK_VAR"


def join_all(ctx) -> None:
    while not ctx.join():
        pass


def children() -> set:
    """Our direct children (the zygote and multiprocessing's helpers among them)."""
    return {c.pid for c in psutil.Process().children()}


@methods
def test_rank_env_stdio_and_return_values(method, tmp_path, monkeypatch):
    monkeypatch.delenv(KEY, raising=False)
    files = [(open(tmp_path / f"out{i}", "w"), open(tmp_path / f"err{i}", "w")) for i in range(3)]
    try:
        ctx = _api.launch(
            w.report_env, (KEY,), 3, start_method=method,
            envs=[{KEY: f"value-{i}"} for i in range(3)],
            stdio=[(o.fileno(), e.fileno()) for o, e in files],
            return_values=True,
        )
    finally:
        for o, e in files:
            o.close()
            e.close()
    join_all(ctx)
    assert [ctx.return_value(i) for i in range(3)] == [{"rank": i, KEY: f"value-{i}"} for i in range(3)]
    for i in range(3):
        assert (tmp_path / f"out{i}").read_text() == f"out {i} {KEY}=value-{i}\n"
        assert (tmp_path / f"err{i}").read_text() == f"err {i}\n"
    assert KEY not in os.environ  # the caller's environment is untouched


@methods
def test_rank_env_is_set_before_the_call_is_unpickled(method, monkeypatch):
    monkeypatch.setenv(KEY, "caller")
    ctx = _api.launch(
        w.value_at_load, (w.EnvAtLoad(None),), 2, start_method=method,
        envs=[{KEY: "rank0"}, {KEY: "rank1"}], return_values=True,
    )
    join_all(ctx)
    if method == "fork":  # nothing is unpickled in a fork: the object is the caller's
        assert [ctx.return_value(i) for i in range(2)] == [None, None]
    else:
        assert [ctx.return_value(i) for i in range(2)] == ["rank0", "rank1"]


def test_stdio_may_swap_the_callers_own_streams(capfd):
    ctx = _api.launch(w.report_env, (KEY,), 1, stdio=[(2, 1)])
    join_all(ctx)
    out, err = capfd.readouterr()
    assert out == "err 0\n"
    assert err.startswith(f"out 0 {KEY}=")


@methods
def test_unpicklable_return_value_fails_the_rank_with_a_clear_error(method):
    ctx = _api.launch(w.return_lambda, (), 1, start_method=method, return_values=True)
    with pytest.raises(ProcessRaisedException, match="while pickling the return value, a 'function'"):
        join_all(ctx)
    with pytest.raises(LookupError, match="process 0 has not returned a value"):
        ctx.return_value(0)


def test_return_values_of_a_failed_run_and_tracebacks():
    ctx = _api.launch(w.fail_on, (1,), 2, return_values=True)
    ctx._run.wait_all(None)
    assert ctx.return_value(0) == 0
    with pytest.raises(LookupError):
        ctx.return_value(1)
    assert ctx.error_traceback(0) is None
    assert "KeyError: 'rank 1 is the bad one'" in ctx.error_traceback(1)
    with pytest.raises(IndexError):
        ctx.return_value(2)


def test_return_values_are_only_sent_when_asked():
    ctx = _api.launch(w.fail_on, (5,), 1)
    join_all(ctx)
    with pytest.raises(LookupError):
        ctx.return_value(0)


@pytest.mark.parametrize("bad", [{"envs": [{}]}, {"stdio": [(None, None)] * 3}])
def test_per_rank_lists_must_match_nprocs(bad):
    before = children()
    with pytest.raises(ValueError, match=r"must have one entry per process \(2\), got"):
        _api.launch(w.report_env, (KEY,), 2, **bad)
    assert children() == before


def test_programs_get_exactly_their_environment_and_stdio(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTSPAWN_ONLY_IN_CALLER", "1")
    outs = [open(tmp_path / f"p{i}", "w") for i in range(2)]
    try:
        ctx = _api.launch_programs(
            [["sh", "-c", f'echo "$A ${{FASTSPAWN_ONLY_IN_CALLER:-unset}}"; exit {i}'] for i in range(2)],
            [{"A": f"a{i}", "PATH": os.environ["PATH"]} for i in range(2)],
            stdio=[(o.fileno(), None) for o in outs],
        )
    finally:
        for o in outs:
            o.close()
    ctx._run.wait_all(None)
    assert ctx._run.exitcodes == [0, 1]
    assert [(tmp_path / f"p{i}").read_text() for i in range(2)] == ["a0 unset\n", "a1 unset\n"]
    assert all(pid > 0 for pid in ctx.pids())


def test_program_names_are_looked_up_in_the_ranks_path(tmp_path):
    tool = tmp_path / "fastspawn-test-tool"
    tool.write_text("#!/bin/sh\nexit 7\n")
    tool.chmod(0o755)
    ctx = _api.launch_programs([["fastspawn-test-tool"]], [{"PATH": str(tmp_path)}])
    ctx._run.wait_all(None)
    assert ctx._run.exitcodes == [7]


def test_a_program_that_cannot_run_starts_nothing(tmp_path):
    before = children()
    script = tmp_path / "not-executable"
    script.write_text("#!/bin/sh\n")
    with pytest.raises(FileNotFoundError, match="fastspawn-no-such-program"):
        _api.launch_programs([["true"], ["fastspawn-no-such-program"]], [dict(os.environ)] * 2)
    with pytest.raises(PermissionError):
        _api.launch_programs([[str(script)]], [{}])
    with pytest.raises(ValueError, match="non-empty argv"):
        _api.launch_programs([[]], [{}])
    assert children() == before


def test_programs_lead_their_own_process_group():
    ctx = _api.launch_programs([[sys.executable, "-c", "import os; os._exit(os.getpgid(0) == os.getpid())"]], [dict(os.environ)])
    ctx._run.wait_all(None)
    assert ctx._run.exitcodes == [1]


@pytest.mark.parametrize("reaped", [True, False], ids=["reaped", "zombie"])
def test_a_dead_resource_tracker_is_restarted_for_the_next_call(reaped):
    from multiprocessing import resource_tracker

    resource_tracker.ensure_running()
    tracker = resource_tracker._resource_tracker
    old_pid = tracker._pid
    os.kill(old_pid, 9)
    if reaped:
        os.waitpid(old_pid, 0)
    else:
        os.waitid(os.P_PID, old_pid, os.WEXITED | os.WNOWAIT)  # dead, not reaped
        assert psutil.Process(old_pid).status() == psutil.STATUS_ZOMBIE
    with pytest.warns(UserWarning, match="resource_tracker: process died unexpectedly"):
        ctx = _api.launch(w.fail_on, (5,), 1, return_values=True)
    join_all(ctx)
    assert ctx.return_value(0) == 0
    assert tracker._pid not in (None, old_pid)
