"""A training script stand-in for tests/test_cli.py, run by the ``fastspawn`` command.

    _cli_script.py env [args...]      print one JSON line: the rank's env, argv, __name__, ...
    _cli_script.py fail RANK... [stubborn]   these ranks raise ValueError; the others
                                      block (ignoring SIGTERM if stubborn)
    _cli_script.py kill RANK          that rank SIGKILLs itself; the others block
    _cli_script.py own-error-file     rank 1 writes its error file itself, then raises
    _cli_script.py interrupt          rank 1 raises KeyboardInterrupt; the others block
    _cli_script.py flaky              rank 1 exits 3 in attempt 0; then like ``env``
    _cli_script.py hang DIR           write DIR/<rank>.pid, block (rank 0 ignores SIGTERM)
    _cli_script.py spam LINES WIDTH   print LINES long lines to stdout and stderr, fast
"""

import json
import os
import signal
import sys

RANK = int(os.environ["RANK"])
KEYS = (
    "RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE",
    "ROLE_RANK", "ROLE_NAME", "ROLE_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
    "TORCHELASTIC_RESTART_COUNT", "TORCHELASTIC_MAX_RESTARTS", "TORCHELASTIC_RUN_ID",
    "TORCHELASTIC_USE_AGENT_STORE", "TORCHELASTIC_ERROR_FILE", "OMP_NUM_THREADS",
    "TORCH_NCCL_ASYNC_ERROR_HANDLING",
)


def block() -> None:
    while True:
        signal.pause()


def report() -> None:
    info = {key: os.environ.get(key) for key in KEYS}
    info.update(argv=sys.argv, name=__name__, file=__file__, path0=sys.path[0])
    print(json.dumps(info))


def fail_here() -> None:
    raise ValueError(f"rank {RANK} failed on purpose")


def spam(lines: int, width: int) -> None:
    # Each line names its rank, stream and index; lines are long (more than a pipe's
    # atomic write), some are written in three separate unbuffered pieces.
    for i in range(lines):
        for stream, fd, tag in ((sys.stdout, 1, "out"), (sys.stderr, 2, "err")):
            line = f"{RANK}:{tag}:{i}:" + "x" * (width + i % 7)
            if i % 5 == 0:
                stream.flush()
                data = (line + "\n").encode()
                third = len(data) // 3
                for piece in (data[:third], data[third : 2 * third], data[2 * third :]):
                    os.write(fd, piece)
            else:
                print(line, file=stream)


def main() -> None:
    command, args = sys.argv[1], sys.argv[2:]
    if command == "env":
        report()
    elif command == "fail":
        if str(RANK) in args:
            fail_here()
        if "stubborn" in args:  # the others ignore SIGTERM
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        block()
    elif command == "kill":
        if str(RANK) == args[0]:
            os.kill(os.getpid(), signal.SIGKILL)
        block()
    elif command == "own-error-file":  # as a script's own @record would: kept as it is
        if RANK == 1:
            with open(os.environ["TORCHELASTIC_ERROR_FILE"], "w") as out:
                json.dump({"message": "recorded by the script itself", "timestamp": 1}, out)
            fail_here()
        block()
    elif command == "interrupt":
        if RANK == 1:
            raise KeyboardInterrupt
        block()
    elif command == "flaky":
        if RANK == 1 and os.environ["TORCHELASTIC_RESTART_COUNT"] == "0":
            sys.exit(3)
        report()
    elif command == "hang":
        if RANK == 0:
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        path = os.path.join(args[0], f"{RANK}.pid")
        with open(path + ".tmp", "w") as out:
            out.write(str(os.getpid()))
        os.replace(path + ".tmp", path)
        block()
    elif command == "spam":
        spam(int(args[0]), int(args[1]))
    else:
        raise SystemExit(f"unknown command {command!r}")


if __name__ == "__main__":
    main()
