"""The ``fastspawn`` command: start N ranks of a training script, as torchrun does, fast.

    fastspawn -n 8 train.py --lr 0.1          # 8 ranks of train.py on this machine
    fastspawn -n 8 -m pkg.train               # a module, as python -m runs it
    fastspawn -n 2 -- ./a.out --flag          # a program per rank
    srun fastspawn -n 8 train.py              # under Slurm: one fastspawn per node

A Python script runs through fastspawn's warm zygote: the script's top-level imports are
read from its source (``ast``) and imported once, in the zygote; each rank is then a fork
of it that runs the script as ``__main__`` with its rank's environment already in place.

Any torchrun command line works with ``torchrun`` replaced by ``fastspawn``: the same flags,
defaults and ``PET_*`` variables (:func:`build_parser`), resolved as torchrun resolves them
(:class:`LaunchSettings`). An elastic rendezvous backend (c10d, etcd, ...) runs torch's agent
with fastspawn starting the workers (``_rendezvous.py``); one node and the static
rendezvous are fastspawn's own launch.

This module is imported by the command's own process, which stays light (it imports torch
only for the flags that need it: an elastic backend, --nproc-per-node auto/gpu/xpu,
--logs-specs, --numa-binding), and by each rank (:func:`run_rank`).
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
START_METHODS = ("spawn", "forkserver", "fork")
DEFAULT_RDZV_TIMEOUT = 900  # seconds, torch's LaunchConfig default rendezvous timeout

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
  {PROG} -n 8 --nnodes 1:4 --rdzv-backend c10d --rdzv-endpoint node0:29400 --rdzv-id job1 \\
      --max-restarts 3 train.py         elastic: run on each node (torch's rendezvous)

Any torchrun command line works with `torchrun` replaced by `{PROG}` (same flags, defaults
and PET_* variables). Each output line of a rank is shown whole, prefixed with its global
rank ("[3]:hello"); TORCHELASTIC_LOG_LINE_PREFIX_TEMPLATE (${{rank}}, ${{local_rank}},
${{role_name}}) changes the prefix as under torchrun. The exit status is the first failed
rank's (128+N for a signal N), after a summary naming every failed rank; Ctrl-C stops the
ranks (SIGTERM, then SIGKILL after --shutdown-timeout; a second Ctrl-C kills at once) and
exits with 130."""


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


def _rank_list(text: str) -> Optional[Set[int]]:
    if not text:
        return None  # torchrun's default "": every local rank
    return {_non_negative_int(part) for part in text.split(",")}


_rank_list.__name__ = "comma-separated list of local ranks"


def _node_range(text: str) -> Tuple[int, int]:
    """``"N"`` or ``"MIN:MAX"`` (torchrun's --nnodes), with 0 < MIN <= MAX."""
    parts = text.split(":")
    if len(parts) > 2:
        raise ValueError(text)
    low, high = int(parts[0]), int(parts[-1])
    if not 0 < low <= high:
        raise ValueError(text)
    return low, high


_node_range.__name__ = "node count N or range MIN:MAX (0 < MIN <= MAX)"

NPROC_NAMES = ("auto", "cpu", "gpu", "xpu")


def _nproc(text: str) -> Union[int, str]:
    """A positive int, or a name torchrun resolves to a device count (auto, cpu, gpu, xpu,
    or the name of a PrivateUse1 backend, resolved later)."""
    if text.strip().lstrip("+-").isdigit():
        return _positive_int(text)
    if not text.isidentifier():
        raise ValueError(text)
    return text


_nproc.__name__ = "process count (int, auto, cpu, gpu or xpu)"


def _comma_list(text: str) -> List[str]:
    """torchrun's filter list: comma separated, ``,,`` stands for a literal comma."""
    return [item.replace("\0", ",") for item in text.replace(",,", "\0").split(",")]


_comma_list.__name__ = "comma-separated list"

NUMA_MODES = ("node", "socket", "exclusive", "core-complex")  # torch.numa.binding.AffinityMode


class _EnvValue(argparse.Action):
    """An option whose default is the variable ``PET_<DEST>`` when set (torchrun's
    ``env`` action): the command line wins, then the variable, then the default."""

    def __init__(self, option_strings: Sequence[str], dest: str, env: Mapping[str, str],
                 default: Any = None, required: bool = False, **kwargs: Any) -> None:
        default = env.get(f"PET_{dest.upper()}", default)
        super().__init__(option_strings, dest, default=default, required=required and not default, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: Any, option_string: Optional[str] = None) -> None:
        setattr(namespace, self.dest, values)


class _EnvFlag(argparse.Action):
    """A flag that is also on when ``PET_<DEST>`` is a non-zero integer (torchrun's
    ``check_env`` action)."""

    def __init__(self, option_strings: Sequence[str], dest: str, env: Mapping[str, str], **kwargs: Any) -> None:
        name = f"PET_{dest.upper()}"
        text = env.get(name, "0")
        try:
            default = bool(int(text))
        except ValueError:
            raise UsageError(f"{name}={text!r} is not an integer") from None
        super().__init__(option_strings, dest, nargs=0, const=True, default=default, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: Any, option_string: Optional[str] = None) -> None:
        setattr(namespace, self.dest, True)


def build_parser(env: Optional[Mapping[str, str]] = None) -> argparse.ArgumentParser:
    """The launcher's options: torchrun's (same spellings, defaults and ``PET_*``
    variables, read from ``env``, default ``os.environ``) and fastspawn's own. The target
    and its arguments are split off before."""
    env = os.environ if env is None else env
    parser = _Parser(
        prog=PROG,
        usage=USAGE,
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )

    group: Any = parser

    def add(*flags: str, **kwargs: Any) -> None:
        if kwargs.get("action") in (_EnvValue, _EnvFlag):
            kwargs["env"] = env
        group.add_argument(*flags, **kwargs)

    group = parser.add_argument_group("ranks and nodes")
    add("-n", "--nproc-per-node", "--nproc_per_node", action=_EnvValue, type=_nproc, default="1",
        metavar="N", help="ranks to start on this node: a number, or auto (accelerators, else "
        "CPUs), cpu, gpu, xpu (the device count) (default 1). Example: -n 8")
    add("--nnodes", action=_EnvValue, type=_node_range, default=None, metavar="NODES",
        help="number of nodes, or MIN:MAX for an elastic job (with --rdzv-backend c10d); "
        "global ranks are NODE_RANK*N+LOCAL_RANK, WORLD_SIZE is NODES*N (default 1, or the "
        "Slurm step's task count). Example: --nnodes 2, --nnodes 1:4")
    add("--node-rank", "--node_rank", action=_EnvValue, type=_non_negative_int, default=None,
        metavar="NODE_RANK", help="this node's index, 0 to NODES-1, static rendezvous only "
        "(default 0, or SLURM_PROCID). Example: --node-rank 1")
    add("--master-addr", "--master_addr", action=_EnvValue, default=None, metavar="HOST",
        help="host of node 0, which serves the rendezvous store, static rendezvous only "
        "(default 127.0.0.1, or the first host of the Slurm node list). Example: --master-addr node0")
    add("--master-port", "--master_port", action=_EnvValue, type=_port, default=None, metavar="PORT",
        help=f"rendezvous port on the master host, static rendezvous only (default: a free "
        f"port on one node; {DEFAULT_MULTINODE_PORT} on several, or {SLURM_PORT_BASE} + "
        f"SLURM_JOB_ID %% {SLURM_PORT_SPAN} under Slurm). Example: --master-port 29500")
    add("--local-addr", "--local_addr", action=_EnvValue, default=None, metavar="HOST",
        help="this node's address as the other nodes reach it (elastic rendezvous; default: "
        "this host's name). Example: --local-addr 10.0.0.2")

    group = parser.add_argument_group("rendezvous (torch's; backends other than static need torch)")
    add("--rdzv-backend", "--rdzv_backend", action=_EnvValue, default="static", metavar="BACKEND",
        help="static (default: fixed nodes, --node-rank and --master-addr), c10d (elastic, "
        "over a TCPStore at --rdzv-endpoint), etcd, etcd-v2, or a registered one. "
        "Example: --rdzv-backend c10d")
    add("--rdzv-endpoint", "--rdzv_endpoint", action=_EnvValue, default="", metavar="HOST[:PORT]",
        help="where the rendezvous is served (c10d: the store's host and port, 29400 by "
        "default; the node on that host serves it). Example: --rdzv-endpoint node0:29400")
    add("--rdzv-id", "--rdzv_id", action=_EnvValue, default="none", metavar="ID",
        help="the job's id: nodes with the same id and endpoint form one job (ranks read it "
        "in TORCHELASTIC_RUN_ID). Example: --rdzv-id job42")
    add("--rdzv-conf", "--rdzv_conf", action=_EnvValue, default="", metavar="KEY=VALUE,...",
        help="the backend's options, e.g. join_timeout, last_call_timeout, close_timeout, "
        "read_timeout, is_host, timeout. Example: --rdzv-conf join_timeout=60")
    add("--standalone", action=_EnvFlag,
        help="one node, rendezvous on this machine (ignores --rdzv-backend, --rdzv-endpoint and "
        "--rdzv-id; the run id is a fresh uuid). Example: --standalone -n 4")

    group = parser.add_argument_group("what runs")
    add("-m", "--module", action=_EnvFlag,
        help="the target is a module name, run as `python -m` runs it. Example: -m pkg.train")
    add("--no-python", "--no_python", action=_EnvFlag,
        help="the target is a program, run per rank without Python (as `-- program`). "
        "Example: --no-python ./a.out")
    add("--run-path", "--run_path", action=_EnvFlag,
        help="run the script with runpy.run_path (torchrun: in the agent's interpreter; here "
        "in the warm zygote's fork, as every script); wins over --no-python. "
        "Example: --run-path /abs/train.py")
    add("--role", action=_EnvValue, default=ROLE, metavar="ROLE",
        help="the workers' role (ROLE_NAME, ${role_name} in the line prefix template) "
        "(default 'default'). Example: --role trainer")
    add("--start-method", "--start_method", action=_EnvValue, choices=START_METHODS,
        default="spawn",
        help="how Python ranks start: spawn (default) and forkserver fork from the warm "
        "zygote, fork forks this launcher (which has not imported the script's modules). "
        "Example: --start-method fork")

    group = parser.add_argument_group("failures and restarts")
    add("--max-restarts", "--max_restarts", action=_EnvValue, type=_non_negative_int, default=0,
        metavar="K", help="when a rank fails, stop the ranks and start them all again, up to K "
        "times (default 0); ranks read the attempt in TORCHELASTIC_RESTART_COUNT. "
        "Example: --max-restarts 3")
    add("--monitor-interval", "--monitor_interval", action=_EnvValue, type=_seconds, default=0.1,
        metavar="SECONDS", help="seconds between the elastic agent's health checks (elastic "
        "rendezvous; on a static one fastspawn learns of a rank's exit at once and does not "
        "poll) (default 0.1). Example: --monitor-interval 1")
    add("--shutdown-timeout", "--shutdown_timeout", action=_EnvValue, type=_seconds, default=None,
        metavar="SECONDS",
        help=f"seconds ranks get to exit after SIGTERM (sent on Ctrl-C, on SIGTERM to "
        f"{PROG}, or when another rank failed) before SIGKILL (default "
        f"TORCH_ELASTIC_SHUTDOWN_TIMEOUT or {DEFAULT_SHUTDOWN_TIMEOUT:g}). Example: --shutdown-timeout 5")
    add("--signals-to-handle", "--signals_to_handle", action=_EnvValue,
        default="SIGTERM,SIGINT,SIGHUP,SIGQUIT", metavar="SIGNALS",
        help="signals that stop the ranks and fastspawn (default SIGTERM,SIGINT,SIGHUP,SIGQUIT). "
        "Example: --signals-to-handle SIGTERM,SIGINT,SIGUSR1")
    add("--event-log-handler", "--event_log_handler", action=_EnvValue, default="null", metavar="NAME",
        help="torch's elastic event handler for the agent's events (elastic rendezvous) "
        "(default null). Example: --event-log-handler console")

    group = parser.add_argument_group("output and logs")
    add("--log-dir", "--log_dir", action=_EnvValue, default=None, metavar="DIR",
        help="keep each attempt's logs and error files in "
        "DIR/<run id>_<random>/attempt_<k>/<local rank>/{stdout.log,stderr.log,error.json} "
        "(torchrun's layout); without it they live in a temporary directory removed at "
        "exit. Example: --log-dir logs")
    add("-r", "--redirects", action=_EnvValue, default="0", metavar="STD",
        help="send ranks' streams to log files instead of the console: 0 none, 1 stdout, "
        "2 stderr, 3 both, or per local rank LOCAL_RANK:VALUE,... Example: --redirects 3")
    add("-t", "--tee", action=_EnvValue, default="0", metavar="STD",
        help="write ranks' streams to log files and to the console (same values as "
        "--redirects). Example: --tee 3 --log-dir logs")
    add("--local-ranks-filter", "--local_ranks_filter", action=_EnvValue, type=_rank_list, default="",
        metavar="RANKS",
        help="show only these local ranks' output on the console (the others' still go to "
        "their log files when redirected or teed). Example: --local-ranks-filter 0")
    add("--duplicate-stdout-filters", "--duplicate_stdout_filters", action=_EnvValue, type=_comma_list,
        default=[], metavar="WORDS", help="also copy teed stdout lines containing any of these "
        "words to filtered_stdout.log in the log directory (`,,` is a comma). "
        "Example: --tee 3 --duplicate-stdout-filters loss,acc")
    add("--duplicate-stderr-filters", "--duplicate_stderr_filters", action=_EnvValue, type=_comma_list,
        default=[], metavar="WORDS", help="the same for stderr (filtered_stderr.log). "
        "Example: --tee 3 --duplicate-stderr-filters Warning")
    add("--logs-specs", "--logs_specs", default=None, metavar="NAME",
        help="a LogsSpecs class registered under the `torchrun.logs_specs` entry point group "
        "(needs torch). Example: --logs-specs mylogs")

    group = parser.add_argument_group("devices")
    add("--virtual-local-rank", "--virtual_local_rank", action=_EnvFlag,
        help="LOCAL_RANK=0 in every rank, and CUDA_VISIBLE_DEVICES narrowed to the rank's own "
        "device. Example: --virtual-local-rank")
    add("--numa-binding", "--numa_binding", choices=NUMA_MODES, default=None,
        help="torchrun binds ranks to CPUs near their GPU; accepted (needs torch) but not "
        "applied: fastspawn says so and starts the ranks unbound. Example: --numa-binding node")
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


def _option(parser: argparse.ArgumentParser, flag: str) -> Optional[argparse.Action]:
    """The action of ``flag``, or of the one long option it abbreviates (argparse's rule)."""
    actions = {s: a for a in parser._actions for s in a.option_strings}  # noqa: SLF001
    if flag in actions:
        return actions[flag]
    if flag.startswith("--"):
        matches = {id(a): a for s, a in actions.items() if s.startswith(flag)}
        if len(matches) == 1:
            return next(iter(matches.values()))
    return None


def split_command_line(parser: argparse.ArgumentParser, argv: Sequence[str]) -> Tuple[List[str], Optional[Target]]:
    """The launcher's own options, and the target with its arguments passed verbatim.

    The target is the first token that is not an option or an option's value, or the
    token after ``--`` (then a program). Everything after the target belongs to it. The
    target's kind ("script" here, "program" after ``--``) is settled by the options later.
    """
    i = 0
    while i < len(argv):
        token = argv[i]
        if token == "--":
            if i + 1 >= len(argv):
                raise UsageError("`--` must be followed by the program to run")
            return list(argv[:i]), Target("program", argv[i + 1], tuple(argv[i + 2 :]))
        if token.startswith("-") and token != "-":
            action = _option(parser, token.split("=", 1)[0])
            if action is not None and action.nargs != 0 and "=" not in token:
                i += 1  # skip its value ("-n8" carries it: "-n8" is no flag of ours)
            i += 1
            continue
        return list(argv[:i]), Target("script", token, tuple(argv[i + 1 :]))
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


def resolve_layout(options: argparse.Namespace, env: Mapping[str, str], run_id: str = "none") -> NodeLayout:
    """Node count and node rank from the flags (--nnodes, --node-rank), else from Slurm's
    variables when neither flag is given, else one node; the master from --master-addr and
    --master-port (or a static --rdzv-endpoint HOST:PORT) likewise. ``options.nproc_per_node``
    is resolved to a number. Raises UsageError for inconsistent values."""
    nproc = options.nproc_per_node
    nnodes = options.nnodes[1] if options.nnodes is not None else 1  # static: the maximum, as torch's
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

    master_addr, master_port = options.master_addr, options.master_port
    endpoint = getattr(options, "rdzv_endpoint", "")
    if endpoint and options.rdzv_backend == "static":  # torchrun: the endpoint names the master
        master_addr, master_port = _host_port(endpoint, None)
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
    if master_port is None:
        if nnodes == 1:
            master_port = free_port()
        elif from_slurm and _env_int(env, "SLURM_JOB_ID", "SLURM_JOBID") is not None:
            job = _env_int(env, "SLURM_JOB_ID", "SLURM_JOBID") or 0
            master_port = SLURM_PORT_BASE + job % SLURM_PORT_SPAN
        else:
            master_port = DEFAULT_MULTINODE_PORT
    return NodeLayout(nproc, nnodes, node_rank, local_offset, local_world_size,
                      master_addr, master_port, run_id, from_slurm)


def _host_port(endpoint: str, default_port: Optional[int]) -> Tuple[str, Optional[int]]:
    """``HOST[:PORT]`` (an IPv6 host in brackets) as torch's rendezvous reads an endpoint."""
    host, port = endpoint.strip(), default_port
    if host.endswith("]") or ":" not in host:
        pass
    else:
        host, _, text = host.rpartition(":")
        try:
            port = _port(text) if text != "0" else 0
        except ValueError:
            raise UsageError(f"--rdzv-endpoint {endpoint!r}: the port must be an integer in 0-65535") from None
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not host:
        raise UsageError(f"--rdzv-endpoint {endpoint!r}: the host is missing")
    return host, port


def _new_run_id() -> str:
    import uuid

    return str(uuid.uuid4())


def free_port() -> int:
    """A TCP port nobody listens on now (for the rendezvous store that rank 0 starts)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("", 0))
        return int(sock.getsockname()[1])


def worker_env(rank: int, local_rank: int, group_rank: int, group_world_size: int, local_world_size: int,
               world_size: int, master_addr: str, master_port: int, restart_count: int, max_restarts: int,
               run_id: str, agent_store: bool, env: Mapping[str, str], role: str = ROLE,
               virtual_local_rank: bool = False) -> Dict[str, str]:
    """One worker's variables, as torchrun's agent sets them (``TORCHELASTIC_ERROR_FILE`` is
    added per attempt by the logs spec). With ``virtual_local_rank``, LOCAL_RANK is 0 and
    CUDA_VISIBLE_DEVICES names the rank's own device (its entry of the launcher's list)."""
    worker = {
        "RANK": str(rank),
        "LOCAL_RANK": str(local_rank),
        "GROUP_RANK": str(group_rank),
        "ROLE_RANK": str(rank),
        "ROLE_NAME": role,
        "LOCAL_WORLD_SIZE": str(local_world_size),
        "WORLD_SIZE": str(world_size),
        "GROUP_WORLD_SIZE": str(group_world_size),
        "ROLE_WORLD_SIZE": str(world_size),
        "MASTER_ADDR": master_addr,
        "MASTER_PORT": str(master_port),
        "TORCHELASTIC_RESTART_COUNT": str(restart_count),
        "TORCHELASTIC_MAX_RESTARTS": str(max_restarts),
        "TORCHELASTIC_RUN_ID": run_id,
        "TORCHELASTIC_USE_AGENT_STORE": str(agent_store),
        "TORCH_NCCL_ASYNC_ERROR_HANDLING": env.get("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1"),
    }
    if virtual_local_rank:
        worker["LOCAL_RANK"] = "0"
        visible = env.get("CUDA_VISIBLE_DEVICES")
        if visible is None:
            worker["CUDA_VISIBLE_DEVICES"] = str(local_rank)
        else:
            devices = visible.split(",")
            if local_rank >= len(devices):
                raise UsageError(f"local rank {local_rank} has no device in CUDA_VISIBLE_DEVICES={visible}")
            worker["CUDA_VISIBLE_DEVICES"] = devices[local_rank].strip()
    return worker


def rank_envs(layout: NodeLayout, restart_count: int, max_restarts: int,
              env: Mapping[str, str], role: str = ROLE, virtual_local_rank: bool = False) -> List[Dict[str, str]]:
    """Each local rank's variables on a static rendezvous (see :func:`worker_env`)."""
    return [
        worker_env(layout.global_rank(local), layout.local_offset + local, layout.node_rank, layout.nnodes,
                   layout.local_world_size, layout.world_size, layout.master_addr, layout.master_port,
                   restart_count, max_restarts, layout.run_id, layout.agent_store, env, role, virtual_local_rank)
        for local in range(layout.nproc)
    ]


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
        elif kind == "path":  # --run-path: as torchrun's run_script_path runs it
            runpy.run_path(name, run_name="__main__")
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
class LaunchSettings(NamedTuple):
    """The resolved launch configuration: what torchrun puts in torch's ``LaunchConfig``
    for the same command line (same field names), plus the options it keeps apart."""

    min_nodes: int
    max_nodes: int
    nproc_per_node: int
    run_id: str
    role: str
    rdzv_endpoint: str
    rdzv_backend: str
    rdzv_configs: Dict[str, Any]
    max_restarts: int
    monitor_interval: float
    start_method: str
    local_addr: Optional[str]
    log_dir: Optional[str]
    redirects: str
    tee: str
    local_ranks_filter: Optional[Set[int]]
    event_log_handler: str
    signals_to_handle: str
    duplicate_stdout_filters: List[str]
    duplicate_stderr_filters: List[str]
    virtual_local_rank: bool
    shutdown_timeout: float
    numa_binding: Optional[str]
    logs_specs: Optional[str]

    @property
    def elastic(self) -> bool:
        """Run as torch's elastic agent (torch's rendezvous handler): any backend but static,
        except a rendezvous of one node on this machine (--standalone, torchrun's default on
        one node), which fastspawn's own single-node launch serves alike."""
        return self.rdzv_backend != "static" and not (
            self.max_nodes == 1 and self.rdzv_backend == "c10d" and self.rdzv_endpoint == LOCAL_RDZV_ENDPOINT)


LOCAL_RDZV_ENDPOINT = "localhost:0"  # torchrun's --standalone endpoint


class Plan(NamedTuple):
    """A checked command line: what to run, where, how."""

    options: argparse.Namespace
    target: Target
    layout: NodeLayout
    program: Optional[str]  # the resolved program path (kind "program")
    settings: Optional[LaunchSettings] = None


def _say(message: str) -> None:
    sys.stderr.write(f"{PROG}: {message}\n")
    sys.stderr.flush()


def _has_torch() -> bool:
    """Whether torch imports (only asked for flags that use it: the import costs seconds)."""
    try:
        import torch  # noqa: F401
    except ImportError:
        return False
    return True


def _needs_torch(what: str) -> None:
    if not _has_torch():
        raise UsageError(f"{what} needs torch, which is not installed (pip install torch)")


def resolve_nproc(value: Union[int, str], env: Mapping[str, str]) -> int:
    """--nproc-per-node as torchrun resolves it: a number; cpu: the CPUs this process may
    run on; gpu/xpu: the devices (torch needed; CUDA is asked through torch, as torchrun
    does, in this launcher, never in the zygote); auto: the accelerators, else the CPUs."""
    if isinstance(value, int):
        return value

    def cpus() -> int:
        return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)

    if value == "cpu":
        return cpus()
    if value == "auto" and not _has_torch():
        return cpus()  # no torch, no accelerator torch could use
    _needs_torch(f"--nproc-per-node {value}")
    import torch

    if value == "gpu":
        if not torch.cuda.is_available():
            raise UsageError("--nproc-per-node gpu: Cuda is not available.")
        return int(torch.cuda.device_count())
    if value == "xpu":
        if not torch.xpu.is_available():
            raise UsageError("--nproc-per-node xpu: Xpu is not available.")
        return int(torch.xpu.device_count())
    if value == "auto":
        if torch.accelerator.is_available():
            return int(torch.accelerator.device_count())
        return cpus()
    if value == torch._C._get_privateuse1_backend_name():  # noqa: SLF001
        from torch.utils.backend_registration import _get_custom_mod_func

        if not _get_custom_mod_func("is_available")():
            raise UsageError(f"--nproc-per-node {value}: {value} is not available.")
        return int(_get_custom_mod_func("device_count")())
    raise UsageError(f"argument -n/--nproc-per-node: Unsupported nproc_per_node value: {value}")


def parse_rdzv_conf(text: str) -> Dict[str, Any]:
    """``KEY=VALUE,...`` as torch reads --rdzv-conf (values are strings, both sides stripped)."""
    config: Dict[str, Any] = {}
    for item in text.strip().split(",") if text.strip() else []:
        key, eq, value = item.partition("=")
        if not key.strip():
            raise UsageError(f"--rdzv-conf {text!r}: expected KEY1=VALUE1,...,KEYN=VALUEN")
        if not eq or not value.strip():
            raise UsageError(f"--rdzv-conf {text!r}: the rendezvous option {key.strip()!r} has no value")
        config[key.strip()] = value.strip()
    return config


def _settings(options: argparse.Namespace, env: Mapping[str, str]) -> LaunchSettings:
    """torchrun's resolution of the options (its ``run`` and ``config_from_args``); mutates
    ``options`` where torchrun mutates its arguments (--standalone, the one-node default)."""
    min_nodes, max_nodes = options.nnodes if options.nnodes is not None else (1, 1)
    slurm_nodes = (options.nnodes is None and options.node_rank is None and "SLURM_PROCID" in env)
    if options.standalone:
        options.rdzv_backend, options.rdzv_endpoint, options.rdzv_id = "c10d", LOCAL_RDZV_ENDPOINT, _new_run_id()
    elif (options.rdzv_backend == "static" and not options.rdzv_endpoint and options.master_port is None
          and max_nodes == 1 and not slurm_nodes):
        # torchrun's default on one node: a c10d rendezvous on this machine, a fresh run id
        options.rdzv_backend, options.rdzv_endpoint, options.rdzv_id = "c10d", LOCAL_RDZV_ENDPOINT, _new_run_id()
    if options.rdzv_backend != "static" and options.node_rank:
        import logging

        logging.getLogger("fastspawn.cli").warning(
            "--node-rank is only used by the static rendezvous; ignored with --rdzv-backend %s",
            options.rdzv_backend)
    if options.start_method not in START_METHODS:  # a PET_START_METHOD value escapes argparse's check
        raise UsageError(f"argument --start-method: invalid choice: {options.start_method!r} "
                         f"(choose from {', '.join(START_METHODS)})")
    rdzv_configs = parse_rdzv_conf(options.rdzv_conf)
    rdzv_configs.setdefault("timeout", DEFAULT_RDZV_TIMEOUT)
    endpoint = options.rdzv_endpoint
    if options.rdzv_backend == "static":
        rdzv_configs["rank"] = options.node_rank if options.node_rank is not None else 0
        if not endpoint:
            endpoint = f"{options.master_addr or '127.0.0.1'}:{options.master_port or DEFAULT_MULTINODE_PORT}"
    elif options.rdzv_backend != "c10d" or endpoint != LOCAL_RDZV_ENDPOINT or max_nodes > 1:
        _needs_torch(f"--rdzv-backend {options.rdzv_backend}")
    if options.numa_binding is not None:
        _needs_torch("--numa-binding")
    if options.logs_specs is not None:
        _needs_torch("--logs-specs")
        _logs_specs_class(options.logs_specs)
    options.nproc_per_node = resolve_nproc(options.nproc_per_node, env)
    visible = env.get("CUDA_VISIBLE_DEVICES")
    if options.virtual_local_rank and visible is not None and len(visible.split(",")) < options.nproc_per_node:
        raise UsageError(f"--virtual-local-rank: local rank {len(visible.split(','))} has no device in "
                         f"CUDA_VISIBLE_DEVICES={visible}")
    shutdown = options.shutdown_timeout
    if shutdown is None:
        text = env.get("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", str(int(DEFAULT_SHUTDOWN_TIMEOUT)))
        try:
            shutdown = _seconds(text)
        except ValueError:
            raise UsageError(f"TORCH_ELASTIC_SHUTDOWN_TIMEOUT={text!r} is not a number of seconds") from None
        options.shutdown_timeout = shutdown
    return LaunchSettings(
        min_nodes, max_nodes, options.nproc_per_node, options.rdzv_id, options.role, endpoint,
        options.rdzv_backend, rdzv_configs, options.max_restarts, options.monitor_interval,
        options.start_method, options.local_addr, options.log_dir, options.redirects, options.tee,
        options.local_ranks_filter, options.event_log_handler, options.signals_to_handle,
        options.duplicate_stdout_filters, options.duplicate_stderr_filters, options.virtual_local_rank,
        shutdown, options.numa_binding, options.logs_specs)


def _logs_specs_class(name: str) -> Any:
    """The class registered as ``name`` in the ``torchrun.logs_specs`` entry point group."""
    from importlib import metadata

    points = metadata.entry_points()
    group = (points.select(group="torchrun.logs_specs") if hasattr(points, "select")
             else getattr(points, "get")("torchrun.logs_specs", ()))  # Python 3.9: a dict
    for point in group:
        if point.name == name:
            return point.load()
    raise UsageError(f"--logs-specs: Could not find entrypoint under 'torchrun.logs_specs[{name}]' key")


def plan_command(argv: Sequence[str], env: Mapping[str, str]) -> Plan:
    """Parse and check the command line (``--help``/``--version`` exit here); raises
    UsageError naming the problem."""
    parser = build_parser(env)
    launcher_argv, target = split_command_line(parser, argv)
    options = parser.parse_args(launcher_argv)
    if target is None:
        raise UsageError("nothing to run: give a script, -m MODULE, or -- PROGRAM")
    if target.kind == "script":
        if options.run_path:
            target = target._replace(kind="path")
        elif options.no_python:
            if options.module:
                raise UsageError("Don't use both the '--no-python' flag and the '--module' flag at the same time.")
            target = target._replace(kind="program")
        elif options.module:
            target = target._replace(kind="module")
    program = None
    if target.kind == "program":
        if options.module and not options.no_python:
            raise UsageError("-m and `-- PROGRAM` exclude each other")
        program = _resolve_program(target.name, env)
    elif target.kind in ("script", "path") and not os.path.isfile(target.name):
        raise UsageError(f"can't open file {target.name!r}: no such file")
    settings = _settings(options, env)
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
    layout = resolve_layout(options, env, settings.run_id)
    return Plan(options, target, layout, program, settings)


def _resolve_program(name: str, env: Mapping[str, str]) -> str:
    from ._api import _resolve_program as resolve  # what launch_programs will run

    try:
        return resolve(name, env)
    except FileNotFoundError:
        raise UsageError(f"program {name!r} not found") from None
    except PermissionError:
        raise UsageError(f"program {name!r} is not executable") from None


def _line_prefixes(layout: NodeLayout, env: Mapping[str, str], role: str = ROLE) -> Dict[int, str]:
    template = env.get("TORCHELASTIC_LOG_LINE_PREFIX_TEMPLATE")
    prefixes = {}
    for local in range(layout.nproc):
        rank, local_rank = layout.global_rank(local), layout.local_offset + local
        if template:
            from string import Template

            prefixes[local] = Template(template).safe_substitute(role_name=role, rank=rank, local_rank=local_rank)
        else:
            prefixes[local] = f"[{rank}]:"
    return prefixes


def _prepare_python_ranks(plan: Plan) -> List[str]:
    """sys.path[0] as the interpreter sets it for the target; the target's imports
    preloaded in the zygote, which starts warming up (in a thread) with this sys.path.
    Returns the preloaded modules."""
    target = plan.target
    if target.kind in ("script", "path"):
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


def rank_entrypoint(plan: Plan) -> Tuple[Union[Callable[..., Any], str], Tuple[Any, ...], List[str]]:
    """What each rank runs and with which arguments; for Python ranks the zygote starts
    warming up with the target's imports (returned)."""
    target = plan.target
    if target.kind == "program":
        assert plan.program is not None  # resolved for kind "program"
        return plan.program, target.args, []
    modules = _prepare_python_ranks(plan)
    return run_rank, (target.kind, target.name, target.args), modules


def make_logs_specs(options: argparse.Namespace, nproc: int) -> Any:
    """The logs spec of every attempt: --logs-specs' class, else fastspawn's, where what is
    not redirected to a file goes to the console teed (whole, prefixed lines)."""
    from .elastic import DefaultLogsSpecs, Std, to_map

    if options.logs_specs is not None:  # a subclass of torch's LogsSpecs, which takes torch's Std
        from torch.distributed.elastic.multiprocessing import Std as TorchStd

        return _logs_specs_class(options.logs_specs)(
            log_dir=options.log_dir, redirects=TorchStd.from_str(options.redirects),
            tee=TorchStd.from_str(options.tee), local_ranks_filter=options.local_ranks_filter)
    redirects = to_map(Std.from_str(options.redirects), nproc)
    tee = to_map(Std.from_str(options.tee), nproc)
    tee = {i: tee[i] | (Std.ALL & ~redirects[i]) for i in range(nproc)}
    return DefaultLogsSpecs(log_dir=options.log_dir, redirects=redirects, tee=tee,
                            local_ranks_filter=options.local_ranks_filter)


def _prepare_launcher(plan: Plan) -> None:
    """What torchrun's launcher sets in itself before starting workers."""
    options = plan.options
    if options.nproc_per_node > 1 and "OMP_NUM_THREADS" not in os.environ:
        os.environ["OMP_NUM_THREADS"] = "1"  # as torchrun: N ranks must not each take every core
    os.environ["TORCHELASTIC_SIGNALS_TO_HANDLE"] = options.signals_to_handle
    _setup_logging()
    if options.numa_binding is not None:
        import logging

        logging.getLogger("fastspawn.cli").warning(
            "--numa-binding %s: fastspawn does not bind ranks to NUMA nodes; they start unbound",
            options.numa_binding)


def run(plan: Plan) -> int:
    """Start the ranks, restart them on failure up to --max-restarts times, report; the
    exit status (0, the first failure's, or 128+N after signal N stopped the launcher)."""
    _prepare_launcher(plan)
    entrypoint, args, modules = rank_entrypoint(plan)
    if plan.settings is not None and plan.settings.elastic:
        from ._rendezvous import run_elastic

        return run_elastic(plan, entrypoint, args, modules)
    options, target, layout = plan.options, plan.target, plan.layout
    nproc = layout.nproc
    rank_args = {i: args for i in range(nproc)}
    from .elastic import SignalException, start_processes
    from .elastic.errors import ChildFailedError

    logs_specs = make_logs_specs(options, nproc)
    prefixes = _line_prefixes(layout, os.environ, options.role)
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
            envs = dict(enumerate(rank_envs(layout, attempt, options.max_restarts, os.environ,
                                            options.role, options.virtual_local_rank)))
            context = start_processes(options.role, entrypoint, rank_args, envs, logs_specs,
                                      log_line_prefixes=prefixes, start_method=options.start_method,
                                      duplicate_stdout_filters=options.duplicate_stdout_filters,
                                      duplicate_stderr_filters=options.duplicate_stderr_filters)
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
