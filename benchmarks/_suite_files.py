"""The test modules that suite_bench.py runs, and the probe conftest it puts beside them.

Every contender of a family gets the same tests; where a contender is a base class, its
module differs from the other contender's only in the import of that class.
"""

from __future__ import annotations

from typing import Dict, List, Tuple

# ------------------------------------------------- family "all_reduce": one gloo group per test
COMMON = '''\
import torch
import torch.distributed as dist


def all_reduce_once(rank, world_size, init_method):
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world_size)
    tensor = torch.ones(4) * (rank + 1)
    dist.all_reduce(tensor)
    assert tensor.tolist() == [3.0] * 4, tensor
    dist.destroy_process_group()
'''


def _mptc(module: str) -> str:
    return f"""from {module} import MultiProcessTestCase

{COMMON}

class AllReduceTest(MultiProcessTestCase):
    world_size = 2

    def setUp(self):
        super().setUp()
        self._spawn_processes()
"""


MPTC_TEST = '\n    def test_all_reduce_NNN(self):\n        all_reduce_once(self.rank, self.world_size, f"file://{self.file_name}")\n'

# -------------------------------------- family "continuous": ranks and group once per class
CONTINUOUS_HEAD = '''\
import torch
import torch.distributed as dist
{import_line}


def check_all_reduce(test):
    tensor = torch.ones(4) * (test.rank + 1)
    dist.all_reduce(tensor)
    test.assertEqual(tensor, torch.full((4,), 3.0))


def check_broadcast(test):
    tensor = torch.arange(4.0) if test.rank == 0 else torch.zeros(4)
    dist.broadcast(tensor, src=0)
    test.assertEqual(tensor, torch.arange(4.0))


def check_all_gather(test):
    outputs = [torch.zeros(2) for _ in range(test.world_size)]
    dist.all_gather(outputs, torch.full((2,), float(test.rank)))
    test.assertEqual(outputs, [torch.full((2,), float(r)) for r in range(test.world_size)])


def check_barrier(test):
    dist.barrier()
    tensor = torch.tensor([test.rank])
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    test.assertEqual(tensor.item(), test.world_size - 1)


class CollectiveTest(MultiProcContinuousTest):
    world_size = 2

    @classmethod
    def backend_str(cls):
        return "gloo"

    @classmethod
    def device_type(cls):
        return "cpu"
'''

CONTINUOUS_KINDS = ("all_reduce", "broadcast", "all_gather", "barrier")
CONTINUOUS_TEST = "\n    def test_NNN_KIND(self):\n        check_KIND(self)\n"

# ------------------------------- family "c10d": a 7-test class in the style of torch's c10d tests
C10D_HEAD = '''\
import torch
import torch.distributed as dist
{import_line}
from torch.testing._internal.common_utils import run_tests


class ProcessGroupGlooTest(MultiProcessTestCase):
    def setUp(self):
        super().setUp()
        self._spawn_processes()

    @property
    def world_size(self):
        return 2

    def _init(self):
        store = dist.FileStore(self.file_name, self.world_size)
        dist.init_process_group("gloo", store=store, rank=self.rank, world_size=self.world_size)
'''

C10D_TESTS = (
    '''
    @requires_gloo()
    def test_allreduce_ops(self):
        self._init()
        for op, expected in ((dist.ReduceOp.SUM, 3.0), (dist.ReduceOp.MAX, 2.0), (dist.ReduceOp.MIN, 1.0)):
            tensor = torch.full((3,), float(self.rank + 1))
            dist.all_reduce(tensor, op=op)
            self.assertEqual(tensor, torch.full((3,), expected))
''',
    '''
    @requires_gloo()
    def test_broadcast(self):
        self._init()
        for src in range(self.world_size):
            tensor = torch.arange(4.0) if self.rank == src else torch.zeros(4)
            dist.broadcast(tensor, src=src)
            self.assertEqual(tensor, torch.arange(4.0))
''',
    '''
    @requires_gloo()
    def test_allgather(self):
        self._init()
        outputs = [torch.zeros(2) for _ in range(self.world_size)]
        dist.all_gather(outputs, torch.full((2,), float(self.rank)))
        self.assertEqual(outputs, [torch.full((2,), float(r)) for r in range(self.world_size)])
''',
    '''
    @requires_gloo()
    def test_reduce(self):
        self._init()
        tensor = torch.full((5,), float(self.rank + 1))
        dist.reduce(tensor, dst=1, op=dist.ReduceOp.PRODUCT)
        if self.rank == 1:
            self.assertEqual(tensor, torch.full((5,), 2.0))
''',
    '''
    @requires_gloo()
    def test_gather_scatter(self):
        self._init()
        gathered = [torch.zeros(3) for _ in range(self.world_size)] if self.rank == 0 else None
        dist.gather(torch.full((3,), float(self.rank)), gather_list=gathered, dst=0)
        if self.rank == 0:
            self.assertEqual(gathered, [torch.full((3,), float(r)) for r in range(self.world_size)])
        received = torch.zeros(3)
        chunks = [torch.full((3,), float(r) * 10) for r in range(self.world_size)] if self.rank == 0 else None
        dist.scatter(received, scatter_list=chunks, src=0)
        self.assertEqual(received, torch.full((3,), float(self.rank) * 10))
''',
    '''
    @requires_gloo()
    def test_async_work_and_barrier(self):
        self._init()
        tensors = [torch.ones(8) * (i + self.rank) for i in range(3)]
        works = [dist.all_reduce(t, async_op=True) for t in tensors]
        for work in works:
            work.wait()
        dist.barrier()
        for i, tensor in enumerate(tensors):
            self.assertEqual(tensor, torch.ones(8) * (2 * i + 1))
''',
    '''
    @requires_gloo()
    def test_new_group_and_objects(self):
        self._init()
        group = dist.new_group(list(range(self.world_size)))
        tensor = torch.tensor([self.rank + 1])
        dist.all_reduce(tensor, group=group)
        self.assertEqual(tensor.item(), 3)
        objects = [None] * self.world_size
        dist.all_gather_object(objects, {"rank": self.rank})
        self.assertEqual(objects, [{"rank": r} for r in range(self.world_size)])
''',
)
C10D_TAIL = '\n\nif __name__ == "__main__":\n    run_tests()\n'
C10D_COUNT = len(C10D_TESTS)

TORCH_CD = "torch.testing._internal.common_distributed"

# suite -> (family, module head, one test with NNN for its number)
_Template = Tuple[str, str, str]
TEMPLATES: Dict[str, _Template] = {
    "marker": (
        "all_reduce",
        "import pytest\n\n" + COMMON,
        "\n\n@pytest.mark.spawn(nprocs=2)\ndef test_all_reduce_NNN(rank, world_size, init_method):\n"
        "    all_reduce_once(rank, world_size, init_method)\n",
    ),
    "fastspawn-mptc": ("all_reduce", _mptc("fastspawn.testing"), MPTC_TEST),
    "torch-spawn": (
        "all_reduce",
        "import torch.multiprocessing as mp\n\n" + COMMON,
        "\n\ndef test_all_reduce_NNN(tmp_path):\n"
        '    mp.spawn(all_reduce_once, args=(2, f"file://{tmp_path}/store"), nprocs=2)\n',
    ),
    "torch-mptc": ("all_reduce", _mptc(TORCH_CD), MPTC_TEST),
    "fastspawn-continuous": (
        "continuous",
        CONTINUOUS_HEAD.format(import_line="from fastspawn.testing import MultiProcContinuousTest"),
        CONTINUOUS_TEST,
    ),
    "torch-continuous": (
        "continuous",
        CONTINUOUS_HEAD.format(import_line=f"from {TORCH_CD} import MultiProcContinuousTest"),
        CONTINUOUS_TEST,
    ),
    "fastspawn-c10d": (
        "c10d",
        C10D_HEAD.format(
            import_line=f"from fastspawn.testing import MultiProcessTestCase\nfrom {TORCH_CD} import requires_gloo"
        ),
        "",
    ),
    "torch-c10d": (
        "c10d",
        C10D_HEAD.format(import_line=f"from {TORCH_CD} import MultiProcessTestCase, requires_gloo"),
        "",
    ),
    "startup": ("all_reduce", COMMON, "\n\ndef test_nothing_NNN():\n    pass\n"),
}


def family(suite: str) -> str:
    """The family of ``suite``: the tests it shares with the other contenders."""
    return TEMPLATES[suite][0]


def suite_count(suite: str, tests: int) -> int:
    """How many tests ``suite`` has when the families of N tests have ``tests``."""
    return C10D_COUNT if family(suite) == "c10d" else tests


def suite_source(suite: str, count: int) -> str:
    """The test module of ``suite`` with ``count`` tests (the c10d family: its first ``count``)."""
    kind, head, test = TEMPLATES[suite]
    if kind == "c10d":
        return head + "".join(C10D_TESTS[:count]) + C10D_TAIL
    parts: List[str] = [head]
    for i in range(count):
        body = test.replace("NNN", f"{i:03d}")
        if kind == "continuous":
            body = body.replace("KIND", CONTINUOUS_KINDS[i % len(CONTINUOUS_KINDS)])
        parts.append(body)
    return "".join(parts)


# The conftest.py beside the test modules: the clock at collection's end and at each test
# phase's start and end, written as JSON to $SUITE_BENCH_PROBE when pytest unconfigures.
# Only the pytest process writes it (a zygote or rank that imports this file does not).
PROBE = '''\
import json
import os
import time

_PID = os.getpid()
_EVENTS = {"conftest": time.time(), "tests": []}


def pytest_collection_finish(session):
    _EVENTS["collected"] = time.time()


def pytest_runtest_logreport(report):
    _EVENTS["tests"].append([report.nodeid, report.when, report.start, report.stop, report.outcome])


def pytest_unconfigure(config):
    path = os.environ.get("SUITE_BENCH_PROBE")
    if path and os.getpid() == _PID:
        _EVENTS["unconfigure"] = time.time()
        with open(path, "w") as f:
            json.dump(_EVENTS, f)
'''
