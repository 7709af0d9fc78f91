'use strict'
// The example service as a user runs it: `node examples/server.js` beside a
// running AccMan (no tokens, loopback), then curl-like requests, and the
// SIGTERM a process manager sends to stop it.

const test = require('node:test')
const assert = require('node:assert/strict')
const path = require('node:path')
const { spawn } = require('node:child_process')
const { AccManClient, limits } = require('..')
const { AccManServer } = require('./helpers/accman')
const { proxyTo } = require('./helpers/proxy')

// The example on a free port, talking to AccMan at `accmanUrl`: its URL,
// its process, its log lines (pino's objects) and its exit.
async function startExample (t, accmanUrl) {
  const child = spawn(process.execPath, [path.join(__dirname, '..', 'examples', 'server.js')], {
    env: { ...process.env, ACCMAN_URL: accmanUrl, PORT: '0', LOG_LEVEL: 'info' },
    stdio: ['ignore', 'pipe', 'inherit']
  })
  t.after(() => child.kill('SIGKILL'))
  const logs = []
  const exited = new Promise((resolve) => child.on('exit', (code, signal) => resolve({ code, signal })))
  let out = ''
  const url = await new Promise((resolve, reject) => {
    child.stdout.on('data', (d) => {
      out += d
      let nl
      while ((nl = out.indexOf('\n')) >= 0) {
        logs.push(JSON.parse(out.slice(0, nl)))
        out = out.slice(nl + 1)
        const m = /Server listening at (http:\/\/127\.0\.0\.1:\d+)/.exec(logs.at(-1).msg)
        if (m) resolve(m[1])
      }
    })
    exited.then(({ code }) => reject(new Error(`the example exited with ${code}`)))
  })
  return { url, child, logs, exited }
}

async function startAccMan (t) {
  const server = new AccManServer({ tokens: false })
  await server.start()
  t.after(() => server.close())
  const acc = new AccManClient({ url: server.url })
  t.after(() => acc.close())
  return { server, acc }
}

test('the example charges a report by its rows and sets the header', async (t) => {
  const { server, acc } = await startAccMan(t)
  await acc.mod('example-user', 100)
  const { url } = await startExample(t, server.url)
  const weather = await fetch(url + '/weather', { headers: { accman: 'example-user' } })
  assert.equal(weather.headers.get('accman'), '99')
  const report = await fetch(url + '/report?rows=42', { headers: { accman: 'example-user' } })
  assert.equal(report.status, 200)
  assert.equal(report.headers.get('accman'), '94')
  assert.equal((await fetch(url + '/status')).status, 200)
  assert.match(await (await fetch(url + '/metrics')).text(), /accman_plugin_charged_total 2/)
})

// A charge owed by the example: one paid request, then AccMan out of reach
// (a proxy that drops connections) for the next, admitted on the balance
// just seen, whose charge cannot land.
async function oweCharge (t, cred) {
  const { server, acc } = await startAccMan(t)
  await acc.mod(cred, 10)
  const proxy = await proxyTo(server.url)
  t.after(() => proxy.close())
  const example = await startExample(t, proxy.url)
  const paid = await fetch(example.url + '/weather', { headers: { accman: cred } })
  assert.equal(paid.headers.get('accman'), '9')
  proxy.set('refuse')
  const owed = await fetch(example.url + '/weather', { headers: { accman: cred } })
  assert.deepEqual([owed.status, owed.headers.get('accman')], [200, null])
  return { acc, proxy, example }
}

test('SIGTERM with a charge owed: the example closes fastify and the charge lands', async (t) => {
  const { acc, proxy, example } = await oweCharge(t, 'example-term-lands')
  example.child.kill('SIGTERM')
  proxy.set('pass') // AccMan is back within the drain time
  assert.deepEqual(await example.exited, { code: 0, signal: null })
  assert.equal(await acc.tot('example-term-lands'), 8)
  assert.deepEqual(example.logs.filter((l) => l.level >= 50), [])
})

test('SIGTERM with a charge owed and AccMan gone: the charge is stranded and logged', async (t) => {
  const { acc, example } = await oweCharge(t, 'example-term-strands')
  const sent = performance.now()
  example.child.kill('SIGTERM')
  assert.deepEqual(await example.exited, { code: 0, signal: null })
  assert.ok(performance.now() - sent >= limits.CLOSE_DRAIN_MS - 100) // it waited the drain time
  const errors = example.logs.filter((l) => l.level === 50).map((l) => l.msg)
  // The proxy drops each connection it accepts: the client cannot tell
  // whether its last attempt was read, so the charge is stranded either as
  // owed or as of unknown outcome (Owed.close), never silently.
  assert.equal(errors.length, 1)
  assert.match(errors[0], /^accman: stranded charge(: the account owes 1|, outcome unknown: look for \S+-c in the account's history)/)
  assert.equal(await acc.tot('example-term-strands'), 9)
})
