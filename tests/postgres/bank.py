"""The bank checker: what the database holds against what front-ends were
told.  Every acknowledged mod is in its account's history exactly once,
with the tot and seq it was acknowledged with; nothing is there that no
one sent; every history runs 1..n without gaps, each tot the previous
plus its by; no charge with min 0 took a balance below 0; the account's
tot is its newest entry's."""

import json
import os
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]


def spawn_front_end(**args):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.Popen([sys.executable, str(HERE / "frontend_child.py"), json.dumps(args)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_front_end(proc, timeout_s):
    out, err = proc.communicate(timeout=timeout_s)
    assert proc.returncode == 0, err[-3000:]


def read_outcomes(paths):
    recs = []
    for p in paths:
        with open(p) as f:
            recs.extend(json.loads(line) for line in f)
    return recs


def check_bank(cluster, dbname, account_id, outcomes, funded):
    """`account_id(cred)` is the store's public id; `funded` maps cred to
    its funding amount (one entry with key fund-<cred>).  Returns counts."""
    rows = cluster.psql("SELECT encode(hid, 'hex'), seq, by, tot, coalesce(key, '') "
                        "FROM accman_history ORDER BY hid, seq", dbname)
    history = defaultdict(list)
    for line in rows.splitlines():
        hid, seq, by, tot, key = line.split("|")
        history[hid].append((int(seq), int(by), int(tot), key or None))
    accounts = {}
    for line in cluster.psql("SELECT encode(hid, 'hex'), tot, seq FROM accman_accounts",
                             dbname).splitlines():
        hid, tot, seq = line.split("|")
        accounts[hid] = (int(tot), int(seq))
    by_key = {}
    for hid, entries in history.items():
        prev = 0
        for n, (seq, by, tot, key) in enumerate(entries, 1):
            assert seq == n, f"{hid}: seq {seq} where {n} was due (a gap)"
            assert tot == prev + by, f"{hid} seq {seq}: tot {tot} != {prev} + {by}"
            if by < 0:
                assert tot >= 0, f"{hid} seq {seq}: a charge with min 0 left {tot}"
            prev = tot
            assert key is not None, f"{hid} seq {seq}: an entry no front-end sent (no key)"
            assert key not in by_key, f"key {key} applied twice"
            by_key[key] = (hid, by, tot, seq)
        assert accounts[hid] == (prev, len(entries)), f"{hid}: account row disagrees"
    sent = {r["key"]: r for r in outcomes}
    acked = 0
    for r in outcomes:
        if r["ok"]:
            acked += 1
            got = by_key.get(r["key"])
            assert got is not None, f"acknowledged mod {r['key']} is lost"
            assert got == (account_id(r["cred"]), r["by"], r["tot"], r["seq"]), \
                f"acknowledged {r} but the history has {got}"
        elif r["error"] == "Insufficient":
            assert r["key"] not in by_key, f"refused mod {r['key']} was applied"
    for key, (hid, by, _tot, _seq) in by_key.items():
        if key.startswith("fund-"):
            continue
        assert key in sent, f"history entry with key {key} that no front-end sent"
        assert account_id(sent[key]["cred"]) == hid and sent[key]["by"] == by
    assert sum(1 for k in by_key if k.startswith("fund-")) == len(funded)
    return {"acked": acked, "entries": len(by_key),
            "unknown": sum(1 for r in outcomes if not r["ok"] and r["error"] != "Insufficient")}
