"""Records the environment variable of tests/_elastic_workers.ENV when first imported.

Children import it while unpickling their arguments (a Probe), i.e. as they load the call:
it tells whether the rank's env was in place by then.
"""

import os

IMPORT_TIME_VALUE = os.environ.get("ELASTIC_TEST_VAR")


class Probe:
    def seen(self):
        return IMPORT_TIME_VALUE
