"""The ``fastspawn`` command, end to end (subprocesses), plus its pure helpers in-process."""

import importlib.util
import json
import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from _cli_wait import signal_hanging_ranks

from fastspawn import _cli

HERE = Path(__file__).resolve().parent
SCRIPT = str(HERE / "_cli_script.py")
GLOO = str(HERE / "_cli_gloo.py")
_BIN = Path(sys.executable).parent / "fastspawn"
FASTSPAWN = [str(_BIN)] if _BIN.exists() else [sys.executable, "-m", "fastspawn"]
LINE = re.compile(r"^\[(\d+)\]:(.*)$")


def clean_env(**extra):
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("SLURM_") and k not in ("TORCHELASTIC_LOG_LINE_PREFIX_TEMPLATE", "OMP_NUM_THREADS")}
    env.update(extra)
    return env


def run_cli(*args, env=None, cwd=None, command=FASTSPAWN, timeout=90):
    return subprocess.run([*command, *map(str, args)], env=env or clean_env(), cwd=cwd,
                          capture_output=True, text=True, timeout=timeout)


def rank_lines(text):
    """[(rank, content)] of every prefixed line; fails on a line without the prefix."""
    out = []
    for line in text.splitlines():
        match = LINE.match(line)
        assert match, f"unprefixed or mixed line: {line[:200]!r}"
        out.append((int(match.group(1)), match.group(2)))
    return out


def reports(text):
    """{rank: json report} of ``_cli_script.py env`` lines, checking prefix == RANK."""
    result = {}
    for rank, content in rank_lines(text):
        info = json.loads(content)
        assert int(info["RANK"]) == rank
        result[rank] = info
    return result


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# ------------------------------------------------------------------------ end to end
def test_success_sets_torchrun_env_and_prefixes_lines(tmp_path):
    proc = run_cli("-n", 3, SCRIPT, "env", "--lr", "0.1", env=clean_env(TMPDIR=str(tmp_path)))
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    got = reports(proc.stdout)
    assert sorted(got) == [0, 1, 2]
    ports = {info["MASTER_PORT"] for info in got.values()}
    run_ids = {info["TORCHELASTIC_RUN_ID"] for info in got.values()}
    assert len(ports) == 1 and len(run_ids) == 1 and run_ids != {"none"}
    for rank, info in got.items():
        assert info["LOCAL_RANK"] == info["ROLE_RANK"] == str(rank)
        assert info["WORLD_SIZE"] == info["LOCAL_WORLD_SIZE"] == info["ROLE_WORLD_SIZE"] == "3"
        assert (info["GROUP_RANK"], info["GROUP_WORLD_SIZE"], info["ROLE_NAME"]) == ("0", "1", "default")
        assert info["MASTER_ADDR"] == "127.0.0.1" and 0 < int(info["MASTER_PORT"]) < 65536
        assert (info["TORCHELASTIC_RESTART_COUNT"], info["TORCHELASTIC_MAX_RESTARTS"]) == ("0", "0")
        assert info["TORCHELASTIC_USE_AGENT_STORE"] == "False"  # the script does not use torch
        assert info["TORCHELASTIC_ERROR_FILE"].endswith(f"attempt_0/{rank}/error.json")
        assert info["OMP_NUM_THREADS"] == "1" and info["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "1"
        # run as `python script.py --lr 0.1` runs it
        assert info["argv"] == [SCRIPT, "env", "--lr", "0.1"]
        assert (info["name"], info["file"], info["path0"]) == ("__main__", SCRIPT, str(HERE))
    assert os.listdir(tmp_path) == []  # the temporary log directory is gone


def test_failing_rank_summary_and_exit_status():
    proc = run_cli("-n", 3, SCRIPT, "fail", "1")
    assert proc.returncode == 1
    err = proc.stderr
    # the rank's traceback, as Python prints it, on the console (prefixed)
    assert "[1]:Traceback (most recent call last):" in err
    assert "[1]:ValueError: rank 1 failed on purpose" in err
    summary = err[err.index("=" * 20):]
    assert f"{SCRIPT} FAILED" in summary
    assert "Root Cause (first observed failure):" in summary
    assert "rank      : 1 (local_rank: 1)" in summary
    assert re.search(r"exitcode  : 1 \(pid: \d+\)", summary)
    assert re.search(r"error_file: .*attempt_0/1/error\.json", summary)
    assert "in fail_here" in summary and "ValueError: rank 1 failed on purpose" in summary
    assert "<NO_OTHER_FAILURES>" in summary  # ranks 0 and 2 were stopped, not blamed
    assert "fastspawn/_cli.py" not in err and "runpy" not in err  # launcher frames trimmed


def test_shutdown_timeout_bounds_the_stop_after_a_failure():
    # The others ignore SIGTERM: they are killed after 0.5 s, long before the 30 s default.
    proc = run_cli("-n", 3, "--shutdown-timeout", "0.5", SCRIPT, "fail", "1", "stubborn", timeout=25)
    assert proc.returncode == 1
    assert "<NO_OTHER_FAILURES>" in proc.stderr  # the SIGKILLed ranks are not blamed


def test_rank_killed_by_signal():
    proc = run_cli("-n", 2, SCRIPT, "kill", "1")
    assert proc.returncode == 128 + signal.SIGKILL
    assert "exitcode  : -9" in proc.stderr and "(SIGKILL)" in proc.stderr
    assert "rank      : 1 (local_rank: 1)" in proc.stderr


def test_error_file_written_by_the_script_is_kept():
    proc = run_cli("-n", 2, SCRIPT, "own-error-file")
    assert proc.returncode == 1
    assert "traceback : recorded by the script itself" in proc.stderr
    assert "[1]:ValueError: rank 1 failed on purpose" in proc.stderr  # still printed


def test_uncaught_keyboard_interrupt_ends_the_rank_by_sigint():
    proc = run_cli("-n", 2, SCRIPT, "interrupt")
    assert proc.returncode == 128 + signal.SIGINT
    assert "[1]:KeyboardInterrupt" in proc.stderr and "(SIGINT)" in proc.stderr


def test_ctrl_c_stops_every_rank_and_exits_130(tmp_path):
    code, err, pids = signal_hanging_ranks([*FASTSPAWN, "-n", "3", "--shutdown-timeout", "1", SCRIPT, "hang",
                                            str(tmp_path)], clean_env(), tmp_path, 3, signal.SIGINT)
    assert code == 130, err
    assert "Traceback" not in err
    for pid in pids:  # rank 0 ignored SIGTERM: it got SIGKILL after the grace period
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


@pytest.mark.skipif(importlib.util.find_spec("torch") is None, reason="needs torch")
def test_two_nodes_static_gloo_all_reduce():
    port = free_port()
    common = ["-n", "2", "--nnodes", "2", "--master-addr", "127.0.0.1", "--master-port", str(port)]
    # Node 0's launcher also checks that it never imported torch itself (the ranks, the
    # zygote and the store helper did).
    light = [sys.executable, "-c", "import sys; from fastspawn._cli import main; rc = main(sys.argv[1:]); "
             "assert 'torch' not in sys.modules, 'the launcher imported torch'; sys.exit(rc)"]
    procs = [subprocess.Popen([*(light if node == 0 else FASTSPAWN), *common, "--node-rank", str(node), GLOO],
                              env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for node in (1, 0)]
    try:
        outputs = [p.communicate(timeout=100) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    got = {}
    for (out, err), node, p in zip(outputs, (1, 0), procs):
        assert p.returncode == 0, err
        for rank, content in rank_lines(out):
            info = json.loads(content)
            assert rank == info["rank"] == info["env_rank"] == 2 * node + info["local_rank"]
            assert info["group_rank"] == node
            got[rank] = info
    assert sorted(got) == [0, 1, 2, 3]
    assert all(info["world"] == 4 and info["sum"] == 6.0 for info in got.values())
    assert {info["agent_store"] for info in got.values()} == {"True"}  # node 0 served the store


def test_store_helper_failure_falls_back_to_rank_0(tmp_path):
    # A "torch" whose distributed module has no TCPStore: the helper fails to serve the
    # store; the ranks (already started, told to use it) are started again without it.
    (tmp_path / "torch").mkdir()
    (tmp_path / "torch" / "__init__.py").write_text("")
    (tmp_path / "torch" / "distributed.py").write_text("")
    script = tmp_path / "train.py"
    script.write_text("import os\nimport torch.distributed\n"
                      "print(os.environ['TORCHELASTIC_USE_AGENT_STORE'], os.environ['RANK'])\n")
    proc = run_cli("-n", 2, script)
    assert proc.returncode == 0, proc.stderr
    assert ("fastspawn: could not serve the rendezvous store (AttributeError: "
            "module 'torch.distributed' has no attribute 'TCPStore')") in proc.stderr
    assert sorted(line for line in proc.stdout.splitlines() if "False" in line) == ["[0]:False 0", "[1]:False 1"]


def test_slurm_variables_place_the_ranks():
    env = clean_env(SLURM_PROCID="1", SLURM_NTASKS="2", SLURM_NNODES="2", SLURM_NODEID="1",
                    SLURM_LOCALID="0", SLURM_JOB_NODELIST="gpu[07-08]", SLURM_JOB_ID="4321")
    proc = run_cli("-n", 2, SCRIPT, "env", env=env)
    assert proc.returncode == 0, proc.stderr
    got = reports(proc.stdout)
    assert sorted(got) == [2, 3]
    for rank, info in got.items():
        assert (info["WORLD_SIZE"], info["LOCAL_WORLD_SIZE"], info["GROUP_RANK"]) == ("4", "2", "1")
        assert info["LOCAL_RANK"] == str(rank - 2)
        assert (info["MASTER_ADDR"], info["MASTER_PORT"]) == ("gpu07", str(15000 + 4321))
        assert info["TORCHELASTIC_RUN_ID"] == "none"


@pytest.mark.parametrize("args", [
    [],
    ["-n", "0", SCRIPT],
    ["-n", "two", SCRIPT],
    ["--bogus", SCRIPT],
    ["--nnodes", "2", "--node-rank", "2", SCRIPT],
    ["missing_script.py"],
    ["--", "no-such-program-xyz"],
    ["-m", "--", "true"],
    ["--redirects", "4", SCRIPT],
    ["-n", "2", "--tee", "0:1,2:3", SCRIPT],
    ["--master-port", "70000", SCRIPT],
    ["-n"],
])
def test_bad_command_line_is_one_line_and_exit_2(args, capsys):
    assert _cli.main(args) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith("fastspawn: error: ") and err.count("\n") == 1, err


def test_bad_flag_from_the_console_script():
    proc = run_cli("--nproc-per-node", "0", SCRIPT)  # (a name like "x" may be a backend: needs torch)
    assert proc.returncode == 2
    assert proc.stdout == "" and proc.stderr.count("\n") == 1
    assert proc.stderr.startswith("fastspawn: error: argument -n/--nproc-per-node")


def test_help_explains_every_flag_with_an_example():
    proc = run_cli("--help")
    assert proc.returncode == 0 and proc.stderr == ""
    text = " ".join(proc.stdout.split())  # argparse wraps lines
    for usage in ("script.py [args ...]", "-m module [args ...]", "-- program [args ...]"):
        assert usage in text
    for action in _cli.build_parser()._actions:
        if action.dest in ("help", "version"):
            continue
        assert all(flag in text for flag in action.option_strings), action.option_strings
        assert "Example:" in action.help, action.option_strings


def test_module_mode_via_python_dash_m():
    proc = run_cli("-n", 2, "-m", "_cli_script", "env", "a", cwd=HERE,
                   command=[sys.executable, "-m", "fastspawn"])
    assert proc.returncode == 0, proc.stderr
    got = reports(proc.stdout)
    assert sorted(got) == [0, 1]
    for info in got.values():
        assert info["argv"] == [SCRIPT, "env", "a"]  # as `python -m _cli_script env a`
        assert (info["name"], info["path0"]) == ("__main__", str(HERE))


def test_program_mode():
    proc = run_cli("-n", 2, "--", "sh", "-c", 'echo "rank=$RANK world=$WORLD_SIZE local=$LOCAL_RANK"')
    assert proc.returncode == 0, proc.stderr
    assert sorted(rank_lines(proc.stdout)) == [(0, "rank=0 world=2 local=0"), (1, "rank=1 world=2 local=1")]
    failing = run_cli("-n", 2, "--", "sh", "-c", "exit $((RANK * 3))")
    assert failing.returncode == 3
    assert "sh FAILED" in failing.stderr and "exitcode  : 3" in failing.stderr


def test_max_restarts_restarts_every_rank():
    proc = run_cli("-n", 2, "--max-restarts", 2, SCRIPT, "flaky")
    assert proc.returncode == 0, proc.stderr
    got = reports(proc.stdout)
    assert sorted(got) == [0, 1]
    assert all(info["TORCHELASTIC_RESTART_COUNT"] == "1" for info in got.values())
    assert all(info["TORCHELASTIC_MAX_RESTARTS"] == "2" for info in got.values())
    assert "rank(s) 1 failed; restarting all 2 ranks (2 restart(s) left)" in proc.stderr
    assert run_cli("-n", 2, SCRIPT, "flaky").returncode == 3  # no restarts by default


def test_log_dir_redirects_tee_and_filter(tmp_path):
    proc = run_cli("-n", 3, "--log-dir", tmp_path, "--redirects", "0:1", "--tee", "1:1",
                   "--local-ranks-filter", "0,1", SCRIPT, "env")
    assert proc.returncode == 0, proc.stderr
    assert sorted(reports(proc.stdout)) == [1]  # 0: to its file only; 2: filtered out
    (run_dir,) = tmp_path.iterdir()
    for rank in (0, 1):
        logged = json.loads((run_dir / "attempt_0" / str(rank) / "stdout.log").read_text())
        assert logged["RANK"] == str(rank)


def test_line_prefix_template():
    env = clean_env(TORCHELASTIC_LOG_LINE_PREFIX_TEMPLATE="${role_name}-${rank}-${local_rank}> ")
    proc = run_cli("-n", 2, "--", "sh", "-c", "echo hi", env=env)
    assert proc.returncode == 0, proc.stderr
    assert sorted(proc.stdout.splitlines()) == ["default-0-0> hi", "default-1-1> hi"]


def test_output_lines_never_mixed_across_ranks():
    nproc, lines, width = 8, 250, 5000
    proc = run_cli("-n", nproc, SCRIPT, "spam", lines, width)
    assert proc.returncode == 0, proc.stderr[-2000:]
    for text, tag in ((proc.stdout, "out"), (proc.stderr, "err")):
        seen = {rank: [] for rank in range(nproc)}
        for rank, content in rank_lines(text):
            head_rank, head_tag, index, body = content.split(":")
            assert (int(head_rank), head_tag) == (rank, tag)
            assert body == "x" * (width + int(index) % 7)
            seen[rank].append(int(index))
        assert all(indexes == list(range(lines)) for indexes in seen.values())


# ------------------------------------------------------------------------ helpers
@pytest.mark.parametrize("text, hosts", [
    ("node1", ["node1"]),
    ("gpu[07-09,12],login", ["gpu07", "gpu08", "gpu09", "gpu12", "login"]),
    ("r[1-2]n[9-10]", ["r1n9", "r1n10", "r2n9", "r2n10"]),
    ("a,b[1],c-[3-4]x", ["a", "b1", "c-3x", "c-4x"]),
])
def test_expand_hostlist(text, hosts):
    assert _cli.expand_hostlist(text) == hosts


@pytest.mark.parametrize("text", ["gpu[1-", "gpu]1[", "gpu[a-b]", "gpu[3-1]", "a,,b", ""])
def test_expand_hostlist_rejects_malformed(text):
    with pytest.raises(ValueError):
        _cli.expand_hostlist(text)


def test_slurm_several_tasks_per_node_share_local_ranks():
    options = _cli.build_parser().parse_args(["-n", "4"])
    env = {"SLURM_PROCID": "3", "SLURM_NTASKS": "4", "SLURM_NNODES": "2", "SLURM_NODEID": "1",
           "SLURM_LOCALID": "1", "SLURM_TASKS_PER_NODE": "2(x2)", "SLURM_NODELIST": "n[1-2]"}
    layout = _cli.resolve_layout(options, env)
    envs = _cli.rank_envs(layout, 0, 0, env)
    assert [e["RANK"] for e in envs] == ["12", "13", "14", "15"]
    assert [e["LOCAL_RANK"] for e in envs] == ["4", "5", "6", "7"]
    assert {e["LOCAL_WORLD_SIZE"] for e in envs} == {"8"} and {e["WORLD_SIZE"] for e in envs} == {"16"}
    assert (layout.master_addr, layout.master_port) == ("n1", _cli.DEFAULT_MULTINODE_PORT)
    # flags win over Slurm's variables
    flagged = _cli.resolve_layout(_cli.build_parser().parse_args(["-n", "4", "--nnodes", "1"]), env)
    assert (flagged.nnodes, flagged.node_rank, flagged.local_offset, flagged.slurm) == (1, 0, 0, False)


def test_script_imports():
    source = (
        "from __future__ import annotations\n"
        "import os, torch.distributed as dist\n"
        "from torch import nn\n"
        "from . import sibling\n"
        "try:\n    import numpy\nexcept ImportError:\n    pass\n"
        "def f():\n    import inside_function\n"
        "if __name__ == '__main__':\n    import json\n"
    )
    assert _cli.script_imports(source) == ["os", "torch.distributed", "torch", "torch.nn", "numpy", "json"]
    assert _cli.script_imports("def (:") == []


def test_split_command_line_keeps_the_targets_arguments():
    parser = _cli.build_parser()
    split = _cli.split_command_line
    assert split(parser, ["-n", "2", "t.py", "--", "-n", "3"]) == (["-n", "2"], _cli.Target("script", "t.py", ("--", "-n", "3")))
    assert split(parser, ["-n4", "--log-dir=d", "-m", "pkg.mod", "-x"]) == (
        ["-n4", "--log-dir=d", "-m"], _cli.Target("script", "pkg.mod", ("-x",)))  # -m applies later
    assert split(parser, ["--max-r", "2", "--standalone", "t.py"]) == (  # abbreviations, as argparse
        ["--max-r", "2", "--standalone"], _cli.Target("script", "t.py", ()))
    assert split(parser, ["--tee", "3", "--", "prog", "a"]) == (["--tee", "3"], _cli.Target("program", "prog", ("a",)))
