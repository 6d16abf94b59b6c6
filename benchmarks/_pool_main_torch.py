"""pool_bench main module that imports torch at top level, as a training script does.

Spawn and forkserver workers re-import it, so each of them pays for ``import torch``;
fastspawn's zygote pays once. With the ``fastspawn`` contender the context is asked for
first (``_pool_driver.warm_if_early``), before ``import torch``, as the README recommends.
"""

import sys
import time

T_TOP = time.time()
import _pool_driver  # noqa: E402

_pool_driver.warm_if_early()
import torch  # noqa: E402
from torch.utils.data import Dataset  # noqa: E402

T_IMPORTS = time.time()


def tiny(i):
    return i * i


class Squares(Dataset):
    """A small in-memory dataset: row i of a (256, 64) float tensor, times i."""

    def __init__(self, n):
        self.data = torch.arange(n * 64, dtype=torch.float32).reshape(n, 64)

    def __len__(self):
        return len(self.data)

    def __getitem__(self, i):
        return self.data[i] * i


if __name__ == "__main__":
    kind = sys.argv[1] if len(sys.argv) > 1 else "ppe"
    payload = tiny if kind == "ppe" else Squares(_pool_driver.DL_ITEMS)
    _pool_driver.driver_main(kind, T_TOP, T_IMPORTS, payload)
