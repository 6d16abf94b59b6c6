"""A process pool on fastspawn's multiprocessing context: workers forked from the warm zygote."""

import fastspawn

ctx = fastspawn.get_context()  # first thing: the zygote warms up while the rest loads

import os  # noqa: E402  (your heavy imports, e.g. torch, go here)
from concurrent.futures import ProcessPoolExecutor  # noqa: E402


def square(x: int) -> int:
    return x * x


if __name__ == "__main__":
    with ProcessPoolExecutor(max_workers=4, mp_context=ctx) as pool:
        print("squares:", list(pool.map(square, range(8))))

    offset = 100
    results = ctx.Queue()
    # a closure as the target: spawn cannot pickle it, fastspawn sends it by value
    worker = ctx.Process(target=lambda: results.put((os.getpid(), offset + 1)))
    worker.start()
    pid, value = results.get(timeout=60)
    worker.join()
    print(f"closure ran in pid {pid} (parent {os.getpid()}), returned {value}, exit code {worker.exitcode}")
