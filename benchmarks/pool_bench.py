#!/usr/bin/env python
"""Benchmark process pools on fastspawn's multiprocessing context against spawn, forkserver, fork.

    python benchmarks/pool_bench.py                       # 5 rounds, this Python (needs torch)
    python benchmarks/pool_bench.py --quick               # 2 rounds
    python benchmarks/pool_bench.py --python /venvs/py3.9/bin/python ...   # also these Pythons (no torch needed)
    python benchmarks/pool_bench.py --wait-load 1.0       # first wait for a quiet machine

Every measurement is one fresh interpreter (a driver, see ``_pool_driver.py``) whose main
module is ``_pool_main_torch.py`` (imports torch at top level) or ``_pool_main_plain.py``
(imports nothing heavy); times are taken from the creation of the pool, after the main
module's imports, and the whole program's wall time (process start to exit) is reported
next to them. Measurements:

- ``ppe``: ``concurrent.futures.ProcessPoolExecutor(max_workers=8, mp_context=ctx)``, 1,000
  tiny tasks (``tiny(i) = i * i``, defined in the main module) submitted at once: time to
  the first result, to the last, and to the end of ``shutdown(wait=True)``;
- ``dataloader`` (torch main module only): ``torch.utils.data.DataLoader(num_workers=4,
  persistent_workers=False, multiprocessing_context=ctx)`` over a 256-item in-memory
  dataset (batch 16), 3 epochs: each epoch's time to its first batch, and to its end.

Contexts: ``fastspawn`` (``fastspawn.get_context()`` called at the top of the main module,
before its heavy imports, as the README recommends: the zygote imports the main module
while the driver does), ``fastspawn-warm`` (the same, then an untimed ``fastspawn.warmup()``
that waits for the zygote to be ready before the pool is created), ``fastspawn-late`` (the context first asked for when the pool is
created, inside the timed region: a cold zygote), and the standard library's ``spawn``,
``forkserver`` and ``fork`` (``multiprocessing.get_context(name)``).

The interpreter running this script runs both main modules (it needs torch); each
``--python`` interpreter (with fastspawn installed, torch not needed) runs the plain one.
One untimed run of every cell first fills the page cache and a private bytecode cache
(every driver runs with ``PYTHONPYCACHEPREFIX`` set to it and without
``PYTHONDONTWRITEBYTECODE``); then the rounds, every cell once per round in a rotating
order. Writes ``results/pool_bench.{md,json,png}``.
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
from typing import Any, Dict, List, Optional, Sequence, Tuple

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _pool_driver import (  # noqa: E402
    CONTEXT_VAR,
    CONTEXTS,
    DL_BATCH,
    DL_EPOCHS,
    DL_ITEMS,
    DL_WORKERS,
    LAUNCH_VAR,
    PPE_TASKS,
    PPE_WORKERS,
)
from spawn_bench import (  # noqa: E402  (shared report helpers)
    describe,
    div,
    fmt_ms,
    fmt_x,
    loadavg,
    log,
    machine_info,
    median,
    table,
    wait_for_quiet,
    write_atomic,
)

MAINS = {"plain": HERE / "_pool_main_plain.py", "torch": HERE / "_pool_main_torch.py"}
MAIN_LABEL = {"plain": "main module imports nothing heavy", "torch": "main module imports torch"}
CONTEXT_LABEL = {
    "fastspawn": "fastspawn.get_context() (warmed at the top of the main module)",
    "fastspawn-warm": "fastspawn.get_context() (same, and the zygote ready before the pool: warmup())",
    "fastspawn-late": "fastspawn.get_context() (first asked for at pool creation: cold zygote)",
    "spawn": 'multiprocessing.get_context("spawn")',
    "forkserver": 'multiprocessing.get_context("forkserver")',
    "fork": 'multiprocessing.get_context("fork")',
}
SHORT = {"fastspawn": "fastspawn", "fastspawn-warm": "fastspawn (warm)", "fastspawn-late": "fastspawn (late)", "spawn": "spawn",
         "forkserver": "forkserver", "fork": "fork"}  # fmt: skip
BASELINES = ["spawn", "forkserver", "fork"]
DRIVER_TIMEOUT = 600.0
TARGET_FAST = 10.0  # first result: >= 10x faster than spawn and forkserver
TARGET_FORK = 1.5  # first result: within 1.5x of fork
# Warnings that mean a fastspawn run did not measure the zygote (it fell back).
FALLBACK_WORDS = ("zygote", "fresh interpreter")

# Metrics: (name, label); values in ms.
PPE_METRICS = [
    ("first_ms", "first result"),
    ("all_ms", f"all {PPE_TASKS:,} results"),
    ("shutdown_ms", "shutdown(wait=True) done"),
    ("imports_ms", "start → main module imported"),
    ("wall_ms", "whole program"),
]
DL_METRICS = [
    *((f"e{k + 1}_first_ms", f"epoch {k + 1}: first batch") for k in range(DL_EPOCHS)),
    ("epoch_ms", "epoch (median of the 3)"),
    ("total_ms", f"{DL_EPOCHS} epochs"),
    ("imports_ms", "start → main module imported"),
    ("wall_ms", "whole program"),
]


class Cell:
    """One (python, main module, kind, context): its samples over rounds."""

    def __init__(self, python: str, exe: str, main: str, kind: str, context: str) -> None:
        self.python = python
        self.exe = exe
        self.main = main
        self.kind = kind
        self.context = context
        self.samples: List[Dict[str, float]] = []
        self.raw: List[Dict[str, Any]] = []
        self.errors: List[str] = []

    @property
    def key(self) -> str:
        return f"{self.python}/{self.main}/{self.kind}/{self.context}"

    def values(self, name: str) -> List[float]:
        return [s[name] for s in self.samples if name in s]

    def med(self, name: str) -> Optional[float]:
        return median(self.values(name))


def metrics(kind: str, out: Dict[str, Any], exit_time: float) -> Dict[str, float]:
    """A driver's stamps turned into the milliseconds the report shows."""
    s = out["stamps"]
    m = {"imports_ms": (out["imports"] - out["launch"]) * 1e3, "wall_ms": (exit_time - out["launch"]) * 1e3}
    if kind == "ppe":
        m["first_ms"] = (s["first"] - s["t0"]) * 1e3
        m["all_ms"] = (s["all"] - s["t0"]) * 1e3
        m["shutdown_ms"] = (s["shutdown"] - s["t0"]) * 1e3
    else:
        for k, e in enumerate(s["epochs"]):
            m[f"e{k + 1}_first_ms"] = (e["first"] - e["start"]) * 1e3
        m["epoch_ms"] = median([(e["end"] - e["start"]) * 1e3 for e in s["epochs"]])  # type: ignore[assignment]
        m["total_ms"] = (s["epochs"][-1]["end"] - s["t0"]) * 1e3
    return m


def run_driver(cell: Cell, pycache: Path) -> Tuple[Optional[Dict[str, Any]], Optional[Dict[str, float]], str]:
    env = dict(os.environ, PYTHONPYCACHEPREFIX=str(pycache))
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    env.pop("FASTSPAWN_ZYGOTE", None)
    env[CONTEXT_VAR] = cell.context
    cmd = [cell.exe, str(MAINS[cell.main]), cell.kind]
    t_launch = time.time()
    env[LAUNCH_VAR] = repr(t_launch)
    try:
        proc = subprocess.run(cmd, env=env, cwd=str(HERE), capture_output=True, text=True, timeout=DRIVER_TIMEOUT)
    except subprocess.TimeoutExpired:
        return None, None, f"driver timed out after {DRIVER_TIMEOUT:.0f} s"
    t_exit = time.time()
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        return None, None, f"driver exited with {proc.returncode}: {(proc.stderr or '')[-1500:]}"
    out = json.loads(lines[-1])
    if cell.context.startswith("fastspawn"):
        fell_back = [w for w in out["warnings"] if any(word in w for word in FALLBACK_WORDS)]
        if fell_back:
            return out, None, f"fastspawn did not run on its zygote: {fell_back[0]}"
    return out, metrics(cell.kind, out, t_exit), ""


def build_cells(args: argparse.Namespace, pythons: List[Tuple[str, str]]) -> List[Cell]:
    cells = []
    for label, exe in pythons:
        mains = args.mains if exe == sys.executable else ["plain"]
        for main in mains:
            kinds = ["ppe"] + (["dataloader"] if main == "torch" and not args.skip_dataloader else [])
            for kind in kinds:
                for ctx in args.contexts:
                    cells.append(Cell(label, exe, main, kind, ctx))
    return cells


def python_label(exe: str) -> str:
    out = subprocess.run([exe, "-c", "import sys; print(sys.version.split()[0])"], capture_output=True,
                         text=True, timeout=60, check=True)  # fmt: skip
    return out.stdout.strip()


def run_rounds(cells: List[Cell], rounds: int, pycache: Path) -> List[Dict[str, Any]]:
    for cell in cells:  # untimed: fills the page cache and the bytecode cache
        _, _, err = run_driver(cell, pycache)
        log(f"warm-up {cell.key}: {err.strip().splitlines()[-1] if err.strip() else 'ok'}")
    info = []
    t_start = time.monotonic()
    for r in range(rounds):
        info.append({"round": r + 1, "t_s": time.monotonic() - t_start, "loadavg": loadavg()})
        log(f"--- round {r + 1}/{rounds} (t={info[-1]['t_s']:.0f} s, load {info[-1]['loadavg']})")
        # Rotate within each (python, main, kind) group so no context always runs first.
        groups: Dict[Tuple[str, str, str], List[Cell]] = {}
        for cell in cells:
            groups.setdefault((cell.python, cell.main, cell.kind), []).append(cell)
        for group in groups.values():
            shift = r % len(group)
            for cell in group[shift:] + group[:shift]:
                out, m, err = run_driver(cell, pycache)
                if m is None:
                    cell.errors.append(f"round {r + 1}: {err}")
                    log(f"  {cell.key}: ERROR {err.strip().splitlines()[-1] if err.strip() else err}")
                    continue
                cell.samples.append(m)
                cell.raw.append(out)  # type: ignore[arg-type]
                shown = ("first_ms", "all_ms", "wall_ms") if cell.kind == "ppe" else ("e1_first_ms", "e2_first_ms", "wall_ms")
                log(f"  {cell.key:42s} " + "  ".join(f"{k} {m[k]:8.1f}" for k in shown))
    return info


# ---------------------------------------------------------------------------------------
# Reporting.


def find(cells: List[Cell], python: str, main: str, kind: str, context: str) -> Optional[Cell]:
    for c in cells:
        if (c.python, c.main, c.kind, c.context) == (python, main, kind, context):
            return c
    return None


def med(cells: List[Cell], python: str, main: str, kind: str, context: str, name: str) -> Optional[float]:
    c = find(cells, python, main, kind, context)
    return c.med(name) if c else None


def cell_text(cell: Optional[Cell], name: str) -> str:
    if cell is None:
        return "—"
    d = describe(cell.values(name))
    if d is None:
        return "—"
    return f"{fmt_ms(d['median'])} ({fmt_ms(d['min'])}–{fmt_ms(d['max'])})"


def evaluate_targets(cells: List[Cell], py: str) -> List[Dict[str, Any]]:
    """The issue's targets: torch main module, time to the first result of the pool."""
    targets = []
    fs = med(cells, py, "torch", "ppe", "fastspawn", "first_ms")

    def add(text: str, value: Optional[float], ok: bool, detail: str) -> None:
        status = "n/a" if value is None else ("PASS" if ok else "FAIL")
        targets.append({"target": text, "value": value, "status": status, "detail": detail})

    for base in ("spawn", "forkserver"):
        b = med(cells, py, "torch", "ppe", base, "first_ms")
        v = div(b, fs)
        add(f"time to first result ≥ {TARGET_FAST:g}× faster than {base}", v, v is not None and v >= TARGET_FAST,
            f"{base} {fmt_ms(b)} ms ÷ fastspawn {fmt_ms(fs)} ms = {fmt_x(v)}")  # fmt: skip
    fk = med(cells, py, "torch", "ppe", "fork", "first_ms")
    v = div(fs, fk)
    add(f"time to first result within {TARGET_FORK:g}× of fork", v, v is not None and v <= TARGET_FORK,
        f"fastspawn {fmt_ms(fs)} ms ÷ fork {fmt_ms(fk)} ms = {fmt_x(v)}")  # fmt: skip
    return targets


def render(cells: List[Cell], args: argparse.Namespace, info: Dict[str, Any], pythons: List[Tuple[str, str]],
           targets: List[Dict[str, Any]], rounds_info: List[Dict[str, Any]], elapsed: float,
           plot_name: Optional[str]) -> str:  # fmt: skip
    main_py = pythons[0][0]
    md = ["# pool_bench results", ""]
    md.append(
        f"{info['date']} · {info['nproc']} CPUs ({info['cpu_model']}) · Python {info['python']} · "
        f"torch {info['torch']} · fastspawn {info['fastspawn']} · commit "
        f"{(info['git_commit'] or '?')[:10]}{' (dirty)' if info['git_dirty'] else ''}"
    )
    md.append("")
    md.append(
        f"Command: `{' '.join(['python', 'benchmarks/pool_bench.py', *args.argv])}` · {args.rounds} rounds after "
        f"one untimed warm-up run of every cell · wall time {elapsed / 60:.1f} min"
    )
    md.append("")
    load = info.get("loadavg_start"), info.get("loadavg_end")
    if all(load):
        per_round = ", ".join(f"{r['loadavg'][0]:.2f}" for r in rounds_info if r.get("loadavg"))
        waited = ""
        wait = info.get("load_wait")
        if wait:
            waited = (f" Before starting, waited {wait['waited_s']:.0f} s for the 1-min load to drop to "
                      f"≤ {wait['threshold']:g}{'' if wait['quiet'] else ' (gave up: it did not)'}.")  # fmt: skip
        md.append(
            f"1-min load average at start / end: {load[0][0]:.2f} / {load[1][0]:.2f}, at each round's start: "
            f"{per_round} (on {info['nproc']} CPUs; it includes the benchmark's own processes).{waited}"
        )
        md.append("")
    md.append(
        "Every measurement is one fresh interpreter: its main module imports torch (`torch`) or nothing "
        "heavy (`plain`), defines the task and the dataset, then creates the pool. Times are medians "
        "(min–max) in ms, from the pool's creation (after the main module's imports) unless the column "
        "says otherwise; *whole program* is from starting the interpreter to its exit, so nothing is hidden "
        "(it includes the imports, the pool's shutdown and the interpreter's exit). "
        "**How the fastspawn zygote was warmed**: for `fastspawn`, the main module's first statements are "
        "`import fastspawn; fastspawn.get_context()`, before `import torch` (what the README recommends): "
        "creating the context starts the zygote in the background, and it imports the main module (torch "
        "included) while the driver does the same; `fastspawn (late)` asks for the context only when it "
        "creates the pool (inside the timed region), so its zygote starts cold there; `fastspawn (warm)` "
        "is `fastspawn` plus an untimed `fastspawn.warmup()` (wait until the zygote is ready) before the pool: "
        "what a pool created later in a longer program sees."
    )
    md.append("")
    others = [(label, exe) for label, exe in pythons[1:]]
    if others:
        md.append(
            "Other Pythons (plain main module only; torch exists only for 3.11 here): "
            + ", ".join(f"{label} (`{exe}`)" for label, exe in others)
            + f". {args.venvs_note}"
        )
        md.append("")

    md.append("## Targets (Python " + main_py + ", main module imports torch, ProcessPoolExecutor(max_workers=8))")
    md.append("")
    md += table(["result", "target", "measured"], [[t["status"], t["target"], t["detail"]] for t in targets])
    md.append("")
    if plot_name:
        md.append(f"![pool_bench]({plot_name})")
        md.append("")

    # ProcessPoolExecutor.
    md.append(f"## ProcessPoolExecutor(max_workers={PPE_WORKERS}), {PPE_TASKS:,} tiny tasks submitted at once")
    md.append("")
    for label, _ in pythons:
        for main in ("torch", "plain"):
            group = [c for c in cells if (c.python, c.main, c.kind) == (label, main, "ppe")]
            if not group:
                continue
            md.append(f"### Python {label}, {main} ({MAIN_LABEL[main]})")
            md.append("")
            md += context_table(group, PPE_METRICS)
            md.append("")
    md.append("### Speed-ups of `fastspawn` (baseline median ÷ fastspawn median; > 1 = fastspawn faster)")
    md.append("")
    header = ["Python", "main"]
    shown = [("first_ms", "first result"), ("all_ms", f"all {PPE_TASKS:,}"), ("wall_ms", "whole program")]
    for _, lbl in shown:
        header += [f"{lbl}: vs {b}" for b in BASELINES]
    rows = []
    for label, _ in pythons:
        for main in ("torch", "plain"):
            if find(cells, label, main, "ppe", "fastspawn") is None:
                continue
            row = [label, main]
            for name, _ in shown:
                fs = med(cells, label, main, "ppe", "fastspawn", name)
                row += [fmt_x(div(med(cells, label, main, "ppe", b, name), fs)) for b in BASELINES]
            rows.append(row)
    md += table(header, rows)
    md.append("")

    # DataLoader.
    dl = [c for c in cells if c.kind == "dataloader"]
    if dl:
        md.append(
            f"## DataLoader(num_workers={DL_WORKERS}, persistent_workers=False), {DL_EPOCHS} epochs of "
            f"{DL_ITEMS} in-memory items (batch {DL_BATCH}), main module imports torch, Python {main_py}"
        )
        md.append("")
        md.append(
            "Not persistent: every epoch starts 4 new workers, so each epoch's first batch waits for them. "
            "The epoch columns are from `iter(loader)`; *3 epochs* is from the loader's creation."
        )
        md.append("")
        md += context_table(dl, DL_METRICS)
        md.append("")
        md.append("Speed-ups of `fastspawn` (baseline ÷ fastspawn):")
        md.append("")
        shown = [("e1_first_ms", "epoch 1 first batch"), ("e2_first_ms", "epoch 2 first batch"),
                 ("e3_first_ms", "epoch 3 first batch"), ("total_ms", "3 epochs"), ("wall_ms", "whole program")]  # fmt: skip
        rows = []
        for b in BASELINES:
            row = [b]
            for name, _ in shown:
                row.append(fmt_x(div(med(cells, main_py, "torch", "dataloader", b, name),
                                     med(cells, main_py, "torch", "dataloader", "fastspawn", name))))  # fmt: skip
            rows.append(row)
        md += table(["vs", *(lbl for _, lbl in shown)], rows)
        md.append("")

    errors = [(c.key, e) for c in cells for e in c.errors]
    if errors:
        md.append("## Errors")
        md.append("")
        for key, e in errors:
            md.append(f"- `{key}`: {e.strip().splitlines()[-1] if e.strip() else e}")
        md.append("")
    return "\n".join(md)


def context_table(group: List[Cell], columns: List[Tuple[str, str]]) -> List[str]:
    """One row per context: median (min–max) of each metric, and how many runs."""
    rows = []
    for c in group:
        n = f"{len(c.samples)}" + (f" ({len(c.errors)} failed)" if c.errors else "")
        rows.append([CONTEXT_LABEL[c.context], *(cell_text(c, m) for m, _ in columns), n])
    return table(["context", *(lbl for _, lbl in columns), "runs"], rows)


PLOT_COLORS = {"fastspawn": "#1f77b4", "fastspawn-warm": "#17becf", "fastspawn-late": "#9edae5", "spawn": "#d62728",
               "forkserver": "#ff7f0e", "fork": "#7f7f7f"}  # fmt: skip


def write_plot(cells: List[Cell], pythons: List[Tuple[str, str]], info: Dict[str, Any], path: Path) -> Optional[str]:
    """Grouped bars (log scale) of medians: the pool's first result, all 1,000 results, the
    DataLoader's first batch per epoch, and the plain main module across Pythons."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        return f"no plot: {exc} (pip install matplotlib, or fastspawn[bench])"
    main_py = pythons[0][0]
    contexts = [c for c in CONTEXTS if any(cell.context == c for cell in cells)]
    panels = [
        (f"ProcessPoolExecutor(8): first result, Python {main_py}", "ppe", "first_ms",
         [(main_py, "torch", "torch main"), (main_py, "plain", "plain main")]),
        (f"ProcessPoolExecutor(8): all {PPE_TASKS:,} results, Python {main_py}", "ppe", "all_ms",
         [(main_py, "torch", "torch main"), (main_py, "plain", "plain main")]),
        (f"DataLoader({DL_WORKERS} workers, not persistent): first batch, torch main, Python {main_py}",
         "dataloader", None, [(main_py, "torch", f"epoch {k + 1}") for k in range(DL_EPOCHS)]),
        ("ProcessPoolExecutor(8): first result, plain main, by Python", "ppe", "first_ms",
         [(label, "plain", label) for label, _ in pythons]),
    ]  # fmt: skip
    fig, axes = plt.subplots(2, 2, figsize=(14, 9))
    for ax, (title, kind, name, groups) in zip(axes.flat, panels):
        if not any(find(cells, py, main, kind, ctx) for py, main, _ in groups for ctx in contexts):
            ax.set_axis_off()
            ax.set_title(f"{title}: not measured", fontsize=10)
            continue
        width = 0.8 / max(1, len(contexts))
        for j, ctx in enumerate(contexts):
            xs, ys = [], []
            for g, (py, main, _) in enumerate(groups):
                metric = name if name else f"e{g + 1}_first_ms"
                v = med(cells, py, main, kind, ctx, metric)
                if v is not None:
                    xs.append(g + (j - (len(contexts) - 1) / 2) * width)
                    ys.append(v)
            ax.bar(xs, ys, width=width, color=PLOT_COLORS.get(ctx), label=SHORT[ctx])
            for x, y in zip(xs, ys):
                ax.text(x, y, fmt_ms(y), ha="center", va="bottom", fontsize=6, rotation=90)
        ax.set_xticks(range(len(groups)))
        ax.set_xticklabels([g[2] for g in groups])
        ax.set_yscale("log")
        ax.set_ylabel("median ms")
        ax.set_title(title, fontsize=10)
        ax.grid(True, axis="y", which="both", alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(contexts), frameon=False)
    fig.suptitle(f"pool_bench · {info['nproc']} CPUs · torch {info['torch']} · {info['date'][:10]} · "
                 "lower is better", fontsize=11)  # fmt: skip
    fig.tight_layout(rect=(0, 0.05, 1, 0.97))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)
    return None


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5, help="rounds after the warm-up (5)")
    ap.add_argument("--quick", action="store_true", help="2 rounds")
    ap.add_argument("--mains", nargs="+", choices=sorted(MAINS), default=["torch", "plain"])
    ap.add_argument("--contexts", nargs="+", choices=CONTEXTS, default=list(CONTEXTS))
    ap.add_argument("--python", action="append", default=[], metavar="EXE",
                    help="another interpreter (fastspawn installed) to run the plain main module with; repeatable")
    ap.add_argument("--venvs-note", default="", help="how the --python interpreters' environments were made (for the report)")
    ap.add_argument("--skip-dataloader", action="store_true")
    ap.add_argument("--wait-load", type=float, default=None, metavar="L",
                    help="first wait until the 1-minute load average is <= L (at most --wait-max s)")
    ap.add_argument("--wait-max", type=float, default=900.0, help="seconds --wait-load waits at most (900)")
    ap.add_argument("--out-dir", type=Path, default=HERE / "results")
    args = ap.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if args.quick:
        args.rounds = 2
    if args.rounds < 1:
        ap.error("--rounds must be >= 1")

    load_wait = wait_for_quiet(args.wait_load, args.wait_max) if args.wait_load is not None else None
    info = machine_info()
    info["load_wait"] = load_wait
    pythons = [(python_label(sys.executable), sys.executable)] + [(python_label(exe), exe) for exe in args.python]
    log(f"pool_bench: {args.rounds} rounds, Pythons {[p[0] for p in pythons]}; {info['nproc']} CPUs, "
        f"torch {info['torch']}, load {info['loadavg_start']}")  # fmt: skip
    cells = build_cells(args, pythons)
    work = Path(tempfile.mkdtemp(prefix="pool_bench_"))
    t0 = time.monotonic()
    try:
        rounds_info = run_rounds(cells, args.rounds, work / "pycache")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    elapsed = time.monotonic() - t0
    info["loadavg_end"] = loadavg()

    targets = evaluate_targets(cells, pythons[0][0])
    plot_path = args.out_dir / "pool_bench.png"
    plot_error = write_plot(cells, pythons, info, plot_path)
    if plot_error:
        log(plot_error)
    md = render(cells, args, info, pythons, targets, rounds_info, elapsed, None if plot_error else plot_path.name)
    data = {
        "machine": info,
        "command": ["benchmarks/pool_bench.py", *args.argv],
        "pythons": [{"version": label, "executable": exe} for label, exe in pythons],
        "rounds": rounds_info,
        "elapsed_s": elapsed,
        "targets": targets,
        "cells": [
            {"python": c.python, "main": c.main, "kind": c.kind, "context": c.context,
             "summary": {name: describe(c.values(name)) for name in (c.samples[0] if c.samples else {})},
             "samples": c.samples, "raw": c.raw, "errors": c.errors}
            for c in cells
        ],
    }  # fmt: skip
    write_atomic(args.out_dir / "pool_bench.json", json.dumps(data, indent=1) + "\n")
    write_atomic(args.out_dir / "pool_bench.md", md + "\n")
    print(md)
    log("targets: " + ", ".join(t["status"] for t in targets))
    return 1 if any(c.errors for c in cells) else 0


if __name__ == "__main__":
    sys.exit(main())
