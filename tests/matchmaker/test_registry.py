"""The registry's Lua scripts against a real Redis: atomic, idempotent, O(need)."""

from __future__ import annotations

import threading
import time

import pytest

from broker_api.matching import keys
from broker_api.matching.registry import Registry, RegistryLost, runtime_bucket

RT = {"python": "3.11.7", "dill": "0.4.1", "platform": "linux"}
BUCKET = runtime_bucket(RT)


@pytest.fixture
def registry(conn):
    conn.set(keys.EPOCH, "1")
    return Registry(conn, stale_after=30)


def announce(registry, uid, total, *, now=None):
    """Announce a peer and record its address as proven (the probes themselves are
    tested in test_probes.py)."""
    announced = registry.announce(uid, total=total, address=f"{uid}:1", pub_key="k", runtime=RT, now=now)
    if announced.probe:
        assert registry.probed(uid, announced.probe, keys.ProofState.PROVEN, now=now)[0]


def test_runtime_bucket_groups_by_minor_versions():
    assert runtime_bucket({"python": "3.11.7", "dill": "0.4.1"}) == runtime_bucket(
        {"python": "3.11.2", "dill": "0.4.0"}
    )
    assert runtime_bucket({"python": "3.12.0", "dill": "0.4.1"}) != BUCKET
    assert runtime_bucket({"python": "3.11.7", "dill": "0.3.9"}) != BUCKET


def test_reserve_is_idempotent_per_session(registry):
    announce(registry, "p1", 2)
    first = registry.reserve("s1", requester="r", buckets=[BUCKET], need=1, minimum=1)
    again = registry.reserve("s1", requester="r", buckets=[BUCKET], need=1, minimum=1)
    assert first == again == {"p1": 1}
    assert registry.peer("p1").held == 1


def test_all_or_nothing_until_minimum(registry):
    announce(registry, "p1", 1)
    assert registry.reserve("s1", requester="r", buckets=[BUCKET], need=2, minimum=2) == {}
    assert registry.peer("p1").held == 0
    assert registry.reserve("s1", requester="r", buckets=[BUCKET], need=2, minimum=1) == {"p1": 1}


def test_release_is_idempotent_and_never_negative(registry):
    announce(registry, "p1", 2)
    registry.reserve("s1", requester="r", buckets=[BUCKET], need=2, minimum=2)
    assert registry.release("s1")[0] == 2
    assert registry.release("s1")[0] == 0
    assert registry.peer("p1").held == 0 and registry.peer("p1").free == 2


def test_lowering_jobs_below_held_frees_nothing_twice(registry):
    announce(registry, "p1", 3)
    registry.reserve("s1", requester="r", buckets=[BUCKET], need=3, minimum=3)
    announce(registry, "p1", 1)  # the contributor now offers fewer slots
    assert registry.peer("p1").free == 0
    assert registry.reserve("s2", requester="r", buckets=[BUCKET], need=1, minimum=1) == {}
    registry.release("s1")
    assert registry.peer("p1").free == 1


def test_stale_peers_are_skipped_and_dropped_from_the_index(registry, conn):
    announce(registry, "old", 1, now=time.time() - 60)
    announce(registry, "new", 1)
    assert registry.reserve("s1", requester="r", buckets=[BUCKET], need=2, minimum=1) == {"new": 1}
    assert conn.zscore(keys.free(BUCKET), "old") is None
    announce(registry, "old", 1)
    assert registry.reserve("s2", requester="r", buckets=[BUCKET], need=1, minimum=1) == {"old": 1}


def test_scripts_refuse_to_write_without_epoch(registry, conn):
    conn.delete(keys.EPOCH)
    with pytest.raises(RegistryLost):
        announce(registry, "p1", 1)
    with pytest.raises(RegistryLost):
        registry.reserve("s1", requester="r", buckets=[BUCKET], need=1, minimum=1)
    with pytest.raises(RegistryLost):
        registry.release("s1")


def test_concurrent_reservations_never_oversubscribe(registry):
    for i in range(20):
        announce(registry, f"p{i}", 2)
    results: dict[str, dict[str, int]] = {}

    def grab(n):
        results[f"s{n}"] = registry.reserve(f"s{n}", requester="r", buckets=[BUCKET], need=3, minimum=1)

    threads = [threading.Thread(target=grab, args=(n,)) for n in range(30)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    given: dict[str, int] = {}
    for alloc in results.values():
        for uid, n in alloc.items():
            given[uid] = given.get(uid, 0) + n
    assert sum(given.values()) == 40
    assert all(n <= 2 for n in given.values())


def test_reservation_touches_about_as_many_peers_as_it_needs(registry, conn):
    """The cost of matching does not grow with the number of available peers."""
    pipe = conn.pipeline()
    now = time.time()
    for i in range(20000):
        pipe.hset(keys.peer(f"p{i}"), mapping={"total": 1, "held": 0, "bucket": BUCKET, "address": "a:1"})
        pipe.zadd(keys.free(BUCKET), {f"p{i}": 1})
        pipe.zadd(keys.HEARTBEATS, {f"p{i}": now})
    pipe.execute()
    conn.config_resetstat()
    alloc = registry.reserve("big", requester="r", buckets=[BUCKET], need=10, minimum=10)
    assert len(alloc) == 10
    stats = conn.info("commandstats")
    # ZSCORE is called once per candidate examined: 10, not 20,000.
    assert 10 <= stats["cmdstat_zscore"]["calls"] <= 64
