"""spawn_bench driver whose main module imports nothing heavy (see _bench_driver.py)."""

from _bench_driver import driver_main


def work(i):
    pass


if __name__ == "__main__":
    driver_main(work)
