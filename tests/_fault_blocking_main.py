"""A main module whose import blocks in every worker (``__mp_main__``), as one that waits
for something at import: ``python _fault_blocking_main.py {fastspawn|torch} OUT_DIR``.
start_processes(join=False) must return, join(timeout=2) must give False after 2 s; then
this script kills its ranks and exits."""

import faulthandler
import os
import sys
import time

import _faultkit as kit

if __name__ == "__mp_main__":
    time.sleep(1000)  # stands for waiting on something that never comes


def work(rank):
    pass


if __name__ == "__main__":
    faulthandler.enable()
    faulthandler.dump_traceback_later(90, exit=True)  # a hang ends here, stacks on stderr
    lib, out = sys.argv[1], sys.argv[2]
    if lib == "torch":
        import torch.multiprocessing as mp
    else:
        import fastspawn as mp
    started = time.monotonic()
    ctx = mp.start_processes(work, nprocs=2, join=False)
    returned = time.monotonic()
    kit.write_json(os.path.join(out, "started.json"), {"pids": ctx.pids(), "start": returned - started})
    done = ctx.join(timeout=2)
    joined = time.monotonic()
    kit.write_json(os.path.join(out, "joined.json"), {"result": done, "join": joined - returned})
    for process in ctx.processes:
        process.kill()
    try:
        while not ctx.join(timeout=30):
            pass
    except Exception as exc:  # the killed ranks: ProcessExitedException
        print(f"after kill: {type(exc).__name__}: {exc}")
    kit.write_json(os.path.join(out, "exited.json"), {})
