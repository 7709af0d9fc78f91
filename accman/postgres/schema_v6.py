"""Schema version 6: a call of accman_expire ends at most p_max holds, not
all the due holds of up to p_max accounts.

Version 2's call took the accounts of the first p_max due holds and ended
every due hold of each, in one transaction that kept those accounts
locked to its end: a million holds due on a few hundred accounts made one
call of tens of seconds, during which every write to those accounts
waited, and the round's deadline ran out.  Now a call stops once it has
ended p_max holds (an account's are ended in hold order, so a call that
stops inside an account leaves it its later ones), and each transaction
is short.  The round calls again until a call ends none.

accman_expire is version 2's with the two exits inserted, made here from
version 2's text (released, and so never changed), each piece checked to
be there once, so that what differs between the two is this file.
"""

from accman.postgres.schema_v2 import V2_EXPIRE

_CREATE = "CREATE FUNCTION accman_expire("
# The first statement of the per-hold loop, and the account's update that
# ends the per-account one.
_PER_HOLD = """\
            -- A balance at the top of int64 cannot take the hold back; it
            -- stays open (and due) until the balance allows it.
            CONTINUE WHEN t > c_max - x.amount;
"""
_PER_ACCOUNT = """\
        UPDATE accman_accounts a SET tot = t, seq = s, holds = h WHERE a.hid = acct.hid;
"""


def _bounded(expire: str) -> str:
    for piece in (_CREATE, _PER_HOLD, _PER_ACCOUNT):
        assert expire.count(piece) == 1, f"version 2's accman_expire has changed: {piece!r}"
    return (expire
            .replace(_CREATE, "CREATE OR REPLACE FUNCTION accman_expire(")
            .replace(_PER_HOLD, "            EXIT WHEN ended >= p_max;\n" + _PER_HOLD)
            .replace(_PER_ACCOUNT, _PER_ACCOUNT + "        EXIT WHEN ended >= p_max;\n"))


V6 = _bounded(V2_EXPIRE)
