"""fastspawn.patch_torch(): torch.multiprocessing's spawn machinery becomes fastspawn's (a
child proves which engine started it), unpatch_torch() puts back exactly what was there,
the context-manager and FASTSPAWN_PATCH_TORCH=1 forms."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
from _no_torch import env_without_torch

import fastspawn
from fastspawn import _patch

# Each child records whether fastspawn's child bootstrap is on its stack.
SCRIPT = textwrap.dedent(
    """
    import json
    import os
    import sys
    import traceback

    import torch.multiprocessing as mp

    import fastspawn


    def engine(i, path):
        frames = [frame.filename.replace(os.sep, "/") for frame in traceback.extract_stack()]
        with open(f"{path}.{i}", "w") as f:
            json.dump(any(name.endswith("fastspawn/_child.py") for name in frames), f)


    def fail(i):
        raise ValueError("boom")


    def library(path):
        # What a library does: torch.multiprocessing.spawn looked up when it is called.
        mp.spawn(engine, args=(path,), nprocs=2)


    if __name__ == "__main__":
        out = sys.argv[1]
        torch_spawn = mp.spawn  # torch's own function, taken before any patch
        if os.environ.get("FASTSPAWN_PATCH_TORCH") == "1":
            library(f"{out}/env")
            print(json.dumps({"same": mp.spawn is fastspawn.spawn}))
            sys.exit(0)
        mp.spawn(engine, args=(f"{out}/before",), nprocs=1)
        with fastspawn.patch_torch():
            library(f"{out}/patched")
            torch_spawn(engine, args=(f"{out}/via_torch",), nprocs=1)  # calls start_processes
            try:
                mp.spawn(fail, nprocs=1)
            except mp.ProcessRaisedException as exc:
                caught = type(exc).__module__
        print(json.dumps({"caught": caught}))
    """
)


ELASTIC_MODULES = (
    "torch.distributed.elastic.multiprocessing",
    "torch.distributed.elastic.agent.server.local_elastic_agent",
)


@pytest.fixture
def torch_mp():
    """torch.multiprocessing, its spawn module and the elastic modules binding
    start_processes (all imported before the patch); unpatched again after the test."""
    pytest.importorskip("torch")
    import importlib

    modules = {
        name: importlib.import_module(name)
        for name in ("torch.multiprocessing", "torch.multiprocessing.spawn", *ELASTIC_MODULES)
    }
    before = {name: dict(vars(module)) for name, module in modules.items()}
    yield modules
    fastspawn.unpatch_torch()
    for name, module in modules.items():
        for key in names(modules, name):
            if key in before[name]:
                setattr(module, key, before[name][key])


def names(modules, module_name):
    """What is patched in a module: every public name of torch.multiprocessing.spawn (its
    __all__), and start_processes in the elastic modules."""
    if module_name in ELASTIC_MODULES:
        return ("start_processes",)
    return tuple(modules["torch.multiprocessing.spawn"].__all__)


def ours(module_name, name):
    """What the patch puts in torch's place: fastspawn's name, or for the elastic
    start_processes the function that calls fastspawn.elastic's."""
    return _patch._elastic_start_processes if module_name in ELASTIC_MODULES else getattr(fastspawn, name)


def originals(modules):
    return {(m, n): vars(module)[n] for m, module in modules.items() for n in names(modules, m) if n in vars(module)}


def assert_patched(modules):
    for m, module in modules.items():
        for name in names(modules, m):
            if name in vars(module):
                assert vars(module)[name] is ours(m, name), (m, name)


def assert_restored(modules, saved):
    assert originals(modules) == saved
    for (m, name), value in saved.items():
        assert vars(modules[m])[name] is value, (m, name)


def test_patch_replaces_every_name_and_unpatch_restores_identity(torch_mp):
    saved = originals(torch_mp)
    names_before = {m: set(vars(module)) for m, module in torch_mp.items()}
    # torch defines all seven in torch.multiprocessing.spawn and re-exports six of them
    assert len([key for key in saved if key[0] == "torch.multiprocessing.spawn"]) == 7
    assert ("torch.multiprocessing", "ProcessRaisedException") in saved
    # the elastic start_processes, defined in one module and bound by LocalElasticAgent's
    elastic = [saved[(m, "start_processes")] for m in ELASTIC_MODULES]
    assert elastic[0] is elastic[1] and elastic[0].__module__ == ELASTIC_MODULES[0]

    handle = fastspawn.patch_torch()
    assert handle.installed
    assert_patched(torch_mp)
    import torch.multiprocessing as mp

    assert mp.spawn is fastspawn.spawn and mp.ProcessExitedException is fastspawn.ProcessExitedException
    from torch.distributed.elastic.agent.server import local_elastic_agent

    assert local_elastic_agent.start_processes is _patch._elastic_start_processes

    fastspawn.unpatch_torch()
    assert_restored(torch_mp, saved)
    assert {m: set(vars(module)) for m, module in torch_mp.items()} == names_before  # nothing added
    fastspawn.unpatch_torch()  # not patched: nothing to do
    assert_restored(torch_mp, saved)


@pytest.mark.usefixtures("keep_signal_handlers")  # both libraries' start() install handlers
def test_patched_elastic_start_processes_is_fastspawns_but_torchs_with_numa_options(torch_mp, tmp_path):
    from torch.distributed.elastic import multiprocessing as tem
    from torch.numa.binding import AffinityMode, NumaOptions

    def start(**options):
        logs = tem.DefaultLogsSpecs(log_dir=str(tmp_path))
        context = tem.start_processes("t", "true", {0: ()}, {0: {}}, logs, **options)
        try:
            result = context.wait(60)
            assert result is not None and not result.is_failed()
        finally:
            context.close()
        return type(context).__module__

    with fastspawn.patch_torch():
        assert start() == "fastspawn.elastic.api"
        # NUMA binding: torch's own (here falling back to no binding: no GPU to bind to)
        numa = NumaOptions(affinity_mode=AffinityMode.NODE, should_fall_back_if_binding_fails=True)
        assert start(numa_options=numa) == "torch.distributed.elastic.multiprocessing.api"
    assert start() == "torch.distributed.elastic.multiprocessing.api"


def test_patch_is_idempotent(torch_mp):
    saved = originals(torch_mp)
    assert fastspawn.patch_torch().installed
    assert not fastspawn.patch_torch().installed
    assert_patched(torch_mp)
    fastspawn.unpatch_torch()
    assert_restored(torch_mp, saved)


def test_context_manager_restores_the_state_before_it(torch_mp):
    saved = originals(torch_mp)
    with fastspawn.patch_torch():
        with fastspawn.patch_torch():
            assert_patched(torch_mp)
        assert_patched(torch_mp)  # the outer block still holds it
    assert_restored(torch_mp, saved)

    fastspawn.patch_torch()
    with fastspawn.patch_torch():
        pass
    assert_patched(torch_mp)  # patched before the block: still patched after it
    fastspawn.unpatch_torch()
    assert_restored(torch_mp, saved)


def test_unpatch_leaves_what_someone_else_set_after_the_patch(torch_mp):
    saved = originals(torch_mp)
    mine = object()
    with fastspawn.patch_torch():
        torch_mp["torch.multiprocessing"].spawn = mine
    assert torch_mp["torch.multiprocessing"].spawn is mine
    assert torch_mp["torch.multiprocessing.spawn"].spawn is saved[("torch.multiprocessing.spawn", "spawn")]


def run_script(tmp_path, env=None):
    script = tmp_path / "script.py"
    script.write_text(SCRIPT)
    proc = subprocess.run(
        [sys.executable, str(script), str(tmp_path)],
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.splitlines()[-1])


def ran_on_fastspawn(path):
    return json.loads(path.read_text())


def test_a_script_calling_torch_spawn_runs_on_fastspawn_when_patched(tmp_path):
    pytest.importorskip("torch")
    result = run_script(tmp_path, {"FASTSPAWN_PATCH_TORCH": "0"})
    assert not ran_on_fastspawn(tmp_path / "before.0")  # the control: torch's own spawn
    assert ran_on_fastspawn(tmp_path / "patched.0") and ran_on_fastspawn(tmp_path / "patched.1")
    assert ran_on_fastspawn(tmp_path / "via_torch.0")  # torch's spawn function, bound earlier
    assert result["caught"] == "fastspawn._errors"  # except mp.ProcessRaisedException caught ours


def test_environment_variable_patches_at_import(tmp_path):
    pytest.importorskip("torch")
    result = run_script(tmp_path, {"FASTSPAWN_PATCH_TORCH": "1"})
    assert result["same"]
    assert ran_on_fastspawn(tmp_path / "env.0") and ran_on_fastspawn(tmp_path / "env.1")


def test_import_fastspawn_imports_torch_only_when_asked(tmp_path):
    code = "import sys, fastspawn; print('torch' in sys.modules)"
    env = {k: v for k, v in os.environ.items() if k != "FASTSPAWN_PATCH_TORCH"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"

    # Asked, with torch absent: import still works, and there is nothing to patch.
    env = {**env_without_torch(tmp_path), "FASTSPAWN_PATCH_TORCH": "1"}
    code = "import fastspawn; print(fastspawn.spawn.__module__)"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "fastspawn._api" and out.stderr == ""


def test_patch_torch_without_torch_says_so(tmp_path):
    code = "import fastspawn\ntry:\n    fastspawn.patch_torch()\nexcept ImportError as exc:\n    print(exc)"
    env = env_without_torch(tmp_path)
    env.pop("FASTSPAWN_PATCH_TORCH", None)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.startswith("fastspawn.patch_torch() needs torch, which cannot be imported:")


def run_side_by_side(commands, timeout=150):
    """Run each ``(argv, extra_env)`` at once, each in its own session; anything still
    running after ``timeout`` seconds is killed with all it started. Returns the
    CompletedProcess (text) of each, in order."""
    procs = []
    try:
        for argv, env in commands:
            procs.append(
                subprocess.Popen(
                    argv,
                    env={**os.environ, **(env or {})},
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    text=True,
                    start_new_session=True,
                )
            )
        deadline = time.monotonic() + timeout
        done = []
        for proc in procs:
            out, err = proc.communicate(timeout=max(0.1, deadline - time.monotonic()))
            done.append(subprocess.CompletedProcess(proc.args, proc.returncode, out, err))
        return done
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.communicate()


def test_elastic_modules_imported_after_the_patch_are_patched_and_restored():
    pytest.importorskip("torch")
    code = textwrap.dedent(
        """
        import json, sys
        import fastspawn, fastspawn._patch
        fastspawn.patch_torch()
        assert "torch.distributed.elastic.multiprocessing" not in sys.modules
        import torch.distributed.elastic.agent.server.local_elastic_agent as lea
        import torch.distributed.elastic.multiprocessing as tem
        ours = fastspawn._patch._elastic_start_processes
        seen = {"patched": [lea.start_processes is ours, tem.start_processes is ours]}
        fastspawn.unpatch_torch()
        seen["restored"] = [lea.start_processes is tem.start_processes, tem.start_processes.__module__]
        seen["hooked"] = any(type(finder).__module__ == "fastspawn._patch" for finder in sys.meta_path)
        print(json.dumps(seen))
        """
    )
    (proc,) = run_side_by_side([([sys.executable, "-c", code], None)])
    assert proc.returncode == 0, proc.stderr
    seen = json.loads(proc.stdout)
    assert seen == {
        "patched": [True, True],
        "restored": [True, "torch.distributed.elastic.multiprocessing"],
        "hooked": False,
    }


ELASTIC_SCRIPT = os.path.join(os.path.dirname(__file__), "_patch_elastic.py")


@pytest.fixture(scope="module")
def elastic_runs(tmp_path_factory):
    """tests/_patch_elastic.py's scenarios under torch as installed and under
    patch_torch() (then unpatched), run side by side: mode -> its JSON report."""
    pytest.importorskip("torch")
    out = tmp_path_factory.mktemp("elastic")
    modes = ("torch", "patched")
    for mode in modes:
        (out / mode).mkdir()
    procs = run_side_by_side([([sys.executable, ELASTIC_SCRIPT, mode, str(out / mode)], None) for mode in modes])
    for proc in procs:
        assert proc.returncode == 0, proc.stderr
    return {mode: json.loads(proc.stdout.splitlines()[-1]) for mode, proc in zip(modes, procs)}


def ranks(attempt, fastspawn_started):
    return {str(r): {"rank": r, "attempt": attempt, "fastspawn": fastspawn_started} for r in (0, 1)}


FAILED = {
    "raised": "torch.distributed.elastic.multiprocessing.errors.ChildFailedError",
    "name": "worker",
    # rank 1 raised on both attempts (max_restarts=1): reported from attempt 1's error file
    "failures": {"1": {"local_rank": 1, "exitcode": 1, "error": "ValueError: boom", "attempt": ["1"]}},
}


@pytest.mark.timeout(200)
def test_elastic_launch_starts_workers_through_fastspawn_elastic_when_patched(elastic_runs):
    patched = elastic_runs["patched"]
    assert patched["ok"] == {"returned": ranks(0, True)}
    assert patched["restart"] == {"returned": ranks(1, True)}  # one restart used
    assert {key: patched["fail"][key] for key in FAILED} == FAILED
    # unpatched again: torch's own start_processes
    assert patched["after_unpatch"] == {"returned": ranks(0, False)}


@pytest.mark.timeout(200)
def test_elastic_launch_patched_same_as_torch(elastic_runs):
    """Same return values, restarts, ChildFailedError and report (times, pids, paths and the
    traceback's frames aside) as torch's own; only the engine differs."""
    torch_run, patched = elastic_runs["torch"], elastic_runs["patched"]
    assert torch_run["ok"] == {"returned": ranks(0, False)}  # the marker's control
    for scenario in ("ok", "restart"):
        for value in patched[scenario]["returned"].values():
            value["fastspawn"] = False
        assert patched[scenario] == torch_run[scenario], scenario
    assert patched["fail"] == torch_run["fail"]
    assert "rank      : 1 (local_rank: 1)" in torch_run["fail"]["report"]


# An unmodified script: torch's spawn, no mention of fastspawn. Prints what it saw.
UNMODIFIED = textwrap.dedent(
    """
    import json
    import os
    import sys
    import traceback

    at_start = {"fastspawn": "fastspawn" in sys.modules, "torch": "torch" in sys.modules}
    import torch.multiprocessing as mp


    def engine(i, path):
        frames = [frame.filename.replace(os.sep, "/") for frame in traceback.extract_stack()]
        with open(f"{path}.{i}", "w") as f:
            json.dump(any(name.endswith("fastspawn/_child.py") for name in frames), f)


    if __name__ == "__main__":
        out, rank = sys.argv[1], os.environ.get("RANK", "main")
        mp.spawn(engine, args=(f"{out}/{rank}",), nprocs=2)
        started = []
        for i in range(2):
            with open(f"{out}/{rank}.{i}") as f:
                started.append(json.load(f))
        # torchrun's workers: fastspawn's engine leaves them in the agent's session (own
        # process group), torch's Popen(start_new_session=True) gives each its own session.
        seen = {"at_start": at_start, "spawn_on_fastspawn": started, "own_session": os.getsid(0) == os.getpid()}
        with open(f"{out}/seen.{rank}", "w") as f:
            json.dump(seen, f)
    """
)


def test_pth_file_installed_with_the_package():
    """The .pth ships with the package, sits in a site directory (so it runs at every
    interpreter start) and imports fastspawn only when the variable is set."""
    import importlib.metadata
    import site

    files = [f for f in importlib.metadata.distribution("fastspawn").files if f.name == "fastspawn_patch_torch.pth"]
    assert len(files) == 1
    path = files[0].locate()
    site_dirs = [*site.getsitepackages(), site.getusersitepackages()]
    assert os.path.dirname(os.path.realpath(path)) in [os.path.realpath(d) for d in site_dirs]
    with open(path) as f:
        lines = [line for line in f.read().splitlines() if line.strip()]
    assert lines == ['import os; os.environ.get("FASTSPAWN_PATCH_TORCH") == "1" and __import__("fastspawn")']


STARTUP = "import json, sys; print(json.dumps(sorted(sys.modules)))"


@pytest.mark.parametrize("value", [None, "0", ""])
def test_without_the_variable_interpreter_start_imports_nothing(value):
    env = {k: v for k, v in os.environ.items() if k != "FASTSPAWN_PATCH_TORCH"}
    if value is not None:
        env["FASTSPAWN_PATCH_TORCH"] = value
    out = subprocess.run([sys.executable, "-c", "import sys; print('fastspawn' in sys.modules)"],
                         env=env, capture_output=True, text=True, timeout=60)
    assert (out.stdout, out.stderr) == ("False\n", "")
    modules = json.loads(subprocess.run([sys.executable, "-c", STARTUP], env=env, capture_output=True, text=True,
                                        timeout=60, check=True).stdout)
    assert not [m for m in modules if m.split(".")[0] in ("fastspawn", "torch")]


def test_with_the_variable_interpreter_start_hooks_without_importing_torch(tmp_path):
    for env in ({**os.environ, "FASTSPAWN_PATCH_TORCH": "1"}, {**env_without_torch(tmp_path), "FASTSPAWN_PATCH_TORCH": "1"}):
        out = subprocess.run([sys.executable, "-c", STARTUP], env=env, capture_output=True, text=True, timeout=60)
        modules = json.loads(out.stdout)
        assert out.stderr == "" and "fastspawn._patch" in modules and "torch" not in modules


def test_unmodified_script_runs_on_fastspawn_with_the_variable(tmp_path):
    pytest.importorskip("torch")
    script = tmp_path / "train.py"
    script.write_text(UNMODIFIED)
    cases = (("1", True), ("0", False))
    for value, _ in cases:
        (tmp_path / value).mkdir()
    procs = run_side_by_side(
        [([sys.executable, str(script), str(tmp_path / value)], {"FASTSPAWN_PATCH_TORCH": value}) for value, _ in cases]
    )
    for proc, (value, expected) in zip(procs, cases):
        assert proc.returncode == 0, proc.stderr
        seen = json.loads((tmp_path / value / "seen.main").read_text())
        assert seen["at_start"] == {"fastspawn": expected, "torch": False}
        assert seen["spawn_on_fastspawn"] == [expected, expected]


def torchrun():
    """This Python's torchrun (the console script), or its module."""
    script = os.path.join(os.path.dirname(sys.executable), "torchrun")
    return [script] if os.path.exists(script) else [sys.executable, "-m", "torch.distributed.run"]


@pytest.mark.timeout(200)
def test_torchrun_with_the_variable_runs_agent_and_workers_on_fastspawn(tmp_path):
    pytest.importorskip("torch")
    script = tmp_path / "train.py"
    script.write_text(UNMODIFIED)
    for value in ("1", "0"):
        (tmp_path / value).mkdir()
    procs = run_side_by_side(
        [
            (
                [*torchrun(), "--nproc-per-node", "2", "--monitor-interval", "0.05", str(script), str(tmp_path / value)],
                {"FASTSPAWN_PATCH_TORCH": value},
            )
            for value in ("1", "0")
        ]
    )
    for proc in procs:
        assert proc.returncode == 0, proc.stderr
    for value, patched in (("1", True), ("0", False)):
        for rank in (0, 1):
            seen = json.loads((tmp_path / value / f"seen.{rank}").read_text())
            assert seen["own_session"] is not patched  # the agent started it with fastspawn's engine
            assert seen["spawn_on_fastspawn"] == [patched, patched]  # and the worker's own spawn
