"""spawn_bench driver whose main module imports torch at top level, as training scripts do.

Spawn children re-import this module, so each of them pays for ``import torch``.
"""

import torch  # noqa: F401  (the point of this driver)
from _bench_driver import driver_main


def work(i):
    pass


if __name__ == "__main__":
    driver_main(work)
