"""Loaded at interpreter start when this folder is on PYTHONPATH (tests/_lib/crashpoints.env puts it there):
installs the crash plan of HALA_CRASH_PLAN in every process of a recovery test. Without the variable it does
nothing."""

import os

if os.environ.get("HALA_CRASH_PLAN"):
    import crashpoints

    crashpoints.install()
