'use strict'
// fastify-accman: charges each request to the account named by its ACCMAN
// header, in the shape of @fastify/rate-limit.  onRequest admits (check
// mode: the balance covers the estimate, read by a probe of the token's
// charge role until the role is seen; reserve mode: a hold of the
// estimate), onSend charges or settles and sets the ACCMAN response header
// to the new balance, the response's close before its end (a consumer
// who left), onRequestAbort and onResponse end a hold that no response
// settled, onRoute checks each route's price, and onReady warns of
// the routes it meters without having checked them (routes.js); from
// preClose on, responses close their connections (see charge), and those
// of other scopes are kept alive briefly (shortenKeepAlive).  README.md
// has the sequence of calls and every failure.

const crypto = require('node:crypto')
const fp = require('fastify-plugin')
const limits = require('./limits')
const { AccManClient } = require('./client')
const {
  AccManError, Insufficient, NoAccount, HoldEnded, TooManyHolds, Unavailable, OutcomeUnknown,
  Unauthorized, Forbidden, mayHaveLanded
} = require('./errors')
const { Owed, Charge, Settle, Unhold, fingerprint } = require('./owed')
const { CheckCache } = require('./cache')
const { RoleProbe } = require('./probe')
const { Repeats } = require('./repeats')
const { settings, checkRoute, checkExempt, amount, price } = require('./options')
const { uncheckedRoutes, uncheckedWarning, unroutedExempt, unroutedWarning, headSiblings } = require('./routes')
const { headersOf, dropHandlerHeaders } = require('./headers')
const { unwrapResponse, refused, discard, opened } = require('./payload')

const CRED_RE = /^[A-Za-z0-9_-]{1,128}$/
const JSON_TYPE = 'application/json; charset=utf-8'
const UNAVAILABLE_DETAIL = 'the balance service cannot be reached'
const STATS = [
  'requests', 'exempt', 'refused_no_credential', 'refused_no_account', 'refused_insufficient',
  'refused_too_many', 'refused_unavailable', 'charged', 'charged_amount', 'released', 'capped',
  'unpaid_requests', 'unpaid_amount', 'owed', 'stranded'
]

// `fn`, named `name`: printRoutes() shows a route's hooks by name.
function named (name, fn) {
  Object.defineProperty(fn, 'name', { value: name })
  return fn
}

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

// AccMan's answer to a token that is wrong (401) or lacks the role (403).
function refusesToken (err) {
  return err instanceof Unauthorized || err instanceof Forbidden
}

// Who owes whom when an owed call that moves `by` never lands.
function owedBy (by) {
  if (by < 0n) return `the account owes ${-by}`
  if (by > 0n) return `the service owes the account ${by}`
  return 'nothing is lost: a hold returns by itself at its expiry'
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
    this.unpaid = null // the AccMan error when served unpaid (onUnavailable 'open')
    this.before = null // the reply's headers just before the handler
    this.ended = false
    this.gone = false
    this.cost = 0n // what onSend charged (or owes, or settles)
  }

  toJSON () {
    return { estimate: String(this.estimate), hold: this.hold === null ? null : String(this.hold) }
  }
}

class Meter {
  constructor (fastify, opts) {
    const config = settings(opts)
    this.mode = config.mode
    this.open = config.open
    this.header = config.header
    this.cost = config.cost
    this.exempt = config.exempt
    this.chargeErrors = config.chargeErrors
    this.holdTtlS = config.holdTtlS
    this.cache = new CheckCache(config.checkFreshMs)
    // Check mode admits with a tot, which a token without the charge role
    // may read; until a probe has shown the role, and after a charge that
    // may have landed, admission is the probe (probe.js).
    this.role = new RoleProbe()
    this.onUnpaid = config.onUnpaid
    this.ownClient = !opts.client
    this.client = opts.client || new AccManClient({
      url: opts.url,
      token: opts.token,
      // Left out, the plugin's defaults; null is the client's to refuse.
      timeoutMs: opts.timeoutMs === undefined ? limits.PLUGIN_TIMEOUT_MS_DEFAULT : opts.timeoutMs,
      retries: opts.retries === undefined ? limits.PLUGIN_RETRIES_DEFAULT : opts.retries,
      connections: opts.connections,
      bigint: true
    })
    if (!this.client.bigint) throw new TypeError('a client given to the plugin must be made with { bigint: true }')
    this.log = fastify.log.child({ plugin: 'accman' })
    this.repeats = new Repeats(this.log) // lines every refused request would say
    // A request id: 96 random bits per process, then a counter.  Keys are
    // `<id>-h` (a hold) and `<id>-c` (a charge): never taken from the
    // request, so a consumer cannot replay an old key to be served free.
    this.ridBase = crypto.randomBytes(12).toString('hex')
    this.ridNext = 0
    this.owed = new Owed(this.client, (item, why, unknown) => this.strand(item, why, unknown), this.log,
      (item) => this.charged(-item.by)) // a release moves 0: not counted
    this.releasing = new Set() // releases under way (release()), awaited at close
    this.billing = new Set() // async onUnpaid calls under way, awaited at close
    this.unmeteredRoutes = new Set() // routes answered past onSend, warned of once
    this.stats = Object.fromEntries(STATS.map((k) => [k, 0]))
    this.closing = false // fastify's close() has begun (preClose)
    this.challenge = `AccMan header="${this.header}"`
  }

  rid () {
    return this.ridBase + (++this.ridNext).toString(16)
  }

  priceFor (request) {
    const options = request.routeOptions // a getter that builds its object at each read
    const route = options && options.config ? options.config.accman : undefined
    if (route === false || this.exempt(request, options)) return null
    return route === undefined ? this.cost : price(route, 'config.accman')
  }

  // A cost function's result names the route and the stage, for the log
  // line of the 500 it causes to point at the function at fault.
  costOf (p, request, reply, stage) {
    if (typeof p !== 'function') return p
    const options = request.routeOptions
    return amount(p(request, reply, stage),
      `the result of ${request.method} ${options ? options.url : request.url}'s cost function at '${stage}'`)
  }

  // --- onRequest ------------------------------------------------------------
  async admit (request, reply) {
    const p = this.priceFor(request)
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
    if (state.gone) this.end(state) // the consumer left while we waited for AccMan
  }

  // Why the request has no credential, in the Python middleware's words:
  // two headers are told apart from one bad value by counting.
  noCredential (request, raw) {
    if (raw === undefined) return `the ${this.header} header is required`
    if (headerCount(request.raw.rawHeaders, this.header) > 1) return `more than one ${this.header} header`
    return `the ${this.header} header is not a credential`
  }

  async checkFor (state) {
    const probing = this.mode === 'check' && !this.role.seen
    let tot = probing ? null : this.cache.get(state.cred, state.estimate)
    if (tot === null) {
      try {
        tot = probing ? await this.role.admit(this.client, state.cred) : await this.client.tot(state.cred)
      } catch (err) {
        if (err instanceof NoAccount || !this.open || !this.isOutage(err)) throw err
        state.unpaid = err
        return
      }
      this.cache.set(state.cred, tot)
      if (tot < state.estimate) throw new Insufficient(tot)
    }
    state.tot = tot
  }

  async holdFor (state) {
    const key = state.rid + '-h'
    let r
    try {
      r = await this.client.hold(state.cred, -state.estimate, { ttlS: this.holdTtlS, min: 0, key })
    } catch (err) {
      if (mayHaveLanded(err)) this.owe(new Unhold(state.cred, state.estimate, this.holdTtlS, key), err)
      if (!this.open || !this.isOutage(err)) throw err
      state.unpaid = err
      return
    }
    state.hold = r.hold
    state.tot = r.tot
  }

  isOutage (err) {
    return err instanceof Unavailable || err instanceof OutcomeUnknown
  }

  refuseFor (reply, state, err) {
    if (err instanceof NoAccount) {
      this.stats.refused_no_account++
      return this.refuse(reply, 401, 'no_account', 'the credential names no account', { 'www-authenticate': this.challenge })
    }
    if (err instanceof Insufficient) {
      this.stats.refused_insufficient++
      return this.refuse(reply, 402, 'insufficient', `the balance ${err.tot} does not cover the cost ${state.estimate}`,
        { [this.header]: String(err.tot) }, `,"tot":${err.tot},"cost":${state.estimate}`)
    }
    if (err instanceof TooManyHolds) {
      // The account (or AccMan) is at its bound of open holds: one per
      // request in flight, so the consumer has thousands under way.  Its
      // own load, not the service's: 429, as the Python middleware.
      this.stats.refused_too_many++
      this.log.warn({ account: fingerprint(state.cred) }, 'accman: too many holds open for the account; refusing with 429')
      return this.refuse(reply, 429, 'too_many_requests', 'too many requests of this account are in flight',
        { 'retry-after': '1' })
    }
    if (!(err instanceof AccManError)) throw err // a bug (a cost function that threw, say): fastify's 500
    if (this.isOutage(err)) {
      this.repeats.say('warn', { code: err.code }, 'accman: AccMan unavailable; refusing with 503')
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
  }

  refuse (reply, status, code, detail, headers, extra = '') {
    reply.code(status).headers(headers).type(JSON_TYPE)
    return reply.send(body(code, detail, extra))
  }

  // --- preHandler ---------------------------------------------------------------
  // The last preHandler of each route the plugin checked (onRoute appends
  // it), so it runs just before the handler: it keeps the headers set so
  // far, for an error that replaces the response (dropHandlerHeaders).
  beforeHandler (request, reply) {
    const state = request.accman
    if (state) state.before = headersOf(reply)
  }

  // --- onSend -----------------------------------------------------------------
  // Charges (check mode) or settles (reserve mode) the response's cost and
  // sets the balance header.  The payload to send: the app's, or in check
  // mode the refusal in its place when AccMan refuses the charge.
  async charge (request, reply, payload) {
    // fastify's close() waits for every connection to end before the
    // onClose hooks, the owed calls' drain among them, and a kept-alive
    // connection whose request was under way at close() stays open for
    // the server's keepAliveTimeout (72 s): longer than a process manager
    // waits before SIGKILL.  Once closing, each response in this scope
    // closes its connection (HTTP/1 only: HTTP/2 has no such header).
    if (this.closing && request.raw.httpVersionMajor === 1) reply.header('connection', 'close')
    const state = request.accman
    if (!state || state.ended) return payload
    state.ended = true
    // A payload that fastify refuses (a Response's used body, a status
    // that is no HTTP status, a locked web stream) is its 500: nothing
    // charged, the hold released.
    try {
      payload = unwrapResponse(reply, payload)
    } catch (err) {
      this.release(state)
      throw err
    }
    if (refused(reply, payload)) {
      this.release(state)
      return payload
    }
    // A stream's 'error' while the charge is in flight would find no
    // listener (fastify adds its own once the onSend hooks are done), and
    // an unheard 'error' ends the process.  Heard here, the stream is left
    // errored for fastify to answer, as without the plugin (a 500 before
    // the first byte); the charge, made as the response started, stands.
    if (payload !== null && typeof payload === 'object' && typeof payload.pipe === 'function') {
      // A file stream not yet open (fs.createReadStream) may still fail to
      // open, and fastify then answers 500: it is waited for, and a
      // response that failed before its start is not charged.
      if (payload.pending === true) await opened(payload)
      if (payload.errored) {
        this.release(state)
        return payload
      }
      let charging = true
      payload.on('error', () => {
        if (charging && state.cost > 0n && state.unpaid === null) {
          this.log.warn({ account: fingerprint(state.cred), amount: String(state.cost), key: state.rid },
            'accman: the response\'s stream failed while its charge was in flight: charged for a response that failed')
        }
      })
      try {
        return await this.chargeSent(state, request, reply, payload)
      } finally {
        charging = false
      }
    }
    return this.chargeSent(state, request, reply, payload)
  }

  async chargeSent (state, request, reply, payload) {
    // The header is the balance a reply of AccMan told, or missing: never
    // one the handler or its web Response brought (relayed from another
    // service metered by AccMan, say).
    reply.removeHeader(this.header)
    const cost = this.chargeOf(state, request, reply, payload)
    state.cost = cost
    if (state.unpaid !== null) {
      if (cost > 0n) this.unpaid(state.cred, cost, state.unpaid.code) // a free response owes nothing
      return payload
    }
    let tot
    if (this.mode === 'reserve') {
      if (state.hold === null) {
        this.cap(cost, 0n) // an estimate of 0: nothing held, nothing charged
        tot = state.tot
      } else {
        tot = await this.settle(state, cost)
      }
    } else {
      try {
        tot = await this.mod(state, cost, false)
      } catch (err) {
        return this.refuseCharge(reply, payload, err, state)
      }
    }
    if (state.gone && cost > 0n && (this.mode === 'check' || state.hold !== null)) {
      // The charge is the response's start: one who left while it was in
      // flight pays (README, "Modes"), said so that it can be found.
      this.log.warn({ account: fingerprint(state.cred), amount: String(cost), key: state.rid },
        'accman: the consumer left while its charge was in flight: charged for a response it does not get')
    }
    if (tot !== null) reply.header(this.header, String(tot))
    return payload
  }

  chargeOf (state, request, reply, payload) {
    if (!this.chargeErrors && reply.statusCode >= 400) return 0n
    try {
      return this.costOf(state.price, request, reply, 'charge')
    } catch (err) {
      this.release(state) // a bug in the service: never keep the consumer's money on it
      dropHandlerHeaders(reply, state) // fastify's 500 takes the response's place
      discard(payload) // ... and never reads the payload: a file's fd would stay open
      throw err
    }
  }

  // Charges `cost` with the request's charge key: the new balance, or null
  // when the charge is owed.  Before the response is `served` (check
  // mode), a 401 or 403 is thrown instead, for the caller to refuse it.
  async mod (state, cost, served) {
    if (cost === 0n) return state.tot
    const key = state.rid + '-c'
    try {
      const r = await this.client.mod(state.cred, -cost, { key })
      this.charged(cost)
      this.cache.set(state.cred, r.tot)
      return r.tot
    } catch (err) {
      if (!served && refusesToken(err)) throw err
      // A charge that may have landed (a 503 that is not back-pressure, a
      // timeout, a 502 or 504, a connection cut after sending): writes may
      // be failing while tot goes on, and admitted on it, every request
      // would be served with its charge owed.  Admission goes back to the
      // probe, a change that meets the same failure until writes work
      // again (a closed service refuses, an open one serves unpaid and
      // says so at once); one that answers ends it at the next request.
      if (this.mode === 'check' && mayHaveLanded(err)) this.role.lost()
      this.owe(new Charge(state.cred, cost, key), err)
      return null
    }
  }

  // The charge after the work met 401 or 403: the token lost its charge
  // role or was replaced.  A misconfiguration must not serve for free, so
  // the response is not delivered: the app's body and its headers give way
  // to the 503 refusal, which keeps the headers of the request's handling
  // (dropHandlerHeaders), and nothing is owed for it.  Admission probes the
  // role again.
  refuseCharge (reply, payload, err, state) {
    this.role.lost()
    this.stats.refused_unavailable++
    this.repeats.say('error', { status: err.status, code: err.code },
      'accman: AccMan refused the charge: check the token\'s roles; refusing with 503')
    discard(payload)
    dropHandlerHeaders(reply, state)
    reply.code(503).headers({ 'retry-after': '1' }).type(JSON_TYPE)
    return body('unavailable', UNAVAILABLE_DETAIL)
  }

  // What reserve mode charges of `cost` with `held` held: a cost over the
  // hold is capped at it, counted and said.
  cap (cost, held) {
    if (cost <= held) return cost
    this.stats.capped++
    this.log.warn({ cost: String(cost), held: String(held) }, 'accman: cost over the hold: charged the hold')
    return held
  }

  async settle (state, cost) {
    const use = this.cap(cost, state.estimate)
    if (use === 0n) this.stats.released++
    try {
      const r = await this.client.settle(state.cred, state.hold, use)
      this.charged(use)
      return r.tot
    } catch (err) {
      if (err instanceof HoldEnded) {
        // The hold expired before the response (holdTtlS): all of it came
        // back, so the use is charged as a keyed mod instead.  With no use
        // there is nothing to charge, and no reply tells the balance: the
        // one seen at admission lacks the hold that came back, so the
        // response goes without the header, as on the Python side.
        if (use === 0n) return null
        this.log.warn({ account: fingerprint(state.cred) }, 'accman: the hold expired before the response; charging it as a mod')
        return this.mod(state, use, true)
      }
      this.owe(new Settle(state.cred, state.hold, use, state.estimate, state.rid), err)
      return null
    }
  }

  // --- the consumer left (onRequestAbort, the response's close), onResponse ------
  // Ends the request's part without a charge: the consumer left, or no
  // response went through onSend.  A hold is released at once.
  end (state) {
    if (state.ended) return
    state.ended = true
    if (state.hold !== null) this.release(state)
  }

  // The consumer left before its response ended: a request admitted ends
  // here (its hold released); one still being admitted ends as admission
  // returns (admit).
  left (state) {
    state.gone = true
    if (state.tot !== null || state.unpaid !== null) this.end(state)
  }

  // A response that went out without fastify's onSend (the route called
  // reply.hijack() or wrote to reply.raw, as server-sent events do) is
  // served free: said once per route, since it is not the consumer's
  // doing but the service's, and silent it would cost money on every call.
  unmetered (request) {
    const route = `${request.method} ${request.routeOptions.url}`
    if (this.unmeteredRoutes.has(route)) return
    this.unmeteredRoutes.add(route)
    this.log.warn(`accman: ${route} was answered without fastify's onSend (reply.hijack() or ` +
      'a write to reply.raw): its requests are served free; answer it with reply.send() to meter it')
  }

  release (state) {
    state.ended = true
    if (state.hold === null) return
    this.stats.released++
    const item = new Settle(state.cred, state.hold, 0n, state.estimate, state.rid)
    track(this.releasing, item.run(this.client, this.log).catch((err) => this.owe(item, err)))
  }

  // --- owed calls, stats --------------------------------------------------------
  owe (item, cause) {
    if (this.owed.add(item, cause)) {
      this.stats.owed++
      this.log.warn({ account: fingerprint(item.cred), amount: String(item.amount), key: item.key, after: cause.code },
        `accman: ${item.what} queued to retry`)
    }
  }

  // An owed call that will not land.  Who owes whom follows the sign of
  // what it moves: a charge or a settle never landed, so the account owes
  // it (unpaid, told to onUnpaid); a release loses nothing, since a hold
  // returns by itself at its expiry.  A call whose last attempt may have
  // landed (`unknown`) is not unpaid: billed later, it could be billed
  // twice, so the log says where to look.  As accman/calling/owed.py's _strand.
  strand (item, why, unknown = false) {
    this.stats.stranded++
    if (unknown && item.by !== 0n) {
      this.log.error({ account: fingerprint(item.cred), amount: String(item.amount), key: item.key, why },
        `accman: stranded ${item.what}, outcome unknown: look for ${item.key} in the account's history before settling it`)
      return
    }
    this.log.error({ account: fingerprint(item.cred), amount: String(item.amount), key: item.key, why },
      `accman: stranded ${item.what}: ${owedBy(item.by)}`)
    if (item.by < 0n) this.unpaid(item.cred, -item.by, why)
  }

  charged (cost) {
    if (cost > 0n) {
      this.stats.charged++
      this.stats.charged_amount += Number(cost)
    }
  }

  unpaid (cred, cost, why) {
    this.stats.unpaid_requests++
    this.stats.unpaid_amount += Number(cost)
    this.log.warn({ account: fingerprint(cred), amount: String(cost), why }, 'accman: served unpaid')
    if (this.onUnpaid !== null) {
      // A failing onUnpaid is logged, whether it throws or its promise
      // rejects: never a crash of the service, nor a stop of the owed calls.
      try {
        track(this.billing, Promise.resolve(this.onUnpaid(cred, cost, why))
          .catch((err) => this.log.error({ err, account: fingerprint(cred), amount: String(cost) }, 'accman: onUnpaid failed')))
      } catch (err) {
        this.log.error({ err, account: fingerprint(cred), amount: String(cost) }, 'accman: onUnpaid failed')
      }
    }
  }

  metrics () {
    return STATS.map((k) => `# TYPE accman_plugin_${k}_total counter\naccman_plugin_${k}_total ${this.stats[k]}\n`).join('')
  }

  // Releases under way end (a failed one is owed), then owed calls get
  // what is left of CLOSE_DRAIN_MS to land (Owed.close); async onUnpaid
  // calls, those of what the close stranded among them, get CLOSE_DRAIN_MS
  // more; then the client closes, and the repeated lines say their counts
  // not yet said.
  async close () {
    const deadline = performance.now() + limits.CLOSE_DRAIN_MS
    await Promise.all(this.releasing)
    await this.owed.close(Math.max(deadline - performance.now(), 0))
    let timer
    const late = new Promise((resolve) => { timer = setTimeout(resolve, limits.CLOSE_DRAIN_MS) })
    await Promise.race([Promise.all(this.billing), late])
    clearTimeout(timer)
    if (this.billing.size) this.log.error(`accman: ${this.billing.size} onUnpaid calls still under way at close: their bills may not be made`)
    if (this.ownClient) await this.client.close()
    this.repeats.close() // no count unsaid, no timer left behind
  }
}

// From close() on, a connection kept alive after its response ends within
// CLOSE_KEEP_ALIVE_MS, whichever scope's route answered it.  fastify's
// close() runs the onClose hooks, the owed calls' drain among them, only
// once every connection has ended; server.close() ends the connections
// idle at that moment, while one whose request was under way is kept alive
// after its response for keepAliveTimeout (fastify's 72 s).  The plugin's
// onSend closes the connections of its own scope (charge), but a route in a
// sibling or parent scope never meets that hook.  Node reads the server's
// keepAliveTimeout as each response ends, so the shorter one holds for
// every response that ends from now on, with no hook on other scopes'
// routes: the server is closing, and an idle connection is what fastify's
// own close ends (forceCloseConnections 'idle').  0 is Node's "never".
// HTTP/2 servers have no such timeout (fastify closes their sessions).
// Returns what puts it back, for onClose: fastify runs that hook once the
// server has closed, or at once for a server it does not close (a
// serverFactory's that the service listens on itself, and may share),
// which goes on serving as it did.
function shortenKeepAlive (server) {
  const ms = server ? server.keepAliveTimeout : undefined
  if (typeof ms !== 'number' || (ms !== 0 && ms <= limits.CLOSE_KEEP_ALIVE_MS)) return () => {}
  server.keepAliveTimeout = limits.CLOSE_KEEP_ALIVE_MS
  return () => {
    if (server.keepAliveTimeout === limits.CLOSE_KEEP_ALIVE_MS) server.keepAliveTimeout = ms
  }
}

// Keeps `promise` in `set` until it settles, for close() to wait for.
function track (set, promise) {
  const kept = promise.finally(() => set.delete(kept))
  set.add(kept)
}

async function fastifyAccman (fastify, opts) {
  const meter = new Meter(fastify, opts)
  fastify.decorate('accman', {
    client: meter.client,
    stats: meter.stats,
    metrics: () => meter.metrics(),
    drain: (timeoutMs = limits.CLOSE_DRAIN_MS) => meter.owed.drain(timeoutMs)
  })
  fastify.decorateRequest('accman', null)
  // Every route the plugin meters has its onRequest hook; every route it
  // checked, its preHandler (Meter.beforeHandler).  Their names are this
  // registration's own, for the plugin may be registered in more than one
  // scope.
  const id = crypto.randomBytes(4).toString('hex')
  const admitName = `fastify-accman ${id} admit`
  const checkedName = `fastify-accman ${id} checked`
  const checkedHook = named(checkedName, (request, reply, done) => {
    meter.beforeHandler(request, reply)
    done()
  })
  let routesChecked = 0
  const declared = [] // the paths of the routes added after the plugin
  const markSiblingHead = headSiblings(fastify)
  fastify.addHook('onRoute', (route) => {
    checkRoute(route)
    markSiblingHead(route)
    // A prefixed '/' route answers /v1 and /v1/, both routed to '/v1'
    // (routeOptions.url), which is what exempt names.
    const path = route.prefix && route.routePath === '/' ? route.prefix : route.url
    checkExempt(route, path, meter.exempt)
    routesChecked++
    declared.push(path)
    route.preHandler = [].concat(route.preHandler ?? [], checkedHook)
  })
  fastify.addHook('onReady', async () => {
    const text = fastify.printRoutes({ includeMeta: ['onRequest', 'preHandler'] })
    const { unchecked, readable, paths } = uncheckedRoutes(text, admitName, checkedName, routesChecked)
    if (!readable) meter.log.warn('accman: printRoutes() is not in the shape known: routes added before the plugin are not found')
    if (unchecked.length) meter.log.warn(uncheckedWarning(unchecked))
    // Only when printRoutes() was read: else routes added before the plugin are not known.
    const unrouted = readable ? unroutedExempt(meter.exempt.entries ?? [], declared.concat(paths)) : []
    if (unrouted.length) meter.log.warn(unroutedWarning(unrouted))
  })
  fastify.addHook('onRequest', named(admitName, (request, reply) => meter.admit(request, reply)))
  fastify.addHook('onSend', (request, reply, payload) => meter.charge(request, reply, payload))
  fastify.addHook('onRequestAbort', async (request) => {
    if (request.accman) meter.left(request.accman)
  })
  fastify.addHook('onResponse', async (request, reply) => {
    const state = request.accman
    if (!state) return
    if (!state.ended && !state.gone && state.unpaid === null && reply.statusCode < 400) {
      meter.unmetered(request) // answered past onSend: reply.hijack() or reply.raw
    }
    meter.end(state)
  })
  let keepAliveBack = () => {}
  fastify.addHook('preClose', async () => {
    meter.closing = true
    keepAliveBack = shortenKeepAlive(fastify.server)
  })
  fastify.addHook('onClose', () => {
    keepAliveBack()
    return meter.close()
  })
}

const plugin = fp(fastifyAccman, { fastify: '5.x', name: 'fastify-accman' })

module.exports = { plugin, fingerprint, Meter }
