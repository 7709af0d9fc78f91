'use strict'
// The response's side (Meter's part, meter.js): preHandler keeps the
// headers set before the handler; onSend charges the response's cost
// (check mode) or settles its hold (reserve mode), sets the balance header
// to the new balance, and gives the response up for a 503 when AccMan
// refuses the charge of check mode.  A call that may not have landed is
// owed (owed.js), never lost.

const {
  HoldEnded, Unauthorized, Forbidden, NotApplied, Busy, mayHaveLanded
} = require('./errors')
const { Charge, Settle, fingerprint } = require('./owed')
const { headersOf, dropHandlerHeaders } = require('./headers')
const { unwrapResponse, refused, unwritable, discard, opened } = require('./payload')
const { body, JSON_TYPE, UNAVAILABLE_DETAIL } = require('./admit')

// AccMan's answer to a token that is wrong (401) or lacks the role (403).
function refusesToken (err) {
  return err instanceof Unauthorized || err instanceof Forbidden
}

// Whether a failed charge says that AccMan's writes may be failing while
// its reads go on: one that may have landed (a 503 from a failed commit, a
// timeout, a 502 or 504, a connection cut after sending), or one refused
// by a store that takes no writes now (NotApplied, a server stopping among
// them).  Busy is back-pressure from a store that writes; Unreachable
// reached nothing, which the next read meets too.
function writesFailing (err) {
  return mayHaveLanded(err) || (err instanceof NotApplied && !(err instanceof Busy))
}

// The reply's status and headers as the charge `judged` them, put back
// after a later send of the reply changed them while the charge was in
// flight (fastify's error handler sets a 500 and drops the content type
// for a handler that threw after sending): the first response goes out
// as it was charged (sentAgain).
function putBack (reply, judged, state) {
  if (!state.resent && reply.statusCode === judged.status) return
  for (const name of Object.keys(reply.getHeaders())) reply.removeHeader(name)
  reply.code(judged.status).headers(judged.headers)
}

// Meter's methods of the response, put on its prototype (meter.js).
const charging = {
  // The last preHandler of each route the plugin checked (onRoute appends
  // it), so it runs just before the handler: it keeps the headers set so
  // far, for an error that replaces the response (dropHandlerHeaders).
  beforeHandler (request, reply) {
    const state = request.accman
    if (state) state.before = headersOf(reply)
  },

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
    if (!state) return payload
    if (state.sending) return this.sentAgain(state, reply, payload)
    if (state.ended) {
      // fastify's error response in place of a response already charged:
      // its stream failed (a web stream is read, and fails, only once the
      // onSend hooks are done) or a later onSend hook did.  The charge, made
      // as the response started, stands (README "Modes"), and is said.
      if (state.charged && !state.failureSaid && !reply.raw.headersSent) {
        state.failureSaid = true
        this.log.warn(
          { account: fingerprint(state.cred), amount: String(state.cost), key: state.rid },
          'accman: the response failed once charged, and fastify\'s error response took ' +
          'its place: charged for a response that failed')
      }
      return payload
    }
    state.ended = true
    return this.chargeSending(state, request, reply, payload, false)
  },

  // The last onSend hook of each route the plugin checked (onRoute appends
  // it): a response put off by chargeFirst is judged, and charged, as the
  // onSend hooks after the plugin's left it.
  async chargeLast (request, reply, payload) {
    const state = request.accman
    if (!state || !state.deferred) return payload
    state.deferred = false
    return this.chargeSending(state, request, reply, payload, true)
  },

  // chargeFirst, with the reply marked as in its first send meanwhile, so
  // that a send of it that comes then waits (sentAgain).
  async chargeSending (state, request, reply, payload, last) {
    state.sending = true
    try {
      return await this.chargeFirst(state, request, reply, payload, last)
    } finally {
      state.sending = false
    }
  },

  // A send of the reply while its first send is in this hook (a handler
  // that sends, then throws or sends again, or returns undefined from an
  // async function): fastify writes a first send at once when no onSend
  // hook waits, and refuses a later one as already sent.  Here the first
  // waits for AccMan, and a later one, let through, would go out in its
  // place: the consumer charged for a body it never gets, and given one it
  // never paid for (or a 500).  So it waits until the response has ended,
  // and fastify refuses it then, as without the plugin; the status and
  // headers it set on the shared reply meanwhile are put back (putBack).
  // A send after the hook is done, fastify's error response when the
  // first send fails after it, goes through.
  async sentAgain (state, reply, payload) {
    state.resent = true
    // A reply is a thenable that settles once its response has ended
    // (fastify's `await reply`), over HTTP/1 and HTTP/2 alike.
    await new Promise((resolve) => reply.then(resolve, resolve))
    return payload
  },

  async chargeFirst (state, request, reply, payload, last) {
    // A payload that fastify refuses (a Response's used body, a status
    // that is no HTTP status, a locked web stream, an object it cannot
    // send), or headers that Node will not write, is its 500: nothing
    // charged, the hold released.  An onSend hook after the plugin's may
    // still make it one fastify sends (a route's hook that writes an
    // object as XML): on a route that has the plugin's last hook (its
    // preHandler ran: `before`), it is judged there instead (chargeLast).
    try {
      payload = unwrapResponse(reply, payload)
    } catch (err) {
      this.release(state)
      throw err
    }
    const judged = { status: reply.statusCode, headers: headersOf(reply) }
    if (refused(reply, payload) || unwritable(judged.headers)) {
      if (!last && state.before !== null) {
        state.deferred = true
        return payload
      }
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
          state.failureSaid = true
          this.log.warn(
            { account: fingerprint(state.cred), amount: String(state.cost), key: state.rid },
            'accman: the response\'s stream failed while its charge was in flight: ' +
            'charged for a response that failed')
        }
      })
      try {
        return await this.chargeSent(state, request, reply, payload, judged)
      } finally {
        charging = false
      }
    }
    return this.chargeSent(state, request, reply, payload, judged)
  },

  async chargeSent (state, request, reply, payload, judged) {
    putBack(reply, judged, state)
    // The header is the balance a reply of AccMan told, or missing: never
    // one the handler or its web Response brought (relayed from another
    // service metered by AccMan, say).
    reply.removeHeader(this.header)
    const cost = this.chargeOf(state, request, reply, payload)
    state.cost = cost
    if (state.unpaid !== null) {
      // A free response owes nothing.
      if (cost > 0n) this.unpaid(state.cred, cost, state.unpaid.code)
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
    state.charged = cost > 0n && (this.mode === 'check' || state.hold !== null)
    if (state.gone && state.charged) {
      // The charge is the response's start: one who left while it was in
      // flight pays (README, "Modes"), said so that it can be found.
      this.log.warn({ account: fingerprint(state.cred), amount: String(cost), key: state.rid },
        'accman: the consumer left while its charge was in flight: ' +
        'charged for a response it does not get')
    }
    putBack(reply, judged, state)
    if (tot !== null) reply.header(this.header, String(tot))
    return payload
  },

  chargeOf (state, request, reply, payload) {
    if (!this.chargeErrors && reply.statusCode >= 400) {
      this.stats.free_status++
      return 0n
    }
    try {
      return this.costOf(state.price, request, reply, 'charge')
    } catch (err) {
      this.release(state) // a bug in the service: never keep the consumer's money on it
      dropHandlerHeaders(reply, state) // fastify's 500 takes the response's place
      discard(payload) // ... and never reads the payload: a file's fd would stay open
      throw err
    }
  },

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
      // Writes may be failing while tot goes on (writesFailing), and
      // admitted on it, every request would be served with its charge
      // owed.  Admission goes back to the probe, a change that meets the
      // same failure until writes work again (a closed service refuses, an
      // open one serves unpaid and says so at once); one that answers ends
      // it at the next request.
      if (this.mode === 'check' && writesFailing(err)) this.role.lost()
      this.owe(new Charge(state.cred, cost, key), err)
      return null
    }
  },

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
  },

  // What reserve mode charges of `cost` with `held` held: a cost over the
  // hold is capped at it, counted and said, as a line every request of
  // the route may meet (known by its text alone, with the amounts).
  cap (cost, held) {
    if (cost <= held) return cost
    this.stats.capped++
    this.repeats.say('warn', {}, 'accman: cost over the hold: charged the hold',
      { cost: String(cost), held: String(held) })
    return held
  },

  // Why a hold ended before its settle, as it happened: raising holdTtlS
  // helps a slow handler, not an AccMan that answered the settle past the
  // ttl (stalled, or restarting), which no ttl bounds.  As on the Python side.
  expiredWhy (state, startedAt) {
    const ranS = (startedAt - state.heldAt) / 1000
    if (ranS >= this.holdTtlS) {
      return `expired before the response (the handler ran past holdTtlS=${this.holdTtlS} s)`
    }
    return `expired before its settle landed (the response started ${ranS.toFixed(1)} s ` +
      `after the hold, within holdTtlS=${this.holdTtlS} s: AccMan answered the settle late)`
  },

  async settle (state, cost) {
    const use = this.cap(cost, state.estimate)
    if (use === 0n) this.stats.released++
    const startedAt = performance.now() // the response's start, as its settle is sent
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
        this.stats.expired++
        const why = this.expiredWhy(state, startedAt)
        this.log.warn({ account: fingerprint(state.cred), hold: String(state.hold) },
          `accman: hold ${state.hold} ${why}: charging ${use} as a mod, key ${state.rid}-c`)
        return this.mod(state, use, true)
      }
      this.owe(new Settle(state.cred, state.hold, use, state.estimate, state.rid), err)
      return null
    }
  }
}

module.exports = { charging }
