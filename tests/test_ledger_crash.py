"""Crash test: a child process runs keyed mods through group commit from
tasks and threads and prints each acknowledged mod; it is killed with
SIGKILL at random moments, several rounds, each round retrying the previous
round's keys.  After each round the store must hold every acknowledged mod
exactly once, with gapless seqs and balances equal to their history."""

import os
import random
import signal
import subprocess
import sys
import time
import zlib
from pathlib import Path

from accman import Ledger

HERE = Path(__file__).parent
# `just crash` sets ACCMAN_CRASH_LONG=1 for many more rounds.
ROUNDS = 50 if os.environ.get("ACCMAN_CRASH_LONG") else 5


def run_round(path, round_no, rnd):
    child = subprocess.Popen(
        [sys.executable, str(HERE / "crash" / "ledger_child.py"), path, str(round_no)],
        stdout=subprocess.PIPE, text=True, bufsize=1)
    assert child.stdout.readline().strip() == "READY"
    time.sleep(rnd.uniform(0.2, 1.0))
    child.send_signal(signal.SIGKILL)
    out, _ = child.communicate(timeout=30)
    assert child.returncode == -signal.SIGKILL
    acked = []
    for line in out.splitlines():
        parts = line.split()
        # A line cut by the kill is incomplete: only whole lines count.
        if len(parts) == 5 and parts[0] == "A" and line == " ".join(parts):
            acked.append((parts[1], int(parts[2]), int(parts[3]), parts[4]))
    return acked


def test_acknowledged_mods_survive_kill_9(tmp_path):
    path = str(tmp_path / "data")
    rnd = random.Random(int(os.environ.get("ACCMAN_CRASH_SEED", "20261125")))
    all_acked = {}
    for round_no in range(ROUNDS):
        acked = run_round(path, round_no, rnd)
        assert acked, "the child acknowledged nothing before it was killed"
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
            for (cred, _), e in history.items():
                h = zlib.crc32(e.key.encode())
                assert abs(e.by) == h % 997 + 1
