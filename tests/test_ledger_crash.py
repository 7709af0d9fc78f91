"""Crash test: a child process runs keyed mods through group commit from
tasks and threads and prints each acknowledged mod; it is killed with
SIGKILL at random moments, several rounds, each round retrying the previous
round's keys.  After each round the store must hold every acknowledged mod
exactly once, with gapless seqs and balances equal to their history.

With holds (some settled, some left to expire, killed between a hold and
its settle and while holds expire), each round must also show every
acknowledged hold and settle, no hold ended twice, every hold due ended,
and exactly one event per history entry, ids without a gap."""

import os
import random
import signal
import subprocess
import sys
import time
import zlib
from pathlib import Path

from accman import Ledger
from accman.ledger import keyfile, wal
from accman.limits import EVENTS_LIMIT_MAX

sys.path.insert(0, str(Path(__file__).parent / "crash"))
from ledger_child import CREDS, hold_of, mod_of  # noqa: E402

HERE = Path(__file__).parent
# `just crash` sets ACCMAN_CRASH_LONG=1 for many more rounds.
ROUNDS = 50 if os.environ.get("ACCMAN_CRASH_LONG") == "1" else 5


def run_round(path, round_no, rnd, wal_bytes_max=None, holds=False):
    """The child's acknowledged mods [(cred, seq, by, key)]; with holds,
    (mods, holds [(cred, hold, tot, by, ttl, key)], settles [(cred, hold,
    use, tot, seq, key)])."""
    argv = [sys.executable, str(HERE / "crash" / "ledger_child.py"), path, str(round_no)]
    if wal_bytes_max is not None:
        argv.append(str(wal_bytes_max))
    if holds:
        argv.append("--holds")
    child = subprocess.Popen(
        argv,
        stdout=subprocess.PIPE, text=True, bufsize=1)
    assert child.stdout.readline().strip() == "READY"
    # Longer with holds: some of their ttls (1 to 3 s) run out in the round.
    time.sleep(rnd.uniform(0.2, 2.5) if holds else rnd.uniform(0.2, 1.0))
    child.send_signal(signal.SIGKILL)
    out, _ = child.communicate(timeout=30)
    assert child.returncode == -signal.SIGKILL
    lines = {"A": [], "H": [], "S": []}
    for line in out.splitlines():
        parts = line.split()
        # A line cut by the kill is incomplete: only whole lines count.
        if parts and line == " ".join(parts) and len(parts) == {"A": 5}.get(parts[0], 7):
            lines[parts[0]].append(tuple(int(p) if p.lstrip("-").isdigit() else p
                                         for p in parts[1:]))
    return (lines["A"], lines["H"], lines["S"]) if holds else lines["A"]


PAGE_BYTES = 4096


def garble_unsynced_tails(path, rnd):
    """What a power cut may leave on a file system without a journal: of
    what LevelDB wrote to its logs after the last checkpoint (never synced),
    some pages written, others not (garbage: old blocks), in any order, and
    garbage past the end.  Valid records after garbage make LevelDB's log
    damaged, not torn (accman.fsck).  Returns the number of pages garbled."""
    ckpt = wal.read_checkpoint(path, wal.Keys.of(keyfile.read_key(path)))
    garbled = 0
    for log in sorted(Path(path).glob("*.log")):
        synced = ckpt.logs.get(log.name, 0)
        raw = bytearray(log.read_bytes())
        assert len(raw) >= synced, f"{log.name} is shorter than its synced length"
        if len(raw) == synced:
            continue
        # The first page after the synced bytes (its synced part kept), then
        # every other page at random, then one more past the end.
        first = synced // PAGE_BYTES * PAGE_BYTES
        raw += bytes(PAGE_BYTES)
        for page in range(first, len(raw), PAGE_BYTES):
            if page == first or rnd.random() < 0.5:
                start = max(page, synced)
                end = min(page + PAGE_BYTES, len(raw))
                raw[start:end] = rnd.randbytes(end - start)
                garbled += 1
        log.write_bytes(bytes(raw))
    return garbled


def test_acknowledged_mods_survive_kill_9(tmp_path):
    check_rounds(str(tmp_path / "data"), power_cut=False)


def test_acknowledged_mods_survive_a_power_cut_that_garbles_unsynced_log_tails(tmp_path):
    """LevelDB is written without sync: the write-ahead log (accman.wal)
    makes each batch durable.  A small log wraps, and takes a checkpoint,
    many times a round, so kills land around checkpoints too."""
    garbled = check_rounds(str(tmp_path / "data"), power_cut=True, wal_bytes_max=64 * 1024)
    assert garbled > 0, "no round left unsynced bytes: recovery was not tested"


def check_rounds(path, power_cut, wal_bytes_max=None):
    rnd = random.Random(int(os.environ.get("ACCMAN_CRASH_SEED", "20261125")))
    all_acked = {}
    garbled = 0
    for round_no in range(ROUNDS):
        acked = run_round(path, round_no, rnd, wal_bytes_max)
        assert acked, "the child acknowledged nothing before it was killed"
        if power_cut:
            garbled += garble_unsynced_tails(path, rnd)
        for cred, seq, by, key in acked:
            # A retried key is answered with its first (cred, seq).
            assert all_acked.setdefault(key, (cred, seq, by)) == (cred, seq, by)
        with Ledger(path) as led:
            led.verify()        # gapless seqs, tot = previous tot + by, keys match
            history = {}
            for cred in {c for c, _, _ in all_acked.values()}:
                entries = led.past(cred, limit=1000)
                page = entries
                while len(page) == 1000 and page[-1].seq > 1:
                    page = led.past(cred, limit=1000, before=page[-1].seq)
                    entries += page
                assert [e.seq for e in entries] == list(range(len(entries), 0, -1))
                assert led.tot(cred) == sum(e.by for e in entries)
                for e in entries:
                    history[(cred, e.seq)] = e
                keys = [e.key for e in entries]
                assert len(keys) == len(set(keys)), "a key was applied twice"
            for key, (cred, seq, by) in all_acked.items():
                e = history.get((cred, seq))
                assert e is not None, f"acknowledged {key} lost"
                assert (e.by, e.key) == (by, key)
            # every entry is a mod the children asked for
            for e in history.values():
                h = zlib.crc32(e.key.encode())
                assert abs(e.by) == h % 997 + 1
    return garbled


def test_holds_settles_and_events_survive_kill_9(tmp_path):
    """Holds, settles and expiries under SIGKILL: killed between a hold and
    its settle, while holds expire, and while the holds due at open end."""
    counts = holds_rounds(str(tmp_path / "data"), power_cut=False)
    assert counts["settles"] > 0 and counts["expired"] > 0, counts


def test_holds_survive_a_power_cut_that_garbles_unsynced_log_tails(tmp_path):
    """The same, with a 64 KiB write-ahead log that wraps many times a
    round, and LevelDB's unsynced pages garbled after each kill."""
    counts = holds_rounds(str(tmp_path / "data"), power_cut=True, wal_bytes_max=64 * 1024)
    assert counts["garbled"] > 0 and counts["expired"] > 0, counts


def holds_rounds(path, power_cut, wal_bytes_max=None):
    rnd = random.Random(int(os.environ.get("ACCMAN_CRASH_SEED", "20261202")))
    acked = {}                  # key -> what its acknowledgements said
    counts = {"holds": 0, "settles": 0, "expired": 0, "garbled": 0}
    for round_no in range(ROUNDS):
        mods, holds, settles = run_round(path, round_no, rnd, wal_bytes_max, holds=True)
        assert mods and holds, "the child acknowledged no hold before it was killed"
        if power_cut:
            counts["garbled"] += garble_unsynced_tails(path, rnd)
        for cred, seq, by, key in mods:
            assert acked.setdefault(key, ("A", cred, seq, by)) == ("A", cred, seq, by)
        for cred, hold, tot, by, ttl, key in holds:
            assert acked.setdefault(key, ("H", cred, hold, tot, by, ttl)) == (
                "H", cred, hold, tot, by, ttl)
        for cred, hold, use, tot, seq, key in settles:
            assert acked.setdefault(("S", key), (cred, hold, use, tot, seq)) == (
                cred, hold, use, tot, seq)
        counts.update(check_holds_round(path, acked))
    return counts


def check_holds_round(path, acked):
    """Opens the store (holds due end there) and checks it against the
    acknowledgements; returns how many holds, settles and expiries it has.
    The clock stops at the open: holds falling due while the check reads
    would end between its reads of the histories and of the events."""
    now_ms = time.time_ns() // 1_000_000
    with Ledger(path, clock_ms=lambda: now_ms) as led:
        led.verify()            # one start and at most one end per hold; events gapless
        entries = {}
        for cred in CREDS:
            past = led.past(cred, limit=1000) or []
            while len(past) % 1000 == 0 and past and past[-1].seq > 1:
                past += led.past(cred, limit=1000, before=past[-1].seq)
            entries[cred] = past[::-1]
        ends = {}
        for cred, history in entries.items():
            assert [e.seq for e in history] == list(range(1, len(history) + 1))
            if history:
                assert led.tot(cred) == sum(e.by for e in history) == history[-1].tot
            for e in history:
                check_entry(cred, e, history, ends)
        for key, what in acked.items():
            check_acknowledged(key, what, entries, ends)
        # Every hold due (its second after the ttl passed) has ended.
        for cred, history in entries.items():
            for e in history:
                if e.hold == e.seq and (cred, e.seq) not in ends:
                    ttl = hold_of(e.key)[2]
                    assert e.at + ttl * 1000 > now_ms - 1000, f"hold {cred} {e.seq} due, open"
        # One event per entry, no more: the same durable batch.
        events, after = [], 0
        while True:
            page, after = led.events(after=after, limit=EVENTS_LIMIT_MAX)
            if not page:
                break
            events += page
        assert [e.id for e in events] == list(range(1, len(events) + 1))
        account = {led.account_id(c): c for c in entries if entries[c]}
        named = sorted((account[e.account], e.seq) for e in events)
        assert named == sorted((c, e.seq) for c, h in entries.items() for e in h)
        kinds = [e.type for e in events]
        return {"holds": kinds.count("hold"), "settles": kinds.count("settle"),
                "expired": kinds.count("expire")}


def check_entry(cred, e, history, ends):
    """An entry is a change the child asked for: a keyed mod or hold, or
    the end of a hold (a settle with its key's use, or an expiry)."""
    if e.key is not None:
        spec = hold_of(e.key)
        if spec is None:
            assert (mod_of(e.key)[:2], e.hold) == ((cred, e.by), None), e
        else:
            assert (spec[:2], e.hold) == ((cred, e.by), e.seq), e
        return
    start = history[e.hold - 1]
    assert e.hold < e.seq and start.hold == start.seq, e
    assert (cred, e.hold) not in ends, f"hold {cred} {e.hold} ended twice"
    amount = -start.by
    use = hold_of(start.key)[3]
    assert e.by == amount or e.by == amount - use, (e, start)     # expired, or settled
    ends[(cred, e.hold)] = e


def check_acknowledged(key, what, entries, ends):
    """`key` is a change's key, or ("S", key) for the settle of its hold."""
    if isinstance(key, tuple):
        cred, hold, use, tot, seq = what
        end = ends.get((cred, hold))
        assert end is not None, f"acknowledged settle {key} lost"
        assert (end.seq, end.tot) == (seq, tot) and end.by == -entries[cred][hold - 1].by - use
        return
    kind, cred, seq, *rest = what
    assert seq <= len(entries[cred]), f"acknowledged {key} lost"
    e = entries[cred][seq - 1]
    assert e.key == key, f"acknowledged {key} lost: seq {seq} is {e}"
    if kind == "H":
        tot, by, _ttl = rest
        assert (e.hold, e.tot, e.by) == (seq, tot, by)
    else:
        assert e.by == rest[0]
