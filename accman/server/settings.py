"""The server's own bounds, with their overrides from the environment."""

from __future__ import annotations

import os
from dataclasses import dataclass, fields

from accman import limits as L
from accman.errors import LimitsError


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

    @classmethod
    def from_env(cls, environ=None) -> "ServerLimits":
        environ = os.environ if environ is None else environ
        values = {}
        for f in fields(cls):
            name = "ACCMAN_" + f.name.upper()
            raw = environ.get(name)
            if raw is None:
                continue
            kind = int if f.type in ("int", int) else float
            try:
                value = kind(raw)
            except ValueError:
                raise LimitsError(f"{name}={raw!r} is not a number") from None
            if not value > 0:
                raise LimitsError(f"{name} must be positive")
            values[f.name] = value
        return cls(**values)

    @property
    def sweep_interval_s(self) -> float:
        # At most a second; a quarter of the shortest timeout so that small
        # test timeouts fire close to on time.
        return min(1.0, self.head_timeout_s / 4, self.idle_timeout_s / 4,
                   self.unauthed_idle_timeout_s / 4)
