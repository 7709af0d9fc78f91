"""LevelDB's compaction behind the request path, when asked for
(`accman serve --compaction-nice N`).

LevelDB compacts (a full memtable's flush, then the merges of its tables)
on one background thread per process, started by whichever thread first
schedules a compaction, at that thread's priority.  On the core it shares
with the loop, a compaction at the same priority takes half of it for tens
of milliseconds at a time, and the mods read meanwhile wait: part of the
durable /mod tail (docs/PERFORMANCE.md).  So a server asked to starts that
thread itself, from a thread at nice N (start_behind): the loop, the writer
and the applier take the core before it, and it has what they leave.

Starved, compaction would fall behind until LevelDB stops its writers (a
full memtable while the one before is not yet flushed, or too many level-0
tables) for as long as a whole compaction takes: a second under a load
that keeps the core busy.  A thread's priority cannot be raised again
without privilege, so the loop gives way instead (Watch.give_way): after a
batch, at most every CHECK_INTERVAL_S, it reads the thread's run time, its
wait for a core and its state (schedstat and stat), and sleeps while the
thread has had less than its share (`share`) of the time it wanted a core:
a small share while LevelDB keeps up, half of it once its level 0 grows.

That holds the request path back, not other processes: beside a busy
process of the same scheduling group (one container or cgroup, one
session under autogroup) a lowered compaction falls behind whatever the
loop does, and LevelDB stops its writers for up to a second.  Hence not
the default: for a host or cgroup where AccMan runs alone.  Linux only,
and only where a thread's schedstat can be read: elsewhere the thread runs
at the priority it has and no loop gives way."""

from __future__ import annotations

import logging
import os
import tempfile
import threading
import time

import plyvel

from accman.limits import NICE_MAX

log = logging.getLogger("accman.ledger.background")

# Of the time compaction wants a core, the share the loop lets it have
# (settle): SHARE_MIN while LevelDB's level 0 holds at most LEVEL0_FILES_OK
# tables (it starts compacting them at 4), which is less than it has at
# a low nice beside a loop that is not busy all the time, so that the
# loop does not sleep then; SHARE_BEHIND past it, well before LevelDB slows
# its writers (8 tables) and stops them (12).
SHARE_MIN = 0.2
SHARE_BEHIND = 0.5
LEVEL0_FILES_OK = 4
# How often the loop looks at the thread, and the most of the interval
# between two looks that a thread found runnable at both is taken to have
# wanted (looks come after batches, which may be far apart); the most it
# owes it (so that the
# loop sleeps at most OWED_S_MAX / (1 - SHARE) at once) and the most it may
# have had beyond its share (so that a quiet minute does not pay for the
# next burst).
CHECK_INTERVAL_S = 0.002
LOOK_GAP_S_MAX = 4 * CHECK_INTERVAL_S
OWED_S_MAX = 0.001
CREDIT_S_MAX = 0.020
# Shorter sleeps are not worth the system call.
SLEEP_S_MIN = 50e-6

_started = threading.Lock()
_tid: int | None = None     # the thread start_behind started; 0 if it did not


def start_behind(nice: int) -> bool:
    """Starts LevelDB's background thread at `nice` (1..19), once per
    process, before the first store opens.  False when it was already
    running (a store of this process compacted before) or this system does
    not allow it: it then runs at the priority it has, and no loop gives way."""
    assert 1 <= nice <= NICE_MAX, nice
    global _tid
    with _started:
        if _tid is None:
            _tid = _start(nice) or 0
        return _tid != 0


def watch(level0_files) -> Watch | None:
    """A committer's Watch of the thread that start_behind started, or
    None; `level0_files()` counts the tables in its store's level 0."""
    return Watch(_tid, level0_files) if _tid else None


def _start(nice: int) -> int | None:
    tasks = "/proc/self/task"
    if not os.path.isdir(tasks):
        log.warning("LevelDB's compaction runs at the default priority: no %s here", tasks)
        return None
    before = set(os.listdir(tasks))
    starter_tid = []
    failure = []
    after = []                      # the threads, listed by the starter as it ends

    def schedule() -> None:
        tid = threading.get_native_id()
        starter_tid.append(str(tid))
        try:
            with open(f"{tasks}/{tid}/schedstat", "rb") as f:
                f.read()        # without it no loop could give way: not lowered
            os.setpriority(os.PRIO_PROCESS, tid, nice)
            with tempfile.TemporaryDirectory(prefix="accman-leveldb-") as path:
                db = plyvel.DB(path, create_if_missing=True)
                try:
                    db.compact_range()   # a memtable's flush: LevelDB's first Schedule
                finally:
                    db.close()
        except (OSError, plyvel.Error) as e:
            failure.append(e)
        finally:
            # Listed while the starter still runs: a thread that has ended
            # may linger in the list, and its id may be given to another.
            after.extend(os.listdir(tasks))

    starter = threading.Thread(target=schedule, name="accman-leveldb-start")
    starter.start()
    starter.join()
    # Found even when the throwaway store failed after LevelDB started it:
    # lowered, it must be given way to.
    new = set(after) - before - set(starter_tid)
    started = [int(t) for t in new if _nice_of(int(t)) == nice]
    if len(started) == 1:
        return started[0]
    why = failure[0] if failure else (
        f"its thread was already running in this process ({len(started)} of {len(new)} "
        f"new threads at nice {nice})")
    log.warning("LevelDB's compaction runs at the default priority: %s", why)
    return None


def _nice_of(tid: int) -> int | None:
    try:
        return os.getpriority(os.PRIO_PROCESS, tid)
    except OSError:
        return None     # a thread that has ended


def share(level0_files: int | None) -> float:
    """The share of the time it wants a core that compaction is let have,
    with LevelDB's level 0 holding `level0_files` tables (None: not known)."""
    return SHARE_MIN if level0_files is not None and level0_files <= LEVEL0_FILES_OK \
        else SHARE_BEHIND


def settle(owed_s: float, ran_s: float, wanted_s: float, share_: float) -> float:
    """The run time the thread is owed (less than 0: what it has had beyond
    `share_`) after a look that found it ran `ran_s` of the `wanted_s` it
    wanted a core since the one before; nothing owed while it wants none."""
    if wanted_s <= 0:
        return min(owed_s, 0.0)
    owed_s += share_ * max(wanted_s, ran_s) - ran_s
    return min(max(owed_s, -CREDIT_S_MAX), OWED_S_MAX)


class Watch:
    """One committer's look at LevelDB's background thread; give_way is
    called on the loop, which it alone uses."""

    def __init__(self, tid: int, level0_files):
        self._level0_files = level0_files       # () -> LevelDB's level-0 tables
        self._schedstat = f"/proc/self/task/{tid}/schedstat"
        self._stat = f"/proc/self/task/{tid}/stat"
        self._looked = 0.0             # the last look's time
        self._seen: tuple[int, int, bool] | None = None    # _sample's
        self.owed_s = 0.0               # settle's
        self.slept_s = 0.0              # all the loop's sleeps for it (/metrics)
        self._share = SHARE_MIN

    def give_way(self) -> float:
        """After a batch, on the loop: sleeps while the thread has the core
        it is owed (see the module's doc); the seconds slept."""
        if time.monotonic() - self._looked < CHECK_INTERVAL_S:
            return 0.0
        self._look()
        slept = 0.0
        if self.owed_s >= SLEEP_S_MIN:
            # It runs while the loop sleeps, and is owed its share of that too.
            t0 = time.monotonic()
            time.sleep(self.owed_s / (1 - self._share))
            slept = time.monotonic() - t0
            self.slept_s += slept
            self._look()
        return slept

    def _look(self) -> None:
        """What it ran and waited for a core since the last look.  Linux
        counts a wait in schedstat once the thread runs, so one found
        runnable at both looks is taken to have wanted the core since the
        last one (LOOK_GAP_S_MAX at most); a look that cannot read it
        forgets what is owed."""
        now, seen, since = time.monotonic(), self._seen, self._looked
        self._seen, self._looked = self._sample(), now
        if self._seen is None:
            self.owed_s = min(self.owed_s, 0.0)
            return
        runnable = self._seen[2]
        self._share = share(self._level0_files()) if runnable else SHARE_MIN
        if seen is None:
            return          # a baseline
        ran_s = (self._seen[0] - seen[0]) / 1e9
        wanted_s = ran_s + (self._seen[1] - seen[1]) / 1e9
        if runnable and seen[2]:
            wanted_s = max(wanted_s, min(now - since, LOOK_GAP_S_MAX))
        self.owed_s = settle(self.owed_s, ran_s, wanted_s, self._share)

    def _sample(self) -> tuple[int, int, bool] | None:
        """Its run time and its waits for a core (ns), and whether it is
        runnable now; None if they cannot be read."""
        try:
            with open(self._schedstat, "rb") as f:
                ran, waited = (int(v) for v in f.read().split()[:2])
            with open(self._stat, "rb") as f:
                state = f.read().rsplit(b")", 1)[1].split()[0]
        except (OSError, ValueError, IndexError):
            return None
        return ran, waited, state == b"R"
