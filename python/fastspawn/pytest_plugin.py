"""pytest plugin (entry point ``pytest11``): run a test body in N processes with fastspawn.

``@pytest.mark.spawn(nprocs=2, timeout=None, start_method="spawn", devices_per_rank=None)``
runs the test in ``nprocs`` ranks forked from fastspawn's warm zygote (a list of sizes: one
test per size; ``devices_per_rank``: each rank's own ``CUDA_VISIBLE_DEVICES``); fixtures
``rank``, ``world_size``, ``init_method`` and ``spawn``; options ``--spawn-timeout`` (ini
``spawn_timeout``), ini ``spawn_devices_per_rank`` and ``--fastspawn-patch-torch`` (ini
``fastspawn_patch_torch``). The zygote starts, and imports the test modules that need
ranks, while pytest collects them (see fastspawn._prewarm).

pytest imports this module in every run of every project that has fastspawn installed, so
it imports nothing of fastspawn (nor torch) until a test uses it.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import socket
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, Generator, Iterator, List, Mapping, NamedTuple, Optional, Sequence, Tuple, cast

import pytest
from _pytest._code.code import ReprFileLocation, TerminalRepr

TYPE_CHECKING = False
if TYPE_CHECKING:
    from fastspawn.testing import RankFiles

log = logging.getLogger(__name__)

START_METHODS = ("spawn", "fork", "forkserver")
MASTER_ADDR = "127.0.0.1"

# After one rank ended without passing (failed, skipped, crashed), the others get this
# long to end on their own before they are stopped with their stacks dumped.
_SETTLE_SECONDS = 5.0
# Between SIGTERM (each rank dumps its stacks, then dies) and SIGKILL. Stopping takes at
# most this plus _core.KILL_WAIT seconds, even for a rank that cannot die (see _api._Run.stop).
_STOP_GRACE_SECONDS = 5.0

_MARKER_HELP = (
    "spawn(nprocs=2, timeout=None, start_method='spawn', devices_per_rank=None): run the "
    "test body in nprocs processes started by fastspawn (a list of sizes: one test per "
    "size); devices_per_rank: CUDA devices of each rank's own, in CUDA_VISIBLE_DEVICES "
    "(fixtures rank, world_size, init_method; env RANK, WORLD_SIZE, LOCAL_RANK, "
    "MASTER_ADDR, MASTER_PORT)"
)
# The pseudo-argument by which a list of sizes parametrizes a test (ids "nprocs=N").
_NPROCS_PARAM = "_fastspawn_nprocs"


# ----------------------------------------------------------------- options, marker
def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("fastspawn")
    group.addoption(
        "--spawn-timeout",
        dest="spawn_timeout",
        type=float,
        default=None,
        metavar="SECONDS",
        help="Seconds a @pytest.mark.spawn test may run before its ranks' stacks are "
        "dumped and the ranks killed (the marker's timeout= wins; 0: no timeout).",
    )
    parser.addini("spawn_timeout", "Default of --spawn-timeout.", default=None)
    parser.addini(
        "spawn_devices_per_rank",
        "Default devices_per_rank of @pytest.mark.spawn: CUDA devices each rank gets to "
        "itself (CUDA_VISIBLE_DEVICES); 0: no assignment.",
        default=None,
    )
    group.addoption(
        "--fastspawn-patch-torch",
        dest="fastspawn_patch_torch",
        action="store_true",
        default=False,
        help="Make torch.multiprocessing.spawn/start_processes fastspawn's for the session.",
    )
    parser.addini(
        "fastspawn_patch_torch", "Same as --fastspawn-patch-torch.", type="bool", default=False
    )


def pytest_configure(config: pytest.Config) -> None:
    from fastspawn import _prewarm

    config.addinivalue_line("markers", _MARKER_HELP)
    state = _Session()
    config.stash[_SESSION] = state
    _prewarm.plugin_sessions += 1  # test classes are warmed for by module, below
    state.counted = True
    if config.getoption("fastspawn_patch_torch") or config.getini("fastspawn_patch_torch"):
        from fastspawn._patch import patch_torch

        try:
            state.torch_patch = patch_torch()
        except ImportError as exc:
            raise pytest.UsageError(f"--fastspawn-patch-torch / fastspawn_patch_torch: {exc}") from None


def pytest_unconfigure(config: pytest.Config) -> None:
    state = config.stash.get(_SESSION, None)
    if state is not None:
        state.close()


def pytest_collection_finish(session: pytest.Session) -> None:
    state = _session(session.config)
    if any(_uses_ranks(item) for item in session.items):
        state.activate()
        return
    state.deactivate()  # activated early for a module whose tests were all deselected
    if state.hinted and not any(_is_rank_test_case(item) for item in session.items):
        from fastspawn import _prewarm, _zygote

        _prewarm.discard(2 * _zygote.zygote_timeout())  # no test will need the zygote


def _uses_ranks(item: pytest.Item) -> bool:
    return item.get_closest_marker("spawn") is not None or "spawn" in getattr(item, "fixturenames", ())


def _is_rank_test_case(item: pytest.Item) -> bool:
    """Whether ``item`` is a test of a fastspawn.testing class (it starts its own ranks)."""
    from fastspawn import _prewarm

    return getattr(item, "cls", None) in _prewarm.rank_classes


# ------------------------------------------------------ early start, while collecting
# What marks a test module as one that needs ranks, read from its source before pytest
# imports it: the marker, a function taking the `spawn` fixture, or fastspawn.testing.
_MARKED = re.compile(rb"\bmark\.spawn\b|\bdef\s+\w+\s*\((?:[^)]*,)?\s*spawn\s*[,):]")
_TESTING = re.compile(rb"\bfastspawn\.testing\b|\bfrom\s+fastspawn\s+import\s[^\n]*\btesting\b")


@pytest.hookimpl(hookwrapper=True)
def pytest_pycollect_makemodule(module_path: Path, parent: pytest.Collector) -> Generator[None, Any, None]:
    _session(parent.config).module_found(module_path, parent.config)
    yield


def _module_name(path: Path, config: pytest.Config) -> Optional[Tuple[str, str, bool]]:
    """The name pytest will import the test file ``path`` as, the ``sys.path`` entry it
    adds for it, and whether it prepends it; None when its import mode is not one of
    those (importlib) or the name cannot be told."""
    mode = config.getoption("importmode", "prepend")
    mode = str(getattr(mode, "value", mode))
    if mode not in ("prepend", "append"):
        return None
    try:
        from _pytest.pathlib import resolve_package_path
    except ImportError:
        return None
    try:
        from _pytest.pathlib import CouldNotResolvePathError, resolve_pkg_root_and_module_name
    except ImportError:  # pytest < 8.1: packages are the directories with __init__.py
        package = resolve_package_path(path)
        if package is None:
            return path.stem, str(path.parent), mode == "prepend"
        names = list(path.with_suffix("").relative_to(package.parent).parts)
        if names[-1] == "__init__":
            names.pop()
        return ".".join(names), str(package.parent), mode == "prepend"
    try:
        namespaces = bool(config.getini("consider_namespace_packages"))
    except ValueError:
        namespaces = False
    try:
        root, name = resolve_pkg_root_and_module_name(path, consider_namespace_packages=namespaces)
    except CouldNotResolvePathError:
        root, name = path.parent, path.stem
    except Exception:
        return None
    return name, str(root), mode == "prepend"


class _Session:
    """What the plugin set up for this session, undone at unconfigure."""

    def __init__(self) -> None:
        self._directory: Optional[str] = None
        self.active = False
        self.torch_patch: Any = None  # patch_torch()'s handle: leaving it restores torch
        self._saved_env: Optional[str] = None
        self._saved_preload: Optional[List[str]] = None
        self._rewrite: Dict[str, str] = {}
        self._rewrite_seen = -1
        self._report_options: Optional[Dict[str, Any]] = None
        self.counted = False  # in _prewarm.plugin_sessions
        self.hinted = False  # a test module was hinted to fastspawn._prewarm

    def directory(self) -> str:
        """This session's temporary directory (init_method files, rank results)."""
        if self._directory is None:
            self._directory = tempfile.mkdtemp(prefix="fastspawn-pytest-")
        return self._directory

    def activate(self) -> None:
        """Before the first test that spawns: the zygote will import the test modules
        rewritten (session file + preloaded finder), so each test costs a fork."""
        if self.active:
            return
        import json

        from fastspawn import _api

        path = os.path.join(self.directory(), "session.json")
        with open(path, "w") as f:
            json.dump({"owner": os.getpid(), "rewrite": self.rewrite_map()}, f)
        self._saved_env = os.environ.get(_SESSION_ENV)
        os.environ[_SESSION_ENV] = path
        self._saved_preload = list(_api._zygotes.preload)
        rank_module = "fastspawn._pytest_rank"
        if rank_module not in self._saved_preload:
            _api.preload([rank_module, *self._saved_preload])
        self.active = True

    def module_found(self, path: Path, config: pytest.Config) -> None:
        """pytest is about to import the test module ``path``: if it needs ranks, the
        zygote starts (in the background) and imports it too, meanwhile."""
        if getattr(config.option, "collectonly", False):
            return
        try:
            with open(path, "rb") as f:
                source = f.read()
        except OSError:
            return
        marked = _MARKED.search(source) is not None
        if not marked and _TESTING.search(source) is None:
            return
        from fastspawn import _prewarm

        if not _prewarm.zygote_wanted():
            return
        where = _module_name(path, config)
        if marked:
            # Ranks of marked tests need the session's zygote: preloads, rewriting.
            self.activate()
            if where is None:
                queued = _prewarm.hint("start", _prewarm.nothing, ())
            else:
                from fastspawn import _pytest_rank

                name, entry, prepend = where
                args = ({name: str(path)}, [entry], prepend)
                queued = _prewarm.hint(f"module:{name}", _pytest_rank.prefetch, args)
        elif where is None:
            queued = _prewarm.hint("start", _prewarm.nothing, ())
        else:  # fastspawn.testing classes: their ranks import the module plainly
            name, entry, prepend = where
            queued = _prewarm.hint(f"module:{name}", _prewarm.import_modules, ([name], [entry], prepend))
        self.hinted = self.hinted or queued

    def report_options(self, config: pytest.Config) -> Dict[str, Any]:
        """How ranks format failures (see _report_options), computed once."""
        if self._report_options is None:
            self._report_options = _report_options(config)
        return self._report_options

    def rewrite_map(self) -> Dict[str, str]:
        """Modules pytest imported with assertion rewriting: name -> file."""
        if len(sys.modules) != self._rewrite_seen:
            self._rewrite_seen = len(sys.modules)
            try:
                from _pytest.assertion.rewrite import AssertionRewritingHook
            except ImportError:
                return self._rewrite
            for name, module in list(sys.modules.items()):
                path = getattr(module, "__file__", None)
                # fastspawn itself is left out: pytest rewrites a pytest11 plugin's whole
                # package, but ranks need only the tests' modules rewritten.
                rewritten = isinstance(getattr(module, "__loader__", None), AssertionRewritingHook)
                if path and rewritten and name.partition(".")[0] != "fastspawn":
                    self._rewrite[name] = path
        return self._rewrite

    def deactivate(self) -> None:
        """Undo :meth:`activate`."""
        if self.active:
            from fastspawn import _api

            if self._saved_env is None:
                os.environ.pop(_SESSION_ENV, None)
            else:
                os.environ[_SESSION_ENV] = self._saved_env
            _api.preload(self._saved_preload or [])
            self.active = False

    def close(self) -> None:
        if self.hinted:
            from fastspawn import _prewarm, _zygote

            _prewarm.wait(2 * _zygote.zygote_timeout())  # bounded: each of its waits is
        if self.counted:
            from fastspawn import _prewarm

            _prewarm.plugin_sessions -= 1
            self.counted = False
        self.deactivate()
        if self.torch_patch is not None:
            self.torch_patch.__exit__(None, None, None)
            self.torch_patch = None
        if self._directory is not None:
            shutil.rmtree(self._directory, ignore_errors=True)
            self._directory = None


_SESSION = pytest.StashKey[_Session]()
# What the call's report shows instead of pytest's rendering of the parent-side
# exception: a failure's SpawnFailureRepr, or a skip's (path, lineno) in the rank.
_REPORT = pytest.StashKey[Tuple[str, Any]]()
_SESSION_ENV = "FASTSPAWN_PYTEST_SESSION"  # same as _pytest_rank.SESSION_ENV


def _session(config: pytest.Config) -> _Session:
    state = config.stash.get(_SESSION, None)
    if state is None:  # configured before this plugin was registered
        state = config.stash[_SESSION] = _Session()
    return state


class SpawnOptions(NamedTuple):
    """The arguments of ``@pytest.mark.spawn``, checked."""

    nprocs: int
    timeout: Optional[float]
    start_method: str
    devices_per_rank: Optional[int] = None


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _marker_arguments(
    nprocs: Any = 2, timeout: Optional[float] = None, start_method: str = "spawn", devices_per_rank: Optional[int] = None
) -> SpawnOptions:
    if isinstance(nprocs, (list, tuple)):
        _world_sizes(nprocs)
    elif not _is_count(nprocs) or nprocs < 1:
        raise ValueError(f"nprocs must be an int >= 1 (or a list of them), got {nprocs!r}")
    if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout < 0):
        raise ValueError(f"timeout must be None or seconds >= 0, got {timeout!r}")
    if start_method not in START_METHODS:
        raise ValueError(f"start_method must be one of {', '.join(map(repr, START_METHODS))}, got {start_method!r}")
    if devices_per_rank is not None and (not _is_count(devices_per_rank) or devices_per_rank < 0):
        raise ValueError(f"devices_per_rank must be None or an int >= 0, got {devices_per_rank!r}")
    return SpawnOptions(nprocs, None if timeout is None else float(timeout), start_method, devices_per_rank)


def _world_sizes(sizes: Sequence[Any]) -> List[int]:
    """A marker's list of sizes, checked: a non-empty list of ints >= 1."""
    if not sizes:
        raise ValueError("nprocs is an empty list: give at least one world size")
    bad = [size for size in sizes if not _is_count(size) or size < 1]
    if bad:
        raise ValueError(f"nprocs list must hold ints >= 1, got {bad[0]!r} in {list(sizes)!r}")
    return list(sizes)


def _nprocs_argument(marker: pytest.Mark) -> Any:
    if "nprocs" in marker.kwargs:
        return marker.kwargs["nprocs"]
    return marker.args[0] if marker.args else 2


@pytest.hookimpl(tryfirst=True)
def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """``nprocs=[1, 2, 4]``: one test per size, ids ``nprocs=N`` (first among the ids)."""
    marker = metafunc.definition.get_closest_marker("spawn")
    if marker is None:
        return
    nprocs = _nprocs_argument(marker)
    if not isinstance(nprocs, (list, tuple)):
        return
    try:
        sizes = _world_sizes(nprocs)
        problem = None
    except ValueError as exc:
        problem = str(exc)
    if problem is not None:  # the test module fails to collect, saying why
        pytest.fail(f"invalid @pytest.mark.spawn arguments: {problem}", pytrace=False)
    metafunc.fixturenames.append(_NPROCS_PARAM)
    metafunc.parametrize(_NPROCS_PARAM, sizes, ids=[f"nprocs={size}" for size in sizes])


def spawn_options(item: pytest.Item) -> Optional[SpawnOptions]:
    """The item's ``spawn`` marker arguments (timeout and devices defaulted from the
    options; a list of sizes resolved to this item's), or None."""
    marker = item.get_closest_marker("spawn")
    if marker is None:
        return None
    try:
        options = _marker_arguments(*marker.args, **marker.kwargs)
    except (TypeError, ValueError) as exc:
        pytest.fail(f"invalid @pytest.mark.spawn arguments: {exc}", pytrace=False)
    if not _is_count(options.nprocs):
        params = getattr(getattr(item, "callspec", None), "params", {})
        options = options._replace(nprocs=params[_NPROCS_PARAM])
    if options.timeout is None:
        options = options._replace(timeout=default_timeout(item.config))
    if not options.timeout:
        options = options._replace(timeout=None)
    if options.devices_per_rank is None:
        options = options._replace(devices_per_rank=default_devices_per_rank(item.config))
    return options


def default_devices_per_rank(config: pytest.Config) -> int:
    """Ini ``spawn_devices_per_rank``, else 0 (no devices assigned)."""
    text = config.getini("spawn_devices_per_rank")
    if text in (None, ""):
        return 0
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise pytest.UsageError(f"spawn_devices_per_rank must be an int >= 0, got {text!r}")
    return value


# ------------------------------------------------------------------ devices per rank
_GPUS_DIR = "/proc/driver/nvidia/gpus"  # one entry per GPU the driver sees


def visible_devices() -> List[str]:
    """The CUDA devices this process may use, without initialising CUDA: the entries of
    ``CUDA_VISIBLE_DEVICES`` when set (up to the first empty or negative one, where
    CUDA stops reading it), else ``0..n-1`` for the n GPUs of the NVIDIA driver."""
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        devices = []
        for entry in listed.split(","):
            entry = entry.strip()
            if not entry or entry.startswith("-"):
                break
            devices.append(entry)
        return devices
    try:
        count = len(os.listdir(_GPUS_DIR))
    except OSError:
        count = 0
    return [str(i) for i in range(count)]


def _worker_share(devices: List[str]) -> Tuple[List[str], str]:
    """This pytest-xdist worker's part of ``devices`` (contiguous, disjoint from the other
    workers'), and how to name it in a skip reason; all of them outside xdist."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    try:
        count = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", ""))
        index = int(worker[2:]) if worker.startswith("gw") else -1
    except ValueError:
        return devices, ""
    if count < 2 or not 0 <= index < count:
        return devices, ""
    each, extra = divmod(len(devices), count)
    start = index * each + min(index, extra)
    share = devices[start : start + each + (1 if index < extra else 0)]
    return share, f" to xdist worker {worker} (of {count}, sharing {len(devices)})"


def _rank_devices(options: SpawnOptions) -> Tuple[Optional[List[str]], Optional[str]]:
    """Each rank's ``CUDA_VISIBLE_DEVICES`` (None when no devices are asked for), or why
    the test must be skipped (too few devices)."""
    per_rank = options.devices_per_rank or 0
    if not per_rank:
        return None, None
    devices, where = _worker_share(visible_devices())
    needed = per_rank * options.nprocs
    if needed > len(devices):
        reason = (
            f"needs {needed} CUDA device(s) (nprocs={options.nprocs} x devices_per_rank={per_rank}), "
            f"{len(devices)} available{where}"
        )
        return None, reason
    return [",".join(devices[rank * per_rank : (rank + 1) * per_rank]) for rank in range(options.nprocs)], None


def pytest_collection_modifyitems(items: List[pytest.Item]) -> None:
    """Tests that ask for more devices than there are are skipped before any setup."""
    for item in items:
        if item.get_closest_marker("spawn") is None:
            continue
        try:
            options = spawn_options(item)
        except pytest.fail.Exception:
            continue  # reported when the test runs
        too_few = None if options is None else _rank_devices(options)[1]
        if too_few is not None:
            item.add_marker(pytest.mark.skip(reason=too_few))


def default_timeout(config: pytest.Config) -> Optional[float]:
    """``--spawn-timeout``, else ini ``spawn_timeout``, else None (0 means none)."""
    value = config.getoption("spawn_timeout", None)
    if value is None:
        text = config.getini("spawn_timeout")
        if text in (None, ""):
            return None
        try:
            value = float(text)
        except ValueError:
            raise pytest.UsageError(f"spawn_timeout must be a number of seconds, got {text!r}") from None
    if value < 0:
        raise pytest.UsageError(f"spawn timeout must be >= 0 seconds, got {value}")
    return value or None


# ------------------------------------------------------------------------- fixtures
def _marked(request: pytest.FixtureRequest, fixture: str) -> SpawnOptions:
    options = spawn_options(request.node)
    if options is None:
        pytest.fail(f"the {fixture!r} fixture needs the test to be marked @pytest.mark.spawn", pytrace=False)
    return options


@pytest.fixture
def rank(request: pytest.FixtureRequest) -> int:
    """This process's rank (0..world_size-1) in a ``@pytest.mark.spawn`` test."""
    _marked(request, "rank")
    from fastspawn._pytest_rank import RANK

    return RANK  # type: ignore[return-value]  # each rank gets its number instead


@pytest.fixture
def world_size(request: pytest.FixtureRequest) -> int:
    """The number of ranks of a ``@pytest.mark.spawn`` test (its ``nprocs``)."""
    return _marked(request, "world_size").nprocs


@pytest.fixture
def init_method(request: pytest.FixtureRequest) -> Iterator[str]:
    """A ``file://`` URL unique to the test, for ``init_process_group(init_method=...)``;
    its directory is removed after the test."""
    directory = tempfile.mkdtemp(prefix="init-", dir=_session(request.config).directory())
    try:
        yield "file://" + os.path.join(directory, "store")
    finally:
        shutil.rmtree(directory, ignore_errors=True)


class Spawner:
    """The ``spawn`` fixture: ``start_processes`` whose processes end with the test."""

    def __init__(self) -> None:
        self._contexts: List[Any] = []

    def __call__(
        self, fn: Callable[..., Any], args: Tuple[Any, ...] = (), nprocs: int = 1, join: bool = True, **options: Any
    ) -> Any:
        """``fastspawn.start_processes(fn, args, nprocs, join, daemon=..., start_method=...)``."""
        from fastspawn import _api

        context = _api.start_processes(fn, args, nprocs, join=False, **options)
        assert context is not None
        self._contexts.append(context)
        if not join:
            return context
        while not context.join():
            pass
        return None

    def close(self) -> None:
        """Stop (SIGTERM, then SIGKILL) whatever is still running."""
        from fastspawn.testing import stop_ranks

        running = sum(1 for context in self._contexts for process in context.processes if process.is_alive())
        if running:
            log.warning("fastspawn: stopping %d process(es) still running at teardown", running)
        for context in self._contexts:
            if context._run is not None:
                stop_ranks(context._run, _STOP_GRACE_SECONDS)
        self._contexts.clear()


@pytest.fixture
def spawn() -> Iterator[Spawner]:
    """``spawn(fn, args=(), nprocs=1, join=True, daemon=False, start_method="spawn")``:
    fastspawn.start_processes whose processes are stopped at teardown."""
    spawner = Spawner()
    try:
        yield spawner
    finally:
        spawner.close()


# --------------------------------------------------------------- running the ranks
@pytest.hookimpl(tryfirst=True)
def pytest_pyfunc_call(pyfuncitem: pytest.Function) -> Optional[bool]:
    options = spawn_options(pyfuncitem)
    if options is None:
        return None
    _run_in_ranks(pyfuncitem, options)
    return True


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Generator[None, Any, None]:
    outcome = yield
    if call.when != "call":
        return
    replacement = item.stash.get(_REPORT, None)
    if replacement is None:
        return
    del item.stash[_REPORT]
    report = outcome.get_result()
    kind, value = replacement
    if kind == "failed" and report.failed:
        report.longrepr = value
    elif kind == "skipped" and report.skipped and isinstance(report.longrepr, tuple):
        report.longrepr = (*value, report.longrepr[2])


def _run_in_ranks(item: pytest.Function, options: SpawnOptions) -> None:
    from fastspawn import _pytest_rank as ranks
    from fastspawn.testing import RankFiles

    devices, too_few = _rank_devices(options)
    if too_few is not None:  # the devices changed since collection
        pytest.skip(too_few)
    state = _session(item.config)
    state.activate()
    outdir = tempfile.mkdtemp(prefix="test-", dir=state.directory())
    port = _reserve_port()
    stacks = RankFiles(options.nprocs, "stacks")
    try:
        kwargs = _test_arguments(item)
        job = ranks.Job(
            call=item.obj,
            kwargs=kwargs,
            nprocs=options.nprocs,
            master_addr=MASTER_ADDR,
            master_port=port.getsockname()[1],
            outdir=outdir,
            stacks=stacks.for_ranks(),
            warning_filters=_warning_filters(),
            report=state.report_options(item.config),
            devices=devices,
        )
        main = ranks.RankMain(item.module.__name__, state.rewrite_map())
        context = _start(item, main, job, options)
        ended = _watch(context, options.timeout, outdir, stacks)
    finally:
        stacks.close()
        port.close()
        shutil.rmtree(outdir, ignore_errors=True)
    _conclude(item, options, ended)


def _reserve_port() -> socket.socket:
    """A free port held bound (SO_REUSEADDR, not listening) until the test ends, so no
    other test, pytest-xdist worker or session gets it; rank 0 can still listen on it
    with SO_REUSEADDR (as torch's TCPStore does)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((MASTER_ADDR, 0))
    except BaseException:
        sock.close()
        raise
    return sock


def _test_arguments(item: pytest.Function) -> Dict[str, Any]:
    from fastspawn._pytest_rank import RANK

    names = getattr(getattr(item, "_fixtureinfo", None), "argnames", None)
    if names is None:
        names = tuple(item.funcargs)
    kwargs = {name: item.funcargs[name] for name in names}
    if "rank" in kwargs:
        kwargs["rank"] = RANK
    return kwargs


def _warning_filters() -> List[Tuple[Any, ...]]:
    """The current warning filters as plain data (categories by name)."""
    filters = []
    for action, message, category, module, lineno in warnings.filters:
        filters.append(
            (
                action,
                getattr(message, "pattern", message) or "",
                (category.__module__, cast(type, category).__qualname__),
                getattr(module, "pattern", module) or "",
                lineno,
            )
        )
    return filters


def _report_options(config: pytest.Config) -> Dict[str, Any]:
    """How ranks format a failure: the pytest process's tb style, verbosity, and the
    settings assertion explanations read."""
    tbstyle = config.getoption("tbstyle", "auto")
    verbosities: Dict[Optional[str], int] = {None: _verbosity(config, None)}
    for name in dir(pytest.Config):
        if name.startswith("VERBOSITY_"):
            kind = getattr(pytest.Config, name)
            if isinstance(kind, str):
                verbosities[kind] = _verbosity(config, kind)
    ini = {}
    for name in ("truncation_limit_lines", "truncation_limit_chars", "assertion_text_diff_style", "enable_assertion_pass_hook"):
        try:
            ini[name] = config.getini(name)
        except (ValueError, KeyError):
            pass
    plain = (bool, int, float, str, type(None))
    option_values = {k: v for k, v in vars(config.option).items() if isinstance(v, plain)}
    return {
        "tbstyle": {"auto": "long", "line": "short", "no": "short"}.get(tbstyle, tbstyle),
        "tbstyle_auto": tbstyle == "auto",
        "showlocals": bool(config.getoption("showlocals", False)),
        "verbosity": verbosities[None],
        "abspath": False,
        "config": {"verbosities": verbosities, "ini": ini, "options": option_values},
    }


def _verbosity(config: pytest.Config, kind: Optional[str]) -> int:
    try:
        return int(config.get_verbosity(kind) if kind else config.get_verbosity())
    except (AttributeError, ValueError, TypeError):
        return int(config.getoption("verbose", 0) or 0)


def _start(item: pytest.Function, main: Any, job: Any, options: SpawnOptions) -> Any:
    from fastspawn import _api

    with warnings.catch_warnings(record=True) as caught:
        # fastspawn's own notices (a zygote fallback, a preload failure) are not the
        # test's warnings: logged, never turned into errors by the test's filters.
        warnings.filterwarnings("always", message="fastspawn", category=RuntimeWarning)
        try:
            context = _api.start_processes(
                main, (job,), options.nprocs, join=False, start_method=options.start_method
            )
        except Exception:
            culprit = _unpicklable(item, job.kwargs)
            if culprit is None:
                raise
        else:
            culprit = None
    if culprit is not None:
        pytest.fail(culprit, pytrace=False)
    for warning in caught:
        if issubclass(warning.category, RuntimeWarning) and str(warning.message).startswith("fastspawn"):
            log.warning("%s", warning.message)
        else:
            warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno)
    return context


def _unpicklable(item: pytest.Function, kwargs: Mapping[str, Any]) -> Optional[str]:
    """Why a fixture value (or the test function) cannot be sent to the ranks, if so."""
    from fastspawn._payload import dumps_call

    def problem(obj: Any) -> Optional[str]:
        try:
            dumps_call(_unpicklable, (obj,))
        except Exception as exc:
            return f"{type(exc).__name__}: {str(exc).split(' (while pickling')[0]}"
        return None

    for name, value in kwargs.items():
        error = problem(value)
        if error is not None:
            return (
                f"fixture {name!r} cannot be pickled to the spawned processes (fixtures are "
                f"evaluated once in the pytest process and sent to every rank): {error}"
            )
    error = problem(item.obj)
    if error is not None:
        return (
            f"the test function cannot be pickled to the spawned processes (it must be "
            f"importable by name from its module): {error}"
        )
    return None


class Ended(NamedTuple):
    """How each rank ended."""

    results: List[Optional[Dict[str, Any]]]  # the rank's result record, None if it sent none
    exitcodes: List[Optional[int]]
    pids: List[int]
    stopped: Dict[int, str]  # ranks we stopped -> their stacks at that moment
    timed_out: bool
    elapsed: float
    crash_detail: Dict[int, str]  # error the machinery reported for a rank without result
    unstoppable: List[int]  # stopped ranks still running after SIGKILL (frozen, in the kernel)


def _watch(context: Any, timeout: Optional[float], outdir: str, stacks: RankFiles) -> Ended:
    """Wait for the ranks: until all ended, the timeout, or (after a rank ended without
    passing) the settle time; stop whatever is still running, stacks dumped."""
    from fastspawn._pytest_rank import result_path
    from fastspawn.testing import stop_ranks

    run = context._run
    processes = list(context.processes)
    n = len(processes)
    started = time.monotonic()
    deadline = None if timeout is None else started + timeout
    settle_by: Optional[float] = None
    results: List[Optional[Dict[str, Any]]] = [None] * n
    seen = 0  # run.exit_order[:seen] are read
    timed_out = False
    unstoppable: List[int] = []
    try:
        while seen < n:
            ends = [t for t in (deadline, settle_by) if t is not None]
            if ends and time.monotonic() >= min(ends):
                timed_out = deadline is not None and time.monotonic() >= deadline
                break
            run.wait_any(None if not ends else max(0.0, min(ends) - time.monotonic()), seen)
            for r in run.exit_order[seen:]:
                seen += 1
                results[r] = _read_result(result_path(outdir, r))
                if settle_by is None and (results[r] or {}).get("outcome") != "passed":
                    settle_by = time.monotonic() + _SETTLE_SECONDS
    finally:
        pending = [r for r in range(n) if r not in run.exit_order[:seen]]
        if pending:  # also on KeyboardInterrupt or a pytest-timeout in the wait
            unstoppable = stop_ranks(run, _STOP_GRACE_SECONDS)[1]
    elapsed = time.monotonic() - started
    stopped = {r: _test_frames(stacks.text(r)) for r in pending}
    crash_detail: Dict[int, str] = {}
    exitcodes = [process.exitcode for process in processes]
    if any(results[r] is None and r not in stopped for r in range(n)):
        crash_detail = _machinery_errors(context)
    for r in range(n):
        if results[r] is None and r not in stopped:
            crash_detail.setdefault(r, _test_frames(stacks.text(r)))
    pids = [process.pid for process in processes]
    return Ended(results, exitcodes, pids, stopped, timed_out, elapsed, crash_detail, unstoppable)


def _machinery_errors(context: Any) -> Dict[int, str]:
    """The error fastspawn reported for a rank that never ran the test (e.g. a fixture
    value that failed to unpickle there): the first one, as ProcessContext.join gives it."""
    from fastspawn._errors import ProcessException, ProcessRaisedException

    try:
        context.join(0)
    except ProcessRaisedException as exc:
        return {exc.error_index: str(exc).strip()}
    except ProcessException:
        pass
    return {}


def _read_result(path: str) -> Optional[Dict[str, Any]]:
    import pickle

    try:
        with open(path, "rb") as f:
            return cast(Optional[Dict[str, Any]], pickle.load(f))
    except (OSError, EOFError, pickle.UnpicklingError):
        return None


def _test_frames(dump: str) -> str:
    """A faulthandler dump without the frames below the test (fastspawn's rank
    bootstrap): in each thread's stack, the lines from the rank's entry point down."""
    from fastspawn import _pytest_rank

    entry = f'File "{_pytest_rank.__file__}"'
    lines: List[str] = []
    skipping = False
    for line in dump.splitlines():
        if not line.startswith("  "):  # a thread's header, or a blank line between them
            skipping = False
        elif entry in line:
            skipping = True
        if not skipping:
            lines.append(line)
    return "\n".join(lines)


# --------------------------------------------------------------- the test's outcome
class RanksFailed(Exception):
    """A spawned test failed in a way that has no exception of its own (a timeout, a
    crashed rank, or a failure whose exception did not unpickle)."""


class SpawnFailureRepr(TerminalRepr):
    """A spawned test's failure: a headline, then one section per rank that failed or
    was stopped (pytest's own rendering of the rank's traceback, or a stack dump)."""

    def __init__(self, headline: str, sections: Sequence[Tuple[str, Any]], crash: Tuple[str, int, str]) -> None:
        self.headline = headline
        self.sections = list(sections)
        self.reprcrash = ReprFileLocation(*crash)  # the short summary's message

    def toterminal(self, tw: Any) -> None:
        if self.headline:
            tw.line(self.headline, red=True, bold=True)
        for title, body in self.sections:
            tw.sep("-", title)
            if hasattr(body, "toterminal"):
                body.toterminal(tw)
            else:
                for line in str(body).splitlines():
                    tw.line(line)


def _conclude(item: pytest.Function, options: SpawnOptions, ended: Ended) -> None:
    n = len(ended.results)
    outcomes = [(result or {}).get("outcome") for result in ended.results]
    failed = [r for r in range(n) if outcomes[r] == "failed"]
    crashed = [r for r in range(n) if outcomes[r] is None and r not in ended.stopped]
    if ended.timed_out or failed or crashed:
        _fail(item, options, ended, failed, crashed)
    xfailed = [r for r in range(n) if outcomes[r] == "xfailed"]
    if xfailed:
        pytest.xfail(_reason(ended, xfailed))
    skipped = [r for r in range(n) if outcomes[r] == "skipped"]
    if skipped:
        where = ended.results[skipped[0]].get("where")  # type: ignore[union-attr]
        if where:
            item.stash[_REPORT] = ("skipped", tuple(where))  # where the rank skipped
        pytest.skip(_reason(ended, skipped))


def _fail(item: pytest.Function, options: SpawnOptions, ended: Ended, failed: List[int], crashed: List[int]) -> None:
    import pickle

    n = len(ended.results)
    if ended.timed_out:
        headline = (
            f"spawn timeout: {len(ended.stopped)} of {n} rank(s) still running after "
            f"{options.timeout:g} s; their stacks when it expired are below"
        )
    else:
        headline = "; ".join(
            f"rank {r}: {(ended.results[r] or {}).get('message', '')}" if r in failed
            else f"rank {r} {_exit_text(ended.exitcodes[r])}"
            for r in sorted(failed + crashed)
        )
    if ended.unstoppable:
        headline += (
            f"; rank(s) {', '.join(map(str, sorted(ended.unstoppable)))} did not exit even after SIGKILL "
            "(frozen, or stuck in the kernel)"
        )
    sections: List[Tuple[str, Any]] = []
    crash: Optional[Tuple[str, int, str]] = None  # where the first failing rank failed
    path, lineno, _ = item.reportinfo()
    for r in range(n):
        label = f"rank {r} of {n} (pid {ended.pids[r]})"
        if r in failed:
            result = ended.results[r] or {}
            body: Any = result.get("text", "")
            try:
                body = pickle.loads(result["repr"])
            except Exception:
                pass  # the plain traceback text
            sections.append((f"{label} failed", body))
            where = getattr(body, "reprcrash", None)
            if crash is None and where is not None:
                crash = (str(where.path), int(where.lineno), headline)
        elif r in crashed:
            title = f"{label} {_exit_text(ended.exitcodes[r])} without finishing the test"
            sections.append((title, ended.crash_detail.get(r) or "(it reported nothing)"))
        elif r in ended.stopped:
            why = "when the timeout expired" if ended.timed_out else f"{_SETTLE_SECONDS:g} s after another rank ended"
            body = ended.stopped[r] or "(the rank dumped no stack)"
            if r in ended.unstoppable:
                body = (
                    "It did not exit even after SIGKILL (frozen, or stuck in the kernel): left "
                    f"running, fastspawn reaps it when it exits.\n{body}"
                )
            sections.append((f"{label} was stopped; its stack {why}", body))
    if crash is None or ended.timed_out:
        crash = (str(path), (lineno or 0) + 1, headline)
    item.stash[_REPORT] = ("failed", SpawnFailureRepr(headline, sections, crash))
    first = ended.results[failed[0]] if failed and not ended.timed_out else None
    if first is not None and "exception" in first:
        try:
            exc = pickle.loads(first["exception"])
        except Exception:
            exc = None
        if isinstance(exc, BaseException):
            raise exc  # the rank's own exception: @pytest.mark.xfail(raises=...) sees its type
    raise RanksFailed(crash[2])


def _reason(ended: Ended, ranks: Sequence[int]) -> str:
    messages = {ended.results[r]["message"] for r in ranks}  # type: ignore[index]
    if len(messages) == 1 and len(ranks) == len(ended.results):
        return str(messages.pop())
    return "; ".join(f"rank {r}: {ended.results[r]['message']}" for r in ranks)  # type: ignore[index]


def _exit_text(code: Optional[int]) -> str:
    if code is None:
        return "did not exit"
    if code < 0:
        import signal

        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"
