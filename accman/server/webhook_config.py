"""The checked configuration of `accman serve --webhook URL
--webhook-secret FILE` (accman/server/webhooks.py delivers): the URL, the
secret file and the deliverer's bounds, all checked before the data
directory is opened, each refusal naming the flag at fault and never
quoting the secret.
"""

from __future__ import annotations

import hashlib
import os
import ssl
import stat
from dataclasses import dataclass

from accman.errors import StartupError
from accman.limits import WEBHOOK_SECRET_BYTES_MAX, WEBHOOK_SECRET_BYTES_MIN
from accman.server import webhook_http
from accman.server.webhook_http import Target

# The receiver's mark in a shared cursor's row: the URL's half, the secret's
# half (target_mark).  A mark written before the secret's half was (the
# whole SHA-256 of the URL) says nothing of the secret, and is not taken
# for another secret.
MARK_HALF_BYTES = 16
# scrypt's parameters for an interactive login (Percival's paper; RFC 7914):
# 128 * r * n bytes of memory and a fraction of a second of one core, paid
# once at each start, and only where front-ends share the cursor.
MARK_SCRYPT = {"n": 2 ** 14, "r": 8, "p": 1}


@dataclass(frozen=True, repr=False)
class WebhookConfig:
    """The checked `--webhook` and `--webhook-secret`.  Its repr shows the
    receiver's host and port only: never the secret, nor the URL's path
    and query, which may carry a secret of the receiver's."""

    target: Target
    secret: bytes
    ssl_context: ssl.SSLContext | None

    def __repr__(self):
        return f"WebhookConfig({self.target.where})"


def load_config(url: str | None, secret_path: str | None) -> WebhookConfig | None:
    """The webhook of `accman serve`, None without one; raises StartupError
    naming the flag at fault (and never quoting the secret)."""
    if url is None and secret_path is None:
        return None
    if secret_path is None:
        raise StartupError("--webhook needs --webhook-secret FILE: every POST is signed")
    if url is None:
        raise StartupError("--webhook-secret needs --webhook URL")
    try:
        target = webhook_http.parse_url(url)
    except ValueError as e:
        raise StartupError(f"--webhook: the URL {e}") from None
    secret = read_secret(secret_path)
    tls = ssl.create_default_context() if target.scheme == "https" else None
    return WebhookConfig(target, secret, tls)


def read_secret(path: str) -> bytes:
    """The HMAC key: the file's bytes, surrounding whitespace stripped.  The
    file is refused when others may read it (as the tokens file is: anyone
    who can read it can forge events)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        raise StartupError(f"--webhook-secret: cannot read {path}: "
                           f"{e.strerror or type(e).__name__}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise StartupError(f"--webhook-secret: {path} is not a regular file")
        if st.st_mode & 0o077:
            raise StartupError(f"--webhook-secret: {path} is open to other users (mode "
                               f"{stat.S_IMODE(st.st_mode):04o}): run chmod 600 {path}")
        data = os.read(fd, WEBHOOK_SECRET_BYTES_MAX * 2 + 1)
    except OSError as e:
        raise StartupError(f"--webhook-secret: cannot read {path}: "
                           f"{e.strerror or type(e).__name__}") from None
    finally:
        os.close(fd)
    secret = data.strip()
    if not WEBHOOK_SECRET_BYTES_MIN <= len(secret) <= WEBHOOK_SECRET_BYTES_MAX:
        raise StartupError(f"--webhook-secret: the secret in {path} must have "
                           f"{WEBHOOK_SECRET_BYTES_MIN} to {WEBHOOK_SECRET_BYTES_MAX} bytes "
                           f"(besides surrounding whitespace)")
    return secret


def target_mark(config: WebhookConfig) -> tuple[bytes, bytes]:
    """(SHA-256 of the URL, the mark of the receiver): the mark that the
    shared cursor's row records (32 bytes) is the first half of the URL's
    digest, then a scrypt of the secret salted by that digest, so that a
    front-end given another URL or another secret can be told, and the
    row hands out neither (a URL's path may carry the receiver's secret;
    scrypt makes guessing a weak webhook secret from the row slow)."""
    t = config.target
    url = hashlib.sha256(f"{t.where}{t.path}".encode()).digest()
    secret = hashlib.scrypt(config.secret, salt=url, dklen=MARK_HALF_BYTES, **MARK_SCRYPT)
    return url, url[:MARK_HALF_BYTES] + secret
