"""Which CPUs take the interrupts of the disk the servers write to.

On a VM a CPU that has halted takes its device's completions late (the host
must wake it first), so a durable figure depends on how busy the CPU that
takes the disk's interrupts is kept: on the VMs of December 2026 that was
the load generator's (docs/PERFORMANCE.md, "What would move the
figures").  How late depends on whether an idle CPU polls before it halts
(the guest's `haltpoll` cpuidle governor and its `guest_halt_poll_ns`):
AccMan's and Redis's durable figures move with it.  The report says
where the interrupts went during the durable figures, and how the CPUs
idled.  Everything here reads /sys and /proc; the parsing does no I/O.
"""

import os

SYS_ROOT = "/sys"
PROC_INTERRUPTS = "/proc/interrupts"
CPUIDLE_DIR = "devices/system/cpu/cpuidle"          # under SYS_ROOT
HALT_POLL_NS = "module/haltpoll/parameters/guest_halt_poll_ns"


def disk_irqs(directory, sys_root=SYS_ROOT):
    """The interrupt numbers of the device that holds `directory`: those of
    the nearest device above its block device in sysfs with MSI interrupts
    (virtio, NVMe) or a legacy `irq`; [] when `directory` is on no block
    device (tmpfs, overlay) or sysfs does not say."""
    dev = os.stat(directory).st_dev
    link = os.path.join(sys_root, "dev", "block", f"{os.major(dev)}:{os.minor(dev)}")
    if not os.path.exists(link):
        return []
    devices = os.path.join(os.path.realpath(sys_root), "devices")
    path = os.path.realpath(link)
    while path.startswith(devices + os.sep):
        msi = os.path.join(path, "msi_irqs")
        if os.path.isdir(msi):
            return sorted(int(name) for name in os.listdir(msi) if name.isdigit())
        legacy = os.path.join(path, "irq")
        if os.path.isfile(legacy):
            with open(legacy) as f:
                irq = int(f.read().strip() or 0)
            if irq > 0:
                return [irq]
        path = os.path.dirname(path)
    return []


def per_cpu(irqs, text):
    """The interrupts each CPU has taken, summed over `irqs`, from the text of
    /proc/interrupts (a header of CPU names, then `N: count count ... name`)."""
    lines = text.splitlines()
    counts = [0] * len(lines[0].split())
    wanted = {str(irq) for irq in irqs}
    for line in lines[1:]:
        label, _, rest = line.partition(":")
        if label.strip() in wanted:
            fields = rest.split()
            for cpu in range(len(counts)):
                counts[cpu] += int(fields[cpu])
    return counts


def read_per_cpu(irqs):
    with open(PROC_INTERRUPTS) as f:
        return per_cpu(irqs, f.read())


def shares(before, after):
    """Each CPU's share of the interrupts taken between two readings of
    `per_cpu`; None when there were none."""
    taken = [a - b for a, b in zip(after, before, strict=True)]
    total = sum(taken)
    return None if total <= 0 else [n / total for n in taken]


def describe(taken):
    """`shares` as text: "CPU 0 2%, CPU 1 98%"."""
    return ", ".join(f"CPU {cpu} {share:.0%}" for cpu, share in enumerate(taken))


def _read_word(path):
    try:
        with open(path) as f:
            return f.read().strip() or None
    except OSError:
        return None


def idle_polling(sys_root=SYS_ROOT):
    """How the CPUs idle: {"driver", "governor", "halt_poll_ns"}, each None
    where sysfs does not say (no cpuidle directory, no haltpoll governor
    loaded, or a file that cannot be read)."""
    idle = os.path.join(sys_root, CPUIDLE_DIR)
    poll = _read_word(os.path.join(sys_root, HALT_POLL_NS))
    return {"driver": _read_word(os.path.join(idle, "current_driver")),
            "governor": (_read_word(os.path.join(idle, "current_governor"))
                         or _read_word(os.path.join(idle, "current_governor_ro"))),
            "halt_poll_ns": int(poll) if poll is not None and poll.isdigit() else None}


def describe_idle(idle):
    """`idle_polling` as text: the driver and governor, and under the
    haltpoll governor how long an idle CPU polls before it halts (other
    governors choose for themselves)."""
    if not idle or idle["driver"] is None:
        return "sysfs does not say how the CPUs idle"
    if idle["driver"] == "none":
        return "no cpuidle driver (an idle CPU halts at once)"
    text = f"cpuidle driver {idle['driver']}, governor {idle['governor'] or 'unknown'}"
    ns = idle["halt_poll_ns"]
    if ns is None or idle["governor"] != "haltpoll":
        return text         # the window is the haltpoll governor's alone
    if ns == 0:
        return f"{text}, guest_halt_poll_ns 0 (an idle CPU halts at once)"
    window = f"{ns:,} ns" if ns < 10_000 else f"{ns / 1000:,.0f} µs"
    return f"{text}, guest_halt_poll_ns {ns} (an idle CPU polls up to {window} first)"
