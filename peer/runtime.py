"""What serialized code needs from the machine that runs it.

dill pickles functions as bytecode, which does not cross Python minor versions, and
dill's own format may change between its minor versions. The requester reports its
runtime with the pool request (the matchmaker only pairs compatible peers) and both
sides check again at the handshake, so a mismatch fails early with both versions
named instead of as a confusing unpickling error inside a task.
"""

from __future__ import annotations

import platform
import sys
from collections.abc import Mapping

import dill


def local_runtime() -> dict[str, str]:
    """This interpreter's runtime, in the broker's ``{python, dill, platform}`` form."""
    return {
        "python": platform.python_version(),
        "dill": dill.__version__,
        "platform": f"{sys.platform}-{platform.machine()}",
    }


def _minor(version: object) -> str:
    return ".".join(str(version).split(".")[:2])


def mismatch(mine: Mapping[str, object], theirs: Mapping[str, object]) -> str | None:
    """Why code serialized under one runtime cannot run under the other, or None.

    Platform does not matter for bytecode, so only Python and dill minor versions are
    compared.
    """
    for name, label in (("python", "Python"), ("dill", "dill")):
        here, there = mine.get(name, "?"), theirs.get(name, "?")
        if _minor(here) != _minor(there):
            return f"{label} {here} here cannot exchange code with {label} {there} there"
    return None
