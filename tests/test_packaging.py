"""``pip install`` as a new user does it (SPEC "Installing and importing").

The ranges in ``pyproject.toml`` say what the code works with; ``requirements*.txt``
pin what CI installs. The fast tests keep the two in step; the slow one installs the
project into a fresh venv, as a requester and then as an operator, and uses it from a
folder outside the checkout, where only the installed copy can be found.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parent.parent
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
SELF = PROJECT["name"]
#: Pin file -> the pyproject lists whose packages it pins.
PIN_FILES = {
    "requirements.txt": ["dependencies", "broker"],
    "requirements-dev.txt": ["dev"],
    "requirements-bench.txt": ["bench"],
}
#: Server-side distributions a requester or contributor must not get.
SERVER_ONLY = ["falcon", "gunicorn", "peewee", "psycopg2-binary", "redis", "rq", "jsonschema", "pyjwt"]


def requirements(group: str) -> dict[str, Requirement]:
    """A pyproject list (``dependencies`` or an extra) without self-references."""
    items = PROJECT[group] if group == "dependencies" else PROJECT["optional-dependencies"][group]
    reqs = [Requirement(r) for r in items]
    return {r.name.lower(): r for r in reqs if r.name != SELF}


def pins(name: str) -> dict[str, str]:
    """``package -> version`` pinned in one requirements file (its ``-r`` lines aside)."""
    found = {}
    for raw in (ROOT / name).read_text().splitlines():
        line = raw.split("#")[0].strip()
        if not line or line.startswith("-r"):
            continue
        req = Requirement(line)
        (spec,) = req.specifier
        assert spec.operator == "==", f"{name}: {line} is not a pin"
        found[req.name.lower()] = spec.version
    return found


@pytest.mark.parametrize("pin_file", sorted(PIN_FILES))
def test_pins_and_ranges_name_the_same_packages(pin_file: str) -> None:
    ranged = set().union(*(requirements(group) for group in PIN_FILES[pin_file]))
    assert sorted(pins(pin_file)) == sorted(ranged)


@pytest.mark.parametrize("pin_file", sorted(PIN_FILES))
def test_every_pin_lies_in_its_range(pin_file: str) -> None:
    ranges = {}
    for group in PIN_FILES[pin_file]:
        ranges.update(requirements(group))
    outside = {
        name: f"{version} not in {ranges[name].specifier}"
        for name, version in pins(pin_file).items()
        if name in ranges and not ranges[name].specifier.contains(version, prereleases=True)
    }
    assert outside == {}


def test_no_server_package_in_the_base_install() -> None:
    assert sorted(set(requirements("dependencies")) & set(SERVER_ONLY)) == []


def _run(*args: str | Path, cwd: Path, env: dict[str, str], timeout: float = 300) -> str:
    result = subprocess.run(
        [str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )
    assert result.returncode == 0, f"{args} exited {result.returncode}:\n{result.stdout}\n{result.stderr}"
    return result.stdout


@pytest.mark.slow
def test_fresh_venv_install_as_requester_then_operator(tmp_path: Path) -> None:
    """About 30 s: a venv, ``pip install <repo>``, then ``pip install '<repo>[broker]'``.

    pip uses its own configuration (index, find-links, cache); ``-c requirements.txt``
    makes it install our pins, so the test does not change with the index. The checkout
    is copied first because setuptools builds in the source tree (``build/``, egg-info).
    """
    source = tmp_path / "src"
    shutil.copytree(
        ROOT,
        source,
        ignore=shutil.ignore_patterns(
            ".venv", ".git", "var", "__pycache__", "*.pyc", ".*_cache", "build", "*.egg-info"
        ),
    )
    venv = tmp_path / "venv"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    env["PYTHONNOUSERSITE"] = "1"
    _run(sys.executable, "-m", "venv", venv, cwd=elsewhere, env=env, timeout=120)
    python, pip = (
        venv / "bin" / "python",
        [venv / "bin" / "python", "-m", "pip", "--disable-pip-version-check"],
    )
    constraints = source / "requirements.txt"

    _run(*pip, "install", "-q", "-c", constraints, source, cwd=elsewhere, env=env)
    installed = _run(*pip, "list", "--format=freeze", cwd=elsewhere, env=env).lower()
    names = {line.split("==")[0] for line in installed.splitlines()}
    assert sorted(names & set(SERVER_ONLY)) == []
    assert "tests" not in names and "scripts" not in names
    requester = (
        "import sys, peer; from peer import Pool, RemoteError, Tracked\n"
        f"assert peer.__file__.startswith({str(venv)!r}), peer.__file__\n"
        "bad = [m for m in sys.modules if m.startswith(('peer.daemon', 'peer.sandbox', 'peer.confine'))]\n"
        "assert not bad, bad\n"
    )
    _run(python, "-c", requester, cwd=elsewhere, env=env)
    for cli in ([python, "-m", "peer"], [venv / "bin" / "compute-broker-peer"]):
        assert "serve" in _run(*cli, "--help", cwd=elsewhere, env=env)
    site = Path(
        _run(
            python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))", cwd=elsewhere, env=env
        ).strip()
    )
    assert not (site / "tests").exists() and not (site / "scripts").exists()

    _run(*pip, "install", "-q", "-c", constraints, f"{source}[broker]", cwd=elsewhere, env=env)
    operator = (
        "import broker_api.app, matchmaker, matchmaker.jobs, matchmaker.probes\n"
        f"assert broker_api.__file__.startswith({str(venv)!r}), broker_api.__file__\n"
    )
    _run(python, "-c", operator, cwd=elsewhere, env=env)
    assert "--queue" in _run(python, "-m", "matchmaker", "--help", cwd=elsewhere, env=env)
    assert (venv / "bin" / "gunicorn").exists()
