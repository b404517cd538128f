"""Resource limits of one sandbox child: shared by the daemon, the CLI and the child itself."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class Limits:
    """Resource limits of one sandbox child.

    Attributes:
        memory: Address-space limit in bytes (RLIMIT_AS); it must leave room for the
            sandbox interpreter's own mappings (numpy and its libraries included).
        cpu_seconds: CPU time limit (RLIMIT_CPU). It accumulates over the child's
            life, so the slot recycles the child once half of it is used.
        nproc: Processes and threads the slot's uid may have (RLIMIT_NPROC).
        nofile: Open file descriptors (RLIMIT_NOFILE).
        fsize: Largest file the task may write, in bytes (RLIMIT_FSIZE).
        timeout: Default wall-clock limit of one task, in seconds.
        max_tasks: Tasks after which the child is replaced by a fresh one.
        tmp_bytes: Size cap of each private tmpfs the task sees (/tmp, /var/tmp,
            /dev/shm); their memory is the host's, freed when the child goes.
    """

    memory: int = 2 * 1024**3
    cpu_seconds: int = 300
    nproc: int = 64
    nofile: int = 256
    fsize: int = 1024**3
    timeout: float = 300.0
    max_tasks: int = 10_000
    tmp_bytes: int = 64 * 1024**2

    def __post_init__(self) -> None:
        for name in (
            "memory",
            "cpu_seconds",
            "nproc",
            "nofile",
            "fsize",
            "timeout",
            "max_tasks",
            "tmp_bytes",
        ):
            if getattr(self, name) <= 0:
                raise ValueError(f"Limits.{name} must be positive")

    def to_json(self) -> dict[str, Any]:
        """The limits as JSON, for the exec'd child's command line."""
        return asdict(self)
