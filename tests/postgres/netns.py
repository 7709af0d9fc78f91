"""A network namespace linked to this one by a veth pair, for a process
that is to be cut off from the network as a host would be: its link taken
down, every socket on both sides left open, nothing told to either end.
Made with `ip` and so as root (as the tests that mount a small file system
are: tests/reliability/relhelp.py).

    with namespace() as ns:
        cmd = ns.command([PYTHON, "-m", "accman", "serve", ...])   # runs inside
        ...                     # the inside reaches ns.host_addr, and is reached at ns.inner_addr
        ns.cut()                # nothing passes the link any more
"""

from __future__ import annotations

import contextlib
import socket
import subprocess
from dataclasses import dataclass

# The /24 subnets tried, 10.231.K.0 for K from 1 to SUBNETS_MAX.  Each is
# claimed for the life of the process that found it (an abstract Unix
# socket, as tests/postgres/pgcluster.py claims its ports), so that two
# workers never link two namespaces on one subnet.
SUBNET_PREFIX = "10.231"
SUBNETS_MAX = 250
_claims: list[socket.socket] = []


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


@dataclass
class Namespace:
    name: str
    host_addr: str          # this side's end of the link
    inner_addr: str         # the namespace's end
    subnet: str             # the link's, for pg_hba.conf
    host_link: str
    inner_link: str

    def command(self, argv: list) -> list:
        """`argv` run inside the namespace."""
        return ["ip", "netns", "exec", self.name, *map(str, argv)]

    def cut(self) -> None:
        """The link goes down inside the namespace: nothing passes it from
        now on, and no socket on either side is told."""
        _ip("netns", "exec", self.name, "ip", "link", "set", self.inner_link, "down")


def _claim(k: int) -> bool:
    claim = socket.socket(socket.AF_UNIX)
    try:
        claim.bind(f"\0accman-tests-subnet-{k}")
    except OSError:
        claim.close()
        return False
    _claims.append(claim)
    return True


def _link(k: int) -> Namespace | None:
    """The namespace and its link on subnet `k`, or None if its names are
    taken (left by a run that was killed)."""
    ns = Namespace(f"accman-test-{k}", f"{SUBNET_PREFIX}.{k}.1", f"{SUBNET_PREFIX}.{k}.2",
                   f"{SUBNET_PREFIX}.{k}.0/24", f"amh{k}", f"amn{k}")
    try:
        _ip("netns", "add", ns.name)
    except subprocess.CalledProcessError:
        return None
    try:
        _ip("link", "add", ns.host_link, "type", "veth", "peer", "name", ns.inner_link)
    except subprocess.CalledProcessError:
        _ip("netns", "del", ns.name)
        return None
    _ip("link", "set", ns.inner_link, "netns", ns.name)
    _ip("addr", "add", f"{ns.host_addr}/24", "dev", ns.host_link)
    _ip("link", "set", ns.host_link, "up")
    inside = ["netns", "exec", ns.name, "ip"]
    _ip(*inside, "addr", "add", f"{ns.inner_addr}/24", "dev", ns.inner_link)
    _ip(*inside, "link", "set", ns.inner_link, "up")
    _ip(*inside, "link", "set", "lo", "up")
    return ns


@contextlib.contextmanager
def namespace():
    """A namespace linked to this one, removed (with its link) at the end.
    Stop what runs inside it first."""
    for k in range(1, SUBNETS_MAX + 1):
        if _claim(k) and (ns := _link(k)) is not None:
            break
    else:
        raise RuntimeError(f"no free subnet in {SUBNET_PREFIX}.1-{SUBNETS_MAX}.0/24")
    try:
        yield ns
    finally:
        # The pair goes with either end.  The namespace itself lives on in
        # the kernel until the sockets closed in it, their peers cut off,
        # have given up: its link is not left to wait for them.
        subprocess.run(["ip", "link", "del", ns.host_link], capture_output=True)
        subprocess.run(["ip", "netns", "del", ns.name], capture_output=True)
