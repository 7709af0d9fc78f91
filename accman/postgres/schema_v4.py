"""Schema version 4: a hold's limits are judged before its balance, as the
embedded store judges them.  A hold on an account at
HOLDS_PER_ACCOUNT_MAX open holds (or on a store at HOLDS_MAX) is
too_many_holds whatever its balance, where version 2's accman_apply said
insufficient or overflow first when the balance could not cover it either.

accman_apply is version 2's with that one block moved: it is made here
from version 2's text (released, and so never changed), each piece checked
to be there once, so that what differs between the two is this file.
"""

from accman.postgres.schema_v2 import V2_APPLY

# A hold's limits, as version 2 judges them after overflow and min.
_LIMITS = """\
        IF k = 2 THEN
            IF a_holds[i] >= p_holds_account_max THEN r_code[j] := 5; CONTINUE; END IF;
            IF NOT counter_locked THEN
                SELECT c.open_holds INTO STRICT open_holds FROM accman_counter c FOR UPDATE;
                counter_locked := true;
            END IF;
            IF open_holds + holds_delta >= p_holds_max THEN r_code[j] := 6; CONTINUE; END IF;
        END IF;
"""
# The unknown account's refusal, after a keyed retry's answer: the limits
# come right after it, before overflow and min.
_NO_ACCOUNT = """\
        IF a_seq[i] = 0 AND (b < 0 OR NOT p_fund[i]) THEN r_code[j] := 1; CONTINUE; END IF;
"""
_CREATE = "CREATE FUNCTION accman_apply("


def _limits_first(apply: str) -> str:
    for piece in (_LIMITS, _NO_ACCOUNT, _CREATE):
        assert apply.count(piece) == 1, f"version 2's accman_apply has changed: {piece!r}"
    moved = apply.replace(_LIMITS, "").replace(_NO_ACCOUNT, _NO_ACCOUNT + _LIMITS)
    return moved.replace(_CREATE, "CREATE OR REPLACE FUNCTION accman_apply(")


V4 = _limits_first(V2_APPLY)
