'use strict'
// One registration's meter: its settings and state (the client, the role
// probe, the balances seen, the owed calls, the stats), and what it does
// outside the request's two ends: a request's part ended without a charge
// (the consumer left, or no response went through onSend), the owed calls
// and those stranded, the stats and the close.  Admission (admit.js) and
// the response's charge (charge.js) are its methods too, in their modules.

const crypto = require('node:crypto')
const limits = require('./limits')
const { AccManClient } = require('./client')
const { Owed, Settle, fingerprint } = require('./owed')
const { CheckCache } = require('./cache')
const { RoleProbe } = require('./probe')
const { Repeats } = require('./repeats')
const { settings, amount, price, routeOf, thrownBy } = require('./options')
const { admission } = require('./admit')
const { charging } = require('./charge')

// The Python middleware's counters, with the same names and meanings
// (README.md, "Decorations").
const STATS = [
  'requests', 'exempt', 'refused_no_credential', 'refused_no_account', 'refused_insufficient',
  'refused_too_many', 'refused_unavailable', 'charged', 'charged_amount', 'free_status',
  'released', 'capped', 'expired', 'unpaid_requests', 'unpaid_amount', 'owed', 'stranded'
]

// Who owes whom when an owed call that moves `by` never lands.
function owedBy (by) {
  if (by < 0n) return `the account owes ${-by}`
  if (by > 0n) return `the service owes the account ${by}`
  return 'nothing is lost: a hold returns by itself at its expiry'
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
      ca: opts.ca,
      bigint: true
    })
    if (!this.client.bigint) {
      throw new TypeError('a client given to the plugin must be made with { bigint: true }')
    }
    this.log = fastify.log.child({ plugin: 'accman' })
    this.repeats = new Repeats(this.log) // lines every refused request would say
    // A request id: 96 random bits per process, then a counter.  Keys are
    // `<id>-h` (a hold) and `<id>-c` (a charge): never taken from the
    // request, so a consumer cannot replay an old key to be served free.
    this.ridBase = crypto.randomBytes(12).toString('hex')
    this.ridNext = 0
    this.owed = new Owed(this.client, (item, why, unknown) => this.strand(item, why, unknown),
      this.log, (item) => this.charged(-item.by)) // a release moves 0: not counted
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

  // A route's price that its onRoute check did not see (a route added
  // before the plugin) is checked here, each request's 500 naming it.
  priceFor (request) {
    const options = request.routeOptions // a getter that builds its object at each read
    const route = options && options.config ? options.config.accman : undefined
    if (route === false || this.exempt(request, options)) return null
    return route === undefined
      ? this.cost
      : price(route, `config.accman of the route ${routeOf(request, options)}`)
  }

  // A cost function's result, or what it threw, names the route and the
  // stage, for the log line of the 500 it causes to point at the function
  // at fault.
  costOf (p, request, reply, stage) {
    if (typeof p !== 'function') return p
    const what = `${routeOf(request)}'s cost function at '${stage}'`
    let result
    try {
      result = p(request, reply, stage)
    } catch (err) {
      throw thrownBy(err, what)
    }
    return amount(result, `the result of ${what}`)
  }

  // --- the consumer left (onRequestAbort, the response's close), onResponse
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
    this.log.warn(`accman: ${route} was answered without fastify's onSend ` +
      '(reply.hijack() or a write to reply.raw): its requests are served free; ' +
      'answer it with reply.send() to meter it')
  }

  release (state) {
    state.ended = true
    if (state.hold === null) return
    this.stats.released++
    const item = new Settle(state.cred, state.hold, 0n, state.estimate, state.rid)
    track(this.releasing, item.run(this.client, this.log).catch((err) => this.owe(item, err)))
  }

  // --- owed calls, stats
  owe (item, cause) {
    if (this.owed.add(item, cause)) {
      this.stats.owed++
      this.log.warn({ ...fieldsOf(item), after: cause.code },
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
      this.log.error({ ...fieldsOf(item), why },
        `accman: stranded ${item.what}, outcome unknown: look for ${item.key} ` +
        `in the account's history before settling it${item.also || ''}`)
      return
    }
    this.log.error({ ...fieldsOf(item), why }, `accman: stranded ${item.what}: ${owedBy(item.by)}`)
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
    this.log.warn({ account: fingerprint(cred), amount: String(cost), why },
      'accman: served unpaid')
    if (this.onUnpaid !== null) {
      // A failing onUnpaid is logged, whether it throws or its promise
      // rejects: never a crash of the service, nor a stop of the owed calls.
      const failed = (err) => this.log.error(
        { err, account: fingerprint(cred), amount: String(cost) }, 'accman: onUnpaid failed')
      try {
        track(this.billing, Promise.resolve(this.onUnpaid(cred, cost, why)).catch(failed))
      } catch (err) {
        failed(err)
      }
    }
  }

  metrics () {
    return STATS.map((k) => `# TYPE accman_plugin_${k}_total counter\n` +
      `accman_plugin_${k}_total ${this.stats[k]}\n`).join('')
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
    if (this.billing.size) {
      this.log.error(`accman: ${this.billing.size} onUnpaid calls still under way at close: ` +
        'their bills may not be made')
    }
    if (this.ownClient) await this.client.close()
    this.repeats.close() // no count unsaid, no timer left behind
  }
}

// An owed call's fields in the log lines that tell of it.
function fieldsOf (item) {
  return { account: fingerprint(item.cred), amount: String(item.amount), key: item.key }
}

// Keeps `promise` in `set` until it settles, for close() to wait for.

function track (set, promise) {
  const kept = promise.finally(() => set.delete(kept))
  set.add(kept)
}

// Admission's methods and the response's are Meter's own, put on its
// prototype: one object, whose jobs are modules, calling each other
// through `this` as methods of one class do.
Object.assign(Meter.prototype, admission, charging)

module.exports = { Meter }
