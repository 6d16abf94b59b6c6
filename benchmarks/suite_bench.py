#!/usr/bin/env python
"""Benchmark a distributed test suite: the same tests written four ways, each suite one
whole pytest run.

    python benchmarks/suite_bench.py                # 40 tests per suite, 1 round (~5-10 min on 2 cores)
    python benchmarks/suite_bench.py --quick        # 8 tests per suite, 1 round
    python benchmarks/suite_bench.py --rounds 3     # interleaved rounds, medians reported

Every test initialises a gloo process group of world size 2 (``file://`` rendezvous),
does one ``all_reduce`` and checks its result. The suites:

- ``marker``: fastspawn's pytest plugin, ``@pytest.mark.spawn(nprocs=2)`` with the fixtures
  ``rank``, ``world_size``, ``init_method``;
- ``fastspawn-mptc``: ``fastspawn.testing.MultiProcessTestCase``;
- ``torch-spawn``: each test calls ``torch.multiprocessing.spawn(..., nprocs=2)``;
- ``torch-mptc``: torch's ``MultiProcessTestCase`` (the class of torch's own distributed
  tests), the same class body as ``fastspawn-mptc`` with only the import changed;
- ``startup`` (reference, not a contender): as many empty tests in a module importing
  ``torch.distributed``: the fixed cost of a pytest run that imports torch.

Each suite runs as ``python -m pytest -q -p no:cacheprovider FILE`` in a fresh process; the
time is the wall time of that whole process. In each round every suite runs once, the
order rotated by one per round. Targets: the marker suite at least 10x faster than each
torch suite; fastspawn's MultiProcessTestCase at least 5x faster than torch's. Writes
``results/suite_bench.md`` and ``results/suite_bench.json``.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from spawn_bench import describe, div, fmt_x, loadavg, log, machine_info, table, write_atomic  # noqa: E402

SUITES = ("marker", "fastspawn-mptc", "torch-spawn", "torch-mptc")
REFERENCE = "startup"
TARGETS = (
    # (faster suite, slower suite, factor)
    ("marker", "torch-spawn", 10.0),
    ("marker", "torch-mptc", 10.0),
    ("fastspawn-mptc", "torch-mptc", 5.0),
)
DESCRIPTION = {
    "marker": "`@pytest.mark.spawn(nprocs=2)`, fixtures `rank`, `world_size`, `init_method`",
    "fastspawn-mptc": "`fastspawn.testing.MultiProcessTestCase`",
    "torch-spawn": "`torch.multiprocessing.spawn(fn, nprocs=2)` in each test",
    "torch-mptc": "torch's `MultiProcessTestCase` (`torch.testing._internal.common_distributed`)",
    "startup": "reference: the same number of empty tests, module imports `torch.distributed`",
}

# ------------------------------------------------------------------ the test files
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

# suite -> (module head, one test with NNN for its number)
TEMPLATES = {
    "marker": (
        "import pytest\n\n" + COMMON,
        "\n\n@pytest.mark.spawn(nprocs=2)\ndef test_all_reduce_NNN(rank, world_size, init_method):\n"
        "    all_reduce_once(rank, world_size, init_method)\n",
    ),
    "torch-spawn": (
        "import torch.multiprocessing as mp\n\n" + COMMON,
        "\n\ndef test_all_reduce_NNN(tmp_path):\n"
        '    mp.spawn(all_reduce_once, args=(2, f"file://{tmp_path}/store"), nprocs=2)\n',
    ),
    "fastspawn-mptc": (
        _mptc("fastspawn.testing"),
        MPTC_TEST,
    ),
    "torch-mptc": (
        _mptc("torch.testing._internal.common_distributed"),
        MPTC_TEST,
    ),
    REFERENCE: (COMMON, "\n\ndef test_nothing_NNN():\n    pass\n"),
}


def suite_source(suite: str, count: int) -> str:
    """The test module of ``suite`` with ``count`` tests."""
    head, test = TEMPLATES[suite]
    return head + "".join(test.replace("NNN", f"{i:03d}") for i in range(count))


# ------------------------------------------------------------------------ running
def run_suite(path: Path, count: int) -> Dict[str, Any]:
    """One whole pytest run of the module at ``path``: wall time and what pytest said."""
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", path.name]
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=path.parent, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wall = time.perf_counter() - start
    lines = proc.stdout.strip().splitlines()
    summary = lines[-1] if lines else ""
    passed = re.search(r"(\d+) passed", summary)
    ok = proc.returncode == 0 and passed is not None and int(passed.group(1)) == count
    result: Dict[str, Any] = {"wall_s": wall, "ok": ok, "summary": summary, "loadavg": loadavg()}
    if not ok:
        result["output_tail"] = "\n".join(lines[-40:])
    return result


def run_rounds(suites: Sequence[str], count: int, rounds: int, directory: Path) -> Dict[str, List[Dict[str, Any]]]:
    """Every suite once per round, the order rotated by one each round."""
    paths = {}
    for suite in suites:
        path = directory / f"test_{suite.replace('-', '_')}.py"
        path.write_text(suite_source(suite, count))
        paths[suite] = path
    runs: Dict[str, List[Dict[str, Any]]] = {suite: [] for suite in suites}
    for r in range(rounds):
        shift = r % len(suites)
        for suite in [*suites[shift:], *suites[:shift]]:
            result = run_suite(paths[suite], count)
            result["round"] = r
            runs[suite].append(result)
            status = "ok" if result["ok"] else f"FAILED: {result['summary']}"
            log(f"round {r + 1}/{rounds} {suite:15s} {result['wall_s']:8.2f} s  {status}")
    return runs


# ------------------------------------------------------------------------ report
def summarise(runs: Dict[str, List[Dict[str, Any]]], count: int) -> Dict[str, Any]:
    stats = {}
    for suite, results in runs.items():
        walls = [r["wall_s"] for r in results if r["ok"]]
        stats[suite] = describe(walls)
    startup = (stats.get(REFERENCE) or {}).get("median")

    def median_of(suite: str) -> Optional[float]:
        return (stats.get(suite) or {}).get("median")

    per_test = {
        suite: {
            "wall_ms": div(median_of(suite), count / 1000.0),
            "beyond_startup_ms": div(None if startup is None or median_of(suite) is None else median_of(suite) - startup, count / 1000.0),
        }
        for suite in runs
    }
    ratios = {
        f"{slow}/{fast}": div(median_of(slow), median_of(fast))
        for fast in ("marker", "fastspawn-mptc")
        for slow in ("torch-spawn", "torch-mptc")
        if fast in runs and slow in runs
    }
    targets = []
    for fast, slow, factor in TARGETS:
        measured = div(median_of(slow), median_of(fast))
        targets.append(
            {
                "target": f"{fast} at least {factor:g}x faster than {slow}",
                "factor": factor,
                "measured": measured,
                "status": "n/a" if measured is None else ("PASS" if measured >= factor else "FAIL"),
            }
        )
    return {"stats": stats, "per_test": per_test, "ratios": ratios, "targets": targets}


def render(summary: Dict[str, Any], runs: Dict[str, List[Dict[str, Any]]], args: argparse.Namespace, info: Dict[str, Any]) -> str:
    out = [
        f"# Test-suite benchmark: {args.tests} gloo all_reduce tests, world size 2",
        "",
        f"{args.tests} tests per suite, {args.rounds} round(s), each suite one whole `python -m pytest` run "
        f"(wall time, median over rounds). {info.get('nproc')} CPUs, Python {info.get('python')}, "
        f"torch {info.get('torch')}, {info.get('date')}, git {str(info.get('git_commit'))[:10]}. "
        f"Load average (1/5/15 min) at the start {info.get('loadavg_start')}, at the end {info.get('loadavg_end')}: "
        "the machine is shared, so absolute times are noisy; the suites run interleaved.",
        "",
        "## Targets",
        "",
    ]
    out += table(
        ["target", "measured", "status"],
        [[t["target"], fmt_x(t["measured"]), t["status"]] for t in summary["targets"]],
    )
    out += ["", "## Wall time per suite", ""]
    rows = []
    for suite in [*SUITES, REFERENCE]:
        if suite not in runs:
            continue
        stats = summary["stats"].get(suite) or {}
        per = summary["per_test"][suite]
        failed = sum(1 for r in runs[suite] if not r["ok"])
        rows.append(
            [
                suite,
                DESCRIPTION[suite],
                "—" if "median" not in stats else f"{stats['median']:.1f}",
                "—" if "median" not in stats else f"{stats['min']:.1f}–{stats['max']:.1f}",
                "—" if per["wall_ms"] is None else f"{per['wall_ms']:.0f}",
                "—" if per["beyond_startup_ms"] is None or suite == REFERENCE else f"{per['beyond_startup_ms']:.0f}",
                str(failed) if failed else "",
            ]
        )
    out += table(["suite", "what", "wall s", "range s", "ms / test", "ms / test beyond startup", "failed runs"], rows)
    out += ["", "## Speed-ups (torch suite wall time ÷ fastspawn suite wall time)", ""]
    out += table(["ratio", "factor"], [[name, fmt_x(value)] for name, value in summary["ratios"].items()])
    out += [
        "",
        "`ms / test beyond startup` subtracts the `startup` run (pytest plus `import torch.distributed`, "
        "same number of empty tests): what each test itself costs. torch's ways start 2 fresh "
        "interpreters per test, each importing torch (and, for torch's MultiProcessTestCase, its test "
        "utilities); fastspawn's fork 2 ranks from a zygote that imported the test module once.",
    ]
    errors = [(s, r) for s, results in runs.items() for r in results if not r["ok"]]
    if errors:
        out += ["", "## Errors", ""]
        for suite, result in errors:
            out += [f"{suite}, round {result['round'] + 1}: {result['summary']}", "", "```", result.get("output_tail", ""), "```"]
    return "\n".join(out) + "\n"


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tests", type=int, default=None, help="tests per suite (default 40; 8 with --quick)")
    parser.add_argument("--rounds", type=int, default=1, help="interleaved rounds (default 1)")
    parser.add_argument("--quick", action="store_true", help="development run: 8 tests per suite")
    parser.add_argument("--suites", nargs="+", choices=[*SUITES, REFERENCE], default=[*SUITES, REFERENCE])
    parser.add_argument("--out-dir", type=Path, default=HERE / "results")
    args = parser.parse_args(argv)
    if args.tests is None:
        args.tests = 8 if args.quick else 40
    if args.tests < 1 or args.rounds < 1:
        parser.error("--tests and --rounds must be at least 1")

    info = machine_info()
    with tempfile.TemporaryDirectory(prefix="suite-bench-") as directory:
        runs = run_rounds(args.suites, args.tests, args.rounds, Path(directory))
    info["loadavg_end"] = loadavg()
    summary = summarise(runs, args.tests)
    report = render(summary, runs, args, info)
    print(report)
    name = "suite_bench_quick" if args.quick else "suite_bench"
    write_atomic(args.out_dir / f"{name}.md", report)
    record = {"tests": args.tests, "rounds": args.rounds, "machine": info, "runs": runs, **summary}
    write_atomic(args.out_dir / f"{name}.json", json.dumps(record, indent=2) + "\n")
    log(f"wrote {args.out_dir / (name + '.md')} and .json")
    return 0 if all(r["ok"] for results in runs.values() for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
