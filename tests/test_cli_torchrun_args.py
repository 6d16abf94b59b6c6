"""torchrun's command line, differentially: each command line of a corpus (flags, spellings,
PET_* variables, bad values) is resolved by torch's own torchrun (``torch.distributed.run``
up to the ``elastic_launch`` call, which is replaced by a recorder) and by fastspawn's
planner; both give the same launch configuration, or both refuse. Where they differ on
purpose the difference is listed (``DIFFERENCES``) and asserted as such."""

import os
import shutil
import tempfile
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from fastspawn import _cli

pytestmark = pytest.mark.timeout(120)

HERE = Path(__file__).resolve().parent
SCRIPT = str(HERE / "_cli_script.py")
PROGRAM = sys.executable
CWD = "@CWD@"  # an absolute path: the test's own directory (see in_tmp_path)


@pytest.fixture(autouse=True)
def in_tmp_path(tmp_path, monkeypatch):
    """Each test runs in its own directory: torch's parser creates the log directories it
    is given (relative ones in the working directory), nothing lands in the checkout."""
    monkeypatch.chdir(tmp_path)


def _here(argv):
    return [arg.replace(CWD, os.getcwd()) for arg in argv]

# (argv before the target, extra environment, target and its arguments)
VALID = [
    ([], {}, [SCRIPT]),
    (["--nproc-per-node", "4"], {}, [SCRIPT, "--lr", "0.1"]),
    (["--nproc_per_node=3"], {}, [SCRIPT]),
    (["--nproc-per-node", "cpu"], {}, [SCRIPT]),
    (["--nproc-per-node", "auto"], {}, [SCRIPT]),
    (["--nnodes", "2", "--node-rank", "1", "--master-addr", "10.0.0.1", "--master-port", "1234"], {}, [SCRIPT]),
    (["--nnodes=2", "--node_rank=0", "--master_addr=h0", "--master_port=29501"], {}, [SCRIPT]),
    (["--nnodes", "3"], {}, [SCRIPT]),
    (["--nnodes", "2", "--rdzv-endpoint", "node0:1234"], {}, [SCRIPT]),
    (["--nnodes", "1:4", "--rdzv-backend", "c10d", "--rdzv-endpoint", "host:29400", "--rdzv-id", "job",
      "--rdzv-conf", "join_timeout=5, last_call_timeout = 2,is_host=1"], {}, [SCRIPT, "a"]),
    (["--rdzv_backend=c10d", "--rdzv_endpoint=h", "--nnodes=2:2", "--rdzv_id=x"], {}, [SCRIPT]),
    (["--rdzv-backend", "c10d", "--rdzv-endpoint", "[::1]:5000", "--nnodes", "1:2",
      "--local-addr", "127.0.0.2"], {}, [SCRIPT]),
    (["--standalone", "--nproc-per-node", "2"], {}, [SCRIPT]),
    (["--standalone", "--rdzv-backend", "static", "--rdzv-id", "ignored"], {}, [SCRIPT]),
    (["--max-restarts", "3", "--monitor-interval", "0.5", "--start-method", "fork", "--role", "trainer"],
     {}, [SCRIPT]),
    (["--max_r", "2", "--start_method=forkserver"], {}, [SCRIPT]),  # an abbreviation, as argparse allows
    (["--nproc-per-node", "2", "--log-dir", f"{CWD}/logs", "-r", "3", "-t", "0:1,1:2",
      "--local-ranks-filter", "0,1"], {}, [SCRIPT]),
    (["--log_dir=d", "--redirects=1", "--tee=2", "--local_ranks_filter=1"], {}, [SCRIPT]),
    (["--event-log-handler", "console", "--signals-to-handle", "SIGTERM,SIGUSR1", "--shutdown-timeout", "5"],
     {}, [SCRIPT]),
    (["--duplicate-stdout-filters", "a,,b,c", "--duplicate_stderr_filters", "x"], {}, [SCRIPT]),
    (["--virtual-local-rank", "--numa-binding", "socket"], {}, [SCRIPT]),
    (["--no-python"], {}, [PROGRAM, "-c", "pass"]),
    (["--run-path"], {}, [SCRIPT, "x"]),
    (["--run-path", "--no-python", "-m"], {}, [SCRIPT]),  # --run-path wins
    (["-m"], {}, ["json.tool", "--help"]),
    (["--module", "--nproc-per-node", "2"], {}, ["pkg.train"]),
    ([], {"PET_NPROC_PER_NODE": "3", "PET_MAX_RESTARTS": "2", "PET_ROLE": "r"}, [SCRIPT]),
    (["--max-restarts", "1"], {"PET_MAX_RESTARTS": "2"}, [SCRIPT]),  # the flag wins
    ([], {"PET_NNODES": "1:2", "PET_RDZV_BACKEND": "c10d", "PET_RDZV_ENDPOINT": "h:1",
          "PET_RDZV_ID": "e", "PET_RDZV_CONF": "timeout=9"}, [SCRIPT]),
    ([], {"PET_STANDALONE": "1"}, [SCRIPT]),
    ([], {"PET_STANDALONE": "0", "PET_VIRTUAL_LOCAL_RANK": "1"}, [SCRIPT]),
    ([], {"PET_MODULE": "1"}, ["pkg.mod"]),
    ([], {"PET_NO_PYTHON": "1"}, [PROGRAM]),
    ([], {"PET_LOG_DIR": "ld", "PET_TEE": "3", "PET_LOCAL_RANKS_FILTER": "0",
          "PET_DUPLICATE_STDOUT_FILTERS": "p,q"}, [SCRIPT]),
    ([], {"PET_NODE_RANK": "1", "PET_NNODES": "2", "PET_MASTER_ADDR": "m", "PET_MASTER_PORT": "7"}, [SCRIPT]),
    ([], {"PET_MONITOR_INTERVAL": "2", "PET_START_METHOD": "fork", "PET_SIGNALS_TO_HANDLE": "SIGINT",
          "PET_EVENT_LOG_HANDLER": "console", "PET_LOCAL_ADDR": "a"}, [SCRIPT]),
    ([], {"TORCH_ELASTIC_SHUTDOWN_TIMEOUT": "7"}, [SCRIPT]),
    (["--shutdown-timeout", "3"], {"PET_SHUTDOWN_TIMEOUT": "4", "TORCH_ELASTIC_SHUTDOWN_TIMEOUT": "7"}, [SCRIPT]),
]

INVALID = [
    (["--nnodes", "x"], {}, [SCRIPT]),
    (["--nnodes", "1:2:3"], {}, [SCRIPT]),
    (["--nnodes", "3:1"], {}, [SCRIPT]),
    (["--nnodes", "0"], {}, [SCRIPT]),
    (["--max-restarts", "-1"], {}, [SCRIPT]),
    (["--max-restarts", "x"], {}, [SCRIPT]),
    (["--start-method", "thread"], {}, [SCRIPT]),
    (["--nproc-per-node", "many"], {}, [SCRIPT]),
    (["--nproc-per-node", "2.5"], {}, [SCRIPT]),
    (["--rdzv-conf", "=1"], {}, [SCRIPT]),
    (["--rdzv-conf", "key"], {}, [SCRIPT]),
    (["--rdzv-conf", "key= "], {}, [SCRIPT]),
    (["--local-ranks-filter", "a"], {}, [SCRIPT]),
    (["--numa-binding", "bogus"], {}, [SCRIPT]),
    (["--monitor-interval", "x"], {}, [SCRIPT]),
    (["--master-port", "x"], {}, [SCRIPT]),
    (["--node-rank", "x"], {}, [SCRIPT]),
    (["--no-python", "-m"], {}, [PROGRAM]),
    (["--unknown-flag"], {}, [SCRIPT]),
    (["--logs-specs", "no-such-logs-spec"], {}, [SCRIPT]),
    (["--nproc-per-node", "2"], {}, []),  # nothing to run
    ([], {"PET_MAX_RESTARTS": "x"}, [SCRIPT]),
    ([], {"PET_NNODES": "a:b"}, [SCRIPT]),
    ([], {"PET_STANDALONE": "yes"}, [SCRIPT]),
]

# Where fastspawn differs on purpose: (argv, env, target) -> what fastspawn does instead.
DIFFERENCES = [
    # fastspawn refuses at once what torchrun accepts and fails on later (or never uses)
    (["--nproc-per-node", "0"], {}, [SCRIPT], "refused"),
    (["--monitor-interval", "-1"], {}, [SCRIPT], "refused"),
    (["--master-port", "70000"], {}, [SCRIPT], "refused"),
    (["--nnodes", "2", "--node-rank", "2"], {}, [SCRIPT], "refused"),
    # torchrun's --shutdown-timeout is whole seconds; fastspawn takes fractions too
    (["--shutdown-timeout", "1.5"], {}, [SCRIPT], "accepted"),
    # argparse does not check a PET_* value against the choices; fastspawn does
    ([], {"PET_START_METHOD": "thread"}, [SCRIPT], "refused"),
]


def _torch_resolution(monkeypatch, argv, env):
    """torchrun's LaunchConfig, entrypoint and entrypoint arguments for ``argv``, or the
    exception it fails with (SystemExit 2 from argparse, or what its run() raises)."""
    torch_run = pytest.importorskip("torch.distributed.run")
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)  # run() sets it for the workers
    recorded = {}

    def elastic_launch(config, entrypoint):
        recorded.update(config=config, entrypoint=entrypoint)
        return lambda *args: recorded.update(args=list(args))

    monkeypatch.setattr(torch_run, "elastic_launch", elastic_launch)
    monkeypatch.setattr(torch_run.torch.multiprocessing, "_set_thread_name", lambda name: None)
    try:
        torch_run.run(torch_run.parse_args(_here(argv)))
    except (SystemExit, Exception) as exc:  # noqa: BLE001 - any refusal counts
        return exc
    finally:
        os.environ.pop("OMP_NUM_THREADS", None)
    return recorded


def _ours(argv, env):
    full = {k: v for k, v in os.environ.items() if not k.startswith(("PET_", "SLURM_"))}
    full.pop("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", None)
    full.update(env)
    try:
        return _cli.plan_command(_here(argv), full)
    except _cli.UsageError as exc:
        return exc


def _expected_from_torch(recorded):
    """torchrun's resolution in the terms of fastspawn's LaunchSettings and Target."""
    from torch.distributed.elastic.multiprocessing import Std

    config = recorded["config"]
    logs = config.logs_specs
    log_dir = logs._root_log_dir
    if os.path.dirname(log_dir) == tempfile.gettempdir() and os.path.basename(log_dir).startswith("torchelastic_"):
        shutil.rmtree(log_dir)  # torch made a temporary one for no --log-dir; fastspawn makes its own at start
        log_dir = None
    settings = {
        "min_nodes": config.min_nodes, "max_nodes": config.max_nodes, "nproc_per_node": config.nproc_per_node,
        "run_id": config.run_id, "role": config.role, "rdzv_endpoint": config.rdzv_endpoint,
        "rdzv_backend": config.rdzv_backend, "rdzv_configs": config.rdzv_configs,
        "max_restarts": config.max_restarts, "monitor_interval": config.monitor_interval,
        "start_method": config.start_method, "local_addr": config.local_addr, "log_dir": log_dir,
        "redirects": logs._redirects, "tee": logs._tee, "local_ranks_filter": logs._local_ranks_filter,
        "event_log_handler": config.event_log_handler, "signals_to_handle": config.signals_to_handle,
        "duplicate_stdout_filters": config.duplicate_stdout_filters,
        "duplicate_stderr_filters": config.duplicate_stderr_filters,
        "virtual_local_rank": config.virtual_local_rank, "shutdown_timeout": config.shutdown_timeout,
        "numa_binding": None if config.numa_options is None else config.numa_options.affinity_mode.value,
    }
    entrypoint, args = recorded["entrypoint"], recorded["args"]
    if callable(entrypoint):  # --run-path: run_script_path(script, *args)
        target = ("path", args[0], tuple(args[1:]))
    elif entrypoint == os.getenv("PYTHON_EXEC", sys.executable) and args[:1] == ["-u"]:
        module = args[1] == "-m"
        rest = args[2:] if module else args[1:]
        target = ("module" if module else "script", rest[0], tuple(rest[1:]))
    else:
        target = ("program", entrypoint, tuple(args))
    return settings, target, Std


def _ours_as_torch(plan, std):
    settings = plan.settings._asdict()
    settings.pop("logs_specs")
    settings["redirects"], settings["tee"] = std.from_str(settings["redirects"]), std.from_str(settings["tee"])
    return settings, tuple(plan.target)


def _same_run_id(ours, theirs):
    """A fresh run id on both sides (--standalone, the one-node default), or the same id."""
    try:
        return uuid.UUID(ours) and uuid.UUID(theirs) and ours != theirs
    except ValueError:
        return ours == theirs


def _case_id(case):
    argv, env, target = case[:3]
    return " ".join([*(f"{k}={v}" for k, v in env.items()), *argv, *(["T"] if target else [])])


@pytest.mark.parametrize("case", VALID, ids=_case_id)
def test_same_configuration_as_torchrun(case, monkeypatch):
    argv, env, target = case
    recorded = _torch_resolution(monkeypatch, [*argv, *target], env)
    assert isinstance(recorded, dict), f"torchrun refused a corpus line: {recorded!r}"
    expected, expected_target, std = _expected_from_torch(recorded)
    plan = _ours([*argv, *target], env)
    assert isinstance(plan, _cli.Plan), f"fastspawn refused: {plan}"
    ours, our_target = _ours_as_torch(plan, std)
    assert _same_run_id(ours.pop("run_id"), expected.pop("run_id"))
    assert ours == expected
    assert our_target == expected_target
    assert plan.layout.run_id == plan.settings.run_id  # what the ranks see in TORCHELASTIC_RUN_ID


@pytest.mark.parametrize("case", INVALID, ids=_case_id)
def test_same_refusals_as_torchrun(case, monkeypatch):
    argv, env, target = case
    refusal = _torch_resolution(monkeypatch, [*argv, *target], env)
    assert isinstance(refusal, BaseException), f"torchrun accepted {argv}"
    if isinstance(refusal, SystemExit):
        assert refusal.code == 2
    ours = _ours([*argv, *target], env)
    assert isinstance(ours, _cli.UsageError), f"fastspawn accepted {argv}"
    assert str(ours).strip() and "\n" not in str(ours)


@pytest.mark.parametrize("case", DIFFERENCES, ids=_case_id)
def test_documented_differences(case, monkeypatch):
    argv, env, target, ours_does = case
    theirs = _torch_resolution(monkeypatch, [*argv, *target], env)
    ours = _ours([*argv, *target], env)
    if ours_does == "refused":
        assert isinstance(theirs, dict) and isinstance(ours, _cli.UsageError)
    else:
        assert isinstance(theirs, SystemExit) and isinstance(ours, _cli.Plan)


def test_bad_values_exit_2_with_one_line_naming_the_flag():
    proc = subprocess.run([sys.executable, "-m", "fastspawn", "--nnodes", "3:1", SCRIPT],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and "--nnodes" in proc.stderr and "'3:1'" in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "fastspawn", "--rdzv-conf", "key", SCRIPT],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "'key' has no value" in proc.stderr


def test_every_torchrun_flag_is_accepted():
    """Each option string of torchrun's parser is one of ours, with the same arity."""
    torch_run = pytest.importorskip("torch.distributed.run")
    ours = {flag: action for action in _cli.build_parser({})._actions for flag in action.option_strings}
    for action in torch_run.get_args_parser()._actions:
        for flag in action.option_strings:
            assert flag in ours, flag
            assert (ours[flag].nargs == 0) == (action.nargs == 0), flag


@pytest.mark.parametrize("flags", [
    ["--rdzv-backend", "c10d", "--rdzv-endpoint", "127.0.0.1:1", "--nnodes", "1:2"],
    ["--rdzv-backend", "etcd-v2", "--rdzv-endpoint", "127.0.0.1:1"],
    ["--numa-binding", "node"],
    ["--logs-specs", "mine"],
    ["--nproc-per-node", "gpu"],
], ids=lambda flags: flags[0] + " " + flags[1])
def test_flags_that_need_torch_say_so_without_it(flags, tmp_path):
    from _no_torch import env_without_torch

    proc = subprocess.run([sys.executable, "-m", "fastspawn", *flags, SCRIPT], env=env_without_torch(tmp_path),
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and "needs torch" in proc.stderr, proc.stderr


def test_standalone_and_other_flags_work_without_torch(tmp_path):
    from _no_torch import env_without_torch

    env = {**env_without_torch(tmp_path), "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run([sys.executable, "-m", "fastspawn", "--standalone", "--nproc-per-node", "cpu",
                           "--role", "worker", "--max-restarts", "1", "--monitor-interval", "1",
                           "--signals-to-handle", "SIGTERM", "--", sys.executable, "-c",
                           "import os; print(os.environ['ROLE_NAME'], os.environ['TORCHELASTIC_RUN_ID'])"],
                          env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert len(lines) == _cli.resolve_nproc("cpu", os.environ)
    run_ids = {line.split()[1] for line in lines}
    assert len(run_ids) == 1 and uuid.UUID(run_ids.pop())  # --standalone: a fresh uuid, as torchrun's
    assert all(line.split(":", 1)[1].startswith("worker ") for line in lines)
