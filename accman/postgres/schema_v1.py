"""Schema version 1, as it was released: the tables, and the first
accman_apply, accman_number_events and accman_expire (schema version 2
replaces the functions; accman.postgres.schema_v2).  A migration, once
released, never changes: a store at version 1 is brought forward by the
versions after it."""

V1_TABLES = """
CREATE TABLE accman_schema (
    one boolean PRIMARY KEY DEFAULT true CHECK (one),
    version integer NOT NULL,
    hash_key bytea NOT NULL CHECK (length(hash_key) = 16),
    cluster_id bytea NOT NULL CHECK (length(cluster_id) = 16)
);
-- The one row every write batch locks last: the next event id (gap-free:
-- a rolled-back batch gives its ids back) and the store's open holds.
CREATE TABLE accman_counter (
    one boolean PRIMARY KEY DEFAULT true CHECK (one),
    next_event bigint NOT NULL,
    open_holds bigint NOT NULL
);
INSERT INTO accman_counter VALUES (true, 1, 0);
-- An account is its newest history entry's tot and seq; seq 0 is a row a
-- batch made to lock a new account, never committed.  Pages half empty, so
-- that an update finds room beside its row and leaves the index alone (HOT).
CREATE TABLE accman_accounts (
    hid bytea PRIMARY KEY,
    tot bigint NOT NULL,
    seq bigint NOT NULL,
    low bigint,
    holds integer NOT NULL
) WITH (fillfactor = 50);
CREATE TABLE accman_history (
    hid bytea NOT NULL,
    seq bigint NOT NULL,
    kind smallint NOT NULL,
    by bigint NOT NULL,
    tot bigint NOT NULL,
    at bigint NOT NULL,
    key text,
    min bigint,
    hold bigint,
    PRIMARY KEY (hid, seq)
);
-- A key names one entry for as long as the entry is kept.
CREATE UNIQUE INDEX accman_history_key ON accman_history (hid, key) WHERE key IS NOT NULL;
-- Every hold has exactly one end (a settle or an expiry).
CREATE UNIQUE INDEX accman_history_hold_end ON accman_history (hid, hold) WHERE kind IN (3, 4);
CREATE TABLE accman_holds (
    hid bytea NOT NULL,
    hold bigint NOT NULL,
    amount bigint NOT NULL CHECK (amount > 0),
    expires_at bigint NOT NULL,
    PRIMARY KEY (hid, hold)
);
CREATE INDEX accman_holds_due ON accman_holds (expires_at);
CREATE TABLE accman_events (
    id bigint PRIMARY KEY,
    type smallint NOT NULL,
    hid bytea NOT NULL,
    seq bigint NOT NULL,
    by bigint NOT NULL,
    tot bigint NOT NULL,
    at bigint NOT NULL,
    key text,
    hold bigint
);
"""

# One batch of a front-end, in its order: p_acct names each op's account by
# its index in p_hids (distinct, sorted); p_fund says which accounts the
# batch may create; p_by is a settle's use, p_arg a mod's low, a hold's ttl
# in seconds, a settle's hold id.
V1_APPLY = r"""
CREATE FUNCTION accman_apply(
    p_hids bytea[], p_fund boolean[], p_acct integer[], p_kind smallint[],
    p_by bigint[], p_min bigint[], p_key text[], p_arg bigint[],
    p_low_default bigint, p_holds_account_max integer, p_holds_max bigint,
    OUT r_code smallint[], OUT r_tot bigint[], OUT r_seq bigint[])
LANGUAGE plpgsql AS $$
DECLARE
    c_max CONSTANT bigint := 9223372036854775807;
    c_min CONSTANT bigint := -9223372036854775807 - 1;
    n_acct integer := coalesce(array_length(p_hids, 1), 0);
    n_ops integer := coalesce(array_length(p_kind, 1), 0);
    now_ms bigint := (extract(epoch FROM clock_timestamp()) * 1000)::bigint;
    a_tot bigint[]; a_seq bigint[]; a_seq0 bigint[]; a_low bigint[]; a_holds integer[];
    a_new boolean[];
    -- The batch's events, every column assigned for each (an array grown by
    -- subscripts must not skip one); e_late marks those whose history entry
    -- is written by one INSERT at the end (plain mods: nothing in the batch
    -- looks them up).
    n_ev integer := 0;
    e_type smallint[]; e_acct integer[]; e_seq bigint[]; e_by bigint[]; e_tot bigint[];
    e_key text[]; e_hold bigint[]; e_late boolean[];
    r record; t bigint; s bigint; l bigint; h integer;
    i integer; k smallint; b bigint; cur bigint; nt bigint; lim bigint;
    hk smallint; hby bigint; hmin bigint; htot bigint; hseq bigint; amt bigint; due bigint;
    open_holds bigint; holds_delta bigint := 0; counter_locked boolean := false;
BEGIN
    r_code := array_fill(0::smallint, ARRAY[n_ops]);
    r_tot := array_fill(NULL::bigint, ARRAY[n_ops]);
    r_seq := array_fill(NULL::bigint, ARRAY[n_ops]);
    a_tot := array_fill(0::bigint, ARRAY[n_acct]); a_seq := a_tot; a_seq0 := a_tot;
    a_low := array_fill(NULL::bigint, ARRAY[n_acct]);
    a_holds := array_fill(-1, ARRAY[n_acct]);
    a_new := array_fill(false, ARRAY[n_acct]);
    -- Lock the batch's accounts, in hid order.  An account made meanwhile by
    -- another front-end is locked after the others: the rare cycle that can
    -- make is a deadlock that PostgreSQL breaks, and the batch is sent again.
    FOR r IN SELECT u.i, a.tot, a.seq, a.low, a.holds
               FROM unnest(p_hids) WITH ORDINALITY AS u(hid, i)
               JOIN accman_accounts a ON a.hid = u.hid ORDER BY a.hid FOR UPDATE OF a
    LOOP
        a_tot[r.i] := r.tot; a_seq[r.i] := r.seq; a_seq0[r.i] := r.seq;
        a_low[r.i] := r.low; a_holds[r.i] := r.holds;
    END LOOP;
    -- A new account that the batch may fund: a row at seq 0 holds its lock,
    -- and is removed at the end if nothing applied.
    FOR i IN 1..n_acct LOOP
        CONTINUE WHEN a_holds[i] >= 0;
        a_holds[i] := 0;
        CONTINUE WHEN NOT p_fund[i];
        INSERT INTO accman_accounts VALUES (p_hids[i], 0, 0, NULL, 0) ON CONFLICT (hid) DO NOTHING;
        IF FOUND THEN
            a_new[i] := true;
        ELSE
            SELECT a.tot, a.seq, a.low, a.holds INTO STRICT t, s, l, h
              FROM accman_accounts a WHERE a.hid = p_hids[i] FOR UPDATE;
            a_tot[i] := t; a_seq[i] := s; a_seq0[i] := s; a_low[i] := l; a_holds[i] := h;
        END IF;
    END LOOP;

    FOR j IN 1..n_ops LOOP
        i := p_acct[j]; k := p_kind[j]; b := p_by[j]; cur := a_tot[i];
        IF k = 0 THEN
            IF a_seq[i] > 0 THEN r_tot[j] := cur; ELSE r_code[j] := 1; END IF;
            CONTINUE;
        END IF;
        IF k = 3 THEN
            -- A settle: b is its use, p_arg its hold.
            IF a_seq[i] = 0 THEN r_code[j] := 7; CONTINUE; END IF;
            SELECT x.amount, x.expires_at INTO amt, due FROM accman_holds x
             WHERE x.hid = p_hids[i] AND x.hold = p_arg[j];
            IF FOUND THEN
                IF due > now_ms THEN
                    IF b > amt THEN r_code[j] := 9; r_tot[j] := amt; CONTINUE; END IF;
                    nt := amt - b;
                ELSE
                    -- Due but not yet ended by a round: it ends now, by expiry.
                    nt := amt; k := 4; r_code[j] := 8;
                END IF;
                IF cur > c_max - nt THEN r_code[j] := 4; CONTINUE; END IF;
                DELETE FROM accman_holds x WHERE x.hid = p_hids[i] AND x.hold = p_arg[j];
                a_seq[i] := a_seq[i] + 1; a_tot[i] := cur + nt;
                a_holds[i] := a_holds[i] - 1; holds_delta := holds_delta - 1;
                INSERT INTO accman_history VALUES
                    (p_hids[i], a_seq[i], k, nt, a_tot[i], now_ms, NULL, NULL, p_arg[j]);
                n_ev := n_ev + 1;
                e_type[n_ev] := k; e_acct[n_ev] := i; e_seq[n_ev] := a_seq[i]; e_by[n_ev] := nt;
                e_tot[n_ev] := a_tot[i]; e_key[n_ev] := NULL; e_hold[n_ev] := p_arg[j];
                e_late[n_ev] := false;
                IF k = 3 THEN r_tot[j] := a_tot[i]; r_seq[j] := a_seq[i]; END IF;
                CONTINUE;
            END IF;
            SELECT x.kind, x.by, x.tot, x.seq INTO hk, hby, htot, hseq FROM accman_history x
             WHERE x.hid = p_hids[i] AND x.hold = p_arg[j] AND x.kind IN (3, 4);
            IF NOT FOUND THEN r_code[j] := 7; CONTINUE; END IF;
            IF hk = 4 THEN r_code[j] := 8; CONTINUE; END IF;
            SELECT -x.by INTO STRICT amt FROM accman_history x
             WHERE x.hid = p_hids[i] AND x.seq = p_arg[j];
            IF hby = amt - b THEN r_tot[j] := htot; r_seq[j] := hseq;
            ELSE r_code[j] := 8; END IF;
            CONTINUE;
        END IF;
        -- A mod (k = 1) or a hold (k = 2).
        lim := p_min[j];
        IF p_key[j] IS NOT NULL THEN
            SELECT x.kind, x.by, x.min, x.tot, x.seq INTO hk, hby, hmin, htot, hseq
              FROM accman_history x WHERE x.hid = p_hids[i] AND x.key = p_key[j];
            IF FOUND THEN
                IF hk <> k OR hby <> b OR hmin IS DISTINCT FROM lim THEN r_code[j] := 3;
                ELSE r_tot[j] := htot; r_seq[j] := hseq; END IF;
                CONTINUE;
            END IF;
        END IF;
        IF a_seq[i] = 0 AND (b < 0 OR NOT p_fund[i]) THEN r_code[j] := 1; CONTINUE; END IF;
        IF (b > 0 AND cur > c_max - b) OR (b < 0 AND cur < c_min - b) THEN
            r_code[j] := 4; CONTINUE;
        END IF;
        nt := cur + b;
        IF lim IS NOT NULL AND nt < lim THEN r_code[j] := 2; r_tot[j] := cur; CONTINUE; END IF;
        IF k = 2 THEN
            IF a_holds[i] >= p_holds_account_max THEN r_code[j] := 5; CONTINUE; END IF;
            IF NOT counter_locked THEN
                SELECT c.open_holds INTO STRICT open_holds FROM accman_counter c FOR UPDATE;
                counter_locked := true;
            END IF;
            IF open_holds + holds_delta >= p_holds_max THEN r_code[j] := 6; CONTINUE; END IF;
        END IF;
        s := a_seq[i] + 1; a_seq[i] := s; a_tot[i] := nt;
        IF k = 1 AND b > 0 AND p_arg[j] IS NOT NULL THEN a_low[i] := p_arg[j]; END IF;
        n_ev := n_ev + 1;
        e_type[n_ev] := k; e_acct[n_ev] := i; e_seq[n_ev] := s; e_by[n_ev] := b;
        e_tot[n_ev] := nt; e_key[n_ev] := p_key[j];
        e_hold[n_ev] := CASE WHEN k = 2 THEN s END; e_late[n_ev] := k = 1 AND p_key[j] IS NULL;
        IF NOT e_late[n_ev] THEN
            INSERT INTO accman_history VALUES (p_hids[i], s, k, b, nt, now_ms, p_key[j], lim,
                                               CASE WHEN k = 2 THEN s END);
        END IF;
        IF k = 2 THEN
            INSERT INTO accman_holds VALUES (p_hids[i], s, -b, now_ms + p_arg[j] * 1000);
            a_holds[i] := a_holds[i] + 1; holds_delta := holds_delta + 1;
        END IF;
        l := coalesce(a_low[i], p_low_default);
        IF l IS NOT NULL AND cur >= l AND nt < l THEN
            n_ev := n_ev + 1;
            e_type[n_ev] := 5; e_acct[n_ev] := i; e_seq[n_ev] := s; e_by[n_ev] := b;
            e_tot[n_ev] := nt; e_key[n_ev] := p_key[j]; e_hold[n_ev] := e_hold[n_ev - 1];
            e_late[n_ev] := false;
        END IF;
        r_tot[j] := nt; r_seq[j] := s;
    END LOOP;

    IF n_ev > 0 THEN
        INSERT INTO accman_history
        SELECT p_hids[e.a], e.s, 1, e.b, e.tt, now_ms, NULL, NULL, NULL
          FROM unnest(e_acct, e_seq, e_by, e_tot, e_late) AS e(a, s, b, tt, late)
         WHERE e.late;
    END IF;
    UPDATE accman_accounts a SET tot = u.tot, seq = u.seq, low = u.low, holds = u.holds
      FROM unnest(p_hids, a_tot, a_seq, a_seq0, a_low, a_holds)
           AS u(hid, tot, seq, seq0, low, holds)
     WHERE a.hid = u.hid AND u.seq <> u.seq0;
    DELETE FROM accman_accounts a USING unnest(p_hids, a_new, a_seq) AS u(hid, made, seq)
     WHERE a.hid = u.hid AND u.made AND u.seq = 0;
    PERFORM accman_number_events(e_type, p_hids, e_acct, e_seq, e_by, e_tot, e_key, e_hold,
                                 now_ms, holds_delta);
END;
$$;
"""

# Last in every write transaction: takes the counter row's lock (held until
# commit: this is what serialises the store's writers, once per batch),
# numbers the events without gaps, and tells listeners at commit.
V1_NUMBER = r"""
CREATE FUNCTION accman_number_events(
    e_type smallint[], p_hids bytea[], e_acct integer[], e_seq bigint[], e_by bigint[],
    e_tot bigint[], e_key text[], e_hold bigint[], now_ms bigint, holds_delta bigint)
RETURNS void LANGUAGE plpgsql AS $$
DECLARE
    n_ev integer := coalesce(array_length(e_type, 1), 0);
    base bigint;
BEGIN
    IF n_ev = 0 AND holds_delta = 0 THEN RETURN; END IF;
    UPDATE accman_counter SET next_event = next_event + n_ev, open_holds = open_holds + holds_delta
    RETURNING next_event - n_ev INTO STRICT base;
    IF n_ev = 0 THEN RETURN; END IF;
    INSERT INTO accman_events
    SELECT base + e.o - 1, e.t, p_hids[e.a], e.s, e.b, e.tt, now_ms, e.k, e.h
      FROM unnest(e_type, e_acct, e_seq, e_by, e_tot, e_key, e_hold)
           WITH ORDINALITY AS e(t, a, s, b, tt, k, h, o);
    PERFORM pg_notify('accman_events', (base + n_ev - 1)::text);
END;
$$;
"""

# Ends due holds (use 0), at most p_max accounts' worth per call.  Accounts
# another front-end has locked are skipped (SKIP LOCKED), and a hold is ended
# only while its account is locked and the hold is still open: with many
# front-ends running rounds, each due hold ends exactly once.
V1_EXPIRE = r"""
CREATE FUNCTION accman_expire(p_max integer) RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    c_max CONSTANT bigint := 9223372036854775807;
    now_ms bigint := (extract(epoch FROM clock_timestamp()) * 1000)::bigint;
    acct record; x record;
    hids bytea[] := '{}'; n integer := 0;
    e_type smallint[] := '{}'; e_acct integer[] := '{}'; e_seq bigint[] := '{}';
    e_by bigint[] := '{}'; e_tot bigint[] := '{}'; e_key text[] := '{}'; e_hold bigint[] := '{}';
    t bigint; s bigint; h integer; ended integer := 0;
BEGIN
    FOR acct IN
        SELECT a.hid, a.tot, a.seq, a.holds FROM accman_accounts a
         WHERE a.hid IN (SELECT d.hid FROM accman_holds d WHERE d.expires_at <= now_ms
                          ORDER BY d.expires_at LIMIT p_max)
         ORDER BY a.hid FOR UPDATE SKIP LOCKED
    LOOP
        n := n + 1; hids := hids || acct.hid;
        t := acct.tot; s := acct.seq; h := acct.holds;
        FOR x IN SELECT d.hold, d.amount FROM accman_holds d
                  WHERE d.hid = acct.hid AND d.expires_at <= now_ms ORDER BY d.hold LOOP
            -- A balance at the top of int64 cannot take the hold back; it
            -- stays open (and due) until the balance allows it.
            CONTINUE WHEN t > c_max - x.amount;
            DELETE FROM accman_holds d WHERE d.hid = acct.hid AND d.hold = x.hold;
            s := s + 1; t := t + x.amount; h := h - 1; ended := ended + 1;
            INSERT INTO accman_history
                VALUES (acct.hid, s, 4, x.amount, t, now_ms, NULL, NULL, x.hold);
            e_type := e_type || 4::smallint; e_acct := e_acct || n; e_seq := e_seq || s;
            e_by := e_by || x.amount; e_tot := e_tot || t; e_key := e_key || NULL::text;
            e_hold := e_hold || x.hold;
        END LOOP;
        UPDATE accman_accounts a SET tot = t, seq = s, holds = h WHERE a.hid = acct.hid;
    END LOOP;
    PERFORM accman_number_events(e_type, hids, e_acct, e_seq, e_by, e_tot, e_key, e_hold,
                                 now_ms, -ended::bigint);
    RETURN ended;
END;
$$;
"""
