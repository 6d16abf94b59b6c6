"""Driver of test_faults.py: ``python _fault_driver.py SCENARIO OUT_DIR [ARGS...]``.

Each scenario injects one fault into fastspawn's public API inside this process (so the
fault cannot hurt pytest), and reports what happened as JSON files in OUT_DIR (written
atomically: the test polls for them). A watchdog (faulthandler) ends this process with
every thread's stack on stderr when a call hangs past its deadline.

This file is also the ranks' main module (``__mp_main__``): only definitions at top level.
"""

from __future__ import annotations

import faulthandler
import os
import random
import signal
import subprocess
import sys
import threading
import time
import traceback

import _faultkit as kit

SETTLE = 5.0  # seconds a driver polls for what a call started to be gone
CALL_DEADLINE = 45.0  # seconds one call may take before the watchdog calls it a hang

# A program that leaves a second process in its process group, then becomes `sleep`.
SH_TREE = 'sleep 300 & echo "$$ $!" > "{out}/tree.$$.tmp" && mv "{out}/tree.$$.tmp" "{out}/tree.$$"; exec sleep 300'

# What a rank's child runs: the fds it has open (the listing's own fd is closed again).
FD_PROBE = """\
import json, os, sys
fds = sorted(int(name) for name in os.listdir('/proc/self/fd'))
found = {}
for fd in fds:
    try:
        os.fstat(fd)
    except OSError:
        continue
    try:
        found[fd] = os.readlink('/proc/self/fd/%d' % fd)
    except OSError:
        found[fd] = '?'
with open(sys.argv[1] + '.tmp', 'w') as f:
    json.dump(found, f)
os.replace(sys.argv[1] + '.tmp', sys.argv[1])
"""


# ------------------------------------------------------------------------- ranks
def noop(rank):
    pass


def sleeper(rank, seconds):
    time.sleep(seconds)


def fail_one(rank):
    if rank == 1:
        raise ValueError("fault-marker: rank 1 fails on purpose")


def square(rank):
    return rank * rank


def interrupted_one(rank):
    if rank == 1:
        raise KeyboardInterrupt
    return rank


def _explode():
    raise ValueError("fault-marker: this value cannot be unpickled")


class Unloadable:
    """Pickles fine; unpickling it (in the parent) raises."""

    def __reduce__(self):
        return (_explode, ())


def unloadable_one(rank):
    return Unloadable() if rank == 1 else rank


def exit_one(rank, code):
    if rank == 1:
        sys.exit(code)


def frozen_pair(rank, out):
    """Rank 1 waits to be frozen; rank 0 fails once the test has frozen rank 1."""
    if rank == 1:
        kit.write_json(os.path.join(out, "rank1.json"), {"pid": os.getpid()})
        time.sleep(600)
    else:
        if not kit.wait_file(os.path.join(out, "go"), 120):
            raise TimeoutError("never told to fail")
        raise ValueError("fault-marker: rank 0 fails while rank 1 is frozen")


def frozen_idle(rank, out):
    if rank == 1:
        kit.write_json(os.path.join(out, "rank1.json"), {"pid": os.getpid()})
    time.sleep(600)


def fd_probe(rank, out):
    sub = os.path.join(out, f"fds.subprocess.{rank}.json")
    system = os.path.join(out, f"fds.system.{rank}.json")
    subprocess.run([sys.executable, "-c", FD_PROBE, sub], close_fds=False, check=True, timeout=60)
    import shlex

    status = os.system(f"{shlex.quote(sys.executable)} -c {shlex.quote(FD_PROBE)} {shlex.quote(system)}")
    if status != 0:
        raise RuntimeError(f"os.system exited with status {status}")


def robust_probe(rank, out):
    import ctypes
    import platform

    number = {"x86_64": 274, "aarch64": 100}[platform.machine()]  # SYS_get_robust_list
    libc = ctypes.CDLL(None, use_errno=True)
    head = ctypes.c_void_p()
    size = ctypes.c_size_t()
    ret = libc.syscall(ctypes.c_long(number), ctypes.c_long(0), ctypes.byref(head), ctypes.byref(size))
    kit.write_json(
        os.path.join(out, f"robust.{rank}.json"),
        {"ret": ret, "errno": ctypes.get_errno(), "head": head.value or 0, "size": size.value},
    )


def tree_rank(rank, out):
    """A rank with a child of its own (in its process group); reports both pids."""
    child = subprocess.Popen(["sleep", "300"])
    kit.write_text(os.path.join(out, f"tree.{os.getpid()}"), f"{os.getpid()} {child.pid}")
    time.sleep(300)


def elastic_tree(out):
    tree_rank(0, out)


# ------------------------------------------------------------------------ helpers
def call(fn, nprocs, path, args=(), join=True):
    """fn through the public API by the engine path under test."""
    import fastspawn

    if path == "fork":
        return fastspawn.start_processes(fn, args=args, nprocs=nprocs, join=join, start_method="fork")
    return fastspawn.start_processes(fn, args=args, nprocs=nprocs, join=join, zygote=(path == "zygote"))


def zygote_pid():
    from fastspawn import _api

    zygotes = getattr(_api, "_zygotes", None)
    current = getattr(zygotes, "current", None)
    return int(current.pid) if current is not None else 0


def zygotes():
    """Our live zygote processes, whichever call started them: children running the
    zygote's bootstrap. Its ranks, forks of it, run the same command line but start
    later; retired zygotes are gone before a new one starts."""
    me = os.getpid()
    return [pid for pid in kit.children(me)
            if "fastspawn._zygote" in kit.cmdline(pid) and (kit.stat(pid) or kit.Stat("Z", 0, 0, 0)).state != "Z"]


def the_zygote():
    """The zygote itself, not one of its forks: the first started of ``zygotes()``."""
    found = [(kit.stat(pid), pid) for pid in zygotes()]
    found = [(st.start, pid) for st, pid in found if st is not None]
    return min(found)[1] if found else 0


def tracker_pid():
    from multiprocessing import resource_tracker

    return getattr(resource_tracker._resource_tracker, "_pid", None) or 0


def keep():
    """Processes of ours that outlive a call on purpose: the current zygote (the live one,
    should the private handle on it have moved) and the resource tracker."""
    from fastspawn import _api

    known = hasattr(getattr(_api, "_zygotes", None), "current")
    return {zygote_pid() if known else the_zygote(), tracker_pid()} - {0}


def settle(seconds=SETTLE, until=None):
    """Poll for our leftovers to be gone; those still there (and then SIGKILLed, so that
    a failure does not poison the next trial)."""
    if until is not None:
        seconds = until - time.monotonic()
    left = kit.scan_until_empty(lambda: kit.leftovers(keep()), max(0.0, seconds), confirm=0.05)
    described = [kit.describe(pid) for pid in left]
    for pid in left:
        kit.kill_quietly(pid)
    mine = [pid for pid in left if (kit.stat(pid) or kit.Stat("", 0, 0, 0)).ppid == os.getpid()]
    kit.wait_until(lambda: all(_reaped(pid) for pid in mine), 2.0)  # reap our own
    return described


def _reaped(pid):
    try:
        return os.waitpid(pid, os.WNOHANG)[0] == pid
    except ChildProcessError:
        return True


def outcome(fn, *args, **kwargs):
    """Run one call under the watchdog; what it did, as JSON-able data."""
    faulthandler.dump_traceback_later(CALL_DEADLINE, exit=True)
    start = time.monotonic()
    try:
        value = fn(*args, **kwargs)
        result = {"outcome": "returned", "value": repr(value)}
    except BaseException as exc:  # noqa: BLE001 - reported, judged by the test
        chain = []
        cause = exc
        while cause is not None and len(chain) < 5:
            chain.append(f"{type(cause).__name__}: {cause}")
            cause = cause.__cause__ or cause.__context__
        result = {
            "outcome": "raised",
            "type": type(exc).__name__,
            "mro": [c.__name__ for c in type(exc).__mro__],
            "message": str(exc),
            "chain": chain,
            "errno": getattr(exc, "errno", None),
            "exit_code": getattr(exc, "exit_code", None),
            "error_index": getattr(exc, "error_index", None),
            "traceback": traceback.format_exc()[-4000:],
        }
    finally:
        faulthandler.cancel_dump_traceback_later()
    result["elapsed"] = time.monotonic() - start
    return result


def emit(out, name, **data):
    kit.write_json(os.path.join(out, f"{name}.json"), data)


def wait_for(out, name, seconds=120):
    if not kit.wait_file(os.path.join(out, name), seconds):
        raise SystemExit(f"driver: gave up waiting for {name}")


# ---------------------------------------------------------------------- scenarios
def scenario_sigint(out, trials, seed):
    """SIGINT at a random point of start_processes(nprocs=32, join=False) (or of the join
    right after it), ``trials`` times; 2 s after each interrupt nothing of it is left."""
    import fastspawn

    rng = random.Random(int(seed))
    timings = []
    for _ in range(2):  # cold (the zygote starts) and warm
        start = time.monotonic()
        ctx = fastspawn.start_processes(sleeper, args=(0,), nprocs=32, join=False)
        timings.append(time.monotonic() - start)
        faulthandler.dump_traceback_later(CALL_DEADLINE, exit=True)
        while not ctx.join():
            pass
        faulthandler.cancel_dump_traceback_later()
    span = max(timings)
    results = []
    for trial in range(int(trials)):
        delay = rng.uniform(0.0, span)
        fired = []

        def interrupt(fired=fired):
            fired.append(time.monotonic())
            os.kill(os.getpid(), signal.SIGINT)

        timer = threading.Timer(delay, interrupt)
        phase = "start"
        ctx = None
        faulthandler.dump_traceback_later(CALL_DEADLINE, exit=True)
        try:
            timer.start()
            ctx = fastspawn.start_processes(sleeper, args=(20,), nprocs=32, join=False)
            phase = "join"
            ctx.join()
            phase = "returned"  # the interrupt was swallowed
        except KeyboardInterrupt:
            pass
        caught = time.monotonic()
        timer.join()
        faulthandler.cancel_dump_traceback_later()
        pids = ctx.pids() if ctx is not None else []
        # Nothing of it 2 s after the interrupt (and at least the moment the call gave
        # control back: what outlives the call's return is left behind for good).
        left = settle(until=max(fired[0] + 2.0, caught + 0.2))
        results.append({
            "trial": trial, "delay": delay, "phase": phase, "pids": pids, "left": left,
            "returned_after": caught - fired[0],
        })
        emit(out, "sigint", span=span, timings=timings, seed=seed, trials=results)
    emit(out, "sigint", span=span, timings=timings, seed=seed, trials=results, done=True)


def scenario_frozen(out, api):
    """Rank 1 gets frozen by the test; then rank 0 fails (join) or the context is closed
    (elastic): bounded either way, and rank 1 reaped once thawed."""
    if api == "join":
        import fastspawn

        ctx = fastspawn.start_processes(frozen_pair, args=(out,), nprocs=2, join=False)
        pids = ctx.pids()
    else:
        from fastspawn import elastic

        logs = elastic.DefaultLogsSpecs(log_dir=os.path.join(out, "logs"))
        ctx = elastic.start_processes("fault", frozen_idle, {0: (0, out), 1: (1, out)}, {0: {}, 1: {}}, logs)
        pids = list(ctx.pids().values())
    emit(out, "started", pids=pids)
    wait_for(out, "frozen")
    if api == "join":
        kit.touch(os.path.join(out, "go"))

        def join():
            while not ctx.join(grace_period=1):
                pass

        result = outcome(join)
    else:
        result = outcome(ctx.close, timeout=1)
    emit(out, "result", **result)
    wait_for(out, "exit")


def scenario_fds(out, path):
    call(fd_probe, 1, path, args=(out,))
    emit(out, "done")


def scenario_robust(out, path):
    call(robust_probe, 2, path, args=(out,))
    emit(out, "done")


def scenario_pids(out, cgroup, headroom):
    """Fork failing part-way: this process (and so its zygote) in a pids cgroup whose
    pids.max leaves room for ``headroom`` more tasks than it has."""
    import fastspawn

    with open(os.path.join(cgroup, "cgroup.procs"), "w") as f:
        f.write(str(os.getpid()))
    fastspawn.spawn(noop, nprocs=2)  # the zygote and the resource tracker start in the cgroup
    with open(os.path.join(cgroup, "pids.current")) as f:
        current = int(f.read())
    with open(os.path.join(cgroup, "pids.max"), "w") as f:
        f.write(str(current + int(headroom)))
    first = outcome(fastspawn.spawn, sleeper, args=(2,), nprocs=16)
    with open(os.path.join(cgroup, "pids.events")) as f:
        events = f.read().strip()
    with open(os.path.join(cgroup, "pids.max"), "w") as f:
        f.write("max")
    left = settle()
    second = outcome(fastspawn.spawn, noop, nprocs=16)
    emit(out, "result", current=current, first=first, events=events, left=left, second=second, left_after=settle())


def scenario_cwd(out, path):
    import tempfile

    call(noop, 2, path)  # warm
    gone = tempfile.mkdtemp(dir=out)
    os.chdir(gone)
    os.rmdir(gone)
    first = outcome(call, noop, 2, path)
    left = settle()
    os.chdir(out)
    second = outcome(call, noop, 2, path)
    emit(out, "result", first=first, left=left, second=second, left_after=settle())


def scenario_emfile(out, where):
    """The call runs out of file descriptors: in the caller (RLIMIT_NOFILE lowered here)
    or in the zygote (its limit lowered through prlimit)."""
    import resource

    path = "zygote" if where in ("caller-zygote", "zygote") else where.replace("caller-", "")
    call(noop, 2, path)  # warm: zygote and tracker running
    limits = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = zygote_pid() if where == "zygote" else 0
    if where == "zygote" and not target:
        raise SystemExit("driver: no zygote to limit")
    opened = len(os.listdir(f"/proc/{target or os.getpid()}/fd"))
    low = opened + (8 if where == "zygote" else 12)
    if where == "zygote":
        target_limits = resource.prlimit(target, resource.RLIMIT_NOFILE)
        resource.prlimit(target, resource.RLIMIT_NOFILE, (low, target_limits[1]))
        first = outcome(call, noop, 16, path)
        try:
            resource.prlimit(target, resource.RLIMIT_NOFILE, target_limits)
        except ProcessLookupError:
            pass  # that zygote was retired
    else:
        resource.setrlimit(resource.RLIMIT_NOFILE, (low, limits[1]))
        try:
            first = outcome(call, noop, 16, path)
        finally:
            resource.setrlimit(resource.RLIMIT_NOFILE, limits)
    left = settle()
    second = outcome(call, noop, 16, path)
    emit(out, "result", opened=opened, low=low, first=first, left=left, second=second, left_after=settle())


def kill_zygote():
    pid = the_zygote()
    if pid:
        kit.kill_quietly(pid)


def kill_command_line():
    """As `pkill -9 -f fastspawn._zygote` among our children: the zygote and its forks
    that have not run anything else yet (ranks just forked, not yet announced)."""
    for pid in zygotes():
        kit.kill_quietly(pid)


KILLERS = {"zygote": kill_zygote, "command-line": kill_command_line}


def scenario_zygote_kill(out, victims, trials, seed):
    """The zygote (``victims`` "zygote"), or every process running its command line
    ("command-line"), SIGKILLed at a random point of a 16-rank call, ``trials`` times:
    half of the calls start a new zygote (the preload list changed), so that the kill
    also lands in its start-up; the others use a warm one."""
    import fastspawn

    rng = random.Random(int(seed))
    preloads = (["json"], ["json", "decimal"])
    spans = []
    for cold in (True, False):
        if cold:
            fastspawn.preload(preloads[1])
        start = time.monotonic()
        fastspawn.spawn(noop, nprocs=16)
        spans.append(time.monotonic() - start)
    results = []
    for trial in range(int(trials)):
        cold = trial % 2 == 0
        if cold:
            fastspawn.preload(preloads[trial // 2 % 2])  # a new zygote starts within the call
        else:
            fastspawn.warmup()  # a live zygote (a fresh one after the last trial killed it)
        delay = rng.uniform(0.0, spans[0] if cold else spans[1])
        timer = threading.Timer(delay, KILLERS[victims])
        timer.start()
        result = outcome(fastspawn.spawn, noop, nprocs=16)
        timer.join()
        result.update(trial=trial, cold=cold, delay=delay, left=settle())
        results.append(result)
        emit(out, "zygote_kill", spans=spans, seed=seed, trials=results)
    final = outcome(fastspawn.spawn, noop, nprocs=4)
    emit(out, "zygote_kill", spans=spans, seed=seed, trials=results, final=final, left=settle(), done=True)


def scenario_reaper(out, variant, path):
    """Someone else reaps our children: SIGCHLD ignored, or a waitpid(-1) thread."""
    stop = threading.Event()
    if variant == "sigign":
        signal.signal(signal.SIGCHLD, signal.SIG_IGN)
    else:
        def reap():
            while not stop.is_set():
                try:
                    os.waitpid(-1, 0)
                except ChildProcessError:
                    stop.wait(0.01)

        threading.Thread(target=reap, daemon=True).start()
    import fastspawn

    results = {
        "ok": outcome(call, noop, 2, path),
        "run": outcome(fastspawn.run, square, 2, **run_path(path)),
        "raise": outcome(call, fail_one, 2, path),
        "exit": outcome(call, exit_one, 2, path, args=(3,)),
    }
    stop.set()
    emit(out, "result", left=settle(), **results)


def run_path(path):
    """fastspawn.run's keywords for an engine path."""
    return {"start_method": "fork"} if path == "fork" else {"zygote": path == "zygote"}


def scenario_silent(out, path):
    """No silent loss: a rank interrupted before returning, a return value that cannot
    be unpickled (fastspawn.run)."""
    import fastspawn

    emit(out, "result",
         interrupted=outcome(fastspawn.run, interrupted_one, 2, **run_path(path)),
         unloadable=outcome(fastspawn.run, unloadable_one, 2, **run_path(path)),
         left=settle())


def scenario_ranks(out, path):
    """Python ranks with a child each, then wait: the test SIGKILLs this process."""
    ctx = call(tree_rank, 2, path, args=(out,), join=False)
    emit(out, "started", pids=ctx.pids(), zygote=zygote_pid())
    ctx.join()


def scenario_elastic(out, kind):
    """fastspawn.elastic ranks (programs or functions) with a child each, then wait: the
    test SIGKILLs this process."""
    from fastspawn import elastic

    logs = elastic.DefaultLogsSpecs(log_dir=os.path.join(out, "logs"))
    if kind == "program":
        args = {i: ("-c", SH_TREE.format(out=out)) for i in range(2)}
        ctx = elastic.start_processes("fault", "/bin/sh", args, {0: {}, 1: {}}, logs)
    else:
        ctx = elastic.start_processes("fault", elastic_tree, {0: (out,), 1: (out,)}, {0: {}, 1: {}}, logs)
    emit(out, "started", pids=list(ctx.pids().values()), zygote=zygote_pid())
    ctx.wait()


SCENARIOS = {name[len("scenario_"):]: fn for name, fn in list(globals().items()) if name.startswith("scenario_")}


if __name__ == "__main__":
    faulthandler.enable()
    SCENARIOS[sys.argv[1]](*sys.argv[2:])
