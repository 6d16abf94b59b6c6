"""Which engine path each start method exercises in the parametrized suites.

"spawn" and "forkserver" share code: both fork from the warm zygote by default, and both
can start one fresh interpreter per child instead. To cover both paths without running
every test twice, tests parametrized with ``method="forkserver"`` run with the zygote off
(FASTSPAWN_ZYGOTE=0): spawn = zygote path, forkserver = fresh-interpreter path, fork =
fork of the test process. test_zygote.py covers forkserver through the zygote.
"""

import signal

import pytest

# The termination signals whose handlers an elastic start() replaces in the launching
# process (torch's does the same): SignalException raisers that would reach fork children.
ELASTIC_HANDLED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT)


@pytest.fixture
def keep_signal_handlers():
    """Restore the handlers of :data:`ELASTIC_HANDLED` after the test, for tests that start
    elastic contexts in the test process."""
    saved = {sig: signal.getsignal(sig) for sig in ELASTIC_HANDLED}
    yield
    for sig, handler in saved.items():
        signal.signal(sig, handler)


@pytest.fixture(autouse=True)
def _engine_path_for_method(request, monkeypatch):
    callspec = getattr(request.node, "callspec", None)
    method = callspec.params.get("method") if callspec is not None else None
    if method == "forkserver":
        monkeypatch.setenv("FASTSPAWN_ZYGOTE", "0")
    yield
