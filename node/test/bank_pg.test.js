'use strict'
// The bank checker through the calling side (helpers/bankrun.js: the load
// and the reconciliation, as strict as bank.test.js's) in docs/SCALING.md's
// production layout, as tests/reliability/test_calling_bank_pg.py runs the
// Python middleware: the plugin's AccMan URL is a round-robin TCP proxy
// (helpers/roundrobin.js, no health check) before two real AccMan
// front-ends on one real PostgreSQL (helpers/pg.js).  The faults hit the
// front-ends in turn: one SIGKILLed and started again on its port, the
// next stopped (SIGSTOP) past the plugin's timeout and hold ttl, then let
// go on (SIGCONT), so that calls sent again to the other front-end are
// answered while their first attempts wait in the stopped one and arrive
// later; and so on, the last a kill as the service closes, its owed calls
// left to land through the other.  An account refused 402 is topped up, so
// that a refusal judged on its balance may be followed by a late attempt
// that meets a higher one (errors.js, `definite`).  Each fault comes once
// enough responses were paid since the last; check mode, then reserve
// mode, on the same database and front-ends.  ACCMAN_CRASH_LONG=1 runs
// many more rounds (`just crash-node`); ACCMAN_CRASH_SEED=N replays the
// same choice of requests (their timing is the machine's).

const test = require('node:test')
const assert = require('node:assert/strict')
const { AccManServer } = require('./helpers/accman')
const { LONG, bankRun } = require('./helpers/bankrun')
const { PgCluster } = require('./helpers/pg')
const { roundRobin } = require('./helpers/roundrobin')
const { sleep } = require('./helpers/app')

const FAULTS = LONG ? 31 : 3 // a mode's
const PAID_PER_ROUND = LONG ? 400 : 40 // paid responses before each fault
// The plugin's timeout per attempt, and reserve mode's holds: short, so
// that a stop outlasts them, and a call whose first attempt meets it is
// sent again, to the other front-end, while the stop goes on.
const TIMEOUT_MS = 1000
const HOLD_TTL_S = 2
// A stop outlasts the timeout (the calls there time out and are sent
// again) and the hold ttl (their holds expire meanwhile, and settles find
// them ended) by this much.
const PAUSE_PAST_MS = 500
const PAUSE_MS = Math.max(TIMEOUT_MS, HOLD_TTL_S * 1000) + PAUSE_PAST_MS
// Long enough for an owed call's pause (OWED_PAUSE_MAX_MS at most) and its attempt.
const DRAIN_MS = 30000
const RUN_MS = LONG ? 3600000 : 60000

// The database, its two front-ends and the proxy before them, shared by
// the modes' runs; `victim` is the front-end the next fault hits.
const rig = { pg: null, fes: [], proxy: null, victim: 0, made: { kill: 0, pause: 0 } }

test.before(async () => {
  rig.pg = await PgCluster.create()
  const store = await rig.pg.createDatabase('bank')
  // One after the other: the first makes the store's tables.
  for (let n = 0; n < 2; n++) {
    const fe = new AccManServer({ store })
    rig.fes.push(fe)
    await fe.start()
  }
  rig.proxy = await roundRobin(rig.fes.map((fe) => ({ host: '127.0.0.1', port: fe.port })))
})

test.after(async () => {
  try {
    await rig.proxy?.close()
    for (const fe of rig.fes) {
      fe.child?.kill('SIGCONT') // a test that failed mid-stop
      await fe.close()
    }
  } finally {
    rig.pg?.destroy()
  }
})

// The front-end `fe` stopped for PAUSE_MS, and until each loop has had a
// response since, then let go on.
async function pause (fe, load) {
  const { progress } = load
  const at = progress.answered
  fe.child.kill('SIGSTOP')
  try {
    await sleep(PAUSE_MS)
    await progress.reach(() => progress.answered >= at + load.loops)
  } finally {
    fe.child.kill('SIGCONT')
  }
}

// Fault `n` of a mode's: kill, stop, stop, kill, and again, each hitting
// the next front-end, so that each meets both kinds; the last, as the
// service closes, a kill.
function kindOf (n) {
  return n === FAULTS - 1 || n % 4 === 0 || n % 4 === 3 ? 'kill' : 'pause'
}

// FAULTS faults, each once PAID_PER_ROUND responses were paid since the
// last: a kill, then the front-end started again on its port once each
// loop has had a response since; or a stop (pause).  After each but the
// last, and but every other one of the long run (whose owed calls meet
// the next fault), waits for the calls owed meanwhile to land.  The last
// kill is not followed by a start: the service closes with that
// front-end down.
async function faults (app, load) {
  const { progress } = load
  for (let n = 0; n < FAULTS; n++) {
    await progress.reach(() => progress.paid >= PAID_PER_ROUND)
    const fe = rig.fes[rig.victim]
    rig.victim = (rig.victim + 1) % rig.fes.length
    const last = n === FAULTS - 1
    if (kindOf(n) === 'kill') {
      await fe.stop('SIGKILL')
      rig.made.kill++
      const at = progress.answered
      await progress.reach(() => progress.answered >= at + load.loops)
      if (last) break
      await fe.start()
    } else {
      await pause(fe, load)
      rig.made.pause++
    }
    if (!LONG || n % 2 === 0) assert.ok(await app.accman.drain(DRAIN_MS), 'the owed calls land')
    progress.paid = 0
  }
  return `${FAULTS} faults, the proxy's connections ${JSON.stringify(rig.proxy.stats)}`
}

async function frontEndsRun (t, mode) {
  const made = { ...rig.made }
  const sent = [...rig.proxy.stats.sent]
  await bankRun(t, mode, {
    url: rig.proxy.url,
    options: { timeoutMs: TIMEOUT_MS, ...(mode === 'reserve' ? { holdTtlS: HOLD_TTL_S } : {}) },
    topUps: true,
    faults,
    up: async () => {
      for (const fe of rig.fes) if (fe.child === null) await fe.start()
    }
  })
  // A real run: every fault made, both front-ends given connections.
  const kinds = Array.from({ length: FAULTS }, (_, n) => kindOf(n))
  assert.equal(rig.made.kill - made.kill, kinds.filter((k) => k === 'kill').length)
  assert.equal(rig.made.pause - made.pause, kinds.filter((k) => k === 'pause').length)
  assert.ok(rig.proxy.stats.sent.every((s, n) => s > sent[n]), JSON.stringify(rig.proxy.stats))
}

test('bank through two front-ends on PostgreSQL, check mode: killed and stopped in turn; every charge once', { timeout: RUN_MS }, async (t) => {
  await frontEndsRun(t, 'check')
})

test('bank through two front-ends on PostgreSQL, reserve mode: killed and stopped in turn; every charge once, never overdrawn', { timeout: RUN_MS }, async (t) => {
  await frontEndsRun(t, 'reserve')
})
