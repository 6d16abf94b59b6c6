"""A program whose main is decorated with @record: argv[1] picks whose record
("fastspawn" or "torch"), argv[2] is "raise" or "ok"."""

import sys

if sys.argv[1] == "torch":
    from torch.distributed.elastic.multiprocessing.errors import record
else:
    from fastspawn.elastic.errors import record


@record
def main():
    if sys.argv[2] == "raise":
        raise RuntimeError("binary failed on purpose")
    print("binary ok")


if __name__ == "__main__":
    main()
