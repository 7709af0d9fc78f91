'use strict'
// Log lines of a condition that every request meets while it lasts (AccMan
// unreachable, the service's token refused): each refused request would say
// it again, thousands a second.  Said when it starts, then at most every
// REPEAT_MS while it goes on, with how many times it came meanwhile
// (`repeated`, over `seconds`; a line that had stopped and comes back is
// said at once, with `repeatedBefore`, its last spell's count).  A line
// forgotten (past LINES_MAX) with repeats not yet said says their count as
// it goes, in one line (`repeated`, `seconds`, `forgotten: true`), so that no
// repeat goes uncounted.  As the Python middleware's accman.calling.repeats.

const { REPEAT_MS, REPEATED_LINES_MAX: LINES_MAX } = require('./limits')

class Repeats {
  // `log` is a pino-like logger; `now` a clock in ms.  The lines are known
  // by their level, fields and text: a few fixed ones and the replies' codes,
  // at most LINES_MAX kept.
  constructor (log, now = () => performance.now()) { // monotonic: a clock set back stays silent
    this.log = log
    this.now = now
    this.said = new Map()
  }

  // `said` (fields too, such as AccMan's words, which vary with what answers)
  // is logged with the line but is no part of what the line is known by.
  say (level, fields, text, said = {}) {
    const now = this.now()
    const key = `${level} ${JSON.stringify(fields)} ${text}`
    const state = this.said.get(key)
    let more = {}
    if (state === undefined) {
      // the first time: said as it is
    } else if (now - state.seen >= REPEAT_MS) { // it had stopped: a new spell
      if (state.since) more = { repeatedBefore: state.since, seconds: Math.round((state.seen - state.at) / 1000) }
    } else if (now - state.at >= REPEAT_MS) {
      more = { repeated: state.since, seconds: Math.round((now - state.at) / 1000) }
    } else {
      state.since++
      state.seen = now
      return
    }
    this.log[level]({ ...fields, ...said, ...more }, text)
    if (state === undefined && this.said.size >= LINES_MAX) this.forget(this.metLongestAgo())
    this.said.set(key, { at: now, since: 0, seen: now, level, fields, text })
  }

  // Forgets a line, saying the repeats that it has not said yet: an operator
  // counts what an outage refused from these lines.
  forget (key) {
    const { at, since, seen, level, fields, text } = this.said.get(key)
    this.said.delete(key)
    if (since) this.log[level]({ ...fields, repeated: since, seconds: Math.round((seen - at) / 1000), forgotten: true }, text)
  }

  metLongestAgo () {
    let oldest
    for (const [key, state] of this.said) {
      if (oldest === undefined || state.seen < this.said.get(oldest).seen) oldest = key
    }
    return oldest
  }
}

module.exports = { Repeats, REPEAT_MS, LINES_MAX }
