'use strict'
// The bank checker through the calling side: consumers send paid requests
// concurrently through a real fastify service with the plugin, in check
// mode and in reserve mode, while its real AccMan is SIGKILLed and
// restarted on the same port and data directory.  Every response is
// recorded as its consumer got it; once the load has stopped and the
// service has closed (its owed calls drained), each account is reconciled
// from AccMan's history, the service's log and its stats
// (helpers/bank.js): every response served as paid is charged once,
// nothing is charged that no request may be charged for, what is owed or
// stranded is logged with its key and matches the history, and the
// balance is the funding less the charges (never below 0 in reserve mode).
// The faults follow the load's progress, never a clock: each kill comes
// once enough responses were paid since the last start, each restart once
// requests have met the outage.  ACCMAN_CRASH_LONG=1 runs many more rounds
// (`just crash-node`); ACCMAN_CRASH_SEED=N replays the same choice of
// requests (their timing is the machine's).

const test = require('node:test')
const assert = require('node:assert/strict')
const crypto = require('node:crypto')
const { AccManServer, TOKENS } = require('./helpers/accman')
const { serviceApp } = require('./helpers/app')
const { judge } = require('./helpers/bank')
const { fingerprint } = require('..')
const { AccManClient } = require('..')
const { Agent, fetch } = require('undici')

const LONG = process.env.ACCMAN_CRASH_LONG === '1'
const SEED = Number(process.env.ACCMAN_CRASH_SEED || crypto.randomInt(2 ** 31))
const KILLS = LONG ? 30 : 3 // the last one as the service closes
const PAID_PER_ROUND = LONG ? 400 : 40 // paid responses between two kills
// Long enough for an owed call's pause (OWED_PAUSE_MAX_MS at most) and its attempt.
const DRAIN_MS = 30000
const LOOPS_PER_ACCOUNT = 2 // requests of one account in flight at once
// Known fundings: the last account runs dry, for the 402s (and, in check
// mode, the overdraft that concurrent requests may make).
const FUNDINGS = [1000003, 1000019, 1000033, 61]
// The statuses a consumer may get: served (200), the /fail route (500),
// insufficient (402), AccMan unavailable (503).
const STATUSES = [200, 402, 500, 503, 'left']
// Consumers who leave before their response: one request in LEAVE_EVERY,
// within LEAVE_MS, about what admission and the handler take.
const LEAVE_EVERY = 10
const LEAVE_MS = 6

// A small seeded generator (mulberry32), so that a run's requests replay.
function random (seed) {
  let a = seed >>> 0
  return () => {
    a = (a + 0x6d2b79f5) >>> 0
    let t = Math.imul(a ^ (a >>> 15), 1 | a)
    t = (t + Math.imul(t ^ (t >>> 7), 61 | t)) ^ t
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296
  }
}

// A request of helpers/app.js's routes, with what it costs when served:
// /w 1, /pricey 5, /rows one per ten rows (estimate 10), /fail a 500.
function pick (rand) {
  const x = rand()
  if (x < 0.4) return { path: '/w', cost: 1 }
  if (x < 0.6) return { path: '/pricey', cost: 5 }
  if (x < 0.9) {
    const rows = Math.floor(rand() * 101)
    return { path: `/rows?rows=${rows}`, cost: Math.ceil(rows / 10) }
  }
  return { path: '/fail', cost: 0 }
}

// The load's progress, which the faults wait on: `reach(ready)` resolves
// once `ready()` is true after some response.
class Progress {
  constructor () {
    this.paid = 0 // 2xx with the balance header since the last start
    this.answered = 0
    this.waiting = []
  }

  note (status, accman) {
    this.answered++
    if (status === 200 && accman !== null) this.paid++
    this.waiting = this.waiting.filter((w) => !(w.ready() && (w.resolve(), true)))
  }

  reach (ready) {
    if (ready()) return Promise.resolve()
    return new Promise((resolve) => this.waiting.push({ ready, resolve }))
  }
}

// One consumer's loop: requests one after another until `load.stop`.  One
// in LEAVE_EVERY leaves within LEAVE_MS of asking (status 'left'): it may be
// charged or not (README "Modes": the charge is the response's start).
async function consume (url, cred, n, load, records) {
  const rand = random(SEED + n * 7919)
  for (let i = 0; !load.stop; i++) {
    const { path, cost } = pick(rand)
    const id = `${n}-${i}`
    const leave = rand() < 1 / LEAVE_EVERY ? new AbortController() : null
    let status = 0
    let accman = null
    let timer
    if (leave) timer = setTimeout(() => leave.abort(), Math.floor(rand() * LEAVE_MS))
    try {
      const r = await fetch(url + path, {
        headers: { accman: cred, 'x-bank': id }, signal: leave?.signal, dispatcher: load.consumers
      })
      await r.arrayBuffer()
      status = r.status
      accman = r.headers.get('accman')
    } catch (err) {
      if (leave?.signal.aborted) status = 'left'
      else accman = String(err.cause || err)
    }
    clearTimeout(timer)
    const served = status === 200 || status === 'left'
    records.push({ id, cred, path, status, accman, cost: served ? cost : 0, rid: null })
    load.progress.note(status, accman)
  }
}

// Kills AccMan with SIGKILL once PAID_PER_ROUND responses were paid since
// it started, and starts it again on its port and data directory once each
// loop has had a response since the kill; then, but every other round of
// the long run (whose owed calls meet the next kill), waits for the calls
// owed meanwhile to land.  The last kill is not followed by a start: the
// service closes with AccMan down, and strands what it still owes.
// Returns the kills made.
async function faults (server, app, load, loops) {
  const { progress } = load
  let kills = 0
  for (;;) {
    await progress.reach(() => progress.paid >= PAID_PER_ROUND)
    await server.stop('SIGKILL')
    kills++
    const at = progress.answered
    await progress.reach(() => progress.answered >= at + loops)
    if (kills === KILLS) return kills
    await server.start()
    if (!LONG || kills % 2 === 0) assert.ok(await app.accman.drain(DRAIN_MS), 'the owed calls land')
    progress.paid = 0
  }
}

// All of an account's history, newest first, page by page.
async function historyOf (client, cred) {
  const entries = []
  let before
  for (;;) {
    const page = await client.past(cred, { limit: 1000, ...(before === undefined ? {} : { before }) })
    entries.push(...page.past)
    if (page.next === null) return entries
    before = page.next
  }
}

async function bankRun (t, mode) {
  const server = new AccManServer()
  await server.start()
  const mint = new AccManClient({ url: server.url, token: TOKENS.mint })
  const logs = []
  const unpaid = []
  const rids = new Map() // x-bank id -> the plugin's request id, as the service saw it
  // Before the plugin: its request's state as its response ends or its
  // connection closes (a consumer who left), before the plugin's own hooks
  // end it.  A request refused at admission has none.
  const note = (request) => {
    const id = request.headers['x-bank']
    if (request.accman) rids.set(id, request.accman.rid)
    else if (!rids.has(id)) rids.set(id, null)
  }
  const before = (app) => {
    app.addHook('onRequest', async (request, reply) => { reply.raw.once('close', () => note(request)) })
    app.addHook('onResponse', async (request) => note(request))
  }
  try {
    const creds = FUNDINGS.map((_, i) => `bank-${mode}-${i}`)
    for (const [i, cred] of creds.entries()) await mint.mod(cred, FUNDINGS[i])
    const { app, url } = await serviceApp({
      url: server.url, token: TOKENS.service, mode, onUnpaid: (cred, amount) => { unpaid.push(amount) }
    }, { logs, before })
    const records = []
    // The consumers' connections, left open until the service has closed:
    // close() meets them as a service's close meets its consumers'.
    const load = { stop: false, progress: new Progress(), consumers: new Agent() }
    const loops = []
    let kills = 0
    try {
      for (const [i, cred] of creds.entries()) {
        for (let j = 0; j < LOOPS_PER_ACCOUNT; j++) {
          loops.push(consume(url, cred, i * LOOPS_PER_ACCOUNT + j, load, records))
        }
      }
      kills = await faults(server, app, load, loops.length)
    } finally {
      load.stop = true
      await Promise.all(loops)
      // AccMan is down: close() gives the owed calls CLOSE_DRAIN_MS, then
      // strands them, and the history is read once AccMan is back.
      await app.close()
      await load.consumers.destroy()
      if (server.child === null) await server.start()
    }
    for (const r of records) r.rid = rids.has(r.id) ? rids.get(r.id) : null
    const accounts = []
    for (const [i, cred] of creds.entries()) {
      const entries = await historyOf(mint, cred)
      accounts.push({ cred, funding: FUNDINGS[i], entries, tot: await mint.tot(cred) })
    }
    const stats = app.accman.stats
    t.diagnostic(`${mode}: seed ${SEED}, ${kills} kills, ${records.length} requests, ` +
      `${records.filter((r) => r.status === 200 && r.accman !== null).length} paid, ` +
      `${stats.owed} owed, ${stats.stranded} stranded, ` +
      `statuses ${JSON.stringify(countBy(records, (r) => r.status))}`)
    assert.equal(kills, KILLS)
    assert.deepEqual(judge({ mode, accounts, records, logs, stats, statuses: STATUSES }), [])
    // What the close stranded as never landed is told to onUnpaid.
    assert.equal(unpaid.reduce((a, b) => a + b, 0n), BigInt(stats.unpaid_amount))
  } finally {
    await mint.close()
    await server.close()
  }
}

function countBy (list, f) {
  const out = {}
  for (const x of list) out[f(x)] = (out[f(x)] || 0) + 1
  return out
}

const RUN_MS = LONG ? 3600000 : 60000

test('bank, check mode: AccMan SIGKILLed under paid requests; every charge once, none lost', { timeout: RUN_MS }, async (t) => {
  await bankRun(t, 'check')
})

test('bank, reserve mode: AccMan SIGKILLed under paid requests; every charge once, never overdrawn', { timeout: RUN_MS }, async (t) => {
  await bankRun(t, 'reserve')
})

// The checker itself, on a history made by hand: a correct one passes, and
// each kind of wrong it is there for is found.
function sample () {
  const cred = 'bank-sample'
  const entries = [
    { seq: 3, by: -1, tot: 94, at: 0, key: 'r3-c', hold: null },
    { seq: 2, by: -5, tot: 95, at: 0, key: 'r1-c', hold: null },
    { seq: 1, by: 100, tot: 100, at: 0, key: null, hold: null }
  ]
  const records = [
    { id: '1', cred, status: 200, accman: '95', cost: 5, rid: 'r1' },
    { id: '2', cred, status: 500, accman: '95', cost: 0, rid: 'r2' },
    { id: '3', cred, status: 200, accman: null, cost: 1, rid: 'r3' }
  ]
  const account = fingerprint(cred)
  const logs = [{ level: 40, msg: 'accman: charge queued to retry', account, key: 'r3-c', amount: '1' }]
  const stats = { owed: 1, stranded: 0, charged_amount: 6, unpaid_amount: 0 }
  const accounts = [{ cred, funding: 100, entries, tot: 94 }]
  return { mode: 'check', accounts, records, logs, stats, statuses: STATUSES }
}

test('the bank checker passes a correct history, and finds a doubled, lost or unsaid charge', () => {
  assert.deepEqual(judge(sample()), [])
  const found = (change) => {
    const s = sample()
    change(s)
    return judge(s).join('\n')
  }
  // A second charge of the paid request, under another key.
  assert.match(found((s) => {
    s.accounts[0].entries.unshift({ seq: 4, by: -5, tot: 89, at: 0, key: 'r9-c', hold: null })
    s.accounts[0].tot = 89
  }), /charge r9-c \(-5\) of no request/)
  // The paid request's charge lost.
  assert.match(found((s) => {
    s.accounts[0].entries.splice(1, 1)
    s.accounts[0].tot = 99
  }), /request 1 .*served as paid for 5, charged 0/)
  // A charge for a request that was not served.
  assert.match(found((s) => { s.records[0].status = 503 }), /request 1 .*not served, yet charged 5/)
  // Served without the header, with no owed call in the log.
  assert.match(found((s) => { s.logs = []; s.stats.owed = 0 }), /request 3 .*names no owed call/)
  // Stranded as never landed, yet in the history.
  assert.match(found((s) => {
    const msg = 'accman: stranded charge: the account owes 1'
    s.logs.push({ level: 50, msg, account: s.logs[0].account, key: 'r3-c', amount: '1' })
    s.stats.stranded = 1
    s.stats.unpaid_amount = 1
  }), /stranded as never landed, yet charged 1/)
  // A header that is not the balance its charge left; a balance that is not
  // the funding less the charges; stats that disagree with the history.
  assert.match(found((s) => { s.records[0].accman = '96' }), /not the balance its charge left/)
  assert.match(found((s) => { s.accounts[0].tot = 93 }), /balance 93, funding less charges/)
  assert.match(found((s) => { s.stats.charged_amount = 7 }), /stats.charged_amount 7/)
  // Overdrawn in reserve mode.
  assert.match(found((s) => {
    s.mode = 'reserve'
    s.accounts[0].entries[0].tot = -1
  }), /overdrawn in reserve mode/)
})
