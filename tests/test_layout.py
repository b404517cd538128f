"""The packages import one way (SPEC "Installing and importing"), read from the source.

Every ``import`` statement counts, also those inside functions and ``TYPE_CHECKING``
blocks: a function-level import is still a dependency, only a later one. ``peer`` may
import neither server package; ``matchmaker`` may import ``broker_api`` (the models and
``broker_api.matching``, which both use), never the reverse; and each package imports
only the third-party distributions its install gives it (``pip install .`` for ``peer``,
the ``[broker]`` extra for the servers).
"""

from __future__ import annotations

import ast
import sys
import tomllib
from collections.abc import Iterator
from functools import cache
from pathlib import Path

import pytest
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("broker_api", "matchmaker", "peer")
#: Allowed edges between our top-level packages (importer -> imported).
ALLOWED = {("matchmaker", "broker_api"), ("matchmaker", "peer")}
#: Import names whose distribution has another name.
DISTRIBUTION = {"jwt": "pyjwt", "playhouse": "peewee"}
#: Imported only when the caller already has it (a result holding a numpy array).
OPTIONAL = {"numpy"}


def imports(package: str) -> Iterator[tuple[Path, int, str]]:
    """``(file, line, absolute module name)`` of every import in a package."""
    for path in sorted((ROOT / package).rglob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    yield path, node.lineno, alias.name
            elif isinstance(node, ast.ImportFrom):
                if node.level:  # relative: stays inside its own package
                    yield path, node.lineno, package
                elif node.module:
                    yield path, node.lineno, node.module


@cache
def edges() -> dict[tuple[str, str], list[str]]:
    """Top-level package edges, each with where it is made (``file:line``)."""
    found: dict[tuple[str, str], list[str]] = {}
    for package in PACKAGES:
        for path, line, module in imports(package):
            top = module.split(".")[0]
            if top in PACKAGES and top != package:
                found.setdefault((package, top), []).append(f"{path.relative_to(ROOT)}:{line}")
    return found


def test_only_allowed_edges_between_packages() -> None:
    unexpected = {edge: where for edge, where in edges().items() if edge not in ALLOWED}
    assert unexpected == {}


def test_package_graph_is_acyclic() -> None:
    graph: dict[str, set[str]] = {p: set() for p in PACKAGES}
    for importer, imported in edges():
        graph[importer].add(imported)

    def reaches(start: str, goal: str, seen: frozenset[str] = frozenset()) -> bool:
        return any(n == goal or (n not in seen and reaches(n, goal, seen | {n})) for n in graph[start])

    assert [p for p in PACKAGES if reaches(p, p)] == []


def test_peer_imports_no_server_package() -> None:
    assert [edge for edge in edges() if edge[0] == "peer"] == []


@cache
def declared() -> dict[str, set[str]]:
    """Distribution names per install: ``base`` (``pip install .``) and ``broker``."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    base = {Requirement(r).name.lower() for r in project["dependencies"]}
    broker = {Requirement(r).name.lower() for r in project["optional-dependencies"]["broker"]}
    return {"base": base, "broker": base | broker}


@pytest.mark.parametrize(
    ("package", "install"), [("peer", "base"), ("broker_api", "broker"), ("matchmaker", "broker")]
)
def test_third_party_imports_are_declared(package: str, install: str) -> None:
    """What a package imports is installed by its install line (an undeclared import
    would be a ``ModuleNotFoundError`` in a fresh venv that our own venv hides)."""
    missing = set()
    for path, line, module in imports(package):
        top = module.split(".")[0]
        if top in sys.stdlib_module_names or top in PACKAGES or top in OPTIONAL or top == "__future__":
            continue
        if DISTRIBUTION.get(top, top).lower() not in declared()[install]:
            missing.add(f"{top} ({path.relative_to(ROOT)}:{line})")
    assert sorted(missing) == []
