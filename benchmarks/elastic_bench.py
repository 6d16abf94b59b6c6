#!/usr/bin/env python
"""Benchmark elastic launches: two ``fastspawn`` nodes against two ``torchrun`` nodes, on one
machine, over torch's c10d rendezvous.

    python benchmarks/elastic_bench.py                # 3 rounds, 2 ranks per node
    python benchmarks/elastic_bench.py --quick        # 1 round
    python benchmarks/elastic_bench.py --nprocs 4 --rounds 5

Each run starts two nodes (``--nnodes 2 --rdzv-backend c10d``, distinct ``--local-addr``
127.0.0.1 and 127.0.0.2) against a c10d rendezvous store this benchmark serves (as the
multi-node tests do), with ``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1`` (torch 2.13's shared
store misbehaves on restarts; see the README). The script imports torch and joins a gloo
process group; each rank writes a timestamp when ``init_process_group`` returned.

- start: from starting both node commands until all ranks of both nodes are past
  ``init_process_group``;
- restart: with ``--max-restarts 1``, global rank 1 exits with status 1 right after a
  barrier, once; from that moment until all ranks of both nodes are past
  ``init_process_group`` again (the failed node's agent notices, stops its ranks and
  re-rendezvouses; the other node's agent sees it waiting and restarts its ranks too).

Rounds are interleaved; medians are reported with fastspawn's speed-up. Writes
``results/elastic_bench.md`` and ``results/elastic_bench.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import timedelta
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from launcher_bench import launcher  # noqa: E402
from spawn_bench import fmt_x, loadavg, log, machine_info, table, write_atomic  # noqa: E402

SCRIPT = '''\
import os
import time

import torch.distributed as dist

out = os.environ["ELASTIC_BENCH_OUT"]
failed = os.path.join(out, "failed")
dist.init_process_group("gloo")
ready = time.time()
# Started after the failure or not (a node restarted for another's failure keeps its
# TORCHELASTIC_RESTART_COUNT, so that count cannot tell).
generation = "1" if os.path.exists(failed) else "0"
with open(os.path.join(out, f"ready-{generation}-{os.environ['RANK']}"), "w") as f:
    f.write(repr(ready))
if os.environ.get("ELASTIC_BENCH_FAIL") == "1" and generation == "0":
    dist.barrier()  # every rank is up before the failure
    if os.environ["RANK"] == "1":
        with open(failed, "x") as f:
            f.write(repr(time.time()))
        os._exit(1)
    time.sleep(120)  # stopped by its agent, then started again
dist.destroy_process_group()
'''

CONTENDERS = ("fastspawn", "torchrun")
SCENARIOS = ("start", "restart")
LABELS = {
    "fastspawn": "2 × `fastspawn --nnodes 2 --rdzv-backend c10d ... script.py`",
    "torchrun": "2 × `torchrun --nnodes 2 --rdzv-backend c10d ... script.py`",
}
DEADLINE = 300.0  # seconds a run may take before it counts as failed


def run_once(contender: str, scenario: str, nprocs: int, script: Path, pycache: Path) -> Dict[str, Any]:
    """One timed run of both nodes: seconds for the scenario, or an error text."""
    import torch.distributed as dist

    out_dir = Path(tempfile.mkdtemp(prefix="elastic_bench_"))
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=60))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PET_", "SLURM_", "TORCHELASTIC_"))}
    env.update(ELASTIC_BENCH_OUT=str(out_dir), PYTHONPYCACHEPREFIX=str(pycache), TMPDIR=str(out_dir),
               TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1")
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    env.pop("OMP_NUM_THREADS", None)
    if scenario == "restart":
        env["ELASTIC_BENCH_FAIL"] = "1"
    run_id = f"bench-{uuid.uuid4().hex[:8]}"
    nodes: List[subprocess.Popen[bytes]] = []
    try:
        t0 = time.time()
        for local_addr in ("127.0.0.1", "127.0.0.2"):
            cmd = [*launcher(contender), "--local-addr", local_addr, "--nproc-per-node", str(nprocs),
                   "--nnodes", "2", "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{store.port}",
                   "--rdzv-id", run_id, "--rdzv-conf", "is_host=0,join_timeout=120",
                   "--max-restarts", "1" if scenario == "restart" else "0", "--monitor-interval", "0.1",
                   str(script)]
            nodes.append(subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                          start_new_session=True))
        codes = [node.wait(timeout=DEADLINE) for node in nodes]
        if any(codes):
            errors = [node.stderr.read().decode(errors="replace")[-1500:] for node in nodes if node.stderr]
            return {"error": f"exit statuses {codes}: {errors}"}
        world = 2 * nprocs
        stamps: Dict[str, Dict[int, float]] = {}
        for path in out_dir.glob("ready-*"):
            _, attempt, rank = path.name.split("-")
            stamps.setdefault(attempt, {})[int(rank)] = float(path.read_text())
        if len(stamps.get("0", {})) != world:
            return {"error": f"{len(stamps.get('0', {}))} of {world} ranks were ready in the first attempt"}
        if scenario == "start":
            return {"seconds": max(stamps["0"].values()) - t0}
        if len(stamps.get("1", {})) != world:
            return {"error": f"{len(stamps.get('1', {}))} of {world} ranks were ready after the restart"}
        failed = float((out_dir / "failed").read_text())
        return {"seconds": max(stamps["1"].values()) - failed}
    except subprocess.TimeoutExpired:
        return {"error": f"not done within {DEADLINE:g} s"}
    finally:
        for node in nodes:
            if node.poll() is None:
                os.killpg(node.pid, signal.SIGKILL)
                node.wait()
            if node.stderr:
                node.stderr.close()
        del store
        shutil.rmtree(out_dir, ignore_errors=True)


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nprocs", type=int, default=2, help="ranks per node (2)")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds (3)")
    ap.add_argument("--quick", action="store_true", help="1 round")
    ap.add_argument("--out-dir", default=str(HERE / "results"))
    args = ap.parse_args(argv)
    rounds = 1 if args.quick else args.rounds
    work = Path(tempfile.mkdtemp(prefix="elastic_bench_work_"))
    script = work / "script.py"
    script.write_text(SCRIPT)
    pycache = work / "pycache"
    load_start = loadavg()
    results: Dict[str, Dict[str, List[Dict[str, Any]]]] = {c: {s: [] for s in SCENARIOS} for c in CONTENDERS}
    try:
        for contender in CONTENDERS:  # untimed: fills the bytecode and page caches
            run_once(contender, "start", args.nprocs, script, pycache)
        for r in range(rounds):
            order = [(c, s) for s in SCENARIOS for c in CONTENDERS]
            order = order[r % len(order):] + order[: r % len(order)]
            for contender, scenario in order:
                result = run_once(contender, scenario, args.nprocs, script, pycache)
                results[contender][scenario].append(result)
                log(f"round {r + 1}: {contender} {scenario}: "
                    + (f"{result['seconds']:.3f} s" if "seconds" in result else result["error"][:300]))
    finally:
        shutil.rmtree(work, ignore_errors=True)

    def median(contender: str, scenario: str) -> Optional[float]:
        values = [r["seconds"] for r in results[contender][scenario] if "seconds" in r]
        return statistics.median(values) if values else None

    rows = []
    for contender in CONTENDERS:
        cells = [LABELS[contender]]
        for scenario in SCENARIOS:
            value = median(contender, scenario)
            failed = sum("error" in r for r in results[contender][scenario])
            cells.append("—" if value is None else f"{value * 1000:.0f}" + (f" ({failed} failed)" if failed else ""))
        rows.append(cells)
    ratios = []
    for scenario in SCENARIOS:
        ours, theirs = median("fastspawn", scenario), median("torchrun", scenario)
        ratios.append([scenario, fmt_x(theirs / ours if ours and theirs else None)])
    info = machine_info()
    info["loadavg_start"], info["loadavg_end"] = load_start, loadavg()
    lines = [
        "# elastic_bench: two nodes on c10d, fastspawn vs torchrun",
        "",
        f"{info['date']}, {info['nproc']} CPUs ({info['cpu_model']}), Python {info['python']}, "
        f"torch {info['torch']}; {rounds} interleaved round(s), {args.nprocs} ranks per node, 2 nodes; "
        f"1-min load at start / end: {info['loadavg_start']} / {info['loadavg_end']}.",
        "",
        "## Median ms",
        "",
        *table(["nodes", "start: all ranks past init_process_group", "restart: rank failure to all ranks past init_process_group again"], rows),
        "",
        "## torchrun ÷ fastspawn",
        "",
        *table(["scenario", "factor"], ratios),
        "",
    ]
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / "elastic_bench.md", "\n".join(lines))
    write_atomic(out / "elastic_bench.json", json.dumps({"machine": info, "rounds": rounds, "nprocs": args.nprocs,
                                                         "results": results}, indent=1))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
