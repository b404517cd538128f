"""The end-to-end demo (the README's first command): a real distributed workload.

It starts the whole stack on this machine on free ports — Redis (a local one unless
``REDIS_URL`` is set), the API under gunicorn and a matchmaker, all from the Procfile —
then two contributor peers with ``python -m peer init`` and ``python -m peer serve``,
and a requester that counts the primes below N with ``Pool.map`` over those peers
(mutual TLS, sandboxed slots). It checks the answer against a local computation,
prints each peer's share, and stops every process it started.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from peer.pool import Pool
from scripts.stack import LocalStack, Peer, init_account

PASSWORD = "demo password, not a secret"


def count_primes(lo: int, hi: int) -> int:
    """Primes in [lo, hi), by a segmented sieve: a few ms per 100,000 numbers."""
    if hi <= 2:
        return 0
    lo = max(lo, 2)
    limit = int(hi**0.5) + 1
    small = bytearray([1]) * (limit + 1)
    small[:2] = b"\x00\x00"
    for p in range(2, int(limit**0.5) + 1):
        if small[p]:
            small[p * p :: p] = bytearray(len(small[p * p :: p]))
    segment = bytearray([1]) * (hi - lo)
    for p in range(2, limit + 1):
        if small[p]:
            start = max(p * p, (lo + p - 1) // p * p)
            segment[start - lo :: p] = bytearray(len(segment[start - lo :: p]))
    return sum(segment)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scripts/demo", description=__doc__.splitlines()[0])
    parser.add_argument("--below", type=int, default=40_000_000, help="count primes below this")
    parser.add_argument("--chunk", type=int, default=1_000_000, help="numbers per task")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="compute-broker-demo-") as tmp:
        work = Path(tmp)
        with LocalStack(data_dir=work / "broker") as stack:
            print(f"broker API, matchmaker and Redis up at {stack.url}")
            peers: dict[str, Peer] = {}
            try:
                for name in ("alice", "bob"):
                    peer = Peer(stack.url, work, name, password=PASSWORD, email=f"{name}@example.org")
                    peers[name] = peer
                    print("  " + peer.init_output)
                for name, peer in peers.items():
                    peer.wait_for("serving")
                    print(f"  peer {name} serves 1 slot at {peer.address}")
                requester = work / "carol"
                print("  " + init_account(stack.url, requester, "carol@example.org", PASSWORD))

                ranges = [(lo, min(lo + args.chunk, args.below)) for lo in range(0, args.below, args.chunk)]
                print(f"carol counts the primes below {args.below:,} in {len(ranges)} ranges on 2 workers:")
                t0 = time.perf_counter()
                with Pool(2, home=requester, broker=stack.url) as pool:
                    starts, ends = zip(*ranges, strict=True)
                    counts = list(pool.map(count_primes, starts, ends, chunksize=1, progress=True))
                    shares = pool.shares
                remote = time.perf_counter() - t0
                t0 = time.perf_counter()
                local = sum(count_primes(lo, hi) for lo, hi in ranges)
                local_time = time.perf_counter() - t0
                total = sum(counts)
                by_address = {peer.address: name for name, peer in peers.items()}
                verdict = "OK" if local == total else "MISMATCH"
                print(f"primes below {args.below:,}: {total:,} in {remote:.2f} s (with matching, TLS set-up)")
                print(f"local check: {local:,} in {local_time:.2f} s -> {verdict}")
                for address, done in sorted(shares.items()):
                    print(f"  {by_address.get(address, address)} counted {done} of the {len(ranges)} ranges")
                if local != total:
                    return 1
            finally:
                for peer in peers.values():
                    peer.stop()
    print(f"everything stopped; demo took {time.perf_counter() - started:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
