"""The bank checker's records and its checks (tests/reliability/test_bank.py
runs the calls and the faults; this module judges what they left).

Every call that changes a balance has a unique amount (a mod's `by`, a
hold's amount), so that an entry of a history names the call that made
it; the end of a hold names its hold (`hold`), and so the settle that
the worker sent for it, or none: an expiry.

A module, not a conftest.py: see relhelp.py."""

import bisect
from dataclasses import dataclass, field


@dataclass(slots=True)
class Attempt:
    t0: float
    t1: float
    outcome: str            # ok | refused | ended | unknown | unapplied | unexpected
    tot: int | None = None  # ok: the new tot; refused: the tot it was judged on
    seq: int | None = None
    detail: str = ""


@dataclass(slots=True)
class Op:
    """A mod, or a hold when `ttl` is set (its `by` is minus its amount,
    its `min` 0 or lower)."""
    worker: int
    cred: str
    by: int
    min: int | None
    key: str | None
    ttl: int | None = None
    attempts: list = field(default_factory=list)

    @property
    def sent_at(self):
        return self.attempts[0].t0

    def target(self):
        route = "mod" if self.ttl is None else "hold"
        t = f"/{route}?cred={self.cred}&by={self.by}"
        if self.ttl is not None:
            t += f"&ttl={self.ttl}"
        # A hold's min is 0 when none is sent: its default, so it is not.
        if self.min is not None and not (self.ttl is not None and self.min == 0):
            t += f"&min={self.min}"
        if self.key is not None:
            t += f"&key={self.key}"
        return t


@dataclass(slots=True)
class SettleOp:
    """The settle of an acknowledged hold; a retry sends the same `use`."""
    worker: int
    cred: str
    hold: int
    use: int
    attempts: list = field(default_factory=list)

    @property
    def sent_at(self):
        return self.attempts[0].t0

    def target(self):
        return f"/settle?cred={self.cred}&hold={self.hold}&use={self.use}"


@dataclass(slots=True)
class Read:
    cred: str
    t0: float
    t1: float
    tot: int | None = None          # a /tot
    entries: list | None = None     # a /past page, newest first


def ok_attempts(op):
    return [a for a in op.attempts if a.outcome == "ok"]


class Checker:
    def __init__(self, ops, reads, histories, settles=(), events=None, accounts=None,
                 all_ended=False):
        self.ops = ops
        self.reads = reads
        self.h = histories          # cred -> entries, oldest first
        self.settles = {(s.cred, s.hold): s for s in settles}
        self.events = events        # the whole /events stream, or None: not checked
        self.accounts = accounts    # cred -> its public id
        self.all_ended = all_ended  # every ttl has passed: no hold may be open
        self.problems = []

    def problem(self, text):
        self.problems.append(text)

    def run(self):
        self.check_histories()
        self.check_entries_are_sent_changes()
        self.check_acknowledged()
        self.check_refusals()
        self.check_order_and_reads()
        if self.all_ended:
            self.check_holds_ended()
        if self.events is not None:
            self.check_events()
        return self.problems

    def check_histories(self):
        for cred, entries in self.h.items():
            seqs = [e["seq"] for e in entries]
            if seqs != list(range(1, len(entries) + 1)):
                gaps = sorted(set(range(1, max(seqs) + 1)) - set(seqs))[:10]
                self.problem(f"{cred}: seqs are not 1..{len(entries)}: gaps {gaps}")
            tot = 0
            for e in entries:
                tot += e["by"]
                if e["tot"] != tot:
                    self.problem(f"{cred}: seq {e['seq']} has tot {e['tot']}, "
                                 f"the sum of its history is {tot}")
                    break

    # --- every entry is a change some call asked for ---

    def check_entries_are_sent_changes(self):
        self.by_amount = {}
        for op in self.ops:
            assert op.by not in self.by_amount, "two calls with one amount: a checker bug"
            self.by_amount[op.by] = op
        self.entry_of = {}          # op.by -> its entry
        self.maker = {}             # (cred, seq) -> when the call that made it was sent
        self.ends = {}              # (cred, hold) -> (its end entry, "settle" | "expire")
        for cred, entries in self.h.items():
            for e in entries[1:]:              # [0] is the opening balance
                hold = e.get("hold")
                if hold is None or hold == e["seq"]:
                    self.check_change(cred, e, hold is not None)
                else:
                    self.check_end(cred, e, entries)

    def check_change(self, cred, e, is_hold):
        op = self.by_amount.get(e["by"])
        if op is None or op.cred != cred or (op.ttl is not None) != is_hold:
            self.problem(f"{cred}: entry {e} is no mod or hold any call sent")
            return
        what = op.key or op.by
        if op.by in self.entry_of:
            self.problem(f"{cred}: the change {what} applied twice: "
                         f"seqs {self.entry_of[op.by]['seq']} and {e['seq']}")
        self.entry_of[op.by] = e
        self.maker[(cred, e["seq"])] = op.sent_at
        if e["key"] != op.key:
            self.problem(f"{cred}: seq {e['seq']} has key {e['key']}, its call sent {op.key}")
        outcomes = {a.outcome for a in op.attempts}
        if not outcomes & {"ok", "unknown"}:
            self.problem(f"{cred}: seq {e['seq']} is the change {what}, which was only ever "
                         f"refused: {outcomes}")
        if op.min is not None and e["tot"] < op.min:
            self.problem(f"{cred}: seq {e['seq']} left tot {e['tot']} under its min {op.min}")

    def check_end(self, cred, e, entries):
        """The end of a hold: its start is a hold, it ends once, and it is
        its settle (by = amount - use) or its expiry (by = amount, at or
        after the hold's ttl)."""
        hold, seq = e["hold"], e["seq"]
        start = entries[hold - 1] if 1 <= hold < seq else None
        if start is None or start.get("hold") != hold:
            self.problem(f"{cred}: seq {seq} ends hold {hold}, which is no hold")
            return
        if (cred, hold) in self.ends:
            self.problem(f"{cred}: hold {hold} ended twice: seqs "
                         f"{self.ends[(cred, hold)][0]['seq']} and {seq}")
        amount = -start["by"]
        hold_op = self.by_amount.get(start["by"])
        settle = self.settles.get((cred, hold))
        by_settle = (settle is not None and e["by"] == amount - settle.use
                     and bool({a.outcome for a in settle.attempts} & {"ok", "unknown"}))
        by_expiry = (e["by"] == amount and hold_op is not None
                     and e["at"] >= start["at"] + hold_op.ttl * 1000)
        if by_settle and (ok_attempts(settle) or not by_expiry):
            how = "settle"
        elif by_expiry:
            # A settle of use 0 whose outcome is unknown ends it the same way.
            how = "either" if by_settle else "expire"
        elif e["by"] == amount and hold_op is not None:
            self.problem(f"{cred}: hold {hold} (ttl {hold_op.ttl} s, at {start['at']}) "
                         f"ended by itself at {e['at']}, before its ttl")
            return
        else:
            self.problem(f"{cred}: seq {seq} ends hold {hold} with {e['by']}: no settle "
                         f"sent, nor its expiry")
            return
        self.maker[(cred, seq)] = settle.sent_at if how == "settle" else hold_op.sent_at
        self.ends[(cred, hold)] = (e, how)

    # --- acknowledgements and refusals ---

    def check_acknowledged(self):
        for op in self.ops:
            acks = {(a.tot, a.seq) for a in ok_attempts(op)}
            if not acks:
                continue
            what = op.key or op.by
            if len(acks) > 1:
                self.problem(f"{what}: one key answered with different results {acks}")
            e = self.entry_of.get(op.by)
            if e is None:
                self.problem(f"{op.cred}: acknowledged {what} {acks} is not in the history: lost")
                continue
            for tot, seq in acks:
                if (e["seq"], e["tot"]) != (seq, tot):
                    self.problem(f"{op.cred}: {what} was answered tot {tot} seq {seq}, "
                                 f"the history has {e}")
        for (cred, hold), settle in self.settles.items():
            end, how = self.ends.get((cred, hold), (None, None))
            for a in settle.attempts:
                if a.outcome == "ok" and (end is None or how != "settle"
                                          or (end["seq"], end["tot"]) != (a.seq, a.tot)):
                    self.problem(f"{cred}: settle of hold {hold} was answered tot {a.tot} "
                                 f"seq {a.seq}, the history ends it with {end} ({how})")
                if a.outcome == "ended" and how == "settle" and settle.use:
                    self.problem(f"{cred}: settle of hold {hold} was answered hold_ended, "
                                 f"but this very settle ended it: {end}")

    def check_refusals(self):
        for op in self.ops:
            for a in op.attempts:
                if a.outcome == "refused" and a.tot + op.by >= op.min:
                    self.problem(f"{op.cred}: {op.key or op.by} refused as insufficient "
                                 f"on tot {a.tot}, which covers by {op.by} at min {op.min}")

    # --- real time and reads ---

    def check_order_and_reads(self):
        self.floors = self._floors()
        self.check_real_time()
        self.check_reads()

    def _floors(self):
        """Per cred: acknowledgements sorted by their end, with the running
        maximum of their seqs: the oldest state a later call may see."""
        acked = {cred: [] for cred in self.h}
        for op in [*self.ops, *self.settles.values()]:
            for a in ok_attempts(op):
                acked[op.cred].append((a.t1, a.seq))
        floors = {}
        for cred, acks in acked.items():
            acks.sort()
            running, best = [], 0
            for _, seq in acks:
                best = max(best, seq)
                running.append(best)
            floors[cred] = ([t1 for t1, _ in acks], running)
        return floors

    def floor(self, cred, t0):
        ends, running = self.floors[cred]
        i = bisect.bisect_left(ends, t0)
        return running[i - 1] if i else 0

    def check_real_time(self):
        for op in [*self.ops, *self.settles.values()]:
            # Only a change applied by its first attempt: a later attempt may
            # be answered from the record of an earlier, unknown one.
            a = op.attempts[0]
            if a.outcome == "ok" and self.floor(op.cred, a.t0) >= a.seq:
                self.problem(f"{op.cred}: {op.target()} got seq {a.seq}, after seq "
                             f"{self.floor(op.cred, a.t0)} was acknowledged "
                             "(real-time order broken)")

    def seen_ok(self, cred, tot, t0, t1, what):
        low = self.floor(cred, t0)
        for e in self.h[cred][max(low, 1) - 1:]:
            if e["tot"] != tot:
                continue
            made = self.maker.get((cred, e["seq"]))
            if e["seq"] == 1 or made is not None and made < t1:
                return
        self.problem(f"{cred}: {what} showed tot {tot}, which is no state of the "
                     f"final history at or after seq {low} made by a call sent before it")

    def check_reads(self):
        for r in self.reads:
            if r.tot is not None:
                self.seen_ok(r.cred, r.tot, r.t0, r.t1, "a /tot")
                continue
            final = self.h[r.cred]
            for e in r.entries:
                kept = final[e["seq"] - 1] if e["seq"] <= len(final) else None
                if kept != e:
                    self.problem(f"{r.cred}: /past showed {e}, the final history has {kept}")
            newest = r.entries[0]["seq"] if r.entries else 0
            if newest < self.floor(r.cred, r.t0):
                self.problem(f"{r.cred}: /past showed seq {newest} after seq "
                             f"{self.floor(r.cred, r.t0)} was acknowledged")
        for op in self.ops:
            for a in op.attempts:
                if a.outcome == "refused":
                    self.seen_ok(op.cred, a.tot, a.t0, a.t1, f"the 409 of {op.key or op.by}")

    # --- holds all ended, and the event stream ---

    def check_holds_ended(self):
        """Once every ttl has passed: each hold has its one end."""
        for cred, entries in self.h.items():
            for e in entries:
                if e.get("hold") == e["seq"] and (cred, e["seq"]) not in self.ends:
                    self.problem(f"{cred}: hold {e['seq']} is still open past its ttl")

    def check_events(self):
        """Ids 1..N without a gap across every restart, and each account's
        events exactly its history, one event per entry, of its kind."""
        ids = [ev["id"] for ev in self.events]
        if ids != list(range(1, len(ids) + 1)):
            missing = sorted(set(range(1, max(ids, default=0) + 1)) - set(ids))[:10]
            self.problem(f"event ids are not 1..{len(ids)}: missing {missing}, "
                         f"repeated {len(ids) - len(set(ids))}")
        by_account = {}
        for ev in self.events:
            by_account.setdefault(ev["account"], []).append(ev)
        for cred, entries in self.h.items():
            got = by_account.pop(self.accounts[cred], [])
            want = [{**e, "type": self.kind_of(cred, e)} for e in entries]
            have = [{k: ev[k] for k in ("seq", "by", "tot", "at", "key", "hold", "type")}
                    for ev in got]
            for h, w in zip(have, want, strict=False):
                if w["type"] == "either" and h["type"] in ("settle", "expire"):
                    w["type"] = h["type"]
            if have != want:
                pairs = enumerate(zip(have, want, strict=False))
                first = next((i for i, (x, y) in pairs if x != y), min(len(have), len(want)))
                self.problem(f"{cred}: its events are not its history: {len(have)} events, "
                             f"{len(want)} entries; first difference at {first}: "
                             f"{have[first:first + 1]} vs {want[first:first + 1]}")
        for account, extra in by_account.items():
            self.problem(f"{len(extra)} events of account {account}, which no test account is")

    def kind_of(self, cred, e):
        """The type its event must have: "either" for an end that may be a
        settle of use 0 or the expiry."""
        hold = e.get("hold")
        if hold is None:
            return "mod"
        if hold == e["seq"]:
            return "hold"
        return self.ends.get((cred, hold), (None, "an end no call explains"))[1]
