"""Address probes: an address is offered to requesters only once it is proven.

A peer's announced ``host:port`` is only a claim. Before the registry lets the peer be
matched, the ``probe_address`` job (in an rq worker, never in an API request thread)
connects there and asks the host to sign a fresh challenge with the account's
registered key (the exchange is ``peer.probe``'s). Otherwise any account could make
every requester connect to a machine it does not control: the broker would be a
reflector.

The probe itself must not be a weapon either:

- one probe per new address or key (the registry asks for it once per subject);
- rate limits per account, per target ``ip:port`` and per IP (all its ports), counted
  together in one Lua script, so concurrent jobs cannot slip past them;
- names are resolved once, the resolved IP is checked, and the connection goes to that
  IP: a DNS answer that changes between check and connect cannot redirect it;
- loopback, private, link-local, shared and reserved IPs only when the operator allows
  them (``PROBE_PRIVATE_ADDRESSES``), as a local stack does;
- a bounded name look-up, then one deadline (``PROBE_TIMEOUT``, 2 s) for the whole
  exchange, and at most 528 bytes read from the target.
"""

from __future__ import annotations

import concurrent.futures
import ipaddress
import logging
import secrets
import socket
import threading
import time
from dataclasses import dataclass

import redis
from rq import get_current_job

from broker_api.challenges import verify
from broker_api.matching import keys
from broker_api.matching.keys import ProofState
from broker_api.matching.queue import match_queue, request_rematch
from broker_api.matching.registry import MatchmakerError, Registry, proof_subject
from matchmaker import jobs
from matchmaker.settings import Settings
from peer import probe, wire
from peer.errors import PeerError

log = logging.getLogger(__name__)

# Counts a probe against every limit (account, ip:port, ip), or none: {0, 0} when
# counted, else {1, seconds until the exceeded limit's window ends}. ARGV: the limits
# in the order of KEYS, then the window.
_COUNT = """
for i, k in ipairs(KEYS) do
  if tonumber(redis.call('GET', k) or '0') >= tonumber(ARGV[i]) then
    return {1, redis.call('TTL', k)}
  end
end
for _, k in ipairs(KEYS) do
  if redis.call('INCR', k) == 1 then redis.call('EXPIRE', k, ARGV[#KEYS + 1]) end
end
return {0, 0}
"""


#: Threads for name look-ups (see `resolve`); a stuck look-up holds one, never the job.
_RESOLVER = concurrent.futures.ThreadPoolExecutor(max_workers=4, thread_name_prefix="probe-dns")


class ProbeRefused(MatchmakerError):
    """The address may not be probed (not resolvable, or a range the operator forbids)."""


@dataclass(frozen=True)
class Outcome:
    """A probe's result: the proof state, why, and when a deferred probe may run."""

    state: ProofState
    detail: str = ""
    retry_at: float = 0.0


def split_address(address: str) -> tuple[str, int]:
    """``host:port`` (``[v6]:port`` too) as host and port."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise ProbeRefused(f"{address!r} is not host:port")
    return host.strip("[]"), int(port)


def check_ip(ip: ipaddress.IPv4Address | ipaddress.IPv6Address, *, private_ok: bool) -> None:
    """Refuse IPs the broker must not connect to.

    An IPv6 address that embeds an IPv4 one (mapped, 6to4, Teredo) is judged by the
    IPv4 address it reaches.
    """
    if isinstance(ip, ipaddress.IPv6Address):
        embedded = ip.ipv4_mapped or ip.sixtofour or (ip.teredo[1] if ip.teredo else None)
        if embedded is not None:
            check_ip(embedded, private_ok=private_ok)
    if ip.is_multicast or ip.is_unspecified:
        raise ProbeRefused(f"{ip} is not a unicast address")
    if not ip.is_global and not private_ok:
        raise ProbeRefused(
            f"{ip} is a loopback, private, link-local or reserved address; this broker probes"
            " public addresses only (PROBE_PRIVATE_ADDRESSES)"
        )


def resolve(
    address: str, *, private_ok: bool, timeout: float = 2.0
) -> tuple[socket.AddressFamily, tuple[str, int]]:
    """Resolve ``address`` once and check the IP that will be connected to.

    ``getaddrinfo`` has no timeout of its own, and an account picks the name (and so the
    name server): the look-up runs on a small pool of threads and is given up after
    ``timeout`` seconds, so a slow resolver cannot hold the prober.

    Returns the family and socket address to connect to: the caller connects to this
    checked IP, never to the name again.
    """
    host, port = split_address(address)
    if not 1 <= port <= 65535:
        raise ProbeRefused(f"port {port} is out of range")
    lookup = _RESOLVER.submit(
        socket.getaddrinfo, host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP
    )
    try:
        infos = lookup.result(timeout)
    except concurrent.futures.TimeoutError:
        lookup.cancel()
        raise ProbeRefused(f"resolving {host!r} took longer than {timeout:g} s") from None
    except (socket.gaierror, UnicodeError) as exc:
        raise ProbeRefused(f"cannot resolve {host!r}: {exc}") from None
    if not infos:
        raise ProbeRefused(f"cannot resolve {host!r}")
    family, _, _, _, sockaddr = infos[0]
    ip = ipaddress.ip_address(str(sockaddr[0]).split("%", 1)[0])
    check_ip(ip, private_ok=private_ok)
    return family, (str(ip), port)


class Prober:
    """Probe addresses for the registry, within the operator's limits.

    Args:
        conn: Redis holding the rate-limit counters.
        settings: the matchmaker's settings (timeout, limits, private ranges).
    """

    def __init__(self, conn: redis.Redis, settings: Settings) -> None:
        self._settings = settings
        self._count = conn.register_script(_COUNT)

    def probe(self, user_id: str, address: str, pub_key: str) -> Outcome:
        """Prove (or not) that the holder of ``pub_key`` answers at ``address``."""
        s = self._settings
        try:
            family, target = resolve(address, private_ok=s.probe_private, timeout=s.probe_timeout)
        except ProbeRefused as exc:
            return Outcome(ProofState.FAILED, str(exc))
        ip, port = target
        limited, ttl = self._count(
            keys=[
                keys.probe_rate_account(user_id),
                keys.probe_rate_target(f"{ip}:{port}"),
                keys.probe_rate_ip(ip),
            ],
            args=[s.probes_per_account, s.probes_per_target, s.probes_per_ip, s.probe_window],
        )
        if int(limited):
            wait = max(1, int(ttl))
            return Outcome(
                ProofState.LIMITED, f"probe rate limit reached; next try in {wait} s", time.time() + wait
            )
        challenge = secrets.token_urlsafe(32)
        try:
            signature = self._exchange(family, target, challenge, address)
        except (OSError, PeerError) as exc:
            return Outcome(ProofState.FAILED, f"no probe answer from {ip}:{port}: {exc}")
        if not verify(pub_key, signature, probe.message(challenge, address)):
            return Outcome(ProofState.FAILED, f"the host at {address} did not sign with the registered key")
        return Outcome(ProofState.PROVEN)

    def _exchange(
        self, family: socket.AddressFamily, target: tuple[str, int], challenge: str, address: str
    ) -> str:
        """Connect to the checked IP and ask; one deadline for all of it."""
        sock = socket.socket(family, socket.SOCK_STREAM)
        timeout = self._settings.probe_timeout
        # A host trickling its answer a byte at a time must not stretch the probe past
        # its deadline: the timer closes the socket under the blocked read.
        deadline = threading.Timer(timeout, wire.close_quietly, args=(sock,))
        deadline.start()
        try:
            sock.settimeout(timeout)
            sock.connect(target)
            return probe.ask(sock, challenge, address)
        finally:
            deadline.cancel()
            wire.close_quietly(sock)


def probe_address(user_id: str, subject: str) -> str:
    """rq job: probe the address and key a peer announces, if it still announces them
    (``subject``), and record the outcome; returns the proof state."""
    job = get_current_job()
    if job is None:
        raise RuntimeError("matchmaker jobs run inside an rq worker")
    settings = jobs.settings()
    registry = Registry(job.connection, stale_after=settings.stale_after)
    info = registry.peer(user_id)
    if (
        info is None
        or proof_subject(info.address, info.pub_key) != subject
        or info.proof.state != ProofState.PROBING
    ):
        return "stale"  # another address or key since, or this probe was already made
    outcome = Prober(job.connection, settings).probe(user_id, info.address, info.pub_key)
    recorded, rematch = registry.probed(
        user_id, subject, outcome.state, detail=outcome.detail, retry_at=outcome.retry_at
    )
    log.info("probe of %s for %s: %s %s", info.address, user_id, outcome.state.value, outcome.detail)
    if recorded and rematch:
        request_rematch(match_queue(job.connection))
    return outcome.state.value if recorded else "stale"
