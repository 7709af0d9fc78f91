"""Schema version 8: a batch says how many changes it made, so that
`accman_mods_committed_total` counts them as the embedded store does.

accman_apply's reply is each op's outcome, and a keyed repeat (a mod or
hold sent again with its key) or a settle repeated with its use is
answered with its first reply, code OK: the front-end could not tell it
from a change, and counted it as one.  A settle that finds its hold due
ends it by expiry, a change, answered hold_ended: not counted.  Now
accman_apply records the number of history entries it made (the
batch's events less its low_balance ones) in the transaction's setting
`accman.changes`, which the front-end's call reads in the same statement
(accman.postgres.cluster).  A setting, not a column: the reply's shape is
unchanged, so that front-ends of version 7 still running call it as
before.  The charges' set path (accman_charges) returns before it and
leaves it unset: each of its ops is a change.

accman_apply is version 5's with the setting made before its last
statement, made from version 5's text, the piece checked to be there once,
so that what differs between the two is this file.
"""

from accman.postgres.schema_v5 import V5_APPLY

# accman_apply's last statement, which numbers the batch's events.
_NUMBER = ("    r_state := accman_number_events(e_type, p_hids, e_acct, e_seq, e_by, e_tot, "
           "e_key, e_hold,\n")
# Every event but a low_balance one (type 5) is a history entry the batch made.
_CHANGES = """\
    PERFORM set_config('accman.changes',
                       (SELECT count(*) FROM unnest(e_type) AS u(ty) WHERE u.ty <> 5)::text,
                       true);
"""


def _counted(apply: str) -> str:
    assert apply.count(_NUMBER) == 1, f"version 5's accman_apply has changed: {_NUMBER!r}"
    return apply.replace(_NUMBER, _CHANGES + _NUMBER)


V8 = _counted(V5_APPLY)
