"""Closures and lambdas as functions: what pickle cannot send by reference goes by value.

A lambda, a function or class defined in a function, an object its module no longer
names, and the functions of an interactive ``__main__`` are sent with cloudpickle, at any
depth (the function itself, inside its arguments, in a ``functools.partial``); everything
else is pickled exactly as before (multiprocessing's ForkingPickler, same bytes), and
cloudpickle is loaded only when something needs it. Covered through every front end:
``spawn``, ``start_processes``, ``run``, ``fastspawn.elastic``, ``torch.multiprocessing``
under ``patch_torch()``, with the zygote and with fresh interpreters.

Torch's own ``spawn`` refuses these callables (the differential test documents it).
"""

from __future__ import annotations

import functools
import io
import multiprocessing
import os
import pickle
import subprocess
import sys
import threading
from multiprocessing import context as mp_context
from multiprocessing.reduction import ForkingPickler

import pytest

import _closures_workers as w
import fastspawn
import fastspawn.elastic as fe
from fastspawn import _payload

pytestmark = pytest.mark.timeout(180)

HERE = os.path.dirname(os.path.abspath(__file__))
CASES = sorted(w.CASES)
ZYGOTE = pytest.mark.parametrize("zygote", [True, False], ids=["zygote", "fresh"])
CHILD_TIMEOUT = 120  # a subprocess that runs a few children (the fresh ones import a lot)


def _drain(queue, n):
    """``n`` items a joined call put on ``queue`` (all there already: bounded)."""
    return sorted(queue.get() for _ in range(n))


def _python(argv, zygote, stdin=None):
    """Run ``python argv...`` with the zygote on or off; its completed process."""
    env = dict(os.environ, FASTSPAWN_ZYGOTE="1" if zygote else "0", PYTHONUNBUFFERED="1")
    return subprocess.run(
        [sys.executable, *argv], input=stdin, env=env, capture_output=True, text=True, timeout=CHILD_TIMEOUT
    )


def _expected(name, n=2):
    return [(i, w.expected(name, i)) for i in range(n)]


@pytest.fixture
def queue():
    q = multiprocessing.get_context("spawn").SimpleQueue()
    yield q
    q.close()


def _forking_pickler_bytes(obj):
    """What the code before by-value sending made of ``obj`` (ForkingPickler, spawning)."""
    popen = _payload.SpawningPopen()
    mp_context.set_spawning_popen(popen)
    try:
        buf = io.BytesIO()
        ForkingPickler(buf, pickle.HIGHEST_PROTOCOL).dump(obj)
        return buf.getvalue(), popen.fds
    finally:
        mp_context.set_spawning_popen(None)


# ------------------------------------------------------------------ every front end
@pytest.mark.parametrize("name", CASES)
@ZYGOTE
def test_spawn_start_processes_and_run(name, zygote, queue):
    fn = w.CASES[name]()
    # run: the callable itself is the function
    assert fastspawn.run(fn, 2, zygote=zygote) == [w.expected(name, i) for i in range(2)]
    # spawn: a lambda holding the callable in its closure (nested by value)
    assert fastspawn.spawn(lambda i, q: q.put((i, fn(i))), args=(queue,), nprocs=2, zygote=zygote) is None
    assert _drain(queue, 2) == _expected(name)
    # start_processes: a module function, the callable inside the arguments, next to a Queue
    assert fastspawn.start_processes(w.put_result, args=(fn, queue), nprocs=2, zygote=zygote) is None
    assert _drain(queue, 2) == _expected(name)


@pytest.mark.usefixtures("keep_signal_handlers")  # start() installs handlers (as torch's does)
@pytest.mark.parametrize("method", ["spawn", "forkserver"])  # conftest: forkserver = fresh
def test_elastic_front_end(method, tmp_path):
    names = CASES
    args = {rank: (w.CASES[name](),) for rank, name in enumerate(names)}
    logs = fe.DefaultLogsSpecs(log_dir=str(tmp_path))
    ctx = fe.start_processes(
        "closures", lambda fn: fn(5), args, {rank: {} for rank in args}, logs, start_method="spawn"
    )
    try:
        result = ctx.wait(timeout=CHILD_TIMEOUT)
    finally:
        ctx.close()
    assert result is not None and not result.is_failed(), result
    assert result.return_values == {rank: w.expected(name, 5) for rank, name in enumerate(names)}


def test_a_function_its_module_no_longer_names_goes_by_value():
    # pickle refuses it ("not the same object"); by value, the child runs this very one
    with pytest.raises(pickle.PicklingError):
        _forking_pickler_bytes(w.kept)
    assert fastspawn.run(w.kept, 2) == [("original", 0), ("original", 1)]
    assert fastspawn.run(w.call, 1, (w.kept,)) == [("original", 0)]


def test_multiprocessing_reducers_keep_working_next_to_a_closure():
    ctx = multiprocessing.get_context("spawn")
    value, lock, event = ctx.Value("i", 0), ctx.Lock(), ctx.Event()

    def add(i, value, lock, event):
        with lock:
            value.value += i + 1
        event.set()

    fastspawn.spawn(add, args=(value, lock, event), nprocs=3)
    assert value.value == 6 and event.is_set()


# ------------------------------------------------------------ same bytes, no cost
def test_what_pickles_by_reference_is_pickled_as_before(queue):
    lock = multiprocessing.get_context("spawn").Lock()
    for fn, args in [(w.put_result, (w.call, queue)), (w.call, (1, "x", {"k": [2.5]}, lock)), (print, ())]:
        assert _payload.dumps_call(fn, args) == _forking_pickler_bytes((fn, tuple(args)))
    assert _payload.dumps_call(w.call, (1, "x"), plain=True) == (
        pickle.dumps((w.call, (1, "x")), pickle.HIGHEST_PROTOCOL), []
    )


def test_by_value_callables_are_not_plain():
    # "plain" calls are unpickled once in the zygote for all children: never by value
    assert _payload.is_plain(w.call, (1, "x", w.original))
    for fn in [w.make_lambda(), w.make_closure(), w.kept, w.make_partial()]:
        assert not _payload.is_plain(fn, ())
        assert not _payload.is_plain(w.call, (fn,))


def test_by_reference():
    assert _payload.by_reference(w.call) and _payload.by_reference(int)
    assert _payload.by_reference(ForkingPickler) and _payload.by_reference(w.original)
    local_class = type(w.make_callable_instance())
    for obj in [w.make_lambda(), w.make_closure(), w.kept, local_class]:
        assert not _payload.by_reference(obj)


_PROBE = r"""
import sys
sys.path.insert(0, {here!r})
import fastspawn, _closures_workers as w
if __name__ == "__main__":
    print("parent before", "cloudpickle" in sys.modules)
    print("child", fastspawn.run(w.modules_loaded, 1))
    print("parent after", "cloudpickle" in sys.modules)
    print("by value child", fastspawn.run(lambda i: w.modules_loaded(i), 1))
    print("parent by value", "cloudpickle" in sys.modules)
"""


@ZYGOTE
@pytest.mark.parametrize("main", ["-c", "script"])
def test_cloudpickle_loaded_only_when_needed(zygote, main, tmp_path):
    code = _PROBE.format(here=HERE)
    if main == "-c":  # an interactive __main__ (its own functions would go by value)
        argv = ["-c", code]
    else:
        script = tmp_path / "probe.py"
        script.write_text(code)
        argv = [str(script)]
    out = _python(argv, zygote)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == [
        "parent before False",
        "child [False]",
        "parent after False",
        "by value child [True]",
        "parent by value True",
    ], out.stderr


# ---------------------------------------------------------- an interactive __main__
_INTERACTIVE = """
import sys
import fastspawn
scale = 3
class Point:
    def __init__(self, x):
        self.x = x
def triple(i):
    return Point(i).x * scale
if __name__ == "__main__":
    print(fastspawn.run(triple, 2), fastspawn.run(lambda i: triple(i) + 1, 2))
"""


@ZYGOTE
def test_python_c_main(zygote):
    out = _python(["-c", _INTERACTIVE], zygote)
    assert out.returncode == 0, out.stderr
    assert out.stdout == "[0, 3] [1, 4]\n"


def test_preparation_data_leaves_out_a_stdin_main():
    probe = (
        "from multiprocessing import spawn\n"
        "from fastspawn import _payload\n"
        "print(spawn.get_preparation_data('x').get('init_main_from_path', '').endswith('<stdin>'))\n"
        "print('init_main_from_path' in _payload.preparation_data('x'))\n"
    )
    out = _python(["-"], True, stdin=probe)
    assert out.returncode == 0, out.stderr
    assert out.stdout == "True\nFalse\n"  # multiprocessing's names the file; ours does not


@ZYGOTE
def test_stdin_main(zygote):
    out = _python(["-"], zygote, stdin=_INTERACTIVE)
    assert out.returncode == 0, out.stderr
    assert out.stdout == "[0, 3] [1, 4]\n"
    assert "RuntimeWarning" not in out.stderr  # the zygote served it


# ------------------------------------------------ what truly cannot pickle still fails
def _generator():
    yield 1


@pytest.mark.parametrize("what", ["lock", "generator", "open file"])
def test_unpicklable_objects_fail_as_before(what, tmp_path):
    make = {
        "lock": threading.Lock,
        "generator": _generator,
        "open file": lambda: open(tmp_path / "f", "w"),
    }[what]
    bad = make()
    try:
        with pytest.raises(Exception) as reference:
            ForkingPickler.dumps(bad)
        # in the arguments: the pickler's own exception type, naming args[i]
        with pytest.raises(type(reference.value)) as info:
            fastspawn.spawn(w.call, args=(bad,), nprocs=1)
        assert "args[0]" in str(info.value) and str(reference.value) in str(info.value)
        # next to a lambda that goes by value: the same error, not the lambda's
        with pytest.raises(type(reference.value)) as info:
            fastspawn.spawn(lambda i, x: None, args=(bad,), nprocs=1)
        assert "args[0]" in str(info.value)

        # captured by a closure: the function is the culprit
        def holds(i):
            return bad

        with pytest.raises(type(reference.value)) as info:
            fastspawn.spawn(holds, nprocs=1)
        assert "fn=" in str(info.value) and "holds" in str(info.value)
    finally:
        if hasattr(bad, "close"):
            bad.close()


# ---------------------------------------------------------------------- with torch
def test_patched_torch_spawn_takes_closures_and_torch_alone_does_not(queue):
    """Differential: torch.multiprocessing.spawn refuses a lambda (pickle cannot send it by
    reference); under patch_torch() the same call works. Unpatched, torch is untouched."""
    torch_mp = pytest.importorskip("torch.multiprocessing")
    fn = w.make_closure()
    with pytest.raises((pickle.PicklingError, AttributeError)):
        torch_mp.spawn(lambda i, q: q.put((i, fn(i))), args=(queue,), nprocs=2)
    with fastspawn.patch_torch():
        assert torch_mp.spawn(lambda i, q: q.put((i, fn(i))), args=(queue,), nprocs=2) is None
        assert _drain(queue, 2) == _expected("closure")
        assert torch_mp.start_processes(w.put_result, args=(fn, queue), nprocs=2) is None
        assert _drain(queue, 2) == _expected("closure")
    with pytest.raises((pickle.PicklingError, AttributeError)):
        torch_mp.spawn(lambda i, q: q.put((i, fn(i))), args=(queue,), nprocs=2)


@pytest.mark.usefixtures("keep_signal_handlers")
def test_patched_torch_elastic_start_processes_takes_closures(tmp_path):
    tem = pytest.importorskip("torch.distributed.elastic.multiprocessing")
    fn = w.make_nested()
    logs = tem.DefaultLogsSpecs(log_dir=str(tmp_path))
    with fastspawn.patch_torch():
        ctx = tem.start_processes("closures", lambda f: f(3), {0: (fn,), 1: (fn,)}, {0: {}, 1: {}}, logs)
        try:
            result = ctx.wait(timeout=CHILD_TIMEOUT)
        finally:
            ctx.close()
    assert result is not None and not result.is_failed(), result
    assert result.return_values == {0: w.expected("nested", 3), 1: w.expected("nested", 3)}


@ZYGOTE
def test_shared_tensors_next_to_a_closure(zygote):
    torch = pytest.importorskip("torch")
    shared = torch.zeros(4).share_memory_()
    offset = 10

    def fill(i, t):
        t[i] = i + offset

    fastspawn.spawn(fill, args=(shared,), nprocs=4, zygote=zygote)
    assert shared.tolist() == [10.0, 11.0, 12.0, 13.0]
    results = fastspawn.run(functools.partial(lambda t, i: float(t.sum()) + i, shared), 2, zygote=zygote)
    assert results == [46.0, 47.0]
