"""The load generator's quick run, as CI runs it: real processes, real races, an audit.

``scripts.load`` starts its own stack (gunicorn, matchmaker, private Redis) in a
temporary directory, so this test needs none of the shared fixtures; it runs it as a
subprocess exactly as documented and trusts its exit status and its summary lines.
"""

from __future__ import annotations

import re
import subprocess
import sys
import time

import pytest

from scripts.stack import ROOT

pytestmark = pytest.mark.slow


@pytest.mark.timeout(120)
def test_quick_load_has_no_errors_and_stays_consistent() -> None:
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "scripts.load", "--quick"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=110,
    )
    elapsed = time.monotonic() - started
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert re.search(r"^errors: 0$", result.stdout, re.MULTILINE), output
    assert re.search(r"^consistency: OK", result.stdout, re.MULTILINE), output
    assert re.search(r"^clients: 8, requests: 600 ", result.stdout, re.MULTILINE), output
    assert elapsed < 90, f"quick load took {elapsed:.0f} s"
