"""Starting and stopping `accman serve`: the checks made before a port is
bound, the descriptor limit, the event loop, the signals."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import ipaddress
import os
import re
import resource
import socket
import stat
import urllib.parse

import accman
from accman.errors import StartupError, StoreCorrupt, StoreError, StoreLocked
from accman.limits import EVENTS_RETENTION_S_DEFAULT, FDS_RESERVED, NICE_MAX
from accman.server.say import say
from accman.store import missing_names
from accman.server.server import Server
from accman.server.settings import ServerLimits
from accman.server.undo import Undo, lock_directory
from accman.stdfds import standard_fds_open


def is_loopback(host) -> bool:
    """True when every address `host` names is a loopback address."""
    if not host:
        return False
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except OSError:
        return False
    addrs = {info[4][0].split("%")[0] for info in infos}
    return bool(addrs) and all(ipaddress.ip_address(a).is_loopback for a in addrs)


def check_host(host):
    """The addresses `host` names, each once, in getaddrinfo's order: what
    the listener binds (a name given as is would be bound once per time
    getaddrinfo lists an address, and a hosts file may list one twice: a
    port of its own each with port 0, and a failed second bind with
    another).  StartupError when `host` names no address: said as such
    before the store opens, not as a bind without tokens (is_loopback's
    False) nor, after the store was made, as the listener's `Unknown error`.
    An empty host (every interface) is the listener's, returned as it is."""
    if not host:
        return host
    try:
        found = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as e:
        why = e.strerror if isinstance(e, socket.gaierror) else "not a host name"
        raise StartupError(f"cannot resolve --host {host}: {why}{_host_hint(host)}") from None
    return list(dict.fromkeys(sockaddr[0] for *_, sockaddr in found))


# A URL's form of an address (`[::1]`, `[::1]:8080`, `localhost:8080`), which
# the ready line writes: said with the flags to give instead.
_BRACKETED_RE = re.compile(r"\[([^\]]*)\](?::([0-9]+))?")
_NAME_PORT_RE = re.compile(r"([^:\[\]]+):([0-9]+)")


def _host_hint(host: str) -> str:
    m = _BRACKETED_RE.fullmatch(host)
    if m is not None:
        port = f" --port {m[2]}" if m[2] else ""
        return f" (an IPv6 address goes without brackets: --host {m[1]}{port})"
    m = _NAME_PORT_RE.fullmatch(host)
    if m is not None:
        return f" (a port goes in --port: --host {m[1]} --port {m[2]})"
    return ""


def _checked_data(data) -> str:
    """`data` refused as `--data` and a Ledger refuse it: an empty path
    would be the current directory (abspath's), made 0700 and given a store."""
    from accman.ledger.datadir import checked_path
    try:
        return checked_path(data)
    except ValueError as e:
        raise StartupError(f"data: {e}") from None


def fit_to_descriptors(limits: ServerLimits) -> ServerLimits:
    """Raises the soft RLIMIT_NOFILE to the hard one, and lowers the
    connection cap to stay FDS_RESERVED under it (SPEC "Limits": running
    out of descriptors refuses connections, it never stops commits)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass            # a container may refuse: the cap below still holds
    room = soft - FDS_RESERVED
    if room < 1:
        raise StartupError(f"the descriptor limit is {soft}; accman needs more than "
                           f"{FDS_RESERVED} (ulimit -n)")
    if limits.connections_max > room:
        limits = dataclasses.replace(limits, connections_max=room)
    return limits


def open_ledger(data_path: str, verify: str, compaction_nice: int = 0, **options):
    from accman.ledger import Ledger, background
    if compaction_nice:
        background.start_behind(compaction_nice)
    try:
        return Ledger(data_path, verify=verify, **options)
    except StoreLocked:
        raise StartupError(
            f"data directory {data_path} is in use by another accman server") from None
    except StoreCorrupt as e:
        raise StartupError(f"corrupt data directory: {e.detail}") from None
    except StoreError as e:
        why = e.detail.removeprefix(f"{data_path}: ")      # the store's words name it too
        raise StartupError(f"cannot open data directory {data_path}: {why}") from None


def open_postgres(loop, urls: list, data_path: str | None, **options):
    """The PostgreSQL store on `loop` (accman.postgres); the data directory,
    if given, holds only this server's lock.  Refused before the lock is
    taken when the store's driver is not installed."""
    why = accman.postgres_missing()
    if why is not None:
        raise StartupError(why)
    from accman.postgres import PgStore
    if data_path is not None:
        lock_directory(data_path)
    try:
        return loop.run_until_complete(PgStore.open(urls, **options))
    except StoreError as e:
        raise StartupError(f"cannot open the PostgreSQL store: {e.detail}") from None


def open_store(loop, store, data_path, store_urls, verify, low_balance, events_retention_s,
               options):
    """(store, where): the store to serve and what the ready line says of
    it, `store` itself when one was given."""
    if store is not None:
        missing = missing_names(store)
        if missing:
            raise StartupError(f"the store given to run() lacks {', '.join(missing)} of the "
                               "store interface (accman/store.py): it is not served")
        return store, f"data={data_path if store.path is None else store.path}"
    if store_urls:
        store = open_postgres(loop, list(store_urls), data_path, low_default=low_balance,
                              retention_s=events_retention_s, **options)
        return store, "store=" + ",".join(redacted(u) for u in store_urls)
    store = open_ledger(data_path, verify, low_balance=low_balance,
                        events_retention_s=events_retention_s, **options)
    return store, f"data={store.path}"


def _opened(loop, undo, store, data_path, *args):
    """open_store's (store, where); when the open fails, the loop is closed
    and `undo` (accman.server.undo's) called."""
    try:
        return open_store(loop, store, data_path, *args)
    except BaseException:
        asyncio.set_event_loop(None)
        loop.close()
        undo()
        raise


def _closed(loop, store, deliverer, undo) -> None:
    """The end of a start: its deliverer, store and loop closed, then
    `undo` called when given (a refused start's).  The store's close and
    the undo with stops held when it takes back a new embedded store
    (Undo.held): a Ledger's close that a stop interrupts goes on in a
    thread of its own (accman.ledger.gate), whose checkpoint came after
    the undo, alone in --data."""
    try:
        if deliverer is not None:     # before the store closes
            loop.run_until_complete(deliverer.stop())
    finally:
        with undo.held() if undo is not None else contextlib.nullcontext():
            try:
                store.close()       # PgStore's runs its aclose on this loop
            finally:
                asyncio.set_event_loop(None)
                loop.close()
                if undo is not None:
                    undo()


def redacted(url: str) -> str:
    """A store URL for the log: without its user and password, in the
    authority (everything up to its last `@`, so that none of a password
    that holds an `@` is left) or as a parameter (`password=`,
    `sslpassword=`)."""
    url = re.sub(r"//[^/?#]*@", "//", url, count=1)
    base, sep, query = url.partition("?")
    kept = [p for p in query.split("&")
            if not urllib.parse.unquote_plus(p.partition("=")[0]).lower().endswith("password")]
    return base + (sep + "&".join(kept) if any(kept) else "")


def _loop_exception_handler(_loop, context):
    # Never print the context's repr: it can hold a protocol and its buffers.
    exc = context.get("exception")
    what = type(exc).__name__ if exc is not None else "error"
    say(f"accman: event loop {what}: {context.get('message', '')}")


def webhook_hold(data_path: str | None, webhook: bool) -> int | None:
    """The event id after which the embedded store keeps its events past
    the retention, from before it opens: the webhook's cursor saved in the
    data directory, with or without --webhook this time (a flag forgotten
    at a restart loses the receiver nothing; deleting the file gives it
    up), 0 for a webhook with no cursor yet (everything waits for it),
    None for neither.  A cursor file that cannot be read stops the start."""
    from accman.server.cursors import FileCursors
    from accman.server.webhooks import CURSOR_NAME
    saved = None
    if data_path is not None and _usable_directory(data_path):
        try:
            saved = FileCursors(data_path).load(CURSOR_NAME)
        except StoreError as e:
            raise StartupError(f"webhook: {e.detail}") from None
    return 0 if saved is None and webhook else saved


def _usable_directory(data_path: str) -> bool:
    """Whether the data directory is there; StartupError when it is (or may
    be) but accman may not use it, said of the directory as the store would
    say it: the cursor file is only the first file read, and may be unused."""
    try:
        there = stat.S_ISDIR(os.stat(data_path).st_mode)
    except FileNotFoundError:
        return False
    except PermissionError:
        there = True
    except OSError as e:            # a file on the way, a loop of links
        raise StartupError(f"cannot open data directory {data_path}: "
                           f"{e.strerror or e}") from None
    if there and not os.access(data_path, os.R_OK | os.W_OK | os.X_OK, effective_ids=True):
        if _read_only_mount(data_path):
            raise StartupError(f"cannot open data directory {data_path}: on a read-only "
                               "file system (accman writes to it; `accman verify` reads a "
                               "read-only copy)")
        raise StartupError(f"cannot open data directory {data_path}: permission denied "
                           "(accman must be able to enter, read and write it)")
    return there


def _read_only_mount(path: str) -> bool:
    """os.access says EROFS as it says EACCES: the mount's flags tell."""
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except OSError:
        return False


def hold_for_webhook(options: dict, data_path: str | None, webhook: bool) -> None:
    """The embedded store's `events_kept_after` (webhook_hold), and a line
    on stderr when a cursor holds events while no --webhook is given: they
    stay in the store until it is served with one, or the file goes."""
    kept_after = webhook_hold(data_path, webhook)
    if kept_after is None:
        return
    options.setdefault("events_kept_after", kept_after)
    if not webhook:
        from accman.server.cursors import FileCursors
        from accman.server.webhooks import CURSOR_NAME
        say(f"accman: webhook: the cursor in {data_path} (event {kept_after}) keeps the "
            f"events after it past the retention, and no --webhook is given: serve with "
            f"it, or stop and delete {FileCursors(data_path).path(CURSOR_NAME)} to give "
            f"its receiver up")


def start_webhook(store, webhook, limits, loop, data_path):
    """The webhook's deliverer (None without a webhook), its cursor loaded
    (before a port is bound: a cursor that cannot be read is a start-up
    error), not yet started.  The cursor is the store's when it keeps
    cursors (shared by its front-ends, one of which delivers), else a file
    in the data directory (accman/server/cursors.py)."""
    if webhook is None:
        return None
    from accman.server.cursors import FileCursors
    from accman.server.webhooks import Deliverer
    cursors = store.cursors
    if cursors is not None and data_path is not None:
        _adopt_cursor(cursors, data_path, loop)
    if cursors is None:
        directory = store.path or data_path
        if directory is None:
            raise StartupError("--webhook: this store keeps no webhook cursor, and there is "
                               "no --data directory to keep it in")
        cursors = FileCursors(directory)
    deliverer = Deliverer(store, cursors, webhook, limits, loop)
    loop.run_until_complete(deliverer.prepare())
    return deliverer


def _adopt_cursor(cursors, data_path, loop) -> None:
    """A webhook cursor left in --data by an AccMan that kept it there goes
    to the store that keeps it now (accman/server/cursors.py)."""
    from accman.server.cursors import adopt_file_cursor
    from accman.server.webhooks import CURSOR_NAME
    try:
        value = loop.run_until_complete(adopt_file_cursor(cursors, data_path, CURSOR_NAME))
    except StoreError as e:
        raise StartupError(f"webhook: {e.detail}") from None
    if value is not None:
        say(f"accman: webhook: the cursor in {data_path} (event {value}) is now the "
            f"store's, which its front-ends share")


# With port 0 and a name of several addresses, the port picked free on the
# first address may be taken on another: picked again, at most this often.
PORT_PICKS_MAX = 8


async def _listen(server, addresses, port) -> None:
    """Binds every address on one port: with port 0 and a name of several
    addresses, each would get a port of its own, and a client told the
    first URL would miss the others.  So the port is one picked free on the
    first address, taken on all (`--host '*'` with port 0 is refused: the
    families it binds are the listener's to find)."""
    if port != 0 or not isinstance(addresses, list) or len(addresses) < 2:
        return await server.start(addresses, port)
    for pick in range(PORT_PICKS_MAX):
        family = socket.AF_INET6 if ":" in addresses[0] else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.bind((addresses[0], 0))
            free = probe.getsockname()[1]
        try:
            return await server.start(addresses, free)
        except OSError as e:
            if e.errno != errno.EADDRINUSE or pick == PORT_PICKS_MAX - 1:
                raise


async def _serve(server, host, addresses, port, deliverer, where, ready) -> None:
    """Listens, then serves until stopped.  All of it in one run of the
    loop: uvloop hears signals only while its loop runs, and a SIGTERM
    sent on seeing the ready line, between two runs, was lost (the server
    never stopped)."""
    try:
        await _listen(server, addresses, port)
    except OSError as e:
        # A gaierror's errno (the listener resolves an address too) is
        # getaddrinfo's, which os.strerror does not know.
        reason = (e.strerror if isinstance(e, socket.gaierror) or not e.errno
                  else os.strerror(e.errno)) or str(e)
        raise StartupError(f"cannot listen on {host}:{port}: {reason}") from None
    # Before the ready line: whoever waits for it may signal at once.
    server.install_signal_handlers()
    if deliverer is not None:
        deliverer.start()
    # Every address bound, one URL each (`--host '*'` serves both families):
    # a script that reads the port finds it in the first URL.
    urls = " ".join(f"http://[{h}]:{p}" if ":" in h else f"http://{h}:{p}"
                    for h, p in server.bound())
    line = f"accman: serving {urls} {where}"
    if ready is None:
        print(line, flush=True)
    else:
        ready(line)
    await server.serve_until_stopped()


def run(*, host="127.0.0.1", port=8080, data="./accman-data", tokens=None,
        limits=None, store=None, ready=None, verify="full", low_balance=None,
        events_retention_s=EVENTS_RETENTION_S_DEFAULT, store_urls=(), webhook=None,
        store_options=None, compaction_nice=0) -> int:
    """Serve until SIGTERM/SIGINT; returns the exit code.  Raises
    StartupError (one line for a person) when it cannot start.

    `store`, when given, is served instead of opening the ledger in `data`
    (tests inject a wrapped or faulty one this way); it is closed on the
    way out (one that lacks a name of accman/store.py's Store is refused
    at start, naming them, and left to its caller as it is), and its
    events are kept for a webhook as it was opened
    (`events_kept_after`: hold_for_webhook does not apply).  `store_urls`,
    PostgreSQL URLs, serve that store instead; then `data`, if not None,
    holds only the server's lock.  `webhook`
    (accman.server.webhook_config.load_config) has the events POSTed to it.
    `store_options` are more keyword arguments for the store that is
    opened (its bounds: tests reach them small).  `compaction_nice`, not 0,
    lowers LevelDB's compaction to that nice value (accman.ledger.background):
    the embedded store's only."""
    import uvloop

    # Before anything is opened: a program started with descriptor 0, 1 or
    # 2 closed would have a store's file or a socket take it (accman.stdfds).
    standard_fds_open()
    limits = fit_to_descriptors(limits or ServerLimits.from_env())
    addresses = check_host(host)
    if tokens is None and not is_loopback(host):
        raise StartupError(
            f"refusing to serve on {host or 'all interfaces'} without tokens: "
            f"pass --tokens FILE, or bind a loopback address such as 127.0.0.1")
    # Files this process makes are its own (SPEC "Access": data files 0600).
    os.umask(0o077)
    data_path = os.path.abspath(_checked_data(data)) if data is not None else None
    store_options = dict(store_options or {})
    if type(compaction_nice) is not int or not 0 <= compaction_nice <= NICE_MAX:
        raise StartupError(f"compaction_nice must be a whole number 0..{NICE_MAX}, "
                           f"not {compaction_nice!r}")
    if store is None and not store_urls:
        hold_for_webhook(store_options, data_path, webhook is not None)
        store_options["compaction_nice"] = compaction_nice
    elif compaction_nice:
        raise StartupError("compaction_nice is the embedded store's, opened here")
    loop = uvloop.new_event_loop()
    asyncio.set_event_loop(loop)
    loop.set_exception_handler(_loop_exception_handler)
    undo = Undo(data_path, store_urls, store is not None)
    store, where = _opened(loop, undo, store, data_path, store_urls, verify, low_balance,
                           events_retention_s, store_options)
    deliverer, refused = None, False
    try:
        server = Server(store, tokens=tokens, limits=limits, loop=loop)
        store.bind_loop(loop, deliver=server.deliver)
        deliverer = server.metrics.webhook = start_webhook(store, webhook, limits, loop,
                                                           data_path)
        loop.run_until_complete(_serve(server, host, addresses, port, deliverer, where,
                                       ready))
        failure = None if store.healthy else (store.failure or store.unhealthy_detail
                                              or "the store failed to commit")
    except StartupError:        # it never served: what it added to --data goes
        refused = True
        undo.hold(store)
        raise
    finally:
        _closed(loop, store, deliverer, undo if refused else None)
    if failure is not None:
        say(f"accman: stopped; {failure}")
        return 1
    say("accman: stopped")
    return 0
