"""The events checker on PostgreSQL's copy check (test_events_bank_pg.py):
the cluster that is not the events' home numbers its own events, which
accman/postgres/merge.py copies into the home's one order; what that
cluster keeps of them (its trimming deletes only what is copied) against
the store's stream.

A module, not a conftest.py: see relhelp.py."""

from accman.postgres.schema import EVENT_TYPES


def local_events(pg, dbname):
    """A cluster's own accman_events, as GET /events would say them."""
    rows = pg.psql("SELECT id, type, encode(hid, 'hex'), seq, by, tot, at, "
                   "coalesce(key, '-'), coalesce(hold::text, '-') FROM accman_events "
                   "ORDER BY id", dbname)
    out = []
    for line in rows.splitlines():
        i, kind, account, seq, by, tot, at, key, hold = line.split("|")
        out.append({"id": int(i), "type": EVENT_TYPES[int(kind)], "account": account,
                    "seq": int(seq), "by": int(by), "tot": int(tot), "at": int(at),
                    "key": None if key == "-" else key,
                    "hold": None if hold == "-" else int(hold)})
    return out


def copied_upto(fes):
    """How far the home records the other cluster's events copied."""
    cluster_id = fes.other.psql("SELECT encode(cluster_id, 'hex') FROM accman_schema",
                                fes.dbname)
    return int(fes.home.psql(f"SELECT upto FROM accman_merged WHERE cluster_id = "
                             f"decode('{cluster_id}', 'hex')", fes.dbname))


def other_accounts(fes):
    """The accounts the other cluster holds, every one ever made there."""
    return set(fes.other.psql("SELECT encode(hid, 'hex') FROM accman_accounts",
                              fes.dbname).split())


def copy_problems(local, store, upto, theirs=None):
    """The other cluster's own events (`local`, what its trimming kept of
    them: only what was copied goes) against the store's: its ids lo..n
    without a gap; the store's events of its accounts (`theirs`; None:
    those of `local`) n, each once, the last of them exactly `local`,
    field for field but the id, in its order; `upto` (the home's record)
    n: every one copied."""
    problems = []
    ids = [e["id"] for e in local]
    lo = ids[0] if ids else 1
    n = lo + len(local) - 1
    if ids != list(range(lo, n + 1)):
        problems.append(f"the other cluster's own event ids are not {lo}..{n}")
    theirs = {e["account"] for e in local} if theirs is None else theirs
    copied = [{**e, "id": None} for e in store if e["account"] in theirs]
    if len(copied) != n:
        problems.append(f"the other cluster numbered {n} events, the store has {len(copied)}")
    copied = copied[lo - 1:]
    mine = [{**e, "id": None} for e in local]
    if copied != mine:
        first = next((n for n, (a, b) in enumerate(zip(copied, mine, strict=False)) if a != b),
                     min(len(copied), len(mine)))
        problems.append(f"the copy: {len(mine)} events on the other cluster, {len(copied)} "
                        f"in the store's order; first difference at {first}: "
                        f"{mine[first:first + 1]} vs {copied[first:first + 1]}")
    if upto != n:
        problems.append(f"the home records the other cluster copied up to {upto}, of {n}")
    return problems
