'use strict'
// Holds (SPEC "Holds"): the client's hold and settle, and the plugin's
// reserve mode.  They need AccMan's PATCH /hold and /settle; until the
// server has them, every test here fails (with UnexpectedReply 404
// not_found from /hold): they are not skipped.

const test = require('node:test')
const assert = require('node:assert/strict')
const Fastify = require('fastify')
const accman = require('..')
const E = require('../src/errors')
const { TOKENS, sharedAccMan } = require('./helpers/accman')
const { serviceApp, get, sleep, messages, until } = require('./helpers/app')
const { proxyTo } = require('./helpers/proxy')
const { fakeAccMan, reply } = require('./helpers/fake')

const acc = sharedAccMan(test, { service: true })

async function withReserve (options, fn, logs) {
  const { app, url } = await serviceApp({ url: acc.server.url, token: TOKENS.service, mode: 'reserve', ...options }, { logs })
  try {
    await fn(url, app)
  } finally {
    await app.close()
  }
}

test('client: a hold takes the amount at once; a settle spends part and returns the rest', async () => {
  await acc.mint.mod('h-client', 100)
  const h = await acc.service.hold('h-client', -30, { ttlS: 60, key: 'hk' })
  assert.equal(h.tot, 70)
  assert.equal(await acc.service.tot('h-client'), 70)
  assert.deepEqual(await acc.service.hold('h-client', -30, { ttlS: 60, key: 'hk' }), h) // keyed: once
  const s = await acc.service.settle('h-client', h.hold, 12)
  assert.equal(s.tot, 88)
  assert.deepEqual(await acc.service.settle('h-client', h.hold, 12), s) // the first reply again
  await assert.rejects(acc.service.settle('h-client', h.hold, 5), E.HoldEnded)
  await assert.rejects(acc.service.settle('h-client', 999999, 0), E.NoHold)
  await assert.rejects(acc.service.hold('h-client', -1000, { ttlS: 60 }), (e) => e instanceof E.Insufficient && e.tot === 88)
  await assert.rejects(acc.service.hold('h-nobody', -1, { ttlS: 60 }), E.NoAccount)
  const entries = (await acc.service.past('h-client')).past
  assert.deepEqual(entries.slice(0, 2).map((e) => [e.by, e.hold]), [[18, h.hold], [-30, h.hold]])
})

test('reserve: the hold is settled at the cost and the header is the balance after it', async () => {
  await acc.mint.mod('h-paid', 100)
  await withReserve({}, async (url) => {
    const r = await get(url + '/rows?rows=25', 'h-paid') // holds 10, costs 3
    assert.deepEqual([r.status, r.accman], [200, '97'])
  })
  const past = (await acc.service.past('h-paid')).past
  assert.deepEqual(past.slice(0, 2).map((e) => e.by), [7, -10])
  assert.match(past[1].key, /^[0-9a-f]{24}[0-9a-f]+-h$/)
})

test('reserve: concurrent requests never overdraw: exactly N of M succeed on a balance of N', async () => {
  const N = 20
  const M = 60
  await acc.mint.mod('h-race', N)
  await withReserve({}, async (url) => {
    const results = await Promise.all(Array.from({ length: M }, () => get(url + '/slow?ms=50', 'h-race')))
    const statuses = results.map((r) => r.status)
    assert.equal(statuses.filter((s) => s === 200).length, N)
    assert.equal(statuses.filter((s) => s === 402).length, M - N)
    for (const r of results.filter((r) => r.status === 200)) assert.ok(Number(r.accman) >= 0)
  })
  assert.equal(await acc.service.tot('h-race'), 0)
})

test('reserve: 402 with the balance when the hold does not fit; 401 for an unknown account', async () => {
  await acc.mint.mod('h-poor', 4)
  await withReserve({}, async (url) => {
    const r = await get(url + '/pricey', 'h-poor')
    assert.deepEqual([r.status, r.accman, r.body.tot, r.body.cost], [402, '4', 4, 5])
    const u = await get(url + '/w', 'h-nobody')
    assert.deepEqual([u.status, u.body.error], [401, 'no_account'])
  })
})

test('reserve: a hold that meets 409 overflow (a balance at INT64_MIN) is 402 with the balance, nothing held or logged', async () => {
  const big = new accman.AccManClient({ url: acc.server.url, token: TOKENS.service, bigint: true })
  const logs = []
  try {
    await acc.mint.mod('h-int64-min', 1)
    await big.mod('h-int64-min', -9223372036854775807n)
    await big.mod('h-int64-min', -2n) // -2^63: a hold of the estimate leaves the range
    await withReserve({}, async (url, app) => {
      const r = await get(url + '/w', 'h-int64-min')
      assert.deepEqual([r.status, r.body.error, r.accman], [402, 'insufficient', '-9223372036854775808'])
      assert.equal(app.served, 0)
    }, logs)
    assert.deepEqual(logs.filter((l) => l.level >= 40), [])
    const { past } = await big.past('h-int64-min')
    assert.deepEqual(past.map((e) => e.by), [-2n, -9223372036854775807n, 1n]) // nothing held
  } finally {
    await big.close()
  }
})

test('reserve: an error response or a thrown handler releases the hold', async () => {
  await acc.mint.mod('h-fail', 10)
  await withReserve({}, async (url) => {
    assert.deepEqual(Object.values(await get(url + '/fail', 'h-fail')).slice(0, 2), [500, '10'])
    assert.deepEqual(Object.values(await get(url + '/throw', 'h-fail')).slice(0, 2), [500, '10'])
  })
  assert.equal(await acc.service.tot('h-fail'), 10)
})

// The handler waits on its gate, so the release is seen before the
// handler ends however slow the machine, and the handler's end after it.
test('reserve: a consumer that leaves gets the hold back at once, before the handler ends', async () => {
  await acc.mint.mod('h-abort', 10)
  await withReserve({}, async (url, app) => {
    const ac = new AbortController()
    const pending = fetch(url + '/gated', { headers: { accman: 'h-abort' }, signal: ac.signal }).catch((e) => e.name)
    await until(() => app.served === 1) // admitted: held
    assert.equal(await acc.service.tot('h-abort'), 9)
    ac.abort()
    assert.equal(await pending, 'AbortError')
    await until(async () => await acc.service.tot('h-abort') === 10, 5000).catch(() => {})
    assert.equal(await acc.service.tot('h-abort'), 10) // released while the handler still waits
    app.openGate()
    await until(() => app.gatesPassed === 1)
  })
  assert.equal(await acc.service.tot('h-abort'), 10)
})

test('reserve: a consumer that leaves after sending a body gets the hold back at once', async () => {
  await acc.mint.mod('h-abort-post', 10)
  await withReserve({}, async (url, app) => {
    const ac = new AbortController()
    const pending = fetch(url + '/gated', {
      method: 'POST', body: '{"a":1}', headers: { accman: 'h-abort-post', 'content-type': 'application/json' }, signal: ac.signal
    }).catch((e) => e.name)
    await until(() => app.served === 1) // admitted, and the body read: held
    assert.equal(await acc.service.tot('h-abort-post'), 9)
    ac.abort()
    assert.equal(await pending, 'AbortError')
    await until(async () => await acc.service.tot('h-abort-post') === 10, 5000).catch(() => {})
    assert.equal(await acc.service.tot('h-abort-post'), 10) // released while the handler still waits
    app.openGate()
    await until(() => app.gatesPassed === 1)
  })
  assert.equal(await acc.service.tot('h-abort-post'), 10) // and not charged when it ends
})

test('reserve: a cost over the hold is capped at the hold', async () => {
  await acc.mint.mod('h-cap', 100)
  await withReserve({}, async (url, app) => {
    const r = await get(url + '/rows?rows=500', 'h-cap') // 50 asked, 10 held
    assert.deepEqual([r.status, r.accman], [200, '90'])
    assert.equal(app.accman.stats.capped, 1)
  })
})

test('reserve: an estimate of 0 holds nothing; a cost over it is capped at 0, counted and said', async () => {
  await acc.mint.mod('h-cap0', 100)
  const logs = []
  await withReserve({ cost: (request, reply, stage) => stage === 'estimate' ? 0 : 5 }, async (url, app) => {
    const r = await get(url + '/w', 'h-cap0')
    assert.deepEqual([r.status, r.accman], [200, '100'])
    assert.equal(app.accman.stats.capped, 1)
    assert.ok(messages(logs, 40).includes('accman: cost over the hold: charged the hold'))
  }, logs)
  assert.equal(await acc.mint.tot('h-cap0'), 100)
})

// stats.expired counts it, as the Python middleware's does.
test('reserve: a hold that expired before the response is charged as a keyed mod', async () => {
  await acc.mint.mod('h-expire', 10)
  const logs = []
  await withReserve({ holdTtlS: 1 }, async (url, app) => {
    const r = await get(url + '/slow?ms=3000', 'h-expire')
    assert.deepEqual([r.status, r.accman], [200, '9'])
    assert.deepEqual([app.accman.stats.expired, app.accman.stats.charged], [1, 1])
    assert.match(app.accman.metrics(), /^accman_plugin_expired_total 1$/m)
  }, logs)
  // Said as the Python middleware says it: the hold, why, the use, the key.
  const [key] = (await acc.mint.past('h-expire')).past.filter((e) => e.by === -1).map((e) => e.key)
  assert.ok(messages(logs, 40).some((m) => new RegExp('^accman: hold \\d+ expired before the response ' +
    '\\(the handler ran past holdTtlS=1 s\\): charging 1 as a mod, key ' + key + '$').test(m)), messages(logs, 40).join('\n'))
  assert.equal(await acc.service.tot('h-expire'), 9)
})

// A free response has nothing to charge after its hold expired: not
// counted in stats.expired, as on the Python side; its status counted.
test('reserve: a free response after its hold expired carries no balance header, never a wrong one', async () => {
  await acc.mint.mod('h-expire-free', 10)
  await withReserve({ holdTtlS: 1 }, async (url, app) => {
    const r = await get(url + '/slowfail?ms=3000', 'h-expire-free')
    // The 10 came back at the expiry: 9, the balance left after the hold,
    // is not the balance.  As the Python middleware: no header.
    assert.deepEqual([r.status, r.accman], [500, null])
    assert.deepEqual([app.accman.stats.expired, app.accman.stats.free_status], [0, 1])
  })
  assert.equal(await acc.service.tot('h-expire-free'), 10)
})

test('reserve: AccMan unreachable is a 503 with nothing held', async () => {
  await acc.mint.mod('h-down', 10)
  await withReserve({}, async (url) => {
    await acc.server.stop()
    const r = await get(url + '/w', 'h-down')
    assert.equal(r.status, 503)
    await acc.server.start()
  })
  assert.equal(await acc.service.tot('h-down'), 10)
})

// A hold refused by AccMan's plain 503 (a commit that failed: it may have
// applied) owes a release: the hold repeated with its key, then settled
// with use 0; one refused 503 not_applied (the store takes no writes now:
// nothing applied) holds nothing and owes none.  Against a fake AccMan,
// which answers the first hold with the 503 and the rest as AccMan would.
for (const [code, owed] of [['unavailable', true], ['not_applied', false]]) {
  test(`reserve: a hold refused 503 ${code} is a 503 that ${owed ? 'owes' : 'owes no'} release`, async () => {
    let refused = false
    const fake = await fakeAccMan((head) => {
      if (head.startsWith('PATCH /hold?') && !refused) {
        refused = true
        return reply(503, `{"error":"${code}","detail":"the store cannot commit"}`)
      }
      if (head.startsWith('PATCH /hold?')) return reply(200, '{"hold":7,"tot":9,"seq":2}')
      return reply(200, '{"tot":10,"seq":3}') // the settle
    })
    const logs = []
    const { app, url } = await serviceApp({ url: fake.url, mode: 'reserve', retries: 0 }, { logs })
    try {
      const r = await get(url + '/w', 'h-refused')
      assert.deepEqual([r.status, r.body.error], [503, 'unavailable'])
      assert.ok(await app.accman.drain(10000))
      assert.deepEqual([app.accman.stats.owed, app.accman.stats.stranded], [owed ? 1 : 0, 0])
    } finally {
      await app.close()
      await fake.close()
    }
    const calls = fake.heads.map((h) => h.split(' ')[1].split('?')[0])
    assert.deepEqual(calls, owed ? ['/hold', '/hold', '/settle'] : ['/hold'])
    const queued = messages(logs, 40).filter((m) => m.includes('queued'))
    assert.deepEqual(queued, owed ? ['accman: release queued to retry'] : [])
  })
}

// A hold refused 409 overflow applied nothing; when the balance cannot be
// read then either, the request meets an outage with nothing held: 503,
// or served unpaid in open mode, and no release owed (as the Python
// middleware, tests/test_asgi_reserve.py).
for (const open of [false, true]) {
  test(`reserve: a hold refused for overflow whose balance cannot be read is ${open ? 'served unpaid' : 'a 503'}, no release owed`, async () => {
    const fake = await fakeAccMan((head) => {
      if (head.startsWith('PATCH /hold?')) return reply(409, '{"error":"overflow","detail":"out of int64"}')
      return reply(503, '{"error":"unavailable","detail":"down"}') // the tot
    })
    const { app, url } = await serviceApp({
      url: fake.url, mode: 'reserve', retries: 0, onUnavailable: open ? 'open' : 'closed'
    })
    try {
      const r = await get(url + '/w', 'h-overflow')
      assert.equal(r.status, open ? 200 : 503)
      assert.ok(await app.accman.drain(10000))
      assert.equal(app.accman.stats.owed, 0)
    } finally {
      await app.close()
      await fake.close()
    }
    const calls = fake.heads.map((h) => h.split(' ')[0] + ' ' + h.split(' ')[1].split('?')[0])
    assert.deepEqual(calls, ['PATCH /hold', 'GET /tot'])
  })
}

// The plugin's retry of a hold answered by a failed commit (it may have
// applied) and then refused 503 not_applied says nothing of the first
// attempt: the release is still owed, after the first attempt's code.
test('reserve: a hold answered unavailable, then refused not_applied on its retry, owes its release', async () => {
  const holds = [[503, '{"error":"unavailable","detail":"the commit failed"}'],
    [503, '{"error":"not_applied","detail":"the store takes no writes"}']]
  const fake = await fakeAccMan((head) => {
    if (head.startsWith('PATCH /hold?')) {
      return holds.length ? reply(...holds.shift()) : reply(200, '{"hold":7,"tot":9,"seq":2}')
    }
    return reply(200, '{"tot":10,"seq":3}') // the settle
  })
  const logs = []
  const { app, url } = await serviceApp({ url: fake.url, mode: 'reserve', retries: 1 }, { logs })
  try {
    const r = await get(url + '/w', 'h-twice')
    assert.deepEqual([r.status, r.body.error], [503, 'unavailable'])
    assert.ok(await app.accman.drain(10000))
    assert.deepEqual([app.accman.stats.owed, app.accman.stats.stranded], [1, 0])
  } finally {
    await app.close()
    await fake.close()
  }
  const calls = fake.heads.map((h) => h.split(' ')[1].split('?')[0])
  assert.deepEqual(calls, ['/hold', '/hold', '/hold', '/settle'])
  const queued = logs.filter((l) => l.msg === 'accman: release queued to retry')
  assert.deepEqual(queued.map((l) => [l.after, l.key.endsWith('-h')]), [['unavailable', true]])
})

// A release owed for a hold that may have landed repeats the hold with its
// key; refused not_applied each time until the close, it says nothing of
// the first attempt: stranded, it is said (the hold returns at its expiry),
// never settled blind and never billed.
test('reserve: a release whose repeated hold is refused not_applied to the close is stranded and said', async () => {
  let first = true
  const fake = await fakeAccMan((head) => {
    if (head.startsWith('PATCH /hold?') && first) {
      first = false
      return reply(503, '{"error":"unavailable","detail":"the commit failed"}')
    }
    if (head.startsWith('PATCH /hold?')) {
      return reply(503, '{"error":"not_applied","detail":"the store takes no writes"}')
    }
    return reply(200, '{"tot":10,"seq":3}') // a settle, which must not come
  })
  const logs = []
  const unpaid = []
  const { app, url } = await serviceApp({
    url: fake.url, mode: 'reserve', retries: 0, onUnpaid: (cred, amount) => { unpaid.push(amount) }
  }, { logs })
  try {
    const r = await get(url + '/w', 'h-stuck')
    assert.deepEqual([r.status, r.body.error], [503, 'unavailable'])
    await until(() => fake.heads.length >= 3) // the release's repeats, refused
  } finally {
    await app.close() // CLOSE_DRAIN_MS, then the release is stranded
    await fake.close()
  }
  assert.ok(fake.heads.every((h) => h.startsWith('PATCH /hold?')), 'no settle without a hold id')
  assert.deepEqual([app.accman.stats.owed, app.accman.stats.stranded], [1, 1])
  assert.deepEqual(unpaid, [])
  const stranded = logs.filter((l) => l.level === 50 && l.msg.startsWith('accman: stranded'))
  assert.deepEqual(stranded.map((l) => [l.msg, l.amount, l.key.endsWith('-h')]), [[
    'accman: stranded release: nothing is lost: a hold returns by itself at its expiry', '1', true
  ]])
})

// fastify's handlerTimeout runs from the request's start, and answers 503
// from a timer, here while the hold is on its way.
test('reserve: a response that went out while the hold was on its way releases the hold at once', async () => {
  await acc.mint.mod('h-timeout', 10)
  const proxy = await proxyTo(acc.server.url)
  const app = Fastify({ handlerTimeout: 100 })
  await app.register(accman, { url: proxy.url, token: TOKENS.service, mode: 'reserve', cost: 5 })
  app.get('/w', async () => ({ ok: true }))
  try {
    const url = await app.listen({ port: 0, host: '127.0.0.1' })
    await proxy.set('delay', 300) // the hold's reply comes after the 503
    const r = await fetch(url + '/w', { headers: { accman: 'h-timeout' } })
    assert.deepEqual([r.status, (await r.json()).code], [503, 'FST_ERR_HANDLER_TIMEOUT'])
    await proxy.set('delay', 0)
    // The hold is taken, then released; its expiry is 90 s off.
    await until(async () => (await acc.service.past('h-timeout')).past.length === 3)
    assert.equal(await acc.service.tot('h-timeout'), 10)
  } finally {
    await app.close()
    await proxy.close()
  }
})

test('reserve: a stranded settle is owed by the account and unpaid; a stranded release loses nothing', async () => {
  await acc.mint.mod('h-strand', 10)
  const logs = []
  const unpaid = []
  const proxy = await proxyTo(acc.server.url)
  const { app, url } = await serviceApp({
    url: proxy.url, token: TOKENS.service, mode: 'reserve', onUnpaid: (...a) => unpaid.push(a)
  }, { logs })
  try {
    const paid = get(url + '/gated', 'h-strand')
    const failed = get(url + '/gated?fail=1', 'h-strand')
    await until(() => app.served === 2) // both held
    await proxy.set('down') // the settle and the release meet no AccMan: owed, known unsent
    app.openGate()
    assert.deepEqual([(await paid).status, (await paid).accman], [200, null])
    assert.equal((await failed).status, 500)
    await until(() => app.accman.stats.owed === 2)
    // The token loses its charge role: both owed calls meet 403, stranded.
    acc.server.writeTokens({ service: 'read' })
    await acc.server.stop()
    await acc.server.start()
    await proxy.set('pass')
    assert.ok(await app.accman.drain(30000))
  } finally {
    await app.close()
    await proxy.close()
    acc.server.writeTokens()
    await acc.server.stop()
    await acc.server.start()
  }
  assert.equal(app.accman.stats.stranded, 2)
  assert.deepEqual(unpaid, [['h-strand', 1n, 'forbidden']])
  assert.deepEqual([app.accman.stats.unpaid_requests, app.accman.stats.unpaid_amount], [1, 1])
  const errors = messages(logs, 50)
  assert.ok(errors.includes('accman: stranded settle: the account owes 1'), errors.join('\n'))
  assert.ok(errors.includes('accman: stranded release: nothing is lost: a hold returns by itself at its expiry'),
    errors.join('\n'))
})

test('reserve: an owed settle whose hold expired meanwhile is charged as a keyed mod', async () => {
  await acc.mint.mod('h-owed-expire', 10)
  const logs = []
  const proxy = await proxyTo(acc.server.url)
  const { app, url } = await serviceApp({ url: proxy.url, token: TOKENS.service, mode: 'reserve', holdTtlS: 1 }, { logs })
  try {
    const paid = get(url + '/gated', 'h-owed-expire')
    await until(() => app.served === 1) // held
    proxy.set('refuse') // the settle meets no AccMan: owed
    app.openGate()
    assert.deepEqual(Object.values(await paid).slice(0, 2), [200, null])
    await until(() => app.accman.stats.owed === 1)
    // Past holdTtlS the hold ends by itself (AccMan's clock ends it within
    // a second or two), all of it back.
    await until(async () => (await acc.service.tot('h-owed-expire')) === 10)
    proxy.set('pass')
    assert.ok(await app.accman.drain(30000))
    // Counted in owed only, as on the Python side: stats.expired counts
    // the holds found expired as the response goes out.
    assert.deepEqual([app.accman.stats.stranded, app.accman.stats.owed, app.accman.stats.expired], [0, 1, 0])
  } finally {
    await app.close()
    await proxy.close()
  }
  assert.equal(await acc.service.tot('h-owed-expire'), 9)
  const [charge, expiry, hold] = (await acc.service.past('h-owed-expire')).past
  assert.deepEqual([charge.by, expiry.by, hold.by], [-1, 1, -1])
  assert.deepEqual([expiry.key, expiry.hold], [null, hold.hold])
  assert.equal(charge.key, hold.key.replace(/-h$/, '-c'))
  assert.ok(messages(logs, 40).includes(`accman: hold ${hold.hold} ended before its settle landed: ` +
    `charging 1 as a mod, key ${charge.key}`), messages(logs, 40).join('\n'))
})

test('reserve: an owed settle charged as a mod and stranded of unknown outcome names the mod\'s key', async () => {
  // The hold's history shows only its expiry: whoever looked there alone
  // would bill the consumer again for a charge that landed.
  await acc.mint.mod('h-owed-key', 10)
  const logs = []
  const proxy = await proxyTo(acc.server.url)
  // The plugin's own timeout: the charge whose reply never comes ends at
  // it, and the hold that passes, waiting on AccMan's commit, gets room
  // on a loaded machine (the drain at close runs CLOSE_DRAIN_MS either way).
  const { app, url } = await serviceApp({
    url: proxy.url, token: TOKENS.service, mode: 'reserve', holdTtlS: 1, retries: 0
  }, { logs })
  try {
    const paid = get(url + '/gated', 'h-owed-key')
    await until(() => app.served === 1) // held
    proxy.set('refuse') // the settle may have been read: owed, of unknown outcome
    app.openGate()
    assert.equal((await paid).status, 200)
    await until(() => app.accman.stats.owed === 1)
    await until(async () => (await acc.service.tot('h-owed-key')) === 10) // expired, all back
    proxy.dropReplies(/[?&]key=[\w-]+-c(&|$)/) // the charge applies; its reply never comes
    proxy.set('pass')
    // Forwarded is not applied: the balance read after the shutdown counts
    // on AccMan having answered the charge, however slow the machine.
    await until(() => proxy.dropped.some((t) => /[?&]key=[\w-]+-c(&|$)/.test(t)))
  } finally {
    await app.close() // strands the owed settle
    await proxy.close()
  }
  assert.equal(await acc.service.tot('h-owed-key'), 9) // the charge landed
  const rid = /[?&]key=([\w-]+)-h(&|$)/.exec(proxy.targets.find((t) => t.startsWith('/hold?')))[1]
  const errors = messages(logs, 50).filter((m) => m.startsWith('accman: stranded settle'))
  assert.equal(errors.length, 1)
  assert.ok(errors[0].includes('outcome unknown') && errors[0].includes(`key ${rid}-c `), errors[0])
})

test('reserve: an account with HOLDS_PER_ACCOUNT_MAX holds open gets 429 too_many_requests', async () => {
  const HOLDS_PER_ACCOUNT_MAX = 4096 // AccMan's bound (accman/limits.py)
  const BATCH = 256
  await acc.mint.mod('h-many', HOLDS_PER_ACCOUNT_MAX + 10)
  for (let i = 0; i < HOLDS_PER_ACCOUNT_MAX; i += BATCH) {
    await Promise.all(Array.from({ length: BATCH }, () => acc.service.hold('h-many', -1, { ttlS: 60 })))
  }
  const logs = []
  await withReserve({}, async (url, app) => {
    const r = await get(url + '/w', 'h-many')
    assert.deepEqual([r.status, r.body.error, r.headers.get('retry-after')], [429, 'too_many_requests', '1'])
    assert.equal(app.served, 0)
    assert.equal(app.accman.stats.refused_too_many, 1)
  }, logs)
  assert.deepEqual(messages(logs, 50), [])
  assert.ok(messages(logs, 40).some((m) => /too many holds/.test(m)), messages(logs, 40).join('\n'))
  assert.equal(await acc.service.tot('h-many'), 10)
})
