"""pool_bench main module that imports nothing heavy (see _pool_driver.py)."""

import time

T_TOP = time.time()
import _pool_driver  # noqa: E402

_pool_driver.warm_if_early()
T_IMPORTS = time.time()


def tiny(i):
    return i * i


if __name__ == "__main__":
    _pool_driver.driver_main("ppe", T_TOP, T_IMPORTS, tiny)
