"""A connection service file read as libpq reads it (its fe-connect.c,
parseServiceFile, as of libpq 15): the same file means the same settings
to psql and to AccMan, and a file libpq refuses, AccMan refuses too,
naming the file, the line and what is wrong.  No I/O but reading the
files.

    settings = service_settings("accman")      # {"host": "pg1,pg2", ...}

libpq's rules, odd ones among them, followed as they are:
  * A line is trimmed of C's white space at both ends; an empty one, or one
    whose first character is `#`, is skipped.  Nothing else is a comment:
    `;` begins a key, and `# ...` after a value is part of the value.
  * A line beginning with `[` is a section header; `[NAME]` opens the
    service NAME (case-sensitive), whatever follows its `]`.  The service's
    lines end at the next header, its own name again included: a second
    section of the same name is never read.
  * In the service's section a line is `key=value`, split at the first `=`,
    nothing trimmed around it: `host = x` is the key `host ` (an error) and
    `host= x` the value ` x`.  The key is a libpq keyword, lower case;
    `service` is refused (no nesting).  A key given twice keeps its first
    value.  A line beginning with `ldap` is an LDAP lookup.
  * The lines outside the service's section are never looked at, but for
    their length: libpq 15 reads a line into a buffer of 1024 bytes
    (fgets), and a line longer than LINE_BYTES_MAX, its newline counted,
    refuses the file, wherever it is before the service's section ends
    (a comment, another section, the header that ends it).  A line ends
    at a NUL byte (a C string): a longer one with a NUL in its first
    LINE_BYTES_MAX + 1 bytes is read as those bytes up to the NUL, and
    the bytes after them as the next line, numbered so.
  * AccMan refuses, naming the line, three things libpq reads, rather
    than read them differently: an LDAP lookup, a key's first value
    empty (libpq's built-in default over the environment's), and a line
    of the section that is not UTF-8.  It refuses, too, a file that is a
    named pipe or a device, or over SERVICE_FILE_BYTES_MAX (_file_bytes).
  * The files: PGSERVICEFILE (which must exist), else ~/.pg_service.conf
    (if it exists; ~ is HOME, or if that is unset or empty, the user's
    home of the password file); then, unless the first defined the service,
    pg_service.conf in PGSYSCONFDIR (if it exists).  A directory in their
    place is read as an empty file (libpq's fopen takes it, and its
    fgets meets the end at once).  libpq's own fallback
    for PGSYSCONFDIR is a directory compiled into it, which AccMan cannot
    know (see SYSTEM_FILE_HINT).
"""

from __future__ import annotations

import os
import pathlib
import pwd
import stat

from accman.postgres.errors import CausedStoreError

_CONNECT = "cannot connect to a PostgreSQL cluster of the store"
# What a 503's detail says of a service file that cannot be used, where the
# log has its words: those name a file of the server's, and a caller is not
# told the server's paths (errors.describe).
UNUSABLE = "the store's connection service cannot be used (the server's log says why)"
# libpq 15's connection keywords (PQconndefaults), `service` aside, and
# those later libpq added: a key of neither is libpq's syntax error.  (An
# older libpq than a keyword's refuses it where AccMan reads it.)
LIBPQ_KEYWORDS = frozenset((
    "user", "password", "passfile", "channel_binding", "connect_timeout", "dbname", "host",
    "hostaddr", "port", "client_encoding", "options", "application_name",
    "fallback_application_name", "keepalives", "keepalives_idle", "keepalives_interval",
    "keepalives_count", "tcp_user_timeout", "sslmode", "sslcompression", "sslcert", "sslkey",
    "sslpassword", "sslrootcert", "sslcrl", "sslcrldir", "sslsni", "requirepeer",
    "ssl_min_protocol_version", "ssl_max_protocol_version", "gssencmode", "krbsrvname",
    "gsslib", "replication", "target_session_attrs",
    # libpq 16 and 17.
    "require_auth", "sslcertmode", "load_balance_hosts", "gssdelegation", "sslnegotiation"))
# C's isspace() in the C locale: what libpq trims a line of.
_C_SPACE = " \t\n\v\f\r"
# The longest line libpq 15 reads, its newline counted: its fgets() into
# char buf[1024] takes at most 1023 bytes, and a line that fills them is
# its "line N too long in service file".
LINE_BYTES_MAX = 1022
# The largest service file AccMan reads, at each new connection, on its
# event loop: thousands of services.  (libpq has no bound of its own.)
SERVICE_FILE_BYTES_MAX = 1024 * 1024
SYSTEM_FILE_HINT = ("libpq also reads pg_service.conf in a directory compiled into it "
                    "(`pg_config --sysconfdir` names it for the libpq of that pg_config), "
                    "which AccMan reads only when PGSYSCONFDIR names it")


class ServiceFileError(CausedStoreError):
    """A service file, or the service in it, that cannot be used: `detail`
    names the file and the line, `reason` (a 503's words) names neither."""

    def __init__(self, detail: str, reason: str = UNUSABLE, place: str | None = None):
        super().__init__(detail, reason, place)


def service_settings(name: str) -> dict[str, str]:
    """The settings of the service `name` (libpq's keywords, each its first
    value), from the first service file that defines it, in libpq's order
    of files; ServiceFileError if a file read is refused by libpq's rules,
    or none defines it."""
    looked = []
    for path, must_exist in _service_files():
        if not must_exist and not os.path.exists(path):
            looked.append(f"{path} (none)")
            continue
        settings = _read(path, name)
        if settings is not None:
            return settings
        looked.append(f"{path} (a directory, read as empty)" if path.is_dir() else str(path))
    shown = name or '""'                # libpq's words for the empty name
    raise ServiceFileError(
        f"{_CONNECT}: the service {shown} (the store URL's service=, or PGSERVICE) is not "
        f"defined in a service file; looked in {', '.join(looked)}"
        + ("" if os.environ.get("PGSYSCONFDIR") is not None else f"; {SYSTEM_FILE_HINT}"))


def _service_files() -> list[tuple[pathlib.Path, bool]]:
    """libpq's service files in its order, each with whether it must exist.
    A variable set empty counts as set, as libpq reads it (getenv)."""
    given = os.environ.get("PGSERVICEFILE")
    if given == "":
        raise ServiceFileError(f"{_CONNECT}: PGSERVICEFILE is set but empty, which libpq "
                               "refuses (service file \"\" not found): name a file, or unset it")
    home = _home()
    files = ([(pathlib.Path(given), True)] if given is not None
             else [(home / ".pg_service.conf", False)] if home is not None else [])
    if os.environ.get("PGSYSCONFDIR") is not None:
        # libpq's "%s/pg_service.conf": an empty directory names the root's.
        files.append((pathlib.Path(f"{os.environ['PGSYSCONFDIR']}/pg_service.conf"), False))
    return files


def _home() -> pathlib.Path | None:
    """libpq's home directory (pqGetHomeDirectory): HOME when it is set and
    not empty, else the password file's home of the effective user; None
    if there is neither, and libpq goes on to the next file.  Python's
    Path.home() takes an empty HOME for the root directory."""
    if os.environ.get("HOME"):
        return pathlib.Path(os.environ["HOME"])
    try:
        return pathlib.Path(pwd.getpwuid(os.geteuid()).pw_dir)
    except KeyError:
        return None


def _file_bytes(path: pathlib.Path) -> bytes | None:
    """The file's bytes; None for a directory, which libpq opens (fopen
    succeeds) and whose first read it takes for the end of the file: an
    empty file, which defines no service, so the next file is read.
    AccMan reads the file on its event loop at each new connection, so a
    named pipe or a device there, which would hold up every request (libpq
    waits on one too), and a file over SERVICE_FILE_BYTES_MAX are refused."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            mode = os.fstat(fd).st_mode
            if stat.S_ISDIR(mode):
                return None
            if not stat.S_ISREG(mode):
                raise ServiceFileError(f"{_CONNECT}: the service file {path} is not a regular "
                                       "file (a pipe or a device would hold up every request)")
            chunks, size = [], 0
            while size <= SERVICE_FILE_BYTES_MAX:
                chunk = os.read(fd, SERVICE_FILE_BYTES_MAX + 1 - size)
                if not chunk:
                    break
                chunks.append(chunk)
                size += len(chunk)
        finally:
            os.close(fd)
    except OSError as e:
        raise ServiceFileError(f"{_CONNECT}: the service file {path} cannot be read: "
                               f"{e.strerror or type(e).__name__}") from None
    if size > SERVICE_FILE_BYTES_MAX:
        raise ServiceFileError(f"{_CONNECT}: the service file {path} is over "
                               f"SERVICE_FILE_BYTES_MAX ({SERVICE_FILE_BYTES_MAX} bytes)")
    return b"".join(chunks)


def _read(path: pathlib.Path, name: str) -> dict[str, str] | None:
    """The settings of `name`'s section of the file `path`, None if it has
    none."""
    data = _file_bytes(path)
    if data is None:
        return None
    settings: dict[str, str] | None = None
    for number, line in enumerate(_fgets_lines(data), 1):
        if len(line) > LINE_BYTES_MAX:
            raise _refused(path, number, f"is too long: libpq reads lines of at most "
                           f"{LINE_BYTES_MAX} bytes, the newline counted, and refuses a longer "
                           "one anywhere before the service's section ends")
        line = line.strip(_C_SPACE.encode())
        if not line or line.startswith(b"#"):
            continue
        if line.startswith(b"["):
            if settings is not None:
                return settings
            # libpq: the name, then `]`; what follows is not looked at.
            if line[1:].startswith(name.encode() + b"]"):
                settings = {}
        elif settings is not None:
            key, value = _setting(path, number, line)
            if key in settings:
                continue                # libpq keeps a key's first value
            if not value:
                # libpq takes an empty value as its built-in default, over
                # the environment's (PGHOST, ...); the driver would take the
                # environment's: the same file would mean two things.
                raise _refused(path, number, f"sets {key} to nothing, which libpq reads as "
                               "its built-in default and AccMan cannot: give a value, or "
                               "leave the line out")
            settings[key] = value
    return settings


def _fgets_lines(data: bytes):
    """The lines of `data` as libpq's fgets(buf, 1024) reads them: each up
    to and with its newline, or its first LINE_BYTES_MAX + 1 bytes, the
    rest of a longer one being read as the next line; each then taken as
    a C string, ended by a NUL byte (the newline then left out too).
    Only a line cut short by a NUL can be read whole beyond
    LINE_BYTES_MAX bytes: a longer one without a NUL is refused."""
    start = 0
    while start < len(data):
        newline = data.find(b"\n", start, start + LINE_BYTES_MAX + 1)
        end = start + LINE_BYTES_MAX + 1 if newline < 0 else newline + 1
        yield data[start:end].partition(b"\0")[0]
        start = end


def _setting(path: pathlib.Path, number: int, line: bytes) -> tuple[str, str]:
    """The key and value of a line of the service's section, libpq's way."""
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError:
        raise _refused(path, number, "is not UTF-8 text") from None
    key, equals, value = text.partition("=")
    if text.startswith("ldap"):
        what = ("is an LDAP lookup (a line beginning with `ldap`), which AccMan does not "
                "make: give the settings in the file")
    elif not equals:
        what = "has no `=` (libpq reads `key=value`, one a line, and no continuation lines)"
    elif key == "service":
        what = ("sets service: a service cannot name another (libpq: nested service "
                "specifications are not supported)")
    elif key not in LIBPQ_KEYWORDS:
        what = (f"{key!r} is not a libpq connection setting (libpq's keys are lower case, "
                "with no space before the `=`; a `;` or `#` after the start of a line "
                "begins no comment)")
    else:
        return key, value
    raise _refused(path, number, what)


def _refused(path: pathlib.Path, number: int, what: str) -> ServiceFileError:
    return ServiceFileError(f"{_CONNECT}: the service file {path}, line {number}: {what}")
