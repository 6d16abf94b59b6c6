"""Waiting for the pid files of ``_cli_script.py hang DIR`` ranks (shared by the CLI tests)."""

import time


def wait_for_pids(directory, count, launcher, timeout=60.0):
    """The pids of ``count`` ranks, once each wrote ``DIR/<rank>.pid``; fails if ``launcher``
    (a Popen) ends first or ``timeout`` seconds pass."""
    deadline = time.monotonic() + timeout
    while len(list(directory.glob("*.pid"))) < count:
        assert launcher.poll() is None, f"launcher ended with {launcher.returncode} before its ranks started"
        assert time.monotonic() < deadline, "ranks did not start"
        time.sleep(0.05)  # polling a directory: nothing to wait on
    return [int(p.read_text()) for p in directory.glob("*.pid")]


def signal_hanging_ranks(command, env, directory, count, sig, timeout=60.0):
    """Run ``command`` (ranks of ``_cli_script.py hang DIR``), send ``sig`` to the launcher
    once ``count`` ranks are up; (exit status, stderr, the ranks' pids). The launcher is
    killed if it outlives the test."""
    import subprocess

    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        pids = wait_for_pids(directory, count, proc, timeout)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    return proc.returncode, err, pids
