"""Schema version 5: the common batch of a busy front-end, charges on
distinct accounts with no key, is judged and applied by set statements
(accman_charges) instead of op by op.

accman_apply judges each op in a PL/pgSQL loop, after a statement that
locks and reads every account of the batch: per charge, the lock's read,
some thirty interpreted statements, and the update's join.  A batch in
which every op is a charge (by < 0, no key) on an account of its own has
outcomes that do not depend on one another, so one UPDATE can judge and
apply them all: it locks each account as it charges it (in hid order), and
applies a charge only where the account exists and the new balance is in
range and at least `min`.  If every charge applied, the batch's history
and events are written from the update's rows and the outcomes returned.
If one was refused, the set path's subtransaction is rolled back (undoing
its charges and releasing the accounts it locked, so that the op-by-op
judgement locks every account in hid order from none) and accman_apply
judges the batch op by op, as before: a refusal's answer, and which
charges apply, are then exactly version 4's.

The hid order of the UPDATE's locks is its plan's: a nested loop whose
outer side is the ops sorted by hid, which the front-end's session
settings make the only join it plans (accman.postgres.connecting
SESSION_SETTINGS: no hash or merge joins, no sequential scans).  A
connection without them could lock in another order; the cost would be a
deadlock that PostgreSQL breaks and the store sends again, not a wrong
answer.

accman_apply is version 4's with the dispatch inserted before its first
lock, made from version 4's text as version 4 was made from version 2's.
"""

from accman.postgres.schema_v4 import V4

# Charges on distinct accounts (p_acct[j] = the index in p_hids of op j's
# account; no two ops share one), none keyed: applied together, with the
# outcomes in r_tot and r_seq and the counter in r_state; or, when any is
# refused, SQLSTATE AMC01, which the caller catches in a block whose
# subtransaction's rollback undoes the charges and unlocks their accounts.
V5_CHARGES = r"""
CREATE FUNCTION accman_charges(
    p_hids bytea[], p_acct integer[], p_by bigint[], p_min bigint[], p_low_default bigint,
    OUT r_tot bigint[], OUT r_seq bigint[], OUT r_state bigint[])
LANGUAGE plpgsql AS $$
DECLARE
    c_min CONSTANT bigint := -9223372036854775807 - 1;
    n_ops integer := array_length(p_acct, 1);
    now_ms bigint := (extract(epoch FROM clock_timestamp()) * 1000)::bigint;
    f_j bigint[]; f_hid bytea[]; f_low bigint[];
    e_type smallint[]; e_acct integer[]; e_seq bigint[]; e_by bigint[]; e_tot bigint[];
BEGIN
    -- The join's outer side is the ops sorted by hid, so that accounts are
    -- locked in hid order, as accman_apply locks them.  A charge's by is
    -- negative: c_min - by and the old balance (tot - by) cannot overflow,
    -- and the CASE tests the range before the new balance is computed.
    WITH o AS (SELECT p_hids[u.a] AS hid, u.b, u.m, u.j
                 FROM unnest(p_acct, p_by, p_min) WITH ORDINALITY AS u(a, b, m, j)
                ORDER BY 1),
         up AS (UPDATE accman_accounts a SET tot = a.tot + o.b, seq = a.seq + 1
                  FROM o
                 WHERE a.hid = o.hid AND a.seq > 0
                   AND CASE WHEN a.tot >= c_min - o.b THEN o.m IS NULL OR a.tot + o.b >= o.m
                            ELSE false END
                RETURNING o.j, a.hid, a.tot, a.seq, coalesce(a.low, p_low_default) AS low)
    SELECT array_agg(up.j ORDER BY up.j), array_agg(up.hid ORDER BY up.j),
           array_agg(up.tot ORDER BY up.j), array_agg(up.seq ORDER BY up.j),
           array_agg(up.low ORDER BY up.j)
      INTO f_j, f_hid, r_tot, r_seq, f_low FROM up;
    -- A refusal: the caller's subtransaction is rolled back, which undoes
    -- the charges and releases their rows.  An undo by a second UPDATE
    -- would keep them locked: the op-by-op judgement that follows would
    -- then lock a refused account, lower in hid order, while holding
    -- higher ones, and deadlock with a batch that locks in hid order.
    IF coalesce(array_length(f_j, 1), 0) < n_ops THEN
        RAISE EXCEPTION 'accman_charges: a charge was refused' USING ERRCODE = 'AMC01';
    END IF;
    INSERT INTO accman_history
    SELECT u.hid, u.seq, 1, u.by, u.tot, now_ms, NULL, NULL, NULL, NULL
      FROM unnest(f_hid, r_seq, p_by, r_tot) AS u(hid, seq, by, tot);
    -- Each charge's event, and a low_balance event after it where the
    -- charge took the balance from at least the account's low to below it.
    SELECT array_agg(x.t ORDER BY x.j, x.t), array_agg(x.a ORDER BY x.j, x.t),
           array_agg(x.seq ORDER BY x.j, x.t), array_agg(x.by ORDER BY x.j, x.t),
           array_agg(x.tot ORDER BY x.j, x.t)
      INTO e_type, e_acct, e_seq, e_by, e_tot
      FROM (SELECT u.j, u.a, u.seq, u.by, u.tot, v.t
              FROM unnest(p_acct, r_seq, p_by, r_tot, f_low) WITH ORDINALITY
                   AS u(a, seq, by, tot, low, j)
             CROSS JOIN (VALUES (1::smallint), (5::smallint)) AS v(t)
             WHERE v.t = 1 OR (u.low IS NOT NULL AND u.tot - u.by >= u.low
                               AND u.tot < u.low)) AS x;
    r_state := accman_number_events(e_type, p_hids, e_acct, e_seq, e_by, e_tot, NULL, NULL,
                                    now_ms, 0, 0, 0);
END;
$$;
"""

_DECLARE = "    counter_locked boolean := false;\n"
_FIRST_LOCK = "    -- Lock the batch's accounts, in hid order."
_DISPATCH = """\
    -- Charges on distinct accounts, none keyed: applied by set statements
    -- (accman_charges) unless one is refused.
    IF n_ops > 0 AND n_acct = n_ops AND p_key IS NULL AND p_arg IS NULL
       AND p_kind <@ ARRAY[1::smallint] AND 0 > ALL(p_by) THEN
        -- A block of its own: its subtransaction, rolled back on a refusal,
        -- releases the accounts the set path locked.
        BEGIN
            SELECT c.r_tot, c.r_seq, c.r_state INTO f_tot, f_seq, f_state
              FROM accman_charges(p_hids, p_acct, p_by, p_min, p_low_default) AS c;
            r_tot := f_tot; r_seq := f_seq; r_state := f_state;
            RETURN;
        EXCEPTION WHEN SQLSTATE 'AMC01' THEN
            NULL;
        END;
    END IF;
"""


def _with_dispatch(apply: str) -> str:
    for piece in (_DECLARE, _FIRST_LOCK):
        assert apply.count(piece) == 1, f"version 4's accman_apply has changed: {piece!r}"
    return (apply
            .replace(_DECLARE, _DECLARE + "    f_tot bigint[]; f_seq bigint[]; f_state bigint[];\n")
            .replace(_FIRST_LOCK, _DISPATCH + _FIRST_LOCK))


V5_APPLY = _with_dispatch(V4)
V5 = V5_CHARGES + V5_APPLY
