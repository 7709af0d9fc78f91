"""Which CPUs take the interrupts of the disk the servers write to.

On a VM a CPU that has halted takes its device's completions late (the host
must wake it first), so a durable figure depends on how busy the CPU that
takes the disk's interrupts is kept: on the VMs of December 2026 that was
the load generator's (docs/PERFORMANCE.md, "What would move the
figures").  The report says where they went during the durable figures.
Everything here reads /sys and /proc; the parsing does no I/O.
"""

import os

SYS_ROOT = "/sys"
PROC_INTERRUPTS = "/proc/interrupts"


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
