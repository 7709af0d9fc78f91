'use strict'
// Check mode's admission until the token's charge role is seen: the role
// probe (README "Check mode").  A tot may be read with a token that cannot
// charge, and tot goes on answering while writes fail: admitted on it,
// every request would be served with its charge owed.  So until a write
// has been answered (the probe's 409), and again after any charge that may
// have landed (lost), admission is a probe.  One probe at a time: the
// requests that come while it is under way wait for it and then read their
// balance, so that a transient failure under load costs one write, not one
// per request in flight.  As the Python middleware's accman.calling.probe.

const { INT64_MAX } = require('./limits')
const { Conflict, Insufficient, NoAccount } = require('./errors')

class RoleProbe {
  constructor () {
    this.seen = false // admission reads tot
    this.underWay = null
    // Counts the losses: a probe answered before a loss that ends after it
    // says nothing of the writes since, and does not set `seen`.
    this.losses = 0
  }

  lost () {
    this.seen = false
    this.losses++
  }

  // The balance of `cred` to admit on, by a probe (the one under way, then
  // tot, if there is one).  The probe's failure is each waiter's, but for
  // an account that does not exist: the prober's, so the waiters probe for
  // themselves.
  async admit (client, cred) {
    if (this.underWay !== null) {
      try {
        await this.underWay
      } catch (err) {
        if (!(err instanceof NoAccount)) throw err
      }
      if (this.seen) return client.tot(cred)
    }
    const under = this.probe(client, cred, this.losses)
    this.underWay = under
    const done = () => { if (this.underWay === under) this.underWay = null }
    under.then(done, done)
    return under
  }

  // A charge of 1 with min INT64_MAX, which no balance can meet, so AccMan
  // refuses it for the balance (409 insufficient, with tot) and changes
  // nothing.  A token without the role meets its 403 here, before the
  // handler works, not at the charge after it.  A 404 no_account refuses
  // the request and probes on.  The balance, as tot.  Any of AccMan's 409s
  // is a judgment of the account, which only a token with the role gets:
  // it shows the role too.  A balance at INT64_MIN, where a charge of 1
  // leaves the range, is 409 overflow, with no tot: the balance is then read.
  async probe (client, cred, losses) {
    try {
      await client.mod(cred, -1n, { min: INT64_MAX })
    } catch (err) {
      if (!(err instanceof Conflict)) throw err
      if (losses === this.losses) this.seen = true
      return err instanceof Insufficient ? err.tot : await client.tot(cred)
    }
    throw new Error('AccMan applied a charge with min INT64_MAX')
  }
}

module.exports = { RoleProbe }
