"""Which engine path each start method exercises in the parametrized suites.

"spawn" and "forkserver" share code: both fork from the warm zygote by default, and both
can start one fresh interpreter per child instead. To cover both paths without running
every test twice, tests parametrized with ``method="forkserver"`` run with the zygote off
(FASTSPAWN_ZYGOTE=0): spawn = zygote path, forkserver = fresh-interpreter path, fork =
fork of the test process. test_zygote.py covers forkserver through the zygote.
"""

import pytest


@pytest.fixture(autouse=True)
def _engine_path_for_method(request, monkeypatch):
    callspec = getattr(request.node, "callspec", None)
    method = callspec.params.get("method") if callspec is not None else None
    if method == "forkserver":
        monkeypatch.setenv("FASTSPAWN_ZYGOTE", "0")
    yield
