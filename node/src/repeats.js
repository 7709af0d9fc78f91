'use strict'
// Log lines of a condition that every request meets while it lasts (AccMan
// unreachable, the service's token refused): each refused request would say
// it again, thousands a second.  Said when it starts, then at most every
// REPEAT_MS while it goes on, with how many times it came meanwhile
// (`repeated`, over `seconds`; a line that had stopped and comes back is
// said at once, with `repeatedBefore`, its last spell's count).  Repeats not
// yet said when the line stops coming are said once it has not come for
// REPEAT_MS (`repeated`, `seconds`, `quiet: true`; an unref'd timer, armed
// only while some count is unsaid), or at close.  A line forgotten (past
// LINES_MAX) with repeats not yet said says their count as it goes, in one
// line (`repeated`, `seconds`, `forgotten: true`), so that no repeat goes
// uncounted.  As the Python middleware's accman.calling.repeats.

const { REPEAT_MS, REPEATED_LINES_MAX: LINES_MAX } = require('./limits')

// The shortest wait of the timer: a timer may run a little before the
// injected clock says the line is due, and a line not yet due is waited for
// again, never in a busy loop.
const TIMER_MIN_MS = 1

class Repeats {
  // `log` is a pino-like logger; `now` a clock in ms.  The lines are known
  // by their level, fields and text: a few fixed ones and the replies' codes,
  // at most LINES_MAX kept.
  constructor (log, now = () => performance.now()) { // monotonic: a clock set back stays silent
    this.log = log
    this.now = now
    this.said = new Map()
    this.timer = null
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
      if (state.since) {
        more = { repeatedBefore: state.since, seconds: Math.round((state.seen - state.at) / 1000) }
      }
    } else if (now - state.at >= REPEAT_MS) {
      more = { repeated: state.since, seconds: Math.round((now - state.at) / 1000) }
    } else {
      state.since++
      state.seen = now
      this.arm(REPEAT_MS)
      return
    }
    this.log[level]({ ...fields, ...said, ...more }, text)
    if (state === undefined && this.said.size >= LINES_MAX) this.forget(this.metLongestAgo())
    this.said.set(key, { at: now, since: 0, seen: now, level, fields, text })
    if (this.timer !== null && !this.unsaid()) this.cancel() // no count left to say
  }

  // Says the repeats not yet said of each line not met for REPEAT_MS (every
  // line's, `closing`): a spell that ended says what it counted without
  // waiting for the line to come again, which it may never do.  The timer's
  // work; then armed again if some count is still unsaid.
  flush (closing = false) {
    this.cancel()
    const now = this.now()
    let dueMs = null // until the next unsaid count is due
    for (const state of this.said.values()) {
      if (!state.since) continue
      const leftMs = state.seen + REPEAT_MS - now
      if (closing || leftMs <= 0) {
        const { since, at, seen, level, fields, text } = state
        const seconds = Math.round((seen - at) / 1000)
        this.log[level]({ ...fields, repeated: since, seconds, quiet: true }, text)
        state.since = 0
      } else if (dueMs === null || leftMs < dueMs) {
        dueMs = leftMs
      }
    }
    if (dueMs !== null) this.arm(dueMs)
  }

  // Says every count not yet said, and leaves no timer behind.
  close () {
    this.flush(true)
  }

  // Unref'd: a count waiting to be said never keeps the process alive.
  arm (delayMs) {
    if (this.timer !== null) return
    const ms = Math.max(delayMs, TIMER_MIN_MS)
    this.timer = setTimeout(() => { this.timer = null; this.flush() }, ms)
    this.timer.unref()
  }

  cancel () {
    if (this.timer !== null) clearTimeout(this.timer)
    this.timer = null
  }

  unsaid () {
    for (const state of this.said.values()) if (state.since) return true
    return false
  }

  // Forgets a line, saying the repeats that it has not said yet: an operator
  // counts what an outage refused from these lines.
  forget (key) {
    const { at, since, seen, level, fields, text } = this.said.get(key)
    this.said.delete(key)
    if (since) {
      const seconds = Math.round((seen - at) / 1000)
      this.log[level]({ ...fields, repeated: since, seconds, forgotten: true }, text)
    }
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
