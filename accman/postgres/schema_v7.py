"""Schema version 7: a call of accman_expire skips the accounts another
transaction holds before it picks the holds it looks at, not after.

Version 6's call took the accounts of the oldest p_max due holds and then
skipped those locked (SKIP LOCKED): when another front-end's call had
them all, or writes held them at that instant, it ended none although
other holds were due, and the round stopped there until the next second.
Two front-ends mostly ended a crowd one after the other.  Now the call
goes through the due holds oldest first, locking each one's account as
it comes to it, SKIP LOCKED, and ending that account's due holds, until it
has ended p_max; it looks at no more than the oldest
p_max * EXPIRE_LOOK_FACTOR due holds, so that a call never reads every due
hold however many are locked.

The window's holds are grouped by account first, so that the loop meets
each account once (met again, its row as the call's snapshot saw it
would be written back over the call's own change).  Accounts are locked
one at a time as the loop fetches them, so that a call holds no more
accounts than it ends holds of (and a few rows of the loop's fetch), and
a balance is read from its locked row (a row changed and committed by
another transaction since the call began is read as it is now).  They
are locked in the order of their oldest due hold, not in hid order: a
call never waits for an account (SKIP LOCKED), so no order makes a cycle.

accman_expire is version 6's with its selection replaced (a replacement of
the function, with the same arguments: front-ends of version 6 still
running call it unchanged), made from version 6's text, the piece checked
to be there once, so that what differs between the two is this file.
"""

from accman.postgres.schema_v6 import V6

EXPIRE_LOOK_FACTOR = 8

_SELECTION = """\
    FOR acct IN
        SELECT a.hid, a.tot, a.seq, a.holds FROM accman_accounts a
         WHERE a.hid IN (SELECT d.hid FROM accman_holds d WHERE d.expires_at <= now_ms
                          ORDER BY d.expires_at LIMIT p_max)
         ORDER BY a.hid FOR UPDATE SKIP LOCKED
    LOOP
"""
# The accounts of the window's due holds, each once, oldest due first.
_SKIPPING_FIRST = f"""\
    FOR acct IN
        SELECT a.hid, a.tot, a.seq, a.holds
          FROM (SELECT w.hid, min(w.expires_at) AS due
                  FROM (SELECT d.hid, d.expires_at FROM accman_holds d
                         WHERE d.expires_at <= now_ms
                         ORDER BY d.expires_at LIMIT p_max * {EXPIRE_LOOK_FACTOR}) w
                 GROUP BY w.hid) u
          JOIN accman_accounts a ON a.hid = u.hid
         ORDER BY u.due FOR UPDATE OF a SKIP LOCKED
    LOOP
"""


def _skipping_first(expire: str) -> str:
    assert expire.count(_SELECTION) == 1, "version 6's accman_expire has changed"
    return expire.replace(_SELECTION, _SKIPPING_FIRST)


V7 = _skipping_first(V6)
