"""The events checker's checks (tests/reliability/test_events_bank.py and
test_events_bank_pg.py run the changes, the faults and the readers; this
module judges the store and what the readers got against it).  An event is a dict as GET /events
serves it; a webhook POST is a webhook_receiver.Post.

A module, not a conftest.py: see relhelp.py."""

from accman.limits import EVENTS_RETENTION_S_DEFAULT
from bankcheck import Checker


def store_and_reader_problems(store, ops, reads, histories, settles, accounts, low, clients,
                              cli, posts, retention_s=EVENTS_RETENTION_S_DEFAULT):
    """The store against the bank checker's records (bankcheck.Checker:
    every acknowledged change at its seq and tot, each account's events
    exactly its history), its low_balance events (checked apart: the
    bank's checker knows none), and each reader's events against it: the
    Python followers (`clients`), the command line's (`cli`) and the
    webhook's POSTs (`posts`, repeats allowed), each but for the gaps it
    was told of past the server's `retention_s` (reader_problems).  The ids 1..N without a
    gap are asserted first."""
    assert [e["id"] for e in store] == list(range(1, len(store) + 1)), "a gap in the store"
    checker = Checker(ops, reads, histories, settles,
                      [e for e in store if e["account"] in accounts.values()
                       and e["type"] != "low_balance"],
                      accounts, all_ended=True)
    problems = [p for p in checker.run() if not p.startswith("event ids are not")]
    problems += low_balance_problems(store, histories, accounts, low)
    for client in clients:
        problems += client.errors
        problems += reader_problems(client.name_, client.events(), store, gaps=client.gaps,
                                    retention_s=retention_s)
    problems += reader_problems("accman events --follow", cli.events(), store, gaps=cli.gaps,
                                retention_s=retention_s)
    problems += reader_problems("the webhook", [e for p in posts for e in p.events], store,
                                repeats_allowed=True)
    return problems


def reader_problems(name, got, store, repeats_allowed=False, gaps=(),
                    retention_s=EVENTS_RETENTION_S_DEFAULT):
    """What `name` got against the store's stream: each event the store's
    of that id, whole; every id; in order, each once unless repeats are
    allowed (the webhook's are checked by webhook_problems).  But for the
    ids of the `gaps` it was told of, (after, first, when: wall-clock ms)
    for each 410 events_trimmed: each skips ids all past the retention
    (`retention_s`) when told, and none of them was got."""
    by_id = {e["id"]: e for e in store}
    problems = [f"{name}: event {e['id']} is {e}, the store's is {by_id.get(e['id'])}"
                for e in got if by_id.get(e["id"]) != e][:5]
    skipped = set()
    for after, first, told_ms in gaps:
        young = [i for i in range(after + 1, first)
                 if i in by_id and by_id[i]["at"] > told_ms - retention_s * 1000]
        if first <= after + 1 or young:
            problems.append(f"{name}: told at {told_ms} ms that the events after {after} "
                            f"before {first} were trimmed; within the retention: {young[:5]}")
        skipped.update(range(after + 1, first))
    ids = [e["id"] for e in got]
    missing = sorted(set(by_id) - set(ids) - skipped)
    if missing:
        problems.append(f"{name}: {len(missing)} events never got: {missing[:10]}")
    if skipped & set(ids):
        problems.append(f"{name}: got events it was told were trimmed: "
                        f"{sorted(skipped & set(ids))[:10]}")
    if not repeats_allowed and ids != sorted(set(ids)):
        twice = sorted({i for i in ids if ids.count(i) > 1})
        back = [(a, b) for a, b in zip(ids, ids[1:], strict=False) if b <= a]
        problems.append(f"{name}: not in id order each once: repeated {twice[:10]}, "
                        f"going back at {back[:5]}")
    return problems


def webhook_problems(posts, started_at, killed_at=()):
    """The duplicates SERVER.md allows, and no other.  A server's run
    POSTs a chain: each POST starts right after the last id of the one
    before it, or is a retry of it (the same body).  A POST that brings
    ids the receiver has seen and is neither starts a new run: it resends
    from the saved cursor (the batch in flight at the crash, and those
    acknowledged since the cursor's last save), and each restart starts
    one run, so each such POST needs a restart of its own before it.
    Who sent a POST is not told, so the arrival times decide, leniently:
    a dead server's POST may be read after the next server started.
    Returns (problems, ids repeated, how long before its kill the oldest
    id a new run repeated had first come: SERVER.md's "0.1 s worth")."""
    problems, repeated, back_s = [], 0, 0.0
    seen, used, previous = 0, 0, None      # used: the restarts that started a chain
    first_at = {}
    for p in posts:
        ids = p.ids
        if ids[0] <= seen:
            repeated += min(ids[-1], seen) - ids[0] + 1
            chained = previous is not None and ids[0] == previous.ids[-1] + 1
            retry = previous is not None and previous.body == p.body
            if not (chained or retry):
                if used + 1 < len(started_at) and started_at[used + 1] <= p.at:
                    used += 1
                    before = [r for r in range(1, len(started_at)) if started_at[r] <= p.at]
                    if before[-1] <= len(killed_at):
                        back_s = max(back_s, killed_at[before[-1] - 1] - first_at[ids[0]])
                else:
                    problems.append(f"webhook: a POST of ids {ids[0]}-{ids[-1]} repeats ids up "
                                    f"to {seen}, neither a retry nor a new run's first")
        for i in ids:
            first_at.setdefault(i, p.at)
        seen = max(seen, ids[-1])
        previous = p
    return problems, repeated, back_s


def low_balance_problems(store, histories, accounts, low):
    """A low_balance event right after each change (a mod or a hold) that
    takes a balance from >= `low` to < `low`, the same but for its type, and
    none elsewhere: once per crossing, across every restart."""
    problems = []
    want = set()
    for cred, entries in histories.items():
        prev = 0
        for e in entries:
            if prev >= low > e["tot"] and e["by"] < 0 and e.get("hold") in (None, e["seq"]):
                want.add((accounts[cred], e["seq"]))
            prev = e["tot"]
    got = set()
    for i, ev in enumerate(store):
        if ev["type"] != "low_balance":
            continue
        got.add((ev["account"], ev["seq"]))
        before = store[i - 1] if i else None
        if before is None or {**before, "id": ev["id"], "type": "low_balance"} != ev:
            problems.append(f"low_balance {ev} does not follow its change's event ({before})")
    if got != want:
        problems.append(f"low_balance events: {len(got - want)} without a crossing "
                        f"{sorted(got - want)[:5]}, {len(want - got)} crossings without one "
                        f"{sorted(want - got)[:5]}")
    return problems
