"""A network namespace linked to this one by a veth pair, for a process
that is to be cut off from the network as a host would be: its link taken
down, every socket on both sides left open, nothing told to either end.
Made with `ip` and so as root (a test skips without it, as the tests that
mount a small file system do: tests/reliability/test_storage_faults.py).

    with namespace() as ns:
        cmd = ns.command([PYTHON, "-m", "accman", "serve", ...])   # runs inside
        ...                     # the inside reaches ns.host_addr, and is reached at ns.inner_addr
        ns.cut()                # nothing passes the link any more
        ns.mend()               # and again it does
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from dataclasses import dataclass

import pytest

from .pgcluster import claim

# The /24 subnets tried, 198.18.K.0 for K from 1 to SUBNETS_MAX: of the
# block set aside for tests of network devices (RFC 2544), which no host
# routes.  Each is claimed for the life of the process that found it
# (pgcluster.claim, as the clusters' ports are), so that two workers never
# link two namespaces on one subnet, and what a killed run left on an
# unclaimed one is its own to remove.
SUBNET_PREFIX = "198.18"
SUBNETS_MAX = 250


def _ip(*args: str, check: bool = True) -> None:
    r = subprocess.run(["ip", *args], capture_output=True, text=True)
    if check and r.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {r.stderr.strip()}")


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
        self._inner_link("down")

    def mend(self) -> None:
        """The link up again inside the namespace: what `cut` took down."""
        self._inner_link("up")

    def _inner_link(self, state: str) -> None:
        _ip("netns", "exec", self.name, "ip", "link", "set", self.inner_link, state)

    def remove(self) -> None:
        """The link (the pair goes with either end) and the namespace's
        name.  The namespace itself lives on in the kernel until the
        sockets closed in it, their peers cut off, have given up."""
        _ip("link", "del", self.host_link, check=False)
        _ip("netns", "del", self.name, check=False)


def _link(ns: Namespace) -> None:
    _ip("netns", "add", ns.name)
    _ip("link", "add", ns.host_link, "type", "veth", "peer", "name", ns.inner_link)
    _ip("link", "set", ns.inner_link, "netns", ns.name)
    _ip("addr", "add", f"{ns.host_addr}/24", "dev", ns.host_link)
    _ip("link", "set", ns.host_link, "up")
    inside = ["netns", "exec", ns.name, "ip"]
    _ip(*inside, "addr", "add", f"{ns.inner_addr}/24", "dev", ns.inner_link)
    _ip(*inside, "link", "set", ns.inner_link, "up")
    # A namespace's loopback starts down: a server inside binds 127.0.0.1.
    _ip(*inside, "link", "set", "lo", "up")


@contextlib.contextmanager
def namespace():
    """A namespace linked to this one, removed (with its link) at the end.
    Stop what runs inside it first."""
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("a network namespace needs root and iproute2's ip (CI runs as root)")
    k = next((k for k in range(1, SUBNETS_MAX + 1) if claim(f"subnet-{k}")), None)
    if k is None:
        raise RuntimeError(f"no unclaimed subnet in {SUBNET_PREFIX}.1-{SUBNETS_MAX}.0/24")
    ns = Namespace(f"accman-test-{k}", f"{SUBNET_PREFIX}.{k}.1", f"{SUBNET_PREFIX}.{k}.2",
                   f"{SUBNET_PREFIX}.{k}.0/24", f"amh{k}", f"amn{k}")
    ns.remove()             # what a killed run left on this subnet
    try:
        _link(ns)
        yield ns
    finally:
        ns.remove()
