"""Run by tests/test_cli_elastic.py on several "nodes" (fastspawn or torchrun agents on
loopback): a gloo group over the rendezvous' store, one JSON line per rank and round
("ready" after the first all_reduce), then all_reduces until the job is where the test
wants it, then a "done" line.

    _cli_elastic.py [--until-world W] [--until-restart R] [--fail-rank K]

--until-world W: go on until the group has W ranks. --until-restart R: until some rank runs
its R-th restart (TORCHELASTIC_RESTART_COUNT, maximum over the group). --fail-rank K: rank K
exits with status 3 after its first all_reduce on the first attempt (with --fail-always: at
its start, on every attempt).
"""

import argparse
import json
import os
import sys
import time

import torch
import torch.distributed as dist

parser = argparse.ArgumentParser()
parser.add_argument("--until-world", type=int, default=0)
parser.add_argument("--until-restart", type=int, default=0)
parser.add_argument("--fail-rank", type=int, default=-1)
parser.add_argument("--fail-always", action="store_true")
args = parser.parse_args()

restart = int(os.environ["TORCHELASTIC_RESTART_COUNT"])
if args.fail_always and int(os.environ["RANK"]) == args.fail_rank:
    sys.exit(3)  # before the group forms: the others wait in init_process_group, unharmed
dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()


def say(event, **extra):
    record = {"event": event, "rank": rank, "world": world, "restart": restart,
              "group_rank": int(os.environ["GROUP_RANK"]), "run_id": os.environ["TORCHELASTIC_RUN_ID"],
              "local_rank": int(os.environ["LOCAL_RANK"]), **extra}
    sys.stdout.write(json.dumps(record) + "\n")  # one write: torchrun's ranks share its stdout unprefixed
    sys.stdout.flush()


first = True
while True:
    most = torch.tensor([restart])
    dist.all_reduce(most, op=dist.ReduceOp.MAX)
    if first:
        say("ready")
        first = False
    if rank == args.fail_rank and restart == 0:
        sys.exit(3)
    if world >= args.until_world and int(most.item()) >= args.until_restart:
        break
    time.sleep(0.1)  # pace the collectives: the job changes from outside (a node joins or dies)
dist.barrier()
say("done")
dist.destroy_process_group()
