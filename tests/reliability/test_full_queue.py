"""QUEUED_MODS_MAX over the wire on the embedded store, whose busy refuses
only a call that would queue a change (tests/test_busy_answers.py has the
ledger's side): through the compiled lane, pipelined or one request on a
quiet connection, a keyed repeat of a change held behind a stalled disk
gets that change's answer, and its failure when its batch fails (503
unavailable for the batch that failed, not_applied behind it); a reused
key, a refusal on the balance and a pipelined read are told with the
batch they were judged on; a new change is busy and changes nothing."""

import time

import pytest

from conftest import get, patch
import relhelp
from relhelp import metrics

controlled = relhelp.controlled      # a fixture: relhelp's, registered here


def wait_queued(srv, n, timeout_s=20.0):
    deadline = time.monotonic() + timeout_s
    while metrics(srv).get("accman_queued_mods") != n:
        assert time.monotonic() < deadline, metrics(srv).get("accman_queued_mods")
        time.sleep(0.02)


def answer(r):
    """A reply's status and error code (None for a 200)."""
    return r.status, r.json.get("error")


def one_request(srv, request):
    """A request alone on a quiet connection (Pipeline.quick), its reply."""
    with srv.connect(timeout=10) as c:
        c.send(request)
        return c.response()


@pytest.mark.embedded_only("the PostgreSQL store's busy comes before the key's lookup")
@pytest.mark.parametrize("fails", [False, True], ids=["durable", "failed"])
def test_a_full_queue_answers_keyed_repeats_through_the_lane(controlled, cred, fails):
    srv, control = controlled(queued_mods_max=4, batch_mods_max=2)
    assert srv.mod(cred, 100, key="k0").json == {"tot": 100, "seq": 1}
    control.hold()
    c1 = srv.connect(timeout=60)
    c1.send(b"".join(patch(f"/mod?cred={cred}&by=-1{q}") for q in
                     ("&key=k1", "&key=k2", "", "")))
    control.wait_holding()
    wait_queued(srv, 4)
    c2 = srv.connect(timeout=60)
    c2.send(b"".join([patch(f"/mod?cred={cred}&by=-1&key=k1"), get(f"/tot?cred={cred}"),
                      patch(f"/mod?cred={cred}&by=-2&key=k1"),
                      patch(f"/mod?cred={cred}&by=-1000&min=0"),
                      patch(f"/mod?cred={cred}&by=-1"),
                      patch(f"/mod?cred={cred}&by=100&key=k0"), get(f"/tot?cred={cred}")]))
    c3 = srv.connect(timeout=60)
    c3.send(patch(f"/mod?cred={cred}&by=-1&key=k1"))
    # Answered at once, the disk still held: a repeat of a durable change,
    # and a new change, busy.  Sent after c2's and c3's bytes were in the
    # server's socket buffers, on connections made after: the loop has
    # read theirs by the time it answers these.
    assert one_request(srv, patch(f"/mod?cred={cred}&by=100&key=k0")).json == \
        {"tot": 100, "seq": 1}
    assert answer(one_request(srv, patch(f"/mod?cred={cred}&by=-1"))) == (503, "busy")
    wait_queued(srv, 4)
    if fails:
        control.fail_before()
    control.release()
    first, *_, last = c1.responses(4)
    repeat, tot, reused, insufficient, busy, durable, tot_again = c2.responses(7)
    alone = c3.response()
    assert answer(busy) == (503, "busy")
    assert durable.json == {"tot": 100, "seq": 1}       # judged while the store was sound
    if fails:
        assert answer(first) == (503, "unavailable")
        for r in (repeat, reused, alone):
            assert answer(r) == answer(first)
        for r in (tot, insufficient, tot_again):
            assert answer(r) == answer(last)
        assert srv.tot(cred) == 100
    else:
        assert repeat.json == alone.json == first.json == {"tot": 99, "seq": 2}
        assert answer(reused) == (409, "key_reused")
        assert answer(insufficient) == (409, "insufficient") and insufficient.json["tot"] == 96
        assert tot.json == tot_again.json == {"tot": 96}
        assert srv.tot(cred) == 96                      # the busy mods changed nothing
    c1.close()
    c2.close()
    c3.close()
