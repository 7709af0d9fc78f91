"""Hypothesis stateful test: random mods (with min, key and overflow cases,
one at a time and many concurrently through group commit), reads and
reopens, compared step by step with the reference model."""

import asyncio
import shutil
import tempfile

from hypothesis import settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from accman import AccManError, Ledger
from accman.limits import INT64_MAX, INT64_MIN
from model import Model

creds = st.sampled_from(["alice", "bob", "c-3", "D_4"])
amounts = st.one_of(
    st.integers(-50, 50).filter(bool),
    st.sampled_from([INT64_MAX, INT64_MIN, INT64_MAX // 2, -(INT64_MAX // 2)]),
)
mins = st.one_of(st.none(), st.integers(-20, 20), st.sampled_from([INT64_MIN, INT64_MAX]))
keys = st.one_of(st.none(), st.sampled_from(["k1", "k2", "k3"]))
mods = st.tuples(creds, amounts, mins, keys)


def outcome_of(call):
    try:
        return call()
    except AccManError as e:
        return e.code


class LedgerVsModel(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.dir = tempfile.mkdtemp(prefix="accman-model-")
        self.led = Ledger(self.dir)
        self.model = Model()

    def teardown(self):
        self.led.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    @rule(m=mods)
    def mod(self, m):
        cred, by, min_, key = m
        got = outcome_of(lambda: self.led.mod(cred, by, min=min_, key=key))
        assert got == self.model.mod(cred, by, min_, key)

    @rule(batch=st.lists(mods, min_size=2, max_size=30))
    def mods_concurrently(self, batch):
        """Submitted together, they share batches; outcomes must equal the
        model's applying them one by one in submission order."""
        async def run():
            return await asyncio.gather(
                *[self.led.amod(c, b, min=m, key=k) for c, b, m, k in batch],
                return_exceptions=True)
        got = [o.code if isinstance(o, AccManError) else o for o in asyncio.run(run())]
        want = [self.model.mod(c, b, m, k) for c, b, m, k in batch]
        assert got == want

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
            assert [(e.seq, e.by, e.tot, e.key) for e in got] == want

    @precondition(lambda self: True)
    @rule()
    def reopen(self):
        self.led.close()
        self.led = Ledger(self.dir)

    @invariant()
    def balances_match(self):
        for cred in self.model.accounts:
            assert self.led.tot(cred) == self.model.tot(cred)


LedgerVsModel.TestCase.settings = settings(max_examples=60, stateful_step_count=30,
                                           deadline=None)
test_ledger_matches_model = LedgerVsModel.TestCase


def test_verify_after_a_model_run(tmp_path):
    """The full store check agrees with a long random run."""
    import random
    rnd = random.Random(7)
    model = Model()
    with Ledger(str(tmp_path / "d")) as led:
        for i in range(2000):
            c, b = rnd.choice("abcdef"), rnd.randint(-30, 30) or 1
            m = rnd.choice([None, 0])
            k = rnd.choice([None, f"k{rnd.randint(0, 50)}"])
            assert outcome_of(lambda: led.mod(c, b, min=m, key=k)) == model.mod(c, b, m, k)
        report = led.verify()
    assert report["entries"] == sum(len(h) for h in model.accounts.values())
    assert report["keys"] == len(model.keys)
