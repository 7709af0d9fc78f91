'use strict'
// Admission, the plugin's onRequest (Meter's part, meter.js): the request's
// credential read from its header, then in check mode the balance seen to
// cover the estimate (read by a probe of the token's charge role until the
// role is seen, probe.js), in reserve mode a hold of the estimate; a
// request that is not admitted is refused here, with the status and body
// README.md gives each failure.

const {
  AccManError, Insufficient, NoAccount, NotApplied, Overflow, TooManyHolds, Unavailable,
  Unreachable, OutcomeUnknown, mayHaveLanded
} = require('./errors')
const { Unhold, fingerprint } = require('./owed')

const CRED_RE = /^[A-Za-z0-9_-]{1,128}$/
const JSON_TYPE = 'application/json; charset=utf-8'
// The consumer's 503, whatever the cause (AccMan unreachable, down, or
// refusing this service's token): it can do nothing but retry, and the
// service's log names the cause.  As on the Python side.
const UNAVAILABLE_DETAIL = 'the balance service is unavailable'

// A refusal's body: short JSON, `extra` members added as JSON text.
function body (code, detail, extra = '') {
  return `{"error":${JSON.stringify(code)},"detail":${JSON.stringify(detail)}${extra}}`
}

// How many times the header `name` (lower case) is in a request's raw
// headers, which keep each as it came.  req.headers joins the repeats of
// most names with ", ", but keeps only the first of those Node holds
// single (authorization, user-agent, host...), and light-my-request and
// HTTP/2 have no headersDistinct: rawHeaders is the one record of every
// copy that all of them keep.
function headerCount (rawHeaders, name) {
  let n = 0
  for (let i = 0; i < rawHeaders.length; i += 2) {
    if (rawHeaders[i].length === name.length && rawHeaders[i].toLowerCase() === name) n++
  }
  return n
}

// One request's part in AccMan: what it was admitted on, and whether its
// charge or hold has been dealt with (`ended`: at most once, whichever of
// onSend, onRequestAbort and onResponse comes first).
class AccManRequest {
  constructor (cred, price, estimate, rid) {
    this.cred = cred
    this.price = price
    this.estimate = estimate // bigint: what the balance had to cover, or what is held
    this.rid = rid
    this.tot = null // bigint: the balance seen at admission
    this.hold = null // the hold's id (reserve mode)
    this.heldAt = 0 // when the hold's reply came (performance.now(), ms)
    this.unpaid = null // the AccMan error when served unpaid (onUnavailable 'open')
    this.before = null // the reply's headers just before the handler
    this.ended = false
    this.sending = false // the reply's first send is in the plugin's onSend (charge.js)
    this.deferred = false // onSend left the charge to the route's last hook (charge.js)
    this.resent = false // the reply was sent again meanwhile (charge.js, sentAgain)
    this.gone = false
    this.cost = 0n // what onSend charged (or owes, or settles)
    this.charged = false // onSend charged, or owes, a cost for the response
    this.failureSaid = false // a failure of the charged response was logged
  }

  toJSON () {
    return { estimate: String(this.estimate), hold: this.hold === null ? null : String(this.hold) }
  }
}

// Meter's methods of admission, put on its prototype (meter.js).
const admission = {
  async admit (request, reply) {
    // A request that matched no route (fastify's 404, or the app's
    // not-found handler) serves nothing the service sells: it is left to
    // fastify whatever its credential, a 404 rather than a 401 for a
    // missing one, and calls nothing.  The Python middleware cannot know
    // routes, and meters it (CALLING.md).  The counters mean the same on
    // both sides: `exempt` counts the requests let through unmetered, as
    // this one is, `requests` those metered, and together every request.
    let p
    try {
      p = request.is404 ? null : this.priceFor(request)
    } catch (err) {
      this.stats.requests++ // refused (a 500, or the service's own refusal), not let through
      throw err
    }
    if (p === null) {
      this.stats.exempt++
      return
    }
    this.stats.requests++
    const raw = request.headers[this.header]
    // A repeated header is ambiguous, whatever its name: counted, since a
    // name Node holds single shows only its first copy in request.headers.
    if (typeof raw !== 'string' || !CRED_RE.test(raw) ||
        headerCount(request.raw.rawHeaders, this.header) > 1) {
      this.stats.refused_no_credential++
      return this.refuse(reply, 401, 'no_credential', this.noCredential(request, raw),
        { 'www-authenticate': this.challenge })
    }
    const state = new AccManRequest(raw, p, this.costOf(p, request, reply, 'estimate'), this.rid())
    request.accman = state
    // fastify's onRequestAbort tells a consumer who left by req.aborted,
    // which stays false once the request's body was read: a POST whose
    // consumer leaves mid-handler is no abort to it.  The response closing
    // before it ended is one, whatever the request carried.
    reply.raw.once('close', () => { if (!reply.raw.writableEnded) this.left(state) })
    try {
      if (this.mode === 'reserve' && state.estimate > 0n) {
        await this.holdFor(state)
      } else {
        await this.checkFor(state)
      }
    } catch (err) {
      request.accman = null
      return this.refuseFor(reply, state, err)
    }
    // While we waited for AccMan, the consumer left, or a response went
    // out through onSend (fastify's handlerTimeout answers 503 from a
    // timer that runs from the request's start): either way no response
    // settles the hold now, which is released rather than kept to its ttl.
    if (state.gone) {
      this.end(state)
    } else if (state.ended && state.hold !== null) {
      this.release(state)
    }
  },

  // Why the request has no credential, in the Python middleware's words:
  // two headers are told apart from one bad value by counting.
  noCredential (request, raw) {
    if (raw === undefined) return `the ${this.header} header is required`
    if (headerCount(request.raw.rawHeaders, this.header) > 1) {
      return `more than one ${this.header} header`
    }
    return `the ${this.header} header is not a credential`
  },

  async checkFor (state) {
    const probing = this.mode === 'check' && !this.role.seen
    let tot = probing ? null : this.cache.get(state.cred, state.estimate)
    if (tot === null) {
      try {
        tot = probing
          ? await this.role.admit(this.client, state.cred)
          : await this.client.tot(state.cred)
      } catch (err) {
        if (err instanceof NoAccount || !this.open || !this.isOutage(err)) throw err
        state.unpaid = err
        return
      }
      this.cache.set(state.cred, tot)
      if (tot < state.estimate) throw new Insufficient(tot)
    }
    state.tot = tot
  },

  async holdFor (state) {
    const key = state.rid + '-h'
    let r
    try {
      r = await this.client.hold(state.cred, -state.estimate, { ttlS: this.holdTtlS, min: 0, key })
    } catch (caught) {
      // Only a balance so far below 0 that the hold would leave the signed
      // 64-bit range (409 overflow has no tot): nothing is held, and the
      // estimate is not covered; a balance that cannot be read then is an
      // outage with nothing held.
      const err = caught instanceof Overflow ? await this.overflowed(state) : caught
      // A hold that may have landed owes its release; one refused before
      // applying (NotApplied) or never sent (Unreachable) holds nothing.
      if (mayHaveLanded(err)) {
        this.owe(new Unhold(state.cred, state.estimate, this.holdTtlS, key), err)
      }
      if (!this.open || !this.isOutage(err)) throw err
      state.unpaid = err
      return
    }
    state.hold = r.hold
    state.tot = r.tot
    state.heldAt = performance.now()
  },

  // The hold met 409 overflow: the Insufficient to throw, with the balance
  // read now, or the NotApplied outage when it cannot be read.
  async overflowed (state) {
    let tot
    try {
      tot = await this.client.tot(state.cred)
    } catch (err) {
      if (!(err instanceof AccManError)) throw err
      return new NotApplied('the hold met 409 overflow, and the balance could not be read: ' +
        err.detail)
    }
    throw new Insufficient(tot)
  },

  isOutage (err) {
    return err instanceof Unavailable || err instanceof OutcomeUnknown
  },

  refuseFor (reply, state, err) {
    if (err instanceof NoAccount) {
      this.stats.refused_no_account++
      return this.refuse(reply, 401, 'no_account', 'the credential names no account',
        { 'www-authenticate': this.challenge })
    }
    if (err instanceof Insufficient) {
      this.stats.refused_insufficient++
      return this.refuse(reply, 402, 'insufficient',
        `the balance ${err.tot} does not cover the cost ${state.estimate}`,
        { [this.header]: String(err.tot) }, `,"tot":${err.tot},"cost":${state.estimate}`)
    }
    if (err instanceof TooManyHolds) {
      // The account (or AccMan) is at its bound of open holds: one per
      // request in flight, so the consumer has thousands under way.  Its
      // own load, not the service's: 429, as the Python middleware.  Each
      // request more meets the line, known by its text alone (at AccMan's
      // bound every account meets it), with the account that says it.
      this.stats.refused_too_many++
      this.repeats.say('warn', {}, 'accman: too many holds open; refusing with 429',
        { account: fingerprint(state.cred), detail: err.detail })
      return this.refuse(reply, 429, 'too_many_requests',
        'too many requests of this account are in flight', { 'retry-after': '1' })
    }
    // A bug (a cost function that threw, say): fastify's 500.
    if (!(err instanceof AccManError)) throw err
    if (this.isOutage(err)) {
      // What failed on the way (a certificate not trusted, a refused
      // connection) goes with the line: "unreachable" alone hides it.
      const onTheWay = err instanceof Unreachable || err instanceof OutcomeUnknown
      this.repeats.say('warn', { code: err.code }, 'accman: AccMan unavailable; refusing with 503',
        onTheWay ? { detail: err.detail } : {})
    } else {
      // The service's own token or url is wrong: not the consumer's fault,
      // and never a reason to serve for free.
      // AccMan's words (`detail`) name what is wrong: the role the token
      // lacks, a path that is not AccMan's; the client keeps secrets out of
      // them.  They are not what the line is known by: they vary with what
      // answers at the URL.
      this.repeats.say('error', { status: err.status, code: err.code },
        'accman: AccMan refused the service: check the url and token', { detail: err.detail })
    }
    this.stats.refused_unavailable++
    return this.refuse(reply, 503, 'unavailable', UNAVAILABLE_DETAIL, { 'retry-after': '1' })
  },

  refuse (reply, status, code, detail, headers, extra = '') {
    reply.code(status).headers(headers).type(JSON_TYPE)
    return reply.send(body(code, detail, extra))
  }
}

module.exports = { admission, body, JSON_TYPE, UNAVAILABLE_DETAIL }
