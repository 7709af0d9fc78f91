'use strict'
// The plugin in reserve mode before a real AccMan on a real PostgreSQL
// (helpers/pg.js) that is stopped under it, then started again: the
// front-end refuses every change it cannot send with 503 not_applied
// (SERVER.md, "Errors"), which says that nothing of it applied.  A hold so
// refused holds nothing, and owes no release; a settle so refused is owed,
// and lands once the database is back, or, stranded at close, is billed
// as unpaid (nothing of it applied: never of unknown outcome).

const test = require('node:test')
const assert = require('node:assert/strict')
const { AccManClient } = require('..')
const { AccManServer, TOKENS } = require('./helpers/accman')
const { PgCluster } = require('./helpers/pg')
const { serviceApp, get, messages, until } = require('./helpers/app')

const HELD = 3 // requests admitted (held) before the database stops
const REFUSED = 5 // requests whose holds meet the database down
const FUNDING = 1000
// The front-end notices the database gone within its upkeep round, and
// takes writes again within its reconnection backoff (at most 2 s) of
// its start: both well within this on a loaded machine.
const HEALTH_WITHIN_MS = 60000
// Long enough for an owed call's pause (OWED_PAUSE_MAX_MS at most), its
// attempt, and the front-end's reconnection.
const DRAIN_MS = 60000

const rig = { pg: null, fe: null, mint: null }

test.before(async () => {
  rig.pg = await PgCluster.create()
  rig.fe = new AccManServer({ store: await rig.pg.createDatabase('outage') })
  await rig.fe.start()
  rig.mint = new AccManClient({ url: rig.fe.url, token: TOKENS.mint })
})

test.after(async () => {
  try {
    await rig.mint?.close()
    await rig.fe?.close()
  } finally {
    rig.pg?.destroy()
  }
})

// The front-end's /health status.
async function health () {
  try {
    const r = await fetch(rig.fe.url + '/health')
    await r.arrayBuffer()
    return r.status
  } catch {
    return 0
  }
}

// The log lines of the calls queued to retry.
function queued (logs) {
  return logs.filter((l) => l.level === 40 && l.msg.endsWith('queued to retry'))
}

// A reserve-mode service with HELD requests held on `cred` and waiting at
// their handler's gate, the database then stopped, and the front-end seen
// to know it (/health 503); then REFUSED requests more, each refused 503,
// and the calls owed so far counted (`owedRefused`); then the held
// requests answered, their settles owed.  `fn(app)` goes on from there,
// and says whether it closed the service; the database is started again
// after it, whatever it did.
async function outage (cred, logs, unpaid, fn) {
  await rig.mint.mod(cred, FUNDING)
  const { app, url } = await serviceApp({
    url: rig.fe.url, token: TOKENS.service, mode: 'reserve', onUnpaid: (...a) => unpaid.push(a)
  }, { logs })
  let closed = false
  let owedRefused
  try {
    const held = Array.from({ length: HELD }, () => get(url + '/gated', cred))
    await until(() => app.served === HELD, HEALTH_WITHIN_MS)
    await rig.pg.stop('fast')
    try {
      await until(async () => (await health()) === 503, HEALTH_WITHIN_MS)
      for (let n = 0; n < REFUSED; n++) {
        const r = await get(url + '/w', cred)
        assert.deepEqual([r.status, r.body.error], [503, 'unavailable'])
      }
      owedRefused = app.accman.stats.owed
      app.openGate()
      for (const r of await Promise.all(held)) assert.deepEqual([r.status, r.accman], [200, null])
      const settles = () => queued(logs).filter((l) => l.msg.startsWith('accman: settle')).length
      await until(() => settles() === HELD)
      closed = await fn(app)
    } finally {
      await rig.pg.start()
    }
  } finally {
    if (!closed) await app.close()
  }
  return { app, owedRefused }
}

test('reserve, PostgreSQL stopped and started: holds refused owe no release; the settles owed land once it is back', async () => {
  const cred = 'o-lands'
  const logs = []
  const unpaid = []
  const { app, owedRefused } = await outage(cred, logs, unpaid, async () => false)
  try {
    // No release owed for a hold that never applied.
    assert.equal(owedRefused, 0)
    await until(async () => (await health()) === 200, HEALTH_WITHIN_MS)
    assert.ok(await app.accman.drain(DRAIN_MS), `the owed settles land within ${DRAIN_MS} ms`)
  } finally {
    await app.close()
  }
  const stats = app.accman.stats
  assert.deepEqual([stats.owed, stats.stranded, stats.charged, stats.refused_unavailable],
    [HELD, 0, HELD, REFUSED])
  assert.deepEqual(unpaid, [])
  // Each call owed was a settle, queued after a not_applied.
  assert.deepEqual(queued(logs).map((l) => [l.msg, l.after]),
    Array(HELD).fill(['accman: settle queued to retry', 'not_applied']))
  // The history: the funding, and each held request's hold and settle;
  // nothing of the refused ones.
  const { past } = await rig.mint.past(cred)
  assert.equal(past.length, 1 + 2 * HELD)
  assert.equal(past.filter((e) => e.key !== null && e.key.endsWith('-h')).length, HELD)
  assert.equal(await rig.mint.tot(cred), FUNDING - HELD)
  assert.deepEqual(messages(logs, 30).filter((m) => m.includes('owed')),
    [`accman: no call owed any more: ${HELD} landed, 0 stranded`])
})

test('reserve, PostgreSQL stopped as the service closes: the settles owed are stranded unpaid, never unknown', async () => {
  const cred = 'o-stranded'
  const logs = []
  const unpaid = []
  await outage(cred, logs, unpaid, async (app) => {
    await app.close() // CLOSE_DRAIN_MS of not_applied, then stranded
    return true
  })
  assert.deepEqual(unpaid, Array(HELD).fill([cred, 1n, 'shutting down']))
  const settles = messages(logs, 50).filter((m) => m.startsWith('accman: stranded settle'))
  assert.deepEqual(settles, Array(HELD).fill('accman: stranded settle: the account owes 1'))
  // Nothing of the settles applied: their holds are still open.
  const { past } = await rig.mint.past(cred)
  assert.equal(past.length, 1 + HELD)
})
