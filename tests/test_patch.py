"""fastspawn.patch_torch(): torch.multiprocessing's spawn machinery becomes fastspawn's (a
child proves which engine started it), unpatch_torch() puts back exactly what was there,
the context-manager and FASTSPAWN_PATCH_TORCH=1 forms."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
from _no_torch import env_without_torch

import fastspawn

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


@pytest.fixture
def torch_mp():
    """torch.multiprocessing and its spawn module; unpatched again after the test."""
    pytest.importorskip("torch")
    import importlib

    modules = {name: importlib.import_module(name) for name in ("torch.multiprocessing", "torch.multiprocessing.spawn")}
    before = {name: dict(vars(module)) for name, module in modules.items()}
    yield modules
    fastspawn.unpatch_torch()
    for name, module in modules.items():
        for key in names(modules):
            if key in before[name]:
                setattr(module, key, before[name][key])


def names(modules):
    """What is patched: every public name of torch.multiprocessing.spawn (its __all__)."""
    return tuple(modules["torch.multiprocessing.spawn"].__all__)


def originals(modules):
    return {(m, n): vars(module)[n] for m, module in modules.items() for n in names(modules) if n in vars(module)}


def assert_patched(modules):
    for module in modules.values():
        for name in names(modules):
            if name in vars(module):
                assert vars(module)[name] is getattr(fastspawn, name), (module.__name__, name)


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

    handle = fastspawn.patch_torch()
    assert handle.installed
    assert_patched(torch_mp)
    import torch.multiprocessing as mp

    assert mp.spawn is fastspawn.spawn and mp.ProcessExitedException is fastspawn.ProcessExitedException

    fastspawn.unpatch_torch()
    assert_restored(torch_mp, saved)
    assert {m: set(vars(module)) for m, module in torch_mp.items()} == names_before  # nothing added
    fastspawn.unpatch_torch()  # not patched: nothing to do
    assert_restored(torch_mp, saved)


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
