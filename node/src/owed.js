'use strict'
// Calls still owed after their response: a charge or a settle that met a
// failure once the work was done.  Each is retried in the background with
// the same key (a mod) or the same use (a settle), so it applies exactly
// once however often it is sent; what cannot land is logged as stranded.
// At close they get a last while to land, and the call under way is let
// finish, so that a call that lands is never reported stranded.

const crypto = require('node:crypto')
const {
  OWED_MAX, OWED_ATTEMPTS_MAX, OWED_PAUSE_MS, OWED_PAUSE_MAX_MS
} = require('./limits')
const { shown } = require('./options')
const {
  Unavailable, OutcomeUnknown, HoldEnded, Insufficient, NoAccount, mayHaveLanded, definite
} = require('./errors')

// The longest delay a Node timer takes (a signed 32-bit count of ms).
const TIMER_MS_MAX = 2 ** 31 - 1

// How logs name an account: not the credential, a bearer secret, but 12 hex
// digits of its SHA-256.
function fingerprint (cred) {
  return crypto.createHash('sha256').update(cred).digest('hex').slice(0, 12)
}

// Each owed call has `cred`, `by` (what it moves, a bigint: < 0 the account
// owes the service, > 0 the service owes the account, 0 nothing is lost if
// it never lands), `amount` and `key` (for logs: what it moves or frees,
// and its key or hold), `also` (a Settle's: what else a log of unknown
// outcome names to look for), `what` ('charge', 'settle' or 'release') and
// `run(client, log)`, which repeats exactly what failed.

class Charge {
  constructor (cred, cost, key) {
    this.what = 'charge'
    this.cred = cred
    this.by = -cost
    this.amount = cost
    this.key = key
  }

  run (client) {
    return client.mod(this.cred, this.by, { key: this.key })
  }
}

// A settle of `hold` with `use`; a release when `use` is 0, freeing `held`.
// Repeating it answers the first reply, so it needs no key.  If the hold
// has ended meanwhile, a release has nothing left to do, and a use is
// charged as a keyed mod instead (`<rid>-c`, the key of a request whose
// hold expired before its response): the hold expired, all of it went
// back, and the work was done.
class Settle {
  constructor (cred, hold, use, held, rid) {
    this.what = use === 0n ? 'release' : 'settle'
    this.cred = cred
    this.by = -use
    this.amount = use === 0n ? held : use
    this.use = use
    this.hold = hold
    this.key = `hold ${hold}`
    this.chargeKey = rid + '-c'
    // What else to look for when its outcome is unknown: a use charged as
    // a mod leaves the hold's history with only its expiry, and where that
    // charge landed, its key alone shows it.
    this.also = use === 0n
      ? ''
      : '; had the hold expired first, its use was charged as a mod: look for key ' +
        `${this.chargeKey} too`
  }

  async run (client, log) {
    try {
      await client.settle(this.cred, this.hold, this.use)
    } catch (err) {
      if (!(err instanceof HoldEnded)) throw err
      if (this.use === 0n) return // released already, or expired: nothing is held
      log.warn({
        account: fingerprint(this.cred), hold: String(this.hold), amount: String(this.use),
        key: this.chargeKey
      }, `accman: hold ${this.hold} ended before its settle landed: ` +
        `charging ${this.use} as a mod, key ${this.chargeKey}`)
      await client.mod(this.cred, -this.use, { key: this.chargeKey })
    }
  }
}

// A hold whose outcome is unknown, to be undone: repeating it with its key
// answers whether it applied (the original reply, with its id) or not (it
// applies now, or is refused); then a settle with use 0 releases it.  Left
// alone it would return by itself at its expiry: it moves nothing.  A
// refused repeat holds nothing, but cannot stop an attempt still on its
// way (held by a stalled front-end): that one may apply later, and returns
// at its expiry, never charged.
class Unhold {
  constructor (cred, held, ttlS, key) {
    this.what = 'release'
    this.cred = cred
    this.by = 0n
    this.amount = held
    this.key = key
    this.ttlS = ttlS
  }

  async run (client) {
    let r
    try {
      r = await client.hold(this.cred, -this.amount, { ttlS: this.ttlS, min: 0, key: this.key })
    } catch (err) {
      if (err instanceof Insufficient || err instanceof NoAccount) return // nothing held now
      throw err
    }
    try {
      await client.settle(this.cred, r.hold, 0n)
    } catch (err) {
      if (!(err instanceof HoldEnded)) throw err
    }
  }
}

class Owed {
  // `strand(item, why)` is told of every call that will not be retried,
  // `landed(item)` of every one that landed; `log` is the plugin's logger.
  constructor (client, strand, log, landed = () => {}) {
    this.client = client
    this.strand = strand
    this.landed = landed
    this.log = log
    this.queue = []
    this.running = null
    // From close(): past this time (performance.now() ms) no call starts
    // and none is retried.
    this.deadline = Infinity
    this.closed = false
    this.wake = null // ends a pause between attempts early, at close
    // What became of the calls owed since the queue was last empty: each
    // is a warning as it is queued, and a stranded one an error, so the
    // log also says when the queue empties, or an outage's warnings would
    // never be followed by word that their calls landed.
    this.landedCount = 0
    this.strandedCount = 0
  }

  get size () {
    return this.queue.length
  }

  // `item` is a Charge, a Settle or an Unhold; `cause` the error that kept
  // it from landing now.  `item.maybe`: an attempt of it may have landed
  // (never after a NotApplied or an Unreachable alone: stranded so, a
  // charge or a settle is unpaid).
  add (item, cause) {
    item.maybe = cause !== undefined && mayHaveLanded(cause)
    if (this.closed) {
      this.strand(item, 'shutting down', item.maybe)
      return false
    }
    if (this.queue.length >= OWED_MAX) {
      this.strand(item, 'OWED_MAX owed calls already queued', item.maybe)
      return false
    }
    this.queue.push(item)
    if (this.running === null) this.running = this._run().finally(() => { this.running = null })
    return true
  }

  // Pays the queue oldest first.  At the deadline it stops between calls:
  // a call under way is never cut off, since then nobody would know whether
  // it landed; close() strands what is left.
  async _run () {
    let attempt = 0
    while (this.queue.length && performance.now() < this.deadline) {
      const item = this.queue[0]
      try {
        await item.run(this.client, this.log)
        this.landedCount++
        this.landed(item)
      } catch (err) {
        const transient = err instanceof Unavailable || err instanceof OutcomeUnknown
        item.maybe = item.maybe || mayHaveLanded(err)
        if (transient && ++attempt < OWED_ATTEMPTS_MAX) {
          await this.pause(Math.min(OWED_PAUSE_MS * 2 ** (attempt - 1), OWED_PAUSE_MAX_MS))
          continue
        }
        // Only a definite refusal says that no earlier attempt landed.
        const unknown = item.maybe && !definite(err)
        this.strandedCount++
        const why = transient
          ? `still ${err.code} after ${attempt} attempts`
          : (err.code || String(err))
        this.strand(item, why, unknown)
      }
      this.queue.shift()
      attempt = 0
    }
    if (this.queue.length === 0) this.emptied()
  }

  // The queue is empty: says how many of the calls owed since it was last
  // empty landed, and how many were stranded (each of them an error too).
  emptied () {
    const landed = this.landedCount
    const stranded = this.strandedCount
    this.landedCount = this.strandedCount = 0
    this.log.info({ landed, stranded },
      `accman: no call owed any more: ${landed} landed, ${stranded} stranded`)
  }

  // Waits `ms`, or less: never past the deadline.
  async pause (ms) {
    const end = performance.now() + ms
    for (;;) {
      const left = Math.min(end, this.deadline) - performance.now()
      if (left <= 0) return
      await new Promise((resolve) => {
        const timer = setTimeout(resolve, left)
        this.wake = () => { clearTimeout(timer); resolve() }
      })
      this.wake = null
    }
  }

  // Waits until every owed call has landed or been stranded; false if
  // `timeoutMs` passed first.  A timer waits 1 ms for a delay it cannot
  // take: refused instead, for that false would say calls are still owed.
  async drain (timeoutMs) {
    if (!Number.isSafeInteger(timeoutMs) || timeoutMs < 0 || timeoutMs > TIMER_MS_MAX) {
      throw new TypeError(
        `timeoutMs must be an integer from 0 to ${TIMER_MS_MAX}, not ${shown(timeoutMs)}`)
    }
    if (this.running === null) return true
    let timer
    const late = new Promise((resolve) => { timer = setTimeout(resolve, timeoutMs, false) })
    const done = await Promise.race([this.running.then(() => true), late])
    clearTimeout(timer)
    return done
  }

  // At close: owed calls get `drainMs` to land.  Then no call starts and
  // none is retried; the call under way finishes, bounded by the client's
  // own timeout and retries, so that a call that lands is never reported
  // stranded (an onUnpaid biller would bill it twice).  What is left is
  // stranded, and so is any call owed later: the first item as of unknown
  // outcome when its last attempt may have landed.
  async close (drainMs) {
    this.deadline = performance.now() + drainMs
    if (this.wake !== null) this.wake()
    while (this.running !== null) await this.running
    this.closed = true
    if (this.queue.length === 0) return
    while (this.queue.length) {
      const item = this.queue.shift()
      this.strandedCount++
      this.strand(item, 'shutting down', item.maybe === true)
    }
    this.emptied()
  }
}

module.exports = { Owed, Charge, Settle, Unhold, fingerprint }
