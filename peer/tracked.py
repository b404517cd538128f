"""Tracked objects: send a shared object to the workers once, then only its changes.

A class built with the `Tracked` metaclass records, once an instance is shared, every
attribute assignment and deletion and every mutation of the list/dict/set values it
holds, as ordered plain-data operations. Three parties use this module:

* The requester (`Publisher`): ``share(obj)`` pickles the object once (a snapshot,
  version 0) and returns a `Handle` to pass to tasks; ``updates()`` turns the changes
  made since into numbered deltas, and every ``max_deltas`` deltas into a fresh
  snapshot instead, so what a late worker must replay stays bounded.
* The daemon (`SharedLog`): stores each object's latest snapshot and the deltas since,
  as the opaque buffers they arrived in (it never unpickles), refuses gaps, and says
  what a sandbox child that holds given versions is missing.
* The sandbox child (`apply_frame`, `_replica`): applies snapshots and deltas to its
  replicas in order; a `Handle` unpickled in a task's arguments becomes the replica.

Why operations rather than diffs: recording at the point of change is O(change), while
diffing an object against its last sent state is O(object) per task. Only exact
``list``, ``dict`` and ``set`` values stored in the instance ``__dict__`` are tracked
(nested ones too); they are copied into tracking subclasses on assignment, so keep
using ``obj.items`` rather than the list you assigned. Other values travel as they are
when the update is built: changing them in place (a numpy array, another object) is not
seen until the attribute is assigned again. Tasks should treat a replica as read-only:
what a task changes stays in that worker and may make later deltas fail to apply (the
worker is then replaced and starts again from a snapshot).

Mutating a shared object while another thread calls `Publisher.updates` is a race, as
is any unsynchronised sharing of mutable state; the pool calls ``updates()`` when it
submits tasks, from the submitting thread.
"""

from __future__ import annotations

import itertools
import struct
import threading
import weakref
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, SupportsIndex

from peer import codec, wire
from peer.errors import PeerError, ProtocolError
from peer.wire import Buffer, Kind

__all__ = [
    "Handle",
    "Publisher",
    "ReplicaError",
    "SharedLog",
    "Tracked",
    "TrackedDict",
    "TrackedList",
    "TrackedSet",
    "Update",
    "apply_frame",
    "update_frame",
    "update_from_frame",
]

UpdateKind = Literal["snapshot", "delta"]
Op = tuple[Any, ...]

DEFAULT_MAX_DELTAS = 256
# A fresh snapshot also replaces deltas once they add up to more bytes than it (and
# than this floor, so small objects are not re-sent on every other change).
_COMPACT_FLOOR = 1024 * 1024
_HEADER = struct.Struct("!QQ")  # obj_id, version
_OVERHEAD = 64  # bytes charged per stored update, so empty ones still count
_MISSING = object()

_OBJ_IDS = itertools.count(1)  # unique per requester process: a handle cannot name another pool's object
_LOG_TOKENS = itertools.count(1)


class ReplicaError(PeerError):
    """A task asked for a shared object this worker does not hold or could not load."""


# --- Recording on the requester ---------------------------------------------------


class _Recorder:
    """Collects the operations of one shared object for each publisher sharing it.

    ``depth`` is how many recorded operations are running: changes made while one
    runs (a property setter assigning other attributes) are its effects, and
    replaying the outer operation reproduces them, so they are not recorded again.
    """

    __slots__ = ("depth", "sinks")

    def __init__(self) -> None:
        self.sinks: list[_Shared] = []
        self.depth = 0

    def emit(self, op: Op) -> None:
        for sink in self.sinks:
            sink.ops.append(op)


# id(obj) -> recorder, only for shared objects: an unshared object pays one dict check.
# A publisher holds each shared object, so its id cannot be reused while registered.
_RECORDERS: dict[int, _Recorder] = {}


class _TrackedObject:
    """Base that `Tracked` adds to every tracked class; records attribute changes.

    Recording happens here, just above ``object``, so a class's own ``__setattr__``
    that ends in ``super().__setattr__`` is recorded at the level replay works at.
    `Tracked` appends this class last, so ``object`` always follows it in the MRO and
    is called directly (a ``super()`` call would cost a third of an assignment).
    """

    __slots__ = ()

    def __setattr__(self, name: str, value: Any) -> None:
        if type(value) in _CONTAINERS and _stored_in_dict(type(self), name):
            if _is_attribute(value, self, name):
                return  # ``obj.items += x`` stores the same list back: its change is recorded
            value = _adopt(value, self, name)
        recorder = _RECORDERS.get(id(self)) if _RECORDERS else None
        if recorder is None or recorder.depth:
            _object_setattr(self, name, value)
            return
        recorder.depth += 1
        try:
            _object_setattr(self, name, value)
        finally:
            recorder.depth -= 1
        recorder.emit(("setattr", name, _plain(value)))

    def __delattr__(self, name: str) -> None:
        recorder = _RECORDERS.get(id(self)) if _RECORDERS else None
        if recorder is None or recorder.depth:
            _object_delattr(self, name)
            return
        recorder.depth += 1
        try:
            _object_delattr(self, name)
        finally:
            recorder.depth -= 1
        recorder.emit(("delattr", name))


_object_setattr = object.__setattr__
_object_delattr = object.__delattr__


class Tracked(type):
    """Metaclass of classes whose instances can be shared with `Publisher.share`.

    Usage: ``class Model(metaclass=Tracked): ...``. It adds a base that records
    attribute assignment and deletion once an instance is shared; before that an
    assignment costs one extra dict lookup. A custom ``__setattr__`` must end in
    ``super().__setattr__`` (not ``object.__setattr__``) to be recorded. Changes that
    bypass ``__setattr__`` (``obj.__dict__[k] = v``) are not seen.
    """

    def __new__(
        mcls, name: str, bases: tuple[type, ...], namespace: dict[str, Any], **kwargs: Any
    ) -> Tracked:
        if not any(issubclass(base, _TrackedObject) for base in bases):
            bases = (*(base for base in bases if base is not object), _TrackedObject)
        return super().__new__(mcls, name, bases, namespace, **kwargs)


def _stored_in_dict(cls: type, name: str) -> bool:
    """Whether ``obj.name = v`` lands in the instance ``__dict__`` (no data descriptor).

    Properties and slots receive the value unchanged: wrapping it would change what
    a setter sees, and only ``__dict__`` entries can be found again to record paths.
    """
    for klass in cls.__mro__:
        attr = klass.__dict__.get(name, _MISSING)
        if attr is not _MISSING:
            kind = type(attr)
            return not (hasattr(kind, "__set__") or hasattr(kind, "__delete__"))
    return True


class TrackedList(list):  # type: ignore[type-arg]
    """A list that records its mutations when it belongs to a shared object.

    Slices, ``copy()``, ``+`` and pickling give plain lists, so replicas and results
    never carry tracking types.
    """

    __slots__ = ("_key", "_parent")

    def __init__(self, iterable: Iterable[Any] = (), /) -> None:
        self._parent: Any = None
        self._key: Any = None
        list.extend(self, iterable)
        _adopt_items(self)

    def __reduce_ex__(self, protocol: SupportsIndex) -> tuple[Any, ...]:
        return (list, (), None, iter(self))

    def __setitem__(self, index: Any, value: Any, /) -> None:
        where = _locate(self)
        if isinstance(index, slice):
            value = [_adopt(item, self, -1) if type(item) in _CONTAINERS else item for item in value]
        elif type(value) in _CONTAINERS:
            value = _adopt(value, self, index)
        list.__setitem__(self, index, value)
        if where:
            _emit(where, "__setitem__", (index, _plain(value)))

    def __delitem__(self, index: Any, /) -> None:
        where = _locate(self)
        list.__delitem__(self, index)
        if where:
            _emit(where, "__delitem__", (index,))

    def __iadd__(self, values: Iterable[Any], /) -> TrackedList:  # type: ignore[override,misc]
        self.extend(values)
        return self

    def __imul__(self, count: SupportsIndex, /) -> TrackedList:  # type: ignore[override,misc]
        where = _locate(self)
        list.__imul__(self, count)
        if where:
            _emit(where, "__imul__", (count,))
        return self

    def append(self, value: Any, /) -> None:
        where = _locate(self)
        if type(value) in _CONTAINERS:
            value = _adopt(value, self, len(self))
        list.append(self, value)
        if where:
            _emit(where, "append", (_plain(value),))

    def extend(self, values: Iterable[Any], /) -> None:
        where = _locate(self)
        start = len(self)
        items = list(values)
        for offset, item in enumerate(items):
            if type(item) in _CONTAINERS:
                items[offset] = _adopt(item, self, start + offset)
        list.extend(self, items)
        if where:
            _emit(where, "extend", (_plain_list(items),))

    def insert(self, index: SupportsIndex, value: Any, /) -> None:
        where = _locate(self)
        if type(value) in _CONTAINERS:
            value = _adopt(value, self, -1)
        list.insert(self, index, value)
        if where:
            _emit(where, "insert", (index, _plain(value)))

    def pop(self, index: SupportsIndex = -1, /) -> Any:
        where = _locate(self)
        value = list.pop(self, index)
        if where:
            _emit(where, "pop", (index,))
        _detach(value)
        return value

    def remove(self, value: Any, /) -> None:
        where = _locate(self)
        list.remove(self, value)
        if where:
            _emit(where, "remove", (_plain(value),))

    def clear(self) -> None:
        where = _locate(self)
        list.clear(self)
        if where:
            _emit(where, "clear", ())

    def reverse(self) -> None:
        where = _locate(self)
        list.reverse(self)
        if where:
            _emit(where, "reverse", ())

    def sort(self, *, key: Any = None, reverse: bool = False) -> None:
        """Sort in place; a key function is not data, so then the result is recorded."""
        where = _locate(self)
        list.sort(self, key=key, reverse=reverse)
        if where:
            if key is None:
                _emit(where, "sort", (bool(reverse),))
            else:
                _emit(where, "__setitem__", (slice(None), _plain_list(self)))


class TrackedDict(dict):  # type: ignore[type-arg]
    """A dict that records its mutations when it belongs to a shared object."""

    __slots__ = ("_key", "_parent")

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._parent: Any = None
        self._key: Any = None
        dict.update(self, *args, **kwargs)
        _adopt_items(self)

    def __reduce_ex__(self, protocol: SupportsIndex) -> tuple[Any, ...]:
        return (dict, (), None, None, iter(self.items()))

    def __setitem__(self, key: Any, value: Any, /) -> None:
        where = _locate(self)
        if type(value) in _CONTAINERS:
            value = _adopt(value, self, key)
        dict.__setitem__(self, key, value)
        if where:
            _emit(where, "__setitem__", (key, _plain(value)))

    def __delitem__(self, key: Any, /) -> None:
        where = _locate(self)
        dict.__delitem__(self, key)
        if where:
            _emit(where, "__delitem__", (key,))

    def __ior__(self, other: Any, /) -> TrackedDict:  # type: ignore[override,misc]
        self.update(other)
        return self

    def update(self, *args: Any, **kwargs: Any) -> None:
        where = _locate(self)
        items = dict(*args, **kwargs)
        for key, value in items.items():
            if type(value) in _CONTAINERS:
                items[key] = _adopt(value, self, key)
        dict.update(self, items)
        if where and items:
            _emit(where, "update", (_plain_dict(items),))

    def pop(self, key: Any, *default: Any) -> Any:
        where = _locate(self)
        present = key in self
        value = dict.pop(self, key, *default)
        if present:
            if where:
                _emit(where, "__delitem__", (key,))
            _detach(value)
        return value

    def popitem(self) -> tuple[Any, Any]:
        where = _locate(self)
        key, value = dict.popitem(self)
        if where:
            _emit(where, "__delitem__", (key,))
        _detach(value)
        return key, value

    def setdefault(self, key: Any, default: Any = None, /) -> Any:
        """Return the stored value, so ``d.setdefault(k, []).append(x)`` is recorded."""
        if key not in self:
            self[key] = default
        return dict.__getitem__(self, key)

    def clear(self) -> None:
        where = _locate(self)
        dict.clear(self)
        if where:
            _emit(where, "clear", ())


class TrackedSet(set):  # type: ignore[type-arg]
    """A set that records its mutations (only actual changes) when shared."""

    __slots__ = ("_key", "_parent")

    def __init__(self, iterable: Iterable[Any] = (), /) -> None:
        self._parent: Any = None
        self._key: Any = None
        set.update(self, iterable)

    def __reduce_ex__(self, protocol: SupportsIndex) -> tuple[Any, ...]:
        return (set, (list(self),))

    def __repr__(self) -> str:
        return repr(set(self)) if self else "set()"

    def add(self, value: Any, /) -> None:
        where = _locate(self)
        size = len(self)
        set.add(self, value)
        if where and len(self) != size:
            _emit(where, "add", (value,))

    def discard(self, value: Any, /) -> None:
        where = _locate(self)
        size = len(self)
        set.discard(self, value)
        if where and len(self) != size:
            _emit(where, "discard", (value,))

    def remove(self, value: Any, /) -> None:
        where = _locate(self)
        set.remove(self, value)
        if where:
            _emit(where, "discard", (value,))

    def pop(self) -> Any:
        where = _locate(self)
        value = set.pop(self)
        if where:
            _emit(where, "discard", (value,))
        return value

    def clear(self) -> None:
        where = _locate(self)
        set.clear(self)
        if where:
            _emit(where, "clear", ())

    def update(self, *others: Iterable[Any]) -> None:
        where = _locate(self)
        added = set().union(*others).difference(self)
        set.update(self, added)
        if where and added:
            _emit(where, "update", (added,))

    def difference_update(self, *others: Iterable[Any]) -> None:
        where = _locate(self)
        gone = set.intersection(self, set().union(*others))
        set.difference_update(self, gone)
        if where and gone:
            _emit(where, "difference_update", (gone,))

    def intersection_update(self, *others: Iterable[Any]) -> None:
        where = _locate(self)
        gone = set.difference(self, set.intersection(self, *others))
        set.difference_update(self, gone)
        if where and gone:
            _emit(where, "difference_update", (gone,))

    def symmetric_difference_update(self, other: Iterable[Any], /) -> None:
        where = _locate(self)
        flipped = set(other)
        set.symmetric_difference_update(self, flipped)
        if where and flipped:
            _emit(where, "symmetric_difference_update", (flipped,))

    def __ior__(self, other: Any, /) -> TrackedSet:  # type: ignore[override,misc]
        if not isinstance(other, (set, frozenset)):
            return NotImplemented
        self.update(other)
        return self

    def __iand__(self, other: Any, /) -> TrackedSet:  # type: ignore[override,misc]
        if not isinstance(other, (set, frozenset)):
            return NotImplemented
        self.intersection_update(other)
        return self

    def __isub__(self, other: Any, /) -> TrackedSet:  # type: ignore[override,misc]
        if not isinstance(other, (set, frozenset)):
            return NotImplemented
        self.difference_update(other)
        return self

    def __ixor__(self, other: Any, /) -> TrackedSet:  # type: ignore[override,misc]
        if not isinstance(other, (set, frozenset)):
            return NotImplemented
        self.symmetric_difference_update(other)
        return self


_CONTAINERS: frozenset[type] = frozenset({list, dict, set, TrackedList, TrackedDict, TrackedSet})
_TRACKED_CONTAINERS = (TrackedList, TrackedDict, TrackedSet)


def _adopt(value: Any, parent: Any, key: Any) -> Any:
    """Copy a list/dict/set into a tracking container placed at ``parent[key]``.

    Always a copy, even of a tracked container: a container has one place in one
    object, which is what lets a mutation find its path. ``key`` -1 in a list means
    "unknown": the position is then found by identity when first needed.
    """
    kind = type(value)
    if kind is list or kind is TrackedList:
        new: Any = TrackedList.__new__(TrackedList)
        list.extend(new, value)
    elif kind is dict or kind is TrackedDict:
        new = TrackedDict.__new__(TrackedDict)
        dict.update(new, value)
    else:
        new = TrackedSet.__new__(TrackedSet)
        set.update(new, value)
    new._parent = parent
    new._key = key
    _adopt_items(new)
    return new


def _adopt_items(container: TrackedList | TrackedDict) -> None:
    """Wrap the nested lists/dicts/sets of a new tracking container (sets hold none)."""
    if isinstance(container, TrackedList):
        if not _CONTAINERS.isdisjoint(map(type, container)):
            for index, item in enumerate(container):
                if type(item) in _CONTAINERS:
                    list.__setitem__(container, index, _adopt(item, container, index))
    elif isinstance(container, TrackedDict):
        if not _CONTAINERS.isdisjoint(map(type, container.values())):
            for key, item in container.items():
                if type(item) in _CONTAINERS:
                    dict.__setitem__(container, key, _adopt(item, container, key))


def _is_attribute(value: Any, obj: Any, name: str) -> bool:
    """Whether ``value`` is the tracked container already stored as ``obj.name``."""
    return (
        type(value) in _TRACKED_CONTAINERS
        and value._parent is obj
        and value._key == name
        and vars(obj).get(name) is value
    )


def _detach(value: Any) -> None:
    """Cut a container removed from its parent loose, so its later changes are not recorded."""
    if type(value) in _TRACKED_CONTAINERS:
        value._parent = None


def _plain(value: Any) -> Any:
    """A plain deep copy of tracked containers, for recording a value as it is now.

    Recorded values are pickled later, when ``updates()`` runs; without a copy a later
    change to the same container would be both inside the recorded value and
    recorded again, and applied twice. Other values are recorded as they are.
    """
    kind = type(value)
    if kind is TrackedList or kind is list:
        return _plain_list(value)
    if kind is TrackedDict or kind is dict:
        return _plain_dict(value)
    if kind is TrackedSet:
        return set(value)
    return value


def _plain_list(values: Sequence[Any]) -> list[Any]:
    if _CONTAINERS.isdisjoint(map(type, values)):
        return list(values)
    return [_plain(item) for item in values]


def _plain_dict(values: Mapping[Any, Any]) -> dict[Any, Any]:
    if _CONTAINERS.isdisjoint(map(type, values.values())):
        return dict(values)
    return {key: _plain(item) for key, item in values.items()}


def _locate(node: Any) -> tuple[_Recorder, tuple[Any, ...]] | None:
    """Return the recorder and path of a tracked container, or None if not recording.

    The cheap checks come first (anything shared at all? is the root shared?), so an
    unshared object's containers pay a short walk up their parents.
    """
    if not _RECORDERS:
        return None
    root = node
    while type(root) in _TRACKED_CONTAINERS:
        root = root._parent
        if root is None:
            return None
    recorder = _RECORDERS.get(id(root))
    if recorder is None or recorder.depth:
        return None
    path = _path(node)
    return None if path is None else (recorder, path)


def _path(node: Any) -> tuple[Any, ...] | None:
    """Attribute name then keys/indexes leading to ``node``; None once it was removed.

    Each step is checked by identity, because a container may have been removed or
    replaced (its parent link is then cleared, for good: re-inserting copies). List
    positions shift on insert/pop/sort, so a stale index is looked up again.
    """
    keys: list[Any] = []
    while True:
        parent, key = node._parent, node._key
        kind = type(parent)
        if kind is TrackedList:
            if not (0 <= key < len(parent) and list.__getitem__(parent, key) is node):
                for index, item in enumerate(parent):
                    if item is node:
                        key = node._key = index
                        break
                else:
                    node._parent = None
                    return None
        elif kind is TrackedDict:
            if dict.get(parent, key, _MISSING) is not node:
                node._parent = None
                return None
        elif parent is None:
            return None
        else:
            attrs = getattr(parent, "__dict__", None)
            if attrs is None or attrs.get(key) is not node:
                node._parent = None
                return None
            keys.append(key)
            keys.reverse()
            return tuple(keys)
        keys.append(key)
        node = parent


def _emit(where: tuple[_Recorder, tuple[Any, ...]], method: str, args: tuple[Any, ...]) -> None:
    recorder, path = where
    recorder.emit(("call", path, method, args))


def _track_plain_attributes(obj: Any) -> None:
    """Wrap list/dict/set attributes that bypassed ``__setattr__`` (e.g. unpickled ones)."""
    attrs = getattr(obj, "__dict__", None)
    if attrs is None:
        return
    for name, value in list(attrs.items()):
        if type(value) in _CONTAINERS and not _is_attribute(value, obj, name):
            attrs[name] = _adopt(value, obj, name)


# --- Updates and their wire form ----------------------------------------------------


@dataclass(frozen=True)
class Update:
    """One numbered change of one shared object, as opaque `codec.dumps_data` buffers.

    Attributes:
        obj_id: The object's id (see `Handle.obj_id`).
        version: 0 for the first snapshot, then one more for each later update; a
            snapshot may skip versions (it stands alone), a delta may not.
        kind: ``"snapshot"`` (the whole object) or ``"delta"`` (a list of operations
            to replay on the previous version).
        buffers: ``codec.dumps_data`` of the object or of the operations.
    """

    obj_id: int
    version: int
    kind: UpdateKind
    buffers: list[Buffer] = field(repr=False)

    @property
    def nbytes(self) -> int:
        return sum(memoryview(buf).nbytes for buf in self.buffers)


def update_frame(update: Update) -> tuple[Kind, list[Buffer]]:
    """Return the frame kind and payload parts carrying ``update``.

    Use as ``wire.write_frame(sock, *update_frame(update))``: SHARE for a snapshot,
    DELTA for a delta; the payload is ``pack_buffers([obj_id+version as !QQ, *buffers])``,
    so large out-of-band buffers are sent without a copy.
    """
    kind = Kind.SHARE if update.kind == "snapshot" else Kind.DELTA
    return kind, wire.pack_buffers([_HEADER.pack(update.obj_id, update.version), *update.buffers])


def update_from_frame(kind: Kind | int, payload: Buffer) -> Update:
    """Parse a SHARE/DELTA frame payload into an `Update` without unpickling anything.

    The buffers slice ``payload`` (no copies).

    Raises:
        ProtocolError: not a SHARE/DELTA frame, or a malformed payload.
    """
    if kind == Kind.SHARE:
        update_kind: UpdateKind = "snapshot"
    elif kind == Kind.DELTA:
        update_kind = "delta"
    else:
        raise ProtocolError(f"frame kind {kind!r} does not carry a shared-object update")
    parts = wire.unpack_buffers(payload)
    if len(parts) < 3 or parts[0].nbytes != _HEADER.size:
        raise ProtocolError("shared-object update needs a 16-byte header, a flag and a stream")
    if bytes(parts[1]) not in (codec.PICKLE, codec.DILL):
        raise ProtocolError(f"shared-object update has an unknown encoding flag {bytes(parts[1])!r}")
    obj_id, version = _HEADER.unpack(parts[0])
    return Update(obj_id, version, update_kind, list(parts[1:]))


# --- The daemon's log ----------------------------------------------------------------


@dataclass
class _ObjectLog:
    first_seq: int
    snapshot: Update
    snapshot_seq: int
    deltas: list[tuple[int, Update]]  # (log sequence number, update), versions consecutive
    nbytes: int

    @property
    def latest(self) -> int:
        return self.deltas[-1][1].version if self.deltas else self.snapshot.version


class SharedLog:
    """One session's shared objects on a daemon: latest snapshot and deltas since, per object.

    Stores the buffers as they arrived and never decodes them. Every accepted update
    gets the next log sequence number (`revision`); a daemon that notes ``revision``
    when a TASK frame arrives and passes it as ``Slot.run(..., upto=...)`` gives the
    task exactly the state it was submitted with, even if later deltas arrived while
    it waited. Thread-safe: a connection thread appends while slot threads read.

    Args:
        max_deltas: Deltas kept per object before a snapshot must come; the
            requester compacts sooner (`DEFAULT_MAX_DELTAS`), so more is a protocol
            violation that would otherwise grow the log without bound.
        max_bytes: Bound on all stored buffers; None for no bound.
    """

    def __init__(self, *, max_deltas: int = 4 * DEFAULT_MAX_DELTAS, max_bytes: int | None = 1024**3) -> None:
        self.token = next(_LOG_TOKENS)
        self.max_deltas = max_deltas
        self.max_bytes = max_bytes
        self._objects: dict[int, _ObjectLog] = {}
        self._revision = 0
        self._bytes = 0
        self._lock = threading.Lock()

    @property
    def revision(self) -> int:
        """Number of updates accepted so far; names a point in the update stream."""
        return self._revision

    @property
    def nbytes(self) -> int:
        """Bytes the log holds: its buffers plus a small charge per stored update."""
        with self._lock:
            return self._bytes

    def versions(self) -> dict[int, int]:
        """Latest version of every object in the log."""
        with self._lock:
            return {obj_id: log.latest for obj_id, log in self._objects.items()}

    def append(self, update: Update) -> int:
        """Accept the next update received from the requester; return the new revision.

        A snapshot must be newer than what the log holds (it then replaces the
        object's snapshot and deltas); a delta must be exactly one version after it.

        Raises:
            ProtocolError: bad fields, a delta for an unknown object, a gap or a
                repeat, too many deltas without a snapshot, or the byte bound.
        """
        if update.kind not in ("snapshot", "delta"):
            raise ProtocolError(f"unknown shared-object update kind {update.kind!r}")
        for name in ("obj_id", "version"):
            value = getattr(update, name)
            if type(value) is not int or value < 0:
                raise ProtocolError(f"shared-object update {name} must be a non-negative int")
        size = update.nbytes + _OVERHEAD
        with self._lock:
            log = self._objects.get(update.obj_id)
            freed = 0
            if update.kind == "snapshot":
                if log is not None and update.version <= log.latest:
                    raise ProtocolError(
                        f"snapshot version {update.version} of shared object {update.obj_id} "
                        f"is not newer than version {log.latest}"
                    )
                freed = log.nbytes if log is not None else 0
            elif log is None:
                raise ProtocolError(f"delta for shared object {update.obj_id}, which was never shared")
            elif update.version != log.latest + 1:
                raise ProtocolError(
                    f"delta version {update.version} of shared object {update.obj_id} "
                    f"does not follow version {log.latest}"
                )
            elif len(log.deltas) >= self.max_deltas:
                raise ProtocolError(
                    f"shared object {update.obj_id} has {len(log.deltas)} deltas without a snapshot"
                )
            if self.max_bytes is not None and self._bytes - freed + size > self.max_bytes:
                raise ProtocolError(f"shared objects would exceed {self.max_bytes} bytes")
            self._revision += 1
            seq = self._revision
            if update.kind == "snapshot":
                first = log.first_seq if log is not None else seq
                self._objects[update.obj_id] = _ObjectLog(first, update, seq, [], size)
            else:
                assert log is not None
                log.deltas.append((seq, update))
                log.nbytes += size
            self._bytes += size - freed
            return seq

    def needs(self, have: Mapping[int, int], *, upto: int | None = None) -> list[Update]:
        """Updates, in the order to apply them, that bring a holder of ``have`` up to date.

        Args:
            have: ``{obj_id: version}`` the receiver holds (a fresh child: ``{}``).
            upto: Only updates accepted at or before this `revision` (the state a
                task was submitted with); None for everything. If a snapshot that
                compacted the log came later, a receiver that is behind it gets that
                newer snapshot: the older versions no longer exist.
        """
        out: list[Update] = []
        with self._lock:
            limit = self._revision if upto is None else upto
            for obj_id, log in self._objects.items():
                if log.first_seq > limit:
                    continue  # shared after that point
                held = have.get(obj_id)
                if held is None or not log.snapshot.version <= held <= log.latest:
                    out.append(log.snapshot)
                    if log.snapshot_seq > limit:
                        continue
                    start = 0
                else:
                    start = held - log.snapshot.version
                for seq, delta in log.deltas[start:]:
                    if seq > limit:
                        break
                    out.append(delta)
        return out


# --- The requester's side -------------------------------------------------------------


class Handle:
    """Stands for a shared object in task arguments.

    Pickled, it is only ``(obj_id,)``; unpickled inside a worker it becomes that
    worker's current replica. On the requester, `value` is the object itself.
    """

    __slots__ = ("_value", "obj_id")

    def __init__(self, obj_id: int, value: Any = None) -> None:
        self.obj_id = obj_id
        self._value = value

    @property
    def value(self) -> Any:
        """The shared object itself (requester side)."""
        return self._value

    def __reduce__(self) -> tuple[Any, tuple[int]]:
        return (_replica, (self.obj_id,))

    def __copy__(self) -> Handle:
        return self

    def __deepcopy__(self, memo: dict[int, Any]) -> Handle:
        return self

    def __repr__(self) -> str:
        return f"Handle({self.obj_id}, {type(self._value).__name__})"


@dataclass
class _Shared:
    """A publisher's bookkeeping for one shared object."""

    obj: Any
    obj_id: int
    version: int = 0
    ops: list[Op] = field(default_factory=list)
    deltas: int = 0  # since the last snapshot
    delta_bytes: int = 0
    snapshot_bytes: int = 0
    stale: bool = False  # an update failed to encode: only a snapshot can follow


class Publisher:
    """The requester's side: shares tracked objects and turns their changes into updates.

    The pool sends every update from `updates` to every connected peer, before the
    tasks it submits next, in order; a peer that connects later first gets
    `backlog`. Both under the pool's lock, so no update is missed or sent twice.

    Args:
        max_deltas: Deltas after a snapshot before the next update is a fresh
            snapshot instead, which bounds what a new or replaced worker replays.
    """

    def __init__(self, *, max_deltas: int = DEFAULT_MAX_DELTAS) -> None:
        if max_deltas < 1:
            raise ValueError("max_deltas must be positive")
        self.max_deltas = max_deltas
        self._shared: dict[int, _Shared] = {}  # obj_id -> entry, in share order
        self._by_object: dict[int, Handle] = {}  # id(obj) -> handle
        self._queue: list[Update] = []  # built but not yet returned
        self._log = SharedLog(max_deltas=max_deltas, max_bytes=None)
        self._lock = threading.RLock()
        # A publisher dropped without close() must not leave its objects recording forever.
        weakref.finalize(self, _release, self._shared)

    def share(self, obj: Any) -> Handle:
        """Snapshot ``obj`` (version 0), start recording its changes, and return its handle.

        Sharing an object again returns the same handle. The snapshot is encoded now,
        so an object that cannot be pickled fails here rather than at submit time.
        List/dict/set attributes that did not pass ``__setattr__`` (an unpickled
        object's) are copied into tracking containers first.

        Raises:
            TypeError: ``obj`` is not an instance of a `Tracked` class.
        """
        if not isinstance(type(obj), Tracked):
            raise TypeError(
                f"only instances of classes with metaclass=Tracked can be shared, not {type(obj).__name__}"
            )
        with self._lock:
            handle = self._by_object.get(id(obj))
            if handle is not None:
                return handle
            _track_plain_attributes(obj)
            buffers = codec.dumps_data(obj)
            entry = _Shared(obj, next(_OBJ_IDS))
            snapshot = Update(entry.obj_id, 0, "snapshot", buffers)
            entry.snapshot_bytes = snapshot.nbytes
            recorder = _RECORDERS.setdefault(id(obj), _Recorder())
            recorder.sinks.append(entry)
            handle = Handle(entry.obj_id, obj)
            self._shared[entry.obj_id] = entry
            self._by_object[id(obj)] = handle
            self._queue.append(snapshot)
            return handle

    def updates(self) -> list[Update]:
        """Return, in order, every snapshot and delta not returned before.

        Changes since the last call become one delta per object (the next version),
        or a fresh snapshot when compaction is due.

        Raises:
            Exception: whatever pickling raised for a value that cannot be encoded;
                the other updates are kept for the next call, and that object's
                next update is a snapshot.
        """
        with self._lock:
            failure: BaseException | None = None
            for entry in self._shared.values():
                try:
                    update = self._next_update(entry)
                except Exception as exc:
                    entry.stale = True
                    failure = failure or exc
                    continue
                if update is not None:
                    self._queue.append(update)
            if failure is not None:
                raise failure
            out, self._queue = self._queue, []
            for update in out:
                self._log.append(update)
            return out

    def backlog(self) -> list[Update]:
        """What a newly connected peer needs: each object's latest snapshot and deltas since.

        Covers the updates already returned by `updates`, not those still to come.
        """
        with self._lock:
            return self._log.needs({})

    def unshare(self, handle: Handle) -> None:
        """Stop recording the object's changes; workers keep their replica until the session ends."""
        with self._lock:
            entry = self._shared.pop(handle.obj_id, None)
            if entry is None:
                return
            del self._by_object[id(entry.obj)]
            _release({entry.obj_id: entry})

    def close(self) -> None:
        """Unshare everything."""
        with self._lock:
            for entry in list(self._shared.values()):
                self.unshare(Handle(entry.obj_id))

    def _next_update(self, entry: _Shared) -> Update | None:
        """Encode the entry's pending operations as a delta, or a snapshot when due."""
        if not entry.ops and not entry.stale:
            return None
        ops, entry.ops = entry.ops, []
        compact = (
            entry.stale
            or entry.deltas >= self.max_deltas
            or entry.delta_bytes > max(entry.snapshot_bytes, _COMPACT_FLOOR)
        )
        if compact:
            update = Update(entry.obj_id, entry.version + 1, "snapshot", codec.dumps_data(entry.obj))
            entry.deltas = entry.delta_bytes = 0
            entry.snapshot_bytes = update.nbytes
            entry.stale = False
        else:
            update = Update(entry.obj_id, entry.version + 1, "delta", codec.dumps_data(ops))
            entry.deltas += 1
            entry.delta_bytes += update.nbytes
        entry.version = update.version
        return update


def _release(entries: Mapping[int, _Shared]) -> None:
    """Stop recording into ``entries`` (a publisher's, on unshare or when it is collected)."""
    for entry in list(entries.values()):
        recorder = _RECORDERS.get(id(entry.obj))
        if recorder is not None:
            recorder.sinks = [sink for sink in recorder.sinks if sink is not entry]
            if not recorder.sinks:
                del _RECORDERS[id(entry.obj)]


# --- The sandbox child's side ----------------------------------------------------------


@dataclass
class _Replica:
    version: int
    obj: Any = None
    error: str | None = None  # why the replica is unusable, until the next snapshot


_REPLICAS: dict[int, _Replica] = {}

# Methods a delta may call on a replica's containers: what the tracking types record.
_REPLAYABLE = frozenset(
    {
        "__setitem__",
        "__delitem__",
        "__imul__",
        "append",
        "extend",
        "insert",
        "pop",
        "remove",
        "clear",
        "reverse",
        "update",
        "add",
        "discard",
        "difference_update",
        "symmetric_difference_update",
    }
)


def apply_frame(kind: Kind, payload: Buffer) -> bool:
    """Apply a SHARE/DELTA frame to this process's replicas (inside the sandbox child).

    Never raises: a failure marks the replica unusable, with the reason, until the
    next snapshot, and tasks that use it fail with `ReplicaError`. Returns False on
    failure, so the child asks to be replaced (a fresh one starts from a snapshot).
    """
    try:
        update = update_from_frame(kind, payload)
    except ProtocolError:
        return False  # the parent sends only what it parsed the same way; nothing to mark
    try:
        _apply(update)
    except BaseException as exc:
        # The slot now believes we hold this version; keep it so the next delta counts.
        _REPLICAS[update.obj_id] = _Replica(update.version, None, f"{type(exc).__name__}: {exc}")
        return False
    return True


def _apply(update: Update) -> None:
    current = _REPLICAS.get(update.obj_id)
    if update.kind == "snapshot":
        obj = codec.loads_data(update.buffers, trusted=True)
        _REPLICAS[update.obj_id] = _Replica(update.version, obj)
        return
    if current is None:
        raise ReplicaError(f"delta {update.version} came before any snapshot")
    if current.error is not None:
        current.version = update.version  # stays unusable until a snapshot
        return
    if update.version != current.version + 1:
        raise ReplicaError(f"delta {update.version} does not follow version {current.version}")
    ops = codec.loads_data(update.buffers, trusted=True)
    current.version = update.version
    _replay(current.obj, ops)


def _replay(obj: Any, ops: Sequence[Op]) -> None:
    """Redo recorded operations on a replica, at the level they were recorded.

    Attributes are set with ``object.__setattr__``: the class's own ``__setattr__``
    already ran on the requester and its effects were recorded as operations too.
    """
    for op in ops:
        code = op[0]
        if code == "setattr":
            _object_setattr(obj, op[1], op[2])
        elif code == "delattr":
            _object_delattr(obj, op[1])
        elif code == "call":
            _, path, method, args = op
            target = vars(obj)[path[0]]
            for key in path[1:]:
                target = target[key]
            if method == "sort":
                target.sort(reverse=args[0])
            elif method in _REPLAYABLE:
                getattr(target, method)(*args)
            else:
                raise ReplicaError(f"unknown recorded method {method!r}")
        else:
            raise ReplicaError(f"unknown recorded operation {code!r}")


def _replica(obj_id: int) -> Any:
    """Return this worker's current replica of a shared object (what a `Handle` unpickles to).

    Raises:
        ReplicaError: the object was never sent here or could not be applied.
    """
    replica = _REPLICAS.get(obj_id)
    if replica is None:
        raise ReplicaError(
            f"shared object {obj_id} is not known here: share it with the pool that runs this task"
        )
    if replica.error is not None:
        raise ReplicaError(f"shared object {obj_id} could not be loaded in this worker: {replica.error}")
    return replica.obj
