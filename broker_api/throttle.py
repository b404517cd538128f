"""Password-guess throttling, shared by every API process through Redis.

Every password check (log-in, and ``currentPassword`` on ``PATCH /v1/users/me``) first
counts itself, atomically, per email and per client address in a fixed window, and
only then may hash: the count and the decision are one Lua script, so however many
guesses arrive at once, at most ``max_failures`` per email (ten times that per
address) are ever checked per window. A success clears the email's count and gives
its address back the one it took. Key log-ins never pass through here: a stranger's
wrong passwords cannot keep a host that logs in with its key offline.
"""

from __future__ import annotations

import redis

from broker_api.exceptions import TooManyRequests

# INCR then EXPIRE only on the first attempt: a fixed window that later attempts do
# not extend (EXPIRE NX needs Redis 7; the bundled one is 6.2). Returns 0 (go ahead),
# or 1 / 2 (email / address over its limit) with that key's remaining TTL.
_ATTEMPT = """
local limits = {tonumber(ARGV[2]), tonumber(ARGV[3])}
local counts = {}
for i, k in ipairs(KEYS) do
  counts[i] = redis.call('INCR', k)
  if counts[i] == 1 then redis.call('EXPIRE', k, ARGV[1]) end
end
for i, k in ipairs(KEYS) do
  if counts[i] > limits[i] then return {i, redis.call('TTL', k)} end
end
return {0, 0}
"""


class LoginThrottle:
    def __init__(self, conn: redis.Redis, *, max_failures: int, window: int) -> None:
        self._conn = conn
        self._max = max_failures
        self._window = window
        self._attempt = conn.register_script(_ATTEMPT)
        # DECR only a live key: on an expired one it would make a count with no TTL.
        self._refund = conn.register_script(
            "redis.call('DEL', KEYS[1])"
            " if redis.call('EXISTS', KEYS[2]) == 1 then redis.call('DECR', KEYS[2]) end return 0"
        )

    @staticmethod
    def _keys(email: str, client: str) -> tuple[str, str]:
        return f"cb:login-fail:email:{email}", f"cb:login-fail:addr:{client}"

    def attempt(self, email: str, client: str) -> None:
        """Count one password check for ``email`` from ``client``, before it runs.

        Raises:
            TooManyRequests: this email or address is over its limit in the window.
        """
        which, ttl = self._attempt(
            keys=list(self._keys(email, client)), args=[self._window, self._max, 10 * self._max]
        )
        if int(which) == 1:
            raise TooManyRequests("too many failed logins for this account; retry later", max(1, int(ttl)))
        if int(which) == 2:
            raise TooManyRequests("too many failed logins from this address; retry later", max(1, int(ttl)))

    def succeeded(self, email: str, client: str) -> None:
        """The password was right: clear the email's count, refund the address's."""
        self._refund(keys=list(self._keys(email, client)))
