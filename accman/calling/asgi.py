"""ASGI middleware: the ACCMAN header flow for any ASGI 3 application.

    app = AccManMiddleware(app, url="http://127.0.0.1:8035", token=TOKEN,
                           cost=1, exempt=("/health",), prices={"/report": 10})

For every HTTP request that is not exempt it reads the credential from the
`ACCMAN` request header, admits or refuses the request, lets the app serve
it, charges the cost when the response starts and adds `ACCMAN: <new
balance>` to the response headers.  A response with a status of
`charge_below` (400) or more is not charged: a consumer does not pay for a
typo (404) or a refusal.  docs/CALLING.md has the sequence of calls, both
modes and every failure.

Modes:

- "check" (the seed's flow): `tot` before the app, refuse when it is under
  the estimate, `mod(-cost)` when the response starts.  Two concurrent
  requests can both pass the check: the balance may go below zero.
- "reserve" (no overdraft, ever): a server-side hold of the estimate before
  the app, with a ttl (`hold_ttl_s`), settled with the cost (capped at the
  hold) when the response starts, or with 0 at once if the app raises or
  the client goes away before that, or no response comes.  A service that
  crashes or loses AccMan leaks nothing: its holds end by themselves.  The
  token needs `read` and `charge` (accman.calling.reserve).

Every hold and mod carries an idempotency key made from a per-request id
that is random per process, drawn again in a forked child (never taken
from the request: a client that chose the key could replay an old one and
be served for free), so the client's retries never charge twice.  Calls
that must still land after the response are owed (accman.calling.owed).
Credentials are never logged: a log line names an account by a short
SHA-256 fingerprint.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import re

from accman.calling.answers import refuse, refuse_unavailable, with_tot
from accman.calling.billing import Billing
from accman.calling.client import AccManClient
from accman.calling.owed import (CANCELLED, FOLLOWUP_ATTEMPTS_MAX, FOLLOWUPS_MAX,
                                 SHUTDOWN_DRAIN_S, SHUTDOWN_LAST_CALL_S, Mod, Owed, Unhold,
                                 charge_key, fingerprint)
from accman.calling.policy import may_have_landed, writes_failing
from accman.calling.probe import RoleProbe
from accman.calling.disconnect import READ_AHEAD_BYTES_MAX, DisconnectWatch
from accman.calling.lifespan import lifespan
from accman.calling.repeats import Repeats
from accman.calling.reserve import Meter, Reservation
from accman.calling.prices import Prices, charge_of, route_path
from accman.calling.settings import (RETRIES_DEFAULT, TIMEOUT_S_DEFAULT, check_options,
                                     client_options, request_ids)
from accman.errors import (AccManError, Forbidden, Insufficient, NoAccount, TooManyHolds,
                           TransportError, Unauthorized, Unavailable)
from accman.limits import CRED_CHARS_MAX

log = logging.getLogger("accman.asgi")

# Responses with this status or more are free by default: the consumer did
# not get what it asked for (RFC 9110: 4xx the client's error, 5xx the
# service's).
CHARGE_BELOW_DEFAULT = 400
# How long a reserve-mode hold lives if nothing settles it (the service
# crashed, or lost AccMan): a little over the 60 s after which the usual
# front ends give up on a request (nginx's proxy_read_timeout, AWS load
# balancers' idle timeout), so a request still running is not cut short,
# and a dead service's holds come back to their consumers within minutes.
HOLD_TTL_S_DEFAULT = 90

_CRED_RE = re.compile(r"[A-Za-z0-9_-]+")
_STATS = ("requests", "exempt", "refused_no_credential", "refused_no_account",
          "refused_insufficient", "refused_too_many", "refused_unavailable", "charged",
          "charged_amount", "free_status", "released", "capped", "expired", "unpaid_requests",
          "unpaid_amount", "owed", "stranded")


class AccManMiddleware:
    """Charges each HTTP request to the account named by its ACCMAN header.

    `cost` (and each value of `prices`) is an int or a callable
    `cost(scope, status, headers) -> int`.  It is called with status and
    headers None before the app runs for the estimate (the balance a request
    needs in "check" mode, the amount held in "reserve" mode), then with the
    response's status and ASGI header list when the response starts, for
    the charge.  A response whose status is `charge_below` or more is free
    without asking `cost`; `charge_below=None` leaves every status to it.

    `exempt` and `prices` name paths exactly, or by prefix when they end in
    `*`; the longest matching price wins.  A path is the app's own, without
    the `root_path` it is mounted at.  Exempt paths never touch AccMan.
    `on_unavailable="open"` serves requests AccMan cannot admit and records
    them as unpaid (log, `stats`, and `on_unpaid(cred, amount)` if given).
    `hold_ttl_s` (None: HOLD_TTL_S_DEFAULT) is how long a reserve-mode hold
    lives if nothing settles it; check mode holds nothing, and refuses it
    rather than leave it unused unsaid.  `url`, `token`, `timeout_s`
    (None: TIMEOUT_S_DEFAULT), `retries` (None: RETRIES_DEFAULT) and
    `ssl_context` (the TLS trust of an https url) make the AccManClient it
    calls AccMan with.  `client` is an
    AccManClient of the caller's instead (sharing a pool, tests): it
    decides all five, and each of them given beside it is refused, naming
    it.
    """

    def __init__(self, app, url: str | None = None, token: str | None = None,
                 cost=1, header: str = "accman", mode: str = "check",
                 on_unavailable: str = "closed", exempt=(), prices=None, *,
                 client=None, timeout_s: float | None = None, retries: int | None = None,
                 on_unpaid=None, ssl_context=None,
                 charge_below: int | None = CHARGE_BELOW_DEFAULT,
                 hold_ttl_s: int | None = None):
        calls = client_options(client, url=url, token=token, timeout_s=timeout_s,
                               retries=retries, ssl_context=ssl_context)
        check_options(mode, on_unavailable, header, charge_below, hold_ttl_s, on_unpaid)
        self.app = app
        self.mode = mode
        self._reserve = mode == "reserve"
        self._open = on_unavailable == "open"
        self._header = header.lower().encode("ascii")
        self._repeats = Repeats(log)        # lines every request may meet again and again
        self._charge_below = charge_below
        # Check mode holds nothing: no ttl to read (None).
        self.hold_ttl_s = (HOLD_TTL_S_DEFAULT if hold_ttl_s is None else hold_ttl_s) \
            if self._reserve else None
        self._prices = Prices(cost, exempt, prices)
        self._calls = calls
        self._client = client
        self._own_client = client is None
        self._client_loop = None
        if client is None:
            AccManClient(**calls)       # its url, token and trust checked now, not at a request
        self._on_unpaid = on_unpaid
        # Keys are `<request id>-h` (a reserve-mode hold) and `-c` (a charge:
        # check mode's, or a reserve-mode request whose hold expired): 42
        # characters at most, under KEY_CHARS_MAX.
        self._rid = request_ids
        # Check mode admits with `tot`, which a token without `charge` may
        # read; until a charge refused for its balance has shown the role,
        # and after a charge that says writes fail (policy.writes_failing),
        # admission is that refusal.
        self._role = RoleProbe()
        self.stats = dict.fromkeys(_STATS, 0)
        self._owed = Owed(self._acc, self.stats, self._charged, self._unpaid)
        # All that a reserve-mode request uses of the middleware (accman.calling.reserve).
        self._meter = Meter(self._header, self.stats, self._owed, self._cost_of_response,
                            self._charge, self._charged, self._spawn, self._repeats)
        self._tasks = set()             # releases and charges under way (_spawn)
        self._reserving = set()         # the tasks of reserve-mode requests under way
        self._billing = Billing(on_unpaid)  # async on_unpaid calls under way (_unpaid)

    # --- ASGI --------------------------------------------------------------
    async def __call__(self, scope, receive, send):
        kind = scope["type"]
        if kind != "http":
            if kind == "lifespan":
                return await lifespan(self.app, self.aclose, scope, receive, send)
            return await self.app(scope, receive, send)     # websockets are not metered
        price = self._prices.of(route_path(scope))
        if price is None:
            self.stats["exempt"] += 1
            return await self.app(scope, receive, send)
        self.stats["requests"] += 1
        cred, problem = self._cred(scope)
        if cred is None:
            self.stats["refused_no_credential"] += 1
            return await refuse(send, 401, "no_credential", problem, self._challenge())
        est = charge_of(price, scope, None, None)
        if self._reserve:
            return await self._serve_reserved(scope, receive, send, cred, price, est)
        return await self._serve_checked(scope, receive, send, cred, price, est)

    async def _serve_checked(self, scope, receive, send, cred, price, est):
        acc = self._acc()
        try:
            tot = await (acc.tot(cred) if self._role.seen else self._role.admit(acc, cred))
        except NoAccount:
            return await self._no_account(send)
        except AccManError as e:
            return await self._unavailable(scope, receive, send, cred, price, e)
        if tot < est:
            return await self._insufficient(send, tot, est)
        key = charge_key(self._rid())
        watch = DisconnectWatch(receive, scope=scope)
        refused = started = False

        async def send_(message):
            nonlocal refused, started
            if refused:
                return              # the app's reply to a request that is not served
            # Charged at the first start the server gets: a second is its to refuse.
            if message["type"] == "http.response.start" and not started:
                if not await watch.gone_by_now():
                    cost = self._cost_of_response(price, scope, message)
                    try:
                        new_tot = await self._charge(acc, cred, cost, key, served=False) \
                            if cost else tot
                    except (Unauthorized, Forbidden) as e:
                        refused = True
                        return await self._refused_charge(send, e, cred, key)
                    message = with_tot(message, self._header, new_tot)
                started = True
            await send(message)

        async with watch:
            await self.app(scope, watch.receive, send_)

    async def _refused_charge(self, send, err, cred, key):
        """The charge after the work met 401 or 403: the token lost its
        role or was replaced.  The response is not delivered (a
        misconfiguration must not serve for free), so nothing is owed;
        admission probes the role again.  Only if an earlier attempt of the
        charge landed and its reply was lost did the consumer pay: the log
        names the key to look for."""
        self._role.lost()
        self.stats["refused_unavailable"] += 1
        log.error("accman: AccMan refused the charge (%s %s): check the token's roles; "
                  "refusing with 503 (account %s: if key %s is in its history, an earlier "
                  "attempt landed and is owed back)", err.status, err.code, fingerprint(cred),
                  key)
        return await refuse_unavailable(send)

    async def _serve_reserved(self, scope, receive, send, cred, price, est):
        # Kept until the request has ended: one cancelled as the server shuts
        # down ends its hold (an owed unhold, a release) as it unwinds, which
        # may be after the server has asked for the shutdown (aclose).
        task = asyncio.current_task()
        self._reserving.add(task)
        try:
            return await self._reserved(scope, receive, send, cred, price, est)
        finally:
            self._reserving.discard(task)

    async def _reserved(self, scope, receive, send, cred, price, est):
        acc = self._acc()
        r = Reservation(self._meter, acc, scope, cred, price, self._rid(), est, receive)
        try:
            await r.admit(self.hold_ttl_s)
        except asyncio.CancelledError:
            # The hold may have landed, and no response will settle it.
            if est and not r.unheld:
                self._owed.add(Unhold(cred, est, self.hold_ttl_s, r.hold_key), CANCELLED)
            raise
        except NoAccount:
            return await self._no_account(send)
        except Insufficient as e:
            return await self._insufficient(send, e.tot, est)
        except TooManyHolds as e:
            return await self._too_many(send, cred, e)
        except AccManError as e:
            # A hold refused before it applied (not_applied, busy) holds
            # nothing, and owes no release; one that may have landed does.
            if est and may_have_landed(e):
                self._owed.add(Unhold(cred, est, self.hold_ttl_s, r.hold_key), e)
            return await self._unavailable(scope, receive, send, cred, price, e)
        try:
            async with r.watch:         # reads the server's messages while the app runs
                await self.app(scope, r.watch.receive, r.sender(send))
        finally:
            r.release()     # the app raised, or sent no response; else settled already

    async def _charge(self, acc, cred, cost, key, served=True):
        """Charges `cost` with `key`; the new balance, or None when the
        charge is owed.  Before the response is `served`, a 401 or 403 is
        raised instead: the caller refuses the request.  A cancel of the
        request meanwhile does not cut the call short: it goes on, and what
        it did is said when it ends (_charged_unserved)."""
        call = self._spawn(acc.mod(cred, -cost, key=key))
        try:
            new_tot, _ = await asyncio.shield(call)
        except asyncio.CancelledError:
            call.add_done_callback(functools.partial(self._charged_unserved, cred, cost, key))
            raise
        except AccManError as e:
            if not served and isinstance(e, (Unauthorized, Forbidden)):
                raise
            if writes_failing(e):
                # A 503 that is not back-pressure (not_applied among them:
                # the store takes no writes), a timeout, a 502 or 504, a
                # connection cut after sending: writes may be failing while
                # `tot` goes on, and admitted on it, every request would be
                # served with its charge owed.  Admission goes back to the
                # probe, a change that meets the same failure until writes
                # work again; one that answers ends it at the next request.
                self._role.lost()
            self._owed.add(Mod(cred, -cost, key, "charge"), e)
            return None
        self._charged(cost)
        return new_tot

    def _charged_unserved(self, cred, cost, key, call) -> None:
        """The request was cancelled while its charge was in flight, before
        its response started: the consumer gets nothing.  The service's
        token cannot give a landed charge back (a positive mod needs
        `mint`): the log says what the service owes, or, when the call's
        outcome is unknown, the key to look for."""
        error = None if call.cancelled() else call.exception()
        if error is not None and writes_failing(error):
            self._role.lost()           # as for a request not cancelled (_charge)
        if isinstance(error, (Unauthorized, Forbidden)):
            self._role.lost()           # as _refused_charge: nothing applied, nothing owed
            log.error("accman: AccMan refused the charge of a cancelled request (%s %s): "
                      "check the token's roles (account %s)", error.status, error.code,
                      fingerprint(cred))
            return
        if call.cancelled() or (error is not None and (
                may_have_landed(error) or not isinstance(error, AccManError))):
            log.warning("accman: a request of account %s was cancelled while its charge of %d "
                        "was in flight: if key %s is in the account's history, the consumer "
                        "paid for a response it did not get", fingerprint(cred), cost, key)
        elif error is None:
            self._charged(cost)
            log.error("accman: a request of account %s was cancelled while its charge of %d "
                      "(key %s) was in flight, and the charge landed: the consumer paid for a "
                      "response it did not get; the service owes the account %d",
                      fingerprint(cred), cost, key, cost)

    # --- refusals and the unavailable path ---------------------------------
    def _challenge(self):
        return [(b"www-authenticate", b'AccMan header="' + self._header + b'"')]

    async def _no_account(self, send):
        self.stats["refused_no_account"] += 1
        return await refuse(send, 401, "no_account", "the credential names no account",
                             self._challenge())

    async def _too_many(self, send, cred, err):
        # The account (or the store) is at its bound of open holds, one per
        # request in flight: each request more meets the line, known by its
        # text alone (at the store's bound every account meets it).
        self.stats["refused_too_many"] += 1
        self._repeats.say(logging.WARNING, "accman: too many holds open; refusing with 429",
                          err.detail, note=f"account {fingerprint(cred)}")
        return await refuse(send, 429, "too_many_requests",
                             "too many requests of this account are in flight",
                             [(b"retry-after", b"1")])

    async def _insufficient(self, send, tot, est):
        self.stats["refused_insufficient"] += 1
        return await refuse(send, 402, "insufficient",
                             f"the balance {tot} does not cover the cost {est}",
                             [(self._header, str(tot).encode())], {"tot": tot, "cost": est})

    async def _unavailable(self, scope, receive, send, cred, price, err):
        # What failed on the way goes with the line: "unreachable" alone hides it.
        why = err.detail if isinstance(err, TransportError) else ""
        config = isinstance(err, (Unauthorized, Forbidden)) or not isinstance(
            err, (TransportError, Unavailable))
        if config:
            # The service's own token or url is wrong: not the caller's fault, never
            # a reason to serve for free.  AccMan's words name what is wrong (secrets
            # kept out), said with the line, which is not known by them: they vary.
            self._repeats.say(logging.ERROR, f"accman: AccMan refused the service ({err.status} "
                                             f"{err.code}): check the url and token", err.detail)
        elif self._open:
            self._repeats.say(logging.WARNING,
                              f"accman: AccMan unavailable ({err.code}); serving unpaid", why=why)

            # A consumer gone before its response starts is not charged when
            # AccMan answers, so it owes nothing when AccMan does not.
            watch = DisconnectWatch(receive, scope=scope)
            started = False

            async def send_(message):
                nonlocal started
                if message["type"] == "http.response.start" and not started:
                    if not await watch.gone_by_now():
                        cost = self._cost_of_response(price, scope, message)
                        if cost:
                            self._unpaid(cred, cost, err.code)
                        message = with_tot(message, self._header, None)     # no balance told
                    started = True          # a second start is never a second debt
                await send(message)

            async with watch:
                return await self.app(scope, watch.receive, send_)
        else:
            self._repeats.say(logging.WARNING,
                              f"accman: AccMan unavailable ({err.code}); refusing with 503",
                              why=why)
        self.stats["refused_unavailable"] += 1
        return await refuse_unavailable(send)

    # --- owed calls, releases under way, shutdown -----------------------------
    def _spawn(self, coro, tasks: set | None = None) -> asyncio.Task:
        """A task of the middleware's, kept in `tasks` (the releases' and
        charges' by default) and waited for at shutdown (aclose)."""
        tasks = self._tasks if tasks is None else tasks
        task = asyncio.get_running_loop().create_task(coro)
        tasks.add(task)
        task.add_done_callback(tasks.discard)
        return task

    @staticmethod
    async def _ended(tasks, timeout_s: float | None) -> bool:
        # A task an earlier event loop left unfinished (made as asyncio.run
        # cancelled the others) never ends: said at the process's end.
        loop = asyncio.get_running_loop()
        tasks = [task for task in tasks if task.get_loop() is loop]
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=timeout_s)
            return not pending
        return True

    async def drain(self, timeout_s: float | None = None) -> bool:
        """Wait until every release under way and every owed call has
        landed or been stranded, then for the async on_unpaid calls (those
        of what was stranded among them); False if `timeout_s` passed first."""
        loop = asyncio.get_running_loop()
        end = None if timeout_s is None else loop.time() + timeout_s

        def left():
            return None if end is None else max(end - loop.time(), 0)
        return (await self._ended(self._tasks, timeout_s) and await self._owed.drain(left())
                and await self._ended(self._billing.tasks, left()))

    async def aclose(self) -> None:
        """Let reserve-mode requests under way end and releases land
        (SHUTDOWN_DRAIN_S for both), then owed calls (SHUTDOWN_DRAIN_S, then
        SHUTDOWN_LAST_CALL_S for the call under way), strand the rest, give
        async on_unpaid calls SHUTDOWN_DRAIN_S more, close the client, say
        the repeated lines' unsaid counts.  Called on the lifespan shutdown."""
        loop = asyncio.get_running_loop()
        end = loop.time() + SHUTDOWN_DRAIN_S
        # uvicorn cancels the requests its graceful shutdown did not see end
        # and asks for the lifespan shutdown at once: a request still
        # unwinding releases its hold only when it has ended, so the drain
        # waits for it rather than closing the client under its release.
        reserving = self._reserving - {asyncio.current_task()}
        if not await self._ended(reserving, SHUTDOWN_DRAIN_S):
            # One still running (its app goes on past the cancel) is not
            # waited for: the operator is told where what it holds goes.
            log.warning("accman: reserve-mode requests still under way when the shutdown's "
                        "drain ended: %d; what they hold returns by itself at its expiry "
                        "(hold_ttl_s=%d s)", sum(not task.done() for task in reserving),
                        self.hold_ttl_s)
        await self._ended(self._tasks, max(end - loop.time(), 0))
        await self._owed.close()
        await self._ended(self._billing.tasks, SHUTDOWN_DRAIN_S)   # cut off past it: logged
        if self._client is not None and self._own_client:
            await self._client.aclose()
            self._client = None
        self._repeats.close()           # no count unsaid, no timer left behind

    # --- small parts --------------------------------------------------------
    def _acc(self):
        if not self._own_client:
            return self._client
        loop = asyncio.get_running_loop()
        if self._client is None or self._client_loop is not loop:
            self._client = AccManClient(**self._calls)
            self._client_loop = loop
        return self._client

    def _cred(self, scope):
        found = None
        for name, value in scope["headers"]:
            if name == self._header:
                if found is not None:
                    return None, f"more than one {self._header.decode()} header"
                found = value
        if found is None:
            return None, f"the {self._header.decode()} header is required"
        cred = found.decode("latin-1")
        if not 1 <= len(cred) <= CRED_CHARS_MAX or _CRED_RE.fullmatch(cred) is None:
            return None, f"the {self._header.decode()} header is not a credential"
        return cred, ""

    def _cost_of_response(self, price, scope, message) -> int:
        """The charge for the response that `message` starts: nothing when
        its status is `charge_below` or more."""
        status = message["status"]
        if self._charge_below is not None and status >= self._charge_below:
            self.stats["free_status"] += 1
            return 0
        return charge_of(price, scope, status, message.get("headers", ()))

    def _charged(self, cost: int) -> None:
        if cost:
            self.stats["charged"] += 1
            self.stats["charged_amount"] += cost

    def _unpaid(self, cred: str, amount: int, why: str) -> None:
        self.stats["unpaid_requests"] += 1
        self.stats["unpaid_amount"] += amount
        log.warning("accman: unpaid %d (account %s): %s", amount, fingerprint(cred), why)
        if self._on_unpaid is not None:
            self._billing(cred, amount)     # an async biller's call awaited at shutdown too

    def render_metrics(self) -> str:
        """`stats` in the Prometheus text format, for a /metrics route."""
        return "".join(f"# TYPE accman_mw_{k}_total counter\naccman_mw_{k}_total {v}\n"
                       for k, v in self.stats.items())


__all__ = ["AccManMiddleware", "fingerprint", "TIMEOUT_S_DEFAULT", "RETRIES_DEFAULT",
           "CHARGE_BELOW_DEFAULT", "HOLD_TTL_S_DEFAULT", "FOLLOWUPS_MAX", "FOLLOWUP_ATTEMPTS_MAX",
           "SHUTDOWN_DRAIN_S", "SHUTDOWN_LAST_CALL_S", "READ_AHEAD_BYTES_MAX"]
