"""Failed-login throttling, shared by every API process through Redis.

Counts failures per email and per client address in a fixed window; past the limit a
login is refused with 429 before its password is even checked, which caps online
guessing at ``max_failures`` per window per account.
"""

from __future__ import annotations

import redis

from broker_api.exceptions import TooManyRequests


class LoginThrottle:
    def __init__(self, conn: redis.Redis, *, max_failures: int, window: int) -> None:
        self._conn = conn
        self._max = max_failures
        self._window = window
        self._count = conn.register_script(
            "for _, k in ipairs(KEYS) do"
            " if redis.call('INCR', k) == 1 then redis.call('EXPIRE', k, ARGV[1]) end"
            " end return 0"
        )

    @staticmethod
    def _keys(email: str, client: str) -> tuple[str, str]:
        return f"cb:login-fail:email:{email}", f"cb:login-fail:addr:{client}"

    def check(self, email: str, client: str) -> None:
        """Raise ``TooManyRequests`` if this email or address failed too often."""
        by_email, by_addr = self._keys(email, client)
        pipe = self._conn.pipeline(transaction=False)
        pipe.get(by_email).ttl(by_email).get(by_addr).ttl(by_addr)
        email_count, email_ttl, addr_count, addr_ttl = pipe.execute()
        if int(email_count or 0) >= self._max:
            raise TooManyRequests(
                "too many failed logins for this account; retry later", max(1, email_ttl or 1)
            )
        if int(addr_count or 0) >= 10 * self._max:
            raise TooManyRequests(
                "too many failed logins from this address; retry later", max(1, addr_ttl or 1)
            )

    def failed(self, email: str, client: str) -> None:
        # INCR then EXPIRE only on the first failure: a fixed window that later
        # failures do not extend (EXPIRE NX needs Redis 7; the bundled one is 6.2).
        self._count(args=[self._window], keys=list(self._keys(email, client)))

    def succeeded(self, email: str) -> None:
        self._conn.delete(self._keys(email, "")[0])
