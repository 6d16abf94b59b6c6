#!/usr/bin/env python
"""Benchmark distributed test suites: the same tests written several ways, each suite one
whole pytest run.

    python benchmarks/suite_bench.py                # 40 tests per suite, 1 round (~10-15 min on 2 cores)
    python benchmarks/suite_bench.py --quick        # 8 tests per suite, 1 round
    python benchmarks/suite_bench.py --rounds 3     # interleaved rounds, medians reported
    python benchmarks/suite_bench.py --suites torch-c10d fastspawn-c10d
    python benchmarks/suite_bench.py --wait-load 1.0   # first wait (<= 15 min) for a quiet machine

Three families of suites; the suites of a family run the same tests (world size 2, gloo),
written for each contender (the test modules are in ``_suite_files.py``):

- ``all_reduce``, N tests (``--tests``, 40; 8 with ``--quick``): every test initialises a gloo
  process group (``file://`` rendezvous), does one ``all_reduce`` and checks it. Written as
  ``marker`` (fastspawn's ``@pytest.mark.spawn(nprocs=2)``, fixtures ``rank``, ``world_size``,
  ``init_method``), ``fastspawn-mptc`` (``fastspawn.testing.MultiProcessTestCase``),
  ``torch-spawn`` (each test calls ``torch.multiprocessing.spawn(..., nprocs=2)``) and
  ``torch-mptc`` (torch's ``MultiProcessTestCase``, the class body of ``fastspawn-mptc``
  with only the import changed);
- ``continuous``, N tests: one ``MultiProcContinuousTest`` class (the ranks and their process
  group are created once for the class), each test one tiny collective (``all_reduce``,
  ``broadcast``, ``all_gather``, ``barrier`` in turn). ``fastspawn-continuous`` imports the
  class from ``fastspawn.testing``, ``torch-continuous`` from torch; nothing else differs.
  When fastspawn.testing has no ``MultiProcContinuousTest`` the fastspawn suite is not run
  (the report says so);
- ``c10d``, always 7 tests: a class in the style of torch's c10d tests
  (``ProcessGroupGlooTest``: ``FileStore`` + ``init_process_group`` and a collective or two per
  test, ``@requires_gloo()``, ``run_tests`` under ``__main__``), on fastspawn's
  ``MultiProcessTestCase`` (``fastspawn-c10d``) or torch's (``torch-c10d``), only the import
  of the base class changed;
- ``startup`` (reference, not a contender): N empty tests in a module importing
  ``torch.distributed``: the fixed cost of a pytest run that imports torch.

Each suite runs as ``python -m pytest -q -p no:cacheprovider FILE`` in a fresh process, from
a directory holding only that file and a probe; the time is the wall time of that whole
process. The probe, a ``conftest.py``, records the clock when collection ended and when each
test phase started and ended, so the report splits each run into start-up and collection,
the first test, the other tests and what follows the last one. Every run has a private bytecode cache (``PYTHONPYCACHEPREFIX``,
without ``PYTHONDONTWRITEBYTECODE``, as an installed package has its .pyc files), filled by
an untimed warm-up run of every suite with one test before the rounds (this also fills the
page cache). In each round every suite runs once, the order rotated by one per round.

Targets: the marker suite at least 10x faster than each torch all_reduce suite, and at least
15x faster than torch-spawn; fastspawn's MultiProcessTestCase at least 5x faster than torch's
(all_reduce family) and at least 7x (the c10d class); fastspawn's MultiProcContinuousTest at
least 5x faster than torch's. Writes ``results/suite_bench.md`` and ``results/suite_bench.json``
(``suite_bench_quick.*`` with ``--quick``).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _suite_files import PROBE, family, suite_count, suite_source  # noqa: E402
from spawn_bench import describe, div, fmt_x, loadavg, log, machine_info, table, wait_for_quiet, write_atomic  # noqa: E402

SUITES = (
    "marker",
    "fastspawn-mptc",
    "torch-spawn",
    "torch-mptc",
    "fastspawn-continuous",
    "torch-continuous",
    "fastspawn-c10d",
    "torch-c10d",
)
REFERENCE = "startup"
TARGETS = (
    # (faster suite, slower suite, factor)
    ("marker", "torch-spawn", 10.0),
    ("marker", "torch-mptc", 10.0),
    ("fastspawn-mptc", "torch-mptc", 5.0),
    ("marker", "torch-spawn", 15.0),
    ("fastspawn-continuous", "torch-continuous", 5.0),
    ("fastspawn-c10d", "torch-c10d", 7.0),
)
# (faster, slower): every speed-up the report lists
PAIRS = (
    ("marker", "torch-spawn"),
    ("marker", "torch-mptc"),
    ("fastspawn-mptc", "torch-spawn"),
    ("fastspawn-mptc", "torch-mptc"),
    ("fastspawn-continuous", "torch-continuous"),
    ("fastspawn-c10d", "torch-c10d"),
)
DESCRIPTION = {
    "marker": "`@pytest.mark.spawn(nprocs=2)`, fixtures `rank`, `world_size`, `init_method`",
    "fastspawn-mptc": "`fastspawn.testing.MultiProcessTestCase`",
    "torch-spawn": "`torch.multiprocessing.spawn(fn, nprocs=2)` in each test",
    "torch-mptc": "torch's `MultiProcessTestCase` (`torch.testing._internal.common_distributed`)",
    "fastspawn-continuous": "`fastspawn.testing.MultiProcContinuousTest`",
    "torch-continuous": "torch's `MultiProcContinuousTest`",
    "fastspawn-c10d": "c10d-style class on `fastspawn.testing.MultiProcessTestCase`",
    "torch-c10d": "c10d-style class on torch's `MultiProcessTestCase`",
    "startup": "reference: N empty tests, module imports `torch.distributed`",
}
FAMILY_TITLE = {
    "all_reduce": "N tests, each: a gloo group (`file://` rendezvous), one `all_reduce`",
    "continuous": "one `MultiProcContinuousTest` class of N tests, each one tiny collective on the class's group",
    "c10d": "a 7-test torch-style c10d class (`FileStore` + `init_process_group`, a collective or two per test)",
}
# Only these suites need fastspawn.testing.MultiProcContinuousTest.
NEEDS_CONTINUOUS = ("fastspawn-continuous",)
RUN_TIMEOUT = 1800.0  # seconds for one whole pytest run


# ------------------------------------------------------------------------ running
def missing_suites(suites: Sequence[str]) -> Dict[str, str]:
    """The selected suites this installation cannot run, with the reason."""
    need = [s for s in suites if s in NEEDS_CONTINUOUS]
    if not need:
        return {}
    code = "import fastspawn.testing as t; t.MultiProcContinuousTest"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    if proc.returncode == 0:
        return {}
    last = (proc.stderr.strip().splitlines() or ["?"])[-1]
    return {s: f"fastspawn.testing.MultiProcContinuousTest is missing ({last})" for s in need}


def run_env(directory: Path) -> Dict[str, str]:
    """The environment of every pytest run: a private bytecode cache, the probe's output."""
    env = dict(os.environ, PYTHONPYCACHEPREFIX=str(directory / "pycache"), SUITE_BENCH_PROBE=str(directory / "probe.json"))
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    return env


def phases(probe: Dict[str, Any], t0: float, t_end: float) -> Optional[Dict[str, Any]]:
    """Split one run by the probe's clock: start-up and collection, first test, the others, the end."""
    spans: Dict[str, List[float]] = {}
    first_phases: Dict[str, float] = {}
    order: List[str] = []
    for nodeid, when, start, stop, _outcome in probe.get("tests", []):
        if nodeid not in spans:
            spans[nodeid] = [start, stop]
            order.append(nodeid)
        else:
            spans[nodeid][0] = min(spans[nodeid][0], start)
            spans[nodeid][1] = max(spans[nodeid][1], stop)
        if nodeid == order[0]:
            first_phases[when] = first_phases.get(when, 0.0) + (stop - start)
    if not order or "collected" not in probe:
        return None
    durations = [spans[n][1] - spans[n][0] for n in order]
    others = durations[1:]
    return {
        "collected_s": probe["collected"] - t0,
        "to_first_test_s": spans[order[0]][0] - t0,
        "first_test": order[0],
        "first_test_s": durations[0],
        "first_test_phases_s": first_phases,
        "others_median_s": statistics.median(others) if others else None,
        "others_total_s": sum(others),
        "after_last_test_s": t_end - max(stop for _, stop in spans.values()),
        "tests_s": dict(zip(order, durations)),
    }


def run_suite(path: Path, count: int, env: Dict[str, str]) -> Dict[str, Any]:
    """One whole pytest run of the module at ``path``: wall time, what pytest said, the probe's split."""
    probe_path = Path(env["SUITE_BENCH_PROBE"])
    probe_path.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", path.name]
    t0 = time.time()
    start = time.perf_counter()
    proc = subprocess.Popen(
        cmd, cwd=path.parent, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    try:
        output, _ = proc.communicate(timeout=RUN_TIMEOUT)
        timed_out = False
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the run's own session: pytest and whatever it started
        output, _ = proc.communicate()
        timed_out = True
    wall = time.perf_counter() - start
    t_end = time.time()
    lines = output.strip().splitlines()
    summary = f"timed out after {RUN_TIMEOUT:.0f} s" if timed_out else (lines[-1] if lines else "")
    passed = re.search(r"(\d+) passed", summary)
    ok = proc.returncode == 0 and passed is not None and int(passed.group(1)) == count
    result: Dict[str, Any] = {"wall_s": wall, "ok": ok, "summary": summary, "loadavg": loadavg()}
    if probe_path.exists():
        result["phases"] = phases(json.loads(probe_path.read_text()), t0, t_end)
        probe_path.unlink()
    if not ok:
        result["output_tail"] = "\n".join(lines[-40:])
    return result


def write_suites(counts: Dict[str, int], directory: Path) -> Dict[str, Path]:
    """Each suite's test module with its number of tests, alone in its own directory under
    ``directory`` with the probe (a run sees no other suite's file)."""
    paths = {}
    for suite, count in counts.items():
        name = suite.replace("-", "_")
        path = directory / name / f"test_{name}.py"
        path.parent.mkdir(parents=True)
        (path.parent / "conftest.py").write_text(PROBE)
        path.write_text(suite_source(suite, count))
        paths[suite] = path
    return paths


def warm_up(suites: Sequence[str], directory: Path, env: Dict[str, str]) -> Dict[str, Dict[str, Any]]:
    """One untimed run of every suite with one test: bytecode cache and page cache."""
    results = {}
    for suite, path in write_suites({s: 1 for s in suites}, directory / "warmup").items():
        result = results[suite] = run_suite(path, 1, env)
        log(f"warm-up  {suite:21s} {result['wall_s']:8.2f} s  {'ok' if result['ok'] else 'FAILED: ' + result['summary']}")
        if not result["ok"]:
            log(result.get("output_tail", ""))
    return results


def run_rounds(suites: Sequence[str], tests: int, rounds: int, directory: Path, env: Dict[str, str]) -> Dict[str, List[Dict[str, Any]]]:
    """Every suite once per round, the order rotated by one each round."""
    paths = write_suites({s: suite_count(s, tests) for s in suites}, directory / "suites")
    runs: Dict[str, List[Dict[str, Any]]] = {suite: [] for suite in suites}
    for r in range(rounds):
        shift = r % len(suites)
        for suite in [*suites[shift:], *suites[:shift]]:
            result = run_suite(paths[suite], suite_count(suite, tests), env)
            result["round"] = r
            runs[suite].append(result)
            status = "ok" if result["ok"] else f"FAILED: {result['summary']}"
            log(f"round {r + 1}/{rounds} {suite:21s} {result['wall_s']:8.2f} s  {status}")
    return runs


# ------------------------------------------------------------------------ report
PHASE_KEYS = ("collected_s", "to_first_test_s", "first_test_s", "others_median_s", "others_total_s", "after_last_test_s")


def median_phases(results: Sequence[Dict[str, Any]]) -> Optional[Dict[str, Any]]:
    """Each phase's median over the passing runs that have the probe's split."""
    split = [r["phases"] for r in results if r["ok"] and r.get("phases")]
    if not split:
        return None
    out: Dict[str, Any] = {}
    for key in PHASE_KEYS:
        values = [p[key] for p in split if p.get(key) is not None]
        out[key] = statistics.median(values) if values else None
    out["first_test_phases_s"] = {
        when: statistics.median([p["first_test_phases_s"].get(when, 0.0) for p in split])
        for when in ("setup", "call", "teardown")
    }
    return out


def summarise(runs: Dict[str, List[Dict[str, Any]]], tests: int, missing: Dict[str, str]) -> Dict[str, Any]:
    stats = {suite: describe([r["wall_s"] for r in results if r["ok"]]) for suite, results in runs.items()}

    def median_of(suite: str) -> Optional[float]:
        return (stats.get(suite) or {}).get("median")

    startup = median_of(REFERENCE)
    per_test = {}
    for suite in runs:
        count = suite_count(suite, tests)
        wall = median_of(suite)
        per_test[suite] = {
            "tests": count,
            "wall_ms": div(wall, count / 1000.0),
            "beyond_startup_ms": div(None if startup is None or wall is None else wall - startup, count / 1000.0),
        }
    ratios = {f"{slow}/{fast}": div(median_of(slow), median_of(fast)) for fast, slow in PAIRS if fast in runs and slow in runs}
    targets = []
    for fast, slow, factor in TARGETS:
        measured = div(median_of(slow), median_of(fast))
        absent = [s for s in (fast, slow) if median_of(s) is None]
        note = "; ".join(missing.get(s, f"{s} not run" if s not in runs else f"{s} did not pass") for s in absent)
        targets.append(
            {
                "target": f"{fast} at least {factor:g}x faster than {slow}",
                "factor": factor,
                "measured": measured,
                "status": "n/a" if measured is None else ("PASS" if measured >= factor else "FAIL"),
                "note": note,
            }
        )
    split = {suite: median_phases(results) for suite, results in runs.items()}
    return {"stats": stats, "per_test": per_test, "ratios": ratios, "targets": targets, "phases": split, "missing": missing}


def _s(value: Optional[float], digits: int = 2) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def _waited(wait: Optional[Dict[str, Any]]) -> str:
    if not wait:
        return ""
    reached = "reached" if wait["quiet"] else "not reached"
    return f" Before starting, waited {wait['waited_s']:.0f} s for the 1-min load to drop to ≤ {wait['threshold']:g} ({reached})."


def render(summary: Dict[str, Any], runs: Dict[str, List[Dict[str, Any]]], args: argparse.Namespace, info: Dict[str, Any]) -> str:
    out = [
        "# Test-suite benchmark: distributed test suites, gloo, world size 2",
        "",
        f"N = {args.tests} tests per suite (the c10d class: 7), {args.rounds} round(s), each suite one whole "
        f"`python -m pytest` run (wall time, median over rounds). {info.get('nproc')} CPUs, Python {info.get('python')}, "
        f"torch {info.get('torch')}, {info.get('date')}, git {str(info.get('git_commit'))[:10]}. "
        f"Load average (1/5/15 min) at the start {info.get('loadavg_start')}, at the end {info.get('loadavg_end')}: "
        "the machine is shared, so absolute times are noisy; the suites run interleaved."
        + _waited(info.get("load_wait")),
        "",
        "Families (the suites of a family run the same tests): "
        + "; ".join(f"**{name}**: {text}" for name, text in FAMILY_TITLE.items())
        + ".",
        "",
        "## Targets",
        "",
    ]
    out += table(
        ["target", "measured", "status"],
        [[t["target"], fmt_x(t["measured"]), t["status"] + (f" ({t['note']})" if t["note"] else "")] for t in summary["targets"]],
    )
    if summary["missing"]:
        out += ["", "## Not run", ""]
        out += [f"- {suite}: {reason}" for suite, reason in summary["missing"].items()]
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
                family(suite) if suite != REFERENCE else "—",
                DESCRIPTION[suite],
                str(per["tests"]),
                "—" if "median" not in stats else f"{stats['median']:.1f}",
                "—" if "median" not in stats else f"{stats['min']:.1f}–{stats['max']:.1f}",
                "—" if per["wall_ms"] is None else f"{per['wall_ms']:.0f}",
                "—" if per["beyond_startup_ms"] is None or suite == REFERENCE else f"{per['beyond_startup_ms']:.0f}",
                str(failed) if failed else "",
            ]
        )
    out += table(["suite", "family", "what", "tests", "wall s", "range s", "ms / test", "ms / test beyond startup", "failed runs"], rows)
    out += ["", "## Speed-ups (torch suite wall time ÷ fastspawn suite wall time)", ""]
    out += table(["ratio", "factor"], [[name, fmt_x(value)] for name, value in summary["ratios"].items()])
    out += [
        "",
        "## Where the time goes",
        "",
        "Seconds from the start of the pytest process (medians over the passing runs): when "
        "collection ended, when the first test's setup began, how long the first test took "
        "(setup / call / teardown), the other tests (median ms each, total s), and from the end "
        "of the last test to the process's exit.",
        "",
    ]
    rows = []
    for suite in [*SUITES, REFERENCE]:
        split = summary["phases"].get(suite)
        if suite not in runs or not split:
            continue
        first = split["first_test_phases_s"]
        rows.append(
            [
                suite,
                _s(split["collected_s"]),
                _s(split["to_first_test_s"]),
                f"{_s(split['first_test_s'])} ({_s(first['setup'])} / {_s(first['call'])} / {_s(first['teardown'])})",
                "—" if split["others_median_s"] is None else f"{split['others_median_s'] * 1000:.0f}",
                _s(split["others_total_s"]),
                _s(split["after_last_test_s"]),
            ]
        )
    out += table(
        ["suite", "collected at s", "first test at s", "first test s (setup / call / teardown)", "other tests ms (median)", "other tests s (total)", "after last test s"],
        rows,
    )
    out += [
        "",
        "`ms / test beyond startup` subtracts the `startup` run (pytest plus `import torch.distributed`, "
        "N empty tests) from the suite's wall time, divided by the suite's test count: what each test "
        "itself costs. torch's ways start 2 fresh interpreters per test (per class for "
        "`MultiProcContinuousTest`), each importing torch and the test module; fastspawn's fork 2 ranks "
        "from a zygote that imported the test module once. For the `MultiProcContinuousTest` suites "
        "the first test includes starting the class's ranks and their process group, and the last "
        "test's teardown includes stopping them.",
    ]
    errors = [(s, r) for s, results in runs.items() for r in results if not r["ok"]]
    if errors:
        out += ["", "## Errors", ""]
        for suite, result in errors:
            out += [f"{suite}, round {result['round'] + 1}: {result['summary']}", "", "```", result.get("output_tail", ""), "```"]
    return "\n".join(out) + "\n"


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tests", type=int, default=None, help="N, tests per suite but the c10d class (default 40; 8 with --quick)")
    parser.add_argument("--rounds", type=int, default=1, help="interleaved rounds (default 1)")
    parser.add_argument("--quick", action="store_true", help="development run: N = 8")
    parser.add_argument("--suites", nargs="+", choices=[*SUITES, REFERENCE], default=[*SUITES, REFERENCE])
    parser.add_argument("--out-dir", type=Path, default=HERE / "results")
    parser.add_argument("--wait-load", type=float, default=None, metavar="L",
                        help="first wait until the 1-minute load average is <= L (at most --wait-max s)")
    parser.add_argument("--wait-max", type=float, default=900.0, help="seconds --wait-load waits at most (900)")
    args = parser.parse_args(argv)
    if args.tests is None:
        args.tests = 8 if args.quick else 40
    if args.tests < 1 or args.rounds < 1:
        parser.error("--tests and --rounds must be at least 1")

    load_wait = wait_for_quiet(args.wait_load, args.wait_max) if args.wait_load is not None else None
    info = machine_info()
    info["load_wait"] = load_wait
    missing = missing_suites(args.suites)
    for suite, reason in missing.items():
        log(f"not running {suite}: {reason}")
    suites = [s for s in args.suites if s not in missing]
    with tempfile.TemporaryDirectory(prefix="suite-bench-") as name:
        directory = Path(name)
        env = run_env(directory)
        warm = warm_up(suites, directory, env)
        runs = run_rounds(suites, args.tests, args.rounds, directory, env)
    info["loadavg_end"] = loadavg()
    summary = summarise(runs, args.tests, missing)
    report = render(summary, runs, args, info)
    print(report)
    name = "suite_bench_quick" if args.quick else "suite_bench"
    write_atomic(args.out_dir / f"{name}.md", report)
    record = {"tests": args.tests, "rounds": args.rounds, "machine": info, "warm_up": warm, "runs": runs, **summary}
    write_atomic(args.out_dir / f"{name}.json", json.dumps(record, indent=2) + "\n")
    log(f"wrote {args.out_dir / (name + '.md')} and .json")
    return 0 if all(r["ok"] for results in runs.values() for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
