"""The rank side of the pytest plugin: what runs in the zygote and in each spawned rank.

Nothing here imports pytest at module import time: the zygote imports this module (it is
preloaded by the plugin) before the test modules, and it must stay cheap.

- :class:`RewriteFinder` imports the test modules in the zygote and in ranks with pytest's
  assertion rewriting, as the pytest process imported them, so ``assert a == b`` explains
  itself in a rank too. The modules to rewrite come from the session file named by
  ``FASTSPAWN_PYTEST_SESSION`` (for the zygote) and from the call itself (for a rank).
- :class:`RankMain` is the function every rank runs: environment, stack dumps on SIGTERM
  and fatal signals (into its :class:`fastspawn.testing.RankFile`), the test body, and one
  result file that the pytest process reads.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import json
import os
import pickle
import signal
import sys
import traceback
import warnings
from typing import Any, Dict, List, Mapping, NamedTuple, Optional, Sequence, Set, Tuple, cast

SESSION_ENV = "FASTSPAWN_PYTEST_SESSION"


# ---------------------------------------------------------------- assertion rewriting
class _RewritingLoader(importlib.abc.Loader):
    """Executes a module's source after pytest's assertion rewriting."""

    def __init__(self, path: str) -> None:
        self.path = path

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> None:
        return None  # the default module object

    def exec_module(self, module: Any) -> None:
        import ast

        from _pytest.assertion.rewrite import rewrite_asserts

        with open(self.path, "rb") as f:
            source = f.read()
        tree = ast.parse(source, filename=self.path)
        rewrite_asserts(tree, source, self.path)
        exec(compile(tree, self.path, "exec", dont_inherit=True), module.__dict__)


class RewriteFinder(importlib.abc.MetaPathFinder):
    """Finds the modules pytest rewrote (by name, at the path pytest imported them from).

    Parent packages of those names that are not importable from ``sys.path`` (pytest's
    ``importlib`` import mode) are given as empty namespace packages.
    """

    def __init__(self) -> None:
        self.modules: Dict[str, str] = {}
        self.parents: Set[str] = set()

    def update(self, modules: Mapping[str, str]) -> None:
        self.modules.update(modules)
        for name in modules:
            parts = name.split(".")
            self.parents.update(".".join(parts[:i]) for i in range(1, len(parts)))

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> Optional[importlib.machinery.ModuleSpec]:
        origin = self.modules.get(name)
        if origin is not None:
            package = os.path.basename(origin) == "__init__.py"
            return importlib.util.spec_from_file_location(
                name,
                origin,
                loader=_RewritingLoader(origin),
                submodule_search_locations=[os.path.dirname(origin)] if package else None,
            )
        if name in self.parents:
            spec = importlib.machinery.PathFinder.find_spec(name, path)
            return spec if spec is not None else importlib.machinery.ModuleSpec(name, None, is_package=True)
        return None


def _finder() -> RewriteFinder:
    for entry in sys.meta_path:
        if isinstance(entry, RewriteFinder):
            return entry
    finder = RewriteFinder()
    sys.meta_path.insert(0, finder)
    return finder


def _install_from_session() -> None:
    """In the zygote (or a fresh interpreter): rewrite what the session file lists.
    Not in the pytest process that wrote it, where pytest's own hook does that."""
    path = os.environ.get(SESSION_ENV)
    if not path:
        return
    try:
        with open(path) as f:
            session = json.load(f)
        owner, modules = session["owner"], session["rewrite"]
    except (OSError, ValueError, KeyError, TypeError):
        return
    if owner != os.getpid():
        _finder().update(modules)


_install_from_session()


def prefetch(modules: Mapping[str, str], path_entries: Sequence[str], prepend: bool) -> None:
    """In the zygote, while pytest collects: import test modules (name -> file) with
    assertion rewriting, as pytest is importing them, ``sys.path`` as pytest's import
    mode will have made it (see fastspawn._prewarm.import_modules)."""
    from fastspawn._prewarm import import_modules

    _finder().update(modules)
    import_modules(list(modules), path_entries, prepend)


def _rewritten_here(module: Any) -> bool:
    return isinstance(getattr(module, "__loader__", None), _RewritingLoader)


# --------------------------------------------------------------------- per-rank values
class _PerRank:
    """What the ``rank`` fixture is in the pytest process: each rank gets its own number."""

    _MESSAGE = (
        "the 'rank' fixture has a value only inside the spawned processes (it is the "
        "test function's argument there); fixtures run once in the pytest process, so "
        "a fixture cannot depend on it: read os.environ['RANK'] in the test instead"
    )

    def __repr__(self) -> str:
        return "<rank: set in each spawned process>"

    def __reduce__(self) -> str:
        return "RANK"  # pickled by reference: the same object in every rank

    def _refuse(self, *args: Any) -> Any:
        raise TypeError(self._MESSAGE)

    __hash__ = object.__hash__
    __int__ = __index__ = __float__ = __bool__ = __str__ = __format__ = _refuse
    __eq__ = __ne__ = __lt__ = __le__ = __gt__ = __ge__ = _refuse
    __add__ = __radd__ = __sub__ = __rsub__ = __mul__ = __rmul__ = _refuse
    __mod__ = __rmod__ = __floordiv__ = __truediv__ = _refuse


RANK = _PerRank()


# --------------------------------------------------------------- what a rank is given
class Job(NamedTuple):
    """One marked test, as every rank receives it."""

    call: Any  # the test function (or bound method)
    kwargs: Dict[str, Any]  # its arguments: fixture and parametrize values, RANK for 'rank'
    nprocs: int
    master_addr: str
    master_port: int
    outdir: str  # where each rank writes rank<i>.result
    stacks: Sequence[Any]  # fastspawn.testing.RankFile by rank: where stacks are dumped
    warning_filters: List[Tuple[Any, ...]]  # the pytest process's filters during the call
    report: Dict[str, Any]  # how to format a failure (see plugin._report_options)
    devices: Optional[List[str]] = None  # by rank: its CUDA_VISIBLE_DEVICES (devices_per_rank)


def result_path(outdir: str, rank: int) -> str:
    return os.path.join(outdir, f"rank{rank}.result")


class RankMain:
    """The function each rank runs (``fn(i, job)``).

    ``__module__`` is the test module's name, so that the zygote imports the test module
    (rewritten, through :class:`RewriteFinder`) once, before forking ranks.
    """

    def __init__(self, module: str, rewrite: Mapping[str, str]) -> None:
        self.__module__ = module
        self.rewrite = dict(rewrite)

    def __reduce__(self) -> Tuple[Any, ...]:
        return (_restore, (self.__module__, self.rewrite))

    def __call__(self, rank: int, job: Job) -> None:
        os.environ.update(
            RANK=str(rank),
            LOCAL_RANK=str(rank),
            WORLD_SIZE=str(job.nprocs),
            LOCAL_WORLD_SIZE=str(job.nprocs),
            MASTER_ADDR=job.master_addr,
            MASTER_PORT=str(job.master_port),
        )
        if job.devices is not None:  # read by CUDA at its initialisation, which is later
            os.environ["CUDA_VISIBLE_DEVICES"] = job.devices[rank]
        for other, stacks in enumerate(job.stacks):
            if other != rank:
                stacks.close()
        # SIGTERM (timeout, or another rank failed) and fatal signals: dump every thread's
        # stack, then die as the default action would.
        job.stacks[rank].dump_stacks_on_signals()
        kwargs = {k: (rank if v is RANK else v) for k, v in job.kwargs.items()}
        with warnings.catch_warnings():
            _apply_warning_filters(job.warning_filters)
            _AssertionHooks.install(job.report)
            try:
                job.call(**kwargs)
            except BaseException as exc:  # everything a test body can end with
                result = _describe(exc, job.report)
            else:
                result = {"outcome": "passed"}
            finally:
                _AssertionHooks.uninstall()
        _write_result(result_path(job.outdir, rank), result)
        _end_leftovers()


def _restore(module: str, rewrite: Mapping[str, str]) -> RankMain:
    """Unpickling a RankMain (in a rank, before the test function is unpickled): make
    sure the test module is the rewritten one."""
    _finder().update(rewrite)
    loaded = sys.modules.get(module)
    if module in rewrite and loaded is not None and not _rewritten_here(loaded):
        # The zygote imported it without the rewriting finder (its preload list was
        # replaced): import it again here, rewritten.
        del sys.modules[module]
        importlib.import_module(module)
    return RankMain(module, rewrite)


def _apply_warning_filters(filters: Sequence[Tuple[Any, ...]]) -> None:
    """The pytest process's warning filters of the test call (filterwarnings=error...)."""
    warnings.resetwarnings()
    for action, message, category, module, lineno in filters:
        try:
            cls = _resolve(category)
        except Exception:
            continue  # a category that does not exist here cannot be raised here either
        warnings.filterwarnings(action, message, cls, module, lineno, append=True)


def _resolve(qualified: Tuple[str, str]) -> Any:
    module, qualname = qualified
    obj: Any = importlib.import_module(module)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


def _write_result(path: str, result: Dict[str, Any]) -> None:
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        pickle.dump(result, f, pickle.HIGHEST_PROTOCOL)
    os.replace(tmp, path)


def _end_leftovers() -> None:
    """No process a rank started outlives its test: once the body returned, SIGKILL what
    is left in the rank's process group (each rank leads its own)."""
    me = os.getpid()
    if os.getpgrp() != me:
        return  # not a group of its own (never expected): nothing of ours to tell apart
    try:
        os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    except ChildProcessError:
        return  # no child left, running or not: the usual case, one system call
    parent = os.getppid()
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == me:
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rindex(b")") + 2 :].split()  # state, ppid, pgrp, ...
        # A sibling rank the zygote's tree is still forking can briefly be in our group:
        # it is the caller's child, as we are.
        if int(fields[2]) == me and int(fields[1]) != parent:
            try:
                os.kill(int(entry), signal.SIGKILL)
            except OSError:
                pass


# ----------------------------------------------------------------- failure reports
def _describe(exc: BaseException, report: Mapping[str, Any]) -> Dict[str, Any]:
    """The result record of a test body that raised ``exc``."""
    from _pytest.outcomes import Failed, Skipped, XFailed

    if isinstance(exc, Skipped):
        return {"outcome": "skipped", "message": exc.msg or "", "where": _raised_at(exc)}
    if isinstance(exc, XFailed):
        return {"outcome": "xfailed", "message": exc.msg or ""}
    # Our own frame is not part of the test's traceback.
    tb = exc.__traceback__
    exc.__traceback__ = tb.tb_next if tb is not None and tb.tb_next is not None else tb
    style = report.get("tbstyle", "long")
    if isinstance(exc, Failed) and not exc.pytrace:
        style = "value"
    result: Dict[str, Any] = {
        "outcome": "failed",
        "text": "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)),
        "message": _one_line(exc),
        "type": (type(exc).__module__, type(exc).__qualname__),
    }
    try:
        result["exception"] = pickle.dumps(exc, pickle.HIGHEST_PROTOCOL)
    except Exception:
        pass
    try:
        result["repr"] = pickle.dumps(_pytest_repr(exc, style, report), pickle.HIGHEST_PROTOCOL)
    except Exception:
        pass  # the plain traceback text stands in
    return result


def _raised_at(exc: BaseException) -> Optional[Tuple[str, int]]:
    """Where the test raised ``exc``: the innermost frame pytest would show (not one
    hidden with ``__tracebackhide__``, as pytest.skip's own is)."""
    where = None
    tb = exc.__traceback__
    while tb is not None:
        frame = tb.tb_frame
        if not frame.f_locals.get("__tracebackhide__", frame.f_globals.get("__tracebackhide__", False)):
            where = (frame.f_code.co_filename, tb.tb_lineno)
        tb = tb.tb_next
    return where


def _one_line(exc: BaseException) -> str:
    text = traceback.format_exception_only(type(exc), exc)[-1].strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _pytest_repr(exc: BaseException, style: str, report: Mapping[str, Any]) -> Any:
    """pytest's own rendering of the failure, as the pytest process would render it."""
    import inspect

    from _pytest._code import ExceptionInfo

    excinfo = ExceptionInfo.from_exc_info(cast(Any, (type(exc), exc, exc.__traceback__)))
    options: Dict[str, Any] = {
        "funcargs": True,
        "abspath": report.get("abspath", False),
        "showlocals": report.get("showlocals", False),
        "style": style,
        "tbfilter": True,
        "truncate_locals": report.get("verbosity", 0) <= 1,
        "truncate_args": report.get("verbosity", 0) <= 2,
    }
    if report.get("tbstyle_auto") and style == "long":
        options["tbfilter"] = _short_middle_entries
    accepted = inspect.signature(excinfo.getrepr).parameters
    return excinfo.getrepr(**{k: v for k, v in options.items() if k in accepted})


def _short_middle_entries(excinfo: Any) -> Any:
    """pytest's "auto" style: the first and last entries in full, the others short."""
    from _pytest._code import Traceback

    entries = excinfo.traceback.filter(excinfo)
    if len(entries) <= 2 or not hasattr(entries[0], "with_repr_style"):
        return entries
    middle = [entry.with_repr_style("short") for entry in entries[1:-1]]
    return Traceback([entries[0], *middle, entries[-1]])


class _ConfigView:
    """The read-only part of pytest's Config that assertion explanations consult,
    holding the values the pytest process sent."""

    def __init__(self, values: Mapping[str, Any]) -> None:
        self._verbosity: Dict[Optional[str], int] = dict(values.get("verbosities", {}))
        self._ini: Dict[str, Any] = dict(values.get("ini", {}))
        self._options: Dict[str, Any] = dict(values.get("options", {}))
        self.pluginmanager = self  # has_plugin: no terminal here, so plain text

    def has_plugin(self, name: str) -> bool:
        return False

    def get_terminal_writer(self) -> Any:
        """A writer without markup: pytest 8 highlights diffs through it (plain text here)."""
        import io

        from _pytest._io import TerminalWriter

        writer = TerminalWriter(io.StringIO())
        writer.hasmarkup = False
        return writer

    def get_verbosity(self, verbosity_type: Optional[str] = None) -> int:
        return self._verbosity.get(verbosity_type, self._verbosity.get(None, 0))

    def getini(self, name: str) -> Any:
        return self._ini[name]

    def getoption(self, name: str, default: Any = None, skip: bool = False) -> Any:
        return self._options.get(name, default)

    getvalue = getoption


class _AssertionHooks:
    """pytest sets these module globals around each test so that a failed ``a == b``
    gets its detailed explanation; a rank sets them from the pytest process's settings."""

    saved: Optional[Tuple[Any, Any]] = None

    @classmethod
    def install(cls, report: Mapping[str, Any]) -> None:
        try:
            from _pytest import assertion
            from _pytest.assertion import util
        except ImportError:
            return
        view = _ConfigView(report.get("config", {}))

        def explain(op: str, left: object, right: object) -> Optional[str]:
            try:
                lines = assertion.pytest_assertrepr_compare(config=cast(Any, view), op=op, left=left, right=right)
            except Exception:
                return None  # the plain "assert left op right" stays
            if not lines:
                return None
            return "\n~".join(line.replace("\n", "\\n") for line in lines).replace("%", "%%")

        cls.saved = (util._reprcompare, getattr(util, "_config", None))
        util._reprcompare = explain
        util._config = view  # type: ignore[assignment]

    @classmethod
    def uninstall(cls) -> None:
        if cls.saved is None:
            return
        from _pytest.assertion import util

        util._reprcompare, util._config = cls.saved
        cls.saved = None
