"""Availability of peers in Redis, and atomic reservation of their slots.

Each operation is one Lua script, so it is atomic however many API processes and
matchmakers run: a slot is never given twice, and no read-then-write race exists.
Peers are indexed per runtime bucket in a sorted set of those with free slots, so a
reservation touches about as many entries as it needs slots, whether 100 or 100,000
peers are available. Stale peers are dropped from the index lazily when met and come
back with their next heartbeat.

Every script refuses to write while the ``epoch`` marker is missing (Redis lost its
data); callers then run ``rebuild`` from the database and retry.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import redis

from matchmaker import keys


class MatchmakerError(Exception):
    """Base of the matchmaker's errors."""


class RegistryLost(MatchmakerError):
    """Redis lost the registry (no epoch marker): rebuild it from the database."""


def runtime_bucket(runtime: Mapping[str, str] | None) -> str:
    """Group runtimes that can run each other's serialized code.

    Serialized code does not cross Python minor versions, and dill's format may change
    between its minor versions; platform does not matter for bytecode, so it is not
    part of the bucket.
    """
    if not runtime:
        return "unknown"
    python = ".".join(str(runtime.get("python", "")).split(".")[:2])
    dill = ".".join(str(runtime.get("dill", "")).split(".")[:2])
    return f"py{python}-dill{dill}"


_ANNOUNCE = """
if redis.call('EXISTS', 'cb:epoch') == 0 then return {-1, 0} end
local uid, total, bucket = ARGV[1], tonumber(ARGV[2]), ARGV[6]
local pkey = 'cb:peer:' .. uid
local old = redis.call('HGET', pkey, 'bucket')
if old ~= bucket then
  -- cb:bucket-peers counts the peers in each bucket; an emptied bucket is forgotten.
  if old then
    redis.call('ZREM', 'cb:free:' .. old, uid)
    if redis.call('HINCRBY', 'cb:bucket-peers', old, -1) <= 0 then
      redis.call('HDEL', 'cb:bucket-peers', old)
      redis.call('SREM', 'cb:buckets', old)
    end
  end
  redis.call('HINCRBY', 'cb:bucket-peers', bucket, 1)
end
redis.call('HSET', pkey, 'total', total, 'address', ARGV[3], 'pubKey', ARGV[4],
           'runtime', ARGV[5], 'bucket', bucket)
local held = tonumber(redis.call('HGET', pkey, 'held') or '0')
if held == 0 then redis.call('HSET', pkey, 'held', 0) end
redis.call('ZADD', 'cb:hb', ARGV[7], uid)
redis.call('SADD', 'cb:buckets', bucket)
local fkey = 'cb:free:' .. bucket
local was = tonumber(redis.call('ZSCORE', fkey, uid) or '0')
local free = total - held
if free > 0 then redis.call('ZADD', fkey, free, uid) else redis.call('ZREM', fkey, uid) end
local grew = 0
if free > was then grew = 1 end
return {grew, redis.call('ZCARD', 'cb:pending')}
"""

_WITHDRAW = """
local pkey = 'cb:peer:' .. ARGV[1]
local bucket = redis.call('HGET', pkey, 'bucket')
if bucket then
  redis.call('ZREM', 'cb:free:' .. bucket, ARGV[1])
  if redis.call('HINCRBY', 'cb:bucket-peers', bucket, -1) <= 0 then
    redis.call('HDEL', 'cb:bucket-peers', bucket)
    redis.call('SREM', 'cb:buckets', bucket)
  end
end
redis.call('ZREM', 'cb:hb', ARGV[1])
redis.call('DEL', pkey)
return 1
"""

_RESERVE = """
if redis.call('EXISTS', 'cb:epoch') == 0 then return {-1} end
local akey = 'cb:alloc:' .. ARGV[1]
local existing = redis.call('HGETALL', akey)
if #existing > 0 then return {1, existing} end
local requester, stale_before = ARGV[2], tonumber(ARGV[3])
local need, min = tonumber(ARGV[4]), tonumber(ARGV[5])
local picks, stale, got, batch = {}, {}, 0, 64
for i = 6, #ARGV do
  local fkey = 'cb:free:' .. ARGV[i]
  local start = 0
  while got < need do
    local rows = redis.call('ZREVRANGE', fkey, start, start + batch - 1, 'WITHSCORES')
    if #rows == 0 then break end
    for j = 1, #rows, 2 do
      local uid, free = rows[j], tonumber(rows[j + 1])
      if uid ~= requester then
        local hb = redis.call('ZSCORE', 'cb:hb', uid)
        if (not hb) or tonumber(hb) < stale_before then
          stale[#stale + 1] = {fkey, uid}
        else
          picks[#picks + 1] = {uid, fkey, free, 1}
          got = got + 1
          if got >= need then break end
        end
      end
    end
    start = start + batch
  end
  if got >= need then break end
end
-- Short of distinct peers: take further slots of the peers already picked.
if got < need then
  for _, p in ipairs(picks) do
    local extra = math.min(p[3] - p[4], need - got)
    if extra > 0 then p[4] = p[4] + extra; got = got + extra end
    if got >= need then break end
  end
end
for _, s in ipairs(stale) do redis.call('ZREM', s[1], s[2]) end
if got < min or got == 0 then return {0} end
local out = {}
for _, p in ipairs(picks) do
  local pkey = 'cb:peer:' .. p[1]
  local held = redis.call('HINCRBY', pkey, 'held', p[4])
  local free = tonumber(redis.call('HGET', pkey, 'total') or '0') - held
  if free > 0 then redis.call('ZADD', p[2], free, p[1]) else redis.call('ZREM', p[2], p[1]) end
  redis.call('HSET', akey, p[1], p[4])
  out[#out + 1] = p[1]; out[#out + 1] = p[4]
end
return {1, out}
"""

_RELEASE = """
if redis.call('EXISTS', 'cb:epoch') == 0 then return {-1, 0} end
local akey = 'cb:alloc:' .. ARGV[1]
local fields
if ARGV[2] ~= '' then
  local n = redis.call('HGET', akey, ARGV[2])
  if not n then return {0, redis.call('ZCARD', 'cb:pending')} end
  fields = {ARGV[2], n}
else
  fields = redis.call('HGETALL', akey)
end
local freed = 0
for i = 1, #fields, 2 do
  local uid, n = fields[i], tonumber(fields[i + 1])
  local pkey = 'cb:peer:' .. uid
  if redis.call('EXISTS', pkey) == 1 then
    local held = redis.call('HINCRBY', pkey, 'held', -n)
    if held < 0 then redis.call('HSET', pkey, 'held', 0); held = 0 end
    local total = tonumber(redis.call('HGET', pkey, 'total') or '0')
    local bucket = redis.call('HGET', pkey, 'bucket')
    if bucket and total - held > 0 then
      redis.call('ZADD', 'cb:free:' .. bucket, total - held, uid)
    end
  end
  redis.call('HDEL', akey, uid)
  freed = freed + n
end
return {freed, redis.call('ZCARD', 'cb:pending')}
"""


@dataclass(frozen=True)
class PeerInfo:
    """What the registry knows of one peer."""

    user_id: str
    total: int
    held: int
    address: str
    pub_key: str
    runtime: dict[str, str]
    last_heartbeat: float | None

    @property
    def free(self) -> int:
        return max(0, self.total - self.held)


def _s(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


class Registry:
    """Peers' availability and slot reservations, kept in Redis.

    Args:
        conn: a redis-py client (raw bytes responses, as rq requires).
        stale_after: seconds without a heartbeat after which a peer is not matched.
    """

    def __init__(self, conn: redis.Redis, *, stale_after: float) -> None:
        self.conn = conn
        self.stale_after = stale_after
        self._announce = conn.register_script(_ANNOUNCE)
        self._withdraw = conn.register_script(_WITHDRAW)
        self._reserve = conn.register_script(_RESERVE)
        self._release = conn.register_script(_RELEASE)

    def announce(
        self,
        user_id: str,
        *,
        total: int,
        address: str,
        pub_key: str,
        runtime: Mapping[str, str],
        now: float | None = None,
    ) -> bool:
        """Record a peer's slots and heartbeat. Returns True when capacity grew while
        requests are pending, i.e. when a rematch is worth running."""
        now = time.time() if now is None else now
        grew, pending = self._announce(
            args=[
                user_id,
                total,
                address,
                pub_key,
                json.dumps(dict(runtime), sort_keys=True),
                runtime_bucket(runtime),
                repr(now),
            ]
        )
        if grew == -1:
            raise RegistryLost("registry epoch missing")
        return bool(grew) and pending > 0

    def withdraw(self, user_id: str) -> None:
        """Forget a peer entirely (account deleted)."""
        self._withdraw(args=[user_id])

    def reserve(
        self,
        session_id: str,
        *,
        requester: str,
        buckets: Iterable[str],
        need: int,
        minimum: int,
        now: float | None = None,
    ) -> dict[str, int]:
        """Reserve ``need`` slots (at least ``minimum``) for a session, atomically.

        Spreads over as many distinct fresh peers as possible, never the requester.
        Returns peer id -> slots, or ``{}`` when fewer than ``minimum`` are free. A
        session that already holds a reservation gets the same one back, so a retried
        or duplicated job never reserves twice.
        """
        now = time.time() if now is None else now
        result = self._reserve(
            args=[session_id, requester, repr(now - self.stale_after), need, minimum, *buckets]
        )
        if result[0] == -1:
            raise RegistryLost("registry epoch missing")
        if result[0] == 0:
            return {}
        flat = result[1]
        return {_s(flat[i]): int(flat[i + 1]) for i in range(0, len(flat), 2)}

    def release(self, session_id: str, user_id: str | None = None) -> tuple[int, bool]:
        """Give back a session's slots (or one member's). Idempotent.

        Returns ``(slots freed, whether requests are pending)``.
        """
        freed, pending = self._release(args=[session_id, user_id or ""])
        if freed == -1:
            raise RegistryLost("registry epoch missing")
        return int(freed), pending > 0

    def buckets(self) -> list[str]:
        """Every runtime bucket that has peers (emptied buckets are removed)."""
        return sorted(_s(b) for b in self.conn.smembers(keys.BUCKETS))

    def peer(self, user_id: str) -> PeerInfo | None:
        """The registry's view of one peer, or None if it is not announced."""
        raw = {_s(k): _s(v) for k, v in self.conn.hgetall(keys.peer(user_id)).items()}
        if "total" not in raw:
            return None
        hb = self.conn.zscore(keys.HEARTBEATS, user_id)
        return PeerInfo(
            user_id=user_id,
            total=int(raw["total"]),
            held=int(raw.get("held", 0)),
            address=raw.get("address", ""),
            pub_key=raw.get("pubKey", ""),
            runtime=json.loads(raw.get("runtime", "{}")),
            last_heartbeat=hb,
        )

    def allocation(self, session_id: str) -> dict[str, int]:
        """Peer id -> slots currently reserved for a session."""
        raw = self.conn.hgetall(keys.alloc(session_id))
        return {_s(k): int(v) for k, v in raw.items()}

    # -- pending requests -------------------------------------------------------

    def pend(self, session_id: str, created_at: float) -> bool:
        """Mark a session as waiting for peers; True the first time."""
        return bool(self.conn.zadd(keys.PENDING, {session_id: created_at}, nx=True))

    def unpend(self, session_id: str) -> None:
        self.conn.zrem(keys.PENDING, session_id)

    def pending(self) -> list[str]:
        """Pending session ids, oldest first."""
        return [_s(s) for s in self.conn.zrange(keys.PENDING, 0, -1)]

    # -- recovery ----------------------------------------------------------------

    def has_epoch(self) -> bool:
        return bool(self.conn.exists(keys.EPOCH))

    def restore(self, allocations: Mapping[str, Mapping[str, int]]) -> None:
        """Write reservations recovered from the database, then mark the registry
        complete (pending requests come back as their requeued jobs run). Peers' slots and
        addresses come back with their next heartbeat; their held counts are restored here
        so nothing is given twice.
        """
        held: dict[str, int] = {}
        pipe = self.conn.pipeline(transaction=True)
        for session_id, members in allocations.items():
            pipe.delete(keys.alloc(session_id))
            if members:
                pipe.hset(keys.alloc(session_id), mapping=dict(members))
            for user_id, slots in members.items():
                held[user_id] = held.get(user_id, 0) + slots
        for user_id, slots in held.items():
            pipe.hset(keys.peer(user_id), "held", slots)
        pipe.set(keys.EPOCH, repr(time.time()))
        pipe.execute()

    def acquire_rebuild_lock(self, ttl: int = 60) -> bool:
        return bool(self.conn.set(keys.REBUILD_LOCK, "1", nx=True, ex=ttl))

    def release_rebuild_lock(self) -> None:
        self.conn.delete(keys.REBUILD_LOCK)
