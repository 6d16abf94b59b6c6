"""torch's elastic_launch (LocalElasticAgent) run by tests/test_patch.py, patched or not.

    python _patch_elastic.py MODE OUT

MODE "torch": torch as installed; "patched": under fastspawn.patch_torch(), then once more
after unpatch_torch(); "env": nothing done here (the environment asks for the patch).
Prints one JSON object: per scenario what the workers returned (each saying whether
fastspawn.elastic started it) or how elastic_launch failed. Logs go under OUT.
"""

import json
import os
import re
import sys
import traceback


def on_fastspawn_elastic():
    """Whether fastspawn.elastic's child bootstrap is on this worker's stack."""
    frames = [frame.filename.replace(os.sep, "/") for frame in traceback.extract_stack()]
    return any(name.endswith("fastspawn/_elastic_child.py") for name in frames)


def worker(how):
    rank = int(os.environ["RANK"])
    attempt = int(os.environ["TORCHELASTIC_RESTART_COUNT"])
    if how == "fail" and rank == 1:
        raise ValueError("boom")
    if how == "fail_first_attempt" and rank == 1 and attempt == 0:
        raise ValueError("first attempt")
    return {"rank": rank, "attempt": attempt, "fastspawn": on_fastspawn_elastic()}


def launch(out, run_id, how, max_restarts):
    from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    config = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=2,
        run_id=run_id,
        rdzv_backend="c10d",
        rdzv_endpoint="localhost:0",
        max_restarts=max_restarts,
        monitor_interval=0.05,
        logs_specs=DefaultLogsSpecs(log_dir=os.path.join(out, "logs")),
    )
    try:
        return {"returned": elastic_launch(config, worker)(how)}
    except ChildFailedError as exc:
        failures = {}
        for rank, failure in exc.failures.items():
            data = failure.error_file_data
            failures[rank] = {
                "local_rank": failure.local_rank,
                "exitcode": failure.exitcode,
                "error": data.get("message", {}).get("message") if isinstance(data, dict) else None,
                # the attempt directory: which restart failed last
                "attempt": re.findall(r"attempt_(\d+)", failure.error_file),
            }
        # torch's report with what varies from run to run blanked out
        report = re.sub(r"(time|error_file)(\s*): [^\n]*", r"\1\2: _", str(exc))
        report = re.sub(r"\(pid: \d+\)", "(pid: _)", report)
        report = re.sub(r"traceback : .*?\n\s*(\w+Error: [^\n]*)", r"traceback : \1", report, flags=re.S)
        return {"raised": type(exc).__module__ + "." + type(exc).__qualname__, "name": exc.name,
                "failures": failures, "report": report}


def scenarios(out, tag):
    return {
        "ok": launch(out, f"{tag}_ok", "ok", 0),
        "restart": launch(out, f"{tag}_restart", "fail_first_attempt", 1),
        "fail": launch(out, f"{tag}_fail", "fail", 1),
    }


def main():
    mode, out = sys.argv[1], sys.argv[2]
    result = {}
    if mode == "patched":
        import fastspawn

        with fastspawn.patch_torch():
            result = scenarios(out, "patched")
        result["after_unpatch"] = launch(out, "after", "ok", 0)
    else:
        result = scenarios(out, mode)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
