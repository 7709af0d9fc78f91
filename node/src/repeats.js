'use strict'
// Log lines of a condition that every request meets while it lasts (AccMan
// unreachable, the service's token refused): each refused request would say
// it again, thousands a second.  Said when it starts, then at most every
// REPEAT_MS while it goes on, with how many times it came meanwhile
// (`repeated`, over `seconds`).  As the Python middleware's
// accman.calling.repeats.

// A line met by every request is said again at most this often.
const REPEAT_MS = 10000

class Repeats {
  // `log` is a pino-like logger; `now` a clock in ms.  The lines are known
  // by their level, fields and text: a few fixed ones, so the map stays small.
  constructor (log, now = Date.now) {
    this.log = log
    this.now = now
    this.said = new Map()
  }

  say (level, fields, text) {
    const now = this.now()
    const key = `${level} ${JSON.stringify(fields)} ${text}`
    const state = this.said.get(key)
    if (state !== undefined && now - state.at < REPEAT_MS) {
      state.since++
      return
    }
    const more = state !== undefined && state.since
      ? { repeated: state.since, seconds: Math.round((now - state.at) / 1000) }
      : {}
    this.log[level]({ ...fields, ...more }, text)
    this.said.set(key, { at: now, since: 0 })
  }
}

module.exports = { Repeats, REPEAT_MS }
