"""Tracked objects: recorded on the requester, logged by the daemon, replayed in real sandbox children."""

from __future__ import annotations

import os
import pickle
import sys
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from peer import codec, tracked
from peer.errors import ProtocolError, TaskError
from peer.sandbox import Slot
from peer.tracked import (
    Handle,
    Publisher,
    SharedLog,
    Tracked,
    TrackedDict,
    TrackedList,
    TrackedSet,
    Update,
    update_frame,
    update_from_frame,
)

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="the sandbox uses Linux namespaces")


class Model(metaclass=Tracked):
    def __init__(self) -> None:
        self.counter = 0
        self.items: list[Any] = []
        self.table: dict[str, Any] = {}
        self.tags: set[Any] = set()


class Guarded(metaclass=Tracked):
    """A property setter and a custom __setattr__ whose effects must not be replayed twice."""

    def __init__(self) -> None:
        self.history: list[int] = []
        self.writes = 0

    @property
    def level(self) -> int:
        return self._level

    @level.setter
    def level(self, value: int) -> None:
        self._level = value
        self.history.append(value)

    def __setattr__(self, name: str, value: Any) -> None:
        super().__setattr__(name, value)
        if name != "writes":
            super().__setattr__("writes", self.__dict__.get("writes", 0) + 1)


class Unloadable(metaclass=Tracked):
    """Pickles fine on the requester, fails to load in the worker."""

    def __init__(self) -> None:
        self.value = 1

    def __setstate__(self, state: dict[str, Any]) -> None:
        raise RuntimeError("cannot be rebuilt here")


class Shared:
    """A requester's publisher wired to a daemon's log through encoded frames, as over the network."""

    def __init__(self, max_deltas: int = tracked.DEFAULT_MAX_DELTAS) -> None:
        self.publisher = Publisher(max_deltas=max_deltas)
        self.log = SharedLog()
        self.sent: list[Update] = []

    def share(self, obj: Any) -> Handle:
        return self.publisher.share(obj)

    def deliver(self) -> int:
        """Send pending updates like the pool would, before the next task; return the log revision."""
        for update in self.publisher.updates():
            kind, parts = update_frame(update)
            payload = bytearray(b"".join(parts))  # what the daemon reads off the socket
            self.log.append(update_from_frame(kind, payload))
            self.sent.append(update)
        return self.log.revision

    def run(self, slot: Slot, fn: Callable[..., Any], *args: Any, upto: int | None = None) -> Any:
        """Deliver pending changes, then run ``fn(*args)`` in ``slot`` the way the daemon does."""
        self.deliver()
        code = codec.dumps_code(fn)
        buffers = slot.run(
            codec.code_id(code), code, codec.dumps_data((args, {})), shared=self.log, upto=upto
        )
        return codec.loads_data(buffers, trusted=False)


def state(obj: Any) -> dict[str, Any]:
    """The replica's attributes, as plain data (runs in the worker)."""
    return dict(vars(obj))


def assert_replica_equal(shared: Shared, slot: Slot, handle: Handle) -> None:
    assert shared.run(slot, state, handle) == vars(handle.value)


@pytest.fixture
def slot(make_slot: Callable[..., Slot]) -> Slot:
    """A slot on its own uid: as root, a slot kills every process of its uid when it
    replaces a child, so tests running at the same time on index 0 would kill ours."""
    return make_slot(4)


@pytest.fixture
def shared() -> Iterator[Shared]:
    wired = Shared()
    yield wired
    wired.publisher.close()


def test_attribute_set_and_delete_are_replayed(slot: Slot, shared: Shared) -> None:
    model = Model()
    handle = shared.share(model)
    assert_replica_equal(shared, slot, handle)
    model.counter = 5
    model.name = "first"
    assert_replica_equal(shared, slot, handle)
    del model.name
    model.items = [1, 2]
    assert_replica_equal(shared, slot, handle)
    assert shared.run(slot, lambda m: hasattr(m, "name"), handle) is False


def test_list_mutations_are_replayed(slot: Slot, shared: Shared) -> None:
    model = Model()
    handle = shared.share(model)
    items = model.items
    steps: list[Callable[[], Any]] = [
        lambda: items.append(1),
        lambda: items.extend([2, 3, 4]),
        lambda: items.__setitem__(0, 10),
        lambda: items.__setitem__(slice(1, 3), ["a", "b", "c"]),
        lambda: items.pop(),
        lambda: items.pop(0),
        lambda: items.insert(1, "x"),
        lambda: items.remove("b"),
        lambda: items.__delitem__(-1),
        lambda: items.__iadd__([5, 3, 9]),
        lambda: items.reverse(),
        lambda: items.sort(key=str),
        lambda: items.__imul__(2),
        lambda: items.clear(),
        lambda: items.extend([3, 1, 2]),
        lambda: items.sort(reverse=True),
    ]
    for step in steps:
        step()
        assert_replica_equal(shared, slot, handle)
    assert model.items == [3, 2, 1]


def test_dict_mutations_are_replayed(slot: Slot, shared: Shared) -> None:
    model = Model()
    handle = shared.share(model)
    table = model.table
    steps: list[Callable[[], Any]] = [
        lambda: table.__setitem__("a", 1),
        lambda: table.update({"b": 2, "c": 3}, d=4),
        lambda: table.__delitem__("a"),
        lambda: table.pop("b"),
        lambda: table.pop("missing", None),
        lambda: table.setdefault("e", 5),
        lambda: table.setdefault("c", 99),
        lambda: table.popitem(),
        lambda: table.__ior__({"f": 6}),
        lambda: table.clear(),
        lambda: table.update(g=7),
    ]
    for step in steps:
        step()
        assert_replica_equal(shared, slot, handle)
    assert model.table == {"g": 7}


def test_set_mutations_are_replayed(slot: Slot, shared: Shared) -> None:
    model = Model()
    handle = shared.share(model)
    tags = model.tags
    steps: list[Callable[[], Any]] = [
        lambda: tags.add(1),
        lambda: tags.add(1),
        lambda: tags.update({2, 3}, [4]),
        lambda: tags.discard(2),
        lambda: tags.discard(42),
        lambda: tags.remove(3),
        lambda: tags.pop(),
        lambda: tags.__ior__({5, 6, 7}),
        lambda: tags.__iand__({5, 6, 8}),
        lambda: tags.__isub__({5}),
        lambda: tags.__ixor__({6, 9}),
        lambda: tags.difference_update([9]),
        lambda: tags.symmetric_difference_update([1, 2]),
        lambda: tags.clear(),
    ]
    for step in steps:
        step()
        assert_replica_equal(shared, slot, handle)


def test_nested_containers_are_tracked_by_path(slot: Slot, shared: Shared) -> None:
    model = Model()
    model.table = {"rows": [[1], [2]], "meta": {"seen": set()}}
    handle = shared.share(model)
    rows = model.table["rows"]
    assert type(rows) is TrackedList and type(model.table["meta"]["seen"]) is TrackedSet
    rows[1].append(3)
    model.table["meta"]["seen"].add("x")
    rows.insert(0, [0])  # shifts the inner lists: they are found again by identity
    rows[2].append(4)
    model.table.setdefault("new", []).append("kept")
    model.items.append({"deep": [[]]})
    model.items[0]["deep"][0].append(1)
    assert_replica_equal(shared, slot, handle)
    assert model.table["rows"] == [[0], [1], [2, 3, 4]]

    removed = rows.pop()
    replaced = model.table["meta"]
    model.table["meta"] = {"fresh": True}
    sent = len(shared.sent)
    shared.deliver()
    assert len(shared.sent) == sent + 1
    removed.append("gone")  # no longer part of the object: nothing is recorded
    replaced["seen"].add("gone")
    shared.deliver()
    assert len(shared.sent) == sent + 1
    assert shared.run(slot, state, handle) == vars(model)


def test_assigned_containers_are_copies_and_plain_when_pickled() -> None:
    model = Model()
    mine = [1, [2]]
    model.items = mine
    assert model.items == mine and model.items is not mine
    assert type(model.items[1]) is TrackedList
    assert type(pickle.loads(pickle.dumps(model.items))) is list
    assert type(pickle.loads(pickle.dumps(TrackedDict(a=[1])))["a"]) is list
    assert type(pickle.loads(pickle.dumps(TrackedSet({1})))) is set


def test_operations_are_plain_data_for_the_c_pickler() -> None:
    model = Model()
    publisher = Publisher()
    publisher.share(model)
    publisher.updates()
    model.counter += 1
    model.items.append([1, {"a": {2}}])
    model.table["k"] = (1, "two")
    (delta,) = publisher.updates()
    assert delta.kind == "delta" and bytes(delta.buffers[0]) == codec.PICKLE
    assert b"peer.tracked" not in bytes(delta.buffers[1])  # no tracking types inside
    publisher.close()


def test_augmented_assignment_records_only_the_change() -> None:
    model = Model()
    publisher = Publisher()
    publisher.share(model)
    publisher.updates()
    items, tags = model.items, model.tags
    model.items += [1, 2]
    model.tags |= {3}
    assert model.items is items and model.tags is tags
    (delta,) = publisher.updates()
    assert codec.loads_data(delta.buffers, trusted=True) == [
        ("call", ("items",), "extend", ([1, 2],)),
        ("call", ("tags",), "update", ({3},)),
    ]
    publisher.close()


def test_unshared_objects_record_nothing() -> None:
    model = Model()
    for i in range(1000):
        model.counter = i
        model.items.append(i)
        model.table[str(i)] = i
    assert id(model) not in tracked._RECORDERS
    assert tracked._locate(model.items) is None
    publisher = Publisher()
    publisher.share(model)
    assert [update.kind for update in publisher.updates()] == ["snapshot"]
    model.counter = -1
    assert [update.kind for update in publisher.updates()] == ["delta"]
    publisher.close()
    assert id(model) not in tracked._RECORDERS
    model.counter = -2
    assert publisher.updates() == []


def test_a_dropped_publisher_stops_recording() -> None:
    model = Model()
    Publisher().share(model)
    assert id(model) not in tracked._RECORDERS


def test_each_task_sees_the_state_it_was_submitted_with(slot: Slot, shared: Shared) -> None:
    model = Model()
    handle = shared.share(model)
    for i in range(1, 51):
        model.counter += 1
        model.items.append(i)
        assert shared.run(slot, lambda m: (m.counter, m.items[-1], len(m.items)), handle) == (i, i, i)


def test_queued_tasks_see_the_state_at_submission_not_later_deltas(slot: Slot, shared: Shared) -> None:
    model = Model()
    handle = shared.share(model)
    submitted = []
    for _ in range(50):  # every change reaches the daemon before any task runs
        model.counter += 1
        submitted.append(shared.deliver())
    seen = [shared.run(slot, lambda m: m.counter, handle, upto=revision) for revision in submitted]
    assert seen == list(range(1, 51))


def test_a_replaced_child_gets_snapshot_and_deltas(slot: Slot, shared: Shared) -> None:
    model = Model()
    handle = shared.share(model)
    model.counter = 1
    assert shared.run(slot, lambda m: m.counter, handle) == 1
    pid = slot.pid
    model.counter = 2
    model.items.append("a")
    with pytest.raises(TaskError, match="sandbox exited with status 3"):
        shared.run(slot, lambda m: os._exit(3), handle)
    model.items.append("b")
    shared.deliver()
    assert [update.kind for update in shared.log.needs({})] == ["snapshot", "delta", "delta", "delta"]
    assert shared.run(slot, state, handle) == vars(model)
    assert slot.pid != pid


def test_compaction_sends_a_snapshot_and_bounds_the_log(slot: Slot) -> None:
    shared = Shared(max_deltas=3)
    model = Model()
    handle = shared.share(model)
    assert shared.run(slot, lambda m: m.counter, handle) == 0
    for _ in range(3):
        model.counter += 1
        model.items.append(model.counter)
        shared.deliver()
    model.table["last"] = True
    shared.deliver()
    assert [(u.kind, u.version) for u in shared.sent] == [
        ("snapshot", 0),
        ("delta", 1),
        ("delta", 2),
        ("delta", 3),
        ("snapshot", 4),
    ]
    assert [(u.kind, u.version) for u in shared.log.needs({})] == [("snapshot", 4)]
    assert shared.log.needs({handle.obj_id: 2})[0].kind == "snapshot"  # behind the compaction
    assert shared.run(slot, state, handle) == vars(model)  # the child held version 0
    model.counter = 100
    assert shared.run(slot, state, handle) == vars(model)
    assert [u.kind for u in shared.publisher.backlog()] == ["snapshot", "delta"]
    shared.publisher.close()


def test_properties_and_custom_setattr_are_not_replayed_twice(slot: Slot, shared: Shared) -> None:
    guarded = Guarded()
    handle = shared.share(guarded)
    guarded.level = 3
    guarded.level = 4
    guarded.other = "x"
    # Each level assignment passes __setattr__ twice (level, then _level in the setter).
    assert vars(guarded) == {"history": [3, 4], "writes": 5, "_level": 4, "other": "x"}
    assert shared.run(slot, state, handle) == vars(guarded)


def test_a_local_class_travels_with_dill(slot: Slot, shared: Shared) -> None:
    class Local(metaclass=Tracked):
        def __init__(self) -> None:
            self.points: list[tuple[int, int]] = []

    local = Local()
    handle = shared.share(local)
    local.points.append((1, 2))
    assert shared.run(slot, lambda p: p.points, handle) == [(1, 2)]
    assert bytes(shared.sent[0].buffers[0]) == codec.DILL


def test_an_object_that_cannot_load_fails_tasks_that_use_it_clearly(slot: Slot, shared: Shared) -> None:
    handle = shared.share(Unloadable())
    with pytest.raises(TaskError, match="cannot be rebuilt here") as info:
        shared.run(slot, lambda u: u.value, handle)
    assert info.value.type_name == "peer.tracked.ReplicaError"
    assert shared.run(slot, lambda: "others still run") == "others still run"


def test_another_sessions_objects_are_not_visible(slot: Slot, shared: Shared) -> None:
    handle = shared.share(Model())
    assert shared.run(slot, lambda m: m.counter, handle) == 0
    pid = slot.pid
    other = Shared()
    with pytest.raises(TaskError, match="not known here") as info:
        other.run(slot, lambda m: m.counter, handle)
    assert info.value.type_name == "peer.tracked.ReplicaError"
    assert slot.pid != pid  # the child holding the first session's replica was replaced


def test_handle_is_small_and_local_value_is_the_object() -> None:
    model = Model()
    publisher = Publisher()
    handle = publisher.share(model)
    assert handle.value is model
    assert publisher.share(model) is handle
    assert handle.__reduce__() == (tracked._replica, (handle.obj_id,))
    assert len(pickle.dumps(handle)) < 100
    publisher.close()


def test_only_tracked_instances_can_be_shared() -> None:
    with pytest.raises(TypeError, match="metaclass=Tracked"):
        Publisher().share({"plain": "dict"})


def snapshot(obj_id: int, version: int) -> Update:
    return Update(obj_id, version, "snapshot", codec.dumps_data({"v": version}))


def delta(obj_id: int, version: int) -> Update:
    return Update(obj_id, version, "delta", codec.dumps_data([]))


def test_shared_log_refuses_gaps_and_disorder() -> None:
    log = SharedLog()
    with pytest.raises(ProtocolError, match="never shared"):
        log.append(delta(1, 1))
    log.append(snapshot(1, 0))
    log.append(delta(1, 1))
    with pytest.raises(ProtocolError, match="does not follow version 1"):
        log.append(delta(1, 3))
    with pytest.raises(ProtocolError, match="does not follow version 1"):
        log.append(delta(1, 1))
    with pytest.raises(ProtocolError, match="not newer"):
        log.append(snapshot(1, 1))
    with pytest.raises(ProtocolError, match="kind"):
        log.append(Update(1, 2, "patch", []))  # type: ignore[arg-type]
    with pytest.raises(ProtocolError, match="version"):
        log.append(Update(1, -1, "delta", []))
    log.append(delta(1, 2))
    log.append(snapshot(1, 5))  # a snapshot stands alone and may skip versions
    log.append(delta(1, 6))
    assert log.versions() == {1: 6}
    assert [(u.kind, u.version) for u in log.needs({})] == [("snapshot", 5), ("delta", 6)]
    assert [(u.kind, u.version) for u in log.needs({1: 5})] == [("delta", 6)]
    assert log.needs({1: 6}) == []


def test_shared_log_bounds_deltas_and_bytes() -> None:
    log = SharedLog(max_deltas=2, max_bytes=10_000)
    log.append(snapshot(1, 0))
    log.append(delta(1, 1))
    log.append(delta(1, 2))
    with pytest.raises(ProtocolError, match="without a snapshot"):
        log.append(delta(1, 3))
    with pytest.raises(ProtocolError, match="exceed"):
        log.append(Update(2, 0, "snapshot", codec.dumps_data(b"x" * 20_000)))
    log.append(snapshot(1, 3))  # replacing frees the old snapshot and deltas


def test_shared_log_upto_gives_the_state_at_a_revision() -> None:
    log = SharedLog()
    first = log.append(snapshot(1, 0))
    second = log.append(delta(1, 1))
    log.append(snapshot(2, 0))
    assert [(u.obj_id, u.version) for u in log.needs({}, upto=first)] == [(1, 0)]
    assert [(u.obj_id, u.version) for u in log.needs({}, upto=second)] == [(1, 0), (1, 1)]
    assert [(u.obj_id, u.version) for u in log.needs({1: 0})] == [(1, 1), (2, 0)]


def test_update_frames_round_trip_and_refuse_garbage() -> None:
    update = snapshot(7, 3)
    kind, parts = update_frame(update)
    back = update_from_frame(kind, b"".join(parts))
    assert (back.obj_id, back.version, back.kind) == (7, 3, "snapshot")
    assert [bytes(b) for b in back.buffers] == [bytes(b) for b in update.buffers]
    with pytest.raises(ProtocolError):
        update_from_frame(tracked.Kind.TASK, b"".join(parts))
    with pytest.raises(ProtocolError):
        update_from_frame(tracked.Kind.DELTA, b"garbage")
    with pytest.raises(ProtocolError, match="flag"):
        update_from_frame(tracked.Kind.DELTA, b"".join(tracked.wire.pack_buffers([b"\0" * 16, b"\x07", b""])))
