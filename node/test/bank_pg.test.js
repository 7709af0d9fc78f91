'use strict'
// The bank checker through the calling side (helpers/bankrun.js: the load
// and the reconciliation, as strict as bank.test.js's) in docs/SCALING.md's
// production layout, as tests/reliability/test_calling_bank_pg.py runs the
// Python middleware: the plugin's AccMan URL is a round-robin TCP proxy
// (helpers/roundrobin.js) before two real AccMan front-ends on one real
// PostgreSQL (helpers/pg.js).  The front-ends' faults hit them in turn:
// one SIGKILLed and started again on its port, the next stopped (SIGSTOP)
// past the plugin's timeout and hold ttl, then let go on (SIGCONT), so
// that calls sent again to the other front-end are answered while their
// first attempts wait in the stopped one and arrive later; and so on, the
// last a kill as the service closes, its owed calls left to land through
// the other.  The database's faults hit both at once: PostgreSQL stopped
// (`immediate`) until a request has been answered 503, then started again
// (in the short form, in check mode only); in the long form, also kept
// down for a drawn while first, and restarted (`pg_ctl restart`, `fast`
// or `immediate`); the front-ends reconnect by themselves.  An account
// refused 402 is topped up, so that a refusal judged on its balance may be
// followed by a late attempt that meets a higher one (errors.js,
// `definite`).  Each fault comes once enough responses were paid since the
// last; check mode, then reserve mode, on the same database and
// front-ends.
//
// A database with a synchronous standby (SCALING.md's "Production
// layout"; helpers/pg.js's addStandby), the front-ends given both hosts
// with target_session_attrs=read-write, has two faults more, in a database
// and front-ends of their own: a failover (the primary SIGKILLed, the
// standby promoted with `pg_ctl promote`, the front-ends finding the new
// primary by themselves, SCALING.md's "Failover, as tested"), once in
// reserve mode in the short form, a third into each mode's run in the
// long one; and, in the long form, the standby stopped (`immediate`) for
// 3 to 12 s, past the plugin's timeout, short of the front-ends'
// COMMIT_TIMEOUT_S or past it: writes stall while reads go on, and
// complete once it is back; every other time, the next front-end is
// SIGKILLed and started again meanwhile.  The reconciliation is the same:
// what the old primary acknowledged is on the new one.
//
// ACCMAN_CRASH_LONG=1 runs many more rounds, each mode again through a
// proxy that sends only to the front-ends whose /health answers 200, and
// each mode with the standby's stops and with the failover (`just
// crash-node`); ACCMAN_CRASH_SEED=N replays the same choice of requests
// (their timing is the machine's).

const test = require('node:test')
const assert = require('node:assert/strict')
const { fetch } = require('undici')
const { AccManServer, migrateStore } = require('./helpers/accman')
const { LONG, SEED, bankRun, random } = require('./helpers/bankrun')
const { PgCluster } = require('./helpers/pg')
const { roundRobin } = require('./helpers/roundrobin')
const { sleep } = require('./helpers/app')

// A mode's faults: the short form's, in order (check mode's with the
// database stopped: its run through front-end faults alone may never be
// answered 503, its balance reads going on through the live front-end;
// reserve mode's holds meet the front-end faults' 503s already); the long
// form's, this cycle over again, so that each front-end meets both of its
// kinds and the database both of its own; the last, as the service
// closes, a kill.
const SHORT_KINDS = {
  check: ['kill', 'pause', 'db_down', 'kill'],
  reserve: ['kill', 'pause', 'kill']
}
// The short form's failover case: the failover, then the closing kill.
const SHORT_FAILOVER_KINDS = ['failover', 'kill']
const LONG_KINDS = ['kill', 'pause', 'db_restart', 'pause', 'kill', 'db_down']
// With a synchronous standby, the cycle has its stops too, one of them
// with a front-end killed meanwhile (test_calling_bank_pg.py's cycle).
const STANDBY_KINDS = ['kill', 'pause', 'db_restart', 'standby_down', 'pause', 'kill', 'db_down',
  'standby_down_kill']
const LONG_FAULTS = 31
// The long failover case's failover: a third in, the rest on the new
// primary (test_calling_bank_pg.py's nemesis).
const FAILOVER_AT = Math.floor(LONG_FAULTS / 3)
// The faults of the database (and its standby), after which the owed
// calls may be many: their drain has DB_DRAIN_MS.
const DB_KINDS = ['db_restart', 'db_down', 'standby_down', 'standby_down_kill', 'failover']
const KINDS = ['kill', 'pause', ...DB_KINDS]
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
// The database down in the long form's db_down: past the front-ends'
// reconnection backoff's first steps, within the hold ttl or past it (as
// test_calling_bank_pg.py's DB_DOWN_S); the short form's, only until the
// 503 below.
const DB_DOWN_MS = [1000, 4000]
// The standby stopped: past the plugin's timeout, short of the
// front-ends' COMMIT_TIMEOUT_S (10 s) or past it (as
// test_calling_bank_pg.py's STANDBY_DOWN_S).
const STANDBY_DOWN_MS = [3000, 12000]
// With the database down every front-end refuses every call at once, so
// a request is refused 503 once its admission calls AccMan: at once in
// reserve mode (a hold), and in check mode once the balance it read is
// older than checkFreshMs (1 s): a few seconds at most, with consumers
// sending all along.  The database stays down until one is, and a run
// where none comes within this fails: the plugin never saw AccMan down.
const REFUSED_WITHIN_MS = 30000
// The front-ends take writes again (/health 200) within this of the
// database's start: they reconnect with a backoff of at most 2 s.
const HEALTHY_WITHIN_MS = 30000
const HEALTH_POLL_MS = 50
// Long enough for an owed call's pause (OWED_PAUSE_MAX_MS at most) and its attempt.
const DRAIN_MS = 30000
// After the database's fault: the owed calls are paid one at a time, and
// in reserve mode each hold whose commit failed as the database went
// (AccMan's plain 503: it may have applied) owes a release of two calls;
// a hold refused 503 not_applied while it is down owes none.
const DB_DRAIN_MS = 300000
const RUN_MS = LONG ? 3600000 : 60000
// A case's own database, standby and front-ends are made within this.
const RIG_MS = 60000

// A database (with a synchronous standby if `standby`), its two
// front-ends (given every host of it, with target_session_attrs=read-write)
// and the proxies `proxies` before them; `victim` is the front-end the next
// front-end fault hits; `old`, the primaries failed over from.
async function makeRig ({ standby = false, proxies = ['unchecked'] } = {}) {
  const rig = {
    pg: null,
    standby: null,
    old: [],
    dbDown: false,
    fes: [],
    proxies: {},
    victim: 0,
    made: Object.fromEntries(KINDS.map((kind) => [kind, 0]))
  }
  try {
    rig.pg = await PgCluster.create()
    let store = await rig.pg.createDatabase('bank')
    if (standby) {
      rig.standby = await rig.pg.addStandby('bank_standby')
      const hosts = [rig.pg, rig.standby].map((pg) => `127.0.0.1:${pg.port}`).join(',')
      store = `postgresql://postgres@${hosts}/bank?target_session_attrs=read-write`
      await migrateStore(store) // once, as SCALING.md has it for a URL of several hosts
    }
    // One after the other: the first makes the store's tables.
    for (let n = 0; n < 2; n++) {
      const fe = new AccManServer({ store })
      rig.fes.push(fe)
      await fe.start()
    }
    const backends = rig.fes.map((fe) => ({ host: '127.0.0.1', port: fe.port }))
    for (const which of proxies) {
      rig.proxies[which] = await roundRobin(backends, { checked: which === 'checked' })
    }
  } catch (err) {
    await destroyRig(rig)
    throw err
  }
  return rig
}

async function destroyRig (rig) {
  try {
    for (const proxy of Object.values(rig.proxies)) await proxy.close()
    for (const fe of rig.fes) {
      fe.child?.kill('SIGCONT') // a test that failed mid-stop
      await fe.close()
    }
  } finally {
    for (const pg of [rig.standby, rig.pg, ...rig.old]) pg?.destroy()
  }
}

// The database and front-ends of the cases with no standby, shared by them.
let shared = null
const rand = random(SEED ^ 0x5bd1e995)

test.before(async () => {
  shared = await makeRig({ proxies: LONG ? ['unchecked', 'checked'] : ['unchecked'] })
})

test.after(async () => {
  if (shared) await destroyRig(shared)
})

// `promise`, or a failure saying `what` did not come within `ms`.
async function within (promise, ms, what) {
  let timer
  const late = new Promise((resolve, reject) => {
    timer = setTimeout(() => reject(new assert.AssertionError({ message: what })), ms)
  })
  try {
    return await Promise.race([promise, late])
  } finally {
    clearTimeout(timer)
  }
}

// Once the load has had a response on each of its loops since now.
function eachLoopAnswered (load) {
  const { progress } = load
  const at = progress.answered
  return progress.reach(() => progress.answered >= at + load.loops)
}

// Every front-end of `rig` takes writes again: /health 200.
async function healthy (rig) {
  let over = false
  const poll = async (fe) => {
    while (!over) {
      try {
        const r = await fetch(fe.url + '/health')
        await r.arrayBuffer()
        if (r.status === 200) return
      } catch {} // not listening yet
      await sleep(HEALTH_POLL_MS)
    }
  }
  try {
    await within(Promise.all(rig.fes.map(poll)), HEALTHY_WITHIN_MS,
      `the front-ends take writes within ${HEALTHY_WITHIN_MS} ms of the database's return`)
  } finally {
    over = true
  }
}

// The front-end `fe` stopped for PAUSE_MS, and until each loop has had a
// response since, then let go on.
async function pause (fe, load) {
  const answered = eachLoopAnswered(load)
  fe.child.kill('SIGSTOP')
  try {
    await sleep(PAUSE_MS)
    await answered
  } finally {
    fe.child.kill('SIGCONT')
  }
}

// The database stopped at once (`immediate`): in the long form for a
// drawn while; then until a request has been answered 503 since (the
// outage seen through the plugin); then started, and the front-ends
// waited for.
async function dbDown (rig, load) {
  const { progress } = load
  const at = progress.unavailable
  await rig.pg.stop('immediate')
  rig.dbDown = true
  try {
    if (LONG) await sleep(DB_DOWN_MS[0] + rand() * (DB_DOWN_MS[1] - DB_DOWN_MS[0]))
    await within(progress.reach(() => progress.unavailable > at), REFUSED_WITHIN_MS,
      `no request answered 503 in ${REFUSED_WITHIN_MS} ms of the database down`)
  } finally {
    await rig.pg.start()
    rig.dbDown = false
  }
  await healthy(rig)
}

// The next front-end in turn, for a fault of its own.
function victim (rig) {
  const fe = rig.fes[rig.victim]
  rig.victim = (rig.victim + 1) % rig.fes.length
  return fe
}

// The synchronous standby stopped (`immediate`) for a drawn while, the
// front-ends' writes stalling meanwhile (their reads go on); with `kill`,
// the next front-end SIGKILLed and started again halfway, its stalled
// commits left waiting in the database, which the new process's writes
// queue behind.  Then the standby started, the commits completed, and the
// front-ends waited for.
async function standbyDown (rig, kill) {
  const downMs = STANDBY_DOWN_MS[0] + rand() * (STANDBY_DOWN_MS[1] - STANDBY_DOWN_MS[0])
  await rig.standby.stop('immediate')
  try {
    await sleep(downMs / 2)
    if (kill) {
      const fe = victim(rig)
      await fe.stop('SIGKILL')
      await fe.start()
    }
    await sleep(downMs / 2)
  } finally {
    await rig.standby.start()
  }
  await healthy(rig)
}

// The primary SIGKILLed and its synchronous standby promoted; the
// front-ends, given both hosts with target_session_attrs=read-write, take
// writes again once they have found the new primary by themselves.  The
// old primary stays down (its directory is removed with the rig's).
async function failover (rig) {
  const old = rig.pg
  await old.kill()
  rig.old.push(old)
  await rig.standby.promote()
  rig.pg = rig.standby
  rig.standby = null
  await healthy(rig)
}

// The faults of a run in `mode` on a database of `topology`: '' (no
// standby), 'standby' (its stops) or 'failover'.
function kindsOf (mode, topology) {
  if (!LONG) return topology === 'failover' ? SHORT_FAILOVER_KINDS : SHORT_KINDS[mode]
  const cycle = topology === 'standby' ? STANDBY_KINDS : LONG_KINDS
  return Array.from({ length: LONG_FAULTS }, (_, n) => {
    if (n === LONG_FAULTS - 1) return 'kill'
    if (topology === 'failover' && n === FAILOVER_AT) return 'failover'
    return cycle[n % cycle.length]
  })
}

// Makes a fault of `kind` in `rig`: a front-end's, which hits the next in
// turn, or the database's; a kill that is the `last` fault leaves its
// front-end down as the service closes.
async function fault (rig, kind, load, last) {
  if (kind === 'db_restart') {
    await rig.pg.restart(rig.made.db_restart % 2 ? 'immediate' : 'fast')
    await healthy(rig)
  } else if (kind === 'db_down') {
    await dbDown(rig, load)
  } else if (kind.startsWith('standby_down')) {
    await standbyDown(rig, kind === 'standby_down_kill')
  } else if (kind === 'failover') {
    await failover(rig)
  } else if (kind === 'pause') {
    await pause(victim(rig), load)
  } else {
    const fe = victim(rig)
    await fe.stop('SIGKILL')
    await eachLoopAnswered(load)
    if (!last) await fe.start()
  }
  if (kind !== 'pause' && kind !== 'kill') await eachLoopAnswered(load)
  rig.made[kind]++
}

// The faults `kinds`, each once PAID_PER_ROUND responses were paid since the
// last: a kill, then the front-end started again on its port once each
// loop has had a response since; a stop (pause); the database stopped or
// restarted, its standby stopped, or a failover.  After each but the
// last, and but every other one of the long run (whose owed calls meet
// the next fault), waits for the calls owed meanwhile to land.  The last
// kill is not followed by a start: the service closes with that front-end
// down.
async function faults (rig, app, load, proxy, kinds) {
  const { progress } = load
  let longest = 0
  let db = false // a database fault since the last drain
  for (const [n, kind] of kinds.entries()) {
    await progress.reach(() => progress.paid >= PAID_PER_ROUND)
    const last = n === kinds.length - 1
    await fault(rig, kind, load, last)
    if (last) break
    db = db || DB_KINDS.includes(kind)
    if (!LONG || n % 2 === 0) {
      const start = performance.now()
      const ms = db ? DB_DRAIN_MS : DRAIN_MS
      assert.ok(await app.accman.drain(ms), `the owed calls land within ${ms} ms of fault ${n}`)
      longest = Math.max(longest, performance.now() - start)
      db = false
    }
    progress.paid = 0
  }
  return `${kinds.length} faults, the longest drain ${Math.round(longest)} ms, ` +
    `the proxy's connections ${JSON.stringify(proxy.stats)}`
}

async function frontEndsRun (t, rig, mode, which, topology) {
  const proxy = rig.proxies[which]
  const made = { ...rig.made }
  const sent = [...proxy.stats.sent]
  const kinds = kindsOf(mode, topology)
  await bankRun(t, mode, {
    name: `${mode}-${which}`,
    url: proxy.url,
    options: { timeoutMs: TIMEOUT_MS, ...(mode === 'reserve' ? { holdTtlS: HOLD_TTL_S } : {}) },
    topUps: true,
    faults: (app, load) => faults(rig, app, load, proxy, kinds),
    up: async () => {
      if (rig.dbDown) {
        await rig.pg.start()
        rig.dbDown = false
      }
      for (const fe of rig.fes) if (fe.child === null) await fe.start()
      await healthy(rig)
    }
  })
  // A real run: every fault made, both front-ends given connections.
  for (const kind of KINDS) {
    assert.equal(rig.made[kind] - made[kind], kinds.filter((k) => k === kind).length, kind)
  }
  assert.ok(proxy.stats.sent.every((s, n) => s > sent[n]), JSON.stringify(proxy.stats))
}

// [mode, proxy, topology]: through the proxy with no health check, on the
// shared database; in the short form, one failover; in the long form,
// through the health-checked proxy as well, and each mode with the
// standby's stops and with a failover.
const CASES = [['check', 'unchecked', ''], ['reserve', 'unchecked', '']].concat(LONG
  ? [['check', 'checked', ''], ['reserve', 'checked', ''],
      ['check', 'unchecked', 'standby'], ['reserve', 'unchecked', 'standby'],
      ['check', 'unchecked', 'failover'], ['reserve', 'unchecked', 'failover']]
  : [['reserve', 'unchecked', 'failover']])
const WHAT = {
  check: 'every charge once',
  reserve: 'every charge once, never overdrawn'
}
const TOPOLOGY = {
  '': '',
  standby: ', its synchronous standby stopped now and then',
  failover: ', the primary SIGKILLed and its synchronous standby promoted'
}

for (const [mode, proxy, topology] of CASES) {
  const kinds = kindsOf(mode, topology)
  const fes = kinds.includes('pause') ? 'killed and stopped in turn' : 'killed'
  const db = kinds.some((k) => k.startsWith('db_')) ? ', the database stopped' : ''
  test(`bank through two front-ends on PostgreSQL (${proxy} balancer), ${mode} mode: ` +
    `${fes}${db}${TOPOLOGY[topology]}; ${WHAT[mode]}`,
  { timeout: RUN_MS + (topology ? RIG_MS : 0) }, async (t) => {
    if (!topology) return await frontEndsRun(t, shared, mode, proxy, topology)
    const rig = await makeRig({ standby: true, proxies: [proxy] })
    try {
      await frontEndsRun(t, rig, mode, proxy, topology)
    } finally {
      await destroyRig(rig)
    }
  })
}
