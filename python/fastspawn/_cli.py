"""The ``fastspawn`` command: start N ranks of a training script, as torchrun does, fast.

    fastspawn -n 8 train.py --lr 0.1          # 8 ranks of train.py on this machine
    fastspawn -n 8 -m pkg.train               # a module, as python -m runs it
    fastspawn -n 2 -- ./a.out --flag          # a program per rank
    srun fastspawn -n 8 train.py              # under Slurm: one fastspawn per node

A Python script runs through fastspawn's warm zygote: the script's top-level imports are
read from its source (``ast``) and imported once, in the zygote; each rank is then a fork
of it that runs the script as ``__main__`` with its rank's environment already in place.

This module is imported by the command's own process, which must stay light (it never
imports torch), and by each rank (:func:`run_rank`).
"""

from __future__ import annotations

import argparse
import ast
import functools
import os
import signal
import socket
import sys
from typing import (
    TYPE_CHECKING, Any, Callable, Dict, List, Mapping, NamedTuple, NoReturn, Optional, Sequence, Set, Tuple, Type,
    Union,
)

if TYPE_CHECKING:
    from .elastic import PContext

__all__ = ["main", "run_rank", "expand_hostlist", "script_imports", "NodeLayout", "rank_envs"]

PROG = "fastspawn"
DEFAULT_MULTINODE_PORT = 29500  # torchrun's default --master-port
SLURM_PORT_BASE, SLURM_PORT_SPAN = 15000, 20000
DEFAULT_SHUTDOWN_TIMEOUT = 30.0  # torchrun's default grace after SIGTERM
ROLE = "default"  # torchrun's --role default

USAGE = f"""\
{PROG} [-n N] [options] script.py [args ...]
       {PROG} [-n N] [options] -m module [args ...]
       {PROG} [-n N] [options] -- program [args ...]"""

DESCRIPTION = """\
Start N ranks of a training script on this machine (and, with --nnodes, on several), with
the environment torchrun gives its workers: RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE,
GROUP_RANK, GROUP_WORLD_SIZE, ROLE_RANK, ROLE_WORLD_SIZE, ROLE_NAME, MASTER_ADDR,
MASTER_PORT, TORCHELASTIC_RESTART_COUNT, TORCHELASTIC_MAX_RESTARTS, TORCHELASTIC_RUN_ID,
TORCHELASTIC_USE_AGENT_STORE, TORCHELASTIC_ERROR_FILE (and OMP_NUM_THREADS=1 when unset
and N > 1). A Python script or module is forked from a warm process that imported the
script's top-level imports once; `-- program` runs a program per rank."""

EPILOG = f"""\
examples:
  {PROG} -n 8 train.py --epochs 3       8 ranks on this machine
  {PROG} -n 4 -m mypkg.train            a module (python -m mypkg.train) in 4 ranks
  {PROG} -n 2 -- ./bench --size 1024    a program per rank (no Python involved)
  {PROG} -n 8 --nnodes 2 --node-rank 0 --master-addr node0 train.py   on node0
  {PROG} -n 8 --nnodes 2 --node-rank 1 --master-addr node0 train.py   on node1
  srun -N 2 --ntasks-per-node 1 {PROG} -n 8 train.py   Slurm: 16 ranks on 2 nodes

Each output line of a rank is shown whole, prefixed with its global rank ("[3]:hello");
TORCHELASTIC_LOG_LINE_PREFIX_TEMPLATE (${{rank}}, ${{local_rank}}, ${{role_name}})
changes the prefix as under torchrun. The exit status is the first failed rank's (128+N
for a signal N), after a summary naming every failed rank; Ctrl-C stops the ranks
(SIGTERM, then SIGKILL after --shutdown-timeout; a second Ctrl-C kills at once) and exits
with 130."""


class UsageError(Exception):
    """Bad command line or environment: reported in one line, exit status 2."""


# ------------------------------------------------------------------------ arguments
class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UsageError(message)


def _bounded_int(low: int, high: Optional[int], name: str) -> Callable[[str], int]:
    """An argparse type: an int in [low, high]; argparse names it ``name`` in errors."""
    def convert(text: str) -> int:
        value = int(text)
        if value < low or (high is not None and value > high):
            raise ValueError(text)
        return value

    convert.__name__ = name
    return convert


_positive_int = _bounded_int(1, None, "positive int")
_non_negative_int = _bounded_int(0, None, "non-negative int")
_port = _bounded_int(1, 65535, "port (1-65535)")


def _seconds(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise ValueError(text)
    return value


_seconds.__name__ = "number of seconds"


def _rank_list(text: str) -> Set[int]:
    return {_non_negative_int(part) for part in text.split(",")}


_rank_list.__name__ = "comma-separated list of local ranks"


def build_parser() -> argparse.ArgumentParser:
    """The launcher's options (the target and its arguments are split off before)."""
    parser = _Parser(
        prog=PROG,
        usage=USAGE,
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    add = parser.add_argument
    add("-n", "--nproc-per-node", "--nproc_per_node", type=_positive_int, default=1, metavar="N",
        help="number of ranks to start on this node (default 1). Example: -n 8")
    add("-m", "--module", action="store_true",
        help="the target is a module name, run as `python -m` runs it. Example: -m pkg.train")
    add("--nnodes", type=_positive_int, default=None, metavar="NODES",
        help="number of nodes (machines) taking part, each running the same -n; global ranks "
        "are NODE_RANK*N+LOCAL_RANK, WORLD_SIZE is NODES*N (default 1, or the Slurm step's "
        "task count). Example: --nnodes 2")
    add("--node-rank", "--node_rank", type=_non_negative_int, default=None, metavar="NODE_RANK",
        help="this node's index, 0 to NODES-1 (default 0, or SLURM_PROCID). Example: --node-rank 1")
    add("--master-addr", "--master_addr", default=None, metavar="HOST",
        help="host of node 0, which serves the rendezvous store (default 127.0.0.1, or the "
        "first host of the Slurm node list). Example: --master-addr node0")
    add("--master-port", "--master_port", type=_port, default=None, metavar="PORT",
        help=f"rendezvous port on the master host (default: a free port on one node; "
        f"{DEFAULT_MULTINODE_PORT} on several, or {SLURM_PORT_BASE} + SLURM_JOB_ID %% "
        f"{SLURM_PORT_SPAN} under Slurm). Example: --master-port 29500")
    add("--max-restarts", "--max_restarts", type=_non_negative_int, default=0, metavar="K",
        help="when a rank fails, stop this node's ranks and start them all again, up to K "
        "times (default 0); ranks read the attempt in TORCHELASTIC_RESTART_COUNT. "
        "Example: --max-restarts 3")
    add("--log-dir", "--log_dir", default=None, metavar="DIR",
        help="keep each attempt's logs and error files in "
        "DIR/<run id>_<random>/attempt_<k>/<local rank>/{stdout.log,stderr.log,error.json} "
        "(torchrun's layout); without it they live in a temporary directory removed at "
        "exit. Example: --log-dir logs")
    add("-r", "--redirects", default="0", metavar="STD",
        help="send ranks' streams to log files instead of the console: 0 none, 1 stdout, "
        "2 stderr, 3 both, or per local rank LOCAL_RANK:VALUE,... Example: --redirects 3")
    add("-t", "--tee", default="0", metavar="STD",
        help="write ranks' streams to log files and to the console (same values as "
        "--redirects). Example: --tee 3 --log-dir logs")
    add("--local-ranks-filter", "--local_ranks_filter", type=_rank_list, default=None,
        metavar="RANKS",
        help="show only these local ranks' output on the console (the others' still go to "
        "their log files when redirected or teed). Example: --local-ranks-filter 0")
    add("--start-method", "--start_method", choices=("spawn", "forkserver", "fork"),
        default="spawn",
        help="how Python ranks start: spawn (default) and forkserver fork from the warm "
        "zygote, fork forks this launcher (which has not imported the script's modules). "
        "Example: --start-method fork")
    add("--shutdown-timeout", "--shutdown_timeout", type=_seconds,
        default=DEFAULT_SHUTDOWN_TIMEOUT, metavar="SECONDS",
        help=f"seconds ranks get to exit after SIGTERM (sent on Ctrl-C, on SIGTERM to "
        f"{PROG}, or when another rank failed) before SIGKILL (default "
        f"{DEFAULT_SHUTDOWN_TIMEOUT:g}). Example: --shutdown-timeout 5")
    add("-V", "--version", action="version", version=f"%(prog)s {_version()}",
        help="print fastspawn's version and exit")
    return parser


def _version() -> str:
    from . import __version__

    return __version__


class Target(NamedTuple):
    """What each rank runs: ``kind`` is "script", "module" or "program"."""

    kind: str
    name: str
    args: Tuple[str, ...]


def split_command_line(parser: argparse.ArgumentParser, argv: Sequence[str]) -> Tuple[List[str], Optional[Target]]:
    """The launcher's own options, and the target with its arguments passed verbatim.

    The target is the first token that is not an option or an option's value, or the
    token after ``--`` (then a program). Everything after the target belongs to it.
    """
    takes_value = {
        flag: action.nargs != 0
        for action in parser._actions  # noqa: SLF001 - argparse has no public listing
        for flag in action.option_strings
    }
    module = False
    i = 0
    while i < len(argv):
        token = argv[i]
        if token == "--":
            if i + 1 >= len(argv):
                raise UsageError("`--` must be followed by the program to run")
            return list(argv[:i]), Target("program", argv[i + 1], tuple(argv[i + 2 :]))
        if token.startswith("-") and token != "-":
            flag = token.split("=", 1)[0]
            module = module or flag in ("-m", "--module")
            if takes_value.get(flag) and "=" not in token:
                i += 1  # skip its value ("-n8" carries it: "-n8" is no flag of ours)
            i += 1
            continue
        return list(argv[:i]), Target("module" if module else "script", token, tuple(argv[i + 1 :]))
    return list(argv), None


# ----------------------------------------------------------------------- node layout
def expand_hostlist(text: str) -> List[str]:
    """Slurm's compressed host list, expanded: ``"gpu[01-03,7],login"`` ->
    ``["gpu01", "gpu02", "gpu03", "gpu7", "login"]``; several bracket groups multiply
    (``"r[1-2]n[1-2]"``). Raises ValueError on malformed text."""
    hosts: List[str] = []
    for item in _split_outside_brackets(text.strip()):
        expansions = [""]
        rest = item
        while rest:
            start = rest.find("[")
            if start < 0:
                expansions = [e + rest for e in expansions]
                break
            end = rest.find("]", start)
            if end < 0:
                raise ValueError(f"unbalanced '[' in host list {text!r}")
            prefix, ranges, rest = rest[:start], rest[start + 1 : end], rest[end + 1 :]
            values = _expand_ranges(ranges, text)
            expansions = [e + prefix + v for e in expansions for v in values]
        hosts.extend(expansions)
    if not hosts or any(not h for h in hosts):
        raise ValueError(f"empty host in host list {text!r}")
    return hosts


def _split_outside_brackets(text: str) -> List[str]:
    items: List[str] = []
    current: List[str] = []
    depth = 0
    for char in text:
        if char == "[":
            depth += 1
        elif char == "]":
            depth -= 1
            if depth < 0:
                raise ValueError(f"unbalanced ']' in host list {text!r}")
        if char == "," and depth == 0:
            items.append("".join(current))
            current = []
        else:
            current.append(char)
    if depth:
        raise ValueError(f"unbalanced '[' in host list {text!r}")
    items.append("".join(current))
    return items


def _expand_ranges(ranges: str, text: str) -> List[str]:
    values: List[str] = []
    for part in ranges.split(","):
        low, dash, high = part.partition("-")
        if not low.isdigit() or (dash and not high.isdigit()):
            raise ValueError(f"bad range {part!r} in host list {text!r}")
        if not dash:
            values.append(low)
            continue
        if int(high) < int(low):
            raise ValueError(f"descending range {part!r} in host list {text!r}")
        width = len(low)  # "01-10": zero padded to the width of the lower bound
        values.extend(str(n).zfill(width) for n in range(int(low), int(high) + 1))
    return values


class NodeLayout(NamedTuple):
    """Where this launcher's ranks sit in the job."""

    nproc: int  # ranks started by this launcher
    nnodes: int  # launchers taking part ("nodes": GROUP_WORLD_SIZE)
    node_rank: int  # this launcher's index (GROUP_RANK)
    local_offset: int  # LOCAL_RANK of this launcher's first rank
    local_world_size: int  # ranks on this machine (LOCAL_WORLD_SIZE)
    master_addr: str
    master_port: int
    run_id: str
    slurm: bool  # layout taken from Slurm's variables
    agent_store: bool = False  # node 0's launcher serves the store (TORCHELASTIC_USE_AGENT_STORE)

    @property
    def world_size(self) -> int:
        return self.nnodes * self.nproc

    def global_rank(self, local: int) -> int:
        return self.node_rank * self.nproc + local


def _env_int(env: Mapping[str, str], *names: str) -> Optional[int]:
    for name in names:
        value = env.get(name, "").strip()
        if value:
            try:
                return int(value)
            except ValueError:
                raise UsageError(f"{name}={value!r} is not an integer") from None
    return None


def _tasks_on_node(spec: str, node: int) -> Optional[int]:
    """Slurm's ``SLURM_TASKS_PER_NODE`` syntax (``"2(x3),1"``), entry of node ``node``."""
    counts: List[int] = []
    for item in spec.split(","):
        count, _, repeat = item.partition("(x")
        try:
            counts.extend([int(count)] * (int(repeat.rstrip(")")) if repeat else 1))
        except ValueError:
            return None
    return counts[node] if 0 <= node < len(counts) else None


def resolve_layout(options: argparse.Namespace, env: Mapping[str, str]) -> NodeLayout:
    """Node count and node rank from the flags (--nnodes, --node-rank), else from Slurm's
    variables when neither flag is given, else one node; the master likewise. Raises
    UsageError for inconsistent values."""
    nproc = options.nproc_per_node
    nnodes = options.nnodes if options.nnodes is not None else 1
    node_rank = options.node_rank if options.node_rank is not None else 0
    from_slurm = False
    if "SLURM_PROCID" in env and options.nnodes is None and options.node_rank is None:
        # One launcher per Slurm task: srun -N 2 --ntasks-per-node 1 fastspawn -n 8 ...
        nnodes = _env_int(env, "SLURM_STEP_NUM_TASKS", "SLURM_NTASKS", "SLURM_NPROCS",
                          "SLURM_STEP_NUM_NODES", "SLURM_NNODES") or 1
        node_rank = _env_int(env, "SLURM_PROCID") or 0
        from_slurm = nnodes > 1
    if node_rank >= nnodes:
        where = "--node-rank" if options.node_rank is not None else "SLURM_PROCID"
        raise UsageError(f"{where} {node_rank} is not below the node count {nnodes}")

    local_offset, local_world_size = 0, nproc
    if from_slurm:
        slurm_nodes = _env_int(env, "SLURM_STEP_NUM_NODES", "SLURM_NNODES") or nnodes
        node_id = _env_int(env, "SLURM_NODEID") or 0
        local_id = _env_int(env, "SLURM_LOCALID") or 0
        per_node = env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE") or ""
        tasks_here = _tasks_on_node(per_node, node_id) if per_node else None
        if tasks_here is None:
            tasks_here = max(nnodes // max(slurm_nodes, 1), 1)
        tasks_here = max(tasks_here, local_id + 1)
        local_offset, local_world_size = local_id * nproc, tasks_here * nproc

    master_addr = options.master_addr
    if master_addr is None:
        master_addr = "127.0.0.1"
        if from_slurm:
            nodelist = (env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST")
                        or env.get("SLURM_NODELIST") or "")
            if not nodelist:
                raise UsageError("under Slurm without --master-addr, SLURM_JOB_NODELIST is needed")
            try:
                master_addr = expand_hostlist(nodelist)[0]
            except ValueError as exc:
                raise UsageError(str(exc)) from None
    master_port = options.master_port
    run_id = "none"  # torchrun's --rdzv-id default for a static rendezvous
    if master_port is None:
        if nnodes == 1:
            master_port = free_port()
            run_id = _new_run_id()  # torchrun's single-node default rendezvous gets a uuid
        elif from_slurm and _env_int(env, "SLURM_JOB_ID", "SLURM_JOBID") is not None:
            job = _env_int(env, "SLURM_JOB_ID", "SLURM_JOBID") or 0
            master_port = SLURM_PORT_BASE + job % SLURM_PORT_SPAN
        else:
            master_port = DEFAULT_MULTINODE_PORT
    return NodeLayout(nproc, nnodes, node_rank, local_offset, local_world_size,
                      master_addr, master_port, run_id, from_slurm)


def _new_run_id() -> str:
    import uuid

    return str(uuid.uuid4())


def free_port() -> int:
    """A TCP port nobody listens on now (for the rendezvous store that rank 0 starts)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("", 0))
        return int(sock.getsockname()[1])


def rank_envs(layout: NodeLayout, restart_count: int, max_restarts: int,
              env: Mapping[str, str]) -> List[Dict[str, str]]:
    """Each local rank's variables, as torchrun's agent sets them for its workers
    (``TORCHELASTIC_ERROR_FILE`` is added per attempt by the logs spec)."""
    envs = []
    for local in range(layout.nproc):
        rank = layout.global_rank(local)
        worker = {
            "RANK": str(rank),
            "LOCAL_RANK": str(layout.local_offset + local),
            "GROUP_RANK": str(layout.node_rank),
            "ROLE_RANK": str(rank),
            "ROLE_NAME": ROLE,
            "LOCAL_WORLD_SIZE": str(layout.local_world_size),
            "WORLD_SIZE": str(layout.world_size),
            "GROUP_WORLD_SIZE": str(layout.nnodes),
            "ROLE_WORLD_SIZE": str(layout.world_size),
            "MASTER_ADDR": layout.master_addr,
            "MASTER_PORT": str(layout.master_port),
            "TORCHELASTIC_RESTART_COUNT": str(restart_count),
            "TORCHELASTIC_MAX_RESTARTS": str(max_restarts),
            "TORCHELASTIC_RUN_ID": layout.run_id,
            "TORCHELASTIC_USE_AGENT_STORE": str(layout.agent_store),
            "TORCH_NCCL_ASYNC_ERROR_HANDLING": env.get("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1"),
        }
        envs.append(worker)
    return envs


# ------------------------------------------------------------------- the script's imports
def script_imports(source: str, filename: str = "<script>") -> List[str]:
    """Absolute modules a script imports at module level (also inside top-level ``if``,
    ``try`` and ``with`` blocks, including ``if __name__ == "__main__":``, which a rank runs),
    in order, without duplicates. ``from a import b`` gives ``a`` and ``a.b`` (``b`` may be a
    submodule). A script that does not parse gives none (the ranks report the error)."""
    try:
        tree = ast.parse(source, filename)
    except (SyntaxError, ValueError):
        return []
    names: Dict[str, None] = {}

    def visit(body: Sequence[ast.stmt]) -> None:
        for node in body:
            if isinstance(node, ast.Import):
                for alias in node.names:
                    names.setdefault(alias.name, None)
            elif isinstance(node, ast.ImportFrom):
                if node.level or not node.module or node.module == "__future__":
                    continue
                names.setdefault(node.module, None)
                for alias in node.names:
                    if alias.name != "*":
                        names.setdefault(f"{node.module}.{alias.name}", None)
            elif isinstance(node, ast.If):
                visit(node.body)
                visit(node.orelse)
            elif isinstance(node, ast.Try) or type(node).__name__ == "TryStar":
                visit(node.body)  # type: ignore[attr-defined]
                for handler in node.handlers:  # type: ignore[attr-defined]
                    visit(handler.body)
                visit(node.orelse)  # type: ignore[attr-defined]
                visit(node.finalbody)  # type: ignore[attr-defined]
            elif isinstance(node, ast.With):
                visit(node.body)

    visit(tree.body)
    return list(names)


def find_module_source(name: str, path: Sequence[str]) -> Tuple[Optional[str], List[str]]:
    """The file ``python -m name`` would run, found on ``path`` without importing anything
    (importing a parent package would run its code in this light process), and the parent
    packages run_module imports first. (None, parents) when it is not a plain source file."""
    parts = name.split(".")
    parents = [".".join(parts[:i]) for i in range(1, len(parts))]
    for entry in path:
        base = os.path.join(os.path.abspath(entry or os.curdir), *parts)
        for candidate in (base + ".py", os.path.join(base, "__main__.py")):
            if os.path.isfile(candidate):
                extra = [name] if candidate.endswith("__main__.py") else []
                return candidate, parents + extra
    return None, parents


# ------------------------------------------------------------------------- in a rank
def run_rank(kind: str, name: str, args: Sequence[str]) -> None:
    """Body of each Python rank: run the script (``kind == "script"``) or module as
    ``__main__`` with ``sys.argv = [name, *args]``, as the interpreter would.

    An uncaught exception is printed on stderr as Python prints it (without the frames of
    this launcher), written to ``TORCHELASTIC_ERROR_FILE`` unless the script's own
    ``@record`` already did, and ends the rank with exit status 1 (KeyboardInterrupt: killed
    by SIGINT, as the interpreter ends). ``SystemExit`` keeps its meaning.
    """
    import runpy

    for stream in (sys.stdout, sys.stderr):  # a line reaches the launcher when it is complete
        reconfigure = getattr(stream, "reconfigure", None)
        if reconfigure is not None:
            reconfigure(line_buffering=True)
    sys.argv = [name, *args]
    try:
        if kind == "module":
            runpy.run_module(name, run_name="__main__", alter_sys=True)
        else:
            _run_script(name)
    except SystemExit:
        raise
    except BaseException as exc:
        _report_script_error(exc)
        if isinstance(exc, KeyboardInterrupt):
            raise  # fastspawn's rank code then ends the rank by SIGINT, as an interpreter ends
        raise SystemExit(1) from None


def _run_script(name: str) -> None:
    """Run the file as ``python name`` does: a new ``__main__`` module whose ``__file__`` is
    the absolute path, left in place afterwards (atexit handlers and pickling see it)."""
    import builtins
    import types
    from importlib.machinery import SourceFileLoader

    path = os.path.abspath(name)
    with open(path, "rb") as src:
        code = compile(src.read(), path, "exec", dont_inherit=True)
    module = types.ModuleType("__main__")
    module.__dict__.update(__file__=path, __builtins__=builtins, __cached__=None, __spec__=None,
                           __loader__=SourceFileLoader("__main__", path))
    sys.modules["__main__"] = module
    exec(code, module.__dict__)


def _report_script_error(exc: BaseException) -> None:
    """Print the script's traceback and record it in the error file (call while handling)."""
    import traceback

    launcher_files = {__file__, "<frozen runpy>", getattr(sys.modules.get("runpy"), "__file__", "")}
    tb = exc.__traceback__
    while tb is not None and tb.tb_frame.f_code.co_filename in launcher_files:
        tb = tb.tb_next
    exc.with_traceback(tb)
    traceback.print_exception(type(exc), exc, tb)
    sys.stderr.flush()
    error_file = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if error_file and not os.path.exists(error_file):  # the script's own @record wrote it
        from .elastic.errors import get_error_handler

        get_error_handler().record_exception(exc)


# ------------------------------------------------------------------------- launching
class Plan(NamedTuple):
    """A checked command line: what to run, where, how."""

    options: argparse.Namespace
    target: Target
    layout: NodeLayout
    program: Optional[str]  # the resolved program path (kind "program")


def _say(message: str) -> None:
    sys.stderr.write(f"{PROG}: {message}\n")
    sys.stderr.flush()


def plan_command(argv: Sequence[str], env: Mapping[str, str]) -> Plan:
    """Parse and check the command line (``--help``/``--version`` exit here); raises
    UsageError naming the problem."""
    parser = build_parser()
    launcher_argv, target = split_command_line(parser, argv)
    options = parser.parse_args(launcher_argv)
    if target is None:
        raise UsageError("nothing to run: give a script, -m MODULE, or -- PROGRAM")
    program = None
    if target.kind == "program":
        if options.module:
            raise UsageError("-m and `-- PROGRAM` exclude each other")
        program = _resolve_program(target.name, env)
    elif target.kind == "script" and not os.path.isfile(target.name):
        raise UsageError(f"can't open file {target.name!r}: no such file")
    for flag, value in (("--redirects", options.redirects), ("--tee", options.tee)):
        if value == "0":
            continue  # the default: no need to load fastspawn.elastic before the zygote starts
        from .elastic import Std

        try:
            mapping = Std.from_str(value)
        except ValueError:
            raise UsageError(f"{flag} {value!r}: expected 0, 1, 2 or 3, or LOCAL_RANK:VALUE,...") from None
        if isinstance(mapping, dict) and any(rank >= options.nproc_per_node for rank in mapping):
            raise UsageError(f"{flag} {value!r} names a local rank >= -n {options.nproc_per_node}")
    return Plan(options, target, resolve_layout(options, env), program)


def _resolve_program(name: str, env: Mapping[str, str]) -> str:
    from ._api import _resolve_program as resolve  # what launch_programs will run

    try:
        return resolve(name, env)
    except FileNotFoundError:
        raise UsageError(f"program {name!r} not found") from None
    except PermissionError:
        raise UsageError(f"program {name!r} is not executable") from None


def _line_prefixes(layout: NodeLayout, env: Mapping[str, str]) -> Dict[int, str]:
    template = env.get("TORCHELASTIC_LOG_LINE_PREFIX_TEMPLATE")
    prefixes = {}
    for local in range(layout.nproc):
        rank, local_rank = layout.global_rank(local), layout.local_offset + local
        if template:
            from string import Template

            prefixes[local] = Template(template).safe_substitute(role_name=ROLE, rank=rank, local_rank=local_rank)
        else:
            prefixes[local] = f"[{rank}]:"
    return prefixes


def _prepare_python_ranks(plan: Plan) -> List[str]:
    """sys.path[0] as the interpreter sets it for the target; the target's imports
    preloaded in the zygote, which starts warming up (in a thread) with this sys.path.
    Returns the preloaded modules."""
    target = plan.target
    if target.kind == "script":
        path0 = os.path.dirname(os.path.abspath(target.name))
        source_file: Optional[str] = target.name
        modules: List[str] = []
    else:
        path0 = os.getcwd()
        source_file, modules = find_module_source(target.name, [path0, *sys.path[1:]])
    if sys.path:
        sys.path[0] = path0
    else:
        sys.path.append(path0)
    if plan.options.start_method == "fork" or source_file is None:
        return []
    import threading
    import tokenize
    import warnings

    try:
        with tokenize.open(source_file) as src:
            modules += script_imports(src.read(), source_file)
    except (OSError, SyntaxError, UnicodeDecodeError):
        pass  # the ranks report an unreadable script themselves
    import fastspawn

    # A name that is not a module (``from typing import List`` -> typing.List) or a module
    # that fails to import is the script's business: its ranks report real import errors.
    warnings.filterwarnings("ignore", message="fastspawn: preloading", category=RuntimeWarning)
    fastspawn.preload(modules)
    # The zygote imports (torch: a second or more) while this process gets on with its own
    # set-up; the first launch waits for it.
    threading.Thread(target=fastspawn.warmup, name="fastspawn-warmup", daemon=True).start()
    return modules


# ------------------------------------------------------------------------ agent store
def _uses_torch(modules: Sequence[str]) -> bool:
    return any(m == "torch" or m.startswith("torch.") for m in modules)


def serve_agent_store(_index: int, listener: socket.socket, ready: object, host: str, port: int) -> None:
    """In a helper process forked from the zygote: serve the job's TCPStore on the
    launcher's listening socket, as torchrun's agent does, until terminated."""
    from datetime import timedelta

    import torch.distributed as dist

    store = dist.TCPStore(host, port, None, True, timedelta(minutes=30), wait_for_workers=False,  # type: ignore[attr-defined]  # implicit re-export
                          master_listen_fd=listener.fileno(), use_libuv=True)
    ready.send_bytes(b"ready")  # type: ignore[attr-defined]
    ready.close()  # type: ignore[attr-defined]
    while store is not None:
        signal.pause()  # until SIGTERM from the launcher (or parent death)


class AgentStore:
    """The rendezvous store of node 0, served by a helper process: every rank connects as
    a client (``TORCHELASTIC_USE_AGENT_STORE=True``), as under torchrun.

    This launcher listens on the port before any rank starts, so no rank's first
    connection is refused (a refused rank backs off for up to a second: what happens when
    rank 0 starts the store and another rank is quicker). The helper is forked after the
    ranks, off their critical path, and takes the listening socket over; connections
    made meanwhile wait in the socket's backlog.
    """

    READY_TIMEOUT = 60.0

    def __init__(self, layout: NodeLayout, fixed_port: bool) -> None:
        """Listen (OSError if the port cannot be listened on)."""
        local = layout.nnodes == 1 and layout.master_addr in ("127.0.0.1", "localhost")
        self.listener: Optional[socket.socket] = _listen("127.0.0.1" if local else "",
                                                         layout.master_port if fixed_port else 0)
        self.port = int(self.listener.getsockname()[1])
        self.host = layout.master_addr
        self.context: object = None

    def serve(self, start_method: str) -> bool:
        """Start the helper on the listening socket and wait until it serves; False (after
        a warning) if it failed, and then nobody listens on the port any more."""
        import logging
        import time
        from multiprocessing import Pipe

        from ._api import launch

        assert self.listener is not None
        reader, writer = Pipe(duplex=False)
        try:
            self.context = context = launch(serve_agent_store, (self.listener, writer, self.host, self.port),
                                            1, start_method=start_method, daemon=True)
        finally:
            self._close_listener()  # the helper holds it now: should it die, the port closes
            writer.close()
        run = context._run  # noqa: SLF001
        assert run is not None
        deadline = time.monotonic() + self.READY_TIMEOUT
        os.set_blocking(reader.fileno(), False)  # the engine's wait tells when to read
        try:
            while True:
                try:
                    if reader.recv_bytes() == b"ready":
                        return True
                    break
                except BlockingIOError:
                    pass
                left = deadline - time.monotonic()
                if left <= 0 or run.exitcodes[0] is not None:
                    break
                run.wait_any(left, watch=[reader.fileno()])
        except (EOFError, OSError):
            pass
        finally:
            reader.close()
        self.stop()
        error = context.error_traceback(0)
        reason = error.strip().splitlines()[-1] if error else f"exit code {context.processes[0].exitcode}"
        logging.getLogger("fastspawn.cli").warning(
            "could not serve the rendezvous store (%s); starting the ranks again, rank 0 serving it", reason)
        return False

    def _close_listener(self) -> None:
        if self.listener is not None:
            self.listener.close()
            self.listener = None

    def stop(self) -> None:
        """Stop listening; end the helper (SIGTERM, then SIGKILL) and reap it."""
        self._close_listener()
        if self.context is not None:
            self.context._run.stop(5.0)  # type: ignore[attr-defined]  # noqa: SLF001


def _listen(host: str, port: int) -> socket.socket:
    if not host and socket.has_dualstack_ipv6():
        return socket.create_server(("", port), family=socket.AF_INET6, dualstack_ipv6=True, backlog=4096)
    return socket.create_server((host, port), backlog=4096)


def _quiet_rank_logs(record: object) -> bool:
    """Drops the per-rank log records the failure summary already says better."""
    from .elastic.api import RANK_REPORT

    return not getattr(record, RANK_REPORT, False)


def _setup_logging() -> None:
    import logging

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"{PROG}: %(message)s"))
    handler.addFilter(_quiet_rank_logs)
    logger = logging.getLogger("fastspawn")
    logger.addHandler(handler)
    logger.setLevel(logging.WARNING)
    logger.propagate = False


def _exit_status(code: int) -> int:
    return 128 - code if code < 0 else code


def run(plan: Plan) -> int:
    """Start the ranks, restart them on failure up to --max-restarts times, report; the
    exit status (0, the first failure's, or 128+N after signal N stopped the launcher)."""
    options, target, layout = plan.options, plan.target, plan.layout
    nproc = layout.nproc
    if nproc > 1 and "OMP_NUM_THREADS" not in os.environ:
        os.environ["OMP_NUM_THREADS"] = "1"  # as torchrun: N ranks must not each take every core
    modules: List[str] = []
    rank_args: Dict[int, Tuple[Any, ...]]
    if target.kind == "program":
        assert plan.program is not None  # resolved for kind "program"
        entrypoint: Union[Callable[..., Any], str] = plan.program
        rank_args = {i: target.args for i in range(nproc)}
    else:
        modules = _prepare_python_ranks(plan)
        entrypoint = run_rank
        rank_args = {i: (target.kind, target.name, target.args) for i in range(nproc)}
    _setup_logging()
    from .elastic import DefaultLogsSpecs, SignalException, Std, start_processes, to_map
    from .elastic.errors import ChildFailedError

    redirects = to_map(Std.from_str(options.redirects), nproc)
    tee = to_map(Std.from_str(options.tee), nproc)
    # What is not redirected to a file goes to the console teed: whole, prefixed lines.
    tee = {i: tee[i] | (Std.ALL & ~redirects[i]) for i in range(nproc)}
    logs_specs = DefaultLogsSpecs(log_dir=options.log_dir, redirects=redirects, tee=tee,
                                  local_ranks_filter=options.local_ranks_filter)
    prefixes = _line_prefixes(layout, os.environ)
    agent_store = _uses_torch(modules)
    fixed_port = options.master_port is not None or layout.nnodes > 1
    context: Optional[PContext] = None
    store: Optional[AgentStore] = None
    attempt = 0
    try:
        while True:
            layout = layout._replace(agent_store=agent_store)
            if agent_store and layout.node_rank == 0:
                try:
                    store = AgentStore(layout, fixed_port)
                except OSError as exc:
                    _say(f"error: cannot serve the rendezvous store on port {layout.master_port}: {exc}")
                    return 1
                layout = layout._replace(master_port=store.port)
            elif attempt and not fixed_port:
                layout = layout._replace(master_port=free_port())
            envs = dict(enumerate(rank_envs(layout, attempt, options.max_restarts, os.environ)))
            context = start_processes(ROLE, entrypoint, rank_args, envs, logs_specs,
                                      log_line_prefixes=prefixes, start_method=options.start_method)
            # The stop after a rank's failure (wait() calls close()) gets our grace too.
            context.close = functools.partial(context.close, timeout=options.shutdown_timeout)  # type: ignore[method-assign]
            if store is not None and not store.serve(options.start_method):
                # These ranks were told to use the store: the same attempt again, without it.
                _stop(context, options.shutdown_timeout, SignalException)
                context = store = None
                agent_store = False
                continue
            result = context.wait()
            assert result is not None
            context = None
            if store is not None:
                store.stop()
                store = None
            if not result.is_failed():
                return 0
            failures = {layout.global_rank(local): f for local, f in result.failures.items()}
            if attempt < options.max_restarts:
                attempt += 1
                left = options.max_restarts - attempt + 1
                _say(f"rank(s) {', '.join(map(str, failures))} failed; restarting all {nproc} "
                     f"ranks ({left} restart(s) left)")
                continue
            error = ChildFailedError(target.name, failures)
            sys.stderr.write(error.format_msg() + "\n")
            sys.stderr.flush()
            return _exit_status(error.get_first_failure()[1].exitcode)
    except SignalException as exc:
        if context is not None:
            _stop(context, options.shutdown_timeout, SignalException)
        return 128 + int(exc.sigval)
    finally:
        if store is not None:
            store.stop()


def _stop(context: PContext, grace: float, interrupted: Type[BaseException]) -> None:
    """Close the context: SIGTERM, SIGKILL after ``grace`` s (then at most KILL_WAIT s for
    the ranks to die). A signal meanwhile cuts the grace short (the ranks get SIGKILL at
    once); further signals are then ignored while the logs are written out."""
    try:
        context.close(death_sig=signal.SIGTERM, timeout=grace)
    except interrupted:
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, signal.SIG_IGN)
        context.close(death_sig=signal.SIGKILL, timeout=0)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """The ``fastspawn`` command: run ``argv`` (default ``sys.argv[1:]``), return the exit
    status (2 for a bad command line, reported in one line)."""
    try:
        plan = plan_command(list(sys.argv[1:] if argv is None else argv), os.environ)
    except UsageError as exc:
        _say(f"error: {exc} (see {PROG} --help)")
        return 2
    try:
        return run(plan)
    except KeyboardInterrupt:  # before the ranks' signal handling was in place
        return 128 + signal.SIGINT
