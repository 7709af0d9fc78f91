"""A small pure-Python reference model of the ledger's SPEC rules (mods,
holds, settles, expiry, events, low_balance), for the tests to compare
the real ledger with, and the clock both of them read."""

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


class Hold:
    __slots__ = ("amount", "expires_ms", "state", "use", "end")

    def __init__(self, amount, expires_ms):
        self.amount = amount
        self.expires_ms = expires_ms
        self.state = "open"             # open | settled | expired
        self.use = None
        self.end = None                 # (tot, seq) of its ending entry


class Model:
    """Entries are (seq, by, tot, key, hold); events (type, cred, seq, by,
    tot, at, key, hold), in the order the SPEC gives them within each
    account.  Outcomes are the ledger's values, or an error code."""

    def __init__(self, clock=None, low_default=None, holds_max=None,
                 holds_per_account_max=None):
        self.clock = clock or Clock()
        self.accounts = {}      # cred -> [entry, ...]
        self.keys = {}          # (cred, key) -> (ttl or 0 for a mod, by, min, result)
        self.holds = {}         # (cred, hold id) -> Hold
        self.low = {}           # cred -> its own low-balance threshold
        self.low_default = low_default
        self.holds_max = holds_max
        self.holds_per_account_max = holds_per_account_max
        self.events = []
        self.expired = 0

    # --- reads ---

    def tot(self, cred):
        h = self.accounts.get(cred)
        return h[-1][2] if h else None

    def past(self, cred, limit=100, before=None):
        h = self.accounts.get(cred)
        if not h:
            return None
        top = len(h) if before is None else min(len(h), before - 1)
        return [h[i - 1] for i in range(top, max(0, top - limit), -1)]

    def open_holds(self, cred=None):
        return [k for k, h in self.holds.items()
                if h.state == "open" and (cred is None or k[0] == cred)]

    def held(self, cred):
        return sum(self.holds[k].amount for k in self.open_holds(cred))

    # --- changes ---

    def _change(self, cred, by, kind, key=None, hold=None):
        h = self.accounts.setdefault(cred, [])
        before = h[-1][2] if h else 0
        tot, seq = before + by, len(h) + 1
        hold = seq if kind == "hold" else hold
        at = self.clock()
        h.append((seq, by, tot, key, hold))
        self.events.append((kind, cred, seq, by, tot, at, key, hold))
        low = self.low.get(cred, self.low_default)
        if low is not None and before >= low > tot:
            self.events.append(("low_balance", cred, seq, by, tot, at, key, hold))
        return tot, seq

    def _judge(self, cred, by, min_):
        new = (self.tot(cred) or 0) + by
        if not INT64_MIN <= new <= INT64_MAX or new + self.held(cred) > INT64_MAX:
            return "overflow"
        if min_ is not None and new < min_:
            return "insufficient"
        return None

    def _replay(self, cred, key, ttl, by, min_):
        kttl, kby, kmin, result = self.keys[(cred, key)]
        return result if (kttl, kby, kmin) == (ttl, by, min_) else "key_reused"

    def mod(self, cred, by, min=None, key=None, low=None):  # noqa: A002
        """-> (tot, seq) or an error code string."""
        if key is not None and (cred, key) in self.keys:
            return self._replay(cred, key, 0, by, min)
        if cred not in self.accounts and by < 0:
            return "no_account"         # only a funding mod opens an account
        refusal = self._judge(cred, by, min)
        if refusal:
            return refusal
        result = self._change(cred, by, "mod", key)
        if key is not None:
            self.keys[(cred, key)] = (0, by, min, result)
        if low is not None:
            self.low[cred] = low        # from the next change on
        return result

    def hold(self, cred, by, ttl, min=None, key=None):  # noqa: A002
        """-> (hold, tot, seq) or an error code string."""
        min_ = 0 if min is None else min
        if by >= 0 or by == INT64_MIN or not 1 <= ttl <= 86400:
            return "bad_request"
        if cred not in self.accounts:
            return "no_account"
        if key is not None and (cred, key) in self.keys:
            return self._replay(cred, key, ttl, by, min_)
        if (self.holds_per_account_max is not None
                and len(self.open_holds(cred)) >= self.holds_per_account_max
                or self.holds_max is not None and len(self.open_holds()) >= self.holds_max):
            return "too_many_holds"
        refusal = self._judge(cred, by, min_)
        if refusal:
            return refusal
        tot, seq = self._change(cred, by, "hold", key)
        self.holds[(cred, seq)] = Hold(-by, self.clock() + ttl * 1000)
        result = (seq, tot, seq)
        if key is not None:
            self.keys[(cred, key)] = (ttl, by, min_, result)
        return result

    def settle(self, cred, hold, use):
        """-> (tot, seq) or an error code string."""
        if cred not in self.accounts:
            return "no_account"
        h = self.holds.get((cred, hold))
        if h is None:
            return "no_hold"
        if h.state == "open" and self.clock() >= h.expires_ms:
            self._end(cred, hold, h, 0, "expired")
        if h.state != "open":
            return h.end if h.state == "settled" and h.use == use else "hold_ended"
        if not 0 <= use <= h.amount:
            return "bad_request"
        return self._end(cred, hold, h, use, "settled")

    def _end(self, cred, hold_id, h, use, state):
        h.state, h.use = state, use
        h.end = self._change(cred, h.amount - use, "settle" if state == "settled" else "expire",
                             hold=hold_id)
        self.expired += state == "expired"
        return h.end

    def expire_due(self):
        """Ends the open holds due by now: due at the first whole second at
        or after their expiry; within an account, in the order of their
        second, then of their id.  Returns how many it ended."""
        now = self.clock()
        due = sorted((-(-h.expires_ms // 1000), k[1], k[0]) for k, h in self.holds.items()
                     if h.state == "open" and -(-h.expires_ms // 1000) * 1000 <= now)
        for _, hold_id, cred in due:
            self._end(cred, hold_id, self.holds[(cred, hold_id)], 0, "expired")
        return len(due)

    def events_by_account(self, account_of):
        """{account id: [(type, seq, by, tot, at, key, hold), ...]}: the
        order the SPEC fixes (each account's own, in its seq order)."""
        out = {}
        for kind, cred, *rest in self.events:
            out.setdefault(account_of(cred), []).append((kind, *rest))
        return out
