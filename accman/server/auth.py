"""Tokens and roles (SPEC "Access").

A tokens file has one token a line, `ROLE[,ROLE...] TOKEN`; blank lines and
lines starting with `#` are ignored.  Roles are `read` (/tot, /past),
`charge` (/mod with a negative `by`) and `mint` (/mod with a positive `by`).

Tokens are compared with `hmac.compare_digest` against every configured
token, so the time a check takes does not depend on how much of a guess
matches.  No message here ever contains a token: errors name the line.
"""

import hmac
import os
import re
import stat

from accman.errors import TokensError

READ = 1
CHARGE = 2
MINT = 4
ROLE_BITS = {"read": READ, "charge": CHARGE, "mint": MINT}

# A token is an RFC 6750 b64token: one or more of TOKEN_CHARS, then any
# number of "=".  This is the one definition: the wire parser builds its
# table from TOKEN_CHARS, so a token that loads here is one that a request
# can carry.  16 characters is the shortest we accept, so that a placeholder
# such as "secret" never guards real money.
TOKEN_CHARS = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~+/"
TOKEN_RE = re.compile("[" + re.escape(TOKEN_CHARS) + "]+=*")
TOKEN_CHARS_MIN = 16
TOKEN_CHARS_MAX = 256
# The largest tokens file read: thousands of tokens of the longest kind.
# Each request is compared with every token, so a file is short in
# practice; the bound keeps a wrong path (a device such as /dev/zero, a
# log) from being read into memory without end.
TOKENS_FILE_BYTES_MAX = 1024 * 1024


def roles_text(roles: int) -> str:
    return ",".join(name for name, bit in ROLE_BITS.items() if roles & bit)


def _role_shown(name: str) -> str:
    """An unknown role as an error may say it: a word as long as a token
    may be one, put first by mistake (`TOKEN read`), so only its length."""
    if len(name) < TOKEN_CHARS_MIN:
        return repr(name)
    return f"({len(name)} characters, not shown: a token before the roles?)"


class Tokens:
    """The configured tokens and their roles (a bit set of READ|CHARGE|MINT)."""

    __slots__ = ("_entries", "path")

    def __init__(self, entries, path: str | None = None):
        self._entries = tuple((bytes(tok), int(roles)) for tok, roles in entries)
        if not self._entries:
            raise TokensError("no tokens configured")
        self.path = path            # the file they were read from, if any

    def __len__(self):
        return len(self._entries)

    @classmethod
    def parse(cls, text: str, source: str = "tokens") -> "Tokens":
        entries = []
        seen = set()
        for lineno, line in enumerate(text.splitlines(), 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            parts = line.split()
            if len(parts) != 2:
                raise TokensError(
                    f"{source} line {lineno}: expected `ROLE[,ROLE...] TOKEN`")
            role_field, token = parts
            roles = 0
            for name in role_field.split(","):
                bit = ROLE_BITS.get(name)
                if bit is None:
                    raise TokensError(f"{source} line {lineno}: unknown role "
                                      f"{_role_shown(name)} (roles are read, charge, mint)")
                if roles & bit:
                    # `read,read` is most likely a role mistyped for another.
                    raise TokensError(f"{source} line {lineno}: the role {name} is named "
                                      "twice")
                roles |= bit
            if not TOKEN_CHARS_MIN <= len(token) <= TOKEN_CHARS_MAX:
                raise TokensError(
                    f"{source} line {lineno}: a token has "
                    f"{TOKEN_CHARS_MIN} to {TOKEN_CHARS_MAX} characters")
            if TOKEN_RE.fullmatch(token) is None:
                raise TokensError(
                    f"{source} line {lineno}: a token uses only A-Z a-z 0-9 - . _ ~ + / "
                    f"and may end in one or more =")
            if token in seen:
                raise TokensError(f"{source} line {lineno}: a token appears twice")
            seen.add(token)
            entries.append((token.encode("ascii"), roles))
        if not entries:
            raise TokensError(f"{source}: no tokens in the file")
        return cls(entries)

    @classmethod
    def load(cls, path: str, *, wait: bool = True) -> "Tokens":
        """Reads a tokens file, which only its owner may read or write (as
        ssh does with keys): anyone who can read it can move money.  A named
        pipe's open waits for a writer; with `wait` False it does not (SIGHUP
        reads the file inside the server's event loop, which a writer that
        never comes would stop for ever), and a pipe nothing writes to then
        reads empty."""
        try:
            fd = os.open(path, os.O_RDONLY | (0 if wait else os.O_NONBLOCK))
            try:
                mode = os.fstat(fd).st_mode
                # A file, or a pipe (`--tokens <(...)`): a directory, a device or
                # a socket is no tokens file, and reading one may never end.
                if not (stat.S_ISREG(mode) or stat.S_ISFIFO(mode)):
                    raise TokensError(f"tokens file {path} is not a regular file")
                os.set_blocking(fd, True)       # a writer's lines are waited for
                with open(fd, "rb", closefd=False) as f:
                    data = f.read(TOKENS_FILE_BYTES_MAX + 1)
            finally:
                os.close(fd)
        except OSError as e:
            raise TokensError(f"cannot read tokens file {path}: {e.strerror or e}") from None
        if not data and stat.S_ISFIFO(mode):
            raise TokensError(f"tokens file {path} is a pipe that nothing writes to")
        if len(data) > TOKENS_FILE_BYTES_MAX:
            raise TokensError(f"tokens file {path} is over TOKENS_FILE_BYTES_MAX "
                              f"({TOKENS_FILE_BYTES_MAX} bytes)")
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as e:     # its bytes unquoted: they may be a token's
            line = data.count(b"\n", 0, e.start) + 1
            raise TokensError(f"tokens file {path} line {line} is not UTF-8 text") from None
        if mode & 0o077:
            raise TokensError(f"tokens file {path} is open to other users (mode "
                              f"{stat.S_IMODE(mode):04o}): run chmod 600 {path}")
        tokens = cls.parse(text, source=str(path))
        tokens.path = path
        return tokens

    def reload(self) -> int:
        """Reads the file they came from again and takes its tokens, all or
        none: TokensError, the tokens as they were, when it cannot be read
        or is wrong.  How many there are now."""
        self._entries = Tokens.load(self.path, wait=False)._entries
        return len(self._entries)

    def roles(self, token) -> int:
        """The roles of `token` (bytes), 0 when it is missing or unknown.
        Every configured token is compared, match or not."""
        if not token:
            return 0
        found = 0
        for known, roles in self._entries:
            if hmac.compare_digest(token, known):
                found = roles
        return found
