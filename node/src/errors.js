'use strict'
// Every error the package raises.  Each carries the SPEC's error `code`, the
// HTTP `status` it comes from or implies, and a `detail` for a person; what a
// failure means for money is in the class (see README "Errors"):
//
//   Unreachable (an Unavailable)  nothing reached AccMan: nothing applied
//   NotApplied (an Unavailable; Busy, ShuttingDown)
//                                 AccMan refused it before applying (503)
//   Unavailable                   AccMan's 503 for a commit that failed:
//                                 not acknowledged, a mod may have applied
//   OutcomeUnknown (CallTimeout, BadReply, ProxyUnavailable)
//                                 sent, no complete reply from AccMan: a mod
//                                 may or may not have applied; repeat it
//                                 with its key
//   everything else               a definite answer: nothing applied
//
// Messages never contain a token or a credential.

class AccManError extends Error {
  constructor (detail, code = 'error', status = 500) {
    super(detail || code)
    this.name = new.target.name
    this.code = code
    this.status = status
    this.detail = detail || code
  }
}

class BadRequest extends AccManError {
  constructor (detail, code = 'bad_request', status = 400) { super(detail, code, status) }
}
class Unauthorized extends AccManError {
  constructor (detail) { super(detail, 'unauthorized', 401) }
}
class Forbidden extends AccManError {
  constructor (detail) { super(detail, 'forbidden', 403) }
}
class NoAccount extends AccManError {
  constructor (detail) { super(detail, 'no_account', 404) }
}
class NoHold extends AccManError {
  constructor (detail) { super(detail, 'no_hold', 404) }
}
class Conflict extends AccManError {
  constructor (detail, code) { super(detail, code, 409) }
}
// The mod or hold would leave the balance under `min`; `tot` is the balance
// it was judged on.
class Insufficient extends Conflict {
  constructor (tot, detail) {
    super(detail || `the balance ${tot} does not cover this change`, 'insufficient')
    this.tot = tot
  }
}
class KeyReused extends Conflict {
  constructor (detail) { super(detail, 'key_reused') }
}
class Overflow extends Conflict {
  constructor (detail) { super(detail, 'overflow') }
}
class HoldEnded extends Conflict {
  constructor (detail) { super(detail, 'hold_ended') }
}
class TooManyHolds extends Conflict {
  constructor (detail) { super(detail, 'too_many_holds') }
}
class Unavailable extends AccManError {
  constructor (detail, code = 'unavailable') { super(detail, code, 503) }
}
// A change AccMan refused before applying it: its store takes no writes now
// (a commit failed before it, the store is closing, its database is not
// reached or refused the batch).  Nothing of this request applied: it may be
// sent again, keyed or not, and a hold so refused holds nothing.  It says
// nothing of an earlier request for the same key that got no answer or a
// plain Unavailable: that one may still apply (AccMan refuses before it looks
// up the key).  As the Python client's accman.errors.NotApplied.
class NotApplied extends Unavailable {
  constructor (detail, code = 'not_applied') { super(detail, code) }
}
// Back-pressure: refused before anything was applied; retry.
class Busy extends NotApplied {
  constructor (detail) { super(detail, 'busy') }
}
// The server is stopping: refused before anything was applied; retry (on
// another front-end, or once it is back).
class ShuttingDown extends NotApplied {
  constructor (detail) { super(detail, 'shutting_down') }
}
// Nothing reached the server (connection refused, connect timeout, no
// connection free in time, the client closed): nothing was applied.
class Unreachable extends Unavailable {
  constructor (detail) { super(detail, 'unreachable') }
}
// The request was sent, or may have been, and no complete reply came.  For a
// mod, the one case where the caller does not know whether the balance
// changed: with a key, repeat it with the same key; without, read `past`.
class OutcomeUnknown extends AccManError {
  constructor (detail, code = 'outcome_unknown') { super(detail, code, 503) }
}
class CallTimeout extends OutcomeUnknown {
  constructor (detail) { super(detail, 'timeout') }
}
// The reply broke HTTP framing or the SPEC's JSON shapes.
class BadReply extends OutcomeUnknown {
  constructor (detail) { super(detail, 'bad_reply') }
}
// A 503 without AccMan's error body (SPEC "Errors": a JSON object with an
// `error` code and a `detail`): a proxy's or another server's at the URL,
// such as nginx's HTML page when its upstream is down.  Not AccMan's word on
// its store.  Some front ends answer 503 after they sent the request on
// (Envoy's "upstream connect error or disconnect/reset before headers",
// Varnish's "Backend fetch failed" past its first-byte timeout), and no page
// tells which: a mod may have been applied.  As the Python client's.
class ProxyUnavailable extends OutcomeUnknown {
  constructor (detail) { super(detail, 'proxy_unavailable') }
}
// A well-framed reply the SPEC does not describe for this call (404
// not_found or 405 from a wrong base URL, say).
class UnexpectedReply extends AccManError {}
// A 200 or 409 whose integers are beyond Number.MAX_SAFE_INTEGER, from a
// client made without `bigint: true`.  The call's outcome is definite and
// is in `reply` (with bigints): a mod in a 200 did apply.
class Unrepresentable extends AccManError {
  constructor (status, reply) {
    super('a value in the reply is beyond Number.MAX_SAFE_INTEGER: ' +
      'make the client with { bigint: true }', 'unrepresentable', status)
    this.reply = reply
  }
}

// Classes by a reply's code, in objects without a prototype: a code of
// AccMan's form may be `constructor` or `__proto__`, which an ordinary
// object answers with Object's own.
const CODE_409 = {
  __proto__: null,
  key_reused: KeyReused,
  overflow: Overflow,
  hold_ended: HoldEnded,
  too_many_holds: TooManyHolds
}
// AccMan's 503s that say the change was refused before it applied; any
// other code of its own is a plain Unavailable.
const CODE_503 = {
  __proto__: null, not_applied: NotApplied, busy: Busy, shutting_down: ShuttingDown
}

// The typed error of a reply that is not a 200.  `obj` is its JSON object
// (with exact integers, see values.js) or null; `tot` is the insufficient
// balance, already converted.
function errorOfReply (status, obj, tot) {
  let code = obj && typeof obj.error === 'string' ? obj.error : ''
  if (code && !/^[a-z_]{1,40}$/.test(code)) code = 'unexpected' // not of AccMan's form
  let detail = obj && typeof obj.detail === 'string' ? obj.detail : '' // cut by unechoed
  detail = detail || `AccMan answered ${status} ${code}`.trimEnd()
  if (status === 409) {
    if (code === 'insufficient') {
      if (tot === undefined) return new BadReply('409 insufficient without an integer tot')
      return new Insufficient(tot, detail)
    }
    if (CODE_409[code]) return new CODE_409[code](detail)
  } else if (status === 404) {
    if (code === 'no_account') return new NoAccount(detail)
    if (code === 'no_hold') return new NoHold(detail)
  } else if (status === 401) {
    return new Unauthorized(detail)
  } else if (status === 403) {
    return new Forbidden(detail)
  } else if (status === 503) {
    // Not AccMan's error body: a proxy's page says nothing of AccMan's
    // store, and may come after the request went on (ProxyUnavailable).
    if (!ownError(obj)) {
      return new ProxyUnavailable('a 503 without AccMan\'s error body came (a proxy\'s, or ' +
        'another server\'s at the URL): the call may have been applied')
    }
    return CODE_503[code] ? new CODE_503[code](detail) : new Unavailable(detail)
  } else if (status === 400 || status === 413 || status === 414 || status === 431) {
    return new BadRequest(detail, code || 'bad_request', status)
  } else if (status >= 500 && status !== 501 && status !== 505) {
    // A 500/502/504 comes from a proxy or a crash: the change may have applied.
    const err = new OutcomeUnknown(`AccMan (or a proxy) answered ${status}`)
    err.status = status
    return err
  }
  return new UnexpectedReply(detail, code || 'unexpected', status)
}

// Whether an error reply's object has the shape of AccMan's own (SPEC
// "Errors"): an `error` code of its form and a `detail` sentence.
function ownError (obj) {
  return obj !== null && typeof obj === 'object' && typeof obj.error === 'string' &&
    /^[a-z_]{1,40}$/.test(obj.error) && typeof obj.detail === 'string'
}

// How much of a reply's detail an error keeps.
const DETAIL_CHARS_MAX = 200
// The characters of credentials and tokens, for a regular expression's class.
const SECRET_CHARS = 'A-Za-z0-9_\\-.~+/='
// A piece of a secret this long or longer is out of sight too, in any word
// that holds it: what quotes a request may cut a secret short, or quote it
// percent-encoded.  Shorter pieces would hide ordinary words.
const SECRET_PIECE_CHARS_MIN = 8
// Any cred= value and any bearer value, whoever's it is; the words after
// "Bearer" in AccMan's own 401s ("needs an Authorization: Bearer token",
// "the bearer token is not valid") and its challenge (Bearer realm="accman")
// are not a value; a token that starts with them (token-1f2e...) is.
const QUOTED_RE =
  /((?:^|[?&])cred=)[^&\s"';,]+|(bearer\s+)(?!tokens?(?![A-Za-z0-9_\-.~+/=])|realm=")[^&\s"';,]+/gi
// A run of a secret's characters, or of its percent-encoded form's.
const SECRET_RUN_RE = new RegExp(`[${SECRET_CHARS}%]{${SECRET_PIECE_CHARS_MIN},}`, 'g')

// `err`, thrown by a call whose request held `secrets` (its credential and
// token), with them out of sight in its detail, message and stack, then its
// detail cut to DETAIL_CHARS_MAX.  AccMan never quotes a request, but
// something else at the URL (a proxy, a firewall, a wrong service) may.
function unechoed (err, secrets) {
  if (!(err instanceof AccManError)) return err
  const before = err.detail
  // Any cred= or bearer value, whoever's it is; this call's own secrets
  // where they stand alone (a credential "a" is not inside "balance"), and
  // any word holding a piece of one of SECRET_PIECE_CHARS_MIN or more.
  let detail = before.replace(QUOTED_RE, (m, cred, bearer) => (cred || bearer) + '<not shown>')
  const given = secrets.filter(Boolean)
  const encoded = given.map(encodeURIComponent) // as a URL quotes it, in either case of hex
  const lower = encoded.map((e) => e.replace(/%[0-9A-F]{2}/g, (h) => h.toLowerCase()))
  const quoted = new Set([...given, ...encoded, ...lower])
  // A secret of a piece's length or more is found by its pieces; a shorter
  // one where it stands alone.
  for (const secret of [...quoted].filter((q) => q.length < SECRET_PIECE_CHARS_MIN)) {
    const escaped = secret.replace(/[.*+?^${}()|[\]\\/]/g, '\\$&')
    const alone = new RegExp(`(?<![${SECRET_CHARS}])${escaped}(?![${SECRET_CHARS}])`, 'g')
    detail = detail.replace(alone, '<not shown>')
  }
  const pieces = piecesOf(quoted)
  if (pieces.size) {
    const hidden = (word) => holdsPiece(word, pieces) ? '<not shown>' : word
    detail = detail.replace(SECRET_RUN_RE, hidden)
  }
  detail = detail.slice(0, DETAIL_CHARS_MAX)
  if (detail !== before) {
    if (typeof err.stack === 'string') err.stack = err.stack.split(before).join(detail)
    err.detail = detail
    err.message = detail
  }
  return err
}

function piecesOf (secrets) {
  const pieces = new Set()
  for (const s of secrets) {
    for (let i = 0; i + SECRET_PIECE_CHARS_MIN <= s.length; i++) {
      pieces.add(s.slice(i, i + SECRET_PIECE_CHARS_MIN))
    }
  }
  return pieces
}

function holdsPiece (word, pieces) {
  for (let i = 0; i + SECRET_PIECE_CHARS_MIN <= word.length; i++) {
    if (pieces.has(word.slice(i, i + SECRET_PIECE_CHARS_MIN))) return true
  }
  return false
}

// Whether a refusal settles what earlier attempts of the same call did,
// whenever they reach AccMan: one judged by what never changes back
// (key_reused: the key is taken; hold_ended, no_hold).  Had an earlier
// keyed attempt applied, the repeat would have answered its result
// instead; and one still on its way (held by a stalled front-end or proxy)
// meets the same refusal when it arrives.  A refusal judged by a balance
// or a count that moves (insufficient, overflow, too_many_holds,
// no_account until the account is funded) settles nothing: the earlier
// attempt may arrive after it, meet a balance topped up meanwhile, and
// apply.  As the Python client's policy.definite.
function definite (err) {
  return err instanceof KeyReused || err instanceof HoldEnded || err instanceof NoHold
}

// Whether a failed call's reply says that it applied: a 200 whose integers
// are past what a number holds (Unrepresentable, from a client made without
// `bigint: true`).  It is AccMan's answer, so it ends a call whose earlier
// attempt may have landed: that attempt and this one are the same change,
// applied once by its key (or a settle answered again, SPEC "Holds").  A
// 409's (an insufficient balance past 2^53) is a refusal judged by a
// balance that moves, which settles nothing (definite).
function applied (err) {
  return err instanceof Unrepresentable && err.status === 200
}

// Whether a failed call may still have landed: sent with no reply from
// AccMan (OutcomeUnknown, a front end's 503 among them), or AccMan's plain
// 503, a commit that failed ("not acknowledged" is not "not applied").
// NotApplied (Busy, ShuttingDown among them) was refused before applying,
// and Unreachable never sent.
function mayHaveLanded (err) {
  if (err instanceof OutcomeUnknown) return true
  return err instanceof Unavailable && !(err instanceof NotApplied) &&
    !(err instanceof Unreachable)
}

module.exports = {
  DETAIL_CHARS_MAX,
  SECRET_PIECE_CHARS_MIN,
  unechoed,
  definite,
  applied,
  mayHaveLanded,
  AccManError,
  BadRequest,
  Unauthorized,
  Forbidden,
  NoAccount,
  NoHold,
  Conflict,
  Insufficient,
  KeyReused,
  Overflow,
  HoldEnded,
  TooManyHolds,
  Unavailable,
  NotApplied,
  Busy,
  ShuttingDown,
  Unreachable,
  OutcomeUnknown,
  CallTimeout,
  BadReply,
  ProxyUnavailable,
  UnexpectedReply,
  Unrepresentable,
  errorOfReply
}
