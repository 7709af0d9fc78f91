"""The server's own bounds, with their overrides from the environment."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, fields

from accman import limits as L
from accman.errors import LimitsError

# The ACCMAN_* variables that other parts read: the client commands of
# `accman` (URL, TOKEN), the calling side's example apps (MODE,
# ON_UNAVAILABLE, HOLD_TTL_S), the build (ONLY, DEBUG), the tests and the
# benchmarks.  A server says nothing of these; of any other ACCMAN_* name
# that is not its own, it says that it ignores it (a misspelt override,
# or a bound that is not overridable, would otherwise pass unseen).
OTHER_NAMES = frozenset({
    "ACCMAN_URL", "ACCMAN_TOKEN", "ACCMAN_MODE", "ACCMAN_ON_UNAVAILABLE", "ACCMAN_HOLD_TTL_S",
    "ACCMAN_ONLY", "ACCMAN_DEBUG", "ACCMAN_BIN", "ACCMAN_TEST_STORES", "ACCMAN_CRASH_LONG",
    "ACCMAN_CRASH_SEED", "ACCMAN_CRASH_SECONDS", "ACCMAN_PG_LONG", "ACCMAN_BENCH_ACCOUNTS",
    "ACCMAN_CALLING_SERVER", "ACCMAN_TEST_PG_DIR"})


# An override is plain ASCII decimal: Python's int() and float() also take
# "inf", "1e400" (infinite), "1_0" and " 5", and an infinite timeout never
# fires (a webhook's linger of inf stopped its delivery without a word).
_COUNT_RE = re.compile(r"[1-9][0-9]{0,9}")
_SECONDS_RE = re.compile(r"(?:0|[1-9][0-9]{0,9})(?:\.[0-9]{0,9})?|\.[0-9]{1,9}")
# Beyond these an override is a typo: it would overflow the native parts'
# C integers or the event loop's timers, or (under a millisecond) make the
# server's sweep of deadlines spin.
COUNT_OVERRIDE_MAX = 2 ** 31 - 1
SECONDS_OVERRIDE_MIN = 0.001
SECONDS_OVERRIDE_MAX = 7 * 24 * 3600.0


def _override(name: str, raw: str, count: bool):
    """`raw` as the value of setting `name`: a whole number for a count, a
    number of seconds (a fraction allowed) otherwise."""
    if count:
        if _COUNT_RE.fullmatch(raw) is None or int(raw) > COUNT_OVERRIDE_MAX:
            raise LimitsError(f"{name}={raw[:40]!r}: must be a whole number from 1 to "
                              f"{COUNT_OVERRIDE_MAX}, in plain digits without leading zeros")
        return int(raw)
    value = float(raw) if _SECONDS_RE.fullmatch(raw) else 0.0
    if not SECONDS_OVERRIDE_MIN <= value <= SECONDS_OVERRIDE_MAX:
        raise LimitsError(f"{name}={raw[:40]!r}: must be a number of seconds from "
                          f"{SECONDS_OVERRIDE_MIN} to {SECONDS_OVERRIDE_MAX:.0f}, in plain "
                          "digits without leading zeros (a fraction allowed)")
    return value


def _named(field: str) -> str:
    """A setting as a message names it: its field and its variable."""
    return f"{field} (ACCMAN_{field.upper()})"


def _check_value(field: str, value, count: bool) -> None:
    """A value given in code holds to an override's range (_override)."""
    if count:
        if type(value) is not int or not 1 <= value <= COUNT_OVERRIDE_MAX:
            raise LimitsError(f"{_named(field)}={value!r:.40}: must be a whole number (int) "
                              f"from 1 to {COUNT_OVERRIDE_MAX}")
    elif (type(value) not in (int, float)
          or not SECONDS_OVERRIDE_MIN <= value <= SECONDS_OVERRIDE_MAX):
        raise LimitsError(f"{_named(field)}={value!r:.40}: must be a number of seconds from "
                          f"{SECONDS_OVERRIDE_MIN} to {SECONDS_OVERRIDE_MAX:.0f}")


@dataclass(frozen=True)
class ServerLimits:
    """Defaults come from accman/limits.py; each can be overridden by an
    environment variable ACCMAN_<FIELD NAME IN CAPITALS>
    (ACCMAN_HEAD_TIMEOUT_S=0.5, ...) so that tests driving the server as a
    subprocess can reach every limit quickly, and an operator can tune one.
    The parser's limits (request line, headers, body) are not overridable:
    they are small enough to reach."""

    connections_max: int = L.CONNECTIONS_MAX
    connections_per_peer_max: int = L.CONNECTIONS_PER_PEER_MAX
    pipeline_requests_max: int = L.PIPELINE_REQUESTS_MAX
    turn_requests_max: int = L.TURN_REQUESTS_MAX
    write_buffer_bytes_max: int = L.WRITE_BUFFER_BYTES_MAX
    server_buffer_bytes_max: int = L.SERVER_BUFFER_BYTES_MAX
    head_timeout_s: float = L.HEAD_TIMEOUT_S
    idle_timeout_s: float = L.IDLE_TIMEOUT_S
    unauthed_idle_timeout_s: float = L.UNAUTHED_IDLE_TIMEOUT_S
    shutdown_grace_s: float = L.SHUTDOWN_GRACE_S
    linger_s: float = L.LINGER_S
    # The webhook deliverer's (accman/server/webhooks.py).
    webhook_events_per_post_max: int = L.WEBHOOK_EVENTS_PER_POST_MAX
    webhook_body_bytes_max: int = L.WEBHOOK_BODY_BYTES_MAX
    webhook_attempt_timeout_s: float = L.WEBHOOK_ATTEMPT_TIMEOUT_S
    webhook_backoff_base_s: float = L.WEBHOOK_BACKOFF_BASE_S
    webhook_backoff_cap_s: float = L.WEBHOOK_BACKOFF_CAP_S
    webhook_poll_wait_s: float = L.WEBHOOK_POLL_WAIT_S
    webhook_linger_s: float = L.WEBHOOK_LINGER_S
    webhook_cursor_save_interval_s: float = L.WEBHOOK_CURSOR_SAVE_INTERVAL_S
    webhook_lead_interval_s: float = L.WEBHOOK_LEAD_INTERVAL_S

    def __post_init__(self):
        """Every bound checked wherever the limits come from, before
        anything is opened: each as an override is (a whole number, or
        finite seconds, within the same range), then those that depend on
        each other or on the store's: the deliverer reads at most
        EVENTS_LIMIT_MAX events a call, waiting at most EVENTS_WAIT_S_MAX,
        and its backoff starts under its cap.  A message names the field
        and its variable, since the value may come from either."""
        for f in fields(self):
            _check_value(f.name, getattr(self, f.name), f.type in ("int", int))
        if self.webhook_events_per_post_max > L.EVENTS_LIMIT_MAX:
            raise LimitsError(f"{_named('webhook_events_per_post_max')}="
                              f"{self.webhook_events_per_post_max}: at most {L.EVENTS_LIMIT_MAX}")
        if self.webhook_poll_wait_s > L.EVENTS_WAIT_S_MAX:
            raise LimitsError(f"{_named('webhook_poll_wait_s')}={self.webhook_poll_wait_s:g}: "
                              f"at most {L.EVENTS_WAIT_S_MAX}")
        if self.webhook_backoff_base_s > self.webhook_backoff_cap_s:
            raise LimitsError(f"{_named('webhook_backoff_base_s')}="
                              f"{self.webhook_backoff_base_s:g} must not be over "
                              f"{_named('webhook_backoff_cap_s')}={self.webhook_backoff_cap_s:g}")

    @classmethod
    def from_env(cls, environ=None) -> "ServerLimits":
        environ = os.environ if environ is None else environ
        values = {}
        for f, name in zip(fields(cls), cls.names(), strict=True):
            raw = environ.get(name)
            if raw is None:
                continue
            values[f.name] = _override(name, raw, f.type in ("int", int))
        return cls(**values)

    @classmethod
    def names(cls) -> list[str]:
        """The environment variables that override the server's bounds."""
        return ["ACCMAN_" + f.name.upper() for f in fields(cls)]

    @classmethod
    def ignored_names(cls, environ=None) -> list[str]:
        """The ACCMAN_* variables set that neither the server nor any other
        part of AccMan reads, sorted."""
        environ = os.environ if environ is None else environ
        known = OTHER_NAMES.union(cls.names())
        return sorted(n for n in environ if n.startswith("ACCMAN_") and n not in known)

    @property
    def sweep_interval_s(self) -> float:
        # At most a second; a quarter of the shortest timeout so that small
        # test timeouts fire close to on time.
        return min(1.0, self.head_timeout_s / 4, self.idle_timeout_s / 4,
                   self.unauthed_idle_timeout_s / 4)
