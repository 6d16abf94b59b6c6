"""Run by tests/test_cli.py through ``fastspawn``: a gloo process group from the
environment the launcher set, an all_reduce of the ranks, one JSON line per rank."""

import json
import os

import torch
import torch.distributed as dist

dist.init_process_group("gloo")
total = torch.tensor([float(dist.get_rank())])
dist.all_reduce(total)
print(json.dumps({
    "rank": dist.get_rank(),
    "world": dist.get_world_size(),
    "env_rank": int(os.environ["RANK"]),
    "local_rank": int(os.environ["LOCAL_RANK"]),
    "group_rank": int(os.environ["GROUP_RANK"]),
    "sum": total.item(),
    "agent_store": os.environ["TORCHELASTIC_USE_AGENT_STORE"],
}))
dist.destroy_process_group()
