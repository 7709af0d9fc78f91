'use strict'
// A round-robin TCP proxy: what a TCP load balancer does in front of
// several AccMan front-ends (docs/SCALING.md, "Production layout"), as
// tests/reliability/rrproxy.py does for the Python checker.  Each new
// client connection goes to the next backend in turn; its bytes go both
// ways untouched until either side closes or fails, and then both are
// closed, as an L4 balancer closes a client's connection when its
// server's breaks.  A backend that refuses the connection (SIGKILLed, not
// started again yet) gets the client's connection closed at once,
// unanswered; one stopped (SIGSTOP) takes it into its backlog and answers
// nothing.  `stats` counts, per backend, the connections it was given and
// those it refused.
//
// Without `checked`, it checks no backend's health: a client's retries
// meet a dead backend as often as a live one.  With it, it asks each
// backend's GET /health every HEALTH_EVERY_MS, as a balancer's health
// check does, and sends new connections only to those whose last answer
// was 200; to all of them when none was (nginx's rule: with every server
// marked down, all are tried).  A connection already made stays with its
// backend, as with a balancer.

const http = require('node:http')
const net = require('node:net')

const HEALTH_EVERY_MS = 200
// A stopped backend takes the check's connection into its backlog and
// answers nothing: past this, its check has failed.
const HEALTH_TIMEOUT_MS = 1000

// Whether `backend` answers GET /health with 200 within HEALTH_TIMEOUT_MS.
function healthy (backend) {
  return new Promise((resolve) => {
    const req = http.get({ host: backend.host, port: backend.port, path: '/health', agent: false },
      (res) => {
        res.resume()
        resolve(res.statusCode === 200)
      })
    req.setTimeout(HEALTH_TIMEOUT_MS, () => req.destroy())
    req.on('error', () => resolve(false))
    req.on('close', () => resolve(false)) // destroyed by the timeout; a no-op once resolved
  })
}

// The checks, one round after another until `state.closed` (`state.wake`
// ends the pause between rounds at once): `state.live` the backends whose
// last check answered 200.
async function watch (backends, state) {
  while (!state.closed) {
    const answers = await Promise.all(backends.map(healthy))
    state.live = answers.flatMap((ok, n) => ok ? [n] : [])
    await new Promise((resolve) => {
      state.wake = resolve
      state.timer = setTimeout(resolve, HEALTH_EVERY_MS)
    })
  }
}

async function roundRobin (backends, { checked = false } = {}) {
  const sockets = new Set()
  const stats = { sent: backends.map(() => 0), refused: backends.map(() => 0) }
  const all = backends.map((_, n) => n)
  const state = { closed: false, live: all, timer: null, wake: null }
  let turn = 0
  const next = () => {
    const candidates = state.live.length ? state.live : all
    return candidates[turn++ % candidates.length]
  }
  const track = (socket) => {
    sockets.add(socket)
    socket.on('close', () => sockets.delete(socket))
    socket.on('error', () => {})
  }
  const server = net.createServer((client) => {
    const n = next()
    stats.sent[n]++
    track(client)
    let connected = false
    const upstream = net.connect(backends[n].port, backends[n].host)
    track(upstream)
    upstream.once('connect', () => { connected = true })
    upstream.once('error', () => { if (!connected) stats.refused[n]++ })
    const close = () => {
      client.destroy()
      upstream.destroy()
    }
    for (const s of [client, upstream]) {
      s.on('end', close)
      s.on('close', close)
    }
    client.pipe(upstream)
    upstream.pipe(client)
  })
  await new Promise((resolve) => server.listen(0, '127.0.0.1', resolve))
  const watching = checked ? watch(backends, state) : Promise.resolve()
  const { port } = server.address()
  return {
    url: `http://127.0.0.1:${port}`,
    stats,
    checked,
    async close () {
      state.closed = true
      clearTimeout(state.timer)
      state.wake?.()
      for (const s of sockets) s.destroy()
      await new Promise((resolve) => server.close(resolve))
      await watching
    }
  }
}

module.exports = { roundRobin }
