'use strict'
// A 503 from a front end before AccMan (nginx's page when its upstream is
// down, or its maintenance mode) told from AccMan's own 503 by the body
// (SPEC "Errors": AccMan's is {"error": CODE, "detail": ...}), against a
// real AccMan behind a real foreign HTTP server.  As the Python side's
// tests/test_proxy_503.py.

const test = require('node:test')
const assert = require('node:assert/strict')
const http = require('node:http')
const Fastify = require('fastify')
const accman = require('..')
const { TOKENS, sharedAccMan } = require('./helpers/accman')
const { serviceApp, get, messages } = require('./helpers/app')
const { errorOfReply } = require('../src/errors')

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms))

// What nginx answers when no upstream is up, or from `return 503;`.
const NGINX_503 = '<html>\r\n<head><title>503 Service Temporarily Unavailable</title></head>\r\n' +
  '<body>\r\n<center><h1>503 Service Temporarily Unavailable</h1></center>\r\n' +
  '<hr><center>nginx/1.24.0</center>\r\n</body>\r\n</html>\r\n'

// A foreign HTTP server before `upstreamUrl`: it passes each request on,
// and while `refuseWrites` is set answers every PATCH with nginx's 503 page
// (a front end in a read-only maintenance mode).  While `failWrites` is
// set, every PATCH fails so that its outcome is unknown: '502' answers
// nginx's 502, 'cut' passes it on (it lands) and destroys the connection
// with no reply, 'hang' never answers.  While `holdProbes` is set, a role
// probe waits before it is passed on (or failed, as `failWrites` was when
// it came).  `lines` are the requests it saw, as 'METHOD target'.
async function frontOf (upstreamUrl) {
  const up = new URL(upstreamUrl)
  const front = { refuseWrites: false, failWrites: null, holdProbes: false, lines: [] }
  const server = http.createServer(async (req, res) => {
    front.lines.push(`${req.method} ${req.url}`)
    const failing = req.method === 'PATCH' ? front.failWrites : null
    while (front.holdProbes && req.url.includes('&min=')) await sleep(5)
    if (failing === 'hang') return // until the client gives up, or close
    if (failing === '502') {
      res.writeHead(502, 'Bad Gateway', { server: 'nginx/1.24.0', 'content-type': 'text/html' })
      res.end()
      return
    }
    if (front.refuseWrites && req.method === 'PATCH') {
      res.writeHead(503, 'Service Temporarily Unavailable', { server: 'nginx/1.24.0', 'content-type': 'text/html' })
      res.end(NGINX_503)
      return
    }
    const headers = { ...req.headers, host: up.host }
    const pass = http.request({ host: up.hostname, port: up.port, method: req.method, path: req.url, headers }, (r) => {
      if (failing === 'cut') {
        r.resume()
        r.on('end', () => res.destroy())
        return
      }
      res.writeHead(r.statusCode, r.headers)
      r.pipe(res)
    })
    pass.on('error', () => res.destroy())
    req.pipe(pass)
  })
  await new Promise((resolve) => server.listen(0, '127.0.0.1', resolve))
  front.url = `http://127.0.0.1:${server.address().port}`
  front.close = () => {
    server.closeAllConnections()
    return new Promise((resolve) => server.close(resolve))
  }
  return front
}

// The plugin's calls among the request lines a front end saw, an owed
// charge's repeats (the same line: its key) left out.
function calls (lines) {
  const out = []
  const seen = new Set()
  for (const line of lines) {
    if (line.endsWith('-c')) {
      if (!seen.has(line)) out.push('charge')
      seen.add(line)
    } else if (line.includes('&min=')) {
      out.push('probe')
    } else if (line.startsWith('GET /tot?')) {
      out.push('tot')
    }
  }
  return out
}

const acc = sharedAccMan(test)
let front
test.beforeEach(async () => { front = await frontOf(acc.server.url) })
test.afterEach(async () => { await front.close() })

test('a proxy\'s 503 is not AccMan\'s: the change may have landed, and is not retried keyless', async () => {
  await acc.mint.mod('x-proxy', 10)
  front.refuseWrites = true
  const client = new accman.AccManClient({ url: front.url, token: TOKENS.service, retries: 2 })
  try {
    assert.equal(await client.tot('x-proxy'), 10) // reads pass
    const err = await client.mod('x-proxy', -1).catch((e) => e)
    assert.ok(err instanceof accman.ProxyUnavailable && err instanceof accman.OutcomeUnknown, String(err))
    assert.ok(!(err instanceof accman.Unavailable))
    assert.deepEqual([err.code, err.status], ['proxy_unavailable', 503])
    assert.ok(!err.detail.includes('AccMan answered'))
    // Keyed, it is repeated, and ends unknown: nothing says it did not land.
    await assert.rejects(client.hold('x-proxy', -3, { ttlS: 60, key: 'k1' }), accman.ProxyUnavailable)
  } finally {
    await client.close()
  }
  assert.deepEqual(front.lines.map((l) => l.split(' ')[0]), ['GET', 'PATCH', 'PATCH', 'PATCH', 'PATCH'])
  assert.equal(await acc.mint.tot('x-proxy'), 10)
  // AccMan's own 503 bodies stay its own; others are foreign.
  assert.ok(errorOfReply(503, { error: 'unavailable', detail: 'd' }) instanceof accman.Unavailable)
  assert.ok(errorOfReply(503, { error: 'busy', detail: 'd' }) instanceof accman.Busy)
  for (const foreign of [{ error: 'busy' }, { message: 'no healthy upstream' }, null]) {
    assert.ok(errorOfReply(503, foreign) instanceof accman.ProxyUnavailable, JSON.stringify(foreign))
  }
})

test('check mode names the proxy\'s 503 and probes writes after it, as after AccMan\'s own', async () => {
  // A front end that refuses writes and passes reads would have check mode
  // admit on tot and serve every request with its charge owed.
  await acc.mint.mod('x-check', 10)
  const logs = []
  const { app, url } = await serviceApp({ url: front.url, token: TOKENS.service, retries: 0 }, { logs })
  try {
    assert.equal((await get(url + '/w', 'x-check')).status, 200) // probe, charge
    front.refuseWrites = true
    const served = await get(url + '/w', 'x-check') // admitted on the balance; its charge owed
    assert.deepEqual([served.status, served.accman], [200, null])
    const refused = await get(url + '/w', 'x-check')
    assert.deepEqual([refused.status, refused.body.error], [503, 'unavailable'])
    assert.equal(app.accman.stats.owed, 1)
    front.refuseWrites = false // the owed charge lands
    assert.ok(await app.accman.drain(10000))
  } finally {
    await app.close()
  }
  // The second request is admitted on the balance the first charge answered.
  assert.deepEqual(calls(front.lines), ['probe', 'charge', 'charge', 'probe'])
  const warned = logs.filter((l) => l.level === 40 && l.msg === 'accman: AccMan unavailable; refusing with 503')
  assert.deepEqual(warned.map((l) => l.code), ['proxy_unavailable'])
  assert.ok(messages(logs, 40).some((m) => m.includes('queued')))
  assert.equal(await acc.mint.tot('x-check'), 8)
})

for (const failure of ['502', 'cut', 'hang']) {
  test(`check mode probes writes after a charge of unknown outcome (${failure}), until AccMan answers one`, async () => {
    // A charge that times out, meets a 502 or loses its connection after
    // sending may have landed, and says nothing of whether the next will:
    // admitted on the balance while writes keep failing so, every request
    // would be served with its charge owed.
    const cred = `x-unknown-${failure}`
    await acc.mint.mod(cred, 10)
    // The calls that pass wait on AccMan's commits, which a loaded machine
    // can slow to a good part of 200 ms; a hung call ends at timeoutMs,
    // kept short for it only.
    const timeoutMs = failure === 'hang' ? 400 : 5000
    const { app, url } = await serviceApp({ url: front.url, token: TOKENS.service, retries: 0, timeoutMs })
    const statuses = []
    try {
      statuses.push((await get(url + '/w', cred)).status) // probe, charge
      front.failWrites = failure
      statuses.push((await get(url + '/w', cred)).status) // admitted on the balance; owed
      statuses.push((await get(url + '/w', cred)).status) // the probe fails too: 503
      assert.equal(app.accman.stats.owed, 1)
      front.failWrites = null // the owed charge lands
      assert.ok(await app.accman.drain(10000))
      statuses.push((await get(url + '/w', cred)).status) // probe, charge
    } finally {
      await app.close()
    }
    assert.deepEqual(statuses, [200, 200, 503, 200])
    assert.deepEqual(calls(front.lines), ['probe', 'charge', 'charge', 'probe', 'probe', 'charge'])
    assert.equal(await acc.mint.tot(cred), 7)
  })
}

test('check mode: the requests in flight after a charge of unknown outcome share one probe', async () => {
  // A service under load met one transient failure with as many probe
  // writes as it had requests in flight: the requests that come while the
  // probe is under way wait for it, then read their balance.
  const cred = 'x-unknown-herd'
  await acc.mint.mod(cred, 100)
  const { app, url } = await serviceApp({ url: front.url, token: TOKENS.service, retries: 0, timeoutMs: 5000 })
  let statuses
  try {
    assert.equal((await get(url + '/w', cred)).status, 200) // probe, charge
    front.failWrites = '502'
    assert.equal((await get(url + '/w', cred)).status, 200) // admitted on the balance; owed
    front.failWrites = null
    statuses = (await Promise.all(Array.from({ length: 8 }, () => get(url + '/w', cred)))).map((r) => r.status)
    assert.ok(await app.accman.drain(10000))
  } finally {
    await app.close()
  }
  assert.deepEqual(statuses, Array(8).fill(200))
  assert.equal(calls(front.lines).filter((c) => c === 'probe').length, 2)
  assert.equal(await acc.mint.tot(cred), 90)
})

test('check mode: a probe answered before a charge failed leaves admission on the probe', async () => {
  // A probe sent before a charge of unknown outcome says nothing of the
  // writes since: its 409 put admission back on tot, and the next request,
  // writes still failing, was served with its charge owed.
  const cred = 'x-stale-probe'
  await acc.mint.mod(cred, 100)
  let goOn
  const slowGate = new Promise((resolve) => { goOn = resolve })
  const app = Fastify()
  // The probe held at the front waits for the test's steps: no call here
  // is meant to time out.
  await app.register(accman, { url: front.url, token: TOKENS.service, retries: 0, timeoutMs: 5000, checkFreshMs: 0 })
  app.get('/w', async () => ({ ok: true }))
  app.get('/slow', async () => { await slowGate; return { ok: true } })
  app.get('/missing', async (request, reply) => reply.code(404).send({})) // not charged
  await app.listen({ port: 0, host: '127.0.0.1' })
  const url = `http://127.0.0.1:${app.server.address().port}`
  const until = async (what, after) => { while (!calls(front.lines.slice(after)).includes(what)) await sleep(5) }
  let last, next
  try {
    assert.equal((await get(url + '/w', cred)).status, 200) // probe, charge
    let n = front.lines.length
    const slow = get(url + '/slow', cred) // admitted on tot
    await until('tot', n)
    front.failWrites = '502'
    assert.equal((await get(url + '/w', cred)).status, 200) // its charge owed: to the probe
    front.failWrites = null
    front.holdProbes = true
    n = front.lines.length
    const probing = get(url + '/missing', cred)
    await until('probe', n)
    front.failWrites = '502'
    goOn()
    assert.equal((await slow).status, 200) // its charge fails after the probe was sent
    front.holdProbes = false
    assert.equal((await probing).status, 404) // the probe's 409, sent before
    // The owed charges are retried meanwhile: calls() over all the lines
    // leaves their repeats out, where a slice from here would not.
    const callsBefore = calls(front.lines).length
    last = (await get(url + '/w', cred)).status
    next = calls(front.lines)[callsBefore]
    front.failWrites = null
    assert.ok(await app.accman.drain(10000))
  } finally {
    await app.close()
  }
  assert.deepEqual([last, next], [503, 'probe'])
})
