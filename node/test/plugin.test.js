'use strict'
// The plugin in check mode, with a real AccMan and a real fastify service on
// free loopback ports.  Reserve mode, which needs AccMan's holds, is in
// holds.test.js.

const test = require('node:test')
const assert = require('node:assert/strict')
const net = require('node:net')
const Fastify = require('fastify')
const accman = require('..')
const { AccManServer, TOKENS, sharedAccMan } = require('./helpers/accman')
const { serviceApp, get, sleep, messages, until } = require('./helpers/app')
const { proxyTo } = require('./helpers/proxy')
const { fakeAccMan, reply } = require('./helpers/fake')

const acc = sharedAccMan(test)

async function withService (options, fn, logs) {
  const { app, url } = await serviceApp({ url: acc.server.url, token: TOKENS.service, exempt: ['/health'], ...options }, { logs })
  try {
    await fn(url, app)
  } finally {
    await app.close()
  }
}

const chargeKeys = async (cred) => (await acc.mint.past(cred)).past.filter((e) => e.by < 0).map((e) => e.key)

test('a paid request is charged once, with a per-request key, and answers the new balance', async () => {
  await acc.mint.mod('p-paid', 10)
  await withService({}, async (url) => {
    const a = await get(url + '/w', 'p-paid')
    assert.deepEqual([a.status, a.accman], [200, '9'])
    const b = await get(url + '/pricey', 'p-paid')
    assert.deepEqual([b.status, b.accman], [200, '4'])
  })
  const keys = await chargeKeys('p-paid')
  assert.equal(keys.length, 2)
  assert.notEqual(keys[0], keys[1])
  assert.ok(keys.every((k) => /^[0-9a-f]{24}[0-9a-f]+-c$/.test(k)), keys.join())
  assert.equal(await acc.mint.tot('p-paid'), 4)
})

test('no credential, a malformed one or two of them: 401 no_credential, nothing called', async () => {
  await withService({}, async (url, app) => {
    for (const cred of [undefined, 'has space', 'x'.repeat(129)]) {
      const r = await get(url + '/w', cred)
      assert.equal(r.status, 401)
      assert.equal(r.body.error, 'no_credential')
      assert.equal(r.headers.get('www-authenticate'), 'AccMan header="accman"')
    }
    const { port } = new URL(url)
    const raw = await new Promise((resolve) => {
      const s = net.connect(port, '127.0.0.1', () => s.end('GET /w HTTP/1.1\r\nHost: x\r\naccman: a\r\naccman: b\r\nConnection: close\r\n\r\n'))
      let out = ''
      s.on('data', (d) => { out += d })
      s.on('end', () => resolve(out))
    })
    assert.match(raw, /^HTTP\/1\.1 401 /)
    assert.equal(app.accman.stats.refused_no_credential, 4)
  })
})

test('an unknown URL is fastify\'s 404 whatever its credential: AccMan never called, nothing charged', async () => {
  // A request that matched no route serves nothing: no 401 for a missing
  // credential, no balance read or hold for a present one.  It is counted
  // with the requests let through unmetered (exempt), not with those
  // metered (requests), so that the two count every request, as the
  // Python middleware's do.
  const fake = await fakeAccMan(() => reply(200, '{"tot":5}'))
  try {
    for (const mode of ['check', 'reserve']) {
      const { app, url } = await serviceApp({ url: fake.url, mode })
      try {
        for (const cred of [undefined, 'has space', 'p-unrouted']) {
          for (const path of ['/no/such/route', '/w/extra']) {
            const r = await get(url + path, cred)
            assert.deepEqual([r.status, r.body.error, r.accman], [404, 'Not Found', null], `${mode} ${cred} ${path}`)
          }
        }
        const head = await fetch(url + '/no/such/route', { method: 'HEAD' })
        assert.equal(head.status, 404)
        assert.equal(app.accman.stats.requests, 0)
        assert.equal(app.accman.stats.refused_no_credential, 0)
        assert.equal(app.accman.stats.exempt, 7, mode)
        assert.match(app.accman.metrics(), /^accman_plugin_exempt_total 7$/m)
      } finally {
        await app.close()
      }
    }
    assert.deepEqual(fake.heads, [])
  } finally {
    await fake.close()
  }
})

// One GET /w over a raw socket with `headers` (lines, each as sent): the
// status and the JSON body.  fetch() would join repeated headers itself.
// The socket is written, not ended: Node's server closes a connection
// whose client has ended it before it answers a request that waits for
// AccMan; `Connection: close` ends it after the answer.
function rawGet (url, headers) {
  const { port } = new URL(url)
  const head = ['GET /w HTTP/1.1', 'Host: x', ...headers, 'Connection: close', '', ''].join('\r\n')
  return new Promise((resolve, reject) => {
    const s = net.connect(port, '127.0.0.1', () => s.write(head))
    let out = ''
    s.on('data', (d) => { out += d })
    s.on('error', reject)
    s.on('end', () => {
      try {
        resolve({ status: Number(out.split(' ')[1]), body: JSON.parse(out.slice(out.indexOf('\r\n\r\n') + 4)) })
      } catch (err) {
        reject(new Error(`not a JSON reply: ${out}`))
      }
    })
  })
}

test('no_credential names the cause as the Python middleware does: two headers are "more than one"', async () => {
  await acc.mint.mod('p-twice', 10)
  await withService({}, async (url) => {
    const cases = [
      [['ACCMAN: p-twice', 'accman: p-twice'], 'more than one accman header'],
      [['accman: p-twice', 'accman: other'], 'more than one accman header'],
      [['accman: p-twice, p-twice'], 'the accman header is not a credential'], // one value, as sent
      [[], 'the accman header is required']
    ]
    for (const [headers, detail] of cases) {
      assert.deepEqual(await rawGet(url, headers), { status: 401, body: { error: 'no_credential', detail } })
    }
  })
  assert.equal(await acc.mint.tot('p-twice'), 10)
})

// Node keeps only the first copy of some names in request.headers
// (authorization, user-agent...) and joins the rest: a repeat is refused
// whichever kind the header's name is.
test('a repeated header is refused whatever its name, those Node keeps one copy of too', async () => {
  await acc.mint.mod('p-twice-named', 10)
  for (const header of ['authorization', 'user-agent', 'x-api-key']) {
    await withService({ header }, async (url) => {
      const detail = `more than one ${header} header`
      for (const second of ['p-twice-named', 'other']) {
        const r = await rawGet(url, [`${header}: p-twice-named`, `${header}: ${second}`])
        assert.deepEqual(r, { status: 401, body: { error: 'no_credential', detail } }, `${header}: ${second}`)
      }
      assert.deepEqual(await rawGet(url, [`${header}: p-twice-named`]), { status: 200, body: { ok: true } })
    })
  }
  assert.equal(await acc.mint.tot('p-twice-named'), 7)
})

test('an unknown account: 401 no_account', async () => {
  await withService({}, async (url) => {
    const r = await get(url + '/w', 'p-nobody')
    assert.deepEqual([r.status, r.body.error], [401, 'no_account'])
  })
})

test('a balance under the cost: 402 with the balance in the body and the header; the handler never runs', async () => {
  await acc.mint.mod('p-poor', 3)
  await withService({}, async (url) => {
    const r = await get(url + '/pricey', 'p-poor')
    assert.equal(r.status, 402)
    assert.equal(r.accman, '3')
    assert.deepEqual([r.body.error, r.body.tot, r.body.cost], ['insufficient', 3, 5])
    // Paid in just now: the next request is admitted at once, never refused
    // on a remembered balance.
    await acc.mint.mod('p-poor', 10)
    const ok = await get(url + '/pricey', 'p-poor')
    assert.deepEqual([ok.status, ok.accman], [200, '8'])
  })
})

// stats.free_status counts them, as the Python middleware's does: the
// responses let through that their status made free, not the plugin's
// own refusals.
test('responses of 400 and over are not charged, unless chargeErrors', async () => {
  await acc.mint.mod('p-fail', 10)
  await withService({}, async (url, app) => {
    const r = await get(url + '/fail', 'p-fail')
    assert.deepEqual([r.status, r.accman], [500, '10'])
    const t = await get(url + '/throw', 'p-fail')
    assert.deepEqual([t.status, t.accman], [500, '10'])
    assert.equal((await get(url + '/fail', 'p-fail-nobody')).status, 401)
    assert.equal((await get(url + '/w', 'p-fail')).status, 200)
    assert.deepEqual([app.accman.stats.free_status, app.accman.stats.charged], [2, 1])
    assert.match(app.accman.metrics(), /^accman_plugin_free_status_total 2$/m)
  })
  assert.equal(await acc.mint.tot('p-fail'), 9)
  await withService({ chargeErrors: true }, async (url, app) => {
    const r = await get(url + '/fail', 'p-fail')
    assert.deepEqual([r.status, r.accman], [500, '8'])
    assert.equal(app.accman.stats.free_status, 0)
  })
})

// fastify writes a first send at once when no onSend hook waits, and
// refuses a second as already sent; the plugin's charge waits for AccMan.
test('a handler that sends, then throws, sends again or returns undefined: the first response goes out, as paid for', async () => {
  await acc.mint.mod('p-sendagain', 10)
  for (const mode of ['check', 'reserve']) {
    await withService({ mode }, async (url) => {
      for (const as of ['throw', 'send', 'none']) {
        const before = await acc.mint.tot('p-sendagain')
        const r = await get(url + '/sendagain?as=' + as, 'p-sendagain')
        const seen = [r.status, r.body, r.headers.get('x-first'), r.headers.get('x-second')]
        assert.deepEqual(seen, [200, { first: true }, 'yes', null], `${mode} ${as}`)
        assert.equal(r.headers.get('content-type'), 'application/json; charset=utf-8')
        assert.deepEqual([r.accman, await acc.mint.tot('p-sendagain')], [String(before - 1), before - 1])
      }
    })
  }
})

// fastify takes a Response's status and headers only after the onSend hooks.
test('a web Response is charged on its own status and headers: one of 400 and over is not charged', async () => {
  await acc.mint.mod('p-response', 100)
  for (const mode of ['check', 'reserve']) {
    await withService({ mode }, async (url) => {
      const failed = await get(url + '/response?status=500&rows=42', 'p-response')
      assert.deepEqual([failed.status, failed.headers.get('x-rows')], [500, '42'], mode)
      const paid = await get(url + '/response?status=200&rows=42', 'p-response')
      assert.deepEqual([paid.status, paid.body, paid.headers.get('x-rows')], [200, { rows: 42 }, '42'], mode)
    })
  }
  assert.equal(await acc.mint.tot('p-response'), 90) // 5 a mode, for the 200s only
})

// fastify refuses a Response whose body was used, or whose status is 0
// (Response.error()), a locked web stream, and a payload it cannot send
// (an object under a content type that is not JSON, a number), with its
// 500 once the onSend hooks are done; and a header that Node will not write.
test('a web Response, stream or payload that fastify refuses with a 500 is not charged, and its hold is released', async () => {
  await acc.mint.mod('p-badresponse', 10)
  for (const mode of ['check', 'reserve']) {
    await withService({ mode }, async (url) => {
      for (const as of ['used', 'error', 'locked', 'object', 'number', 'header']) {
        const r = await get(url + '/badresponse?as=' + as, 'p-badresponse')
        assert.deepEqual([r.status, r.accman], [500, null], `${mode} ${as}`)
        // A release is under way once the response is out; the hold's expiry is 90 s off.
        await until(async () => await acc.mint.tot('p-badresponse') === 10, 5000).catch(() => {})
        assert.equal(await acc.mint.tot('p-badresponse'), 10, `${mode} ${as}`)
      }
    })
  }
})

// An onSend hook after the plugin's (a route's own) may make a payload
// that fastify cannot send into one it sends: the response is charged.
test('an object that a later onSend hook writes as text is charged as the response it becomes', async () => {
  await acc.mint.mod('p-xml', 10)
  for (const mode of ['check', 'reserve']) {
    const app = Fastify()
    await app.register(accman, { url: acc.server.url, token: TOKENS.service, mode })
    const xml = async (request, reply, payload) => typeof payload === 'object' ? `<a>${payload.a}</a>` : payload
    app.get('/xml', { onSend: xml }, async (request, reply) => reply.type('application/xml').send({ a: 1 }))
    try {
      for (const method of ['GET', 'HEAD']) {
        const before = await acc.mint.tot('p-xml')
        const r = await app.inject({ method, url: '/xml', headers: { accman: 'p-xml' } })
        const body = method === 'GET' ? '<a>1</a>' : ''
        assert.deepEqual([r.statusCode, r.body, r.headers.accman], [200, body, String(before - 1)], `${mode} ${method}`)
        assert.equal(await acc.mint.tot('p-xml'), before - 1)
      }
    } finally {
      await app.close()
    }
  }
})

// fastify's own HEAD route beside a GET cancels a locked web stream and
// answers 200; a HEAD route the app declared sends it as a GET route does,
// and fastify refuses it with a 500: that one is not charged.
test('a locked web stream is charged on fastify\'s HEAD route, not on one the app declared', async () => {
  await acc.mint.mod('p-lockedhead', 100)
  const locked = async (request, reply) => {
    const stream = new Response('locked').body
    stream.getReader()
    return reply.type('text/plain').send(stream)
  }
  for (const mode of ['check', 'reserve']) {
    const app = Fastify()
    await app.register(accman, { url: acc.server.url, token: TOKENS.service })
    app.head('/declared', locked) // before its GET: fastify makes no sibling
    app.get('/declared', async () => 'get')
    app.route({ method: ['GET', 'HEAD'], url: '/both', handler: locked })
    app.get('/sibling', locked) // fastify's HEAD beside it
    app.register(async (scope) => { scope.get('/', locked) }, { prefix: '/v1' }) // /v1 and /v1/
    const url = await app.listen({ port: 0, host: '127.0.0.1' })
    try {
      const head = (path) => fetch(url + path, { method: 'HEAD', headers: { accman: 'p-lockedhead' } })
        .then((r) => [r.status, r.headers.get('accman')])
      assert.deepEqual(await head('/declared'), [500, null], mode)
      assert.deepEqual(await head('/both'), [500, null], mode)
      const tot = await acc.mint.tot('p-lockedhead')
      assert.deepEqual(await head('/sibling'), [200, String(tot - 1)], mode)
      assert.deepEqual(await head('/v1'), [200, String(tot - 2)], mode)
      assert.deepEqual(await head('/v1/'), [200, String(tot - 3)], mode)
    } finally {
      await app.close()
    }
    // A release is under way once a refused response is out.
    await until(async () => await acc.mint.tot('p-lockedhead') === (mode === 'check' ? 97 : 94), 5000).catch(() => {})
  }
  assert.equal(await acc.mint.tot('p-lockedhead'), 94) // 3 a mode: the siblings only
})

// fastify makes one sibling HEAD a GET route (two for a prefixed '/'); a
// HEAD route the app declares next with the same url and handler, under a
// constraint that lets it stand beside the sibling, is the app's: fastify
// refuses its locked web stream with a 500, which is not charged.
test('a constrained HEAD route declared after its GET is not taken for fastify\'s sibling', async () => {
  await acc.mint.mod('p-lockedhead2', 100)
  const locked = async (request, reply) => {
    const stream = new Response('locked').body
    stream.getReader()
    return reply.type('text/plain').send(stream)
  }
  const app = Fastify()
  await app.register(accman, { url: acc.server.url, token: TOKENS.service })
  app.get('/c', locked) // fastify's HEAD beside it
  app.head('/c', { constraints: { host: 'b.example' } }, locked) // the app's
  await app.ready()
  try {
    const head = (host) => app.inject({ method: 'HEAD', url: '/c', headers: { host, accman: 'p-lockedhead2' } })
      .then((r) => [r.statusCode, r.headers.accman ?? null])
    assert.deepEqual(await head('a.example'), [200, '99'])
    assert.deepEqual(await head('b.example'), [500, null])
  } finally {
    await app.close()
  }
  await sleep(200) // a charge made for the 500 would be under way
  assert.equal(await acc.mint.tot('p-lockedhead2'), 99)
})

// fastify's HEAD route beside a GET has an onSend hook of its own, after
// the plugin's, which fails on a null payload (and on a Response).
test('a HEAD of a web Response with no body is answered as its GET, and charged as it', async () => {
  await acc.mint.mod('p-emptyresponse', 10)
  for (const mode of ['check', 'reserve']) {
    await withService({ mode }, async (url) => {
      for (const status of [200, 204]) {
        for (const method of ['HEAD', 'GET']) {
          const r = await fetch(`${url}/emptyresponse?status=${status}`, { method, headers: { accman: 'p-emptyresponse' } })
          const seen = [r.status, r.headers.get('x-empty'), r.headers.get('content-length'), await r.text()]
          // fastify gives a HEAD no content-length of its own.
          const length = status === 204 || method === 'HEAD' ? null : '0'
          assert.deepEqual(seen, [status, 'yes', length, ''], `${mode} ${method} ${status}`)
        }
      }
    })
  }
  assert.equal(await acc.mint.tot('p-emptyresponse'), 2) // 1 a request
})

test('a web Response\'s own ACCMAN header never goes out as the balance', async () => {
  await acc.mint.mod('p-relayed', 10)
  await withService({}, async (url) => {
    assert.deepEqual(Object.values(await get(url + '/relayed', 'p-relayed')).slice(0, 2), [200, '9'])
  })
  // Served unpaid, no reply tells the balance: the header is missing.
  await withService({ url: 'http://127.0.0.1:9', onUnavailable: 'open', timeoutMs: 200 }, async (url) => {
    const r = await get(url + '/relayed', 'p-relayed')
    assert.deepEqual([r.status, r.accman, r.body], [200, null, { relayed: true }])
  })
})

test('per-route prices: a number, a function of request and reply, false; exempt paths', async () => {
  await acc.mint.mod('p-route', 100)
  await withService({ cost: 2 }, async (url) => {
    assert.equal((await get(url + '/w', 'p-route')).accman, '98')
    assert.equal((await get(url + '/rows?rows=25', 'p-route')).accman, '95')
    const free = await get(url + '/free')
    assert.deepEqual([free.status, free.accman], [200, null])
    const health = await get(url + '/health')
    assert.deepEqual([health.status, health.accman], [200, null])
  })
  assert.equal(await acc.mint.tot('p-route'), 95)
  await withService({ exempt: (request) => request.url.startsWith('/w') }, async (url) => {
    assert.equal((await get(url + '/w')).status, 200)
  })
})

// An exempt function answers true or false at once: a promise (an async
// function's) or a string would be truthy, and every request free.  Each
// is a 500 naming the route, the handler not run, nothing charged; so is
// a throw, named as the exempt function's.
test('an exempt function that answers other than true or false, or throws, is a 500 naming the route', async () => {
  await acc.mint.mod('p-exempt-fn', 10)
  const tail = 'must be true, or false (or another falsy value), not'
  const cases = [
    [async () => false, `the result of the exempt function at GET /w ${tail} a promise (it must not be async)`],
    [() => 'yes', `the result of the exempt function at GET /w ${tail} "yes"`],
    [() => { throw new Error('oops') }, 'the exempt function at GET /w threw: oops']
  ]
  for (const [exempt, message] of cases) {
    await withService({ exempt }, async (url, app) => {
      const paid = await get(url + '/w', 'p-exempt-fn')
      const bare = await get(url + '/w')
      assert.deepEqual([paid.status, paid.body.message, bare.status, bare.body.message, paid.accman],
        [500, message, 500, message, null])
      assert.equal(app.served, 0)
      assert.deepEqual([app.accman.stats.requests, app.accman.stats.exempt], [2, 0])
    })
  }
  assert.equal(await acc.mint.tot('p-exempt-fn'), 10)
  // Nothing returned (undefined) for "not exempt" meters, as false does;
  // a refusal the function means (a status under 500) goes out as it is.
  const refusal = Object.assign(new Error('no such region'), { statusCode: 404 })
  await withService({ exempt: (request) => { if (request.url === '/pricey') throw refusal } }, async (url, app) => {
    assert.deepEqual([(await get(url + '/w', 'p-exempt-fn')).accman, app.served], ['9', 1])
    const refused = await get(url + '/pricey', 'p-exempt-fn')
    assert.deepEqual([refused.status, refused.body.message, app.served], [404, 'no such region', 1])
  })
  assert.equal(await acc.mint.tot('p-exempt-fn'), 9)
})

test('exempt names routes as fastify routes them: another spelling of an exempt URL is exempt, a look-alike of a priced one is not', async () => {
  await acc.mint.mod('p-exempt-route', 100)
  const app = Fastify({ ignoreTrailingSlash: true })
  await app.register(accman, { url: acc.server.url, token: TOKENS.service, exempt: ['/health', '/docs/*'] })
  app.get('/health', async () => ({ up: true }))
  app.get('/docs', { config: { accman: 10 } }, async () => ({ paid: true }))
  app.get('/docs/:page', async () => ({ page: true }))
  const url = await app.listen({ port: 0, host: '127.0.0.1' })
  try {
    assert.equal((await get(url + '/docs/')).status, 401) // routed to the priced /docs
    const paid = await get(url + '/docs/', 'p-exempt-route')
    assert.deepEqual([paid.status, paid.accman], [200, '90'])
    for (const path of ['/h%65alth', '/health/', '/docs/intro']) {
      const free = await get(url + path, 'p-exempt-route')
      assert.deepEqual([free.status, free.accman], [200, null], path)
    }
  } finally {
    await app.close()
  }
  assert.equal(await acc.mint.tot('p-exempt-route'), 90)
})

test('an onUnpaid whose promise rejects is logged, never a crash', async () => {
  const logs = []
  const { app, url } = await serviceApp({
    url: 'http://127.0.0.1:9', token: TOKENS.service, timeoutMs: 500, onUnavailable: 'open',
    onUnpaid: async () => { throw new Error('billing db down') }
  }, { logs })
  try {
    assert.equal((await get(url + '/pricey', 'p-any')).status, 200)
    await until(() => messages(logs, 50).includes('accman: onUnpaid failed'))
  } finally {
    await app.close()
  }
})

test('a cost function that returns a non-amount is a 500 and charges nothing', async () => {
  await acc.mint.mod('p-badcost', 10)
  for (const mode of ['check', 'reserve']) {
    await withService({ mode }, async (url) => {
      const r = await get(url + '/badcost', 'p-badcost')
      // The handler's headers belong to the response that was not sold.
      assert.deepEqual([r.status, r.headers.get('set-cookie'), r.headers.get('x-app')], [500, null, null], mode)
      assert.equal(r.headers.get('x-before'), 'hook', mode)
    })
  }
  assert.equal(await acc.mint.tot('p-badcost'), 10)
})

test('a cost function that throws is a 500 naming its route and stage, or its own 4xx; nothing charged', async () => {
  await acc.mint.mod('p-costthrows', 10)
  const app = Fastify()
  await app.register(accman, {
    url: acc.server.url,
    token: TOKENS.service,
    cost: (request, reply, stage) => {
      if (stage !== request.query.at) return 1
      // A refusal the function means (a status under 500) goes out as it is.
      if (request.query.refuse) throw Object.assign(new Error('rows is required'), { statusCode: 400 })
      throw new Error('no price')
    }
  })
  app.get('/c', async () => ({ ok: true }))
  const url = await app.listen({ port: 0, host: '127.0.0.1' })
  try {
    for (const stage of ['estimate', 'charge']) {
      const r = await get(url + '/c?at=' + stage, 'p-costthrows')
      assert.deepEqual([r.status, r.body.message], [500, `GET /c's cost function at '${stage}' threw: no price`])
      const refused = await get(url + '/c?refuse=1&at=' + stage, 'p-costthrows')
      assert.deepEqual([refused.status, refused.body.message, refused.accman], [400, 'rows is required', null])
    }
  } finally {
    await app.close()
  }
  assert.equal(await acc.mint.tot('p-costthrows'), 10)
})

test('a cost function\'s wrong result is named with its route and stage: an async one returns a promise', async () => {
  await acc.mint.mod('p-asynccost', 10)
  await withService({}, async (url) => {
    const r = await get(url + '/asynccost', 'p-asynccost')
    assert.deepEqual([r.status, r.body.message], [500, 'the result of GET /asynccost\'s cost function at \'estimate\' ' +
      'must be a non-negative integer (a safe-integer number, or a bigint up to 2^63-1), ' +
      'not a promise (it must not be async)'])
    const b = await get(url + '/badcost', 'p-asynccost')
    assert.deepEqual([b.status, b.body.message], [500, 'the result of GET /badcost\'s cost function at \'charge\' ' +
      'must be a non-negative integer (a safe-integer number, or a bigint up to 2^63-1), not -1'])
  })
  assert.equal(await acc.mint.tot('p-asynccost'), 10)
})

test('a cost function that throws on a file stream\'s response: a 500, the file closed, nothing charged', async () => {
  await acc.mint.mod('p-filethrows', 10)
  for (const mode of ['check', 'reserve']) {
    await withService({ mode }, async (url, app) => {
      for (const as of ['node', 'web', 'response']) {
        const r = await get(url + '/filethrows?as=' + as, 'p-filethrows')
        assert.deepEqual([r.status, r.body.message, r.accman], [500, "GET /filethrows's cost function at 'charge' threw: the cost function failed", null], `${mode} ${as}`)
        const stream = app.streams.at(-1)
        // fastify answers the error and never reads the stream: its fd
        // stays open unless the stream is destroyed.
        await until(() => stream.closed, 5000).catch(() => {})
        assert.deepEqual([stream.destroyed, stream.closed], [true, true], `${mode} ${as}`)
      }
    })
  }
  assert.equal(await acc.mint.tot('p-filethrows'), 10)
})

test('a file stream that fails to open is fastify\'s 500, not charged', async () => {
  await acc.mint.mod('p-nofile', 10)
  for (const mode of ['check', 'reserve']) {
    await withService({ mode }, async (url) => {
      const r = await fetch(url + '/nofile', { headers: { accman: 'p-nofile' } })
      assert.deepEqual([r.status, r.headers.get('accman'), (await r.json()).code], [500, null, 'ENOENT'], mode)
    })
  }
  assert.equal(await acc.mint.tot('p-nofile'), 10)
})

// A service whose charges reach AccMan through a proxy that, after a
// first request (the role probe; the balance fresh), delays them by 300 ms:
// `during(url)` then runs while the charge of what it asks is in flight.
async function withChargeInFlight (cred, during) {
  await acc.mint.mod(cred, 10)
  const proxy = await proxyTo(acc.server.url)
  const logs = []
  const { app, url } = await serviceApp({ url: proxy.url, token: TOKENS.service }, { logs })
  try {
    assert.equal((await get(url + '/w', cred)).status, 200)
    await proxy.set('delay', 300) // the charge's reply comes after the stream failed
    await during(url)
  } finally {
    await app.close()
    await proxy.close()
  }
  return logs
}

test('a stream that fails while its charge is in flight is charged as the response\'s start, said, and the service lives', async () => {
  const logs = await withChargeInFlight('p-streamfails', async (url) => {
    const r = await fetch(url + '/streamfails?ms=50', { headers: { accman: 'p-streamfails' } })
    assert.equal(r.status, 500)
    assert.equal((await get(url + '/w', 'p-streamfails')).status, 200) // still serving
  })
  assert.deepEqual(messages(logs, 40),
    ['accman: the response\'s stream failed while its charge was in flight: charged for a response that failed'])
  assert.equal(await acc.mint.tot('p-streamfails'), 7)
})

test('an onSend hook of a later plugin that fails the response does not undo its charge, and it is said', async () => {
  await acc.mint.mod('p-laterhook', 10)
  const logs = []
  const app = Fastify({ logger: { level: 'info', stream: { write: (line) => logs.push(JSON.parse(line)) } } })
  await app.register(accman, { url: acc.server.url, token: TOKENS.service })
  app.addHook('onSend', async () => { throw new Error('a later hook failed') })
  app.get('/w', async () => ({ ok: true }))
  try {
    const r = await app.inject({ url: '/w', headers: { accman: 'p-laterhook' } })
    assert.deepEqual([r.statusCode, r.headers.accman, r.json().message], [500, '9', 'a later hook failed'])
  } finally {
    await app.close()
  }
  assert.deepEqual(messages(logs, 40), ['accman: the response failed once charged, and fastify\'s ' +
    'error response took its place: charged for a response that failed'])
  assert.equal(await acc.mint.tot('p-laterhook'), 9)
})

test('a web stream that fails while its charge is in flight is charged, said, and fastify\'s 500 goes out', async () => {
  const logs = await withChargeInFlight('p-webstreamfails', async (url) => {
    const r = await fetch(url + '/webstreamfails?ms=50', { headers: { accman: 'p-webstreamfails' } })
    assert.deepEqual([r.status, (await r.json()).message], [500, 'the web stream failed'])
  })
  assert.deepEqual(messages(logs, 40), ['accman: the response failed once charged, and fastify\'s ' +
    'error response took its place: charged for a response that failed'])
  assert.equal(await acc.mint.tot('p-webstreamfails'), 8)
})

test('AccMan unreachable: 503 with Retry-After when closed; served unpaid and reported when open', async () => {
  await acc.mint.mod('p-down', 5)
  const unpaid = []
  const dead = 'http://127.0.0.1:9' // discard port: nothing listens
  const { app, url } = await serviceApp({ url: dead, token: TOKENS.service, timeoutMs: 500 })
  const r = await get(url + '/w', 'p-down')
  assert.deepEqual([r.status, r.body.error, r.headers.get('retry-after')], [503, 'unavailable', '1'])
  await app.close()
  const open = await serviceApp({
    url: dead, token: TOKENS.service, onUnavailable: 'open', onUnpaid: (...a) => unpaid.push(a)
  })
  const o = await get(open.url + '/pricey', 'p-down')
  assert.deepEqual([o.status, o.accman], [200, null])
  const f = await get(open.url + '/fail', 'p-down') // a free response owes nothing
  assert.equal(f.status, 500)
  assert.deepEqual(unpaid, [['p-down', 5n, 'unreachable']])
  assert.deepEqual([open.app.accman.stats.unpaid_requests, open.app.accman.stats.unpaid_amount], [1, 5])
  await open.app.close()
})

test('served unpaid, a consumer who leaves before the response owes nothing', async () => {
  const unpaid = []
  const { app, url } = await serviceApp({
    url: 'http://127.0.0.1:9', token: TOKENS.service, onUnavailable: 'open', onUnpaid: (...a) => unpaid.push(a)
  })
  try {
    // As leaveWhileHandled: the consumer leaves while the handler runs,
    // which answers to nobody once the service has seen it leave.
    const connections = connectionsOf(app.server)
    const leaving = new AbortController()
    const asked = fetch(url + '/gated', { headers: { accman: 'p-open-left' }, signal: leaving.signal })
    await until(() => app.served === 1)
    leaving.abort()
    await assert.rejects(asked)
    await until(() => connections.allClosed())
    app.openGate()
    await until(() => app.gatesPassed === 1)
    const stayed = await get(url + '/slow?ms=1', 'p-open-left')
    assert.equal(stayed.status, 200)
  } finally {
    await app.close()
  }
  assert.deepEqual(unpaid, [['p-open-left', 1n, 'unreachable']]) // the one who stayed
  assert.deepEqual([app.accman.stats.unpaid_requests, app.accman.stats.unpaid_amount], [1, 1])
})

test('a wrong token is a configuration error: 503 even when open, never served free', async () => {
  await acc.mint.mod('p-token', 5)
  await withService({ token: 'not-a-configured-token-123', onUnavailable: 'open' }, async (url) => {
    const r = await get(url + '/w', 'p-token')
    // Not "cannot be reached": AccMan was reached, and refused the service.
    assert.deepEqual([r.status, r.body], [503, { error: 'unavailable', detail: 'the balance service is unavailable' }])
  })
  assert.equal(await acc.mint.tot('p-token'), 5)
})

test('an empty token is no token, as null is: the plugin registers and calls AccMan without one', async () => {
  // `token: process.env.ACCMAN_TOKEN` with the variable set but empty.
  const fake = await fakeAccMan((head) => head.includes('&min=')
    ? reply(409, '{"error":"insufficient","tot":5,"detail":"the balance 5 does not cover this mod"}')
    : reply(200, '{"tot":4,"seq":2}'))
  try {
    const { app, url } = await serviceApp({ url: fake.url, token: '' })
    try {
      const r = await get(url + '/w', 'p-no-token')
      assert.deepEqual([r.status, r.accman], [200, '4'])
    } finally {
      await app.close()
    }
  } finally {
    await fake.close()
  }
  assert.equal(fake.heads.length, 2) // the probe and the charge
  for (const head of fake.heads) assert.doesNotMatch(head, /authorization/i)
})

// The check-mode probe: a charge of 1 that no balance can meet.
const probe = (cred) => `/mod?cred=${cred}&by=-1&min=9223372036854775807`

async function restartWith (roles) {
  acc.server.writeTokens(roles)
  await acc.server.stop()
  await acc.server.start()
}

test('check mode admits with a probe until the charge role is seen, then with tot', async () => {
  await acc.mint.mod('p-probe', 3)
  const proxy = await proxyTo(acc.server.url)
  const { app, url } = await serviceApp({ url: proxy.url, token: TOKENS.service, checkFreshMs: 0 })
  try {
    const nobody = await get(url + '/w', 'p-probe-nobody') // 404 no_account: no role seen, probing goes on
    assert.deepEqual([nobody.status, nobody.body.error], [401, 'no_account'])
    const poor = await get(url + '/pricey', 'p-probe') // 409 insufficient: its tot is the balance
    assert.deepEqual([poor.status, poor.accman, poor.body.tot], [402, '3', 3])
    assert.equal((await get(url + '/w', 'p-probe')).accman, '2')
  } finally {
    await app.close()
    await proxy.close()
  }
  const charge = proxy.targets[3]
  assert.deepEqual(proxy.targets, [probe('p-probe-nobody'), probe('p-probe'), '/tot?cred=p-probe', charge])
  assert.match(charge, /^\/mod\?cred=p-probe&by=-1&key=[0-9a-f]+-c$/)
})

test('check mode, a probe that meets 409 overflow (a balance at INT64_MIN) shows the role: 402 with the balance read, no error', async () => {
  const big = new accman.AccManClient({ url: acc.server.url, token: TOKENS.service, bigint: true })
  const logs = []
  const proxy = await proxyTo(acc.server.url)
  const { app, url } = await serviceApp({ url: proxy.url, token: TOKENS.service, checkFreshMs: 0 }, { logs })
  try {
    await acc.mint.mod('p-int64-min', 1)
    await big.mod('p-int64-min', -9223372036854775807n)
    await big.mod('p-int64-min', -2n) // -2^63: a charge of 1 leaves the range
    for (let i = 0; i < 2; i++) {
      const r = await get(url + '/w', 'p-int64-min')
      assert.deepEqual([r.status, r.body.error, r.accman], [402, 'insufficient', '-9223372036854775808'])
    }
    assert.equal(app.served, 0)
    // The 409 showed the role: the balance was read, and admission is a tot since.
    assert.deepEqual(proxy.targets, [probe('p-int64-min'), '/tot?cred=p-int64-min', '/tot?cred=p-int64-min'])
    assert.deepEqual(logs.filter((l) => l.level >= 40), [])
    const { past } = await big.past('p-int64-min')
    assert.deepEqual(past.map((e) => e.by), [-2n, -9223372036854775807n, 1n]) // the probe changed nothing
  } finally {
    await app.close()
    await proxy.close()
    await big.close()
  }
})

test('check mode, a token without the charge role: 503 at admission, logged, never served free', async () => {
  await acc.mint.mod('p-readonly', 5)
  const logs = []
  const proxy = await proxyTo(acc.server.url)
  const { app, url } = await serviceApp({ url: proxy.url, token: TOKENS.read, onUnavailable: 'open' }, { logs })
  try {
    for (let i = 0; i < 2; i++) {
      const r = await get(url + '/w', 'p-readonly')
      assert.deepEqual([r.status, r.body.error, r.headers.get('retry-after'), r.accman], [503, 'unavailable', '1', null])
    }
    assert.equal(app.served, 0)
    assert.deepEqual([app.accman.stats.unpaid_requests, app.accman.stats.owed], [0, 0])
  } finally {
    await app.close()
    await proxy.close()
  }
  assert.deepEqual(proxy.targets, [probe('p-readonly'), probe('p-readonly')])
  // Said once for both requests: it lasts until the token is mended
  // (src/repeats.js); the second is counted, and said at close.
  const refused = 'accman: AccMan refused the service: check the url and token'
  assert.deepEqual(logs.filter((l) => l.level === 50).map((l) => [l.msg, l.detail, l.repeated]),
    [[refused, 'this call needs a token with the role charge', undefined], [refused, undefined, 1]])
  assert.equal(await acc.mint.tot('p-readonly'), 5)
})

test('check mode, a charge refused 403 after the work: 503 in its place, nothing owed, the role probed again', async () => {
  await acc.mint.mod('p-revoked', 100)
  const logs = []
  const unpaid = []
  const proxy = await proxyTo(acc.server.url)
  const { app, url } = await serviceApp({
    url: proxy.url, token: TOKENS.service, checkFreshMs: 0, onUnpaid: (...a) => unpaid.push(a)
  }, { logs })
  try {
    assert.equal((await get(url + '/w', 'p-revoked')).accman, '99') // the probe saw the charge role
    await restartWith({ service: 'read' }) // the token loses it
    const r = await get(url + '/rows?rows=25', 'p-revoked') // admitted on tot; the charge meets 403
    assert.deepEqual([r.status, r.body.error, r.headers.get('retry-after'), r.accman, r.headers.get('x-rows')],
      [503, 'unavailable', '1', null, null])
    assert.equal(app.served, 2)
    const again = await get(url + '/w', 'p-revoked') // probed again: 403 before the handler
    assert.equal(again.status, 503)
    assert.equal(app.served, 2)
    await restartWith({}) // the role is back: a probe sees it
    assert.deepEqual(Object.values(await get(url + '/w', 'p-revoked')).slice(0, 2), [200, '98'])
    const stats = app.accman.stats
    assert.deepEqual([stats.owed, stats.stranded, stats.unpaid_requests], [0, 0, 0])
  } finally {
    await app.close()
    await proxy.close()
    acc.server.writeTokens()
  }
  assert.deepEqual(unpaid, [])
  assert.ok(messages(logs, 50).includes('accman: AccMan refused the charge: check the token\'s roles; refusing with 503'))
  assert.deepEqual(proxy.targets.filter((t) => !t.includes('&key=')),
    [probe('p-revoked'), '/tot?cred=p-revoked', probe('p-revoked'), probe('p-revoked')])
  assert.equal(await acc.mint.tot('p-revoked'), 98)
})

test('AccMan restarted mid-test: the charge owed meanwhile lands once, and the log says so; requests go on after', async () => {
  await acc.mint.mod('p-restart', 10)
  const logs = []
  // AccMan is cut off by the proxy at once, and stopped once the charge is
  // owed: its stop, which takes a while on a loaded machine, is no part of
  // the checkFreshMs in which the second request is admitted.
  const proxy = await proxyTo(acc.server.url)
  await withService({ url: proxy.url }, async (url, app) => {
    assert.equal((await get(url + '/w', 'p-restart')).accman, '9')
    await proxy.set('down')
    // Admitted on the balance AccMan reported just now (checkFreshMs); the
    // charge cannot land, so the response goes without the header and the
    // charge is owed.
    const during = await get(url + '/w', 'p-restart')
    assert.deepEqual([during.status, during.accman], [200, null])
    assert.equal(app.accman.stats.owed, 1)
    await acc.server.stop()
    await sleep(1100) // past checkFreshMs: the next admission must ask AccMan
    const refused = await get(url + '/w', 'p-restart')
    assert.equal(refused.status, 503)
    await acc.server.start()
    await proxy.set('pass')
    assert.ok(await app.accman.drain(30000))
    assert.equal(app.accman.stats.stranded, 0)
    assert.equal(app.accman.stats.charged, 2) // the owed charge is counted once it lands
    const after = await get(url + '/w', 'p-restart')
    assert.deepEqual([after.status, after.accman], [200, '7'])
  }, logs).finally(() => proxy.close())
  // The warning as the charge was queued, and word that it landed.
  assert.deepEqual(messages(logs, 40).filter((m) => m.includes('queued')), ['accman: charge queued to retry'])
  assert.deepEqual(messages(logs, 30).filter((m) => m.includes('owed')), ['accman: no call owed any more: 1 landed, 0 stranded'])
  const keys = await chargeKeys('p-restart')
  assert.equal(keys.length, 3)
  assert.equal(new Set(keys).size, 3)
})

test('check mode, AccMan\'s store takes no writes: once a charge meets its 503, admission refuses, not serves on', async () => {
  // AccMan opens its write-ahead log at 3 MiB and grows it ahead of its
  // records, each at least a 4 KiB block: with no file allowed past 3 MiB,
  // a commit a few hundred batches on fails, and the store takes no more
  // writes while reads go on.  One mod at a time is one batch each.
  const failing = new AccManServer({ fileSizeKiB: 3072 })
  await failing.start()
  const fund = new accman.AccManClient({ url: failing.url, token: TOKENS.mint, retries: 0 })
  const { app, url } = await serviceApp({ url: failing.url, token: TOKENS.service })
  try {
    await fund.mod('p-nowrites', 100)
    assert.deepEqual(Object.values(await get(url + '/w', 'p-nowrites')).slice(0, 2), [200, '99'])
    let failed = null
    for (let n = 0; failed === null && n < 5000; n++) await fund.mod('p-filler', 1).catch((e) => { failed = e })
    assert.equal(failed && failed.code, 'unavailable')
    assert.equal(await fund.tot('p-nowrites'), 99) // reads go on
    // Admitted on the balance just charged; its charge meets the 503: owed.
    assert.deepEqual(Object.values(await get(url + '/w', 'p-nowrites')).slice(0, 2), [200, null])
    assert.equal(app.accman.stats.owed, 1)
    const refused = await get(url + '/w', 'p-nowrites')
    assert.deepEqual([refused.status, refused.body.error], [503, 'unavailable'])
    // Reopened with room, AccMan takes the owed charge, and admission goes on.
    await failing.stop()
    failing.fileSizeKiB = null
    await failing.start()
    // The owed charge is retried after pauses doubling up to
    // OWED_PAUSE_MAX_MS: the longer AccMan took to come back, the longer
    // the pause under way, and a loaded machine restarts it slowly.
    assert.ok(await app.accman.drain(30000))
    assert.deepEqual(Object.values(await get(url + '/w', 'p-nowrites')).slice(0, 2), [200, '97'])
    assert.equal(app.accman.stats.owed, 1)
  } finally {
    await app.close()
    await fund.close()
    await failing.close()
  }
})

// A service behind a proxy, with `owe` charges owed (AccMan down: known
// not to have landed), closed while AccMan holds its reply to the first
// owed charge back past the drain time.  What it logged and gave onUnpaid,
// an async one that bills a little after it is called: close waits for it.
async function closeWithOwed (cred, owe, options) {
  const { CLOSE_DRAIN_MS } = accman.limits
  await acc.mint.mod(cred, 10)
  const unpaid = []
  const logs = []
  const proxy = await proxyTo(acc.server.url)
  const { app, url } = await serviceApp({
    url: proxy.url, token: TOKENS.service, checkFreshMs: 60000, ...options,
    onUnpaid: async (...a) => { await sleep(50); unpaid.push(a) }
  }, { logs })
  try {
    assert.equal((await get(url + '/w', cred)).accman, '9')
    await proxy.set('down') // admitted on the fresh balance: their charges are owed
    for (let i = 0; i < owe; i++) assert.deepEqual(Object.values(await get(url + '/w', cred)).slice(0, 2), [200, null])
    assert.equal(app.accman.stats.owed, owe)
    const mods = () => proxy.targets.filter((t) => t.startsWith('/mod?')).length
    const sent = mods()
    await proxy.set('delay', CLOSE_DRAIN_MS + 1500) // AccMan applies at once; its reply comes late
    await until(() => mods() > sent)
    await app.close()
  } finally {
    await proxy.close()
  }
  return { stats: app.accman.stats, unpaid, errors: messages(logs, 50), warnings: messages(logs, 40) }
}

test('at close, an owed charge under way past the drain time lands and is not reported unpaid', async () => {
  const { CLOSE_DRAIN_MS } = accman.limits
  // The attempt under way outlives the delay.
  const { stats, unpaid, errors, warnings } = await closeWithOwed('p-close', 2, { timeoutMs: CLOSE_DRAIN_MS + 6500 })
  // Each owed call is a warning as it is queued: the log's first sign that AccMan fails.
  assert.deepEqual(warnings.filter((m) => m.includes('queued')), Array(2).fill('accman: charge queued to retry'))
  // The first owed charge landed during close: not unpaid.  The second
  // never started: stranded, unpaid, never charged.
  assert.equal(await acc.mint.tot('p-close'), 8)
  assert.equal((await chargeKeys('p-close')).length, 2)
  assert.equal(stats.stranded, 1)
  assert.deepEqual(unpaid, [['p-close', 1n, 'shutting down']])
  assert.deepEqual(errors, ['accman: stranded charge: the account owes 1'])
})

test('at close, an owed charge that timed out may have landed: stranded of unknown outcome, not unpaid', async () => {
  const { CLOSE_DRAIN_MS } = accman.limits
  // It gives up on the reply after the drain time, before the reply comes.
  const { stats, unpaid, errors } = await closeWithOwed('p-close-unknown', 1,
    { retries: 0, timeoutMs: CLOSE_DRAIN_MS + 500 })
  assert.equal(await acc.mint.tot('p-close-unknown'), 8) // it landed
  assert.equal(stats.stranded, 1)
  assert.deepEqual(unpaid, []) // so it is not billed a second time
  assert.match(errors.join('\n'), /stranded charge, outcome unknown: look for \S+-c in the account's history/)
})

// How long close() may take, with a connection kept alive at its start:
// CLOSE_KEEP_ALIVE_MS, Node's keepAliveTimeoutBuffer (1 s) where it has
// one, and room for a loaded machine, far under fastify's keepAliveTimeout
// (72 s) and Node's "never".  The tests wait for it only when close() hangs,
// on a timer that does not hold the test's process open.
const CLOSED_WITHIN_MS = 10000
const timedOut = () => require('node:timers/promises').setTimeout(CLOSED_WITHIN_MS, undefined, { ref: false })

test('close() ends with the request under way: its kept-alive connection is closed, not held for keepAliveTimeout', async () => {
  await acc.mint.mod('p-close-alive', 10)
  const { app, url } = await serviceApp({ url: acc.server.url, token: TOKENS.service })
  let closed = false
  try {
    const asked = get(url + '/gated', 'p-close-alive') // fetch keeps its connection alive
    await until(() => app.served === 1)
    // The handler waits on its gate until fastify closes the server.
    const closing = app.close().then(() => { closed = true })
    const r = await asked
    assert.deepEqual([r.status, r.accman, r.headers.get('connection')], [200, '9', 'close'])
    await Promise.race([closing, timedOut()])
    assert.ok(closed, 'close() still waits on the kept-alive connection')
  } finally {
    if (!closed) app.server.closeAllConnections()
    await app.close()
  }
})

// The plugin registered in a scope of its own, on a server whose
// keepAliveTimeout is `keepAliveMs` (fastify's own by default): a route of
// the root never meets the plugin's onSend hook, so its response keeps the
// connection alive.  Whether close() returned within CLOSED_WITHIN_MS.
async function closeOutsideScope (keepAliveMs) {
  const app = Fastify()
  if (keepAliveMs !== undefined) app.server.keepAliveTimeout = keepAliveMs
  let started, open
  const handling = new Promise((resolve) => { started = resolve })
  // The handler ends once fastify has closed the server, its connection
  // busy then, however slow the machine.
  const gate = new Promise((resolve) => { open = resolve })
  const serverClose = app.server.close
  app.server.close = function (...args) {
    const closing = serverClose.apply(this, args)
    open()
    return closing
  }
  app.get('/admin/slow', async () => {
    started()
    await gate
    return { slow: true }
  })
  app.register(async (api) => {
    await api.register(accman, { url: acc.server.url, token: TOKENS.service })
    api.get('/w', async () => ({ ok: true }))
  }, { prefix: '/api' })
  const url = await app.listen({ port: 0, host: '127.0.0.1' })
  let closed = false
  try {
    const asked = fetch(url + '/admin/slow') // fetch keeps its connection alive
    await handling
    const closing = app.close().then(() => { closed = true })
    const r = await asked
    assert.deepEqual([r.status, r.headers.get('connection')], [200, 'keep-alive'])
    await r.json()
    await Promise.race([closing, timedOut()])
    return closed
  } finally {
    if (!closed) app.server.closeAllConnections()
    await app.close()
  }
}

test('close() ends with a request under way outside the plugin\'s scope: its connection is not held for keepAliveTimeout', async () => {
  // fastify's keepAliveTimeout (72 s), and 0 (a server of a serverFactory),
  // which Node reads as "never".
  const closed = await Promise.all([closeOutsideScope(), closeOutsideScope(0)])
  assert.deepEqual(closed, [true, true], 'close() still waits on the kept-alive connection')
})

// A connection that never sent a request is not idle to Node: server.close()
// leaves it open until its client closes it, and fastify runs the onClose
// hooks, the owed calls' drain among them, only once every connection has
// ended.  A proxy or a browser opens such connections ahead of requests.
test('close() ends with a connection open that never sent a request: it is ended, not waited for', async () => {
  const { app } = await serviceApp({ url: acc.server.url, token: TOKENS.service })
  const accepted = new Promise((resolve) => app.server.once('connection', resolve))
  const socket = net.connect(app.server.address().port, '127.0.0.1')
  socket.on('error', () => {})
  let closed = false
  try {
    await accepted
    const ended = new Promise((resolve) => socket.once('close', resolve))
    const closing = app.close().then(() => { closed = true })
    await Promise.race([closing, timedOut()])
    assert.ok(closed, 'close() still waits on the connection that sent nothing')
    await ended
  } finally {
    socket.destroy()
    await app.close()
  }
})

// A connection on which a request has begun is left to end as its
// response does: one whose request's head has come in part, for
// CLOSE_HEAD_MS (fastify, closing, answers it with its 503), and one
// handed over by an 'upgrade' (a WebSocket's), which the service's own
// code ends, for good.
test('close() leaves the connections whose request has begun: a head come in part, an upgrade', async () => {
  let upgraded = null
  const { app } = await serviceApp({ url: acc.server.url, token: TOKENS.service }, {
    before: (app) => app.server.on('upgrade', (request, socket) => {
      upgraded = socket
      socket.write('HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: test\r\n\r\n')
    })
  })
  const port = app.server.address().port
  // A client socket, with the service's side of it and what it received.
  const open = async () => {
    const accepted = new Promise((resolve) => app.server.once('connection', resolve))
    const socket = net.connect(port, '127.0.0.1')
    socket.on('error', () => {})
    const c = { socket, text: '', server: await accepted }
    socket.setEncoding('utf8')
    socket.on('data', (d) => { c.text += d })
    c.closed = new Promise((resolve) => socket.once('close', resolve))
    return c
  }
  const idle = await open()
  const upgrade = await open()
  const partial = await open()
  let closed = false
  try {
    upgrade.socket.write('GET /ws HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: test\r\n\r\n')
    partial.socket.write('GET /w HTTP/1.1\r\nHost: x\r\n')
    await until(() => upgrade.text.startsWith('HTTP/1.1 101 ') && partial.server.bytesRead > 0)
    const closing = app.close().then(() => { closed = true })
    // The idle one ended: the plugin has looked at every connection.
    await Promise.race([idle.closed, timedOut()])
    assert.ok(idle.socket.destroyed, 'the connection that sent nothing is not ended')
    assert.deepEqual([upgraded.destroyed, partial.server.destroyed], [false, false])
    partial.socket.write('accman: p-begun\r\n\r\n')
    await Promise.race([partial.closed, timedOut()])
    assert.match(partial.text, /^HTTP\/1\.1 503 Service Unavailable\r\n/)
    // Handed over, no HTTP parser reads it: past CLOSE_HEAD_MS it is kept.
    await sleep(accman.limits.CLOSE_HEAD_MS + 300)
    assert.equal(upgraded.destroyed, false)
    upgraded.end()
    await Promise.race([closing, timedOut()])
    assert.ok(closed, 'close() still waits')
  } finally {
    for (const c of [idle, upgrade, partial]) c.socket.destroy()
    await app.close()
  }
})

// A head that never comes whole holds close() for CLOSE_HEAD_MS, no
// longer: its connection is ended, nothing having been asked on it.
test('close() ends a connection whose request\'s head never comes whole, after CLOSE_HEAD_MS', async () => {
  const { CLOSE_HEAD_MS } = accman.limits
  const { app } = await serviceApp({ url: acc.server.url, token: TOKENS.service })
  const accepted = new Promise((resolve) => app.server.once('connection', resolve))
  const socket = net.connect(app.server.address().port, '127.0.0.1')
  socket.on('error', () => {})
  let text = ''
  socket.setEncoding('utf8')
  socket.on('data', (d) => { text += d })
  const ended = new Promise((resolve) => socket.once('close', resolve))
  let closed = false
  try {
    const server = await accepted
    socket.write('GET /w HTTP/1.1\r\nHost: x\r\n')
    await until(() => server.bytesRead > 0)
    const t0 = Date.now()
    const closing = app.close().then(() => { closed = true })
    await Promise.race([closing, timedOut()])
    assert.ok(closed, 'close() still waits on the head that never came whole')
    assert.ok(Date.now() - t0 >= CLOSE_HEAD_MS, 'the head was not given CLOSE_HEAD_MS')
    await ended
    assert.equal(text, '')
  } finally {
    socket.destroy()
    await app.close()
  }
})

// fastify closes a server of a serverFactory only if fastify.listen()
// listened on it: one the service listens on itself, and may share with
// other handlers, goes on serving after fastify's close().
test('close() leaves a server that fastify does not close keeping its connections alive as before', async () => {
  const shared = require('node:http').createServer()
  shared.keepAliveTimeout = 5000
  const app = Fastify({
    serverFactory: (handler) => shared.on('request', (req, res) => req.url === '/other' ? res.end('other') : handler(req, res))
  })
  await app.register(accman, { url: acc.server.url, token: TOKENS.service })
  await new Promise((resolve) => shared.listen(0, '127.0.0.1', resolve))
  let socket
  try {
    await app.ready()
    // A connection that has sent nothing yet is kept too: the server serves on.
    const accepted = new Promise((resolve) => shared.once('connection', resolve))
    socket = net.connect(shared.address().port, '127.0.0.1')
    const ended = new Promise((resolve) => socket.once('close', resolve))
    let answer = ''
    socket.setEncoding('utf8')
    socket.on('data', (d) => { answer += d })
    await accepted
    await app.close()
    const r = await fetch(`http://127.0.0.1:${shared.address().port}/other`)
    assert.deepEqual([await r.text(), r.headers.get('keep-alive')], ['other', 'timeout=5'])
    socket.end('GET /other HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n')
    await ended
    assert.match(answer, /^HTTP\/1\.1 200 [\s\S]*other$/)
  } finally {
    socket?.destroy()
    shared.closeAllConnections()
    await new Promise((resolve) => shared.close(resolve))
  }
})

test('checkFreshMs 0: every admission asks AccMan', async () => {
  await acc.mint.mod('p-fresh', 10)
  await withService({ checkFreshMs: 0 }, async (url) => {
    assert.equal((await get(url + '/w', 'p-fresh')).status, 200)
    await acc.server.stop()
    assert.equal((await get(url + '/w', 'p-fresh')).status, 503)
    await acc.server.start()
  })
})

// Counts a service's connections from now on, to wait until each has
// closed: the service has then seen every consumer that left.
function connectionsOf (server) {
  const c = { opened: 0, closed: 0, allClosed: () => c.opened > 0 && c.closed === c.opened }
  server.on('connection', (socket) => {
    c.opened++
    socket.on('close', () => { c.closed++ })
  })
  return c
}

// The handler waits on its gate until the service has seen the consumer's
// connection close, however slow the machine: a sleep could let the
// consumer leave before the handler ran, or the handler end first.
async function leaveWhileHandled (cred, init) {
  await acc.mint.mod(cred, 10)
  await withService({}, async (url, app) => {
    const connections = connectionsOf(app.server)
    const ac = new AbortController()
    const pending = fetch(url + '/gated', { ...init, headers: { accman: cred, ...init.headers }, signal: ac.signal })
      .catch((e) => e.name)
    await until(() => app.served === 1) // in the handler
    ac.abort()
    assert.equal(await pending, 'AbortError')
    await until(() => connections.allClosed())
    app.openGate()
    await until(() => app.gatesPassed === 1)
    assert.equal(app.accman.stats.charged, 0)
  })
  assert.equal(await acc.mint.tot(cred), 10) // a charge under way lands before close() returns
}

test('a consumer that leaves before the response is not charged', async () => {
  await leaveWhileHandled('p-abort', {})
})

test('a consumer that leaves after sending a body, before the response, is not charged', async () => {
  await leaveWhileHandled('p-abort-post', { method: 'POST', body: '{"a":1}', headers: { 'content-type': 'application/json' } })
})

test('metrics render the counters in the Prometheus text format', async () => {
  await acc.mint.mod('p-metrics', 3)
  await withService({}, async (url, app) => {
    await get(url + '/w', 'p-metrics')
    assert.match(app.accman.metrics(), /^accman_plugin_charged_total 1$/m)
    assert.match(app.accman.metrics(), /^accman_plugin_requests_total 1$/m)
  })
})

test('options are checked at register', async () => {
  for (const bad of [{ mode: 'maybe' }, { onUnavailable: 'ajar' }, { cost: -1 }, { cost: 1.5 }, { header: 'a b' },
    { holdTtlS: 0 }, { exempt: '/x' }, { url: 'ftp://x' }, { checkFreshMs: -1 },
    { cost: null }, { mode: null }, { exempt: null }, { chargeErrors: null }, { timeoutMs: null },
    { retries: null }]) {
    const app = Fastify()
    app.register(accman, { url: acc.server.url, ...bad })
    await assert.rejects(app.ready(), TypeError, JSON.stringify(bad))
  }
})

test('a wrong option is refused at ready(), naming it: a non-boolean chargeErrors, a misspelt name', async () => {
  for (const [bad, named] of [
    [{ chargeErrors: 'yes' }, /^chargeErrors must be true or false, not "yes"$/],
    [{ chargeErrors: 1 }, /^chargeErrors must be true or false, not 1$/],
    [{ modee: 'reserve' }, /^unknown option modee: fastify-accman takes url, token, /],
    [{ mode: 'reserve', holdTTLS: 5, onUnpayed: () => {} }, /^unknown options holdTTLS, onUnpayed: /],
    // A path without its / names no route and no URL: as the Python middleware, refused.
    [{ exempt: ['/health', 'docs/*'] }, /^exempt: "docs\/\*" is not a path starting with \/, nor \*$/],
    [{ exempt: [''] }, /^exempt: "" is not a path starting with \/, nor \*$/],
    // The client's own options show a wrong value as the plugin's do.
    [{ timeoutMs: '2000' }, /^timeoutMs must be an integer from 1 to 3600000, not "2000"$/],
    [{ onUnpaid: 'bill' }, /^onUnpaid must be a function, not "bill"$/],
    // Check mode holds nothing: a ttl would go unused, unsaid.  As the Python middleware.
    [{ holdTtlS: 30 }, /^holdTtlS is the ttl of reserve mode's holds: with mode 'check' nothing is held; leave it out, or set mode 'reserve'$/],
    [{ mode: 'check', holdTtlS: 90 }, /^holdTtlS is the ttl of reserve mode's holds: with mode 'check' /],
    [{ holdTtlS: 0 }, /^holdTtlS must be an integer from 1 to 86400, not 0$/] // a bad value: said as such
  ]) {
    const app = Fastify()
    app.register(accman, { url: acc.server.url, ...bad })
    await assert.rejects(app.ready(), (err) => err instanceof TypeError && named.test(err.message), JSON.stringify(bad))
  }
  // With a client given, the options that make one would go unused: refused.
  const client = new accman.AccManClient({ url: acc.server.url, bigint: true })
  for (const [bad, named] of [
    [{ client, timeoutMs: 100, retries: 0 }, /^timeoutMs, retries are options of the client: with client given, set them on that AccManClient$/],
    [{ client, url: acc.server.url }, /^url is an option of the client: with client given, set it on /]
  ]) {
    const app = Fastify()
    app.register(accman, bad)
    await assert.rejects(app.ready(), (err) => err instanceof TypeError && named.test(err.message), named.source)
  }
  // Anything but an AccManClient is refused as the client, at ready(), not
  // by each request that calls it; null too (no client is left out).
  for (const [bad, named] of [
    [{ client: {} }, /^client must be an AccManClient made with \{ bigint: true \}, not an object$/],
    [{ client: { bigint: true } }, /^client must be an AccManClient made with \{ bigint: true \}, not an object$/],
    [{ client: 'http://127.0.0.1:9' }, /^client must be an AccManClient made with \{ bigint: true \}, not "http:/],
    [{ client: null, url: acc.server.url }, /^client must be an AccManClient made with \{ bigint: true \}, not null$/],
    [{ client: new accman.AccManClient({ url: acc.server.url }) }, /^a client given to the plugin must be made with \{ bigint: true \}$/]
  ]) {
    const app = Fastify()
    app.register(accman, bad)
    await assert.rejects(app.ready(), (err) => err instanceof TypeError && named.test(err.message), named.source)
    if (bad.client instanceof accman.AccManClient) await bad.client.close()
  }
  await client.close()
  // fastify's own register options reach the plugin too, and are not refused.
  const app = Fastify()
  app.register(accman, { url: acc.server.url, chargeErrors: false, logLevel: 'warn', token: undefined })
  await app.ready()
  await app.close()
})

test('a wrong route price is refused at ready(), naming the route and the value', async () => {
  for (const [value, shown] of [[-5, '-5'], ['5', '"5"'], [1.5, '1.5'], [true, 'true'], [null, 'null'], [{}, 'an object'], [Symbol('x'), 'a symbol']]) {
    const app = Fastify()
    app.register(accman, { url: acc.server.url })
    app.register(async (scope) => {
      scope.get('/ok', { config: { accman: 5n } }, async () => 'ok')
      scope.get('/bad', { config: { accman: value } }, async () => 'bad')
    }, { prefix: '/api' })
    await assert.rejects(app.ready(), (err) => err instanceof TypeError &&
      err.message === 'config.accman of the route GET /api/bad must be a non-negative integer ' +
        `(a safe-integer number, or a bigint up to 2^63-1), a function or false, not ${shown}`,
    String(value))
  }
  // A route added outside a plugin is refused at once, by fastify.route().
  const app = Fastify()
  await app.register(accman, { url: acc.server.url })
  assert.throws(() => app.get('/bad', { config: { accman: -5 } }, async () => 'bad'), /GET \/bad .* not -5$/)
  await app.close()
})

test('a route with a price that exempt also names is refused, as the Python middleware refuses such a price', async () => {
  for (const [exempt, path, by] of [[['/public/*'], '/public/premium', '/public/*'], [['/report'], '/report', '/report'], [['*'], '/x', '*']]) {
    const app = Fastify()
    app.register(accman, { url: acc.server.url, exempt })
    app.register(async (scope) => { scope.get(path, { config: { accman: 5 } }, async () => 'paid') })
    await assert.rejects(app.ready(), (err) => err instanceof TypeError &&
      err.message === `config.accman of the route GET ${path} is a price, but exempt names the route (by ${JSON.stringify(by)}): an exempt route is never metered`,
    path)
  }
  // An exempt route with no price of its own, or with accman: false, is fine.
  const app = Fastify()
  await app.register(accman, { url: acc.server.url, exempt: ['/public/*'] })
  app.get('/public/a', async () => 'a')
  app.get('/public/b', { config: { accman: false } }, async () => 'b')
  await app.ready()
  await app.close()
})

// fastify runs the plugin's onRoute hook only for routes added after the
// plugin loads, and gives its request hooks to those added before too.
// ready() with a logger: the warnings it logged (level 40).
async function readyWarnings (build) {
  const logs = []
  const app = Fastify({ logger: { level: 'info', stream: { write: (line) => logs.push(JSON.parse(line)) } } })
  build(app)
  await app.ready()
  return { app, warnings: messages(logs, 40) }
}

const UNCHECKED_TAIL = '. Register the plugin before the routes it meters (await fastify.register(...) before adding them)'

test('a route the plugin meters but was added before it is named at ready(), a warning', async () => {
  const handler = async () => 'paid'
  const opts = { url: acc.server.url }
  for (const [build, named] of [
    // Declared before register(), with a price nobody checked.
    [(app) => {
      app.get('/early', { config: { accman: 5 } }, handler)
      app.register(accman, opts)
    }, 'a route added before the plugin, whose price is checked at each request instead of at ready(): GET,HEAD /early'],
    // Declared after a register() that is not awaited: added before the plugin loads.
    [(app) => {
      app.register(accman, opts)
      app.post('/a/:x-:y', { config: { accman: 5 } }, handler)
      app.get('/v', { constraints: { version: '1.2.0' } }, handler)
      app.addHttpMethod('M-SEARCH')
      app.route({ method: 'M-SEARCH', url: '/ssdp', handler })
    }, '3 routes added before the plugin, whose price is checked at each request instead of at ready(): ' +
      'POST /a/:x-:y; GET,HEAD /v {"version":"1.2.0"}; M-SEARCH /ssdp'],
    // In a plugin registered before it, which it meters all the same.
    [(app) => {
      app.register(async (scope) => {
        scope.get('/files/*', handler)
        scope.get('/', { config: { accman: false } }, handler)
      }, { prefix: '/v1' })
      app.register(accman, opts)
    }, '3 routes added before the plugin, whose price is checked at each request instead of at ready(): ' +
      'GET,HEAD /v1; GET,HEAD /v1/; GET,HEAD /v1/files/*']
  ]) {
    const { app, warnings } = await readyWarnings((app) => {
      build(app)
      app.register(async (scope) => scope.get('/late', handler)) // added after the plugin loads: checked, not named
    })
    assert.deepEqual(warnings, ['accman: ' + named + UNCHECKED_TAIL])
    await app.close()
  }
})

test('exempt entries that name no route are named at ready(), a warning', async () => {
  const handler = async () => 'ok'
  const { app, warnings } = await readyWarnings((app) => {
    app.get('/early', handler) // added before the plugin: found by printRoutes()
    app.register(accman, {
      url: acc.server.url,
      exempt: ['/health', '/helth', '/early', '/docs/*', '/nodocs/*', '/users/7', '/v1', '/v1/']
    })
    app.register(async (scope) => {
      scope.get('/health', handler)
      scope.get('/docs/a', handler)
      scope.get('/users/:id', handler)
    })
    app.register(async (scope) => scope.get('/', handler), { prefix: '/v1' })
  })
  // '/v1/' names no route: a prefixed '/' route is '/v1' whichever URL asked.
  assert.deepEqual(warnings.filter((w) => !w.includes('added before the plugin')), [
    'accman: exempt names no route: /helth, /nodocs/*, /users/7, /v1/; it exempts only requests that no ' +
    'route answers (exempt names routes by their declared path)'])
  await app.close()
})

test('a bad price on a route added before the plugin fails its requests, naming the route, never serves them free', async () => {
  await acc.mint.mod('p-early', 10)
  let served = 0
  const { app } = await readyWarnings((app) => {
    app.get('/early', { config: { accman: '5' } }, async () => { served++; return 'paid' })
    app.register(accman, { url: acc.server.url, token: TOKENS.service })
  })
  const url = await app.listen({ port: 0, host: '127.0.0.1' })
  try {
    const r = await get(url + '/early', 'p-early')
    // Its 500 names the route, which no onRoute check of the plugin's met.
    assert.deepEqual([r.status, r.body.message], [500, 'config.accman of the route GET /early must be ' +
      'a non-negative integer (a safe-integer number, or a bigint up to 2^63-1), not "5"'])
    assert.equal(served, 0)
    assert.equal(await acc.mint.tot('p-early'), 10)
  } finally {
    await app.close()
  }
})

test('ready() names ROUTES_NAMED_MAX routes the plugin never checked, and counts the rest', async () => {
  const { ROUTES_NAMED_MAX } = accman.limits
  const { app, warnings } = await readyWarnings((app) => {
    for (let i = 0; i < ROUTES_NAMED_MAX + 2; i++) app.post(`/r${String(i).padStart(2, '0')}`, async () => 'paid')
    app.register(accman, { url: acc.server.url })
  })
  const names = Array.from({ length: ROUTES_NAMED_MAX }, (_, i) => `POST /r${String(i).padStart(2, '0')}`)
  assert.deepEqual(warnings, [`accman: ${ROUTES_NAMED_MAX + 2} routes added before the plugin, whose price is ` +
    `checked at each request instead of at ready(): ${names.join('; ')}; and 2 more` + UNCHECKED_TAIL])
  await app.close()
})

test('routes outside the plugin\'s scope, and a CORS plugin\'s preflight route registered first, pass ready()', async () => {
  await acc.mint.mod('p-scope', 10)
  const app = Fastify()
  await app.register(require('@fastify/cors'), { origin: true }) // before the plugin: its headers are on the refusals
  app.get('/admin', async () => 'not metered') // outside the scope below
  app.register(async (api) => {
    await api.register(accman, { url: acc.server.url, token: TOKENS.service })
    api.get('/w', async () => ({ ok: true }))
  }, { prefix: '/api' })
  const url = await app.listen({ port: 0, host: '127.0.0.1' })
  try {
    const origin = { origin: 'https://app.example' }
    const preflight = await fetch(url + '/api/w', {
      method: 'OPTIONS', headers: { ...origin, 'access-control-request-method': 'GET', 'access-control-request-headers': 'accman' }
    })
    assert.deepEqual([preflight.status, preflight.headers.get('access-control-allow-origin')], [204, 'https://app.example'])
    const refused = await get(url + '/api/w', undefined, { headers: origin })
    assert.deepEqual([refused.status, refused.headers.get('access-control-allow-origin')], [401, 'https://app.example'])
    const paid = await get(url + '/api/w', 'p-scope')
    assert.deepEqual([paid.status, paid.accman], [200, '9'])
    assert.equal((await fetch(url + '/admin')).status, 200)
  } finally {
    await app.close()
  }
})

test('the README\'s CORS registration lets a page read the balance header of a 200 and a 402', async () => {
  await acc.mint.mod('p-cors-read', 1)
  const readme = require('node:fs').readFileSync(require('node:path').join(__dirname, '..', 'README.md'), 'utf8')
  const snippet = /register\(require\('@fastify\/cors'\), (\{[^\n]*\})\)/.exec(readme)
  assert.ok(snippet, 'the README shows how to register @fastify/cors')
  const corsOptions = require('node:vm').runInNewContext(`(${snippet[1]})`)
  const app = Fastify()
  await app.register(require('@fastify/cors'), corsOptions)
  await app.register(accman, { url: acc.server.url, token: TOKENS.service })
  app.get('/w', async () => ({ ok: true }))
  const url = await app.listen({ port: 0, host: '127.0.0.1' })
  try {
    const origin = { origin: [].concat(corsOptions.origin)[0] }
    const exposed = (r) => (r.headers.get('access-control-expose-headers') || '').toLowerCase().split(/\s*,\s*/)
    const paid = await get(url + '/w', 'p-cors-read', { headers: { ...origin, accman: 'p-cors-read' } })
    assert.deepEqual([paid.status, paid.accman], [200, '0'])
    assert.ok(exposed(paid).includes('accman'), 'a page can read the balance of a paid response')
    const poor = await get(url + '/w', 'p-cors-read', { headers: { ...origin, accman: 'p-cors-read' } })
    assert.deepEqual([poor.status, poor.accman], [402, '0'])
    assert.ok(exposed(poor).includes('accman'), 'a page can read the balance of a 402')
  } finally {
    await app.close()
  }
})

test('a printRoutes() the plugin cannot read is a warning at ready(), not a silent pass', async () => {
  const logs = []
  const app = Fastify({ logger: { level: 'info', stream: { write: (line) => logs.push(JSON.parse(line)) } } })
  app.printRoutes = () => '(the routes in another shape)'
  await app.register(accman, { url: acc.server.url })
  app.get('/w', async () => 'paid')
  await app.ready()
  await app.close()
  assert.deepEqual(messages(logs, 40),
    ['accman: printRoutes() is not in the shape known: routes added before the plugin are not found'])
})

test('check mode, a charge refused after the work: the 503 keeps the headers of other plugins\' hooks, none of the app\'s', async () => {
  await acc.mint.mod('p-headers', 100)
  const app = Fastify()
  await app.register(require('@fastify/cors'), { origin: true, exposedHeaders: 'x-request-id' })
  app.addHook('onRequest', async (request, reply) => { reply.header('x-request-id', request.id) })
  // onSend hooks before the plugin's: a CORS header is kept, any other dropped.
  app.addHook('onSend', async (request, reply) => { reply.header('access-control-allow-credentials', 'true').header('x-sent-before', 'app') })
  await app.register(accman, { url: acc.server.url, token: TOKENS.service, checkFreshMs: 0 })
  app.addHook('preHandler', async (request, reply) => { reply.header('x-before-handler', 'kept') })
  app.addHook('onSend', async (request, reply) => { reply.header('x-sent-after', 'on the 503') }) // after the plugin's
  app.get('/paid', async (request, reply) => {
    reply.header('x-rows', '25').header('etag', '"v1"').header('cache-control', 'public, max-age=600')
      .header('set-cookie', 'receipt=paid').type('text/html')
    return '<p>paid content</p>'
  })
  const url = await app.listen({ port: 0, host: '127.0.0.1' })
  const origin = 'https://app.example'
  try {
    const served = await fetch(url + '/paid', { headers: { accman: 'p-headers', origin } }) // the probe sees the charge role
    assert.deepEqual([served.status, served.headers.get('accman'), served.headers.get('x-rows'), await served.text()],
      [200, '99', '25', '<p>paid content</p>'])
    await restartWith({ service: 'read' }) // the token loses it: the charge after the work meets 403
    const r = await get(url + '/paid', 'p-headers', { headers: { accman: 'p-headers', origin } })
    assert.deepEqual([r.status, r.body.error, r.headers.get('retry-after'), r.headers.get('content-type')],
      [503, 'unavailable', '1', 'application/json; charset=utf-8'])
    const kept = ['access-control-allow-origin', 'access-control-expose-headers', 'access-control-allow-credentials',
      'x-request-id', 'x-before-handler', 'x-sent-after']
    assert.deepEqual(kept.map((h) => r.headers.get(h)), [origin, 'x-request-id', 'true', 'req-2', 'kept', 'on the 503'])
    const dropped = ['x-rows', 'etag', 'cache-control', 'set-cookie', 'x-sent-before', 'accman']
    assert.deepEqual(dropped.map((h) => r.headers.get(h)), dropped.map(() => null))
  } finally {
    await app.close()
    await restartWith({})
  }
  assert.equal(await acc.mint.tot('p-headers'), 99)
})

test('the headers the 503 keeps: those set before the handler but the body\'s, and CORS headers set since', () => {
  const { keptHeaders } = require('../src/headers')
  const before = { 'x-request-id': 'req-1', 'content-type': 'text/html', 'cache-control': 'public', 'set-cookie': ['s=1'] }
  const now = { ...before, 'x-rows': '25', 'set-cookie': ['s=1', 'receipt=paid'], 'access-control-allow-origin': '*' }
  assert.deepEqual(keptHeaders(before, now),
    { 'x-request-id': 'req-1', 'set-cookie': ['s=1'], 'access-control-allow-origin': '*' })
  // A response that a hook sent before the handler ran: only its CORS headers.
  assert.deepEqual(keptHeaders(null, now), { 'access-control-allow-origin': '*' })
})

test('a route answered past onSend (reply.hijack(), reply.raw) is named once: served free', async () => {
  await acc.mint.mod('p-hijack', 10)
  const logs = []
  const raw = Fastify({ logger: { level: 'info', stream: { write: (line) => logs.push(JSON.parse(line)) } } })
  await raw.register(accman, { url: acc.server.url, token: TOKENS.service })
  raw.get('/sse', async (request, reply) => {
    reply.hijack()
    reply.raw.writeHead(200, { 'content-type': 'text/event-stream' })
    reply.raw.end('data: 1\n\n')
  })
  const rawUrl = await raw.listen({ port: 0, host: '127.0.0.1' })
  try {
    for (let i = 0; i < 3; i++) {
      const r = await fetch(rawUrl + '/sse', { headers: { accman: 'p-hijack' } })
      assert.equal(r.status, 200)
      assert.equal(await r.text(), 'data: 1\n\n')
    }
    await until(() => messages(logs, 40).length >= 1)
  } finally {
    await raw.close()
  }
  assert.deepEqual(messages(logs, 40), ['accman: GET /sse was answered without fastify\'s onSend ' +
    '(reply.hijack() or a write to reply.raw): its requests are served free; answer it with reply.send() to meter it'])
  assert.equal(await acc.mint.tot('p-hijack'), 10) // free, as said
})

test('a consumer who leaves while the charge is in flight is charged, and it is said', async () => {
  await acc.mint.mod('p-left', 10)
  const proxy = await proxyTo(acc.server.url)
  const logs = []
  const { app, url } = await serviceApp({ url: proxy.url, token: TOKENS.service }, { logs })
  try {
    assert.equal((await get(url + '/w', 'p-left')).status, 200) // the role probe; the balance fresh
    await proxy.set('delay', 600) // AccMan applies the charge at once, its reply comes late
    const sent = proxy.targets.length
    const leaving = new AbortController()
    const asked = fetch(url + '/w', { headers: { accman: 'p-left' }, signal: leaving.signal })
    await until(() => proxy.targets.slice(sent).some((t) => t.startsWith('/mod?'))) // the charge is sent
    leaving.abort()
    await assert.rejects(asked)
    await until(() => messages(logs, 40).length >= 1)
  } finally {
    await app.close()
    await proxy.close()
  }
  assert.deepEqual(messages(logs, 40),
    ['accman: the consumer left while its charge was in flight: charged for a response it does not get'])
  assert.equal(await acc.mint.tot('p-left'), 8) // charged twice: the request served, the one left
})
