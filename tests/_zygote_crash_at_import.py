"""Preloaded into the zygote by test_zygote.py: records that a zygote imported it (a line
in $FASTSPAWN_TEST_CRASH_LOG), then ends that zygote as a crash at import would. The
test process itself (its pid is in FASTSPAWN_TEST_CALLER) is left alone."""

import os

if os.getpid() != int(os.environ.get("FASTSPAWN_TEST_CALLER", os.getpid())):
    with open(os.environ["FASTSPAWN_TEST_CRASH_LOG"], "a") as log:
        log.write(f"{os.getpid()}\n")
    os._exit(3)
