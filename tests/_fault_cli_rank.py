"""A rank script for ``fastspawn -n 2 _fault_cli_rank.py OUT_DIR``: starts a child of
its own (in its process group), reports both pids, sleeps."""

import os
import subprocess
import sys
import time

import _faultkit as kit

child = subprocess.Popen(["sleep", "300"])
kit.write_text(os.path.join(sys.argv[1], f"tree.{os.getpid()}"), f"{os.getpid()} {child.pid}")
time.sleep(300)
