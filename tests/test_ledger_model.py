"""Hypothesis stateful test: random mods (with min, key, low and overflow
cases), holds, settles and expiries on an injected clock, one at a time
and many concurrently through group commit, reads, the event stream and
reopens (with holds due while closed), compared step by step with the
reference model (tests/model.py)."""

import asyncio
import random
import shutil
import tempfile

from hypothesis import settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from accman import AccManError, Ledger
from accman.limits import EVENTS_LIMIT_MAX, INT64_MAX, INT64_MIN
from model import Clock, Model

LOW_DEFAULT = 20
HOLDS_MAX = 8
HOLDS_PER_ACCOUNT_MAX = 3

creds = st.sampled_from(["alice", "bob", "c-3", "D_4"])
amounts = st.one_of(
    st.integers(-50, 50).filter(bool),
    st.sampled_from([INT64_MAX, INT64_MIN, INT64_MAX // 2, -(INT64_MAX // 2)]),
)
mins = st.one_of(st.none(), st.integers(-20, 20), st.sampled_from([INT64_MIN, INT64_MAX]))
keys = st.one_of(st.none(), st.sampled_from(["k1", "k2", "k3"]))
lows = st.one_of(st.none(), st.none(), st.integers(-10, 40))
mods = st.tuples(st.just("mod"), creds, amounts, mins, keys, lows)
hold_amounts = st.one_of(st.integers(-40, -1), st.sampled_from([-INT64_MAX, INT64_MIN]))
ttls = st.integers(1, 5)
holds = st.tuples(st.just("hold"), creds, hold_amounts, ttls, mins, keys)
hold_ids = st.integers(1, 14)
uses = st.one_of(st.integers(0, 45), st.just(INT64_MAX))
settles = st.tuples(st.just("settle"), creds, hold_ids, uses)
changes = st.one_of(mods, holds, settles)


def outcome_of(call, *args, **kw):
    try:
        return call(*args, **kw)
    except AccManError as e:
        return e.code


class LedgerVsModel(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.dir = tempfile.mkdtemp(prefix="accman-model-")
        self.clock = Clock()
        self.led = self._open()
        self.model = Model(self.clock, low_default=LOW_DEFAULT, holds_max=HOLDS_MAX,
                           holds_per_account_max=HOLDS_PER_ACCOUNT_MAX)

    def _open(self):
        return Ledger(self.dir, clock_ms=self.clock, low_balance=LOW_DEFAULT,
                      holds_max=HOLDS_MAX, holds_per_account_max=HOLDS_PER_ACCOUNT_MAX)

    def teardown(self):
        try:
            report = self.led.verify()
            assert report["holds"] == len(self.model.holds)
            assert report["open_holds"] == len(self.model.open_holds())
            assert report["events"] == len(self.model.events)
        finally:
            self.led.close()
            shutil.rmtree(self.dir, ignore_errors=True)

    # --- changes, one at a time and together ---

    def _call(self, change):
        led = self.led
        kind, cred, *args = change
        if kind == "mod":
            by, min_, key, low = args
            low = low if by > 0 else None
            return outcome_of(led.mod, cred, by, min=min_, key=key, low=low)
        if kind == "hold":
            by, ttl, min_, key = args
            return outcome_of(led.hold, cred, by, ttl, min=min_, key=key)
        return outcome_of(led.settle, cred, *args)

    def _expect(self, change):
        m = self.model
        kind, cred, *args = change
        if kind == "mod":
            by, min_, key, low = args
            return m.mod(cred, by, min_, key, low if by > 0 else None)
        if kind == "hold":
            by, ttl, min_, key = args
            return m.hold(cred, by, ttl, min_, key)
        return m.settle(cred, *args)

    @rule(change=changes)
    def change(self, change):
        assert self._call(change) == self._expect(change)

    @rule(batch=st.lists(changes, min_size=2, max_size=30))
    def changes_concurrently(self, batch):
        """Submitted together, they share batches; outcomes must equal the
        model's applying them one by one in submission order."""
        led = self.led

        def submit(change):
            kind, cred, *args = change
            if kind == "mod":
                by, min_, key, low = args
                return led.amod(cred, by, min=min_, key=key, low=low if by > 0 else None)
            if kind == "hold":
                by, ttl, min_, key = args
                return led.ahold(cred, by, ttl, min=min_, key=key)
            return led.asettle(cred, *args)

        async def run():
            return await asyncio.gather(*[submit(c) for c in batch], return_exceptions=True)

        got = [o.code if isinstance(o, AccManError) else o for o in asyncio.run(run())]
        assert got == [self._expect(c) for c in batch]

    @rule(seconds=st.sampled_from([0.5, 1, 1, 2, 3, 6]))
    def time_passes(self, seconds):
        """The clock moves; the holds due end (the writer may take some of
        them first: expire_due waits for those too)."""
        self.clock.advance(seconds)
        ended = self.led.expire_due()
        assert ended <= self.model.expire_due()

    @rule(seconds=st.sampled_from([0, 2, 6]))
    def reopen(self, seconds):
        """Closed while time passes: holds due meanwhile end at open."""
        self.led.close()
        self.clock.advance(seconds)
        self.model.expire_due()
        self.led = self._open()

    # --- reads ---

    @rule(cred=creds)
    def tot(self, cred):
        assert self.led.tot(cred) == self.model.tot(cred)

    @rule(cred=creds, limit=st.integers(1, 12), before=st.one_of(st.none(), st.integers(1, 40)))
    def past(self, cred, limit, before):
        got = self.led.past(cred, limit=limit, before=before)
        want = self.model.past(cred, limit, before)
        if want is None:
            assert got is None
        else:
            assert [(e.seq, e.by, e.tot, e.key, e.hold) for e in got] == want

    @rule()
    def events(self):
        """The stream: ids 1..N with no gap, each account's events the
        model's, in its order."""
        got, after = [], 0
        while True:
            page, after = self.led.events(after=after, limit=EVENTS_LIMIT_MAX)
            if not page:
                break
            got += page
        assert [e.id for e in got] == list(range(1, len(self.model.events) + 1))
        by_account = {}
        for e in got:
            by_account.setdefault(e.account, []).append(
                (e.type, e.seq, e.by, e.tot, e.at, e.key, e.hold))
        assert by_account == self.model.events_by_account(self.led.account_id)

    @invariant()
    def balances_and_holds_match(self):
        for cred in self.model.accounts:
            assert self.led.tot(cred) == self.model.tot(cred)
        assert self.led.open_holds == len(self.model.open_holds())
        assert self.led.stats["events_last"] == len(self.model.events)


LedgerVsModel.TestCase.settings = settings(max_examples=60, stateful_step_count=30,
                                           deadline=None)
test_ledger_matches_model = LedgerVsModel.TestCase


def test_verify_after_a_model_run(tmp_path):
    """The full store check agrees with a long random run of mods, holds,
    settles and expiries."""
    rnd = random.Random(7)
    clock = Clock()
    model = Model(clock)
    with Ledger(str(tmp_path / "d"), clock_ms=clock) as led:
        for _ in range(2000):
            c = rnd.choice("abcdef")
            x = rnd.random()
            if x < 0.6:
                b, m = rnd.randint(-30, 30) or 1, rnd.choice([None, 0])
                k = rnd.choice([None, f"k{rnd.randint(0, 50)}"])
                assert outcome_of(led.mod, c, b, min=m, key=k) == model.mod(c, b, m, k)
            elif x < 0.8:
                b, t = -rnd.randint(1, 20), rnd.randint(1, 4)
                assert outcome_of(led.hold, c, b, t) == model.hold(c, b, t)
            elif x < 0.95:
                h, u = rnd.randint(1, 60), rnd.randint(0, 20)
                assert outcome_of(led.settle, c, h, u) == model.settle(c, h, u)
            else:
                clock.advance(rnd.choice([1, 2, 5]))
                led.expire_due()
                model.expire_due()
        report = led.verify()
    assert report["entries"] == sum(len(h) for h in model.accounts.values())
    assert report["keys"] == len(model.keys)
    assert report["holds"] == len(model.holds) > 100
    assert report["open_holds"] == len(model.open_holds())
    assert report["events"] == len(model.events)
    assert model.expired > 50
