"""Power loss, emulated (issue 11 item 17): the writes and syncs of a short
run are recorded (strace), the states a power cut could leave are built
from what was synced plus torn prefixes of the rest (tests/crash/powercut.py
says how, and what it does not model), and each is opened.  Every state
must open, with every mod acknowledged before the cut, and pass verify:
power loss never makes a store refuse, nor lose an acknowledged mod.

The run makes a new store (the directory, the key file, LevelDB's first
files), writes keyed mods with a small write-ahead log that wraps and takes
checkpoints, stops without closing, then reopens it (recovery: the replay,
the cut, the checkpoint) and writes more.  The short form samples states;
ACCMAN_CRASH_LONG=1 (`just powercut`) takes every crash point, longer runs
and more states at each."""

import os
import random
import shutil
import sys
from pathlib import Path

import pytest

from accman import Ledger
from conftest import server_env
from crash import powercut

HERE = Path(__file__).parent
LONG = os.environ.get("ACCMAN_CRASH_LONG") == "1"
SEED = int(os.environ.get("ACCMAN_CRASH_SEED", "20261201"))
PHASES = 3 if LONG else 2
MODS_PER_THREAD = 40 if LONG else 8
STATES = None if LONG else 160          # sampled crash points; None: all
KINDS = ("synced", "torn", "all")


def run_traced(root: Path, tmp_path: Path) -> list[str]:
    """The child's phases under strace; returns the trace files."""
    if shutil.which("strace") is None:
        pytest.fail("strace is missing: apt-get install strace (the power-loss "
                    "emulation records the store's syscalls with it)")
    traces = []
    for phase in range(PHASES):
        trace = str(tmp_path / f"trace-{phase}.txt")
        done = powercut.record(
            [sys.executable, str(HERE / "crash" / "powercut_child.py"), str(root / "data"),
             str(phase), str(MODS_PER_THREAD)], trace, server_env(), timeout_s=300)
        assert done.returncode == 0, done.stderr[-2000:]
        traces.append(trace)
    return traces


def acked_of(lines):
    out = []
    for line in lines:
        parts = line.split()
        assert len(parts) == 5 and parts[0] == "A", line
        out.append((parts[1], int(parts[2]), int(parts[3]), parts[4]))
    return out


def check_state(state: dict, acked: list, where: Path) -> str | None:
    """None if the state opens with every acknowledged mod; else what went wrong."""
    powercut.materialize(state, str(where))
    try:
        led = Ledger(str(where / "data"))
    except Exception as e:          # noqa: BLE001 - any refusal is the finding
        return f"refused: {type(e).__name__}: {e}"
    try:
        for cred, seq, by, key in acked:
            page = led.past(cred, limit=1, before=seq + 1)
            if not page or (page[0].seq, page[0].by, page[0].key) != (seq, by, key):
                return f"lost acknowledged {key} ({cred} seq {seq})"
        led.verify()
    except Exception as e:          # noqa: BLE001
        return f"opened, then {type(e).__name__}: {e}"
    finally:
        led.close()
    return None


def test_every_power_cut_state_opens_with_every_acknowledged_mod(tmp_path):
    root = tmp_path / "run"
    root.mkdir()
    traces = run_traced(root, tmp_path)
    calls = [list(powercut.parse(t)) for t in traces]
    points = sum(len(c) for c in calls)
    rnd = random.Random(SEED)
    chosen = set(range(points)) if STATES is None else set(rnd.sample(range(points), STATES))
    disk = powercut.Disk(str(root))
    failures, checked = [], 0
    where = tmp_path / "state"

    def check(point, kinds):
        nonlocal checked
        acked = acked_of(disk.acks)
        for kind in kinds:
            checked += 1
            problem = check_state(disk.snapshot(rnd, kind), acked, where)
            if problem:
                failures.append((point, kind, len(acked), problem))

    i = 0
    for phase_calls in calls:
        for call in phase_calls:
            if i in chosen:
                disk.on_dsync = lambda i=i: check(f"{i} (during)", ["torn"])
            disk.feed(call)
            disk.on_dsync = None
            if i in chosen:
                check(i, KINDS if LONG else [rnd.choice(KINDS)])
            i += 1
        disk.process_exited()
    check("end", KINDS)
    total_acked = len(acked_of(disk.acks))
    print(f"power-loss emulation: {points} calls, {checked} states, "
          f"{total_acked} acknowledged mods, {len(failures)} failures")
    for failure in failures:
        print("power-loss state failed:", failure)
    assert total_acked == PHASES * 3 * MODS_PER_THREAD
    assert failures == [], failures[:5]


def test_a_creation_cut_short_is_made_again_and_nothing_else_is(tmp_path):
    """What the emulation found: a power cut while a new store writes its
    first files can leave the pending key file and part of MANIFEST-000001
    without CURRENT.  Nothing was stored there yet: the open makes the
    store again (with the key already written).  A MANIFEST that is not that prefix is
    not a creation cut short, and is refused."""
    from accman.errors import StoreCorrupt
    from accman.ledger import datadir, keyfile

    made = tmp_path / "made"
    with Ledger(str(made)):
        pass
    first = datadir._first_manifest()
    for keep in (0, 10, len(first)):
        path = tmp_path / f"cut-{keep}"
        path.mkdir()
        shutil.copy(made / keyfile.KEY_NAME, path / keyfile.PENDING_NAME)   # sealed after
        (path / "MANIFEST-000001").write_bytes(first[:keep])
        (path / "CURRENT.dbtmp").write_bytes(b"MANIF")
        with Ledger(str(path)) as led:
            assert led.store.salt == keyfile.read_key(str(made))
            assert led.mod("alice", 3) == (3, 1)
        with Ledger(str(path)) as led:
            assert led.tot("alice") == 3
    path = tmp_path / "foreign"
    path.mkdir()
    (path / "MANIFEST-000001").write_bytes(b"not the first manifest")
    with pytest.raises(StoreCorrupt, match="LevelDB files without CURRENT"):
        Ledger(str(path))


def hx(b: bytes) -> str:
    """strace -xx's form of bytes."""
    return "".join(f"\\x{c:02x}" for c in b)


def test_a_write_the_process_was_killed_inside_is_written_never_synced(tmp_path):
    """strace ends a call the process was killed inside with "= ? <unavailable>"
    (an applier's LevelDB write at the moment of SIGKILL): the model takes
    its data as written, never durable, even on an O_DSYNC descriptor, and
    takes any other such call as not made.  Parsing it as a length broke
    the emulation."""
    root = str(tmp_path / "r")
    path = f"{root}/f"
    fd = f"7<{hx(path.encode())}>"
    disk = powercut.Disk(root)
    disk.feed(powercut.Call("openat", ["AT_FDCWD</>", f'"{hx(path.encode())}"',
                                       "O_WRONLY|O_CREAT|O_DSYNC", "0600"], fd))
    disk.feed(powercut.Call("write", [fd, f'"{hx(b"abcd")}"', "4"], "? <unavailable>"))
    disk.feed(powercut.Call("fsync", [fd], "? <unavailable>"))
    f = disk.files[disk.names[path]]
    assert bytes(f.current) == b"abcd" and bytes(f.synced) == b""


def test_a_file_removed_while_open_is_followed_to_its_close(tmp_path):
    """strace names the descriptor of a file removed while open
    `7</path>(deleted)` (LevelDB closes the log it has just removed once
    its memtable is a table): the model parses it, and the removed file's
    data is in no state.  Taking it for an unparsable descriptor stopped
    every emulation long enough to reach LevelDB's own log rotation."""
    root = str(tmp_path / "r")
    path = f"{root}/000003.log"
    fd = f"7<{hx(path.encode())}>"
    disk = powercut.Disk(root)
    disk.feed(powercut.Call("openat", ["AT_FDCWD</>", f'"{hx(path.encode())}"',
                                       "O_WRONLY|O_CREAT", "0644"], fd))
    disk.feed(powercut.Call("write", [fd, f'"{hx(b"abcd")}"', "4"], "4"))
    disk.feed(powercut.Call("unlink", [f'"{hx(path.encode())}"'], "0"))
    disk.feed(powercut.Call("fsync", [fd + "(deleted)"], "0"))
    disk.feed(powercut.Call("close", [fd + "(deleted)"], "0"))
    assert 7 not in disk.fds
    assert disk.snapshot(random.Random(1), "all") == {}
