'use strict'
// Log lines that every refused request would say (src/repeats.js).

const test = require('node:test')
const assert = require('node:assert/strict')
const { Repeats, REPEAT_MS, LINES_MAX } = require('../src/repeats')
const { TOKENS } = require('./helpers/accman')
const { serviceApp, get } = require('./helpers/app')
const { fakeAccMan, reply } = require('./helpers/fake')
const { fingerprint } = require('..')

test('a line every request meets is said at most once a REPEAT_MS, with its count', () => {
  const said = []
  const log = { warn: (f, t) => said.push(['warn', f, t]), error: (f, t) => said.push(['error', f, t]) }
  let now = 100000
  const repeats = new Repeats(log, () => now)
  for (let i = 0; i <= 3000; i++) { // refused requests for 30 s, 100 a second
    repeats.say('warn', { code: 'unreachable' }, 'accman: AccMan unavailable; refusing with 503')
    now += 10
  }
  repeats.say('error', { status: 401, code: 'unauthorized' }, 'accman: AccMan refused the service')
  assert.equal(said.length, 1 + 30000 / REPEAT_MS + 1)
  assert.deepEqual(said[0], ['warn', { code: 'unreachable' }, 'accman: AccMan unavailable; refusing with 503'])
  assert.deepEqual(said[1], ['warn', { code: 'unreachable', repeated: 999, seconds: 10 },
    'accman: AccMan unavailable; refusing with 503'])
  assert.equal(said[said.length - 1][0], 'error')
})

test('a line that stopped and comes back is said at once, with its last spell\'s count', () => {
  const said = []
  let now = 0
  const repeats = new Repeats({ warn: (f, t) => said.push([f, t]) }, () => now)
  for (let i = 0; i < 5; i++) { repeats.say('warn', {}, 'down'); now += 1000 }
  now += 3600000
  repeats.say('warn', {}, 'down')
  assert.deepEqual(said, [[{}, 'down'], [{ repeatedBefore: 4, seconds: 4 }, 'down']])
})

test('what AccMan said is logged but does not make a new line', () => {
  const lines = []
  const log = { error: (fields, text) => lines.push([fields, text]) }
  let t = 0
  const repeats = new Repeats(log, () => t)
  for (let i = 0; i < 1000; i++) {
    repeats.say('error', { status: 404 }, 'refused', { detail: `quoted request ${i}` })
    t += 1
  }
  assert.deepEqual(lines, [[{ status: 404, detail: 'quoted request 0' }, 'refused']])
  assert.equal(repeats.said.size, 1)
})

test('the lines kept are bounded, the one met longest ago forgotten', () => {
  // A foreign server at a wrong URL may answer a new error code each time.
  const said = []
  let now = 0
  const repeats = new Repeats({ warn: (f, t) => said.push(f.code) }, () => now)
  for (let i = 0; i < 10 * LINES_MAX; i++) {
    repeats.say('warn', { code: 'steady' }, 'refused') // met every time: kept
    repeats.say('warn', { code: `code_${i}` }, 'refused')
    now += 1
    assert.ok(repeats.said.size <= LINES_MAX)
  }
  assert.equal(said.filter((c) => c === 'steady').length, 1)
  assert.equal(said.length, 1 + 10 * LINES_MAX)
  repeats.say('warn', { code: `code_${10 * LINES_MAX - 1}` }, 'refused') // kept: not said
  repeats.say('warn', { code: 'code_0' }, 'refused') // forgotten: said again
  assert.deepEqual(said.slice(1 + 10 * LINES_MAX), ['code_0'])
})

test('a forgotten line says the repeats it had not said, once, at its level', () => {
  // Forgotten past LINES_MAX, a line would take its count with it.
  const said = []
  const log = { warn: (f, t) => said.push(['warn', f, t]), error: (f, t) => said.push(['error', f, t]) }
  let now = 0
  const repeats = new Repeats(log, () => now)
  for (let i = 0; i < 8; i++) { // said once, then 7 more in 3.5 s
    repeats.say('error', { status: 404, code: 'a' }, 'refused', { detail: `quoted ${i}` })
    now += 500
  }
  repeats.say('warn', { code: 'b' }, 'refused') // said once, no repeats
  for (let i = 0; i < LINES_MAX; i++) { // new codes push both out
    repeats.say('warn', { code: `code_${i}` }, 'refused')
    now += 1
  }
  const forgotten = said.filter(([, f]) => f.forgotten)
  assert.deepEqual(forgotten, [['error', { status: 404, code: 'a', repeated: 7, seconds: 4, forgotten: true }, 'refused']])
  assert.equal(said.length, 2 + LINES_MAX + 1) // b had nothing more to say
  assert.equal(repeats.said.size, LINES_MAX)
})

test('a spell that ends says its unsaid count once the line is quiet for REPEAT_MS, once', () => {
  // 999 refusals in 5 s, then the outage ends: the line never comes again.
  const said = []
  let now = 100000
  const repeats = new Repeats({ warn: (f, t) => said.push([f, t]) }, () => now)
  for (let i = 0; i < 999; i++) { repeats.say('warn', {}, 'down'); now += 5000 / 998 }
  assert.equal(repeats.timer.hasRef(), false) // a count to say never keeps the process alive
  now += REPEAT_MS - 5000 / 998 - 10 // not yet quiet for REPEAT_MS
  repeats.flush()
  assert.deepEqual(said, [[{}, 'down']])
  now += 10
  repeats.flush()
  repeats.flush()
  assert.deepEqual(said, [[{}, 'down'], [{ repeated: 998, seconds: 5, quiet: true }, 'down']])
  now += 3600000
  repeats.say('warn', {}, 'down') // nothing left to say before it
  repeats.close()
  assert.deepEqual(said.slice(2), [[{}, 'down']])
  assert.equal(repeats.timer, null)
})

test('the timer is armed only while a count is unsaid, and none is left at close', (t) => {
  t.mock.timers.enable({ apis: ['setTimeout'] })
  const said = []
  let now = 100000
  const repeats = new Repeats({ warn: (f, t) => said.push([f, t]), error: (f, t) => said.push([f, t]) }, () => now)
  const tick = (ms) => { now += ms; t.mock.timers.tick(ms) }
  repeats.say('warn', {}, 'down')
  assert.equal(repeats.timer, null) // nothing unsaid
  repeats.say('warn', {}, 'down')
  const timer = repeats.timer
  assert.notEqual(timer, null)
  tick(2000)
  repeats.say('warn', {}, 'down')
  assert.equal(repeats.timer, timer) // one timer, however many repeats
  tick(REPEAT_MS - 2000) // it runs: the line was met 8 s ago, so it waits 2 s more
  assert.equal(said.length, 1)
  assert.notEqual(repeats.timer, null)
  tick(2000)
  assert.deepEqual(said[1], [{ repeated: 2, seconds: 2, quiet: true }, 'down'])
  assert.equal(repeats.timer, null) // all said: no timer
  repeats.say('error', { code: 'x' }, 'refused')
  repeats.say('error', { code: 'x' }, 'refused')
  repeats.close()
  assert.deepEqual(said.slice(2), [[{ code: 'x' }, 'refused'], [{ code: 'x', repeated: 1, seconds: 0, quiet: true }, 'refused']])
  assert.equal(repeats.timer, null)
  tick(10 * REPEAT_MS)
  assert.equal(said.length, 4)
})

test('the plugin says an outage\'s unsaid count at close', async () => {
  // Refusals that stop before REPEAT_MS: at close, their count is said.
  const logs = []
  const dead = 'http://127.0.0.1:9' // discard port: nothing listens
  const { app, url } = await serviceApp({ url: dead, token: TOKENS.service, retries: 0 }, { logs })
  for (let i = 0; i < 5; i++) assert.equal((await get(url + '/w', 'r-down')).status, 503)
  await app.close()
  const lines = logs.filter((l) => l.msg === 'accman: AccMan unavailable; refusing with 503')
  assert.deepEqual(lines.map((l) => [l.code, l.repeated, l.quiet]),
    [['unreachable', undefined, undefined], ['unreachable', 4, true]])
  // The spell's first line says why, in the client's words.
  assert.match(lines[0].detail, /^cannot reach AccMan at http:\/\/127\.0\.0\.1:9: .*ECONNREFUSED/)
})

test('the plugin says a 429 of too many holds and a cost over its hold once a spell, not once a request', async () => {
  // Every request of a consumer at its bound of holds meets the 429, and
  // every request of a route whose cost passes its estimate the cap: each
  // line is said when it starts, with the account or the amounts, then its
  // count (at close here), known by its text alone.
  let full = true
  const fake = await fakeAccMan((head) => {
    if (head.startsWith('PATCH /hold') && full) {
      return reply(409, '{"error":"too_many_holds","detail":"the account has HOLDS_PER_ACCOUNT_MAX (4096) open holds"}')
    }
    if (head.startsWith('PATCH /hold')) return reply(200, '{"hold":7,"tot":99,"seq":2}')
    return reply(200, '{"tot":98,"seq":3}') // the settle
  })
  const logs = []
  const cost = (request, reply, stage) => stage === 'estimate' ? 1 : 5
  const { app, url } = await serviceApp({ url: fake.url, mode: 'reserve', cost }, { logs })
  try {
    for (let i = 0; i < 20; i++) assert.equal((await get(url + '/w', 'r-many')).status, 429)
    full = false
    for (let i = 0; i < 20; i++) assert.equal((await get(url + '/w', 'r-many')).status, 200)
    assert.equal(app.accman.stats.refused_too_many, 20)
    assert.equal(app.accman.stats.capped, 20)
  } finally {
    await app.close()
    await fake.close()
  }
  const tooMany = logs.filter((l) => l.msg === 'accman: too many holds open; refusing with 429')
  assert.deepEqual(tooMany.map((l) => [l.account, l.detail, l.repeated, l.quiet]), [
    [fingerprint('r-many'), 'the account has HOLDS_PER_ACCOUNT_MAX (4096) open holds', undefined, undefined],
    [undefined, undefined, 19, true]])
  const capped = logs.filter((l) => l.msg === 'accman: cost over the hold: charged the hold')
  assert.deepEqual(capped.map((l) => [l.cost, l.held, l.repeated, l.quiet]),
    [['5', '1', undefined, undefined], [undefined, undefined, 19, true]])
})
