"""fastspawn.elastic against torch.distributed.elastic.multiprocessing, and fastspawn.run.

The differential tests run each scenario through both libraries (with start method fork:
torch's spawned children would each import torch, seconds apiece; fork children also
inherit the launcher's signal handlers in both) and compare what a user sees: results, failures, error files, the log directory, console output and log records.
Where fastspawn differs on purpose, a test of its own (``test_improvement_*``) says how.
"""

from __future__ import annotations

import gc
import io
import json
import logging
import multiprocessing
import os
import re
import signal
import sys
import threading
import time
from multiprocessing import resource_tracker
from types import SimpleNamespace

import pytest

import _elastic_envprobe as probe
import _workers
import _elastic_workers as w
import fastspawn
import fastspawn.elastic as fe
from fastspawn.elastic import errors as fe_errors

try:
    import torch.distributed.elastic.multiprocessing as te
    from torch.distributed.elastic.multiprocessing import errors as te_errors
except ImportError:  # the differential tests need torch
    te = te_errors = None

needs_torch = pytest.mark.skipif(te is None, reason="torch is not installed")

HERE = os.path.dirname(os.path.abspath(__file__))
RECORD_SCRIPT = os.path.join(HERE, "_elastic_record_script.py")

FASTSPAWN = SimpleNamespace(tag="fastspawn", mod=fe, errors=fe_errors, method="fork", logger="fastspawn.elastic")
# fastspawn's own start method (the warm zygote) for the checks that do not involve torch
ZYGOTE = SimpleNamespace(**{**vars(FASTSPAWN), "method": "spawn"})
TORCH = SimpleNamespace(tag="torch", mod=te, errors=te_errors, method="fork", logger="torch.distributed.elastic")
pytestmark = pytest.mark.usefixtures("keep_signal_handlers")  # start() installs handlers


def _exited(pids):
    """Block until each pid (our child) has exited, without reaping it."""
    for pid in pids:
        try:
            os.waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT)
        except ChildProcessError:  # already reaped
            pass


def _close_torch_leaks(ctx):
    """torch's SubprocessHandler leaves the log files of ranks that exited by themselves
    open (a ResourceWarning under pytest); fastspawn closes them."""
    for handler in getattr(ctx, "subprocess_handlers", {}).values():
        for stream in (handler._stdout, handler._stderr):
            if stream is not None:
                stream.close()


def _normalise(text, pids, paths):
    for path, name in paths:
        text = text.replace(path, name)
    for pid in sorted(pids, key=lambda p: -len(str(p))):
        text = re.sub(rf"\b{pid}\b", "<pid>", text)
    return text


# A library's frame around the user's function (its record wrapper): the one frame that differs.
_LIBRARY_FRAME = re.compile(
    r'  File "[^"]*(?:torch/distributed/elastic/|fastspawn/elastic/|fastspawn/_elastic_child)[^"]*", line \d+,'
    r' in \w+\n(?:    .*\n)*'
)


def _error_data(data):
    """Error-file data without what differs run to run (timestamp, library frames)."""
    data = json.loads(json.dumps(data))
    message = data.get("message")
    if isinstance(message, dict):
        extra = message.get("extraInfo", {})
        extra.pop("timestamp", None)
        if "py_callstack" in extra:
            stack = _LIBRARY_FRAME.sub("", extra["py_callstack"])
            if message.get("message", "").startswith("SignalException:"):
                # Where a stopping signal lands in a rank is scheduling, not behaviour (a
                # loaded machine can stop it a line before its wait): keep what was raised.
                stack = stack.rstrip("\n").rsplit("\n", 1)[-1] + "\n"
            extra["py_callstack"] = stack
    return data


def _as_std(std, value):
    """Std settings in a library's own ``std`` type (torch's to_map insists on it)."""
    if isinstance(value, dict):
        return {rank: std(int(s)) for rank, s in value.items()}
    return std(int(value)) if isinstance(value, int) else value


# torch's own log handler prints its records to stderr (glog style): not the workers' output
_TORCH_LOG_LINE = re.compile(r"^[IWE]\d{4} [\d:.]+ \d+ torch/")


def _file_data(failure):
    """error_file_data, except what torch's global pollutes: torch adds errorTraits to its
    shared "no data" dict once any rank exited with a code and no error file, and all later
    signal failures show them too."""
    data = failure.error_file_data
    return {k: v for k, v in data.items() if failure.exitcode >= 0 or k != "errorTraits"}


def observe(lib, tmp_path, capfd, caplog, entrypoint, args, envs=None, settle=False, start=None, **spec):
    """Run one scenario with ``lib``; return what a user sees, normalised. ``spec`` goes to
    DefaultLogsSpecs, ``start`` (more keywords) to start_processes."""
    capfd.readouterr()
    caplog.clear()
    root = str(tmp_path / lib.tag)
    logs = lib.mod.DefaultLogsSpecs(log_dir=root, **{k: _as_std(lib.mod.Std, v) for k, v in spec.items()})
    envs = envs if envs is not None else {rank: {} for rank in args}
    with caplog.at_level(logging.INFO, logger=lib.logger):
        ctx = lib.mod.start_processes("trainer", entrypoint, args, envs, logs, start_method=lib.method, **(start or {}))
        pids = list(ctx.pids().values())
        if settle:  # every rank has ended before the first look: no race in what is seen
            _exited(pids)
        result = ctx.wait(period=0.02)
        _close_torch_leaks(ctx)
        with pytest.raises(ValueError) as twice:
            ctx._start()
    out, err = capfd.readouterr()
    run_dir = logs._run_log_dir
    paths = [(run_dir, "<run>"), (root, "<root>")]

    def norm(text):
        text = text.replace(f"(start_method: {lib.method})", "(start_method: <method>)")
        text = text.replace(f"{lib.mod.__name__}.api.SignalException", "SignalException")
        return _normalise(text, pids, paths)

    files = {}
    for where, _, names in os.walk(run_dir):
        for name in names:
            path = os.path.join(where, name)
            with open(path) as src:
                content = src.read()
            if name == "error.json":
                content = _error_data(json.loads(norm(content)))
            files[os.path.relpath(path, run_dir)] = content
    failures = {
        rank: {
            "local_rank": f.local_rank,
            "pid_matches": f.pid == pids[rank],
            "exitcode": f.exitcode,
            "error_file": norm(f.error_file),
            "data": _error_data(_file_data(f)),
            "message": norm(f.message) if isinstance(f.message, str) else _error_data({"message": f.message}),
            "signal_name": f.signal_name(),
        }
        for rank, f in result.failures.items()
    }
    records = sorted(
        (r.levelname, norm(r.getMessage()).split("\n")[0])
        for r in caplog.records
        if r.name.startswith(lib.logger)
        # how the others are stopped after a failure is each library's own business
        if not r.getMessage().startswith(("Closing process", "Sending process"))
    )
    return {
        "return_values": result.return_values,
        "failures": failures,
        "stdouts": {k: norm(v) for k, v in result.stdouts.items()},
        "stderrs": {k: norm(v) for k, v in result.stderrs.items()},
        "error_files": {k: norm(v) for k, v in ctx.error_files.items()},
        "envs": {k: {n: norm(v) for n, v in env.items()} for k, env in envs.items()},
        "files": files,
        "stdout": sorted(out.splitlines()),
        "stderr": sorted(norm(line) for line in err.splitlines() if not _TORCH_LOG_LINE.match(line)),
        "records": records,
        "start_twice": str(twice.value),
    }


def both(tmp_path, capfd, caplog, *args, **kwargs):
    theirs = observe(TORCH, tmp_path, capfd, caplog, *args, **kwargs)
    ours = observe(FASTSPAWN, tmp_path, capfd, caplog, *args, **kwargs)
    return theirs, ours


def _binary(code):
    return {"entrypoint": sys.executable, "args_prefix": ("-c", code)}


PY_PRINT = "import sys; print('bin out', sys.argv[1]); print('bin err', sys.argv[1], file=sys.stderr)"

# name -> (entrypoint, args, observe() keywords)
SCENARIOS = {
    "function ok, redirect one rank, tee another": (
        w.hello,
        {0: ("r0", 10), 1: ("r1", 11)},
        dict(envs={0: {w.ENV: "a"}, 1: {w.ENV: "b"}}, redirects={0: fe.Std.OUT}, tee={1: fe.Std.ALL}),
    ),
    "function ok, tee stdout, local_ranks_filter": (
        w.hello,
        {0: ("r0",), 1: ("r1",)},
        dict(tee=fe.Std.OUT, local_ranks_filter={1}, start=dict(log_line_prefixes={1: "<one>"})),
    ),
    "function raises in one rank, the other is stopped": (
        w.act,
        {0: ("fail_once_peer_ready", "boom"), 1: ("ready_then_wait",)},
        dict(redirects=fe.Std.ERR),
    ),
    "function killed by a signal": (
        w.act,
        {0: ("kill_self", signal.SIGKILL)},
        dict(settle=True),
    ),
    "function exits with a code, no error file": (w.act, {0: ("exit_with", 3)}, {}),
    "function returns something unpicklable": (w.act, {0: ("unpicklable",)}, {}),
    "binary ok, tee all, filtered duplicates": (
        sys.executable,
        {0: ("-c", PY_PRINT, "r0"), 1: ("-c", PY_PRINT, "r1")},
        dict(tee=fe.Std.ALL, start=dict(duplicate_stdout_filters=["r1", "nowhere"], duplicate_stderr_filters=["err r0"])),
    ),
    "binary ok, redirect all": (sys.executable, {0: ("-c", PY_PRINT, "r0")}, dict(redirects=fe.Std.ALL)),
    "binary with @record fails": (
        sys.executable,
        {0: (RECORD_SCRIPT, "fastspawn", "raise"), 1: (RECORD_SCRIPT, "fastspawn", "ok")},
        dict(settle=True, tee=fe.Std.OUT),
    ),
    "binary killed by a signal": (sys.executable, {0: ("-c", "import os; os.kill(os.getpid(), 15)")}, {}),
}


@needs_torch
@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_same_as_torch(scenario, tmp_path, capfd, caplog):
    entrypoint, args, kwargs = SCENARIOS[scenario]
    theirs, ours = both(tmp_path, capfd, caplog, entrypoint, args, **kwargs)
    for key in theirs:
        assert (key, ours[key]) == (key, theirs[key])


def test_scenarios_observed(tmp_path, capfd, caplog):
    """What the differential scenarios show, spelled out (and checked without torch too)."""
    entrypoint, args, kwargs = SCENARIOS["function ok, redirect one rank, tee another"]
    seen = observe(ZYGOTE, tmp_path, capfd, caplog, entrypoint, args, **kwargs)
    assert seen["return_values"] == {0: {"value": 10, "env": "a"}, 1: {"value": 11, "env": "b"}}
    assert seen["files"] == {
        "attempt_0/0/stdout.log": "out r0\n",
        "attempt_0/1/stdout.log": "out r1\n",
        "attempt_0/1/stderr.log": "err r1\n",
    }
    assert seen["stdout"] == ["[trainer1]:out r1"]
    assert seen["stderr"] == ["[trainer1]:err r1", "err r0"]
    assert seen["stdouts"] == {0: "<run>/attempt_0/0/stdout.log", 1: "<run>/attempt_0/1/stdout.log"}
    assert seen["stderrs"] == {0: "", 1: "<run>/attempt_0/1/stderr.log"}
    assert seen["envs"][1] == {w.ENV: "b", "TORCHELASTIC_ERROR_FILE": "<run>/attempt_0/1/error.json"}
    assert seen["start_twice"] == (
        "The process context already initialized. Most likely the start method got called twice."
    )

    entrypoint, args, kwargs = SCENARIOS["function raises in one rank, the other is stopped"]
    seen = observe(ZYGOTE, tmp_path / "fail", capfd, caplog, entrypoint, args, **kwargs)
    assert seen["return_values"] == {}
    assert list(seen["failures"]) == [0]
    failure = seen["failures"][0]
    assert failure["exitcode"] == 1 and failure["pid_matches"] and failure["signal_name"] == "<N/A>"
    assert failure["error_file"] == "<run>/attempt_0/0/error.json"
    assert failure["message"]["message"]["message"] == "ValueError: boom"
    assert failure["message"]["message"]["extraInfo"]["py_callstack"].endswith(
        'in fail_once_peer_ready\n    raise ValueError(message)\nValueError: boom\n'
    )
    assert ("ERROR", "failed (exitcode: 1) local_rank: 0 (pid: <pid>) of fn: act (start_method: <method>)") in seen[
        "records"
    ]

    entrypoint, args, kwargs = SCENARIOS["function killed by a signal"]
    seen = observe(ZYGOTE, tmp_path / "signal", capfd, caplog, entrypoint, args, **kwargs)
    failure = seen["failures"][0]
    assert (failure["exitcode"], failure["signal_name"], failure["error_file"]) == (-9, "SIGKILL", "<N/A>")
    assert failure["message"] == "Signal 9 (SIGKILL) received by PID <pid>"
    assert list(seen["failures"]) == [0]


@needs_torch
def test_start_errors_same_as_torch(tmp_path):
    """Mismatched args/envs keys, a missing program: same exception, same message."""
    cases = [
        ("hello", w.hello, {0: ("a",), 1: ("b",)}, {0: {}}),
        ("hello", w.hello, {0: ("a",)}, {0: {}, 2: {}}),
        ("echo", "echo", {1: ("a",)}, {1: {}}),
        ("missing", "fastspawn-no-such-program", {0: ("a",)}, {0: {}}),
        ("missing", str(tmp_path / "no-such-dir" / "program"), {0: ("a",)}, {0: {}}),
    ]
    for name, entrypoint, args, envs in cases:
        seen = []
        for lib in (TORCH, FASTSPAWN):
            logs = lib.mod.DefaultLogsSpecs(log_dir=str(tmp_path / lib.tag / name))
            with pytest.raises(Exception) as info:
                lib.mod.start_processes(name, entrypoint, args, envs, logs)
            seen.append((type(info.value), str(info.value)))
        assert seen[1] == seen[0], name


@needs_torch
def test_std_and_to_map_same_as_torch():
    for text in ["0", "1", "2", "3", "0:3,1:0,2:1,3:2", "4:1", "0:3"]:
        assert fe.Std.from_str(text) == te.Std.from_str(text)
    for text in ["4", "", "0:4", "0:1,", "a", "0:1;1:2", "-1"]:
        for lib in (te, fe):
            with pytest.raises(ValueError, match="does not match"):
                lib.Std.from_str(text)
    for value in [fe.Std.ALL, {1: fe.Std.OUT}, {0: fe.Std.ERR, 1: fe.Std.ALL}]:
        assert fe.to_map(value, 3) == te.to_map(_as_std(te.Std, value), 3)
    assert [int(s) for s in fe.Std] == [int(s) for s in te.Std]
    assert fe.to_map(te.Std.ERR, 2) == {0: fe.Std.ERR, 1: fe.Std.ERR}  # torch's values work too


@needs_torch
def test_logs_specs_same_as_torch(tmp_path):
    """The log layout, env updates and validation of DefaultLogsSpecs, without processes."""
    S = fe.Std
    specs = [
        dict(),
        dict(redirects=S.ALL),
        dict(redirects={0: S.OUT, 2: S.ERR}, tee={1: S.ALL}),
        dict(tee=S.OUT, local_ranks_filter={0, 2}),
        dict(redirects=S.ERR, tee={2: S.OUT}, local_ranks_filter={2}),
    ]
    for index, spec in enumerate(specs):
        seen = []
        for lib in (te, fe):
            root = str(tmp_path / lib.__name__ / str(index))
            logs = lib.DefaultLogsSpecs(log_dir=root, **{k: _as_std(lib.Std, v) for k, v in spec.items()})
            envs = {r: {"TORCHELASTIC_RUN_ID": "job", "TORCHELASTIC_RESTART_COUNT": "2"} for r in range(3)}
            first = logs.reify(envs)
            again = logs.reify({r: dict(env) for r, env in envs.items()})  # same attempt: emptied, same dir
            run_dir = logs._run_log_dir
            assert os.path.basename(run_dir).startswith("job_")
            dest = {k: json.loads(json.dumps(v).replace(run_dir, "<run>")) for k, v in vars(first).items()}
            seen.append((dest, json.loads(json.dumps(envs).replace(run_dir, "<run>")), vars(again) == vars(first),
                         repr(logs).replace(root, "<root>"), sorted(os.listdir(run_dir))))
        assert seen[1] == seen[0], spec
    for lib in (te, fe):
        discard = lib.DefaultLogsSpecs(log_dir=os.devnull, redirects=lib.Std.ALL, tee=lib.Std.ERR)
        envs = {0: {}, 1: {}}
        seen.append((vars(discard.reify(envs)), envs, discard.root_log_dir))
        (tmp_path / "file").write_text("")
        with pytest.raises(NotADirectoryError, match="is a file"):
            lib.DefaultLogsSpecs(log_dir=str(tmp_path / "file"))
        made = tmp_path / lib.__name__ / "made" / "here"
        lib.DefaultLogsSpecs(log_dir=str(made))
        assert made.is_dir()
        assert lib.DefaultLogsSpecs(log_dir="x", tee=lib.Std.ALL) == lib.DefaultLogsSpecs(log_dir="x", tee=lib.Std.ALL)
        assert lib.DefaultLogsSpecs(log_dir="x", tee=lib.Std.ALL) != lib.DefaultLogsSpecs(log_dir="x")
    assert seen[-1] == seen[-2]
    os.rmdir("x")


@needs_torch
def test_error_files_interchangeable(tmp_path, monkeypatch):
    """@record of either library writes what the other's ProcessFailure reads, and the
    ChildFailedError reports, first-failure choice and copied error files are the same."""
    written = {}
    for lib in (TORCH, FASTSPAWN):
        path = tmp_path / f"{lib.tag}.json"
        monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(path))
        with pytest.raises(ValueError):
            lib.errors.record(w.fail)("recorded")
        written[lib.tag] = json.loads(path.read_text())
    assert _error_data(written["torch"]) == _error_data(written["fastspawn"])
    assert written["torch"]["message"]["message"] == "ValueError: recorded"

    flat = tmp_path / "flat.json"
    flat.write_text(json.dumps({"message": "flat layout", "timestamp": 1700000000}))
    reports = []
    for reader in (TORCH, FASTSPAWN):
        failures = {}
        for rank, (source, exitcode) in enumerate(
            [("torch", 1), ("fastspawn", 1), ("flat", 2), ("missing", -9), ("missing", 7)]
        ):
            failure = reader.errors.ProcessFailure(
                local_rank=rank, pid=1000 + rank, exitcode=exitcode, error_file=str(tmp_path / f"{source}.json")
            )
            failure.timestamp = {0: 1700000002, 1: 1700000001}.get(rank, 1700000003)
            failures[10 + rank] = failure
        error = reader.errors.ChildFailedError("trainer", failures)
        reports.append(
            (
                str(error),
                error.format_msg("#", "~"),
                error.get_first_failure()[0],
                [(f.message, f.error_file, _file_data(f), f.signal_name(), f.timestamp_isoformat())
                 for f in failures.values()],
            )
        )
        # a launcher decorated with @record copies the first child failure into its own file
        own = tmp_path / f"own-{reader.tag}.json"
        monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(own))

        def launcher():
            raise error

        with pytest.raises(reader.errors.ChildFailedError):
            reader.errors.record(launcher)()
        reports.append(json.loads(own.read_text()))
    assert reports[2] == reports[0]
    assert reports[3] == reports[1]
    assert reports[1]["message"]["errorCode"] == 1
    assert "Root Cause (first observed failure)" in reports[0][0] and reports[0][2] == 11


def test_record_without_error_file_and_exit_codes(monkeypatch, tmp_path):
    monkeypatch.delenv("TORCHELASTIC_ERROR_FILE", raising=False)
    with pytest.raises(ValueError):
        fe_errors.record(w.fail)("nowhere")  # nothing to write to: just re-raised

    @fe_errors.record
    def exits(code):
        sys.exit(code)

    assert exits(0) is None  # SystemExit(0) is a normal end
    with pytest.raises(SystemExit):
        exits(2)
    with pytest.raises(AssertionError):
        fe_errors.ChildFailedError("empty", {})
    path = tmp_path / "custom.json"

    class Handler(fe_errors.ErrorHandler):
        def _get_error_file_path(self):
            return str(path)

    with pytest.raises(ValueError):
        fe_errors.record(w.fail, Handler())("custom")
    assert json.loads(path.read_text())["message"]["message"] == "ValueError: custom"


def test_error_handler_module_path_as_in_torch(tmp_path, monkeypatch):
    """``errors.error_handler.ErrorHandler`` exists where torch has it, is the same class as
    ``errors.ErrorHandler``, and writes the error file named by TORCHELASTIC_ERROR_FILE."""
    from fastspawn.elastic.errors import error_handler

    assert error_handler.ErrorHandler is fe_errors.ErrorHandler
    if te is not None:
        from torch.distributed.elastic.multiprocessing.errors import error_handler as theirs

        assert hasattr(theirs, "ErrorHandler")
    path = tmp_path / "error.json"
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(path))
    handler = error_handler.ErrorHandler()
    try:
        raise KeyError("lost")
    except KeyError as exc:
        handler.record_exception(exc)
    assert json.loads(path.read_text())["message"]["message"] == "KeyError: 'lost'"


# ------------------------------------------------------------------ the improvements
def _start(entrypoint, args, envs=None, prefixes=None, **spec):
    logs = fe.DefaultLogsSpecs(**spec)
    return fe.start_processes("trainer", entrypoint, args, envs or {rank: {} for rank in args}, logs, prefixes)


def test_improvement_wait_returns_when_the_outcome_is_known():
    """torch sleeps ``period`` between polls; fastspawn waits on the exits themselves."""
    release = multiprocessing.get_context("spawn").Event()
    ctx = _start(w.wait_for, {0: (release,), 1: (release,)})
    poll = ctx._poll

    def poll_then_release():
        result = poll()
        if result is None:
            release.set()  # the ranks end right after the first look
        return result

    assert ctx.wait(timeout=0.01) is None  # still running at the timeout
    ctx._poll = poll_then_release
    result = ctx.wait(timeout=-1, period=3600)  # a polling wait would sleep an hour here
    assert result is not None and not result.is_failed()
    assert result.return_values == ctx.pids()
    assert ctx.wait(timeout=0) is result


def test_improvement_every_failed_rank_reported(tmp_path):
    """Two ranks fail: torch reports one of them, fastspawn both (in the order they ended)."""
    # (torch's function ranks that succeed stay alive until all are done: none here)
    args = {0: ("fail", "first"), 1: ("exit_with", 5)}
    libs = [FASTSPAWN] + ([TORCH] if te is not None else [])
    for lib in libs:
        logs = lib.mod.DefaultLogsSpecs(log_dir=str(tmp_path / lib.tag))
        ctx = lib.mod.start_processes("t", w.act, args, {r: {} for r in args}, logs, start_method=lib.method)
        _exited(list(ctx.pids().values()))
        result = ctx.wait(period=0.02)
        if lib is TORCH:
            assert len(result.failures) == 1
        else:
            assert sorted(result.failures) == [0, 1]
            assert result.failures[0].message["message"] == "ValueError: first"
            assert result.failures[1].exitcode == 5 and result.failures[1].error_file == "<N/A>"


def test_improvement_stopped_ranks_not_blamed(tmp_path):
    """A program fails; the rank still running is stopped: torch's binary path lists it as
    a failure (exit -15), fastspawn only the rank that failed."""
    args = {0: ("-c", "import sys; sys.exit(3)"), 1: ("-c", "import time; time.sleep(3600)")}
    libs = [FASTSPAWN] + ([TORCH] if te is not None else [])
    for lib in libs:
        logs = lib.mod.DefaultLogsSpecs(log_dir=str(tmp_path / lib.tag))
        ctx = lib.mod.start_processes("t", sys.executable, args, {0: {}, 1: {}}, logs)
        result = ctx.wait(period=0.02)
        codes = {rank: f.exitcode for rank, f in result.failures.items()}
        assert codes == ({0: 3, 1: -15} if lib is TORCH else {0: 3})


def test_improvement_user_close_then_wait_reports_all_ranks():
    """Ranks stopped by the caller's close() did fail (torch's function path names one)."""
    ctx = _start(w.wait_forever, {0: (), 1: ()})
    ctx.close()
    result = ctx.wait()
    assert {rank: f.exitcode for rank, f in result.failures.items()} == {0: -15, 1: -15}


def test_improvement_teed_lines_are_whole(capfd):
    """Ranks write each line in three flushed pieces at the same time: every console line is
    one rank's whole line behind that rank's prefix, and the log files hold the raw bytes."""
    count = 300
    ctx = _start(w.fragments, {rank: (f"rank{rank}", count) for rank in range(3)}, tee=fe.Std.OUT,
                 prefixes={2: "<two>"})
    result = ctx.wait()
    assert not result.is_failed()
    out = capfd.readouterr().out.splitlines()
    assert len(out) == 3 * count
    for rank, prefix in enumerate(["[trainer0]:", "[trainer1]:", "<two>"]):
        mine = [line for line in out if line.startswith(prefix)]
        assert mine == [f"{prefix}rank{rank} line {i:04d} end" for i in range(count)]
        with open(result.stdouts[rank]) as src:
            assert src.read() == "".join(f"rank{rank} line {i:04d} end\n" for i in range(count))


def test_improvement_partial_last_line_and_filters(capfd, tmp_path):
    """A last line without newline is still a whole console line; filtered duplicates."""
    code = "import sys; sys.stdout.write('keep this\\ndrop that\\nno newline, keep'); sys.stderr.write('e keep\\n')"
    logs = fe.DefaultLogsSpecs(log_dir=str(tmp_path), tee=fe.Std.ALL)
    ctx = fe.start_processes("bin", sys.executable, {0: ("-c", code)}, {0: {}}, logs,
                             duplicate_stdout_filters=["keep"], duplicate_stderr_filters=["keep"])
    assert not ctx.wait().is_failed()
    captured = capfd.readouterr()
    assert captured.out == "[bin0]:keep this\n[bin0]:drop that\n[bin0]:no newline, keep\n"
    attempt = os.path.join(logs._run_log_dir, "attempt_0")
    with open(os.path.join(attempt, "filtered_stdout.log")) as src:
        assert src.read() == "[bin0]:keep this\n[bin0]:no newline, keep\n"
    with open(os.path.join(attempt, "filtered_stderr.log")) as src:
        assert src.read() == "[bin0]:e keep\n"


@pytest.mark.parametrize("method", ["spawn", "forkserver", "fork"])
def test_improvement_env_in_place_before_the_call_loads(method, tmp_path):
    """A module the rank imports while loading its arguments already sees the rank's env;
    torch sets it only once the function is about to run."""
    assert "_elastic_envprobe" in sys.modules  # the parent imported it: fork children have it
    args = {0: (probe.Probe(),), 1: (probe.Probe(),)}
    envs = {0: {w.ENV: "zero"}, 1: {w.ENV: "one"}}
    logs = fe.DefaultLogsSpecs(log_dir=str(tmp_path))
    ctx = fe.start_processes("t", w.probe_env, args, envs, logs, start_method=method)
    expected = {0: None, 1: None} if method == "fork" else {0: "zero", 1: "one"}
    assert ctx.wait().return_values == expected
    if te is not None and method == "spawn":  # (torch's spawned ranks import torch: slow)
        logs = te.DefaultLogsSpecs(log_dir=str(tmp_path / "torch"))
        ctx = te.start_processes("t", w.probe_env, {0: args[0]}, {0: envs[0]}, logs, start_method="spawn")
        assert ctx.wait(period=0.05).return_values == {0: None}


@pytest.mark.timeout(120, method="signal")  # teardown must run: it thaws the frozen rank
@pytest.mark.skipif(_workers.Freezer.missing() is not None, reason=str(_workers.Freezer.missing()))
def test_improvement_close_is_bounded(caplog):
    """A rank ignoring SIGTERM is killed after ``timeout``; one that cannot even die of
    SIGKILL (frozen: as a process stuck in the kernel) is logged and left to the engine's
    reaper instead of hanging close."""
    ready = multiprocessing.get_context("spawn").Event()
    caplog.set_level(logging.WARNING, logger="fastspawn")
    with _workers.Freezer() as freezer:
        ctx = _start(w.act, {0: ("ignore_term_then_wait", ready), 1: ("wait_forever",), 2: ("wait_forever",)})
        assert ready.wait(60)
        pid0, pid1, pid2 = (ctx.pids()[rank] for rank in range(3))
        freezer.freeze(pid2)
        run = ctx._pc._run
        ctx.close(timeout=0.2)
        messages = [r.getMessage() for r in caplog.records]
        term, kill = str(signal.SIGTERM), str(signal.SIGKILL)  # as torch logs them: %s, str() of the enum,
        # '15' from Python 3.11 on, 'Signals.SIGTERM' before
        for pid in (pid0, pid1, pid2):
            assert f"Closing process {pid} via signal SIGTERM" in messages
        for pid in (pid0, pid2):
            assert f"Unable to shutdown process {pid} via {term}, forcefully exiting via {kill}" in messages
        assert not any(f"Unable to shutdown process {pid1}" in m for m in messages)
        assert any(m.startswith(f"fastspawn: process {pid2} (rank 2) did not exit after SIGKILL (state ") for m in messages)
        assert any(m.startswith(f"Process {pid2} did not exit after SIGKILL within {fastspawn._core.KILL_WAIT}s") for m in messages)
        assert run.exitcodes == [-9, -15, -9]  # rank 2 will die of its SIGKILL once thawed
        assert fastspawn._core.child_running(pid2)
    deadline = time.monotonic() + 60  # thawed: it dies, and the engine's reaper reaps it
    while fastspawn._core.child_running(pid2) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not fastspawn._core.child_running(pid2)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("method", ["spawn", "fork"])
def test_improvement_interrupted_rank_is_a_failure(method, tmp_path):
    """A rank that ends by KeyboardInterrupt returned nothing: a failure (exit by SIGINT,
    traceback logged), where torch's function ranks end quietly with exit code 0."""
    logs = fe.DefaultLogsSpecs(log_dir=str(tmp_path))
    ctx = fe.start_processes("t", w.act, {0: ("interrupted",), 1: ("hello", "r1")}, {0: {}, 1: {}}, logs,
                             start_method=method)
    result = ctx.wait()
    assert result.is_failed() and list(result.failures) == [0]
    failure = result.failures[0]
    assert failure.exitcode == -signal.SIGINT and failure.signal_name() == "SIGINT"
    assert ctx._pc.error_traceback(0).endswith("KeyboardInterrupt\n")


@pytest.mark.timeout(60)
def test_error_files_are_written_atomically(tmp_path, monkeypatch):
    """An error file is written whole to a temporary file beside it, then renamed over it:
    a rank killed while writing leaves no half-written file for the launcher to misread."""
    target = tmp_path / "error.json"
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(target))
    renames = []
    real_replace = os.replace

    def replace(src, dst):
        with open(src) as fh:
            renames.append((os.path.dirname(src), os.path.exists(dst), json.load(fh), dst))
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    handler = fe_errors.get_error_handler()
    try:
        raise ValueError("recorded")
    except ValueError as exc:
        handler.record_exception(exc)
    assert len(renames) == 1
    directory, existed, data, dst = renames[0]
    assert (directory, existed, dst) == (str(tmp_path), False, str(target))
    assert data["message"]["message"] == "ValueError: recorded"
    with open(target) as fh:
        assert json.load(fh) == data
    child = tmp_path / "child.json"  # a launcher copying its child's error file: same way
    child.write_text(json.dumps({"message": "flat", "timestamp": 1}))
    handler.dump_error_file(str(child))
    assert [(d, existed_before) for d, existed_before, _, _ in renames[1:]] == [(str(tmp_path), False)]
    assert json.loads(target.read_text()) == {"message": "flat", "timestamp": 1}
    assert sorted(os.listdir(tmp_path)) == ["child.json", "error.json"]


def test_improvement_temporary_log_dir_removed():
    """torch leaves each temporary log dir behind; fastspawn removes it once nothing uses it."""
    ctx = _start(w.act, {0: ("hello", "r0")}, redirects=fe.Std.OUT)
    result = ctx.wait()
    root = ctx._logs_specs.root_log_dir
    del ctx
    gc.collect()
    with open(result.stdouts[0]) as src:  # the result keeps the logs readable
        assert src.read() == "out r0\n"
    del result
    gc.collect()
    assert not os.path.exists(root)


def test_named_log_dir_kept(tmp_path):
    ctx = _start(w.act, {0: ("hello", "r0")}, log_dir=str(tmp_path / "logs"), redirects=fe.Std.OUT)
    path = ctx.wait().stdouts[0]
    del ctx
    gc.collect()
    with open(path) as src:
        assert src.read() == "out r0\n"


def test_improvement_std_ranks_above_nine():
    """torch's Std.from_str takes one-digit ranks only."""
    assert fe.Std.from_str("10:3,11:1,2:2") == {10: fe.Std.ALL, 11: fe.Std.OUT, 2: fe.Std.ERR}
    if te is not None:
        with pytest.raises(ValueError):
            te.Std.from_str("10:3")
    logs = fe.DefaultLogsSpecs(log_dir=os.devnull, redirects=fe.Std.from_str("11:1"))
    dest = fe.DefaultLogsSpecs(redirects=fe.Std.from_str("11:1")).reify({r: {} for r in range(12)})
    assert dest.stdouts[11].endswith("/attempt_0/11/stdout.log")
    assert [r for r, path in dest.stdouts.items() if path] == [11]
    assert logs.root_log_dir == os.devnull


def test_return_values_through_the_result_channel():
    size = 8 << 20
    ctx = _start(w.act, {0: ("big", size), 1: ("big", 1)})
    result = ctx.wait()
    assert result.return_values == {0: b"x" * size, 1: b"x"}


def test_signal_interrupts_wait_and_close_stops_ranks():
    """start() installs handlers (as torch): a SIGTERM during wait raises SignalException."""
    ctx = _start(w.wait_forever, {0: (), 1: ()})
    main = threading.get_ident()
    timer = threading.Timer(0.2, signal.pthread_kill, (main, signal.SIGTERM))
    timer.start()
    try:
        with pytest.raises(fe.SignalException) as info:
            ctx.wait()
    finally:
        timer.cancel()
    assert info.value.sigval == signal.SIGTERM
    assert str(info.value) == f"Process {os.getpid()} got signal: {signal.SIGTERM}"
    ctx.close(info.value.sigval)
    assert ctx._pc._run.exitcodes == [-15, -15]


def test_argument_checks(tmp_path):
    logs = fe.DefaultLogsSpecs(log_dir=str(tmp_path))
    with pytest.raises(ValueError, match="numa_options"):
        fe.start_processes("t", w.hello, {0: ("a",)}, {0: {}}, logs, numa_options=object())
    context = fe.api.SubprocessContext("t", "echo", {0: ("a",)}, {0: {}}, logs)
    assert context.pids() == {}
    with pytest.raises(AssertionError):
        fe.api.MultiprocessContext("t", w.hello, {0: ("a",)}, {0: {}}, "spawn", logs).pids()
    context.close()  # never started: nothing to do
    empty = fe.start_processes("t", w.hello, {}, {}, logs)
    assert empty.wait() == fe.RunProcsResult(return_values={}, stdouts={}, stderrs={})


# ------------------------------------------------------------------ fastspawn.run
def test_run_returns_values_by_rank():
    assert fastspawn.run(pow, 4, (2,)) == [0, 1, 4, 9]
    envs = [{w.ENV: f"env{i}"} for i in range(2)]
    assert fastspawn.run(w.env_of, 2, envs=envs) == ["env0", "env1"]
    assert fastspawn.run(pow, 0, (2,)) == []


def test_run_raises_like_spawn():
    with pytest.raises(fastspawn.ProcessRaisedException, match="ValueError: broken") as info:
        fastspawn.run(w.fail_rank, 2, ("broken",))
    assert info.value.error_index == 1
    with pytest.raises(fastspawn.ProcessExitedException, match="terminated with exit code 4") as exited:
        fastspawn.run(w.exit_rank, 1, (4,), start_method="fork")
    assert exited.value.exit_code == 4


def test_output_reader_leaves_signals_to_the_main_thread():
    """A SIGTERM/SIGINT sent to the launcher must interrupt its wait in the main thread: the
    thread that reads teed output blocks them (the kernel picks a thread that does not)."""
    ctx = _start(w.wait_forever, {0: ()}, tee=fe.Std.ALL)
    try:
        thread = ctx._streams._thread
        with open(f"/proc/self/task/{thread.native_id}/status") as src:
            blocked = int(next(line for line in src if line.startswith("SigBlk:")).split()[1], 16)
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD):
            assert blocked & (1 << (sig - 1)), sig
        assert not blocked & (1 << (signal.SIGSEGV - 1))
        assert signal.SIGTERM not in signal.pthread_sigmask(signal.SIG_BLOCK, [])  # ours unchanged
    finally:
        ctx.close()


def test_failed_start_leaves_nothing_open(tmp_path):
    """A program that cannot start: the error is raised, no fd or reader thread is left."""
    fds, threads = set(os.listdir("/proc/self/fd")), threading.active_count()
    logs = fe.DefaultLogsSpecs(log_dir=str(tmp_path), redirects={0: fe.Std.OUT}, tee={1: fe.Std.ALL})
    with pytest.raises(FileNotFoundError):
        fe.start_processes("t", "fastspawn-no-such-program", {0: (), 1: ()}, {0: {}, 1: {}}, logs)
    extra = {fd: os.readlink(f"/proc/self/fd/{fd}") for fd in set(os.listdir("/proc/self/fd")) - fds if os.path.exists(f"/proc/self/fd/{fd}")}
    assert extra == {} and threading.active_count() == threads


def test_forgotten_context_leaves_no_fds(monkeypatch, caplog):
    """Ranks end, the caller never waits or closes: the reader closes the pipes and log
    files at end of output, the rest goes with the context. A console that fails is
    reported once; the log files still get everything."""
    broken = io.StringIO()
    broken.close()
    fastspawn.warmup()  # the zygote's own fds are not the context's,
    resource_tracker.ensure_running()  # nor multiprocessing's tracker's (started on first use)
    monkeypatch.setattr(sys, "stdout", broken)
    fds = set(os.listdir("/proc/self/fd"))
    ctx = _start(w.fragments, {0: ("r0", 50), 1: ("r1", 50)}, tee=fe.Std.OUT)
    monkeypatch.undo()
    thread, paths = ctx._streams._thread, ctx.stdouts
    thread.join(60)
    assert not thread.is_alive()
    warnings = [r.getMessage() for r in caplog.records if "any more" in r.getMessage()]
    # A record holding the exception would keep the reader (and its wake pipe) alive.
    assert not [a for r in caplog.records for a in (r.args or ()) if isinstance(a, BaseException)]
    assert sorted(warnings) == [
        f"cannot write [trainer{rank}]: output to its console any more: I/O operation on closed file"
        for rank in (0, 1)
    ]
    for rank in (0, 1):
        with open(paths[rank]) as src:
            assert src.read().count(f"r{rank} line") == 50
    ctx._pc._run.wait_all(None)
    del ctx
    gc.collect()
    extra = {fd: os.readlink(f"/proc/self/fd/{fd}") for fd in set(os.listdir("/proc/self/fd")) - fds if os.path.exists(f"/proc/self/fd/{fd}")}
    assert extra == {}


@pytest.mark.timeout(30)
def test_failure_with_unknown_exit_status_says_so():
    failure = fe.ProcessFailure(local_rank=0, pid=123, exitcode=fastspawn.UnknownExitStatus(), error_file="")
    assert failure.message == (
        "Process 123 ended, but its exit status was collected by another process (SIGCHLD ignored, "
        "or a waitpid(-1) loop) and it reported none"
    )
    assert failure.signal_name() == "<N/A>"
