"""A Ledger that is closing or closed refuses every call the same way:
NotApplied (an Unavailable that says nothing of the call applied), "the
ledger is closing" from the start of `close`, "the ledger is closed" once
it has returned; no call reaches plyvel's own errors, and
close waits for the reads in flight before it closes LevelDB."""

import asyncio
import errno
import inspect
import linecache
import signal
import sys
import threading
import time

import pytest

from accman import Ledger, NotApplied, StoreError, Unavailable
from accman.ledger import _ledger, plyvel_errors
from accman.ledger.commit import Committer
from accman.ledger.events import EventLog
from accman.ledger.gate import NESTED_DETAIL
from accman.ledger.leveldb import Store
from ledgerhelp import GatedStore, wait_for


async def _in_loop(fn):
    return fn()


def every_call(led, done):
    """Each public method of a Ledger (and the per-instance `tot` and
    `submit`), called with good arguments."""
    loop = asyncio.new_event_loop()
    try:
        yield from {
            "tot": lambda: led.tot("a"),
            "submit": lambda: led.submit("a", 1, done=done),
            "past": lambda: led.past("a"),
            "account_id": lambda: led.account_id("a"),
            "events": lambda: led.events(),
            "aevents": lambda: asyncio.run(led.aevents()),
            "__len__": lambda: len(led),
            "read_tot": lambda: led.read_tot("a", done),
            "read_past": lambda: led.read_past("a", 10, None, done),
            "read_events": lambda: led.read_events(0, 10, 0, done),
            "end_wait": lambda: led.end_wait(done),
            "end_waits": lambda: asyncio.run(_in_loop(led.end_waits)),
            "submit_hold": lambda: led.submit_hold("a", -1, 5, done=done),
            "submit_settle": lambda: led.submit_settle("a", 2, 0, done=done),
            "mod": lambda: led.mod("a", 1),
            "hold": lambda: led.hold("a", -1, 5),
            "settle": lambda: led.settle("a", 2, 0),
            "expire_due": lambda: led.expire_due(),
            "bind_loop": lambda: led.bind_loop(loop),
            "amod": lambda: asyncio.run(led.amod("a", 1)),
            "ahold": lambda: asyncio.run(led.ahold("a", -1, 5)),
            "asettle": lambda: asyncio.run(led.asettle("a", 2, 0)),
            "verify": lambda: led.verify(),
            "keep_events_after": lambda: led.keep_events_after(1),
            "__enter__": lambda: led.__enter__(),
        }.items()
    finally:
        loop.close()


def public_methods() -> set:
    """Ledger's public methods, from the class and its bases, and the two
    callables bound per instance; beside `close` and `__exit__` (closing again does
    nothing) and `drain_samples` (the metrics' samples: it describes the
    ledger, as its properties do, and answers)."""
    own = {name for name, _ in inspect.getmembers(Ledger, inspect.isfunction)
           if (not name.startswith("_") or name in ("__len__", "__enter__", "__exit__"))}
    return own - {"close", "__exit__", "drain_samples"} | {"tot", "submit"}


def assert_every_call_refused(led, detail):
    told = []
    names = set()
    for name, call in every_call(led, told.append):
        names.add(name)
        with pytest.raises(NotApplied) as e:
            call()
        assert (e.value.detail, e.value.code, e.value.status) == (detail, "not_applied", 503), name
    assert told == []                           # refused at once, nothing queued
    assert names == public_methods()            # a method added later is checked too


def test_a_kept_submit_of_a_closed_ledger_says_it_is_closed_before_judging_done(tmp_path):
    """A `submit` kept from before the close (the bound method, which close
    cannot replace) judged its `done` first: done=5 was TypeError where
    every other call of a closed ledger, bad values too, says it is
    closed."""
    led = Ledger(str(tmp_path / "d"))
    submit = led.submit
    led.close()
    for done in (5, print):
        with pytest.raises(Unavailable, match="^the ledger is closed$"):
            submit("a", 1, done=done)


def closed_then_reopened(led, path) -> int | None:
    """Asserts that `led` refuses every call as closed; the balance of "a"
    in the store reopened."""
    assert_every_call_refused(led, "the ledger is closed")
    with Ledger(path) as again:
        return again.tot("a")


def funded(path, **kw):
    led = Ledger(path, **kw)
    led.mod("a", 5)
    led.hold("a", -2, 60)
    return led


def test_every_method_of_a_closed_ledger_says_it_is_closed(tmp_path):
    path = str(tmp_path / "d")
    led = funded(path)
    events = led.events()
    led.close()
    assert_every_call_refused(led, "the ledger is closed")
    led.close()                                 # again: nothing
    led.__exit__(None, None, None)
    assert not led.healthy
    assert led.open_holds == 1 and led.stats["accounts"] == 1      # properties answer
    assert sum(led.drain_samples()[0]) == 2
    with Ledger(path) as again:                 # nothing changed
        assert again.tot("a") == 3 and again.events() == events


class HeldReads(Store):
    """A store whose history reads wait for `release` while `held`."""

    def __init__(self, path):
        super().__init__(path)
        self.held = False
        self.reading = threading.Event()
        self.release = threading.Event()

    def history(self, *args):
        if self.held:
            self.reading.set()
            assert self.release.wait(30)
        return super().history(*args)


def closing_behind_a_read(tmp_path, read):
    """A funded ledger whose LevelDB read `read(led)` is held in a thread,
    and a close started in another meanwhile: (ledger, store, the reader's
    thread, the closer's).  The store's `release` lets the read end."""
    path = str(tmp_path / "d")
    store = HeldReads(path)
    led = funded(path, store=store)
    store.held = True
    reader = threading.Thread(target=read, args=(led,))
    reader.start()
    assert store.reading.wait(10)
    closer = threading.Thread(target=led.close)
    closer.start()
    wait_for(lambda: not led.healthy, what="the close to start")
    store.held = False
    return led, store, reader, closer


def test_calls_during_close_say_closing_and_close_waits_for_reads(tmp_path):
    """A read in flight when close starts gets its page: LevelDB is closed
    after it, not under it; every call made meanwhile says closing."""
    pages = []
    led, store, reader, closer = closing_behind_a_read(
        tmp_path, lambda led: pages.append(led.past("a")))
    assert_every_call_refused(led, "the ledger is closing")
    closer.join(0.3)
    assert closer.is_alive()                    # waiting for the read
    store.release.set()
    reader.join(10)
    closer.join(10)
    assert not closer.is_alive()
    assert [(e.seq, e.by, e.tot) for e in pages[0]] == [(2, -2, 3), (1, 5, 5)]
    assert_every_call_refused(led, "the ledger is closed")


def test_a_close_while_another_is_under_way_returns_once_the_ledger_is_closed(tmp_path):
    """Two threads close one ledger (a `with` block's end and a shutdown
    handler, say): each close returns once the ledger is closed, so either
    caller may open the directory again at once."""
    led, store, reader, first = closing_behind_a_read(tmp_path, lambda led: led.past("a"))
    second = threading.Thread(target=led.close)
    second.start()
    second.join(0.3)
    assert second.is_alive()                    # the first close waits for the read
    store.release.set()
    for t in (reader, first, second):
        t.join(10)
        assert not t.is_alive()
    assert closed_then_reopened(led, str(tmp_path / "d")) == 3


def test_a_close_from_a_completion_while_another_thread_closes_returns(tmp_path):
    """A completion on the writer calls close while another thread's close
    waits for the writer: it returns at once, not waiting for the close
    that waits for it."""
    led = Ledger(str(tmp_path / "d"))
    closing, returned = threading.Event(), threading.Event()

    def close_on_writer(outcome):
        assert closing.wait(10)
        led.close()
        returned.set()
    led.submit("a", 1, done=close_on_writer)
    closer = threading.Thread(target=led.close)
    closer.start()
    wait_for(lambda: not led.healthy, what="the close to start")
    closing.set()
    closer.join(10)
    assert returned.is_set() and not closer.is_alive()
    assert _closed(led)


def test_a_close_whose_checkpoint_fails_still_ends_closed(tmp_path):
    """The checkpoint at close meets a disk error: close raises it, and the
    ledger is closed all the same (its files are released): calls say so,
    a second close returns, and the next open replays the log."""
    path = str(tmp_path / "d")
    led = funded(path)

    def failing_checkpoint():
        raise OSError(errno.EIO, "Input/output error")
    led.store.wal.checkpoint = failing_checkpoint
    with pytest.raises(StoreError, match="checkpoint at close"):
        led.close()
    assert_every_call_refused(led, "the ledger is closed")
    again = threading.Thread(target=led.close)
    again.start()
    again.join(10)
    assert not again.is_alive()
    with Ledger(path) as reopened:
        assert reopened.tot("a") == 3


class SignalInRead(Store):
    """A store whose history read is interrupted by `signum`, raised on
    this (the main) thread while the read is under way."""

    signum = None

    def history(self, *args):
        if self.signum is not None:
            signal.raise_signal(self.signum)
        return super().history(*args)


def test_a_signal_handler_closing_the_ledger_inside_a_read_does_not_hang(tmp_path):
    """A SIGTERM handler calls close while the main thread is inside a read
    (past, events, ...): close cannot wait for that read, which resumes
    only once the handler returns.  The read ends with its page, and the
    close ends with it."""
    path = str(tmp_path / "d")
    store = SignalInRead(path)
    led = funded(path, store=store)
    details = []

    def handler(*_):
        led.close()
        with pytest.raises(Unavailable) as e:
            led.tot("a")
        details.append(e.value.detail)
    before = signal.signal(signal.SIGUSR1, handler)
    try:
        store.signum = signal.SIGUSR1
        assert [e.by for e in led.past("a")] == [-2, 5]
    finally:
        signal.signal(signal.SIGUSR1, before)
    assert details == ["the ledger is closing"]
    assert closed_then_reopened(led, path) == 3


def test_a_signal_handler_closing_the_ledger_under_its_lock_does_not_hang(tmp_path):
    """expire_due reads the clock under the ledger's lock, as a mod applies
    under it: a SIGTERM handler that closes the ledger there would wait for
    that lock for ever.  The call ends, and the close with it."""
    signals = []

    def clock_ms():
        if signals and threading.current_thread() is threading.main_thread():
            signal.raise_signal(signals.pop())
        return int(time.time() * 1000)
    path = str(tmp_path / "d")
    led = funded(path, clock_ms=clock_ms)
    details = []

    def handler(*_):
        led.close()
        with pytest.raises(Unavailable) as e:
            led.mod("a", 1)
        details.append(e.value.detail)
    before = signal.signal(signal.SIGUSR1, handler)
    try:
        signals.append(signal.SIGUSR1)
        assert led.expire_due() == 0
    finally:
        signal.signal(signal.SIGUSR1, before)
    assert details == ["the ledger is closing"]
    assert closed_then_reopened(led, path) == 3


def signal_under_lock(code, marker: str, signum) -> None:
    """Traces this thread: `signum` is raised once, just before the line of
    `code` that holds `marker` (a line under the ledger's lock) runs."""
    def local(frame, event, _arg):
        if event == "line" and marker in linecache.getline(code.co_filename, frame.f_lineno):
            sys.settrace(None)
            signal.raise_signal(signum)
        return local
    sys.settrace(lambda frame, *_: local if frame.f_code is code else None)


@pytest.mark.parametrize("call, code, marker", [
    (lambda led: led.drain_samples(), Ledger.drain_samples.__code__, "sizes, times ="),
    (lambda led: led.keep_events_after(1), EventLog.keep_after.__code__, "self.kept_after ="),
    (lambda led: led.bind_loop(asyncio.new_event_loop()), Committer._bind.__code__,
     "self._loop = loop")])
def test_a_signal_handler_closing_the_ledger_in_any_locked_call_does_not_hang(
        tmp_path, call, code, marker):
    """drain_samples, keep_events_after and bind_loop take the ledger's lock
    on the caller's thread too: a SIGTERM handler's close there would wait
    for that lock for ever (in a child: an alarm ends it if it hangs)."""
    from test_ledger_fork import in_child

    def child():
        path = str(tmp_path / "d")
        led = funded(path)
        signal.signal(signal.SIGUSR1, lambda *_: led.close())
        signal_under_lock(code, marker, signal.SIGUSR1)
        try:
            call(led)
        finally:
            sys.settrace(None)
        return closed_then_reopened(led, path)
    assert in_child(child) == (0, "3")


@pytest.mark.parametrize("call, code, marker, tot", [
    (lambda led: led.past("a"), Ledger._entries.__code__, "tail = self._book.history_tail", 3),
    (lambda led: led.keep_events_after(1), EventLog.keep_after.__code__, "self.kept_after =", 3),
    (lambda led: led.mod("a", 1), Ledger._blocking.__code__, "ready.wait()", 4)])
def test_a_signal_handlers_mod_inside_a_call_of_its_thread_refuses_at_once(
        tmp_path, call, code, marker, tot):
    """A SIGUSR1 handler's mod runs on the main thread between two steps of
    the call it interrupted; where that call held the ledger's lock (a
    read's), the mod waited for it for ever (in a child: an alarm ends it).
    It raises RuntimeError at once, saying why, whatever the call: the
    interrupted call goes on, and the same mod works once it has ended."""
    from test_ledger_fork import in_child

    def child():
        led = funded(str(tmp_path / "d"))
        refused = []

        def handler(*_):
            try:
                led.mod("a", 1)
            except RuntimeError as e:
                refused.append(str(e))
        signal.signal(signal.SIGUSR1, handler)
        signal_under_lock(code, marker, signal.SIGUSR1)
        try:
            call(led)
        finally:
            sys.settrace(None)
        after = led.tot("a")
        led.close()
        return refused, after
    assert in_child(child) == (0, repr(([NESTED_DETAIL], tot)))


class Interrupted(Exception):
    """What the test's ^C raises (KeyboardInterrupt would stop pytest)."""


def test_a_close_interrupted_while_the_writer_ends_still_ends_closed(tmp_path):
    """^C while close waits for the writer's last batch: that close raises,
    and a later close (a `finally`, a `with`) returns once the ledger is
    closed rather than waiting for ever on a close that nobody finishes."""
    path = str(tmp_path / "d")
    store = GatedStore(path, gate=threading.Event())
    led = Ledger(path, store=store)
    modder = threading.Thread(target=led.mod, args=("a", 5))
    modder.start()
    assert store.writing.wait(10)
    main = threading.main_thread().ident

    def in_committer_close():
        frame = sys._current_frames()[main]
        while frame is not None and frame.f_code is not Committer.close.__code__:
            frame = frame.f_back
        return frame is not None and frame.f_lineno != Committer.close.__code__.co_firstlineno

    def interrupt():
        wait_for(in_committer_close, what="close to wait for the writer")
        signal.pthread_kill(main, signal.SIGUSR1)

    def handler(*_):
        raise Interrupted
    before = signal.signal(signal.SIGUSR1, handler)
    try:
        threading.Thread(target=interrupt).start()
        with pytest.raises(Interrupted):
            led.close()
    finally:
        signal.signal(signal.SIGUSR1, before)
    store.gate.set()
    modder.join(10)
    again = threading.Thread(target=led.close, daemon=True)
    again.start()
    again.join(10)
    assert not again.is_alive()
    assert closed_then_reopened(led, path) == 5


def test_a_change_in_flight_when_close_starts_is_made_durable(tmp_path):
    """Close writes what was queued before it; meanwhile every call says
    closing, the reads included."""
    path = str(tmp_path / "d")
    store = GatedStore(path, gate=threading.Event())
    led = Ledger(path, store=store)
    outcome = []
    modder = threading.Thread(target=lambda: outcome.append(led.mod("a", 5)))
    modder.start()
    assert store.writing.wait(10)
    closer = threading.Thread(target=led.close)
    closer.start()
    wait_for(lambda: not led.healthy, what="the close to start")
    assert_every_call_refused(led, "the ledger is closing")
    store.gate.set()
    modder.join(10)
    closer.join(10)
    assert outcome == [(5, 1)]
    assert closed_then_reopened(led, path) == 5


def test_plyvel_s_closed_database_is_translated_where_its_errors_are(tmp_path):
    """accman.ledger.plyvel_errors.translated is the one place: a closed store's
    reads are Unavailable, not plyvel's bare RuntimeError."""
    store = Store(str(tmp_path / "d"))
    store.close()
    hid = b"\x01" * _ledger.HID_BYTES
    for call in (lambda: store.get(_ledger.EVENTS_META_KEY),
                 lambda: store.history(hid, 1, 2),
                 lambda: store.scan(_ledger.HISTORY_PREFIX, _ledger.HISTORY_PREFIX, 5),
                 lambda: list(store.iterate(_ledger.HISTORY_PREFIX)),
                 lambda: list(store.accounts()),
                 store.check_all_blocks):
        with pytest.raises(Unavailable, match="^the ledger is closed$"):
            call()


def test_an_os_error_names_the_file_it_met(tmp_path):
    """An immutable (chattr +i) or unreadable file of the store: the
    refusal names it, not only the directory and the OS's words."""
    with pytest.raises(StoreError, match=r"^/d: replay the write-ahead log failed "
                                         r"\(accman.wal\): Operation not permitted$"):
        with plyvel_errors.translated("/d", "replay the write-ahead log"):
            raise PermissionError(errno.EPERM, "Operation not permitted", "accman.wal")
    with pytest.raises(StoreError, match=r"^/d: open failed: No space left on device$"):
        with plyvel_errors.translated("/d", "open"):
            raise OSError(errno.ENOSPC, "No space left on device")


def test_a_long_poll_waiting_when_the_ledger_closes_is_told_so_at_once(tmp_path):
    """A poll waiting for events gets Unavailable as the ledger closes,
    from another thread, not an empty page when its wait runs out."""
    led = Ledger(str(tmp_path / "d"))

    async def poll():
        task = asyncio.ensure_future(led.aevents(after=0, wait_s=30))
        await asyncio.sleep(0.05)                   # it waits: no event yet
        closing = threading.Thread(target=led.close)
        closing.start()
        with pytest.raises(Unavailable, match="the ledger is closing"):
            await asyncio.wait_for(task, 10)        # well before the poll's 30 s
        closing.join()
    asyncio.run(poll())


def _closed(led) -> bool:
    try:
        led.tot("x")
    except Unavailable as e:
        return e.detail == "the ledger is closed"
    return False


def test_a_close_from_a_completion_on_the_writer_ends_after_the_writer(tmp_path):
    """A completion callback (run on the writer thread) that closes the
    ledger while other threads submit: every change accepted before the
    close is made durable, none fails, and the store closes once the
    writer has stopped."""
    path = str(tmp_path / "d")
    led = Ledger(path)
    led.mod("x", 1000)
    outcomes, lock = [], threading.Lock()

    def done(outcome):
        with lock:
            outcomes.append(outcome)

    def close_on_writer(outcome):
        done(outcome)
        led.close()

    stop = threading.Event()

    def submitter():
        while not stop.is_set():
            try:
                led.submit("x", 1, done=done)
            except Unavailable:
                return
    threads = [threading.Thread(target=submitter) for _ in range(2)]
    for t in threads:
        t.start()
    wait_for(lambda: len(outcomes) > 50, what="mods under way")
    led.submit("x", 1, done=close_on_writer)
    wait_for(lambda: _closed(led), what="the ledger closed")
    stop.set()
    for t in threads:
        t.join()
    failed = [o for o in outcomes if not isinstance(o, tuple)]
    assert failed == []
    with Ledger(path) as again:
        assert again.tot("x") == 1000 + len(outcomes)


def test_a_stop_landing_as_close_releases_the_files_still_frees_the_directory(tmp_path):
    """A ^C that landed while close() released the store's files (in the
    join of the log's grower thread, or closing its buffer) left LevelDB
    and the directory's lock held for the rest of the process: the ledger
    said closed, and every open of the directory was StoreLocked (a
    black-box probe).  Each part is now released even then; the ^C is
    raised, and the directory opens with every mod."""
    path = str(tmp_path / "d")
    led = Ledger(path)
    for i in range(20):
        led.mod("a", 1, key=f"k{i}")
    grower = led.store.wal._grower.thread
    real_join = grower.join
    calls = []

    def join(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise KeyboardInterrupt
        return real_join(*args, **kwargs)
    grower.join = join
    with pytest.raises(KeyboardInterrupt):
        led.close()
    led.close()                                 # returns: the ledger is closed
    assert len(calls) == 2 and not grower.is_alive()
    with Ledger(path) as again:
        assert again.tot("a") == 20
