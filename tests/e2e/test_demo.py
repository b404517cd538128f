"""The README's first command, end to end (smaller workload): a correct distributed result."""

from __future__ import annotations

import subprocess
import sys

import pytest

from scripts.stack import ROOT

pytestmark = pytest.mark.slow


def test_demo_counts_primes_on_two_peers_and_leaves_nothing_running():
    result = subprocess.run(
        [sys.executable, "-m", "scripts.demo", "--below", "3000000", "--chunk", "100000"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "primes below 3,000,000: 216,816" in result.stdout
    assert "-> OK" in result.stdout
    assert "alice counted" in result.stdout and "bob counted" in result.stdout
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    assert "compute-broker-demo-" not in ps
