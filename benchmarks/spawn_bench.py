#!/usr/bin/env python
"""Benchmark fastspawn against torch.multiprocessing, stdlib multiprocessing and raw fork.

    python benchmarks/spawn_bench.py              # default: 5 rounds, nprocs 1 4 16
    python benchmarks/spawn_bench.py --quick      # smoke run: 2 rounds, nprocs 1 4
    python benchmarks/spawn_bench.py --rounds 7 --nprocs 1 2 4 8 16 64

Every measurement runs in a fresh driver process whose ``__main__`` is either
``_driver_plain.py`` (imports nothing heavy) or ``_driver_torch.py`` (imports torch at top
level): spawn children re-import ``__main__``, so the main module is part of the cost.
A driver times one contender (see ``_bench_driver.py``); this script runs the drivers
round by round, every contender once per round in a rotating order, and writes
``results/spawn_bench.json`` and ``results/spawn_bench.md`` (see benchmarks/README.md).
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
    "fastspawn-spawn",
    "fastspawn-forkserver",
    "fastspawn-fork",
    "torch-spawn",
    "torch-forkserver",
    "torch-forkserver-parallel",
    "torch-fork",
    "mp-spawn",
    "mp-fork",
    "raw-fork",
]
CONTENDER_LABEL = {
    "fastspawn-spawn": "fastspawn spawn",
    "fastspawn-forkserver": "fastspawn forkserver",
    "fastspawn-fork": "fastspawn fork",
    "torch-spawn": "torch spawn",
    "torch-forkserver": "torch forkserver",
    "torch-forkserver-parallel": "torch forkserver, TORCH_MP_PARALLEL_START=1",
    "torch-fork": "torch fork",
    "mp-spawn": "stdlib mp spawn (Process start+join)",
    "mp-fork": "stdlib mp fork (Process start+join)",
    "raw-fork": "raw floor: os.fork + os._exit + waitpid",
}
FAILFAST_CONTENDERS = ["fastspawn-spawn", "torch-spawn"]
FAILFAST_NPROCS = 4
WAKEUP_CONTENDERS = ["fastspawn-fork", "torch-fork"]
WAKEUP_NPROCS = (1, 4)
WAKEUP_MAX_ROUNDS = 3  # each wake-up driver yields tens of samples; 3 rounds are plenty

# fastspawn method -> (torch contender(s) with the same method, stdlib contender)
RATIO_PAIRS = [
    ("spawn", "fastspawn-spawn", ["torch-spawn"], "mp-spawn"),
    ("forkserver", "fastspawn-forkserver", ["torch-forkserver", "torch-forkserver-parallel"], None),
    ("fork", "fastspawn-fork", ["torch-fork"], "mp-fork"),
]

DRIVER_TIMEOUT = 1800.0


def slow_round_cap(nprocs: int) -> int:
    """Rounds a slow cell (a call over --slow-threshold in round 1) runs in at most."""
    return 2 if nprocs <= 8 else 1


class Cell:
    """One (main module, measurement kind, nprocs, contender): its samples over rounds."""

    def __init__(self, main: str, kind: str, nprocs: int, contender: str, max_rounds: int) -> None:
        # max_rounds: every round, except wake-up cells (WAKEUP_MAX_ROUNDS) and slow cells.
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
    if cell.contender == "torch-forkserver-parallel":
        env["TORCH_MP_PARALLEL_START"] = "1"
    cmd = [
        sys.executable,
        str(DRIVERS[cell.main]),
        "--kind", cell.kind,
        "--contender", cell.contender,
        "--nprocs", str(cell.nprocs),
        "--target", str(target),
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

    groups = []
    for main in args.mains:
        for n in args.nprocs:
            groups.append((main, "start", n, keep(START_CONTENDERS)))
        if not args.skip_failfast:
            groups.append((main, "failfast", FAILFAST_NPROCS, keep(FAILFAST_CONTENDERS)))
        if not args.skip_wakeup:
            for n in WAKEUP_NPROCS:
                groups.append((main, "wakeup", n, keep(WAKEUP_CONTENDERS)))
    return [g for g in groups if g[3]]


def log(msg: str) -> None:
    sys.stderr.write(msg + "\n")
    sys.stderr.flush()


def run_rounds(args: argparse.Namespace, groups) -> Dict[str, Cell]:
    cells: Dict[str, Cell] = {}
    for main, kind, n, contenders in groups:
        for c in contenders:
            cell = Cell(main, kind, n, c, min(args.rounds, WAKEUP_MAX_ROUNDS) if kind == "wakeup" else args.rounds)
            cells[cell.key] = cell
    t_start = time.monotonic()
    for r in range(args.rounds):
        log(f"--- round {r + 1}/{args.rounds} (t={time.monotonic() - t_start:.0f} s)")
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
                cell.rounds.append(
                    {"round": r + 1, "cold_ms": out["cold_ms"], "samples": out["samples"], "wall_s": wall}
                )
                ms = out["samples"]["ms"]
                extra = ""
                if kind == "failfast":
                    extra = f", raise->exception {median(out['samples']['detect_ms']):.1f} ms"
                elif kind == "wakeup":
                    extra = f", wake-up {median(out['samples']['wake_ms']):.2f} ms"
                log(
                    f"  {main:5s} {kind:8s} n={n:<3d} {c:26s} {median(ms):9.1f} ms/call x{len(ms):<3d}"
                    f" cold {out['cold_ms']:8.1f} ms{extra}  [{wall:.1f} s]"
                )
                if r == 0 and not args.no_cap and median(ms) > args.slow_threshold * 1e3:
                    cell.slow = True
                    cap = min(args.rounds, slow_round_cap(n))
                    if cap < args.rounds:
                        cell.capped = True
                        cell.max_rounds = cap
                        log(f"    slow (> {args.slow_threshold:g} s/call): limited to {cap} round(s)")
    return cells


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
        "git_commit": git("rev-parse", "HEAD"),
        "git_dirty": bool(git("status", "--porcelain", "--untracked-files=no")),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "loadavg_start": os.getloadavg() if hasattr(os, "getloadavg") else None,
    }


def fmt_ms(v: Optional[float]) -> str:
    if v is None:
        return "—"
    if v >= 100:
        return f"{v:.0f}"
    if v >= 10:
        return f"{v:.1f}"
    return f"{v:.2f}"


def fmt_ratio(a: Optional[float], b: Optional[float]) -> str:
    if a is None or b is None or b == 0:
        return "—"
    return f"{a / b:.2f}"


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> List[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(row) + " |" for row in rows]
    return out


def compute_ratios(cells: Dict[str, Cell], args: argparse.Namespace) -> List[Dict[str, Any]]:
    ratios = []
    for main in args.mains:
        for n in args.nprocs:

            def med(c: str) -> Optional[float]:
                cell = cells.get(f"{main}/start/n{n}/{c}")
                return median(cell.values("ms")) if cell else None

            for method, fs, torch_cs, mp_c in RATIO_PAIRS:
                baselines = list(torch_cs) + ([mp_c] if mp_c else []) + ["raw-fork"]
                for base in baselines:
                    a, b = med(fs), med(base)
                    ratios.append(
                        {
                            "main": main,
                            "nprocs": n,
                            "method": method,
                            "fastspawn": fs,
                            "baseline": base,
                            "fastspawn_ms": a,
                            "baseline_ms": b,
                            "ratio": (a / b) if a is not None and b else None,
                        }
                    )
    return ratios


def cell_rounds(cell: Cell) -> str:
    s = f"{len(cell.values('ms'))} ({len(cell.rounds)}r)"
    if cell.capped:
        s += " †"
    if cell.errors:
        s += f" ({len(cell.errors)} failed)"
    return s


def render_markdown(cells: Dict[str, Cell], args: argparse.Namespace, info: Dict[str, Any], elapsed: float) -> str:
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
        f"after one cold call with nprocs=1 · wake-up cells run in at most {WAKEUP_MAX_ROUNDS} rounds · "
        f"wall time {elapsed / 60:.1f} min"
    )
    md.append("")
    load = info.get("loadavg_start"), info.get("loadavg_end")
    if all(load):
        md.append(
            f"1-min load average at start / end: {load[0][0]:.2f} / {load[1][0]:.2f} "
            f"(on {info['nproc']} CPUs; above that, something else was competing for them)."
        )
        md.append("")
    capped = [c for c in cells.values() if c.capped]
    if capped:
        caps = sorted({(slow_round_cap(c.nprocs), c.nprocs) for c in capped}, key=lambda x: x[1])
        md.append(
            f"† Slow cell: its round-1 call took more than {args.slow_threshold:g} s, so it ran in at most "
            + ", ".join(f"{cap} round{'s' if cap > 1 else ''} at nprocs {n}" for cap, n in caps)
            + f" ({len(capped)} cells; `--no-cap` runs them in every round). Their medians rest on few "
            "calls (often 1–2), so ratios between them are only as good as the machine was quiet."
        )
        md.append("")

    # Summary of ratios.
    ratios = compute_ratios(cells, args)
    md.append("## Summary: fastspawn ÷ torch, same start method (per-call median; < 1 = fastspawn faster)")
    md.append("")
    rows = []
    for main in args.mains:
        for n in args.nprocs:

            def r(fs: str, base: str) -> str:
                for x in ratios:
                    if x["main"] == main and x["nprocs"] == n and x["fastspawn"] == fs and x["baseline"] == base:
                        return fmt_ratio(x["fastspawn_ms"], x["baseline_ms"])
                return "—"

            rows.append(
                [
                    main,
                    str(n),
                    r("fastspawn-spawn", "torch-spawn"),
                    r("fastspawn-forkserver", "torch-forkserver"),
                    r("fastspawn-forkserver", "torch-forkserver-parallel"),
                    r("fastspawn-fork", "torch-fork"),
                    r("fastspawn-fork", "raw-fork"),
                ]
            )
    md += table(
        ["main", "nprocs", "spawn", "forkserver", "forkserver vs torch parallel start", "fork", "fastspawn fork ÷ raw fork"],
        rows,
    )
    md.append("")

    # Per (main, nprocs) tables.
    for main in args.mains:
        for n in args.nprocs:
            group = [cells[k] for k in (f"{main}/start/n{n}/{c}" for c in START_CONTENDERS) if k in cells]
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
            for method, fs, torch_cs, mp_c in RATIO_PAIRS:

                def med(c: Optional[str]) -> Optional[float]:
                    cell = cells.get(f"{main}/start/n{n}/{c}") if c else None
                    return median(cell.values("ms")) if cell else None

                torch_part = " / ".join(fmt_ratio(med(fs), med(t)) for t in torch_cs)
                rows.append(
                    [
                        f"fastspawn {method}",
                        torch_part,
                        fmt_ratio(med(fs), med(mp_c)) if mp_c else "—",
                        fmt_ratio(med(fs), med("raw-fork")),
                    ]
                )
            md += table(
                ["ratio (÷)", "torch same method (forkserver: plain / parallel start)", "stdlib mp same method", "raw fork floor"],
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

    errors = [(c.key, e) for c in cells.values() for e in c.errors]
    if errors:
        md.append("## Errors")
        md.append("")
        for key, e in errors:
            md.append(f"- `{key}`: {e.strip().splitlines()[-1] if e.strip() else e}")
        md.append("")
    return "\n".join(md)


def write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=None, help="rounds (default 5; 2 with --quick)")
    ap.add_argument("--nprocs", type=int, nargs="+", default=None, help="default 1 4 16 (1 4 with --quick)")
    ap.add_argument("--quick", action="store_true", help="smoke run: 2 rounds, nprocs 1 4")
    ap.add_argument("--mains", nargs="+", choices=sorted(DRIVERS), default=["plain", "torch"])
    ap.add_argument("--contenders", nargs="+", choices=START_CONTENDERS, default=None, help="only these")
    ap.add_argument("--target", type=float, default=0.3, help="seconds of timed calls per driver (default 0.3)")
    ap.add_argument("--max-calls", type=int, default=50, help="max timed calls per driver (default 50)")
    ap.add_argument("--slow-threshold", type=float, default=1.0, help="seconds per call that make a cell slow")
    ap.add_argument("--no-cap", action="store_true", help="run slow cells in every round too")
    ap.add_argument("--skip-failfast", action="store_true")
    ap.add_argument("--skip-wakeup", action="store_true")
    ap.add_argument("--out-dir", type=Path, default=HERE / "results")
    args = ap.parse_args(argv)
    if args.rounds is None:
        args.rounds = 2 if args.quick else 5
    if args.nprocs is None:
        args.nprocs = [1, 4] if args.quick else [1, 4, 16]
    if args.rounds < 1 or any(n < 1 for n in args.nprocs):
        ap.error("--rounds and --nprocs must be >= 1")

    info = machine_info()
    log(
        f"spawn_bench: {args.rounds} rounds, nprocs {args.nprocs}, mains {args.mains}; "
        f"{info['nproc']} CPUs, Python {info['python']}, torch {info['torch']}"
    )
    t0 = time.monotonic()
    groups = build_groups(args)
    cells = run_rounds(args, groups)
    elapsed = time.monotonic() - t0
    info["loadavg_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None

    md = render_markdown(cells, args, info, elapsed)
    result = {
        "machine": info,
        "command": ["benchmarks/spawn_bench.py", *(sys.argv[1:] if argv is None else argv)],
        "config": {
            "rounds": args.rounds,
            "nprocs": args.nprocs,
            "mains": args.mains,
            "target_s": args.target,
            "max_calls": args.max_calls,
            "slow_threshold_s": args.slow_threshold,
            "slow_round_cap": None if args.no_cap else {str(n): slow_round_cap(n) for n in args.nprocs},
            "failfast_nprocs": FAILFAST_NPROCS,
            "wakeup_nprocs": list(WAKEUP_NPROCS),
        },
        "elapsed_s": elapsed,
        "ratios": compute_ratios(cells, args),
        "cells": [c.to_json() for c in cells.values()],
    }
    args.out_dir.mkdir(parents=True, exist_ok=True)
    write_atomic(args.out_dir / "spawn_bench.json", json.dumps(result, indent=1) + "\n")
    write_atomic(args.out_dir / "spawn_bench.md", md + "\n")
    print(md)
    log(f"wrote {args.out_dir / 'spawn_bench.json'} and {args.out_dir / 'spawn_bench.md'} ({elapsed / 60:.1f} min)")
    return 1 if any(c.errors for c in cells.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
