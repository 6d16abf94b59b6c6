#!/usr/bin/env python
"""Benchmark fastspawn against torch.multiprocessing, stdlib multiprocessing and raw fork.

    python benchmarks/spawn_bench.py              # default: 3 rounds, nprocs 1 2 4 8 16 64
    python benchmarks/spawn_bench.py --quick      # smoke run: 2 rounds, nprocs 1 4
    python benchmarks/spawn_bench.py --wait-load 1.0   # first wait (<= 15 min) for a quiet machine

Every measurement runs in a fresh driver process whose ``__main__`` is either
``_driver_plain.py`` (imports nothing heavy) or ``_driver_torch.py`` (imports torch at top
level): spawn children re-import ``__main__``, so the main module is part of the cost.
A driver times one contender (see ``_bench_driver.py``); this script runs the drivers
round by round, every contender once per round in a rotating order, evaluates the
targets of the zygote work (the "Targets" section) and writes ``results/spawn_bench.json``,
``results/spawn_bench.md`` and ``results/spawn_bench.png`` (see benchmarks/README.md).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
DRIVERS = {"plain": HERE / "_driver_plain.py", "torch": HERE / "_driver_torch.py"}
MAIN_LABEL = {
    "plain": "main module imports nothing heavy",
    "torch": "main module imports torch",
}

START_CONTENDERS = [
    "fastspawn-zygote-cold",
    "fastspawn-zygote",
    "fastspawn-fresh",
    "fastspawn-fork",
    "torch-spawn",
    "torch-forkserver",
    "torch-forkserver-parallel",
    "torch-fork",
    "mp-spawn",
    "mp-fork",
    "raw-fork",
]
# Not run unless named in --contenders: the zygote serves forkserver like spawn.
EXTRA_CONTENDERS = ["fastspawn-forkserver"]
CONTENDER_LABEL = {
    "fastspawn-zygote-cold": "fastspawn zygote, first call (cold: starts the zygote)",
    "fastspawn-zygote": "fastspawn zygote, later calls (warm)",
    "fastspawn-fresh": "fastspawn fresh exec (zygote=False)",
    "fastspawn-forkserver": "fastspawn forkserver (zygote, warm)",
    "fastspawn-fork": "fastspawn fork",
    "torch-spawn": "torch spawn",
    "torch-forkserver": "torch forkserver",
    "torch-forkserver-parallel": "torch forkserver, TORCH_MP_PARALLEL_START=1",
    "torch-fork": "torch fork",
    "mp-spawn": "stdlib mp spawn (Process start+join)",
    "mp-fork": "stdlib mp fork (Process start+join)",
    "raw-fork": "raw floor: os.fork + os._exit + waitpid",
}
SHORT_LABEL = {
    "fastspawn-zygote-cold": "fastspawn zygote first call",
    "fastspawn-zygote": "fastspawn zygote later calls",
    "fastspawn-fresh": "fastspawn fresh exec",
    "fastspawn-forkserver": "fastspawn forkserver",
    "fastspawn-fork": "fastspawn fork",
    "torch-spawn": "torch spawn",
    "torch-forkserver": "torch forkserver",
    "torch-forkserver-parallel": "torch forkserver parallel",
    "torch-fork": "torch fork",
    "mp-spawn": "stdlib spawn",
    "mp-fork": "stdlib fork",
    "raw-fork": "raw fork floor",
}
# Timed calls per driver at least (each cold-zygote call costs a zygote start: with the
# torch main module over a second, so the time target alone would give one call).
MIN_CALLS = {"fastspawn-zygote-cold": 3}

FAILFAST_CONTENDERS = ["fastspawn-zygote", "torch-spawn"]
FAILFAST_NPROCS = 4
WAKEUP_CONTENDERS = ["fastspawn-zygote", "fastspawn-fork", "torch-fork"]
WAKEUP_NPROCS = (1, 4)
WAKEUP_MAX_ROUNDS = 2  # each wake-up driver yields tens of samples; 2 rounds are plenty
MEMORY_CONTENDERS = ["fastspawn-zygote", "fastspawn-fresh", "torch-spawn", "torch-fork"]
MEMORY_NPROCS = 4
MEMORY_MAX_ROUNDS = 2  # each memory driver samples MEMORY_NPROCS children
TARGET_NPROCS = 4  # the targets' nprocs (unless they say otherwise)

# Speed-up columns of the summary: (fastspawn contender, baseline contender).
SPEEDUPS = [
    ("fastspawn-zygote", "torch-spawn"),
    ("fastspawn-zygote", "torch-forkserver"),
    ("fastspawn-zygote", "torch-forkserver-parallel"),
    ("fastspawn-zygote", "mp-spawn"),
    ("fastspawn-zygote-cold", "torch-spawn"),
    ("fastspawn-fresh", "torch-spawn"),
    ("fastspawn-fresh", "mp-spawn"),
    ("fastspawn-fork", "torch-fork"),
    ("fastspawn-fork", "mp-fork"),
]
FLOOR_RATIOS = ["fastspawn-zygote", "fastspawn-fork"]  # ÷ raw fork floor
# Per (main, nprocs) tables: each fastspawn contender against these baselines.
RATIO_BASELINES = ["torch-spawn", "torch-forkserver", "torch-forkserver-parallel", "torch-fork", "mp-spawn", "mp-fork"]
FASTSPAWN_CONTENDERS = ["fastspawn-zygote", "fastspawn-zygote-cold", "fastspawn-fresh", "fastspawn-forkserver", "fastspawn-fork"]

DRIVER_TIMEOUT = 1800.0


def slow_round_cap(nprocs: int) -> int:
    """Rounds a slow cell (a call over --slow-threshold in round 1) runs in at most.

    Two at the nprocs the targets are evaluated at, one elsewhere: the slow cells are the
    ones whose children import torch (a second or more per child on 2 cores); at
    nprocs 64 one call is over a minute.
    """
    return 2 if nprocs == TARGET_NPROCS else 1


class Cell:
    """One (main module, measurement kind, nprocs, contender): its samples over rounds."""

    def __init__(self, main: str, kind: str, nprocs: int, contender: str, max_rounds: int) -> None:
        # max_rounds: every round, except wake-up and memory cells (see max_rounds_for) and slow cells.
        self.main = main
        self.kind = kind
        self.nprocs = nprocs
        self.contender = contender
        self.max_rounds = max_rounds
        self.slow = False
        self.capped = False
        self.rounds: List[Dict[str, Any]] = []
        self.errors: List[str] = []

    @property
    def key(self) -> str:
        return f"{self.main}/{self.kind}/n{self.nprocs}/{self.contender}"

    def values(self, name: str) -> List[float]:
        return [v for r in self.rounds for v in r["samples"].get(name, [])]

    def cold(self) -> List[float]:
        return [r["cold_ms"] for r in self.rounds]

    def to_json(self) -> Dict[str, Any]:
        summary = {name: describe(self.values(name)) for name in (self.rounds[0]["samples"] if self.rounds else {})}
        summary["cold_ms"] = describe(self.cold())
        return {
            "main": self.main,
            "kind": self.kind,
            "nprocs": self.nprocs,
            "contender": self.contender,
            "slow": self.slow,
            "capped": self.capped,
            "max_rounds": self.max_rounds,
            "rounds_run": len(self.rounds),
            "summary": summary,
            "rounds": self.rounds,
            "errors": self.errors,
        }


def describe(values: Sequence[float]) -> Optional[Dict[str, float]]:
    if not values:
        return None
    out = {
        "n": len(values),
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
    }
    if len(values) >= 2:
        q = statistics.quantiles(values, n=4, method="inclusive")
        out["q1"], out["q3"] = q[0], q[2]
    return out


def median(values: Sequence[float]) -> Optional[float]:
    return statistics.median(values) if values else None


# ---------------------------------------------------------------------------------------
# Running drivers.


def run_driver(cell: Cell, target: float, max_calls: int) -> Tuple[Optional[Dict[str, Any]], str]:
    env = dict(os.environ)
    env.pop("TORCH_MP_PARALLEL_START", None)
    env.pop("FASTSPAWN_ZYGOTE", None)  # each fastspawn contender says zygote=True/False itself
    if cell.contender == "torch-forkserver-parallel":
        env["TORCH_MP_PARALLEL_START"] = "1"
    cmd = [
        sys.executable,
        str(DRIVERS[cell.main]),
        "--kind", cell.kind,
        "--contender", cell.contender,
        "--nprocs", str(cell.nprocs),
        "--target", str(target),
        "--min-calls", str(MIN_CALLS.get(cell.contender, 1)),
        "--max-calls", str(max_calls),
    ]  # fmt: skip
    try:
        proc = subprocess.run(
            cmd, env=env, cwd=str(HERE), capture_output=True, text=True, timeout=DRIVER_TIMEOUT
        )
    except subprocess.TimeoutExpired:
        return None, f"driver timed out after {DRIVER_TIMEOUT:.0f} s"
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or "")[-1500:]
        return None, f"driver exited with {proc.returncode}: {tail}"
    return json.loads(lines[-1]), ""


def build_groups(args: argparse.Namespace) -> List[Tuple[str, str, int, List[str]]]:
    def keep(names: Sequence[str]) -> List[str]:
        return [c for c in names if not args.contenders or c in args.contenders]

    start = START_CONTENDERS + [c for c in EXTRA_CONTENDERS if args.contenders and c in args.contenders]
    groups = []
    for main in args.mains:
        for n in args.nprocs:
            groups.append((main, "start", n, keep(start)))
        if not args.skip_failfast:
            groups.append((main, "failfast", FAILFAST_NPROCS, keep(FAILFAST_CONTENDERS)))
        if not args.skip_wakeup:
            for n in WAKEUP_NPROCS:
                groups.append((main, "wakeup", n, keep(WAKEUP_CONTENDERS)))
        if not args.skip_memory:
            groups.append((main, "memory", MEMORY_NPROCS, keep(MEMORY_CONTENDERS)))
    return [g for g in groups if g[3]]


def log(msg: str) -> None:
    sys.stderr.write(msg + "\n")
    sys.stderr.flush()


def loadavg() -> Optional[Tuple[float, float, float]]:
    return os.getloadavg() if hasattr(os, "getloadavg") else None


def wait_for_quiet(threshold: float, max_wait: float) -> Dict[str, Any]:
    """Sleep until the 1-minute load average is at most ``threshold`` (or ``max_wait`` s)."""
    before = loadavg()
    t0 = time.monotonic()
    load = before
    while load is not None and load[0] > threshold and time.monotonic() - t0 < max_wait:
        log(f"waiting for a quiet machine: 1-min load {load[0]:.2f} > {threshold:g} ({time.monotonic() - t0:.0f} s)")
        time.sleep(15)
        load = loadavg()
    waited = time.monotonic() - t0
    quiet = load is None or load[0] <= threshold
    if not quiet:
        log(f"gave up waiting after {waited:.0f} s: 1-min load {load[0]:.2f}")  # type: ignore[index]
    return {"threshold": threshold, "max_wait_s": max_wait, "waited_s": waited, "loadavg_before": before,
            "loadavg_after": load, "quiet": quiet}  # fmt: skip


def max_rounds_for(kind: str, rounds: int) -> int:
    if kind == "wakeup":
        return min(rounds, WAKEUP_MAX_ROUNDS)
    if kind == "memory":
        return min(rounds, MEMORY_MAX_ROUNDS)
    return rounds


def mib(v: Optional[float]) -> Optional[float]:
    return None if v is None else v / 2**20


def run_rounds(args: argparse.Namespace, groups) -> Tuple[Dict[str, Cell], List[Dict[str, Any]]]:
    cells: Dict[str, Cell] = {}
    for main, kind, n, contenders in groups:
        for c in contenders:
            cell = Cell(main, kind, n, c, max_rounds_for(kind, args.rounds))
            cells[cell.key] = cell
    rounds_info = []
    t_start = time.monotonic()
    for r in range(args.rounds):
        rounds_info.append({"round": r + 1, "t_s": time.monotonic() - t_start, "loadavg": loadavg()})
        log(f"--- round {r + 1}/{args.rounds} (t={time.monotonic() - t_start:.0f} s, load {rounds_info[-1]['loadavg']})")
        for main, kind, n, contenders in groups:
            shift = r % len(contenders)
            for c in contenders[shift:] + contenders[:shift]:
                cell = cells[f"{main}/{kind}/n{n}/{c}"]
                if r >= cell.max_rounds:
                    continue
                t0 = time.monotonic()
                out, err = run_driver(cell, args.target, args.max_calls)
                wall = time.monotonic() - t0
                if out is None:
                    cell.errors.append(f"round {r + 1}: {err}")
                    log(f"  {cell.key}: ERROR {err.strip().splitlines()[-1] if err.strip() else err}")
                    continue
                record = {"round": r + 1, "cold_ms": out["cold_ms"], "samples": out["samples"], "wall_s": wall}
                if "zygote_pids" in out:
                    record["zygote_pids"] = out["zygote_pids"]
                cell.rounds.append(record)
                ms = out["samples"]["ms"]
                extra = ""
                if kind == "failfast":
                    extra = f", raise->exception {median(out['samples']['detect_ms']):.1f} ms"
                elif kind == "wakeup":
                    extra = f", wake-up {median(out['samples']['wake_ms']):.2f} ms"
                elif kind == "memory":
                    extra = (
                        f", child USS {mib(median(out['samples']['uss'])):.1f} MiB"
                        f" PSS {mib(median(out['samples']['pss'])):.1f} MiB"
                    )
                log(
                    f"  {main:5s} {kind:8s} n={n:<3d} {c:26s} {median(ms):9.1f} ms/call x{len(ms):<3d}"
                    f" cold {out['cold_ms']:8.1f} ms{extra}  [{wall:.1f} s]"
                )
                if r == 0 and not args.no_cap and median(ms) > args.slow_threshold * 1e3:
                    cell.slow = True
                    cap = min(cell.max_rounds, slow_round_cap(n))
                    if cap < cell.max_rounds:
                        cell.capped = True
                        cell.max_rounds = cap
                        log(f"    slow (> {args.slow_threshold:g} s/call): limited to {cap} round(s)")
    return cells, rounds_info


# ---------------------------------------------------------------------------------------
# Reporting.


def machine_info() -> Dict[str, Any]:
    def version(dist: str) -> Optional[str]:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return None

    def first_line(path: str, prefix: str) -> Optional[str]:
        try:
            with open(path) as f:
                for line in f:
                    if line.startswith(prefix):
                        return line.split(":", 1)[1].strip()
        except OSError:
            pass
        return None

    def git(*cmd: str) -> Optional[str]:
        try:
            return subprocess.run(
                ["git", "-C", str(REPO), *cmd], capture_output=True, text=True, timeout=10
            ).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return None

    return {
        "nproc": os.cpu_count(),
        "nproc_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "cpu_model": first_line("/proc/cpuinfo", "model name"),
        "mem_total": first_line("/proc/meminfo", "MemTotal"),
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "python_implementation": platform.python_implementation(),
        "python_executable": sys.executable,
        "torch": version("torch"),
        "fastspawn": version("fastspawn"),
        "psutil": version("psutil"),
        "matplotlib": version("matplotlib"),
        "git_commit": git("rev-parse", "HEAD"),
        "git_branch": git("rev-parse", "--abbrev-ref", "HEAD"),
        "git_dirty": bool(git("status", "--porcelain", "--untracked-files=no")),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "loadavg_start": loadavg(),
    }


def _digits(v: float) -> str:
    """About 3 significant digits, at least 2 decimals below 10."""
    if v >= 100:
        return f"{v:.0f}"
    if v >= 10:
        return f"{v:.1f}"
    return f"{v:.2f}"


def fmt_ms(v: Optional[float]) -> str:
    return "—" if v is None else _digits(v)


def fmt_x(v: Optional[float]) -> str:
    """A factor, e.g. 3.34×."""
    return "—" if v is None else f"{_digits(v)}×"


def fmt_mib(v: Optional[float]) -> str:
    return "—" if v is None else f"{v / 2**20:.1f}"


def div(a: Optional[float], b: Optional[float]) -> Optional[float]:
    return a / b if a is not None and b else None


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> List[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(row) + " |" for row in rows]
    return out


def med(cells: Dict[str, Cell], main: str, kind: str, n: int, contender: str, name: str = "ms") -> Optional[float]:
    cell = cells.get(f"{main}/{kind}/n{n}/{contender}")
    return median(cell.values(name)) if cell else None


def compute_ratios(cells: Dict[str, Cell], args: argparse.Namespace) -> List[Dict[str, Any]]:
    """Every fastspawn contender against every baseline, per main module and nprocs."""
    ratios = []
    for main in args.mains:
        for n in args.nprocs:
            for fs in FASTSPAWN_CONTENDERS:
                a = med(cells, main, "start", n, fs)
                if a is None:
                    continue
                for base in RATIO_BASELINES + ["raw-fork"]:
                    b = med(cells, main, "start", n, base)
                    ratios.append(
                        {
                            "main": main,
                            "nprocs": n,
                            "fastspawn": fs,
                            "baseline": base,
                            "fastspawn_ms": a,
                            "baseline_ms": b,
                            "ratio": div(a, b),  # fastspawn ÷ baseline (< 1: fastspawn faster)
                            "speedup": div(b, a),  # baseline ÷ fastspawn (> 1: fastspawn faster)
                        }
                    )
    return ratios


def evaluate_targets(cells: Dict[str, Cell], args: argparse.Namespace) -> List[Dict[str, Any]]:
    """The targets of the zygote work, each with its measured value and PASS/FAIL/n/a."""
    n = TARGET_NPROCS
    targets: List[Dict[str, Any]] = []

    def add(main: str, text: str, value: Optional[float], op: str, bound: float, shown: str, detail: str) -> None:
        if value is None:
            status = "n/a"
        else:
            status = "PASS" if (value >= bound if op == ">=" else value <= bound) else "FAIL"
        targets.append({"main": main, "target": text, "value": value, "op": op, "bound": bound,
                        "measured": shown if value is not None else "not measured", "detail": detail,
                        "status": status})  # fmt: skip

    def s(main: str, c: str, nn: int = n) -> Optional[float]:
        return med(cells, main, "start", nn, c)

    # Main module importing torch.
    m = "torch"
    zyg, ts, raw, cold = s(m, "fastspawn-zygote"), s(m, "torch-spawn"), s(m, "raw-fork"), s(m, "fastspawn-zygote-cold")
    v = div(ts, zyg)
    add(m, f"nprocs {n}: zygote later calls ≥ 40× faster than torch spawn", v, ">=", 40, fmt_x(v),
        f"torch spawn {fmt_ms(ts)} ms ÷ zygote {fmt_ms(zyg)} ms")  # fmt: skip
    v = div(zyg, raw)
    add(m, f"nprocs {n}: zygote later calls within 1.5× of the raw fork floor", v, "<=", 1.5, fmt_x(v),
        f"zygote {fmt_ms(zyg)} ms ÷ raw fork {fmt_ms(raw)} ms")  # fmt: skip
    v = div(ts, cold)
    add(m, f"nprocs {n}: zygote first call (cold, incl. zygote start) ≥ 2× faster than torch spawn", v, ">=", 2,
        fmt_x(v), f"torch spawn {fmt_ms(ts)} ms ÷ zygote first call {fmt_ms(cold)} ms")  # fmt: skip
    ffz, fft = med(cells, m, "failfast", FAILFAST_NPROCS, "fastspawn-zygote"), med(cells, m, "failfast", FAILFAST_NPROCS, "torch-spawn")
    dz = med(cells, m, "failfast", FAILFAST_NPROCS, "fastspawn-zygote", "detect_ms")
    dt = med(cells, m, "failfast", FAILFAST_NPROCS, "torch-spawn", "detect_ms")
    v = div(fft, ffz)
    add(m, f"nprocs {FAILFAST_NPROCS}: fail-fast (call → exception) ≥ 20× faster than torch spawn", v, ">=", 20,
        fmt_x(v), f"torch spawn {fmt_ms(fft)} ms ÷ zygote {fmt_ms(ffz)} ms (rank 0's raise → exception: "
        f"{fmt_ms(dt)} ms vs {fmt_ms(dz)} ms, {fmt_x(div(dt, dz))})")  # fmt: skip
    lo, hi = min(args.nprocs), max(args.nprocs)
    if (lo, hi) == (1, 64):
        z1, z64, r1, r64 = s(m, "fastspawn-zygote", 1), s(m, "fastspawn-zygote", 64), s(m, "raw-fork", 1), s(m, "raw-fork", 64)
        zc = None if z1 is None or z64 is None else (z64 - z1) / 63
        rc = None if r1 is None or r64 is None else (r64 - r1) / 63
        v = div(zc, rc)
        detail = f"zygote {fmt_ms(zc)} ms/child ÷ raw fork {fmt_ms(rc)} ms/child, (t64 − t1)/63"
    else:
        v, detail = None, "needs nprocs 1 and 64"
    add(m, "nprocs 64: cost per extra child of zygote later calls within 1.5× of the raw floor's", v, "<=", 1.5,
        fmt_x(v), detail)  # fmt: skip
    uz = med(cells, m, "memory", MEMORY_NPROCS, "fastspawn-zygote", "uss")
    ut = med(cells, m, "memory", MEMORY_NPROCS, "torch-spawn", "uss")
    v = div(uz, ut)
    add(m, f"nprocs {MEMORY_NPROCS}: USS of a zygote child ≤ 1/10 of a torch spawn child's", v, "<=", 0.1,
        "—" if v is None else f"1/{1 / v:.1f}" if v else "0",
        f"zygote child {fmt_mib(uz)} MiB ÷ torch spawn child {fmt_mib(ut)} MiB")  # fmt: skip

    # Main module importing nothing heavy.
    m = "plain"
    zyg, raw, mps = s(m, "fastspawn-zygote"), s(m, "raw-fork"), s(m, "mp-spawn")
    v = div(zyg, raw)
    add(m, f"nprocs {n}: zygote later calls within 3× of the raw fork floor", v, "<=", 3, fmt_x(v),
        f"zygote {fmt_ms(zyg)} ms ÷ raw fork {fmt_ms(raw)} ms")  # fmt: skip
    v = div(mps, zyg)
    add(m, f"nprocs {n}: zygote later calls ≥ 15× faster than stdlib spawn", v, ">=", 15, fmt_x(v),
        f"stdlib spawn {fmt_ms(mps)} ms ÷ zygote {fmt_ms(zyg)} ms")  # fmt: skip
    return targets


def cell_rounds(cell: Cell) -> str:
    s = f"{len(cell.values('ms'))} ({len(cell.rounds)}r)"
    if cell.capped:
        s += " †"
    if cell.errors:
        s += f" ({len(cell.errors)} failed)"
    return s


def start_contenders_run(cells: Dict[str, Cell]) -> List[str]:
    present = {c.contender for c in cells.values() if c.kind == "start"}
    return [c for c in START_CONTENDERS + EXTRA_CONTENDERS if c in present]


def render_targets(targets: List[Dict[str, Any]]) -> List[str]:
    md = ["## Targets", ""]
    md.append(
        "Per-call medians; main module `torch` imports torch, `plain` nothing heavy. "
        "“×” is a factor between the two medians named in the last column."
    )
    md.append("")
    rows = [
        [t["status"], t["main"], t["target"], t["measured"], t["detail"]] for t in targets
    ]
    md += table(["result", "main", "target", "measured", "from"], rows)
    counts = {k: sum(1 for t in targets if t["status"] == k) for k in ("PASS", "FAIL", "n/a")}
    md.append("")
    md.append(f"{counts['PASS']} PASS, {counts['FAIL']} FAIL, {counts['n/a']} not measured.")
    md.append("")
    return md


def render_markdown(
    cells: Dict[str, Cell],
    args: argparse.Namespace,
    info: Dict[str, Any],
    elapsed: float,
    targets: List[Dict[str, Any]],
    plot_name: Optional[str],
) -> str:
    md: List[str] = ["# spawn_bench results", ""]
    md.append(
        f"{info['date']} · {info['nproc']} CPUs ({info['cpu_model']}) · Python {info['python']} · "
        f"torch {info['torch']} · fastspawn {info['fastspawn']} · commit "
        f"{(info['git_commit'] or '?')[:10]}{' (dirty)' if info['git_dirty'] else ''}"
    )
    md.append("")
    md.append(
        f"Command: `{' '.join(['python', 'benchmarks/spawn_bench.py', *sys.argv[1:]])}` · "
        f"{args.rounds} rounds · each driver times calls for ≥{args.target:g} s (max {args.max_calls}) "
        f"after one cold call with nprocs=1 · zygote first call: the zygote is stopped before each timed call "
        f"(≥{MIN_CALLS['fastspawn-zygote-cold']} calls per driver) · wake-up and memory cells run in at most "
        f"{WAKEUP_MAX_ROUNDS} and {MEMORY_MAX_ROUNDS} rounds · wall time {elapsed / 60:.1f} min"
    )
    md.append("")
    load = info.get("loadavg_start"), info.get("loadavg_end")
    wait = info.get("load_wait")
    if all(load):
        waited = ""
        if wait:
            waited = (
                f" Before starting, waited {wait['waited_s']:.0f} s for the 1-min load to drop to ≤ {wait['threshold']:g}"
                f"{'' if wait['quiet'] else ' (gave up: it did not)'}."
            )
        md.append(
            f"1-min load average at start / end: {load[0][0]:.2f} / {load[1][0]:.2f} "
            f"(on {info['nproc']} CPUs; the end value includes the benchmark's own children).{waited}"
        )
        md.append("")
    capped = [c for c in cells.values() if c.capped]
    if capped:
        caps = sorted({(slow_round_cap(c.nprocs), c.nprocs) for c in capped}, key=lambda x: x[1])
        md.append(
            f"† Slow cell: its round-1 call took more than {args.slow_threshold:g} s, so it ran in at most "
            + ", ".join(f"{cap} round{'s' if cap > 1 else ''} at nprocs {n}" for cap, n in caps)
            + f" ({len(capped)} cells; `--no-cap` runs them in every round). Their medians rest on few "
            "calls (often 1–2; at nprocs ≥ 16 a single call), so ratios between them are only as good as "
            "the machine was quiet."
        )
        md.append("")

    md += render_targets(targets)

    # Main table: time per call by nprocs.
    contenders = start_contenders_run(cells)
    md.append("## Time per call (median ms), by nprocs")
    md.append("")
    if plot_name:
        md.append(f"![time per call vs nprocs]({plot_name})")
        md.append("")
    for main in args.mains:
        md.append(f"### {main} ({MAIN_LABEL[main]})")
        md.append("")
        rows = []
        for c in contenders:
            row = [CONTENDER_LABEL[c]]
            for n in args.nprocs:
                cell = cells.get(f"{main}/start/n{n}/{c}")
                v = median(cell.values("ms")) if cell else None
                row.append(fmt_ms(v) + (" †" if cell is not None and cell.capped else ""))
            rows.append(row)
        md += table(["contender", *(f"n={n}" for n in args.nprocs)], rows)
        md.append("")

    # Summary of speed-ups.
    md.append("## Speed-ups (baseline median ÷ fastspawn median; > 1 = fastspawn faster)")
    md.append("")
    header = ["main", "nprocs"] + [f"{SHORT_LABEL[fs]} vs {SHORT_LABEL[b]}" for fs, b in SPEEDUPS]
    header += [f"{SHORT_LABEL[fs]} ÷ raw floor" for fs in FLOOR_RATIOS]
    rows = []
    for main in args.mains:
        for n in args.nprocs:
            row = [main, str(n)]
            for fs, b in SPEEDUPS:
                row.append(fmt_x(div(med(cells, main, "start", n, b), med(cells, main, "start", n, fs))))
            for fs in FLOOR_RATIOS:
                row.append(fmt_x(div(med(cells, main, "start", n, fs), med(cells, main, "start", n, "raw-fork"))))
            rows.append(row)
    md += table(header, rows)
    md.append("")

    # Per (main, nprocs) tables.
    for main in args.mains:
        for n in args.nprocs:
            group = [cells[k] for k in (f"{main}/start/n{n}/{c}" for c in contenders) if k in cells]
            if not group:
                continue
            md.append(f"## {main} ({MAIN_LABEL[main]}), nprocs {n}")
            md.append("")
            rows = []
            for cell in group:
                d = describe(cell.values("ms"))
                iqr = f"{fmt_ms(d['q1'])}–{fmt_ms(d['q3'])}" if d and "q1" in d else "—"
                rows.append(
                    [
                        CONTENDER_LABEL[cell.contender],
                        fmt_ms(d["median"] if d else None),
                        fmt_ms(d["min"] if d else None),
                        iqr,
                        cell_rounds(cell),
                        fmt_ms(median(cell.cold())),
                    ]
                )
            md += table(["contender", "median ms/call", "min", "q1–q3", "calls (rounds)", "cold call, 1 proc (ms)"], rows)
            md.append("")
            rows = []
            for fs in FASTSPAWN_CONTENDERS:
                a = med(cells, main, "start", n, fs)
                if a is None:
                    continue
                row = [SHORT_LABEL[fs]]
                row += [fmt_x(div(med(cells, main, "start", n, b), a)) for b in RATIO_BASELINES]
                row.append(fmt_x(div(a, med(cells, main, "start", n, "raw-fork"))))
                rows.append(row)
            md += table(
                ["speed-up vs (× faster)", *(SHORT_LABEL[b] for b in RATIO_BASELINES), "÷ raw fork floor (× slower)"],
                rows,
            )
            md.append("")

    # Fail-fast.
    ff = [c for c in cells.values() if c.kind == "failfast"]
    if ff:
        md.append(
            f"## Fail-fast (nprocs {FAILFAST_NPROCS}: rank 0 raises at once, the other ranks sleep 30 s)"
        )
        md.append("")
        rows = []
        for cell in ff:
            left = cell.values("leftover")
            rows.append(
                [
                    cell.main,
                    CONTENDER_LABEL[cell.contender],
                    fmt_ms(median(cell.values("ms"))),
                    fmt_ms(median(cell.values("detect_ms"))),
                    str(int(max(left))) if left else "—",
                    cell_rounds(cell),
                ]
            )
        md += table(
            ["main", "contender", "call → exception, median ms", "rank 0 raise → exception, median ms", "max children left after raise", "calls (rounds)"],
            rows,
        )
        md.append("")

    # Wake-up.
    wk = [c for c in cells.values() if c.kind == "wakeup"]
    if wk:
        md.append("## Join wake-up latency (child stamps time.time() just before exiting → join returns)")
        md.append("")
        rows = []
        for cell in wk:
            d = describe(cell.values("wake_ms"))
            rows.append(
                [
                    cell.main,
                    str(cell.nprocs),
                    CONTENDER_LABEL[cell.contender],
                    fmt_ms(d["median"] if d else None),
                    fmt_ms(d["min"] if d else None),
                    fmt_ms(d.get("q3") if d else None),
                    cell_rounds(cell),
                ]
            )
        md += table(["main", "nprocs", "contender", "median ms", "min", "q3", "calls (rounds)"], rows)
        md.append("")

    # Memory.
    mem = [c for c in cells.values() if c.kind == "memory"]
    if mem:
        md.append(
            f"## Memory per child (nprocs {MEMORY_NPROCS}; children blocked in an Event wait while "
            "the driver reads /proc/<pid>/smaps_rollup via psutil; MiB, median over children)"
        )
        md.append("")
        rows = []
        for cell in mem:
            pss = median(cell.values("pss"))
            zyg_pss = median(cell.values("zygote_pss"))
            total = None if pss is None else pss * cell.nprocs + (zyg_pss or 0)
            zyg = "—"
            if cell.values("zygote_uss"):
                zyg = f"{fmt_mib(median(cell.values('zygote_uss')))} / {fmt_mib(zyg_pss)}"
            rows.append(
                [
                    cell.main,
                    CONTENDER_LABEL[cell.contender],
                    fmt_mib(median(cell.values("uss"))),
                    fmt_mib(pss),
                    fmt_mib(median(cell.values("rss"))),
                    zyg,
                    fmt_mib(total),
                    f"{len(cell.values('uss'))} ({len(cell.rounds)}r)",
                ]
            )
        md += table(
            ["main", "contender", "child USS", "child PSS", "child RSS", "zygote USS / PSS",
             f"PSS of the {MEMORY_NPROCS} children (+ zygote)", "children sampled (rounds)"],
            rows,
        )  # fmt: skip
        md.append("")

    errors = [(c.key, e) for c in cells.values() for e in c.errors]
    if errors:
        md.append("## Errors")
        md.append("")
        for key, e in errors:
            md.append(f"- `{key}`: {e.strip().splitlines()[-1] if e.strip() else e}")
        md.append("")
    return "\n".join(md)


PLOT_STYLE = {
    # contender: (color, linestyle, marker)
    "fastspawn-zygote": ("#1f77b4", "-", "o"),
    "fastspawn-zygote-cold": ("#17becf", "-", "s"),
    "fastspawn-fresh": ("#2ca02c", "-", "^"),
    "fastspawn-forkserver": ("#9edae5", "-", "v"),
    "fastspawn-fork": ("#bcbd22", "-", "D"),
    "torch-spawn": ("#d62728", "--", "o"),
    "torch-forkserver": ("#ff7f0e", "--", "s"),
    "torch-forkserver-parallel": ("#8c564b", "--", "^"),
    "torch-fork": ("#e377c2", "--", "D"),
    "mp-spawn": ("#9467bd", "-.", "o"),
    "mp-fork": ("#7f7f7f", "-.", "D"),
    "raw-fork": ("#000000", ":", "x"),
}


def write_plot(cells: Dict[str, Cell], args: argparse.Namespace, info: Dict[str, Any], path: Path) -> Optional[str]:
    """Time per call vs nprocs, log-log, one line per contender, one panel per main module."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        return f"no plot: {exc} (pip install matplotlib, or fastspawn[bench])"
    contenders = start_contenders_run(cells)
    fig, axes = plt.subplots(1, len(args.mains), figsize=(7.5 * len(args.mains), 7.0), squeeze=False, sharey=True)
    for ax, main in zip(axes[0], args.mains):
        for c in contenders:
            color, ls, marker = PLOT_STYLE.get(c, (None, "-", "o"))
            points = []
            for n in sorted(args.nprocs):
                cell = cells.get(f"{main}/start/n{n}/{c}")
                v = median(cell.values("ms")) if cell else None
                if v is not None:
                    points.append((n, v, cell.capped))  # type: ignore[union-attr]
            if not points:
                continue
            xs, ys = [p[0] for p in points], [p[1] for p in points]
            ax.plot(xs, ys, color=color, linestyle=ls, marker=marker, markersize=5, label=SHORT_LABEL[c])
            capped = [(x, y) for x, y, cap in points if cap]
            if capped:  # hollow markers: cells capped to few rounds (see the report)
                ax.plot([p[0] for p in capped], [p[1] for p in capped], linestyle="none", marker=marker,
                        markersize=7, markerfacecolor="white", markeredgecolor=color)  # fmt: skip
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(sorted(args.nprocs))
        ax.set_xticklabels([str(n) for n in sorted(args.nprocs)])
        ax.set_xlabel("nprocs")
        ax.set_title(f"{main}: {MAIN_LABEL[main]}")
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].set_ylabel("time per call (median ms): start nprocs children + join")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=4, fontsize=9, frameon=False)
    fig.suptitle(
        f"spawn_bench · {info['nproc']} CPUs · Python {info['python']} · torch {info['torch']} · "
        f"{info['date'][:10]} · hollow markers: slow cells capped to few rounds",
        fontsize=10,
    )
    fig.tight_layout(rect=(0, 0.12, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)
    return None


def write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=None, help="rounds (default 3; 2 with --quick)")
    ap.add_argument("--nprocs", type=int, nargs="+", default=None, help="default 1 2 4 8 16 64 (1 4 with --quick)")
    ap.add_argument("--quick", action="store_true", help="smoke run: 2 rounds, nprocs 1 4")
    ap.add_argument("--mains", nargs="+", choices=sorted(DRIVERS), default=["plain", "torch"])
    ap.add_argument("--contenders", nargs="+", choices=START_CONTENDERS + EXTRA_CONTENDERS, default=None,
                    help="only these (fastspawn-forkserver runs only when named here)")  # fmt: skip
    ap.add_argument("--target", type=float, default=0.3, help="seconds of timed calls per driver (default 0.3)")
    ap.add_argument("--max-calls", type=int, default=50, help="max timed calls per driver (default 50)")
    ap.add_argument("--slow-threshold", type=float, default=1.0, help="seconds per call that make a cell slow")
    ap.add_argument("--no-cap", action="store_true", help="run slow cells in every round too")
    ap.add_argument("--skip-failfast", action="store_true")
    ap.add_argument("--skip-wakeup", action="store_true")
    ap.add_argument("--skip-memory", action="store_true")
    ap.add_argument("--wait-load", type=float, default=None, metavar="L",
                    help="first wait until the 1-minute load average is <= L (at most --wait-max s)")  # fmt: skip
    ap.add_argument("--wait-max", type=float, default=900.0, help="seconds --wait-load waits at most (900)")
    ap.add_argument("--out-dir", type=Path, default=HERE / "results")
    args = ap.parse_args(argv)
    if args.rounds is None:
        args.rounds = 2 if args.quick else 3
    if args.nprocs is None:
        args.nprocs = [1, 4] if args.quick else [1, 2, 4, 8, 16, 64]
    if args.rounds < 1 or any(n < 1 for n in args.nprocs):
        ap.error("--rounds and --nprocs must be >= 1")

    load_wait = wait_for_quiet(args.wait_load, args.wait_max) if args.wait_load is not None else None
    info = machine_info()
    info["load_wait"] = load_wait
    log(
        f"spawn_bench: {args.rounds} rounds, nprocs {args.nprocs}, mains {args.mains}; "
        f"{info['nproc']} CPUs, Python {info['python']}, torch {info['torch']}, load {info['loadavg_start']}"
    )
    t0 = time.monotonic()
    groups = build_groups(args)
    cells, rounds_info = run_rounds(args, groups)
    elapsed = time.monotonic() - t0
    info["loadavg_end"] = loadavg()

    args.out_dir.mkdir(parents=True, exist_ok=True)
    plot_path = args.out_dir / "spawn_bench.png"
    plot_error = write_plot(cells, args, info, plot_path)
    if plot_error:
        log(plot_error)
    targets = evaluate_targets(cells, args)
    md = render_markdown(cells, args, info, elapsed, targets, None if plot_error else plot_path.name)
    result = {
        "machine": info,
        "command": ["benchmarks/spawn_bench.py", *(sys.argv[1:] if argv is None else argv)],
        "config": {
            "rounds": args.rounds,
            "nprocs": args.nprocs,
            "mains": args.mains,
            "target_s": args.target,
            "max_calls": args.max_calls,
            "min_calls": MIN_CALLS,
            "slow_threshold_s": args.slow_threshold,
            "slow_round_cap": None if args.no_cap else {str(n): slow_round_cap(n) for n in args.nprocs},
            "failfast_nprocs": FAILFAST_NPROCS,
            "wakeup_nprocs": list(WAKEUP_NPROCS),
            "wakeup_max_rounds": WAKEUP_MAX_ROUNDS,
            "memory_nprocs": MEMORY_NPROCS,
            "memory_max_rounds": MEMORY_MAX_ROUNDS,
            "target_nprocs": TARGET_NPROCS,
        },
        "elapsed_s": elapsed,
        "rounds": rounds_info,
        "targets": targets,
        "ratios": compute_ratios(cells, args),
        "cells": [c.to_json() for c in cells.values()],
    }
    write_atomic(args.out_dir / "spawn_bench.json", json.dumps(result, indent=1) + "\n")
    write_atomic(args.out_dir / "spawn_bench.md", md + "\n")
    print(md)
    status = ", ".join(f"{t['status']}" for t in targets)
    log(f"targets: {status}")
    log(
        f"wrote {args.out_dir / 'spawn_bench.json'}, {args.out_dir / 'spawn_bench.md'}"
        f"{'' if plot_error else ', ' + str(plot_path)} ({elapsed / 60:.1f} min)"
    )
    return 1 if any(c.errors for c in cells.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
