"""Runs pytest and treats "no tests collected" (exit 5) as the failure it is for this suite."""

import os
import sys

os.environ["GRPC_ENABLE_FORK_SUPPORT"] = "false"  # before grpc loads: see tests/conftest.py

import pytest  # noqa: E402

code = pytest.main(["-ra", *sys.argv[1:]])
if code == pytest.ExitCode.NO_TESTS_COLLECTED:
    print("run_pytest: no tests ran — the suite is broken or filtered to nothing", file=sys.stderr)
    sys.exit(1)
sys.exit(int(code))
