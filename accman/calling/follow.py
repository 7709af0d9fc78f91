"""Following the event stream, for `accman events --follow`: long polls
with a blocking client, each resuming from the last one's `next`, every
event written as one JSON line, until the follower is told to stop.

It stops cleanly (whole lines only, and `after` names the last event
written) on SIGINT or SIGTERM, and when the reader of its output goes away
(a closed pipe: `accman events --follow | head`), noticed within
READER_CHECK_S even while a long poll waits.  Written is not read: the
lines still in the pipe when the reader left were never handled, and the
follower cannot know how many; a reader resumes from the last id it
handled itself.  An output that fails otherwise than by a closed pipe (a
full disk, an I/O error) ends it.

A reply that is not what it asked for is one of three things:

- No answer from AccMan, an outage, ridden out with pauses (each said on
  stderr) up to FOLLOW_OUTAGE_S_MAX without an answer: no connection, a
  connection cut before the reply was whole (AccMan restarting, killed
  mid-reply), a timeout, a 503 (AccMan's store, or a proxy with no
  upstream), a 500, 502 or 504, and a reply that breaks HTTP framing or is
  not a JSON page of the SPEC's shape (`BadReply`).  None of these says
  anything of the stream: nothing answered, something else did (a proxy's
  page, a half-started front end), or AccMan said it cannot serve now;
  a restart or a recovery ends them.
- A broken promise, which ends the follower at once (`EventsOutOfOrder`):
  a page of the SPEC's shape whose ids break the stream's order (an event
  not the one after the last: a gap, a repeat, one out of place; a `next`
  that is not its last id or that skips), or a stream that goes back below
  an id it had already reached in this run (a store restored from an older
  copy: the ids after it would come again, as other events, and a reader
  that dedupes by id would drop them), or a page of more events than
  the `limit` asked (`EventsOverLimit`).  Only AccMan makes such a page,
  the same store answers the same way when asked again, and waiting
  would only hide it: the events before the break (for a page too long,
  its first `limit`, if in order) are written, then the error names the
  ids or the count.  An `--after` given past the end of the stream is no
  broken promise (the follower has seen nothing yet): it is said, and
  following goes on from the newest event.
- An event of a type this client does not know (`EventTypeUnknown`) in
  a page of the SPEC's shape, which ends it at once too: a server newer
  than the client, whose stream has a type added since.  The same page
  comes again however long the follower waits, and the cure is to
  upgrade the client: the events before it are written, then the error
  names the type and the event's id.  A field the SPEC does not name is
  no such case (a newer server may add one; it is skipped), and a field
  it names that has another shape is a garbled reply, an outage above
  (accman.calling.replies.events says why).

Any other error ends it too (`events_trimmed`, a 401 or 403)."""

from __future__ import annotations

import json
import os
import select
import signal
import sys
import time
from typing import NamedTuple

from accman.calling.replies import ORDER_RULE
from accman.errors import (AccManError, EventsOutOfOrder, EventsPageRefused, TransportError,
                           Unavailable)

PIPE_BUF = select.PIPE_BUF      # POSIX: a pipe takes a write this long whole

# --- bounds ------------------------------------------------------------------
# Each long poll's wait: under the 30 to 60 s after which common proxies
# close an idle connection, so that one between the follower and AccMan
# does not cut every poll.
FOLLOW_WAIT_S = 25
# While AccMan gives no answer: pauses from FOLLOW_PAUSE_S doubling up to
# FOLLOW_PAUSE_MAX_S, for at most FOLLOW_OUTAGE_S_MAX in a row (long enough
# for a restart, short enough that a follower left running against a dead
# server says so).
FOLLOW_PAUSE_S = 1.0
FOLLOW_PAUSE_MAX_S = 10.0
FOLLOW_OUTAGE_S_MAX = 300.0
# While it waits (a long poll, a pause), how often the follower looks
# whether the reader of its output has gone: a poll waits up to
# FOLLOW_WAIT_S, and a follower whose reader left ends within a second,
# not when the poll does.
READER_CHECK_S = 1.0

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
# What a caller's ITIMER_REAL alarm that fell due while following is put
# back with: it goes off at once, late rather than never.
ALARM_DUE_S = 1e-6


class Followed(NamedTuple):
    """How following ended: `after` is the id of the last event written
    (resume with it); `why` is "signal", "reader gone", "error" with
    `error` the AccManError that ended it, or "output failed" with `error`
    the OSError that a write to `out` raised (ENOSPC, EIO: anything but a
    closed pipe, which is "reader gone"); `out` is then /dev/null.  The
    command makes an "output failed" of its own when it starts with no
    stdout to write to (accman.cli), asking nothing."""

    after: int
    why: str
    error: AccManError | OSError | None = None


def follow(acc, after: int, limit: int | None, wait_s: int, out=None,
           note=None) -> Followed:
    """Follows the stream from `after` with `acc` (an AccManSyncClient),
    writing to `out` (default stdout); `note(text)` is told of each retry,
    and of an `after` past the end of the stream.
    Must run in the main thread: it handles STOP_SIGNALS meanwhile, and
    SIGALRM, from an ITIMER_REAL of its own, for the reader check.

    However it ends, the caller's handlers of those signals are put back,
    and so is its ITIMER_REAL: with the time it had left less the time
    spent following, and its interval.  An alarm that fell due meanwhile
    goes off at once, once however many ticks of a periodic one fell due,
    and its interval runs on from then.  A stop signal that comes while
    they are being put back goes to the caller's handler once it is back.

    A caller may hold the stop signals back (its signal mask) until the
    follower's handlers are in place, and from its end on: the follower
    takes them while it follows (one that came before is taken at once)
    and puts the caller's mask back first thing at its end, so that no stop
    is lost and none ends the caller's own last words."""
    out = sys.stdout if out is None else out
    state = {"after": after, "waiting": False, "writing": False, "gone": False,
             "restoring": False, "late": []}
    ours = {s: _stopper(state) for s in STOP_SIGNALS}
    ours[signal.SIGALRM] = _reader_check(out, state)
    # Read before anything is changed, so that any exit from here on finds
    # what to put back.
    handlers = {s: signal.getsignal(s) for s in ours}
    timer, since = signal.getitimer(signal.ITIMER_REAL), time.monotonic()
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, ())
    try:
        for s in STOP_SIGNALS:
            if handlers[s] is not signal.SIG_IGN:       # a background job's SIGINT
                signal.signal(s, ours[s])
        # Swapped before SIGALRM is ours, so that the caller's alarm never
        # reaches our handler; the swap answers exactly what it replaced.
        timer, since = (signal.setitimer(signal.ITIMER_REAL, READER_CHECK_S, READER_CHECK_S),
                        time.monotonic())
        signal.signal(signal.SIGALRM, ours[signal.SIGALRM])
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
        return _loop(acc, state, limit, wait_s, out, note or _silent)
    except KeyboardInterrupt:
        return Followed(state["after"], "reader gone" if state["gone"] else "signal")
    except BrokenPipeError:
        silence(out)
        return Followed(state["after"], "reader gone")
    finally:
        state["restoring"], state["waiting"] = True, False
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        _put_back(handlers, timer, since)
        for s in state["late"]:
            signal.raise_signal(s)


def _put_back(handlers, timer, since) -> None:
    """The caller's handlers, and its ITIMER_REAL (`timer`, as it was at
    `since`), in place of ours.  A handler not set from Python (getsignal's
    None) cannot be put back: SIG_DFL stands in for it."""
    signal.setitimer(signal.ITIMER_REAL, 0)
    for s, handler in handlers.items():
        signal.signal(s, signal.SIG_DFL if handler is None else handler)
    value_s, interval_s = timer
    if value_s > 0:
        left_s = value_s - (time.monotonic() - since)
        signal.setitimer(signal.ITIMER_REAL, max(left_s, ALARM_DUE_S), interval_s)


def _loop(acc, state, limit, wait_s, out, note) -> Followed:
    failing_since, attempt, answered = None, 0, False
    while True:
        if _reader_gone(out):
            return Followed(state["after"], "reader gone")
        try:
            events, nxt = _waiting(state, acc.events, state["after"], limit=limit,
                                   wait_s=wait_s)
        except (TransportError, Unavailable) as e:
            now = time.monotonic()
            failing_since = failing_since or now
            if now - failing_since >= FOLLOW_OUTAGE_S_MAX:
                return Followed(state["after"], "error", e)
            pause = min(FOLLOW_PAUSE_S * 2 ** attempt, FOLLOW_PAUSE_MAX_S)
            note(f"no answer ({e.detail}); trying again in {pause:g} s")
            _waiting(state, time.sleep, pause)
            attempt += 1
            continue
        except EventsPageRefused as e:
            # A page it cannot go past: the events before the fault, then the end.
            last = e.events[-1].id if e.events else state["after"]
            ended = _written(out, e.events, last, state)
            return Followed(state["after"], "error", e) if ended is None else ended
        except AccManError as e:
            return Followed(state["after"], "error", e)
        failing_since, attempt = None, 0
        if nxt < state["after"]:
            if answered:
                return Followed(state["after"], "error", _went_back(state["after"], nxt))
            # The first answer's `next` for an `after` given past the newest
            # event (a store restored from an older copy, or another store):
            # ids after `nxt` are new events, the follower's to write.
            note(f"event {state['after']} is past the stream's end (the newest is {nxt}): "
                 f"following from event {nxt}")
        answered = True
        ended = _written(out, events, nxt, state)
        if ended is not None:
            return ended


def _went_back(after: int, nxt: int) -> EventsOutOfOrder:
    """The error of a stream whose `next` went back to `nxt` after the
    follower had reached `after` from it."""
    return EventsOutOfOrder(f"the stream went back from event {after} to event {nxt}: ids up "
                            f"to {after} would come again, for other events (a store restored "
                            f"from an older copy?); {ORDER_RULE}")


def _written(out, events, nxt, state) -> Followed | None:
    """`_write`, and None; how the follower ends when `out` fails (a
    closed pipe is raised, for `follow` to say)."""
    try:
        _write(out, events, nxt, state)
    except BrokenPipeError:
        raise
    except OSError as e:
        silence(out)
        return Followed(state["after"], "output failed", e)
    return None


def _write(out, events, nxt, state) -> None:
    """Writes the events, one JSON line each, and moves `after` on.  The
    lines go out in pieces of whole lines, at most PIPE_BUF bytes each (a
    pipe takes such a piece whole or not at all), each once `out` has room
    for it: a stop that comes while the follower waits for room ends it
    there, however long the reader leaves the pipe full, and one that
    comes while a piece is written is taken after it.  So a stop lands
    between lines, never inside one, and `after` always names the last
    line written."""
    for piece, last in _pieces(events):
        _wait_for_room(out)
        _write_piece(out, piece, last, state)
    state["after"] = nxt


def _pieces(events):
    """(text, id of its last event): whole lines, at most PIPE_BUF bytes."""
    piece, size, last = [], 0, None
    for e in events:
        line = json.dumps(e._asdict(), separators=(",", ":")) + "\n"
        assert len(line) <= PIPE_BUF, "an event line longer than a pipe's atomic write"
        if size + len(line) > PIPE_BUF:
            yield "".join(piece), last
            piece, size = [], 0
        piece.append(line)
        size += len(line)
        last = e.id
    if piece:
        yield "".join(piece), last


def _wait_for_room(out) -> None:
    """Until `out` can take a piece without blocking (a pipe with room for
    PIPE_BUF bytes), or its reader has gone (the write then says so); a
    stop meanwhile ends the follower.  An output that cannot be polled
    (not a file descriptor) is written at once."""
    try:
        poller = select.poll()
        poller.register(out.fileno(), select.POLLOUT)
    except (OSError, ValueError):
        return
    poller.poll()


def _write_piece(out, piece, last, state) -> None:
    """One piece written and `after` moved to its last event, a stop that
    comes meanwhile held (by _stopper) until both are done."""
    state["writing"] = True
    try:
        out.write(piece)
        out.flush()
        state["after"] = last
    finally:
        state["writing"] = False
    if state.pop("stop", None) is not None:
        raise KeyboardInterrupt


def _waiting(state, wait, *args, **kwargs):
    """`wait(*args, **kwargs)`, during which the reader check may end the
    follower: only here, so that it never ends one inside a write."""
    state["waiting"] = True
    try:
        return wait(*args, **kwargs)
    finally:
        state["waiting"] = False


def _reader_check(out, state):
    """The SIGALRM handler, every READER_CHECK_S: while the follower waits,
    a reader gone ends it (as ^C would, a poll left unanswered being
    harmless to a read)."""
    def check(_signum, _frame):
        if state["waiting"] and _reader_gone(out):
            state["gone"] = True
            raise KeyboardInterrupt
    return check


def _stopper(state):
    """The handler of STOP_SIGNALS: a stop ends the follower, as ^C would;
    one that comes while a piece is written is held until it is written
    (_write_piece); one that comes while the caller's handlers are being
    put back is kept for them."""
    def stop(signum, _frame):
        if state["restoring"]:
            state["late"].append(signum)
        elif state["writing"]:
            state["stop"] = signum
        else:
            raise KeyboardInterrupt
    return stop


def _silent(_text) -> None:
    pass


def _reader_gone(out) -> bool:
    """True when `out` is a pipe whose reader has closed it (poll reports
    an error on the write end), so an idle follower notices without
    waiting for an event to write."""
    try:
        poller = select.poll()
        poller.register(out.fileno(), 0)       # errors and hang-ups are always reported
        return any(ev & (select.POLLERR | select.POLLHUP) for _, ev in poller.poll(0))
    except (OSError, ValueError):
        return False


def silence(out) -> None:
    """After the reader went away: point `out` at /dev/null, so that the
    flush at exit does not fail again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, out.fileno())
        os.close(devnull)
    except (OSError, ValueError):
        pass


__all__ = ["follow", "Followed", "silence", "FOLLOW_WAIT_S", "FOLLOW_PAUSE_S",
           "FOLLOW_PAUSE_MAX_S", "FOLLOW_OUTAGE_S_MAX", "READER_CHECK_S", "ALARM_DUE_S"]
