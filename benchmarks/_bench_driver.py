"""Driver side of benchmarks/spawn_bench.py: time one contender inside one process.

The driver *processes* are ``_driver_plain.py`` (a main module importing nothing heavy)
and ``_driver_torch.py`` (a main module importing torch at top level). They only define
the trivial child function ``work`` and call :func:`driver_main`. Which main module the
driver runs under matters: spawn (and, on CPython 3.11, forkserver) children re-import
``__main__`` before they can run ``work``, and fastspawn's zygote imports it once.

This module is imported by every spawn child too (the driver mains import it), so it
keeps its top-level imports to the standard library's cheapest.

The driver runs one untimed-for-the-table warm-up call with nprocs=1 (its time is
reported as the "cold call"), then, by ``--kind``:

- ``start``: timed calls at the requested nprocs until ``--target`` seconds of calls
  were made (at least ``--min-calls``, at most ``--max-calls``);
- ``failfast``: the same with a call whose rank 0 raises at once;
- ``wakeup``: the same with children that stamp the time just before exiting;
- ``memory``: one call whose children block until the driver has sampled each child's
  USS/PSS/RSS (psutil ``memory_full_info``, i.e. /proc/<pid>/smaps_rollup);

and prints one JSON line on stdout.
"""

from __future__ import annotations

import os
import sys
import time

CONTENDERS = {
    # name: (library, start method)
    # fastspawn's zygote, first call: the zygote is stopped before each timed call, so
    # every timed call starts one (imports the main module in it) and then forks from it.
    "fastspawn-zygote-cold": ("fastspawn", "spawn"),
    # fastspawn's zygote, later calls: fastspawn.warmup() before timing.
    "fastspawn-zygote": ("fastspawn", "spawn"),
    # fastspawn with zygote=False: one fresh interpreter per child (clone+exec).
    "fastspawn-fresh": ("fastspawn", "spawn"),
    # Not run by default (--contenders): forkserver is served by the same zygote.
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

# fastspawn contenders that run on the zygote (True) or explicitly without it (False).
ZYGOTE = {
    "fastspawn-zygote-cold": True,
    "fastspawn-zygote": True,
    "fastspawn-forkserver": True,
    "fastspawn-fresh": False,
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


def memory_work(i, ready, release):
    """Say "running" (one release of the ``ready`` semaphore), then block until released."""
    ready.release()
    if not release.wait(300):
        raise RuntimeError("spawn_bench: memory child was never released")


# ---------------------------------------------------------------------------------------
# Parent side.


def _fastspawn_kwargs(contender):
    zygote = ZYGOTE.get(contender)
    return {} if zygote is None else {"zygote": zygote}


def _runner(contender):
    """A function ``run(fn, args, nprocs)`` that starts and joins ``nprocs`` children."""
    lib, method = CONTENDERS[contender]
    if lib == "fastspawn":
        import fastspawn

        kwargs = _fastspawn_kwargs(contender)

        def run(fn, args, nprocs):
            fastspawn.start_processes(fn, args=args, nprocs=nprocs, join=True, start_method=method, **kwargs)

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


def _starter(contender):
    """``start(fn, args, nprocs) -> (pids, join)`` for the memory kind (fastspawn, torch)."""
    lib, method = CONTENDERS[contender]
    if lib == "fastspawn":
        import fastspawn

        kwargs = _fastspawn_kwargs(contender)

        def start(fn, args, nprocs):
            return fastspawn.start_processes(fn, args=args, nprocs=nprocs, join=False, start_method=method, **kwargs)

    elif lib == "torch":
        import torch.multiprocessing as tmp

        def start(fn, args, nprocs):
            return tmp.start_processes(fn, args=args, nprocs=nprocs, join=False, start_method=method)

    else:
        raise ValueError(f"the memory measurement supports fastspawn and torch contenders, not {contender}")

    def start_and_join(fn, args, nprocs):
        context = start(fn, args, nprocs)

        def join():
            while not context.join():
                pass

        return context.pids(), join

    return method, start_and_join


def _zygote_pid(contender):
    """The pid of fastspawn's zygote (None without one, or for non-zygote contenders)."""
    if not ZYGOTE.get(contender):
        return None
    zygotes = sys.modules["fastspawn._api"]._zygotes
    zygote = zygotes.current
    if zygote is None or zygote.unfit is not None:
        raise RuntimeError(
            f"{contender}: fastspawn is not using its zygote"
            + (f" ({zygote.unfit})" if zygote is not None else "")
        )
    return int(zygote.pid)


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


def _memory(pid):
    """USS, PSS, RSS of one process, in bytes (psutil reads /proc/<pid>/smaps_rollup)."""
    import psutil

    info = psutil.Process(pid).memory_full_info()
    return {"uss": info.uss, "pss": info.pss, "rss": info.rss}


def _time_calls(one_call, target, min_calls, max_calls):
    """Call ``one_call()`` (which returns a dict of measurements) until the time target."""
    samples = []
    begin = time.perf_counter()
    while True:
        samples.append(one_call())
        if len(samples) >= max_calls:
            return samples
        if len(samples) >= min_calls and time.perf_counter() - begin >= target:
            return samples


def _measure_memory(contender, work, nprocs):
    """Start ``nprocs`` children that block; sample each one's memory; release; join."""
    import multiprocessing

    method, start = _starter(contender)
    ctx = multiprocessing.get_context(method)
    ready, release = ctx.Semaphore(0), ctx.Event()
    t = time.perf_counter()
    pids, join = start(memory_work, (ready, release), nprocs)
    try:
        for _ in range(nprocs):
            if not ready.acquire(timeout=600):
                raise RuntimeError("memory children did not start within 600 s")
        ms = (time.perf_counter() - t) * 1e3
        time.sleep(0.2)  # let the last ones settle into release.wait()
        children = [_memory(pid) for pid in pids]
        zygote_pid = _zygote_pid(contender)
        extra = {"parent": _memory(os.getpid())}
        if zygote_pid is not None:
            extra["zygote"] = _memory(zygote_pid)
    finally:
        release.set()
    join()
    sample = {"ms": [ms]}
    for key in ("uss", "pss", "rss"):
        sample[key] = [c[key] for c in children]
    for who, mem in extra.items():
        for key, value in mem.items():
            sample[f"{who}_{key}"] = [value]
    return sample


def driver_main(work):
    import argparse
    import json
    import shutil
    import tempfile
    import warnings

    ap = argparse.ArgumentParser()
    ap.add_argument("--kind", choices=("start", "failfast", "wakeup", "memory"), required=True)
    ap.add_argument("--contender", choices=sorted(CONTENDERS), required=True)
    ap.add_argument("--nprocs", type=int, required=True)
    ap.add_argument("--target", type=float, default=0.5, help="seconds of timed calls")
    ap.add_argument("--min-calls", type=int, default=1)
    ap.add_argument("--max-calls", type=int, default=50)
    opts = ap.parse_args()
    contender = opts.contender

    # fastspawn falls back to fresh interpreters (with a RuntimeWarning) when its zygote is
    # unfit: for the zygote contenders that would measure the wrong thing, so it is an error.
    warnings.filterwarnings("error", message="fastspawn: .*fresh interpreter", category=RuntimeWarning)

    run = _runner(contender)  # imports the library: part of the user's import, untimed
    stamp_dir = tempfile.mkdtemp(prefix="spawn_bench-")
    out = {"kind": opts.kind, "contender": contender, "nprocs": opts.nprocs, "pid": os.getpid()}
    try:
        t0 = time.perf_counter()
        run(work, (), 1)  # cold call: starts zygote, forkservers, resource trackers, lazy imports
        out["cold_ms"] = (time.perf_counter() - t0) * 1e3
        zygote_pids = []
        if ZYGOTE.get(contender):
            import fastspawn

            fastspawn.warmup()  # a no-op after the cold call; says what "later calls" means
            zygote_pids.append(_zygote_pid(contender))

        if opts.kind == "start" and contender == "fastspawn-zygote-cold":
            zygotes = sys.modules["fastspawn._api"]._zygotes

            def one_call():
                zygotes.shutdown()  # untimed: stops (and reaps) the zygote
                t = time.perf_counter()
                run(work, (), opts.nprocs)  # starts a new zygote, then forks from it
                ms = (time.perf_counter() - t) * 1e3
                zygote_pids.append(_zygote_pid(contender))
                return {"ms": ms}

        elif opts.kind == "start":

            def one_call():
                t = time.perf_counter()
                run(work, (), opts.nprocs)
                return {"ms": (time.perf_counter() - t) * 1e3}

        elif opts.kind == "failfast":
            failure_types = _failure_types(contender)

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

        elif opts.kind == "wakeup":

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

        if opts.kind == "memory":
            samples = [_measure_memory(contender, work, opts.nprocs)]
            out["samples"] = samples[0]
        else:
            samples = _time_calls(one_call, opts.target, opts.min_calls, opts.max_calls)
            out["samples"] = {key: [s[key] for s in samples] for key in samples[0]}
        if zygote_pids:
            zygote_pids.append(_zygote_pid(contender))
            out["zygote_pids"] = sorted(set(zygote_pids))
            expected = 1 + len(samples) if contender == "fastspawn-zygote-cold" else 1
            if len(out["zygote_pids"]) != expected:
                raise RuntimeError(
                    f"{contender}: {len(out['zygote_pids'])} zygotes served the calls, expected {expected}"
                )
        out["ok"] = True
    finally:
        shutil.rmtree(stamp_dir, ignore_errors=True)
    sys.stdout.write(json.dumps(out) + "\n")
    sys.stdout.flush()
