"""Schema version 7: a call of accman_expire skips the accounts another
transaction holds before it picks the holds it looks at, not after.

Version 6's call took the accounts of the oldest p_max due holds and then
skipped those locked (SKIP LOCKED): when another front-end's call had
them all, or writes held them at that instant, it ended none although
other holds were due, and the round stopped there until the next second.
Two front-ends mostly ended a crowd one after the other.  Now the call
goes through the accounts of the due holds in the order of each one's
oldest due hold, locking each as it comes to it, SKIP LOCKED, and ending
that account's due holds, until it has ended p_max; it looks at no more
than the oldest p_max * EXPIRE_LOOK_FACTOR due holds, so that a call never
reads every due hold however many are locked.

The window's holds are grouped by account, so that the loop comes to each
account once.  The loop's query reads holds only: each account is locked,
and its row read as it is now, by a statement of its own as the loop
comes to it, SKIP LOCKED.  So a call locks no account past the one at
which it reaches p_max, and reads no account of its window that it does
not lock (locked by the loop's query, FOR UPDATE OF the accounts, those
of each fetch of its rows would be locked together, the ones past p_max
kept locked, unchanged, to the call's end; and the query would join and
sort every account of the window before giving its first row).
Accounts are locked in the order of their oldest due hold, not in hid
order: a call never waits for an account (SKIP LOCKED), so no order
makes a cycle.

accman_expire is version 6's with its selection replaced (a replacement of
the function, with the same arguments: front-ends of version 6 still
running call it unchanged), made from version 6's text, each piece
checked to be there once, so that what differs between the two is this
file.
"""

from accman.postgres.schema_v6 import V6

EXPIRE_LOOK_FACTOR = 8

_DECLARE = "    acct record; x record;\n"
_SELECTION = """\
    FOR acct IN
        SELECT a.hid, a.tot, a.seq, a.holds FROM accman_accounts a
         WHERE a.hid IN (SELECT d.hid FROM accman_holds d WHERE d.expires_at <= now_ms
                          ORDER BY d.expires_at LIMIT p_max)
         ORDER BY a.hid FOR UPDATE SKIP LOCKED
    LOOP
"""
# The accounts of the window's due holds, each once, oldest due first; each
# locked by its own statement, or skipped.  The window's size is a bigint: any
# p_max version 6 took is taken.
_SKIPPING_FIRST = f"""\
    FOR due IN
        SELECT w.hid FROM (SELECT d.hid, d.expires_at FROM accman_holds d
                            WHERE d.expires_at <= now_ms
                            ORDER BY d.expires_at LIMIT p_max::bigint * {EXPIRE_LOOK_FACTOR}) w
         GROUP BY w.hid ORDER BY min(w.expires_at)
    LOOP
        SELECT a.hid, a.tot, a.seq, a.holds INTO acct FROM accman_accounts a
         WHERE a.hid = due.hid FOR UPDATE SKIP LOCKED;
        CONTINUE WHEN NOT FOUND;
"""


def _skipping_first(expire: str) -> str:
    for piece in (_DECLARE, _SELECTION):
        assert expire.count(piece) == 1, f"version 6's accman_expire has changed: {piece!r}"
    return (expire
            .replace(_DECLARE, "    acct record; due record; x record;\n")
            .replace(_SELECTION, _SKIPPING_FIRST))


V7 = _skipping_first(V6)
