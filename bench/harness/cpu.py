"""How busy each CPU was during a figure, by whom, and waiting for quiet.

Everything here reads /proc: the machine is shared, so a figure records how
much of each pinned CPU the server and the load generator used, and how much
everything else did, to tell a figure bound by one side from one that waits
(on round trips, on the disk) or one that other processes disturbed.
"""

import contextlib
import os
import resource
import time

from .base import LOAD_CPU, SERVER_CPU

CLK_TCK = os.sysconf("SC_CLK_TCK")

QUIET_WAIT_S = 60                # one wait for other load to leave the CPUs, at most
QUIET_BUSY_MAX = 0.15            # busy fraction of all CPUs that counts as quiet
OTHERS_CPU_MAX = 0.2             # CPUs used by other processes during a figure: disturbed


def _stat_ticks(stat):
    """(utime + stime, process group) from the text of /proc/PID/stat."""
    fields = stat[stat.rindex(")") + 2:].split()
    return int(fields[11]) + int(fields[12]), int(fields[2])   # fields 14, 15; field 5


def proc_cpu_ticks(pgid):
    """CPU ticks (user + system) used so far by the live processes of a
    process group (the server, its threads, nginx's worker), and by kernel
    threads (process group 0: the journal and I/O workers that fsync wakes,
    which work for whoever calls it)."""
    group = kernel = 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ticks, pgrp = _stat_ticks(f.read())
        except (OSError, ValueError):
            continue
        if pgrp == pgid:
            group += ticks
        elif pgrp == 0:
            kernel += ticks
    return group, kernel


def thread_cpu_ticks(pid):
    """{tid: user + system ticks} of one process's threads."""
    ticks = {}
    with contextlib.suppress(OSError):
        for tid in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError, ValueError):
                with open(f"/proc/{pid}/task/{tid}/stat") as f:
                    ticks[int(tid)] = _stat_ticks(f.read())[0]
    return ticks


def core_busy_ticks():
    """{cpu number as str: ticks not idle (nor iowait)} from /proc/stat."""
    out = {}
    with open("/proc/stat") as f:
        for line in f:
            name, *fields = line.split()
            if name.startswith("cpu") and name != "cpu":
                v = [int(x) for x in fields[:8]]
                out[name[3:]] = sum(v) - v[3] - v[4]
    return out


def busy_ticks():
    """Ticks all CPUs spent running processes so far (user, nice, system),
    from /proc/stat; interrupts and softirqs (loopback TCP's receive side)
    are left out: they are not charged to any process."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    return fields[0] + fields[1] + fields[2]


def _children_s():
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


@contextlib.contextmanager
def cpu_meter(row, pgid):
    """Adds to `row` the share of one CPU that the server (its process
    group) and the load generator (this process's children reaped meanwhile)
    used during the block: a figure whose own CPU is near 1.0 is bound by
    that side; neither near 1.0 means it waits (on round trips, on fsync)."""
    t0, c0, b0, p0 = time.monotonic(), _children_s(), busy_ticks(), core_busy_ticks()
    s0, k0 = proc_cpu_ticks(pgid or -1)
    yield
    wall = time.monotonic() - t0
    s1, k1 = proc_cpu_ticks(pgid or -1)
    p1 = core_busy_ticks()
    # How busy each pinned CPU was, interrupts and softirqs included (the
    # loopback TCP receive path runs there, charged to no process): the
    # truer test of a saturated side.
    row["server_core_busy"] = round((p1[SERVER_CPU] - p0[SERVER_CPU]) / CLK_TCK / wall, 2)
    row["load_core_busy"] = round((p1[LOAD_CPU] - p0[LOAD_CPU]) / CLK_TCK / wall, 2)
    server = (s1 - s0) / CLK_TCK / wall
    load = (_children_s() - c0) / wall
    if pgid:
        row["server_cpu"] = round(server, 2)
    row["load_cpu"] = round(load, 2)
    # Whatever else ran meanwhile (the machine is shared): the CPU time of
    # all processes, less the two sides measured here and kernel threads.
    others = (busy_ticks() - b0 - (k1 - k0)) / CLK_TCK / wall - server - load
    row["others_cpu"] = round(max(0.0, others), 2)


def cpu_busy_fraction(interval_s=1.0):
    """Busy fraction of all CPUs over `interval_s` (0..1), from /proc/stat."""
    t0, b0 = time.monotonic(), busy_ticks()
    time.sleep(interval_s)
    wall = time.monotonic() - t0
    return min(1.0, (busy_ticks() - b0) / CLK_TCK / wall / (os.cpu_count() or 1))


class QuietBudget:
    """Waiting for other processes to leave the CPUs, bounded over the run."""

    def __init__(self, total_s):
        self.left_s = total_s

    def wait(self, wait_s=QUIET_WAIT_S):
        """Wait (at most `wait_s`, and what is left of the budget) for the
        CPUs to be quiet; the busy fraction last seen."""
        t0 = time.monotonic()
        deadline = t0 + max(0.0, min(wait_s, self.left_s))
        busy = cpu_busy_fraction()
        while busy > QUIET_BUSY_MAX and time.monotonic() < deadline:
            busy = cpu_busy_fraction()
        self.left_s -= time.monotonic() - t0
        return busy


def fdatasync_probe_us(directory, count=100):
    """Median time of appending 4 KiB to a file and fdatasync'ing it, in the
    directory the servers write to: the disk's latency at that moment, which
    bounds every durable figure."""
    path = os.path.join(directory, "fsync-probe")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    times = []
    try:
        for _ in range(count):
            os.write(fd, b"x" * 4096)
            t0 = time.perf_counter()
            os.fdatasync(fd)
            times.append(time.perf_counter() - t0)
    finally:
        os.close(fd)
        os.unlink(path)
    times.sort()
    return round(times[count // 2] * 1e6)
