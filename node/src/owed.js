'use strict'
// Calls still owed after their response: a charge or a settle that met a
// failure once the work was done.  Each is retried in the background with
// the same key (a mod) or the same use (a settle), so it applies exactly
// once however often it is sent; what cannot land is logged as stranded.

const {
  OWED_MAX, OWED_ATTEMPTS_MAX, OWED_PAUSE_MS, OWED_PAUSE_MAX_MS
} = require('./limits')
const { Unavailable, OutcomeUnknown } = require('./errors')

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms))

class Owed {
  // `strand(item, why)` is told of every call that will not be retried.
  constructor (client, strand) {
    this.client = client
    this.strand = strand
    this.queue = []
    this.running = null
    this.stopped = false
  }

  get size () {
    return this.queue.length
  }

  // `item` has run(client) (a promise), what, cred, amount and key.
  add (item) {
    if (this.queue.length >= OWED_MAX) {
      this.strand(item, 'OWED_MAX owed calls already queued')
      return false
    }
    this.queue.push(item)
    if (this.running === null) this.running = this._run().finally(() => { this.running = null })
    return true
  }

  async _run () {
    let attempt = 0
    while (this.queue.length && !this.stopped) {
      const item = this.queue[0]
      try {
        await item.run(this.client)
      } catch (err) {
        const transient = err instanceof Unavailable || err instanceof OutcomeUnknown
        if (transient && ++attempt < OWED_ATTEMPTS_MAX && !this.stopped) {
          await sleep(Math.min(OWED_PAUSE_MS * 2 ** (attempt - 1), OWED_PAUSE_MAX_MS))
          continue
        }
        this.strand(item, transient ? `still ${err.code} after ${attempt} attempts` : (err.code || String(err)))
      }
      this.queue.shift()
      attempt = 0
    }
  }

  // Waits until every owed call has landed or been stranded; false if
  // `timeoutMs` passed first.
  async drain (timeoutMs) {
    if (this.running === null) return true
    let timer
    const late = new Promise((resolve) => { timer = setTimeout(resolve, timeoutMs, false) })
    const done = await Promise.race([this.running.then(() => true), late])
    clearTimeout(timer)
    return done
  }

  // Strands what is left (at close).
  stop (why) {
    this.stopped = true
    while (this.queue.length) this.strand(this.queue.shift(), why)
  }
}

module.exports = { Owed }
