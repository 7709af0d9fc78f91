# Holds (SPEC "Holds"): a hold takes its amount out of the balance at once,
# as one history entry whose `hold` is its own seq (the hold's id); a settle
# spends `use` of it and returns the rest, as one entry with by = amount -
# use; a hold not settled within its ttl ends by itself with use 0 (an
# expiry).  Included by ledger.pyx, after the Book; no I/O.
#
# Open holds are in memory, in `Book.holds` (hid + hold id -> Hold) and on
# the expiry wheel: one bucket of hold ids per second, found through a heap
# of the buckets' seconds, so that a settle takes its hold off the wheel at
# once and the writer's clock finds the next due second without a scan.
# A hold ended in a batch not yet durable stays in `Book.holds` until that
# batch is (a second settle then answers from it); after that, its record
# on disk says how it ended.

cdef class Hold:
    cdef Account acct
    cdef int64_t hold
    cdef int64_t amount             # held: the hold entry's -by
    cdef int64_t expires_ms
    cdef int state                  # HOLD_OPEN, HOLD_SETTLED, HOLD_EXPIRED
    cdef int64_t use                # once ended
    cdef object end_result          # (tot, seq) of the ending entry
    cdef Batch end_batch            # the batch that ends it, until durable


cdef inline bytes _hold_id(bytes hid, int64_t hold):
    """hid + hold:u64, the key of Book.holds (the hold record's key less
    its prefix)."""
    return hold_key(hid, hold)[1:]


cdef inline int64_t _second_of(int64_t expires_ms):
    """The wheel's bucket: the first whole second at or after expiry, so
    that no hold ends before its ttl is up.  (Division truncates here: the
    module is built with cdivision; unix times are positive.)"""
    assert expires_ms >= 0, "an expiry before 1970"
    return (expires_ms + 999) // 1000


cdef Hold _track_hold(Book book, Account acct, int64_t hold, int64_t amount,
                      int64_t expires_ms):
    """An open hold, in memory and on the wheel."""
    cdef Hold h = Hold()
    h.acct = acct
    h.hold = hold
    h.amount = amount
    h.expires_ms = expires_ms
    h.state = HOLD_OPEN
    cdef bytes hold_id = _hold_id(acct.hid, hold)
    book.holds[hold_id] = h
    cdef int64_t second = _second_of(expires_ms)
    bucket = book.wheel.get(second)
    if bucket is None:
        bucket = book.wheel[second] = {}
        heapq.heappush(book.wheel_seconds, second)
    bucket[hold_id] = None
    acct.open_holds += 1
    acct.held += amount
    book.open_holds += 1
    return h


cdef void _untrack_hold(Book book, Hold h, bytes hold_id):
    """An open hold ends: off the wheel and out of the counts."""
    bucket = book.wheel.get(_second_of(h.expires_ms))
    if bucket is not None:
        bucket.pop(hold_id, None)
    h.acct.open_holds -= 1
    h.acct.held -= h.amount
    book.open_holds -= 1
    assert h.acct.open_holds >= 0 and book.open_holds >= 0


cdef object book_hold(Book book, object cred, object by, object ttl_s, object min_,
                      object key, object done, bint on_loop, int64_t at_ms):
    """Applies a hold of -by for ttl_s seconds, in call order; its outcome
    is (hold, tot, seq).  `min` defaults to 0 (SPEC), judged as a mod's.
    Returns it, or None when `done` waits for a batch, as Book.apply."""
    cdef Account acct = book._lookup(cred)
    check_hold(by, ttl_s, min_)
    if min_ is None:
        min_ = 0
    cdef bytes kb = _key_bytes(key)
    book._check_sound()
    if acct is None:
        return NoAccount("no account has this cred; a hold opens none")
    cdef object outcome
    if kb is not None:
        outcome = book._replay(acct.hid + kb, by, min_, ttl_s)
        if outcome is not _NOT_KEYED:
            return book._told(outcome, done, on_loop)
    if acct.open_holds >= book.holds_per_account_max:
        # The count takes in holds not durable yet: told once they are.
        book._wait = book._pending(acct.pbatch)
        return book._told(TooManyHolds(f"the account has HOLDS_PER_ACCOUNT_MAX "
                                       f"({book.holds_per_account_max}) open holds; "
                                       "settle some first"), done, on_loop)
    if book.open_holds >= book.holds_max:
        # Counted with the holds of every account, not all durable yet.
        book._wait = book._pending(book.holds_batch)
        return book._told(TooManyHolds(f"the store has HOLDS_MAX ({book.holds_max}) open "
                                       "holds; retry later"), done, on_loop)
    outcome = book._judge(acct, by, min_, "hold")
    if outcome is not None:
        return book._told(outcome, done, on_loop)
    book._check_room()
    cdef Batch batch = book._change(acct, by, at_ms, kb, -1, EV_HOLD)
    book.holds_batch = batch
    cdef int64_t hold = acct.pseq
    cdef int64_t expires_ms = at_ms + <int64_t>ttl_s * 1000
    _track_hold(book, acct, hold, -by, expires_ms)
    batch.holds_delta += 1
    batch.put(hold_key(acct.hid, hold), _pack_hold(-by, expires_ms, HOLD_OPEN, 0, 0, 0))
    batch.put(open_hold_key(acct.hid, hold), pack_open_hold(-by, expires_ms))
    result = (hold, acct.ptot, acct.pseq)
    if kb is not None:
        book._keep_key(batch, acct.hid + kb, by, min_, ttl_s, result)
    batch.add_done(done, result, on_loop)
    return None


cdef object book_settle(Book book, object cred, object hold, object use, object done,
                        bint on_loop, int64_t at_ms):
    """Ends a hold, spending `use` of it; its outcome is (tot, seq).
    Settling again with the same use answers the first reply; another use,
    or a hold that expired, is HoldEnded; a hold the account never had is
    NoHold.  A hold past its expiry is expired first, here."""
    cdef Account acct = book._lookup(cred)
    check_settle(hold, use)
    book._check_sound()
    if acct is None:
        return NoAccount("no account has this cred")
    cdef bytes hold_id = _hold_id(acct.hid, hold)
    cdef Hold h = book.holds.get(hold_id)
    if h is None:
        outcome = _ended_on_disk(book, acct.hid, hold, use)
        if isinstance(outcome, NoHold):
            # Judged on an account whose opening may not be durable yet:
            # told once it is, as a refusal of a pending balance is.
            book._wait = book._pending(acct.pbatch)
            return book._told(outcome, done, on_loop)
        return outcome
    if h.state == HOLD_OPEN and at_ms >= h.expires_ms:
        book._check_room()
        _end(book, h, hold_id, 0, HOLD_EXPIRED, at_ms)
    if h.state != HOLD_OPEN:
        if h.state == HOLD_SETTLED and h.use == use:
            outcome = h.end_result
        else:
            outcome = HoldEnded(_ended_detail(h.state))
        book._wait = book._pending(h.end_batch)
        return book._told(outcome, done, on_loop)
    if use > h.amount:
        # The held amount is the hold's own state, maybe not durable yet:
        # told once it is, as the PostgreSQL store tells it after its commit.
        book._wait = book._pending(acct.pbatch)
        return book._told(BadRequest(f"use must be from 0 to the held amount {h.amount}"),
                          done, on_loop)
    # Never true while ptot + held stays in range (Book._judge keeps it);
    # a store written before that rule may still hold such a balance.
    if <object>acct.ptot + (h.amount - use) > INT64_MAX:
        return Overflow("the balance would leave the signed 64-bit range")
    book._check_room()
    cdef Batch batch = _end(book, h, hold_id, use, HOLD_SETTLED, at_ms)
    batch.add_done(done, h.end_result, on_loop)
    return None


cdef Batch _end(Book book, Hold h, bytes hold_id, int64_t use, int state, int64_t at_ms):
    """A hold ends (settled, or expired with use 0): its entry, its event,
    its record rewritten to say how it ended, its open-hold record gone."""
    cdef Account acct = h.acct
    cdef Batch batch = book._change(acct, h.amount - use, at_ms, None, h.hold,
                                    EV_SETTLE if state == HOLD_SETTLED else EV_EXPIRE)
    book.holds_batch = batch
    _untrack_hold(book, h, hold_id)
    batch.holds_delta -= 1
    h.state = state
    h.use = use
    h.end_result = (acct.ptot, acct.pseq)
    h.end_batch = batch
    batch.ended.append(hold_id)
    batch.put(hold_key(acct.hid, h.hold),
              _pack_hold(h.amount, h.expires_ms, state, use, acct.pseq, acct.ptot))
    _wal_delete(batch.wal, open_hold_key(acct.hid, h.hold))
    if state == HOLD_EXPIRED:
        book.holds_expired += 1
    return batch


cdef str _ended_detail(int state):
    if state == HOLD_EXPIRED:
        return "the hold expired before it was settled; its amount went back to the balance"
    return "the hold was settled with another use"


cdef object _ended_on_disk(Book book, bytes hid, int64_t hold, int64_t use):
    """The answer for a hold that is not open, from its record."""
    stored = book._get(hold_key(hid, hold))
    if stored is None:
        return NoHold("the account has no hold with this id")
    amount, expires_ms, state, s_use, end_seq, end_tot = unpack_hold(stored)
    if state == HOLD_SETTLED and s_use == use:
        return (end_tot, end_seq)
    if state == HOLD_OPEN:
        raise AssertionError("an open hold that is not in memory")
    return HoldEnded(_ended_detail(state))


cdef Py_ssize_t book_expire_due(Book book, int64_t now_ms, Py_ssize_t most) except -1:
    """Ends, with use 0, the open holds due by now_ms, at most `most` of
    them (the rest at the next call).  Returns how many it ended."""
    cdef Py_ssize_t n = 0
    cdef Hold h
    if book.failed:
        return 0
    while book.wheel_seconds and book.wheel_seconds[0] * 1000 <= now_ms and n < most:
        second = book.wheel_seconds[0]
        bucket = book.wheel.get(second)
        if bucket:
            # The bucket is walked once, in the order its holds were made,
            # across calls: a copy of its ids, whose iterator keeps its
            # place.  Looking for the dict's first key again would scan the
            # slots of every hold ended before (a dict keeps them): quadratic
            # in the holds of a second.  A hold settled since the copy is no
            # longer in the bucket; one added since (a clock set back) is in
            # the next copy.
            if book.due is None or book.due[0] != second:
                book.due = (second, iter(list(bucket)))
            for hold_id in book.due[1]:
                if hold_id in bucket:
                    _end(book, book.holds[hold_id], hold_id, 0, HOLD_EXPIRED, now_ms)
                    n += 1
                    if n == most:
                        break
            else:
                book.due = None
        if not bucket:
            heapq.heappop(book.wheel_seconds)
            book.wheel.pop(second, None)
            book.due = None
    return n


cdef object book_next_expiry_ms(Book book):
    while book.wheel_seconds:
        second = book.wheel_seconds[0]
        if book.wheel.get(second):
            return second * 1000
        heapq.heappop(book.wheel_seconds)
        book.wheel.pop(second, None)
    return None
