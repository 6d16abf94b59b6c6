"""Imported in the zygote by a test: starts a thread that lives on (the zygote must refuse to fork)."""

import threading

_stop = threading.Event()
threading.Thread(target=_stop.wait, daemon=True, name="fastspawn-test-thread").start()
