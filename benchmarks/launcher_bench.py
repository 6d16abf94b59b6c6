#!/usr/bin/env python
"""Benchmark the ``fastspawn`` command against ``torchrun`` on a gloo training-script start.

    python benchmarks/launcher_bench.py              # 5 rounds, 8 ranks
    python benchmarks/launcher_bench.py --quick      # 2 rounds
    python benchmarks/launcher_bench.py --nprocs 4 --rounds 3
    python benchmarks/launcher_bench.py --wait-load 1.0   # first wait for a quiet machine

Each launcher runs the same script, which imports torch and initialises a gloo process
group; every rank writes a timestamp file right after ``init_process_group`` returns (and
one at its first line). Measured from the moment the command is started:

- ready: until the last rank is past ``init_process_group`` (the target: fastspawn at least
  5x faster than torchrun);
- launched: until the last rank ran its script's first line (launcher + interpreter start;
  for fastspawn this includes the zygote importing torch once);
- exit: until the command exited.

Two reference rows put the numbers in context: one ``python`` importing
``torch.distributed`` (ready = when the import is done: the zygote cannot be warm sooner) and fastspawn on a script
that imports nothing (the launcher's own cost). One untimed run of each first fills the
page cache and a private bytecode cache (every command runs with ``PYTHONPYCACHEPREFIX`` set
to it and without ``PYTHONDONTWRITEBYTECODE``, as an installed package has its .pyc files).
Rounds are interleaved, the order rotating each round. Writes ``results/launcher_bench.md`` and ``results/launcher_bench.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from spawn_bench import (  # noqa: E402  (shared report helpers)
    describe,
    div,
    fmt_ms,
    fmt_x,
    loadavg,
    log,
    machine_info,
    table,
    wait_for_quiet,
    write_atomic,
)

TARGET_FACTOR = 5.0

SCRIPT = '''\
import time
_first_line = time.time()
import os
import torch
import torch.distributed as dist

dist.init_process_group("gloo")
_ready = time.time()
with open(os.path.join(os.environ["LAUNCHER_BENCH_OUT"], os.environ["RANK"]), "w") as out:
    out.write(f"{_first_line!r} {_ready!r}")
dist.destroy_process_group()
'''

PLAIN_SCRIPT = '''\
import time
_first_line = time.time()
import os
with open(os.path.join(os.environ["LAUNCHER_BENCH_OUT"], os.environ["RANK"]), "w") as out:
    out.write(f"{_first_line!r} {_first_line!r}")
'''

IMPORT_TORCH = (
    "import os, time; t = time.time(); import torch.distributed; "
    "open(os.path.join(os.environ['LAUNCHER_BENCH_OUT'], '0'), 'w').write(f'{t!r} {time.time()!r}')"
)

LABELS = {
    "fastspawn": "fastspawn -n N script.py",
    "torchrun": "torchrun --nproc-per-node N script.py",
    "import-torch": "reference: one interpreter importing torch.distributed (ready = imported)",
    "fastspawn-plain": "reference: fastspawn -n N on a script importing nothing",
}


def launcher(name: str) -> List[str]:
    """The command that runs launcher ``name`` ("fastspawn" or "torchrun") of this Python:
    its console script next to the interpreter, else ``python -m``."""
    script = Path(sys.executable).parent / name
    module = {"fastspawn": "fastspawn", "torchrun": "torch.distributed.run"}[name]
    return [str(script)] if script.exists() else [sys.executable, "-m", module]


def command(contender: str, nprocs: int, scripts: Dict[str, Path]) -> List[str]:
    if contender == "fastspawn":
        return [*launcher("fastspawn"), "-n", str(nprocs), str(scripts["torch"])]
    if contender == "fastspawn-plain":
        return [*launcher("fastspawn"), "-n", str(nprocs), str(scripts["plain"])]
    if contender == "torchrun":
        return [*launcher("torchrun"), "--nproc-per-node", str(nprocs), str(scripts["torch"])]
    if contender == "import-torch":
        return [sys.executable, "-c", IMPORT_TORCH]
    raise ValueError(contender)


def run_once(contender: str, nprocs: int, scripts: Dict[str, Path], pycache: Path) -> Dict[str, Any]:
    """One timed run; seconds since the command was started, or an error text."""
    out_dir = Path(tempfile.mkdtemp(prefix="launcher_bench_"))
    env = dict(os.environ, LAUNCHER_BENCH_OUT=str(out_dir), PYTHONPYCACHEPREFIX=str(pycache))
    env.pop("OMP_NUM_THREADS", None)  # both launchers set 1 for N > 1
    # Bytecode as an installed package has it, for every contender: without this, a
    # PYTHONDONTWRITEBYTECODE environment recompiles modules that have no .pyc (an
    # editable install's) in every run. The cache is this benchmark's own.
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    cmd = command(contender, nprocs, scripts)
    try:
        t0 = time.time()
        proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=600)
        t_exit = time.time()
        if proc.returncode != 0:
            return {"error": f"exit status {proc.returncode}: {proc.stdout.decode(errors='replace')[-2000:]}"}
        stamps = [p.read_text().split() for p in out_dir.iterdir()]
        expected = 1 if contender == "import-torch" else nprocs
        if len(stamps) != expected:
            return {"error": f"{len(stamps)} of {expected} ranks wrote their timestamp"}
        return {
            "launched_s": max(float(first) for first, _ in stamps) - t0,
            "ready_s": max(float(ready) for _, ready in stamps) - t0,
            "exit_s": t_exit - t0,
        }
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nprocs", type=int, default=8, help="ranks per launch (8)")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds (5)")
    ap.add_argument("--quick", action="store_true", help="2 rounds")
    ap.add_argument("--contenders", nargs="+", default=list(LABELS), choices=list(LABELS))
    ap.add_argument("--out-dir", type=Path, default=HERE / "results")
    ap.add_argument("--wait-load", type=float, default=None, metavar="L",
                    help="first wait until the 1-minute load average is <= L (at most --wait-max s)")
    ap.add_argument("--wait-max", type=float, default=900.0, help="seconds --wait-load waits at most (900)")
    args = ap.parse_args(argv)
    rounds = 2 if args.quick else args.rounds

    load_wait = wait_for_quiet(args.wait_load, args.wait_max) if args.wait_load is not None else None
    info = machine_info()
    info["load_wait"] = load_wait
    log(f"{info['nproc']} CPUs, Python {info['python']}, torch {info['torch']}, load {info['loadavg_start']}")
    work = Path(tempfile.mkdtemp(prefix="launcher_bench_scripts_"))
    scripts = {"torch": work / "gloo_init.py", "plain": work / "plain.py"}
    scripts["torch"].write_text(SCRIPT)
    scripts["plain"].write_text(PLAIN_SCRIPT)
    samples: Dict[str, List[Dict[str, Any]]] = {c: [] for c in args.contenders}
    errors: Dict[str, List[str]] = {c: [] for c in args.contenders}
    round_loads = []
    pycache = work / "pycache"
    try:
        for contender in args.contenders:  # untimed: fills the bytecode and page caches
            warm = run_once(contender, args.nprocs, scripts, pycache)
            log(f"warm-up: {contender}: {warm.get('error', 'ok')[:300]}")
        for r in range(rounds):
            order = args.contenders[r % len(args.contenders):] + args.contenders[: r % len(args.contenders)]
            round_loads.append(loadavg())
            for contender in order:
                sample = run_once(contender, args.nprocs, scripts, pycache)
                if "error" in sample:
                    errors[contender].append(sample["error"])
                    log(f"round {r + 1}: {contender}: ERROR {sample['error'][:300]}")
                else:
                    samples[contender].append(sample)
                    log(f"round {r + 1}: {contender}: ready {sample['ready_s']:.3f} s")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    info["loadavg_end"] = loadavg()

    stats = {
        c: {name: describe([s[name] for s in samples[c] if name in s]) for name in ("launched_s", "ready_s", "exit_s")}
        for c in args.contenders
    }

    def med(contender: str, name: str = "ready_s") -> Optional[float]:
        d = stats.get(contender, {}).get(name)
        return d["median"] if d else None

    factor = div(med("torchrun"), med("fastspawn"))
    target = {
        "text": f"nprocs {args.nprocs}: fastspawn ready (all ranks past init_process_group) "
        f">= {TARGET_FACTOR:g}x faster than torchrun",
        "measured": factor,
        "result": "n/a" if factor is None else ("PASS" if factor >= TARGET_FACTOR else "FAIL"),
    }

    def ms(v: Optional[float]) -> Optional[float]:
        return None if v is None else v * 1000

    lines = [
        "# launcher_bench: fastspawn vs torchrun, gloo training-script start",
        "",
        f"{info['date']}, {info['nproc']} CPUs ({info['cpu_model']}), Python {info['python']}, "
        f"torch {info['torch']}, fastspawn {info['fastspawn']} (commit {str(info['git_commit'])[:10]}"
        f"{', dirty' if info['git_dirty'] else ''}); {rounds} interleaved rounds, nprocs {args.nprocs}; "
        f"1-min load at start / end: {info['loadavg_start'][0]:.2f} / {info['loadavg_end'][0]:.2f}.",
    ]
    wait = info.get("load_wait")
    if wait:
        lines += ["", f"Before starting, waited {wait['waited_s']:.0f} s for the 1-min load to drop to "
                      f"≤ {wait['threshold']:g} ({'reached' if wait['quiet'] else 'not reached'})."]
    lines += [
        "",
        "## Target",
        "",
        f"**{target['result']}**: {target['text']}: measured {fmt_x(factor)} "
        f"(torchrun {fmt_ms(ms(med('torchrun')))} ms ÷ fastspawn {fmt_ms(ms(med('fastspawn')))} ms).",
        "",
        "## Time from starting the command, median ms (min–max)",
        "",
    ]

    def cell(contender: str, name: str) -> str:
        d = stats[contender][name]
        if d is None:
            return "—"
        return f"{fmt_ms(ms(d['median']))} ({fmt_ms(ms(d['min']))}–{fmt_ms(ms(d['max']))})"

    rows = [
        [LABELS[c], cell(c, "launched_s"), cell(c, "ready_s"), cell(c, "exit_s"), str(len(samples[c]))]
        for c in args.contenders
    ]
    lines += table(["command", "last rank launched", "all ranks past init_process_group", "command exited", "runs"], rows)
    lines += [
        "",
        "launched: the last rank ran its script's first line; for fastspawn this includes "
        "starting the zygote, which imports the script's imports (torch) once; for torchrun, "
        "each rank's interpreter start. The `torch.distributed` reference row is one interpreter "
        "importing torch (ready when the import is done): the floor of a launch whose ranks need torch. "
        "Every command ran with bytecode caches filled by an untimed run (see benchmarks/README.md).",
    ]
    if any(errors.values()):
        lines += ["", "## Errors", ""]
        lines += [f"- {c}: {e[:500]}" for c, es in errors.items() for e in es]
    report = "\n".join(lines) + "\n"
    print(report)
    write_atomic(args.out_dir / "launcher_bench.md", report)
    data = {
        "machine": info,
        "nprocs": args.nprocs,
        "rounds": rounds,
        "round_loadavg": round_loads,
        "target": target,
        "stats": stats,
        "samples": samples,
        "errors": errors,
    }
    write_atomic(args.out_dir / "launcher_bench.json", json.dumps(data, indent=1) + "\n")
    return 1 if any(errors.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
