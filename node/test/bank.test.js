'use strict'
// The bank checker through the calling side (helpers/bankrun.js: the load
// and the reconciliation): consumers send paid requests concurrently
// through a real fastify service with the plugin, in check mode and in
// reserve mode, while its real AccMan is SIGKILLed and restarted on the
// same port and data directory.  Every response served as paid is charged
// once, nothing is charged that no request may be charged for, what is
// owed or stranded is logged with its key and matches the history, and
// the balance is the funding less the charges (never below 0 in reserve
// mode).  The faults follow the load's progress, never a clock: each kill
// comes once enough responses were paid since the last start, each
// restart once requests have met the outage.  ACCMAN_CRASH_LONG=1 runs
// many more rounds (`just crash-node`); ACCMAN_CRASH_SEED=N replays the
// same choice of requests (their timing is the machine's).

const test = require('node:test')
const assert = require('node:assert/strict')
const { AccManServer } = require('./helpers/accman')
const { judge } = require('./helpers/bank')
const { LONG, STATUSES, bankRun } = require('./helpers/bankrun')
const { fingerprint } = require('..')

const KILLS = LONG ? 30 : 3 // the last one as the service closes
const PAID_PER_ROUND = LONG ? 400 : 40 // paid responses between two kills
// Long enough for an owed call's pause (OWED_PAUSE_MAX_MS at most) and its attempt.
const DRAIN_MS = 30000

// Kills AccMan with SIGKILL once PAID_PER_ROUND responses were paid since
// it started, and starts it again on its port and data directory once each
// loop has had a response since the kill; then, but every other round of
// the long run (whose owed calls meet the next kill), waits for the calls
// owed meanwhile to land.  The last kill is not followed by a start: the
// service closes with AccMan down, and strands what it still owes.
// Returns the kills made.
async function faults (server, app, load) {
  const { progress } = load
  let kills = 0
  for (;;) {
    await progress.reach(() => progress.paid >= PAID_PER_ROUND)
    await server.stop('SIGKILL')
    kills++
    const at = progress.answered
    await progress.reach(() => progress.answered >= at + load.loops)
    if (kills === KILLS) return kills
    await server.start()
    if (!LONG || kills % 2 === 0) assert.ok(await app.accman.drain(DRAIN_MS), 'the owed calls land')
    progress.paid = 0
  }
}

async function killRun (t, mode) {
  const server = new AccManServer()
  await server.start()
  let kills = 0
  try {
    await bankRun(t, mode, {
      url: server.url,
      options: {},
      faults: async (app, load) => {
        kills = await faults(server, app, load)
        return `${kills} kills`
      },
      up: async () => { if (server.child === null) await server.start() }
    })
    assert.equal(kills, KILLS)
  } finally {
    await server.close()
  }
}

const RUN_MS = LONG ? 3600000 : 60000

test('bank, check mode: AccMan SIGKILLed under paid requests; every charge once, none lost', { timeout: RUN_MS }, async (t) => {
  await killRun(t, 'check')
})

test('bank, reserve mode: AccMan SIGKILLed under paid requests; every charge once, never overdrawn', { timeout: RUN_MS }, async (t) => {
  await killRun(t, 'reserve')
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
  // A top-up (helpers/bankrun.js) is funding: one the funder counted
  // passes, one it did not (sent twice, applied twice) is found.
  const topUp = (s) => {
    s.accounts[0].entries.unshift({ seq: 4, by: 50, tot: 144, at: 0, key: 'top-1-7', hold: null })
    s.accounts[0].tot = 144
  }
  const toppedUp = sample()
  topUp(toppedUp)
  toppedUp.accounts[0].funding = 150
  assert.deepEqual(judge(toppedUp), [])
  assert.match(found(topUp), /funded 100, the history says 150/)
  // Overdrawn in reserve mode.
  assert.match(found((s) => {
    s.mode = 'reserve'
    s.accounts[0].entries[0].tot = -1
  }), /overdrawn in reserve mode/)
  // But for the charge of a hold that expired first (a keyed mod without
  // min, README "Modes"), which may take the balance under 0: request 3's
  // hold expires, request 1 holds all that is left and uses it, and then
  // request 3's charge comes.
  const expired = sample()
  expired.mode = 'reserve'
  expired.accounts[0] = {
    cred: 'bank-sample',
    funding: 5,
    entries: [
      { seq: 6, by: -1, tot: -1, at: 0, key: 'r3-c', hold: null },
      { seq: 5, by: 0, tot: 0, at: 0, key: null, hold: 4 }, // settled, all of it used
      { seq: 4, by: -5, tot: 0, at: 0, key: 'r1-h', hold: 4 },
      { seq: 3, by: 1, tot: 5, at: 0, key: null, hold: 2 }, // expired, all of it back
      { seq: 2, by: -1, tot: 4, at: 0, key: 'r3-h', hold: 2 },
      { seq: 1, by: 5, tot: 5, at: 0, key: null, hold: null }
    ],
    tot: -1
  }
  expired.records[0].accman = '0'
  assert.deepEqual(judge(expired), [])
  // That charge excuses itself alone: a hold (min 0) that takes the
  // balance further under 0 after it is still an overdraft.
  expired.accounts[0].entries.unshift({ seq: 7, by: -5, tot: -6, at: 0, key: 'r1-h', hold: 7 })
  assert.match(judge(expired).join('\n'), /overdrawn in reserve mode: .*"key":"r1-h"/)
})

// A hold of unknown outcome whose owed release found nothing held (its
// repeat refused on the balance) may still apply later, from an attempt a
// stalled front-end kept: it returns at its expiry, never charged (README
// "Failures"), and a history read before then shows it open.
test('the bank checker lets a hold that applied late stay open, and finds one the plugin knew of', () => {
  // Request 4's hold, open; its attempts met `codes`; with `queued`, the
  // log queued its release.
  const openHold = (codes, queued = true) => {
    const s = sample()
    s.mode = 'reserve'
    s.accounts[0].entries.unshift({ seq: 4, by: -5, tot: 89, at: 0, key: 'r4-h', hold: 4 })
    s.accounts[0].tot = 89
    s.records.push({ id: '4', cred: 'bank-sample', status: 'left', accman: null, cost: 5, rid: 'r4' })
    if (queued) {
      s.logs.push({ level: 40, msg: 'accman: release queued to retry', account: s.logs[0].account, key: 'r4-h', amount: '5' })
      s.stats.owed = 2
    }
    s.holds = new Map([['r4-h', codes]])
    return judge(s).join('\n')
  }
  // Its attempt at admission got no reply; the release's repeat was
  // refused insufficient (409): no attempt told the plugin of a hold.
  assert.equal(openHold(['timeout', 409]), '')
  assert.equal(openHold(['outcome_unknown', 409, 409]), '')
  // An attempt answered 200: the plugin knew the hold, and had to end it.
  assert.match(openHold(['timeout', 200]), /request 4 \(left, ACCMAN null\): a hold of 5 never ended/)
  // Every attempt answered: none was left on its way.
  assert.match(openHold([409, 409]), /a hold of 5 never ended/)
  // No release queued: the plugin lost a hold whose outcome it did not know.
  assert.match(openHold(['timeout', 409], false), /a hold of 5 never ended/)
})

// Each entry's tot is the one before it plus its by, from 0: a history
// whose tot does not follow is found, by that rule alone (no header or
// balance reads the tots planted here).
test('the bank checker finds a tot that does not follow from the history\'s bys', () => {
  const at = 'account bank-sample: a tot that does not follow from the bys'
  const planted = (seq, tot) => {
    const s = sample()
    s.accounts[0].entries.find((e) => e.seq === seq).tot = tot
    return judge(s)
  }
  assert.deepEqual(planted(3, 93),
    [`${at}: entry 3 (by -1) has tot 93, the tot before it plus its by is 94`])
  assert.deepEqual(planted(1, 101),
    [`${at}: entry 1 (by 100) has tot 101, the tot before it plus its by is 100`])
})
