"""Availability of peers in Redis, and atomic reservation of their slots.

Each operation is one Lua script, so it is atomic however many API processes and
matchmakers run: a slot is never given twice, and no read-then-write race exists.
Peers are indexed per runtime bucket in a sorted set of those with free slots, so a
reservation touches about as many entries as it needs slots, whether 100 or 100,000
peers are available. Stale peers are dropped from the index lazily when met and come
back with their next heartbeat. Only peers whose announced address and key are proven
(``matchmaker.probes``) are in the index at all, so proof costs a reservation nothing.

Every script refuses to write while the ``epoch`` marker is missing (Redis lost its
data); callers then run ``rebuild`` from the database and retry.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import redis

from broker_api.matching import keys


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
if redis.call('EXISTS', 'cb:epoch') == 0 then return {-1, 0, 0} end
local uid, total, bucket, subject = ARGV[1], tonumber(ARGV[2]), ARGV[6], ARGV[8]
local now = tonumber(ARGV[7])
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
-- A new address or key expires the proof of the old one: moving back later is
-- probed again (the old address may belong to someone else by then).
if redis.call('HGET', pkey, 'subject') ~= subject then redis.call('HDEL', pkey, 'proof') end
redis.call('HSET', pkey, 'total', total, 'address', ARGV[3], 'pubKey', ARGV[4],
           'runtime', ARGV[5], 'bucket', bucket, 'subject', subject)
local held = tonumber(redis.call('HGET', pkey, 'held') or '0')
if held == 0 then redis.call('HSET', pkey, 'held', 0) end
redis.call('ZADD', 'cb:hb', ARGV[7], uid)
redis.call('SADD', 'cb:buckets', bucket)
-- Only a peer whose address (and key) is proven is in the free index: a probe of
-- each new subject is asked for once; a lost probe (still "probing" after a minute)
-- or one the rate limits deferred is asked for again; a failed one only when the
-- host announces explicitly (ARGV[9]).
local proven = redis.call('HGET', pkey, 'proof') == subject
local probe = 0
if (not proven) and total > 0 then
  local state = redis.call('HGET', pkey, 'probeState')
  local at = tonumber(redis.call('HGET', pkey, 'probeAt') or '0')
  if redis.call('HGET', pkey, 'probe') ~= subject
     or (state == 'probing' and now - at > 60)
     or (state == 'limited' and now >= tonumber(redis.call('HGET', pkey, 'probeRetry') or '0'))
     or (state == 'failed' and ARGV[9] == '1') then
    probe = 1
    redis.call('HSET', pkey, 'probe', subject, 'probeState', 'probing', 'probeAt', now,
               'probeDetail', '')
    redis.call('SADD', 'cb:probing', uid)
  end
end
local fkey = 'cb:free:' .. bucket
local was = tonumber(redis.call('ZSCORE', fkey, uid) or '0')
local free = total - held
if free > 0 and proven then redis.call('ZADD', fkey, free, uid) else redis.call('ZREM', fkey, uid) end
local grew = 0
if proven and free > was then grew = 1 end
return {grew, redis.call('ZCARD', 'cb:pending'), probe}
"""

# A probe's outcome, recorded only if the peer still announces the subject probed.
_PROBED = """
local uid, subject, state = ARGV[1], ARGV[2], ARGV[3]
local pkey = 'cb:peer:' .. uid
if redis.call('HGET', pkey, 'subject') ~= subject or redis.call('HGET', pkey, 'probe') ~= subject then
  return {0, 0}
end
redis.call('HSET', pkey, 'probeState', state, 'probeAt', ARGV[4], 'probeDetail', ARGV[5],
           'probeRetry', ARGV[6])
redis.call('SREM', 'cb:probing', uid)
if state ~= 'proven' then return {1, 0} end
redis.call('HSET', pkey, 'proof', subject)
local total = tonumber(redis.call('HGET', pkey, 'total') or '0')
local held = tonumber(redis.call('HGET', pkey, 'held') or '0')
local bucket = redis.call('HGET', pkey, 'bucket')
if bucket and total - held > 0 then
  redis.call('ZADD', 'cb:free:' .. bucket, total - held, uid)
  return {1, redis.call('ZCARD', 'cb:pending')}
end
return {1, 0}
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
redis.call('SREM', 'cb:probing', ARGV[1])
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
    local proof = redis.call('HGET', pkey, 'proof')
    if bucket and proof and proof == redis.call('HGET', pkey, 'subject') and total - held > 0 then
      redis.call('ZADD', 'cb:free:' .. bucket, total - held, uid)
    end
  end
  redis.call('HDEL', akey, uid)
  freed = freed + n
end
return {freed, redis.call('ZCARD', 'cb:pending')}
"""


def proof_subject(address: str, pub_key: str) -> str:
    """What a probe proves: this key answers at this address. A new address or a new key
    is a new subject, and the old proof no longer counts."""
    return hashlib.sha256(f"{address}\n{pub_key}".encode()).hexdigest()[:32]


@dataclass(frozen=True)
class Announced:
    """What an announcement asks of the caller: a rematch (capacity grew while requests
    wait) and/or a probe of ``probe``, the subject the peer now announces."""

    rematch: bool
    probe: str | None


@dataclass(frozen=True)
class Proof:
    """Where a peer's address proof stands (``keys.ProofState``), as the host sees it."""

    state: str
    detail: str
    checked_at: float | None


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
    proof: Proof

    @property
    def free(self) -> int:
        return max(0, self.total - self.held)

    @property
    def proven(self) -> bool:
        return self.proof.state == keys.ProofState.PROVEN


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
        self._probed = conn.register_script(_PROBED)

    def announce(
        self,
        user_id: str,
        *,
        total: int,
        address: str,
        pub_key: str,
        runtime: Mapping[str, str],
        now: float | None = None,
        explicit: bool = False,
    ) -> Announced:
        """Record a peer's slots and heartbeat.

        The peer is matchable only once its address and key are proven (`probed`). The
        result asks for a probe once per new address or key (a heartbeat never asks
        again for the same one); ``explicit`` (the host announcing its slots, not a
        heartbeat) also asks again after a failed probe.
        """
        now = time.time() if now is None else now
        subject = proof_subject(address, pub_key)
        grew, pending, probe = self._announce(
            args=[
                user_id,
                total,
                address,
                pub_key,
                json.dumps(dict(runtime), sort_keys=True),
                runtime_bucket(runtime),
                repr(now),
                subject,
                "1" if explicit else "0",
            ]
        )
        if grew == -1:
            raise RegistryLost("registry epoch missing")
        return Announced(bool(grew) and pending > 0, subject if probe else None)

    def probed(
        self,
        user_id: str,
        subject: str,
        state: keys.ProofState,
        *,
        detail: str = "",
        retry_at: float = 0.0,
        now: float | None = None,
    ) -> tuple[bool, bool]:
        """Record a probe's outcome for ``subject``; a proven peer becomes matchable.

        Ignored when the peer has announced another address or key since (that one gets
        its own probe). Returns ``(recorded, whether a rematch is worth running)``.
        """
        now = time.time() if now is None else now
        recorded, pending = self._probed(
            args=[user_id, subject, state.value, repr(now), detail[:200], repr(retry_at)]
        )
        return bool(recorded), pending > 0

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

    def probing(self) -> dict[str, str]:
        """Peer id -> subject of every probe asked for and not yet recorded."""
        out = {}
        for uid in self.conn.smembers(keys.PROBING):
            subject = self.conn.hget(keys.peer(_s(uid)), "probe")
            if subject:
                out[_s(uid)] = _s(subject)
        return out

    def unproven(self, workers: Iterable[tuple[str, str, str]]) -> set[str]:
        """Which of ``(peer id, address, pubKey)`` the registry knows to announce an
        address or key not proven now (one round trip, whatever their number).

        A peer the registry holds no announcement of (Redis lost its data and the peer
        has not announced since) is not counted: it was proven when it was matched, and
        its next announcement, which comes with its next heartbeat, is probed again.
        """
        workers = list(workers)
        pipe = self.conn.pipeline(transaction=False)
        for user_id, _, _ in workers:
            pipe.hmget(keys.peer(user_id), ["subject", "proof"])
        rows = pipe.execute()
        out = set()
        for (user_id, address, pub_key), (subject, proof) in zip(workers, rows, strict=True):
            if subject is not None and (proof is None or _s(proof) != proof_subject(address, pub_key)):
                out.add(user_id)
        return out

    def buckets(self) -> list[str]:
        """Every runtime bucket that has peers (emptied buckets are removed)."""
        return sorted(_s(b) for b in self.conn.smembers(keys.BUCKETS))

    def peer(self, user_id: str) -> PeerInfo | None:
        """The registry's view of one peer, or None if it is not announced."""
        raw = {_s(k): _s(v) for k, v in self.conn.hgetall(keys.peer(user_id)).items()}
        if "total" not in raw:
            return None
        hb = self.conn.zscore(keys.HEARTBEATS, user_id)
        if raw.get("proof") and raw.get("proof") == raw.get("subject"):
            state = keys.ProofState.PROVEN.value
        elif raw.get("probe") == raw.get("subject") and raw.get("probeState"):
            state = raw["probeState"]
        else:
            state = keys.ProofState.UNPROVEN.value
        proof = Proof(
            state, raw.get("probeDetail", ""), float(raw["probeAt"]) if raw.get("probeAt") else None
        )
        return PeerInfo(
            user_id=user_id,
            total=int(raw["total"]),
            held=int(raw.get("held", 0)),
            address=raw.get("address", ""),
            pub_key=raw.get("pubKey", ""),
            runtime=json.loads(raw.get("runtime", "{}")),
            last_heartbeat=hb,
            proof=proof,
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
