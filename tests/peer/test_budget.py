"""The daemon's byte budgets: per session and in all, waiting only when it can end."""

from __future__ import annotations

import threading
import time

import pytest

from peer.budget import Budget, OverBudget
from peer.config import ServeSettings
from peer.errors import PeerError


def _reserve_later(budget: Budget, session: str, size: int, **kwargs) -> tuple[threading.Thread, list]:
    """Reserve in a thread; the list gets "ok" or the exception."""
    outcome: list = []

    def run() -> None:
        try:
            budget.reserve(session, size, draining=True, **kwargs)
            outcome.append("ok")
        except Exception as exc:
            outcome.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    return thread, outcome


def test_charges_add_up_and_return_to_zero() -> None:
    budget = Budget(per_session=100, total=150)
    budget.reserve("a", 60, draining=True)
    budget.reserve("a", 40, draining=False)
    budget.reserve("b", 50, draining=True)
    assert (budget.held("a"), budget.held("b"), budget.held()) == (100, 50, 150)
    budget.release("a", 60, draining=True)
    budget.release("a", 40, draining=False)
    budget.release("b", 50, draining=True)
    assert budget.held() == 0 and not budget._held and not budget._draining and not budget._waiters


def test_a_session_at_its_cap_waits_until_its_tasks_release() -> None:
    budget = Budget(per_session=100, total=1000)
    budget.reserve("a", 100, draining=True)
    thread, outcome = _reserve_later(budget, "a", 10)
    time.sleep(0.2)
    assert outcome == [] and budget.held("a") == 100  # backpressure: waiting, not failing
    budget.release("a", 30, draining=True)
    thread.join(5)
    assert outcome == ["ok"] and budget.held("a") == 80


def test_a_session_at_its_cap_does_not_hold_back_another() -> None:
    budget = Budget(per_session=100, total=150)
    budget.reserve("a", 100, draining=True)
    waiting, outcome = _reserve_later(budget, "a", 50)
    time.sleep(0.1)
    budget.reserve("b", 50, draining=True)  # at once, although "a" waits ahead of it
    assert budget.held() == 150 and outcome == []
    budget.release("a", 100, draining=True)
    budget.release("b", 50, draining=True)
    waiting.join(5)
    assert outcome == ["ok"]


def test_daemon_budget_is_served_in_arrival_order() -> None:
    budget = Budget(per_session=100, total=100)
    budget.reserve("a", 100, draining=True)
    first, first_out = _reserve_later(budget, "b", 60)
    time.sleep(0.1)
    second, second_out = _reserve_later(budget, "c", 30)
    time.sleep(0.1)
    budget.release("a", 40, draining=True)  # room for "c" only, but "b" came first
    time.sleep(0.3)
    assert first_out == [] and second_out == []
    budget.release("a", 60, draining=True)
    first.join(5)
    second.join(5)
    assert first_out == ["ok"] and second_out == ["ok"] and budget.held() == 90


def test_what_can_never_fit_is_refused_at_once() -> None:
    budget = Budget(per_session=100, total=150)
    with pytest.raises(OverBudget, match="per-session budget"):
        budget.reserve("a", 101, draining=True)
    budget.reserve("a", 90, draining=False)  # held until its connection closes
    started = time.monotonic()
    with pytest.raises(OverBudget, match="code and shared objects"):
        budget.reserve("a", 20, draining=True)  # nothing queued would ever free it
    budget.reserve("b", 60, draining=False)
    with pytest.raises(OverBudget, match="this peer holds"):
        budget.reserve("c", 10, draining=True)
    assert time.monotonic() - started < 1 and budget.held() == 150


def test_a_waiter_whose_connection_ends_stops_waiting() -> None:
    budget = Budget(per_session=10, total=10)
    budget.reserve("a", 10, draining=True)
    gone = threading.Event()
    thread, outcome = _reserve_later(budget, "a", 5, cancelled=gone.is_set, tick=0.05)
    gone.set()
    thread.join(5)
    assert isinstance(outcome[0], ConnectionAbortedError) and budget.held() == 10 and not budget._waiters


def test_serve_settings_are_positive_mib_and_consistent() -> None:
    assert ServeSettings.from_env({}) == ServeSettings(1024, 2048)
    env = {"COMPUTE_BROKER_SESSION_MIB": "64", "COMPUTE_BROKER_HELD_MIB": "96"}
    assert ServeSettings.from_env(env) == ServeSettings(64, 96)
    assert ServeSettings.from_env(env, held_mib=200) == ServeSettings(64, 200)
    for bad, message in (
        ({"COMPUTE_BROKER_SESSION_MIB": "lots"}, "whole number"),
        ({"COMPUTE_BROKER_HELD_MIB": "-5"}, "positive"),
        ({"COMPUTE_BROKER_SESSION_MIB": "4096"}, "must not exceed"),
    ):
        with pytest.raises(PeerError, match=message):
            ServeSettings.from_env(bad)


@pytest.mark.parametrize(
    ("argv", "status", "message"),
    [
        (["--session-mib", "0"], 2, "--session-mib must be a positive number of MiB, got 0"),
        (["--held-mib", "lots"], 2, "--held-mib must be a whole number of MiB, got 'lots'"),
        (
            ["--session-mib", "3000"],
            1,
            "per-session budget (3000 MiB) must not exceed the daemon's (2048 MiB)",
        ),
    ],
)
def test_serve_refuses_bad_budgets_in_one_line(tmp_path, argv, status, message) -> None:
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, "-m", "peer", "--home", str(tmp_path), "serve", *argv],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == status
    assert message in result.stderr and "Traceback" not in result.stderr
