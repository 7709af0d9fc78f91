"""A PostgreSQL URL's parts, as libpq reads them: its query's values, its
authority's hosts and ports, and the URL once for each host it names (the
hosts that accman.postgres.connecting tries one at a time)."""

from __future__ import annotations

import os
import urllib.parse


def query_value(url: str, name: str) -> str | None:
    """The last value of the query parameter `name` of `url`, decoded."""
    query = url.partition("?")[2]
    values = [v for k, v in urllib.parse.parse_qsl(query, keep_blank_values=True) if k == name]
    return values[-1] if values else None


def one_host_urls(url: str) -> list[str] | None:
    """`url` once for each host it names, None when it names one (or is
    not a URL this can split: asyncpg reads it whole).  The hosts are its
    authority's (each with LIBPQ_PORT when it names none), else its host=
    list's, else PGHOST's (libpq's order);
    those of a list outside the authority each get their port of the
    port= list, else of PGPORT (one for all, or one for each host), an
    empty one LIBPQ_PORT."""
    scheme, user_at, hosts, tail = split_url(url)
    parts = [h for h in hosts.split(",") if h]
    if len(parts) > 1:
        return [f"{scheme}://{user_at}{with_a_port(h)}{tail}" for h in parts]
    if parts or not scheme:
        return None
    hosts = (query_value(url, "host") or os.environ.get("PGHOST", "")).split(",")
    ports = (query_value(url, "port") or os.environ.get("PGPORT", "")).split(",")
    if len(ports) == 1:
        ports *= len(hosts)
    if len(hosts) < 2 or "" in hosts or len(ports) != len(hosts):
        return None
    path, _, query = tail.partition("?")
    kept = [(k, v) for k, v in urllib.parse.parse_qsl(query, keep_blank_values=True)
            if k not in ("host", "port")]
    return [f"{scheme}://{user_at}{path}?" + urllib.parse.urlencode(
                [*kept, ("host", h), ("port", p or str(LIBPQ_PORT))])
            for h, p in zip(hosts, ports, strict=True)]


# The port libpq gives a host of several that has none of its own (none or
# an empty one in a URL's authority, an empty one of a port list): its
# built-in one, never PGPORT's (libpq reads such a list's ports as given),
# where the driver, given one host and no port, reads PGPORT.
LIBPQ_PORT = 5432


def with_a_port(host: str) -> str:
    """`host` of an authority's list with LIBPQ_PORT when it names no port,
    or an empty one: libpq reads an empty port of a list as its built-in
    one too."""
    name, port = name_and_port(host)
    return host if port else f"{name}:{LIBPQ_PORT}"


def name_and_port(host: str) -> tuple[str, str]:
    """An authority's host (`h`, `h:5`, `h:`, `[::1]`, `[::1]:5`, `[::1]:`)
    as its name and its port, "" when it names none or an empty one."""
    name, colon, port = host.rpartition(":")
    if not colon or "]" in port:                # `h`, `[::1]`: no port at all
        return host, ""
    return name, port


def split_url(url: str) -> tuple[str, str, str, str]:
    """`url`'s scheme, its user up to the `@`, the hosts of its authority
    and what follows them; hosts "" when it names none or is no URL."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return "", "", "", ""
    ends = [i for i in (rest.find("/"), rest.find("?")) if i >= 0]
    cut = min(ends, default=len(rest))
    user, at, hosts = rest[:cut].rpartition("@")
    return scheme, user + at, hosts, rest[cut:]
