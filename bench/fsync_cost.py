"""What one durable write costs on this disk, by method: CPU and wall time.

    .venv/bin/python bench/fsync_cost.py [--dir DIR] [--writes N] [--records R] [--cpu C]
                                         [--pause-us P]

The group commit pays one durable write per batch, and what that write
costs, in CPU and in waiting for the disk, depends on how it is made and
on what came before it (docs/PERFORMANCE.md, "What would move the
figures").  This measures, in one process pinned to one CPU (the
server's, by default CPU 0), each way of making a batch of R records
durable that docs/PERFORMANCE.md discusses:

- `leveldb sync=True`: a LevelDB write batch with `sync=True` (LevelDB
  appends to its log, then `fdatasync`), the durable write AccMan's own
  write-ahead log replaces;
- `leveldb sync=False`: the same batch without the sync (the memtable
  inserts and the log's `write`): the part that is not the disk;
- `append + fdatasync`: 4 KiB appended to a growing file, then `fdatasync`;
  the file's size changes, so the inode is written too;
- `overwrite + fdatasync`, `overwrite O_DSYNC`, `overwrite O_DIRECT+O_DSYNC`:
  4 KiB written over a preallocated file whose size does not change;
- `unwritten O_DIRECT+O_DSYNC`: 4 KiB written into a file allocated and
  never written (`posix_fallocate`: unwritten extents on ext4 and XFS), so
  that each write also marks its block written, metadata that an
  overwrite does not have;
- `O_DIRECT+O_DSYNC + leveldb sync=False`: what AccMan's write-ahead log
  does (accman/ledger/wal.py): the record, then LevelDB unsynced.

`--pause-us P` spins P µs before each write, uncounted: a virtual disk may
answer a write that follows an idle spell several times slower than one
that follows another at once, and a server's writes come with gaps
(docs/PERFORMANCE.md, "What would move the figures").  A method whose file
this file system refuses to open (EINVAL: O_DIRECT where it is not
supported) is reported as such.

Figures, never assertions; each method is run twice, interleaved, since the
disk is shared and its latency moves from minute to minute.  Wall time is
given as the mean, median and 90th percentile of the writes, since a disk's
answers can be bimodal.  CPU is the thread's own (`time.thread_time`):
what the kernel does for the write on other threads (interrupts,
workqueues) is not in it.
"""

import argparse
import errno
import mmap
import os
import shutil
import tempfile
import time

import plyvel

from harness.base import nearest_rank
from harness.disk import BLOCK_BYTES, unwritten, zero_filled

PAUSE_US_MAX = 1_000_000    # a second between writes is idle enough for any disk
VALUE_BYTES = 48            # about a history entry's value
ROUNDS = 2


def leveldb_batch(db, records, sync, counter):
    wb = db.write_batch(sync=sync)
    value = b"v" * VALUE_BYTES
    for _ in range(records):
        counter[0] += 1
        wb.put(b"h%016d" % counter[0], value)
    wb.write()


def preallocated(path, writes, flags):
    """A file of `writes` blocks, written and synced once, so that writing
    over it changes neither its size nor its block map."""
    zero_filled(path, BLOCK_BYTES * writes)
    return os.open(path, os.O_RDWR | flags)


def leveldb_method(workdir, writes, records, block, counter, sync, wal_flags=None):
    """A LevelDB batch of `records`, with `sync`; after a log block written
    with `wal_flags` over a preallocated file, if given."""
    def setup():
        path = os.path.join(workdir, "db")
        shutil.rmtree(path, ignore_errors=True)
        db = plyvel.DB(path, create_if_missing=True, write_buffer_size=16 << 20)
        fd = None
        if wal_flags is not None:
            try:
                fd = preallocated(os.path.join(workdir, "wal"), writes, wal_flags)
            except BaseException:
                db.close()          # refused (O_DIRECT): no descriptor is left open
                raise

        def write(i):
            if fd is not None:
                os.pwritev(fd, [block], i * BLOCK_BYTES)
            leveldb_batch(db, records, sync, counter)

        def cleanup():
            db.close()
            if fd is not None:
                os.close(fd)
        return write, cleanup
    return setup


def append_method(workdir, block):
    """4 KiB appended to a growing file, then fdatasync."""
    def setup():
        path = os.path.join(workdir, "append")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND, 0o600)

        def write(_i):
            os.write(fd, block)
            os.fdatasync(fd)
        return write, lambda: os.close(fd)
    return setup


def overwrite_method(workdir, writes, block, flags, sync):
    """4 KiB written over a preallocated file opened with `flags`, then
    fdatasync if `sync`."""
    def setup():
        fd = preallocated(os.path.join(workdir, "over"), writes, flags)

        def write(i):
            os.pwritev(fd, [block], i * BLOCK_BYTES)
            if sync:
                os.fdatasync(fd)
        return write, lambda: os.close(fd)
    return setup


def unwritten_method(workdir, writes, block):
    """4 KiB written O_DIRECT+O_DSYNC into blocks allocated, never written."""
    def setup():
        fd = unwritten(os.path.join(workdir, "unwritten"), BLOCK_BYTES * writes,
                       os.O_DSYNC | os.O_DIRECT)

        def write(i):
            os.pwritev(fd, [block], i * BLOCK_BYTES)
        return write, lambda: os.close(fd)
    return setup


def methods(workdir, writes, records):
    """(name, setup) pairs; setup() returns (write(i), cleanup())."""
    block = mmap.mmap(-1, BLOCK_BYTES)       # page-aligned, as O_DIRECT needs
    block.write(os.urandom(BLOCK_BYTES))
    counter = [0]

    def leveldb(sync, wal_flags=None):
        return leveldb_method(workdir, writes, records, block, counter, sync, wal_flags)

    def overwrite(flags, sync):
        return overwrite_method(workdir, writes, block, flags, sync)

    return [
        (f"leveldb sync=True, {records} records", leveldb(True)),
        (f"leveldb sync=False, {records} records", leveldb(False)),
        ("append 4 KiB + fdatasync", append_method(workdir, block)),
        ("overwrite 4 KiB + fdatasync", overwrite(0, True)),
        ("overwrite 4 KiB, O_DSYNC", overwrite(os.O_DSYNC, False)),
        ("overwrite 4 KiB, O_DIRECT+O_DSYNC", overwrite(os.O_DSYNC | os.O_DIRECT, False)),
        ("unwritten 4 KiB, O_DIRECT+O_DSYNC", unwritten_method(workdir, writes, block)),
        (f"O_DIRECT+O_DSYNC + leveldb sync=False, {records} records",
         leveldb(False, os.O_DSYNC | os.O_DIRECT)),
    ]


def spin(seconds):
    """Busy-waits: a sleep this short would oversleep, and an idle CPU is
    one more thing that changes how soon a write is answered."""
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def measure(setup, writes, pause_s):
    """Per write, in µs: the mean, median and 90th percentile of the wall
    time, and the mean CPU; None if this file system refuses the method's
    file (EINVAL: O_DIRECT where it is not supported)."""
    try:
        write, cleanup = setup()
    except OSError as e:
        if e.errno != errno.EINVAL:
            raise
        return None
    walls, cpu = [], 0.0
    try:
        for i in range(writes):
            if pause_s:
                spin(pause_s)
            t0, c0 = time.perf_counter(), time.thread_time()
            write(i)
            c1, t1 = time.thread_time(), time.perf_counter()
            walls.append(t1 - t0)
            cpu += c1 - c0
    finally:
        cleanup()
    walls.sort()
    return (sum(walls) / writes * 1e6, nearest_rank(walls, 0.5) * 1e6,
            nearest_rank(walls, 0.9) * 1e6, cpu / writes * 1e6)


def row(name, runs):
    """The table's row for a method: each figure as its rounds' values."""
    if any(r is None for r in runs):
        return f"| {name} | not supported by this file system | | | |"
    cells = (" / ".join(f"{r[k]:.0f}" for r in runs) + " µs" for k in range(4))
    return f"| {name} | " + " | ".join(cells) + " |"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dir", default=None,
                   help="where to write (default: a temporary directory under /tmp)")
    p.add_argument("--writes", type=int, default=1000, help="durable writes per method and round")
    p.add_argument("--records", type=int, default=30, help="records per LevelDB batch")
    p.add_argument("--cpu", type=int, default=0, help="the CPU to pin to")
    p.add_argument("--pause-us", type=float, default=0.0,
                   help="µs spun before each write, not counted (default 0)")
    args = p.parse_args(argv)
    if args.writes < 1:
        p.error(f"--writes must be at least 1, not {args.writes}")
    if args.records < 1:
        p.error(f"--records must be at least 1, not {args.records}")
    if not 0 <= args.pause_us <= PAUSE_US_MAX:
        p.error(f"--pause-us must be from 0 to {PAUSE_US_MAX}, not {args.pause_us:g}")
    args.pause_us += 0.0            # so that -0 is printed as 0
    if args.cpu not in os.sched_getaffinity(0):
        p.error(f"--cpu {args.cpu} is not a CPU this process may run on "
                f"({', '.join(map(str, sorted(os.sched_getaffinity(0))))})")
    if args.dir is not None and not os.path.isdir(args.dir):
        p.error(f"--dir {args.dir} is not a directory")
    os.sched_setaffinity(0, {args.cpu})
    workdir = tempfile.mkdtemp(prefix="accman-fsync-", dir=args.dir)
    try:
        table = methods(workdir, args.writes, args.records)
        figures = {name: [] for name, _ in table}
        for _ in range(ROUNDS):
            for name, setup in table:
                figures[name].append(measure(setup, args.writes, args.pause_us * 1e-6))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    print(f"{args.writes} durable writes per method and round, {ROUNDS} rounds, "
          f"{args.pause_us:g} µs spun before each, pinned to CPU {args.cpu}, "
          f"in {os.path.dirname(workdir)}\n")
    print("| method | wall per write, mean | median | 90th percentile | CPU per write |")
    print("|---|---:|---:|---:|---:|")
    for name, runs in figures.items():
        print(row(name, runs))


if __name__ == "__main__":
    main()
