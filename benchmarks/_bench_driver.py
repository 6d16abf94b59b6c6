"""Driver side of benchmarks/spawn_bench.py: time one contender inside one process.

The driver *processes* are ``_driver_plain.py`` (a main module importing nothing heavy)
and ``_driver_torch.py`` (a main module importing torch at top level). They only define
the trivial child function ``work`` and call :func:`driver_main`. Which main module the
driver runs under matters: spawn (and, on CPython 3.11, forkserver) children re-import
``__main__`` before they can run ``work``.

This module is imported by every spawn child too (the driver mains import it), so it
keeps its top-level imports to the standard library's cheapest.

The driver runs one untimed-for-the-table warm-up call with nprocs=1 (its time is
reported as the "cold call"), then timed calls at the requested nprocs until ``--target``
seconds of calls were made (at least one, at most ``--max-calls``), and prints one JSON
line on stdout.
"""

from __future__ import annotations

import os
import sys
import time

CONTENDERS = {
    # name: (library, start method)
    "fastspawn-spawn": ("fastspawn", "spawn"),
    "fastspawn-forkserver": ("fastspawn", "forkserver"),
    "fastspawn-fork": ("fastspawn", "fork"),
    "torch-spawn": ("torch", "spawn"),
    "torch-forkserver": ("torch", "forkserver"),
    # Same as torch-forkserver, run with TORCH_MP_PARALLEL_START=1 (set by the orchestrator).
    "torch-forkserver-parallel": ("torch", "forkserver"),
    "torch-fork": ("torch", "fork"),
    "mp-spawn": ("mp", "spawn"),
    "mp-fork": ("mp", "fork"),
    "raw-fork": ("raw", "fork"),
}


# ---------------------------------------------------------------------------------------
# Child functions other than the plain ``work`` (which lives in the driver's __main__).
# They are referenced by module name, so spawn children import them from here.


def fail_fast_work(i, stamp_dir):
    """Rank 0 raises at once (after stamping the time); the other ranks sleep 30 s."""
    if i == 0:
        with open(os.path.join(stamp_dir, "raise-0"), "w") as f:
            f.write(repr(time.time()))
        raise RuntimeError("spawn_bench: rank 0 fails on purpose")
    time.sleep(30)


def wakeup_work(i, stamp_dir):
    """Record the time just before returning (and so exiting), in a per-rank file."""
    with open(os.path.join(stamp_dir, f"exit-{i}"), "w") as f:
        f.write(repr(time.time()))


# ---------------------------------------------------------------------------------------
# Parent side.


def _runner(contender):
    """A function ``run(fn, args, nprocs)`` that starts and joins ``nprocs`` children."""
    lib, method = CONTENDERS[contender]
    if lib == "fastspawn":
        import fastspawn

        def run(fn, args, nprocs):
            fastspawn.start_processes(fn, args=args, nprocs=nprocs, join=True, start_method=method)

        return run
    if lib == "torch":
        import torch.multiprocessing as tmp

        def run(fn, args, nprocs):
            tmp.start_processes(fn, args=args, nprocs=nprocs, join=True, start_method=method)

        return run
    if lib == "mp":
        import multiprocessing

        ctx = multiprocessing.get_context(method)

        def run(fn, args, nprocs):
            procs = [ctx.Process(target=fn, args=(i, *args)) for i in range(nprocs)]
            for p in procs:
                p.start()
            for p in procs:
                p.join()
            bad = [p.exitcode for p in procs if p.exitcode != 0]
            if bad:
                raise RuntimeError(f"multiprocessing children failed: exit codes {bad}")

        return run
    if lib == "raw":

        def run(fn, args, nprocs):  # the floor: fork, exit at once, reap; fn is not run
            pids = []
            for _ in range(nprocs):
                pid = os.fork()
                if pid == 0:
                    os._exit(0)
                pids.append(pid)
            for pid in pids:
                _, status = os.waitpid(pid, 0)
                if status != 0:
                    raise RuntimeError(f"raw fork child failed: status {status}")

        return run
    raise ValueError(contender)


def _failure_types(contender):
    lib = CONTENDERS[contender][0]
    if lib == "fastspawn":
        import fastspawn

        return (fastspawn.ProcessRaisedException,)
    import torch.multiprocessing  # noqa: F401  (its ``spawn`` attribute is the function)

    return (sys.modules["torch.multiprocessing.spawn"].ProcessRaisedException,)


def _own_children():
    import psutil

    try:
        return {c.pid: c.status() for c in psutil.Process().children(recursive=True)}
    except psutil.Error:
        return {}


def _time_calls(one_call, target, max_calls):
    """Call ``one_call()`` (which returns a dict of measurements) until the time target."""
    samples = []
    begin = time.perf_counter()
    while True:
        samples.append(one_call())
        if len(samples) >= max_calls or time.perf_counter() - begin >= target:
            return samples


def driver_main(work):
    import argparse
    import json
    import shutil
    import tempfile

    ap = argparse.ArgumentParser()
    ap.add_argument("--kind", choices=("start", "failfast", "wakeup"), required=True)
    ap.add_argument("--contender", choices=sorted(CONTENDERS), required=True)
    ap.add_argument("--nprocs", type=int, required=True)
    ap.add_argument("--target", type=float, default=0.5, help="seconds of timed calls")
    ap.add_argument("--max-calls", type=int, default=50)
    opts = ap.parse_args()

    run = _runner(opts.contender)  # imports the library: part of the user's import, untimed
    stamp_dir = tempfile.mkdtemp(prefix="spawn_bench-")
    out = {"kind": opts.kind, "contender": opts.contender, "nprocs": opts.nprocs, "pid": os.getpid()}
    try:
        t0 = time.perf_counter()
        run(work, (), 1)  # cold call: starts forkservers, resource trackers, lazy imports
        out["cold_ms"] = (time.perf_counter() - t0) * 1e3

        if opts.kind == "start":

            def one_call():
                t = time.perf_counter()
                run(work, (), opts.nprocs)
                return {"ms": (time.perf_counter() - t) * 1e3}

        elif opts.kind == "failfast":
            failure_types = _failure_types(opts.contender)

            def one_call():
                stamp = os.path.join(stamp_dir, "raise-0")
                if os.path.exists(stamp):
                    os.unlink(stamp)
                before = set(_own_children())
                t = time.perf_counter()
                try:
                    run(fail_fast_work, (stamp_dir,), opts.nprocs)
                except failure_types:
                    ms = (time.perf_counter() - t) * 1e3
                    t_exc = time.time()
                else:
                    raise RuntimeError("fail-fast call returned without raising")
                with open(stamp) as f:
                    t_raise = float(f.read())
                left = {p: s for p, s in _own_children().items() if p not in before}
                return {"ms": ms, "detect_ms": (t_exc - t_raise) * 1e3, "leftover": len(left)}

        else:  # wakeup

            def one_call():
                for name in os.listdir(stamp_dir):
                    os.unlink(os.path.join(stamp_dir, name))
                t = time.perf_counter()
                run(wakeup_work, (stamp_dir,), opts.nprocs)
                t_ret = time.time()
                ms = (time.perf_counter() - t) * 1e3
                stamps = []
                for i in range(opts.nprocs):
                    with open(os.path.join(stamp_dir, f"exit-{i}")) as f:
                        stamps.append(float(f.read()))
                return {"ms": ms, "wake_ms": (t_ret - max(stamps)) * 1e3}

        samples = _time_calls(one_call, opts.target, opts.max_calls)
        out["samples"] = {key: [s[key] for s in samples] for key in samples[0]}
        out["ok"] = True
    finally:
        shutil.rmtree(stamp_dir, ignore_errors=True)
    sys.stdout.write(json.dumps(out) + "\n")
    sys.stdout.flush()
