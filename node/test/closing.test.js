'use strict'
// close() on every server fastify listens on.  Listening on `localhost`,
// fastify opens a server of its own for each further address the name
// resolves to (::1 beside 127.0.0.1), and its close() waits for none of
// them: only for fastify.server.  A real fastify, a real AccMan, raw
// client sockets on the second address.

const test = require('node:test')
const assert = require('node:assert/strict')
const dns = require('node:dns')
const net = require('node:net')
const Fastify = require('fastify')
const accman = require('..')
const { connectionsOf, unwatched } = require('../src/closing')
const { TOKENS, sharedAccMan } = require('./helpers/accman')
const { messages, until } = require('./helpers/app')

const acc = sharedAccMan(test)

// How long close() may take here: CLOSE_KEEP_ALIVE_MS, Node's
// keepAliveTimeoutBuffer (1 s) and room for a loaded machine, far under
// fastify's keepAliveTimeout (72 s).  Waited for only when something
// hangs, on timers that do not hold the process open.
const CLOSED_WITHIN_MS = 10000
const timedOut = () => require('node:timers/promises').setTimeout(CLOSED_WITHIN_MS, undefined, { ref: false })

// Whether a server can listen on `address`.
function bindable (address) {
  const server = net.createServer()
  return new Promise((resolve) => {
    server.once('error', () => resolve(false))
    server.listen(0, address, () => server.close(() => resolve(true)))
  })
}

// A second address for `localhost` where this machine's hosts file names
// one only (127.0.0.1; fastify then opens no second server): ::1, as
// Debian's default hosts file names it too, or 127.0.0.2 where IPv6 is
// not to be had.  null where `localhost` has several already.
async function extraAddress () {
  const found = await dns.promises.lookup('localhost', { all: true })
  if (found.length > 1) return null
  for (const [address, family] of [['::1', 6], ['127.0.0.2', 4]]) {
    if (!found.some((a) => a.address === address) && await bindable(address)) return { address, family }
  }
  assert.fail('no second address for localhost: neither ::1 nor 127.0.0.2 can be bound')
}

// app.listen() on `localhost`, port 0.  With `extra`, the lookup that
// fastify makes of every address of `localhost` (dns.lookup with `all`)
// answers it too, in place of the hosts file, while fastify listens: the
// servers, the sockets and AccMan stay real.
async function listenOnLocalhost (app, extra) {
  const lookup = dns.lookup
  if (extra) {
    dns.lookup = function (host, options, callback) {
      if (host !== 'localhost' || options === null || typeof options !== 'object' || !options.all) {
        return lookup.apply(this, arguments)
      }
      return lookup.call(this, host, options, (err, found) => callback(err, err ? found : [...found, extra]))
    }
  }
  try {
    await app.listen({ port: 0, host: 'localhost' })
  } finally {
    dns.lookup = lookup
  }
}

// A service on `localhost`: the plugin in the scope /api (/api/w, paid 1,
// and /api/gated), /admin/gated outside it.  The gated handlers answer
// once the test calls app.openGate(); app.started counts those begun,
// and app.api is the plugin's scope.  Its second address (`second`) is
// one of a server that is not fastify.server: fastify makes that server
// on the main one's port and goes without it if the port is taken there,
// so a new service is made then, on a new port (three tries).
async function localService (logs) {
  const extra = await extraAddress()
  for (let attempt = 0; ; attempt++) {
    const logger = { level: 'info', stream: { write: (line) => logs.push(JSON.parse(line)) } }
    const app = Fastify({ logger })
    let openGate
    const gate = new Promise((resolve) => { openGate = resolve })
    app.decorate('openGate', openGate)
    app.decorate('started', 0)
    app.decorate('api', null)
    const gated = async () => {
      app.started++
      await gate
      return { gated: true }
    }
    app.get('/admin/gated', gated)
    app.register(async (api) => {
      await api.register(accman, { url: acc.server.url, token: TOKENS.service })
      app.api = api
      api.get('/w', async () => ({ ok: true }))
      api.get('/gated', gated)
    }, { prefix: '/api' })
    await listenOnLocalhost(app, extra)
    const main = app.server.address()
    const second = app.addresses().find((a) => a.address !== main.address)
    if (second !== undefined || attempt === 2) {
      assert.ok(second, `fastify listens on ${JSON.stringify(app.addresses())} only`)
      return { app, second }
    }
    await app.close()
  }
}

// A raw client connection to `second`, whose requests name the account
// `cred`: what it received, and its close.
async function connect (second, cred) {
  const socket = net.connect(second.port, second.address)
  socket.on('error', () => {})
  const c = { socket, text: '' }
  socket.setEncoding('utf8')
  socket.on('data', (d) => { c.text += d })
  c.closed = new Promise((resolve) => socket.once('close', resolve))
  await new Promise((resolve) => socket.once('connect', resolve))
  c.ask = (path) => socket.write(`GET ${path} HTTP/1.1\r\nHost: x\r\naccman: ${cred}\r\n\r\n`)
  c.answered = () => /\r\n\r\n\{.*\}$/s.test(c.text)
  return c
}

// Whether `c` was ended within CLOSED_WITHIN_MS.
async function ended (c) {
  await Promise.race([c.closed, timedOut()])
  return c.socket.destroyed
}

// On the second server, at close(): a connection that sent nothing, one
// kept alive after a paid response, a paid request under way and one
// under way outside the plugin's scope.  fastify closes the second server
// once its main one has closed, and runs the onClose hooks, the owed
// calls' drain among them, at once: the gated handlers answer a turn of
// the event loop after that, so that the charge of the paid one comes
// after the drain unless the plugin waits for the second server.
test('close() on localhost: on the second address, connections end and the charge under way lands', async () => {
  await acc.mint.mod('c-second', 10)
  const logs = []
  const { app, second } = await localService(logs)
  const conns = []
  let closed = false
  try {
    // Opened first, so accepted before the connections served after it.
    const idle = await connect(second, 'c-second')
    const kept = await connect(second, 'c-second')
    const busy = await connect(second, 'c-second')
    const outside = await connect(second, 'c-second')
    conns.push(idle, kept, busy, outside)
    kept.ask('/api/w')
    await until(kept.answered)
    busy.ask('/api/gated')
    outside.ask('/admin/gated')
    await until(() => app.started === 2)
    app.server.once('close', () => setImmediate(app.openGate))
    const closing = app.close().then(() => { closed = true })
    await Promise.race([closing, timedOut()])
    assert.ok(closed, 'close() still waits')
    await until(() => busy.answered() && outside.answered())
    assert.match(kept.text, /^HTTP\/1\.1 200 [\s\S]*\r\naccman: 9\r\n/)
    assert.match(busy.text, /\r\nconnection: close\r\n/i)
    assert.match(outside.text, /^HTTP\/1\.1 200 [\s\S]*\r\nconnection: keep-alive\r\n/i)
    // Charged before the drain: the balance told, and in AccMan.
    assert.match(busy.text, /^HTTP\/1\.1 200 [\s\S]*\r\naccman: 8\r\n/)
    assert.deepEqual([app.api.accman.stats.charged, app.api.accman.stats.unpaid_requests], [2, 0])
    assert.equal(await acc.mint.tot('c-second'), 8)
    const ends = await Promise.all(conns.map(ended))
    assert.deepEqual(ends, [true, true, true, true], 'idle, kept, busy, outside: not ended')
    assert.deepEqual(messages(logs, 40), [])
  } finally {
    for (const c of conns) c.socket.destroy()
    await app.close()
  }
})

// CLOSE_SERVERS_MS bounds the wait: a request that outlasts it (a stream
// left open) lets the drain go on, and its charge, come after it, is
// stranded as served unpaid; both are said.
test('close() on localhost: a request on the second address past CLOSE_SERVERS_MS is waited for no longer, and said', async () => {
  await acc.mint.mod('c-second-late', 10)
  const logs = []
  const { app, second } = await localService(logs)
  let busy
  let closed = false
  try {
    busy = await connect(second, 'c-second-late')
    busy.ask('/api/gated')
    await until(() => app.started === 1)
    await app.close()
    closed = true
    const said = logs.filter((l) => l.level === 40 && l.msg.startsWith('accman: connections of fastify\'s servers besides'))
    assert.deepEqual(said.map((l) => l.connections), [1])
    app.openGate()
    await until(busy.answered)
    assert.match(busy.text, /^HTTP\/1\.1 200 [\s\S]*\r\nconnection: close\r\n/i)
    await until(() => app.api.accman.stats.unpaid_requests === 1)
    assert.equal(await acc.mint.tot('c-second-late'), 10)
    assert.ok(messages(logs, 50).includes('accman: stranded charge: the account owes 1'))
  } finally {
    busy?.socket.destroy()
    if (!closed) app.openGate()
    await app.close()
  }
})

test('an address fastify lists that no server found listens on is named', () => {
  const server = (address) => ({ address: () => address })
  const v4 = { address: '127.0.0.1', family: 'IPv4', port: 3000 }
  const v6 = { address: '::1', family: 'IPv6', port: 3000 }
  assert.deepEqual(unwatched([v6, v4], [server(v4), server(v6)]), [])
  assert.deepEqual(unwatched([v6, v4], [server(v4)]), [v6])
  assert.deepEqual(unwatched([v6, v4], [server(v4), server(null)]), [v6])
  assert.deepEqual(unwatched(['/tmp/s.sock'], [server('/tmp/s.sock')]), [])
})

// A serverFactory's server that the service has not listened on yet:
// fastify does not close it, and the service may listen on it after
// fastify's close(), for other handlers, with its own keep-alive.
test('close() puts the keep-alive back on a server fastify neither listened on nor closed', async () => {
  const shared = require('node:http').createServer()
  shared.keepAliveTimeout = 5000
  const app = Fastify({ serverFactory: (handler) => shared.on('request', handler) })
  await app.register(accman, { url: acc.server.url, token: TOKENS.service })
  await app.ready()
  await app.close()
  assert.deepEqual([shared.listening, shared.keepAliveTimeout], [false, 5000])
})

// The requests under way that close() counts (connectionsOf's `serving`)
// end with their connection: a response queued behind a pipelined one
// that never closes, when its client leaves, is not held for good.
test('a connection that leaves with pipelined requests under way is not counted serving for good', async () => {
  const http = require('node:http')
  const server = http.createServer((req, res) => setTimeout(() => res.end('ok'), 2000).unref())
  const conns = connectionsOf(server)
  await new Promise((resolve) => server.listen(0, '127.0.0.1', resolve))
  try {
    const clients = []
    for (let i = 0; i < 5; i++) {
      const c = net.connect(server.address().port, '127.0.0.1')
      c.on('error', () => {})
      c.write('GET /a HTTP/1.1\r\nHost: x\r\n\r\n'.repeat(3))
      clients.push(c)
    }
    await until(() => conns.serving.size === 5)
    for (const c of clients) c.destroy()
    await until(() => conns.tcp.size === 0)
    await until(() => conns.serving.size === 0)
  } finally {
    server.closeAllConnections()
    await new Promise((resolve) => server.close(resolve))
  }
})

// Watched once a socket: a keep-alive connection's requests, one after
// another, add no close listener each (Node warns past ten).
test('a keep-alive connection\'s requests add no listener each to its socket', async () => {
  const http = require('node:http')
  const server = http.createServer((req, res) => res.end('ok'))
  const conns = connectionsOf(server)
  await new Promise((resolve) => server.listen(0, '127.0.0.1', resolve))
  const agent = new http.Agent({ keepAlive: true, maxSockets: 1 })
  const once = () => new Promise((resolve, reject) => {
    http.get({ port: server.address().port, host: '127.0.0.1', agent }, (res) => {
      res.resume()
      res.on('end', resolve)
    }).on('error', reject)
  })
  try {
    await once()
    const [socket] = conns.tcp
    const listeners = socket.listenerCount('close')
    for (let i = 0; i < 20; i++) await once()
    assert.deepEqual([conns.tcp.size, socket.listenerCount('close')], [1, listeners])
  } finally {
    agent.destroy()
    server.closeAllConnections()
    await new Promise((resolve) => server.close(resolve))
  }
})
