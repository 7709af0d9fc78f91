'use strict'
// Check mode's memory of balances: a request is admitted on a balance that
// AccMan reported at most `freshMs` ago in this process (a tot, or a
// charge's reply), so that a paid request costs one round trip, not two.
// Only admissions use it: a balance under the estimate is always read
// again before a request is refused, so a consumer who just paid in is
// never refused on an old figure.  Check mode already lets concurrent
// requests overdraw (README "Modes"); this widens that window to freshMs.

const { CHECK_CACHE_ENTRIES_MAX } = require('./limits')

class CheckCache {
  constructor (freshMs) {
    this.freshMs = freshMs
    this.entries = new Map() // cred -> [tot (bigint), at (ms)], oldest first
  }

  // The balance if it is fresh and covers `estimate`, else null.
  get (cred, estimate) {
    if (this.freshMs === 0) return null
    const e = this.entries.get(cred)
    if (e === undefined) return null
    if (performance.now() - e[1] > this.freshMs) {
      this.entries.delete(cred)
      return null
    }
    return e[0] >= estimate ? e[0] : null
  }

  set (cred, tot) {
    if (this.freshMs === 0) return
    this.entries.delete(cred)
    if (this.entries.size >= CHECK_CACHE_ENTRIES_MAX) {
      this.entries.delete(this.entries.keys().next().value)
    }
    this.entries.set(cred, [tot, performance.now()])
  }
}

module.exports = { CheckCache }
