"""Swap the import, change nothing else: a user script prints and raises the same."""

import re
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("torch")

SCRIPT = textwrap.dedent(
    """
    import os
    import time
    import torch
    import {module} as mp


    def fill(rank, tensor, queue):
        tensor[rank] = rank + 1
        queue.put((rank, tensor.is_shared()))


    def refuse(rank):
        if rank == 1:
            raise ValueError(f"rank {{rank}} refuses")


    def leave(rank, code):
        if rank == 0:
            os._exit(code)
        time.sleep(60)


    if __name__ == "__main__":
        for method in ("spawn", "fork", "forkserver"):
            ctx = torch.multiprocessing.get_context(method)
            tensor = torch.zeros(4).share_memory_()
            queue = ctx.SimpleQueue()
            if method == "spawn":
                mp.spawn(fill, args=(tensor, queue), nprocs=4)
            else:
                mp.start_processes(fill, args=(tensor, queue), nprocs=4, start_method=method)
            print(method, tensor.tolist(), sorted(queue.get() for _ in range(4)))

            context = mp.start_processes(fill, args=(tensor, queue), nprocs=2, join=False, start_method=method)
            while not context.join():
                pass
            print(method, "join=False", len(context.pids()), sorted(queue.get() for _ in range(2)))

            try:
                mp.start_processes(refuse, nprocs=2, start_method=method)
            except mp.ProcessRaisedException as exc:
                print(method, type(exc).__name__, exc.error_index, str(exc).strip().splitlines()[-1])
            try:
                mp.start_processes(leave, args=(7,), nprocs=2, start_method=method)
            except mp.ProcessExitedException as exc:
                print(method, type(exc).__name__, exc.error_index, exc.exit_code, str(exc))
    """
)


def _run(tmp_path, module):
    path = tmp_path / f"script_{module.replace('.', '_')}.py"
    path.write_text(SCRIPT.format(module=module))
    out = subprocess.run([sys.executable, str(path)], capture_output=True, text=True, timeout=300)
    # Which rank fails first among racing ranks, and pids, may differ run to run.
    normalize = lambda text: re.sub(r"\\b\\d{3,}\\b", "<pid>", text)  # noqa: E731
    return out.returncode, normalize(out.stdout), out.stderr


def test_swapping_the_import_changes_nothing_printed(tmp_path):
    torch_code, torch_out, torch_err = _run(tmp_path, "torch.multiprocessing")
    ours_code, ours_out, ours_err = _run(tmp_path, "fastspawn")
    assert torch_code == 0, torch_err
    assert ours_code == 0, ours_err
    assert ours_out == torch_out
    assert len(ours_out.splitlines()) == 12
