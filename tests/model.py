"""A small pure-Python reference model of the ledger's SPEC rules, for the
tests to compare the real ledger with."""

INT64_MIN, INT64_MAX = -(2 ** 63), 2 ** 63 - 1


class Clock:
    """The ledger's injected clock (`clock_ms=`), unix milliseconds, moved
    only by the test: the time of changes and of expiries."""

    START_MS = 1_700_000_000_000        # a whole second

    def __init__(self, ms=START_MS):
        self.ms = ms

    def __call__(self):
        return self.ms

    def advance(self, seconds):
        self.ms += round(seconds * 1000)

    def set(self, ms):
        self.ms = ms


class Model:
    def __init__(self):
        self.accounts = {}      # cred -> list of (seq, by, tot, key)
        self.keys = {}          # (cred, key) -> (by, min, (tot, seq))

    def tot(self, cred):
        h = self.accounts.get(cred)
        return h[-1][2] if h else None

    def mod(self, cred, by, min=None, key=None):
        """-> (tot, seq) or an error code string."""
        if key is not None and (cred, key) in self.keys:
            kby, kmin, result = self.keys[(cred, key)]
            return result if (kby, kmin) == (by, min) else "key_reused"
        if cred not in self.accounts and by < 0:
            return "no_account"         # only a funding mod opens an account
        cur = self.tot(cred) or 0
        new = cur + by
        if not INT64_MIN <= new <= INT64_MAX:
            return "overflow"
        if min is not None and new < min:
            return "insufficient"
        h = self.accounts.setdefault(cred, [])
        seq = len(h) + 1
        h.append((seq, by, new, key))
        if key is not None:
            self.keys[(cred, key)] = (by, min, (new, seq))
        return (new, seq)

    def past(self, cred, limit=100, before=None):
        h = self.accounts.get(cred)
        if not h:
            return None
        top = len(h) if before is None else min(len(h), before - 1)
        return [h[i - 1] for i in range(top, max(0, top - limit), -1)]
