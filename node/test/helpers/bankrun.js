'use strict'
// The bank checker's load through the calling side, for the bank tests,
// which bring the AccMan and its faults (bank.test.js: one AccMan,
// SIGKILLed; bank_pg.test.js: two front-ends on PostgreSQL behind a
// round-robin proxy): consumers send paid requests concurrently through a
// real fastify service with the plugin, every response recorded as its
// consumer got it; once the faults are done, the load has stopped and the
// service has closed (its owed calls drained), each account is reconciled
// from AccMan's history, the service's log and its stats (helpers/bank.js
// judges). ACCMAN_CRASH_LONG=1 asks the faults for many more rounds;
// ACCMAN_CRASH_SEED=N replays the same choice of requests (their timing is
// the machine's).

const crypto = require('node:crypto')
const assert = require('node:assert/strict')
const { Agent, fetch } = require('undici')
const { TOKENS } = require('./accman')
const { serviceApp } = require('./app')
const { judge } = require('./bank')
const { AccManClient, AccManError, limits } = require('../..')

const LONG = process.env.ACCMAN_CRASH_LONG === '1'
const SEED = Number(process.env.ACCMAN_CRASH_SEED || crypto.randomInt(2 ** 31))
const LOOPS_PER_ACCOUNT = 2 // requests of one account in flight at once
// Known fundings: the last account runs dry, for the 402s (and, in check
// mode, the overdraft that concurrent requests may make).
const FUNDINGS = [1000003, 1000019, 1000033, 61]
// What a consumer refused 402 adds to its account: about one request's
// worth, so that its balance is near nothing much of the time.
const TOP_UP = 10
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
    this.paid = 0 // 2xx with the balance header since the faults last reset it
    this.answered = 0
    this.unavailable = 0 // 503s: AccMan could not be reached
    this.waiting = []
  }

  note (status, accman) {
    this.answered++
    if (status === 200 && accman !== null) this.paid++
    if (status === 503) this.unavailable++
    this.waiting = this.waiting.filter((w) => !(w.ready() && (w.resolve(), true)))
  }

  reach (ready) {
    if (ready()) return Promise.resolve()
    return new Promise((resolve) => this.waiting.push({ ready, resolve }))
  }
}

// With `load.topUps`, an account refused 402 is topped up by the funder
// with a keyed mod, as the Python checker's consumers do, so that a poor
// account's balance rises as well as falls: a hold refused on it may meet
// a balance topped up meanwhile when an attempt of it still on its way
// arrives (errors.js, `definite`).  Its outcome need not be known now:
// every top-up that got no reply is sent again with its key once AccMan
// is back (`topUpsLand`), so that each lands once and the funding is known.
async function topUp (load, cred, id) {
  const top = { cred, key: `top-${id}`, landed: false }
  load.topUps.push(top)
  try {
    await load.mint.mod(cred, TOP_UP, { key: top.key })
    top.landed = true
  } catch (err) {
    if (!(err instanceof AccManError)) throw err
  }
}

async function topUpsLand (mint, topUps) {
  for (const top of topUps) if (!top.landed) await mint.mod(top.cred, TOP_UP, { key: top.key })
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
    if (status === 402 && load.topUps) await topUp(load, cred, id)
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

// Hooks before the plugin's that keep each request's id as the service saw
// it (x-bank id -> the plugin's request id), as its response ends or its
// connection closes (a consumer who left), before the plugin's own hooks
// end it.  A request refused at admission has none.
function ridsOf (rids) {
  const note = (request) => {
    const id = request.headers['x-bank']
    if (request.accman) rids.set(id, request.accman.rid)
    else if (!rids.has(id)) rids.set(id, null)
  }
  return (app) => {
    app.addHook('onRequest', async (request, reply) => { reply.raw.once('close', () => note(request)) })
    app.addHook('onResponse', async (request) => note(request))
  }
}

// One run in `mode`: the load through a service whose plugin's AccMan is
// at `rig.url` (with `rig.options`, the plugin's further options; with
// `rig.topUps`, the accounts refused 402 topped up; its accounts named
// after `rig.name`, or the mode: runs on one AccMan need names of their
// own), under
// `rig.faults(app, load)`, which returns once its last fault is made
// (AccMan may be down then, as the service closes) with a sentence of what
// it did; `rig.up()` brings AccMan back to read the histories.  Then every
// account is judged, and so is what the close told onUnpaid.
async function bankRun (t, mode, rig) {
  const mint = new AccManClient({ url: rig.url, token: TOKENS.mint })
  const holdReplies = new Map()
  const unrecord = recordHolds(holdReplies)
  const logs = []
  const unpaid = []
  const rids = new Map()
  try {
    const creds = FUNDINGS.map((_, i) => `bank-${rig.name ?? mode}-${i}`)
    for (const [i, cred] of creds.entries()) await mint.mod(cred, FUNDINGS[i])
    const { app, url } = await serviceApp({
      url: rig.url,
      token: TOKENS.service,
      mode,
      onUnpaid: (cred, amount) => { unpaid.push(amount) },
      ...rig.options
    }, { logs, before: ridsOf(rids) })
    const records = []
    // The consumers' connections, left open until the service has closed:
    // close() meets them as a service's close meets its consumers'.
    const load = {
      stop: false, progress: new Progress(), consumers: new Agent(), mint, loops: 0,
      topUps: rig.topUps ? [] : null
    }
    const loops = []
    let said = ''
    try {
      for (const [i, cred] of creds.entries()) {
        for (let j = 0; j < LOOPS_PER_ACCOUNT; j++) {
          loops.push(consume(url, cred, i * LOOPS_PER_ACCOUNT + j, load, records))
        }
      }
      load.loops = loops.length
      said = await rig.faults(app, load)
    } finally {
      load.stop = true
      await Promise.all(loops)
      // AccMan may be down: close() gives the owed calls CLOSE_DRAIN_MS,
      // then strands them, and the history is read once AccMan is back.
      await app.close()
      await load.consumers.destroy()
      await rig.up()
    }
    const topUps = load.topUps || []
    await topUpsLand(mint, topUps)
    for (const r of records) r.rid = rids.has(r.id) ? rids.get(r.id) : null
    const accounts = []
    for (const [i, cred] of creds.entries()) {
      const entries = await historyOf(mint, cred)
      const funding = FUNDINGS[i] + TOP_UP * topUps.filter((top) => top.cred === cred).length
      accounts.push({ cred, funding, entries, tot: await mint.tot(cred) })
    }
    const stats = app.accman.stats
    const unholds = owedUnholds(logs)
    const unapplied = refusedUnapplied(holdReplies)
    t.diagnostic(`${mode}: seed ${SEED}, ${said}, ${records.length} requests, ` +
      `${records.filter((r) => r.status === 200 && r.accman !== null).length} paid, ` +
      `${topUps.length} top-ups, ${stats.owed} owed, ${stats.stranded} stranded, ` +
      `releases of holds owed after ${JSON.stringify(countBy(unholds, (l) => l.after))}, ` +
      `${unapplied.size} holds refused before applying, ` +
      `statuses ${JSON.stringify(countBy(records, (r) => r.status))}`)
    assert.deepEqual(judge({
      mode, accounts, records, logs, stats, statuses: STATUSES, holds: holdReplies
    }), [])
    // A hold refused before it applied holds nothing: it owes no release.
    assert.deepEqual(unholds.filter((l) => unapplied.has(l.key)).map((l) => [l.key, l.after]), [])
    // What the close stranded as never landed is told to onUnpaid.
    assert.equal(unpaid.reduce((a, b) => a + b, 0n), BigInt(stats.unpaid_amount))
  } finally {
    unrecord()
    await mint.close()
  }
}

// AccMan's 503 codes that say a change was refused before it applied
// (errors.js, NotApplied).
const NOT_APPLIED_CODES = ['not_applied', 'busy', 'shutting_down']

// Records AccMan's replies to the plugin's holds at admission, attempt by
// attempt, in `replies` (key -> codes), as they come from the wire, before
// the client makes an error of them: a 503's `error` code, another reply's
// status, or the client's code for an attempt with no reply.  An owed
// release's repeats of a hold share its key: they follow.  Returns what
// undoes it.
function recordHolds (replies) {
  const attempt = AccManClient.prototype._attempt
  AccManClient.prototype._attempt = function (method, path) {
    const sent = attempt.call(this, method, path)
    const m = path.includes('/hold?') ? /[?&]key=([^&]+-h)(?:&|$)/.exec(path) : null
    if (m !== null) {
      const note = (code) => replies.set(m[1], [...(replies.get(m[1]) || []), code])
      sent.then(([status, text]) => note(status === 503 ? errorCode(text) : status),
        (err) => note(err.code))
    }
    return sent
  }
  return () => { AccManClient.prototype._attempt = attempt }
}

function errorCode (text) {
  try {
    return JSON.parse(text).error
  } catch {
    return 'not json'
  }
}

// The keys of the holds whose call at admission (its first attempt and the
// plugin's retries) was refused before applying at every attempt.  A
// release owed for one would repeat the hold with its key later.
function refusedUnapplied (replies) {
  const attempts = limits.PLUGIN_RETRIES_DEFAULT + 1
  const keys = new Set()
  for (const [key, codes] of replies) {
    const first = codes.slice(0, attempts)
    if (first.length === attempts && first.every((c) => NOT_APPLIED_CODES.includes(c))) keys.add(key)
  }
  return keys
}

// The log lines of the releases owed for a hold that failed at admission
// (a key of its own, `<rid>-h`, where a settle's release names its hold),
// each with the code of the failure it was owed `after`.
function owedUnholds (logs) {
  return logs.filter((l) => l.msg === 'accman: release queued to retry' && l.key.endsWith('-h'))
}

function countBy (list, f) {
  const out = {}
  for (const x of list) out[f(x)] = (out[f(x)] || 0) + 1
  return out
}

module.exports = { LONG, SEED, STATUSES, bankRun, random }
