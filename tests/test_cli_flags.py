"""torchrun's flags doing in ``fastspawn`` what they do in torchrun, end to end (they need no
torch): --run-path, --no-python, --role, --virtual-local-rank, --duplicate-*-filters,
--signals-to-handle, --rdzv-id on a static rendezvous, --standalone's environment."""

import json
import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from _cli_wait import signal_hanging_ranks

pytestmark = pytest.mark.timeout(120)

HERE = Path(__file__).resolve().parent
SCRIPT = str(HERE / "_cli_script.py")
_BIN = Path(sys.executable).parent / "fastspawn"
FASTSPAWN = [str(_BIN)] if _BIN.exists() else [sys.executable, "-m", "fastspawn"]


def env(**extra):
    out = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "PET_", "TORCHELASTIC_")) and k != "CUDA_VISIBLE_DEVICES"}
    out.update(PYTHONUNBUFFERED="1", **extra)
    return out


def run(*args, timeout=60, **extra):
    return subprocess.run([*FASTSPAWN, *map(str, args)], env=env(**extra), capture_output=True, text=True,
                          timeout=timeout)


def records(stdout):
    """{global rank: JSON record} from ``[rank]:{...}`` lines."""
    out = {}
    for line in stdout.splitlines():
        prefix, _, body = line.partition("{")
        out[int(prefix.strip("[]:"))] = json.loads("{" + body)
    return out


def json_objects(text):
    """The JSON objects in ``text``: torchrun's ranks share its stdout unprefixed, and a
    print under ``python -u`` is two writes (text, newline), so two ranks' lines can run
    together as ``{...}{...}``."""
    decoder, objects, at = json.JSONDecoder(), [], text.find("{")
    while at >= 0:
        obj, end = decoder.raw_decode(text, at)
        objects.append(obj)
        at = text.find("{", end)
    return objects


def test_run_path_runs_the_script_with_runpy_run_path():
    proc = run("--run-path", "-n", "2", SCRIPT, "env", "x")
    assert proc.returncode == 0, proc.stderr
    got = records(proc.stdout)
    assert sorted(got) == [0, 1]
    assert all(r["name"] == "__main__" and r["argv"] == [SCRIPT, "env", "x"] for r in got.values())


def test_no_python_runs_the_target_as_a_program():
    code = "import os; print('{\"rank\": %s}' % os.environ['RANK'])"
    proc = run("--no-python", "-n", "2", sys.executable, "-c", code)
    assert proc.returncode == 0, proc.stderr
    assert records(proc.stdout) == {0: {"rank": 0}, 1: {"rank": 1}}


def test_role_names_the_workers_and_their_prefix():
    proc = run("--role", "trainer", "-n", "2", SCRIPT, "env",
               TORCHELASTIC_LOG_LINE_PREFIX_TEMPLATE="[${role_name}${local_rank}]:")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert sorted(line.split("{")[0] for line in lines) == ["[trainer0]:", "[trainer1]:"]
    assert {json.loads(line[line.index("{"):])["ROLE_NAME"] for line in lines} == {"trainer"}


@pytest.mark.parametrize("visible, expected", [(None, ["0", "1"]), ("5,7", ["5", "7"])])
def test_virtual_local_rank(visible, expected):
    code = ("import os, json; print(json.dumps({'rank': int(os.environ['RANK']), "
            "'local': os.environ['LOCAL_RANK'], 'cuda': os.environ['CUDA_VISIBLE_DEVICES']}))")
    extra = {} if visible is None else {"CUDA_VISIBLE_DEVICES": visible}
    proc = run("--virtual-local-rank", "-n", "2", "--", sys.executable, "-c", code, **extra)
    assert proc.returncode == 0, proc.stderr
    got = records(proc.stdout)
    assert [got[r]["local"] for r in (0, 1)] == ["0", "0"]
    assert [got[r]["cuda"] for r in (0, 1)] == expected


def test_duplicate_stdout_filters_copy_matching_lines(tmp_path):
    code = "print('keep me'); print('drop me'); print('also, keep')"
    proc = run("--tee", "1", "--log-dir", tmp_path, "--duplicate-stdout-filters", "keep",
               "--", sys.executable, "-c", code)
    assert proc.returncode == 0, proc.stderr
    [filtered] = list(tmp_path.rglob("filtered_stdout.log"))
    assert filtered.read_text().splitlines() == ["[0]:keep me", "[0]:also, keep"]


def test_rdzv_id_names_a_static_job():
    proc = run("--rdzv-id", "job7", "--master-port", "29999", "-n", "1", SCRIPT, "env")
    assert proc.returncode == 0, proc.stderr
    assert records(proc.stdout)[0]["TORCHELASTIC_RUN_ID"] == "job7"


def test_standalone_gives_torchruns_single_node_environment():
    proc = run("--standalone", "-n", "2", "--rdzv-id", "ignored", SCRIPT, "env")
    assert proc.returncode == 0, proc.stderr
    got = records(proc.stdout)
    run_ids = {r["TORCHELASTIC_RUN_ID"] for r in got.values()}
    assert len(run_ids) == 1 and uuid.UUID(run_ids.pop())  # ignored --rdzv-id: a fresh uuid, as torchrun
    assert all(r["WORLD_SIZE"] == "2" and r["GROUP_WORLD_SIZE"] == "1" for r in got.values())


def test_signals_to_handle_stops_the_ranks_on_another_signal(tmp_path):
    code, err, pids = signal_hanging_ranks([*FASTSPAWN, "--signals-to-handle", "SIGUSR1", "-n", "2",
                                            "--shutdown-timeout", "1", SCRIPT, "hang", str(tmp_path)],
                                           env(), tmp_path, 2, signal.SIGUSR1)
    assert code == 128 + signal.SIGUSR1, err
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_logs_specs_loads_the_registered_class(tmp_path):
    """--logs-specs NAME: the torchrun.logs_specs entry point NAME (a subclass of torch's
    LogsSpecs) decides the ranks' log destinations, as under torchrun."""
    pytest.importorskip("torch")
    info = tmp_path / "mylogs-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: mylogs\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text("[torchrun.logs_specs]\nmine = mylogs_mod:MyLogs\n")
    (tmp_path / "mylogs_mod.py").write_text(
        "from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs\n"
        "class MyLogs(DefaultLogsSpecs):\n"
        "    def reify(self, envs):\n"
        "        print('MyLogs.reify', sorted(envs), flush=True)\n"
        "        return super().reify(envs)\n")
    log_dir = tmp_path / "logs"
    proc = run("--logs-specs", "mine", "--log-dir", log_dir, "--redirects", "1", "-n", "2", SCRIPT, "env",
               PYTHONPATH=os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")])))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == ["MyLogs.reify [0, 1]"]  # the ranks' stdout went to their files
    logs = sorted(log_dir.rglob("stdout.log"))
    assert [json.loads(p.read_text())["RANK"] for p in logs] == ["0", "1"]


@pytest.mark.parametrize("flags", [["--standalone"], ["--role", "trainer", "--max-restarts", "2", "--rdzv-id", "j",
                                                      "--master-port", "29998"]])
def test_rank_environment_matches_torchruns(flags, tmp_path):
    """The same command line under torchrun and fastspawn: the same variables in each rank,
    except what is per run (ports, run id uuid, error files) and MASTER_ADDR on one node
    (torchrun's standalone c10d gives the host's name, fastspawn 127.0.0.1), and
    TORCHELASTIC_USE_AGENT_STORE, True under fastspawn only for a script that imports torch
    (this one does not: nobody would connect to a store served for it)."""
    pytest.importorskip("torch")
    args = [*flags, "--nproc-per-node", "2", SCRIPT, "env"]
    ours = run(*args)
    theirs = subprocess.run([sys.executable, "-m", "torch.distributed.run", *args], env=env(TMPDIR=str(tmp_path)),
                            capture_output=True, text=True, timeout=120)  # its temporary log directory: here
    assert ours.returncode == 0 == theirs.returncode, (ours.stderr, theirs.stderr)
    ours_by_rank = records(ours.stdout)
    theirs_by_rank = {int(r["RANK"]): r for r in json_objects(theirs.stdout)}
    assert sorted(ours_by_rank) == sorted(theirs_by_rank) == [0, 1]
    varying = {"MASTER_PORT", "TORCHELASTIC_ERROR_FILE", "TORCHELASTIC_USE_AGENT_STORE"} | ({"MASTER_ADDR", "TORCHELASTIC_RUN_ID"}
                                                             if "--standalone" in flags else set())
    for rank in (0, 1):
        mine, torchs = ours_by_rank[rank], theirs_by_rank[rank]
        assert {k: v for k, v in mine.items() if k not in varying} == {k: v for k, v in torchs.items() if k not in varying}
