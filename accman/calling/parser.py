"""The reply parser: a stream of HTTP/1.1 replies in, `(status, body,
close)` tuples out, and no I/O (h11's shape: bytes in, events or a
protocol error out).  Both clients feed it what their socket reads.

It is strict: it accepts what the SPEC's server sends and refuses the rest
with `BadReply`, because a reply framed in any other way means the
connection is not talking to AccMan, or no longer in step with it."""

from __future__ import annotations

import re

from accman.errors import BadReply

# --- bounds ------------------------------------------------------------------
# AccMan's replies have a status line and a handful of headers; a /past page
# of PAST_LIMIT_MAX entries with 64-character keys and int64 values is about
# 200 KiB.
REPLY_HEAD_BYTES_MAX = 8192
REPLY_HEADERS_MAX = 64
REPLY_BODY_BYTES_MAX = 1 << 20
# AccMan sends the same few heads over and over (the status line, the
# content type and a Content-Length of a handful of values): a parsed head is
# remembered by its bytes.  Bounded; cleared when full.
HEAD_CACHE_MAX = 256

_STATUS_RE = re.compile(rb"HTTP/1\.([01]) ([2-5][0-9][0-9])(?: [\t !-~\x80-\xff]*)?")
_HEADER_RE = re.compile(
    rb"([!#$%&'*+.^_`|~0-9A-Za-z-]+):[ \t]*((?:[!-~\x80-\xff](?:[ \t]*[!-~\x80-\xff])*)?)[ \t]*")


class ReplyParser:
    """Parses a stream of HTTP/1.1 replies.  `feed(data)` returns the replies
    completed by `data`, each a tuple `(status, body, close)`; it raises
    `BadReply` on anything the SPEC's server never sends: a missing or
    repeated Content-Length, Transfer-Encoding, obs-fold, bare CR or LF, a
    1xx, a head or body over its limit, bytes after a closing reply.

    Whole replies are sliced straight out of the bytes received.  A partial
    one waits in a buffer whose scan for the end of the head resumes where
    the last one stopped, and which is copied out only once a reply can be
    complete, so trickled bytes cost linear time (h11's receive buffer)."""

    __slots__ = ("_buf", "_scan", "_head", "_done")

    def __init__(self):
        self._buf = bytearray()
        self._scan = 0
        self._head = None           # (status, length, close) of the reply being read
        self._done = False          # a reply said Connection: close

    def feed(self, data: bytes) -> list:
        if self._done:
            if data:
                raise BadReply("bytes after a reply that closed the connection")
            return []
        if self._buf:
            data = self._join(data)
            if data is None:
                return []
        out = []
        pos = self._read(data, out)
        if pos < len(data):
            self._keep(data[pos:] if pos else data)
        return out

    @property
    def pending(self) -> bool:
        """True when part of a reply has been read."""
        return bool(self._buf) or self._head is not None

    def _join(self, data: bytes):
        """The buffered partial reply and `data`, as bytes, once a reply can
        be complete; None (and `data` kept) while it cannot."""
        buf = self._buf
        buf += data
        head = self._head
        if head is None:
            if buf.find(b"\r\n\r\n", self._scan) < 0:
                self._rescan()
                return None
        elif len(buf) < head[1]:
            return None
        data = bytes(buf)
        buf.clear()
        return data

    def _read(self, data: bytes, out: list) -> int:
        """Appends the replies complete in `data` to `out`; returns where the
        unread rest starts."""
        pos = 0
        n = len(data)
        while pos < n:
            head = self._head
            if head is None:
                end = data.find(b"\r\n\r\n", pos)
                if end < 0:
                    break
                if end - pos > REPLY_HEAD_BYTES_MAX:
                    raise BadReply("reply head over REPLY_HEAD_BYTES_MAX")
                head = self._head = _parse_head(data[pos:end])
                pos = end + 4
            length = head[1]
            if n - pos < length:
                break
            out.append((head[0], data[pos:pos + length], head[2]))
            pos += length
            self._head = None
            if head[2]:
                self._done = True
                if pos < n:
                    raise BadReply("bytes after a reply that closed the connection")
        return pos

    def _keep(self, rest: bytes) -> None:
        self._buf += rest
        if self._head is None:
            self._rescan()

    def _rescan(self) -> None:
        """The head is still open: bound it, and resume its scan where the
        end marker could start."""
        n = len(self._buf)
        if n > REPLY_HEAD_BYTES_MAX:
            raise BadReply("reply head over REPLY_HEAD_BYTES_MAX")
        self._scan = max(0, n - 3)


_heads: dict = {}


def _parse_head(head: bytes) -> tuple:
    parsed = _heads.get(head)
    if parsed is None:
        parsed = _parse_head_uncached(head)
        if len(_heads) >= HEAD_CACHE_MAX:
            _heads.clear()
        _heads[head] = parsed
    return parsed


def _parse_head_uncached(head: bytes) -> tuple:
    lines = head.split(b"\r\n")
    m = _STATUS_RE.fullmatch(lines[0])
    if m is None:
        raise BadReply("malformed status line")
    if len(lines) - 1 > REPLY_HEADERS_MAX:
        raise BadReply("more than REPLY_HEADERS_MAX reply headers")
    close = m.group(1) == b"0"      # HTTP/1.0 closes unless it says keep-alive
    length = None
    for line in lines[1:]:
        h = _HEADER_RE.fullmatch(line)
        if h is None:
            raise BadReply("malformed reply header line")
        name, value = h.group(1).lower(), h.group(2)
        if name == b"content-length":
            if length is not None:
                raise BadReply("two Content-Length headers")
            length = _content_length(value)
        elif name == b"connection":
            close = _closes(value, close)
        elif name == b"transfer-encoding":
            raise BadReply("Transfer-Encoding in a reply (AccMan sends Content-Length)")
    if length is None:
        raise BadReply("reply without Content-Length")
    return (int(m.group(2)), length, close)


def _content_length(value: bytes) -> int:
    if not value.isdigit() or len(value) > 10:
        raise BadReply("malformed Content-Length")
    length = int(value)
    if length > REPLY_BODY_BYTES_MAX:
        raise BadReply("reply body over REPLY_BODY_BYTES_MAX")
    return length


def _closes(value: bytes, close: bool) -> bool:
    """Whether the connection closes after this reply, given its Connection
    header and what the version implies."""
    options = {o.strip().lower() for o in value.split(b",")}
    if b"close" in options:
        return True
    if b"keep-alive" in options:
        return False
    return close


__all__ = ["ReplyParser", "REPLY_HEAD_BYTES_MAX", "REPLY_HEADERS_MAX", "REPLY_BODY_BYTES_MAX",
           "HEAD_CACHE_MAX"]
