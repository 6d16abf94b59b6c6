"""Driver side of benchmarks/pool_bench.py: one measurement inside one fresh interpreter.

The driver *processes* are ``_pool_main_plain.py`` (a main module importing nothing heavy)
and ``_pool_main_torch.py`` (a main module importing torch at top level, as a training
script does). They define the task ``tiny`` (and, for torch, the dataset) and call
:func:`driver_main` under ``if __name__ == "__main__":``. Spawn and forkserver workers
re-import the main module before they can unpickle ``tiny``; fastspawn's zygote imports it
once.

Which pool start method is measured comes from the environment (``POOL_BENCH_CONTEXT``), so
that the main module can act on it at its top: for ``fastspawn`` it calls
``fastspawn.get_context()`` before its heavy imports (what the README recommends: the zygote
then imports the main module while this process does); ``fastspawn-warm`` does the same
and then waits, untimed, for the zygote to be ready (``fastspawn.warmup()``): what a pool
created later in a program sees; for ``fastspawn-late`` the context is first asked for
inside the timed region (the zygote starts cold there).

Every time is a ``time.time()`` stamp; the orchestrator stamps the moment it started the
process (``POOL_BENCH_LAUNCH``). Prints one JSON line on stdout. Spawn children import this
module too: its top level imports only cheap standard-library modules.
"""

from __future__ import annotations

import json
import os
import sys
import time
import warnings

CONTEXT_VAR = "POOL_BENCH_CONTEXT"
LAUNCH_VAR = "POOL_BENCH_LAUNCH"
CONTEXTS = ["fastspawn", "fastspawn-warm", "fastspawn-late", "spawn", "forkserver", "fork"]
PPE_WORKERS = 8
PPE_TASKS = 1000
DL_WORKERS = 4
DL_EPOCHS = 3
DL_ITEMS = 256
DL_BATCH = 16


def context_name() -> str:
    return os.environ.get(CONTEXT_VAR, "")


def warm_if_early() -> None:
    """Called at the very top of the main modules: the README's recommendation for the
    ``fastspawn`` contender (start warming the zygote before the heavy imports)."""
    if context_name() in ("fastspawn", "fastspawn-warm"):
        import fastspawn

        fastspawn.get_context()


def wait_if_warm() -> None:
    """Untimed, before the pool: ``fastspawn-warm`` waits until the zygote is ready."""
    if context_name() == "fastspawn-warm":
        import fastspawn

        fastspawn.warmup()


def get_context(name: str):  # type: ignore[no-untyped-def]
    if name.startswith("fastspawn"):
        import fastspawn

        return fastspawn.get_context()
    import multiprocessing

    return multiprocessing.get_context(name)


def run_ppe(tiny) -> dict:  # type: ignore[no-untyped-def]
    """ProcessPoolExecutor(max_workers=8): submit 1,000 tiny tasks at once; stamps at the
    first result, the last result and the end of shutdown(wait=True)."""
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    wait_if_warm()
    t0 = time.time()
    ctx = get_context(context_name())
    with ProcessPoolExecutor(max_workers=PPE_WORKERS, mp_context=ctx) as ex:
        futures = [ex.submit(tiny, i) for i in range(PPE_TASKS)]
        wait(futures, return_when=FIRST_COMPLETED)
        t_first = time.time()
        results = [f.result() for f in futures]
        t_all = time.time()
    t_shutdown = time.time()
    if results != [tiny(i) for i in range(PPE_TASKS)]:
        raise AssertionError("wrong results")
    return {"t0": t0, "first": t_first, "all": t_all, "shutdown": t_shutdown}


def run_dataloader(dataset) -> dict:  # type: ignore[no-untyped-def]
    """DataLoader(num_workers=4, not persistent): 3 epochs; stamps at each epoch's start,
    its first batch and its end."""
    from torch.utils.data import DataLoader

    wait_if_warm()
    t0 = time.time()
    ctx = get_context(context_name())
    loader = DataLoader(dataset, batch_size=DL_BATCH, num_workers=DL_WORKERS, persistent_workers=False,
                        multiprocessing_context=ctx)  # fmt: skip
    epochs = []
    for _ in range(DL_EPOCHS):
        start = time.time()
        it = iter(loader)
        total = next(it).sum().item()
        first = time.time()
        for batch in it:
            total += batch.sum().item()
        end = time.time()
        del it
        epochs.append({"start": start, "first": first, "end": end, "total": total})
    if len({e["total"] for e in epochs}) != 1:
        raise AssertionError("epochs differ")
    return {"t0": t0, "epochs": epochs, "end": time.time()}


def driver_main(kind: str, t_top: float, t_imports: float, payload) -> None:  # type: ignore[no-untyped-def]
    """Run measurement ``kind`` ("ppe": ``payload`` is the task, "dataloader": the dataset)."""
    caught = []

    def record(message, category, filename, lineno, file=None, line=None):  # type: ignore[no-untyped-def]
        caught.append(f"{category.__name__}: {message} ({os.path.basename(filename)}:{lineno})")

    warnings.showwarning = record
    # DataLoader's advice for a 2-CPU machine (4 workers > 2 CPUs): the point of this benchmark.
    warnings.filterwarnings("ignore", message="This DataLoader will create")
    stamps = run_ppe(payload) if kind == "ppe" else run_dataloader(payload)
    out = {
        "context": context_name(),
        "kind": kind,
        "python": sys.version.split()[0],
        "launch": float(os.environ[LAUNCH_VAR]),
        "top": t_top,
        "imports": t_imports,
        "stamps": stamps,
        "warnings": caught,
    }
    sys.stdout.write(json.dumps(out) + "\n")
    sys.stdout.flush()
