"""The calling-side bank checker's records and checks
(tests/reliability/test_calling_bank.py runs the load and the kills; this
module judges what they left; test_calling_checker.py checks it on
made-up runs): what each consumer got, the service's log, and each
account's history, reconciled against docs/CALLING.md.

Every request of an account has its own amount A (tests/calling_bank_app.py:
estimate A, charge A - FEE_BACK), so that a hold (by -A) or a charge (by
-(A - FEE_BACK)) in a history names the request that made it; the end of a
hold names its hold.

A module, not a conftest.py: see relhelp.py."""

import collections
import re
from dataclasses import dataclass

from accman.calling.owed import fingerprint

FEE_BACK = 500          # tests/calling_bank_app.py: a charge is the estimate less this


@dataclass(slots=True)
class Request:
    """One paid request and what its consumer got: `status` None when
    uvicorn gave no response (`detail` says why), `header` the ACCMAN
    response header as an int, None when missing.  A consumer that is
    `gone` closed its connection long before the app answers: it had sent
    its request at `sent_at` and closed its connection at `closed_at`,
    each read just after the socket call (time.monotonic(), the clock of
    the app's log)."""
    cred: str
    a: int
    free: bool
    gone: bool = False
    status: int | None = None
    header: int | None = None
    detail: str = ""
    sent_at: float | None = None
    closed_at: float | None = None


@dataclass(slots=True)
class TopUp:
    """A keyed funding mod the test sent when an account was refused 402."""
    cred: str
    key: str
    by: int
    ok: bool = False


_QUEUED = re.compile(r"accman: (\w+) of (\d+) for account ([0-9a-f]{12}) queued "
                     r"\(after ([^)]*)\), (key|hold) (\S+)")
# AccMan's refusals before a change applied (accman.errors.NotApplied):
# a hold so refused held nothing, and owes no release (docs/CALLING.md).
UNAPPLIED_CODES = ("not_applied", "busy", "shutting_down")
_REFUSED_UNAPPLIED = re.compile(r"accman: AccMan unavailable \((?:not_applied|shutting_down)\); "
                                r"(?:refusing with 503|serving unpaid)")
_STRANDED_UNKNOWN = re.compile(r"accman: stranded (\w+) of (\d+), outcome unknown: look for "
                               r"(key|hold) (\S+) in the history of account ([0-9a-f]{12})")
_STRANDED = re.compile(r"accman: stranded (\w+): (.*?) \(account ([0-9a-f]{12}), "
                       r"(key|hold) (\S+)\)")
_UNPAID = re.compile(r"accman: unpaid (\d+) \(account ([0-9a-f]{12})\): (.*)")
_STARTED = re.compile(r"calbank: response of A=(\d+) for account ([0-9a-f]{12}) starts at "
                      r"(\d+\.\d+)")
_RECHARGED = re.compile(r"accman: hold (\d+) of account ([0-9a-f]{12}) (?:expired|ended) "
                        r"before .*?charging (\d+) as a mod, key (\S+)")
# What this run never gives a cause for: no request is cancelled, the
# token keeps its roles.
LOG_FAULTS = ("Traceback", "was cancelled while", "owes the account", "refused the charge",
              "refused the service", "Task was destroyed", "never retrieved")


class ServiceLog:
    """What the service's log says of owed and stranded calls, by account
    fingerprint: `queued` [(what, amount, ref)], `stranded` [(what, amount
    or None, ref, unknown)], `recharged` [(hold, amount, key)], `unpaid`
    [(amount, why)]; refs are "key K" or "hold H"; `unheld_unapplied`
    [(code, ref)], the releases owed for holds refused before they
    applied, which are none; `refused_unapplied`, how many of the
    middleware's lines say requests AccMan refused so; and, from
    the app's own lines, `started`
    {(fingerprint, A): when its response started}."""

    def __init__(self, text: str):
        self.text = text
        self.queued = collections.defaultdict(list)
        self.stranded = collections.defaultdict(list)
        self.recharged = collections.defaultdict(list)
        self.unpaid = collections.defaultdict(list)
        for m in _UNPAID.finditer(text):
            self.unpaid[m[2]].append((int(m[1]), m[3]))
        # Releases owed for holds refused before they applied: [(code, ref)].
        self.unheld_unapplied = []
        for m in _QUEUED.finditer(text):
            self.queued[m[3]].append((m[1], int(m[2]), f"{m[5]} {m[6]}"))
            # An unhold (a release named by its hold's key, not by a hold id).
            if m[1] == "release" and m[5] == "key" and m[4] in UNAPPLIED_CODES:
                self.unheld_unapplied.append((m[4], f"key {m[6]}"))
        for m in _STRANDED_UNKNOWN.finditer(text):
            self.stranded[m[5]].append((m[1], int(m[2]), f"{m[3]} {m[4]}", True))
        for m in _STRANDED.finditer(text):
            self.stranded[m[3]].append((m[1], None, f"{m[4]} {m[5]}", False))
        for m in _RECHARGED.finditer(text):
            self.recharged[m[2]].append((int(m[1]), int(m[3]), m[4]))
        self.started = {(m[2], int(m[1])): float(m[3]) for m in _STARTED.finditer(text)}
        self.faults = [f for f in LOG_FAULTS if f in text]
        # The middleware's lines of requests AccMan refused before applying
        # (said as a spell starts, then with counts: accman.calling.repeats).
        self.refused_unapplied = len(_REFUSED_UNAPPLIED.findall(text))
        # on_unavailable="open" served what AccMan could not admit.
        self.serving_unpaid = "; serving unpaid" in text

    def refs(self, cred, table) -> set:
        return {item[2] for item in getattr(self, table)[fingerprint(cred)]}


def collections_of(requests) -> dict:
    """How many requests got each answer: "200+" with the header, "200-" without."""
    out = {}
    for r in requests:
        k = ("gone" if r.gone else f"200{'+' if r.header is not None else '-'}"
             if r.status == 200 else r.status)
        out[k] = out.get(k, 0) + 1
    return out


def left_late(requests, log: ServiceLog) -> str:
    """How late the consumers that left closed their connections: how many
    closed only after their response had started (this process slow to
    close: charged, as the docs allow), and the longest from sending to
    the close (LEAVE_S when nothing stalls)."""
    gone = [r for r in requests if r.gone and r.closed_at is not None]
    late = sum(log.started.get((fingerprint(r.cred), r.a), r.closed_at) < r.closed_at
               for r in gone)
    longest = max((r.closed_at - r.sent_at for r in gone), default=0.0)
    return (f"{late} of {len(gone)} gone after their response started, the longest "
            f"{longest:.3f} s from sending to the close")


def log_problems(log: ServiceLog) -> list:
    return [f"the service's log says {f!r}" for f in log.faults] + [
        f"a hold refused 503 {code} (never applied) owed a release: {ref}"
        for code, ref in log.unheld_unapplied]


def chain_problems(entries) -> list:
    """Each entry's tot is the tot before it plus its by, from the
    account's start at 0: a mod's tot is the balance right after it (SPEC
    "Durability and order"), and a hold, its settle and its expiry move
    the balance by their `by` too (the held amount out, what returns back:
    SPEC "Holds").  The first entry that breaks the chain, said."""
    tot = 0
    for e in entries:
        if e.tot != tot + e.by:
            return [f"a tot that does not follow from the bys: entry {e.seq} (by {e.by}) has "
                    f"tot {e.tot}, the tot before it plus its by is {tot + e.by}"]
        tot = e.tot
    return []


class Account:
    """One account's history (Entry tuples, oldest first) split by kind,
    and what is wrong with it whatever the requests were (`problems`)."""

    def __init__(self, cred, entries):
        self.cred = cred
        self.entries = entries
        self.funding = [e for e in entries if e.by > 0 and e.hold is None]
        self.charges = collections.defaultdict(list)    # A -> keyed mods charging it
        self.holds = collections.defaultdict(list)      # A -> hold entries of A
        self.ends = collections.defaultdict(list)       # hold id -> its ends
        self.problems = chain_problems(entries)
        for e in entries:
            if e.hold is None and e.by < 0:
                self.charges[-e.by + FEE_BACK].append(e)
                if not (e.key or "").endswith("-c"):
                    self.problems.append(f"a charge not keyed as the middleware keys one: {e}")
            elif e.hold is not None and e.by < 0:
                self.holds[-e.by].append(e)
                if not (e.key or "").endswith("-h"):
                    self.problems.append(f"a hold not keyed as the middleware keys one: {e}")
            elif e.hold is not None:
                self.ends[e.hold].append(e)
        for hs in self.holds.values():
            for h in hs:
                if len(self.ends[h.hold]) != 1:
                    self.problems.append(f"hold {h.hold} has {len(self.ends[h.hold])} ends")

    def net(self, a) -> int:
        """What request `a` moved in all: its holds, their ends, its charges."""
        held = sum(h.by + sum(e.by for e in self.ends[h.hold]) for h in self.holds[a])
        return held + sum(e.by for e in self.charges[a])


def check_account(mode, acct: Account, requests, topups, fund, log: ServiceLog,
                  final_tot) -> list:
    """Every way the account's history, the consumers' records and the
    service's log disagree with docs/CALLING.md."""
    cred, p = acct.cred, list(acct.problems)
    funding = collections.Counter((e.key, e.by) for e in acct.funding)
    want = collections.Counter([("open", fund)] + [(t.key, t.by) for t in topups if t.ok])
    if funding != want:
        p.append(f"funding {sorted(funding.items())} is not what was sent {sorted(want.items())}")
    by_a = {r.a: r for r in requests}
    for a in set(acct.charges) | set(acct.holds):
        if a not in by_a:
            p.append(f"A={a} was held or charged, but no request of that amount was sent")
    for r in requests:
        p += check_request(mode, acct, r, log)
    # The balance is the funding less what the requests moved: an entry
    # that no request or top-up accounts for (an end of no hold) shows here.
    moved = sum(acct.net(a) for a in by_a)
    funded = sum(by for _, by in want.elements())
    if not acct.entries or final_tot != acct.entries[-1].tot or final_tot != funded + moved:
        p.append(f"the balance {final_tot} is not the funding less what the requests moved "
                 f"({moved})")
    if mode == "reserve":
        p += overdrawn(acct)
    return [f"{mode} {cred}: {x}" for x in p]


def check_request(mode, acct: Account, r: Request, log: ServiceLog) -> list:
    """What request `r` moved, against what its consumer got."""
    what = (f"A={r.a} ({'free ' if r.free else ''}{'gone ' if r.gone else ''}"
            f"answered {r.status}, header {r.header})")
    holds, charges = acct.holds[r.a], acct.charges[r.a]
    if len(holds) > 1 or len(charges) > 1:
        return [f"{what}: held {len(holds)} times, charged {len(charges)} times"]
    if r.gone:
        return [f"{what}: {p}" for p in check_gone(acct, r, log)]
    if r.status not in (200, 400, 402, 503) or r.free != (r.status == 400) and r.status in (
            200, 400):
        return [f"{what}: not an answer the docs give this request ({r.detail})"]
    if r.status != 200:
        return [f"{what}: {p}" for p in check_unpaid(mode, acct, r, log)]
    return [f"{what}: {p}" for p in check_served(mode, acct, r, log)]


def check_gone(acct: Account, r: Request, log: ServiceLog) -> list:
    """A request whose consumer left moves nothing if it left before the
    response started (docs/CALLING.md, "The consumer goes away"); if the
    response started first (the test process slow to close, say), the
    disconnect does not refund: it is charged once, as a served one.
    Judged by the times: the consumer's close and the app's start."""
    net = acct.net(r.a)
    if not net:
        return []
    started = log.started.get((fingerprint(r.cred), r.a))
    when = (f"sent at {r.sent_at:.3f}, its connection closed {r.closed_at - r.sent_at:.3f} "
            f"s later, " + ("no response started" if started is None else
                            f"its response started {started - r.sent_at:.3f} s after sending"))
    if started is None or started >= r.closed_at:
        return [f"its consumer left before its response started ({when}), yet it moved {net}"]
    if net != -(r.a - FEE_BACK):
        return [f"its response started before its consumer left ({when}), and it moved {net}, "
                f"not its charge {-(r.a - FEE_BACK)}"]
    return []


def check_unpaid(mode, acct: Account, r: Request, log: ServiceLog) -> list:
    """A refusal (402, 503) or a free response (400) moves nothing."""
    net, holds = acct.net(r.a), acct.holds[r.a]
    if net != 0:
        return [f"moved {net}, though nothing is charged for it"]
    if r.status == 402 and holds:
        return ["refused, yet its hold applied"]
    if r.status == 503 and holds and f"key {holds[0].key}" not in log.refs(r.cred, "queued"):
        return [f"its hold applied and no owed unhold names key {holds[0].key}"]
    if r.status == 400 and mode == "reserve" and not holds and not (
            r.header is None and log.serving_unpaid):
        return ["the app ran with nothing held"]    # but served unpaid: no balance told
    if r.header is None:
        return []
    # The balance told: after the release of a free response's hold, else
    # the one seen at admission, a balance the history had.
    if r.status == 400 and holds:
        told = acct.ends[holds[0].hold][0].tot
        return [] if r.header == told else [f"its header is not the balance {told} after its "
                                            f"release"]
    if r.header not in {e.tot for e in acct.entries}:
        return ["its header is a balance the history never had"]
    return []


def check_served(mode, acct: Account, r: Request, log: ServiceLog) -> list:
    """Served: charged once, as a settle or a keyed mod, at the balance its
    header told; or, without the header, owed, then charged once or
    stranded as the log says."""
    charge, net = r.a - FEE_BACK, acct.net(r.a)
    holds, charges = acct.holds[r.a], acct.charges[r.a]
    told = [e.tot for e in charges] or [acct.ends[h.hold][0].tot for h in holds]
    if r.header is not None:
        if net != -charge:
            return [f"served as paid, moved {net}, not {-charge}"]
        if r.header not in told[-1:]:
            return [f"its header is not the balance after its charge {told}"]
        return []
    owed = owed_ref(mode, acct, r, log)
    if owed is None:
        return check_unpaid_served(acct, r, log)
    stranded = [s for s in log.stranded[fingerprint(r.cred)] if s[2] == owed]
    if net == -charge and not [s for s in stranded if not s[3]]:
        return []               # the owed call landed (or may have: stranded unknown)
    if net == 0 and stranded:
        return []               # stranded, said so, and it did not land
    return [f"owed as {owed}, moved {net}, stranded {stranded}"]


def check_unpaid_served(acct: Account, r: Request, log: ServiceLog) -> list:
    """Served unpaid (on_unavailable="open": AccMan could not admit it):
    the log says so with its charge, and it moved nothing; a hold of
    unknown outcome at its admission is undone by an owed unhold."""
    net, holds = acct.net(r.a), acct.holds[r.a]
    if (r.a - FEE_BACK) not in [amount for amount, _ in log.unpaid[fingerprint(r.cred)]]:
        return ["served without a balance, and the log neither queued a call for it nor "
                "said it unpaid"]
    if net != 0:
        return [f"served unpaid, yet it moved {net}"]
    if holds and f"key {holds[0].key}" not in log.refs(r.cred, "queued"):
        return [f"served unpaid, its hold applied and no owed unhold names key {holds[0].key}"]
    return []


def owed_ref(mode, acct, r: Request, log: ServiceLog):
    """The key or hold the log names for request `r`'s owed charge or
    settle, which must be its own; None if the log queued none."""
    charge, fp = r.a - FEE_BACK, fingerprint(r.cred)
    refs = [ref for what, amount, ref in log.queued[fp]
            if (what, amount) in (("charge", charge), ("settle", charge))]
    mine = {f"key {e.key}" for e in acct.charges[r.a]}
    mine |= {f"hold {h.hold}" for h in acct.holds[r.a]}
    if mode == "check":
        ok = [ref for ref in refs if ref.startswith("key ")]
        return ok[0] if len(ok) == 1 and (not mine or ok[0] in mine) else None
    ok = [ref for ref in refs if ref in mine]
    return ok[0] if ok else None


def overdrawn(acct: Account) -> list:
    """Reserve mode never overdraws: no entry lowers the balance under 0
    but the charge of a hold that expired first (a keyed mod without
    `min`, its request's hold in the history: the one case the docs
    allow), which excuses itself alone: a hold (`min` 0) that lowers the
    balance under 0, before or after such a charge, is an overdraft."""
    for e in acct.entries:
        expired_hold_charge = e.hold is None and acct.holds.get(-e.by + FEE_BACK)
        if e.tot < 0 and e.by < 0 and not expired_hold_charge:
            return [f"overdrawn by {e}"]
    return []
