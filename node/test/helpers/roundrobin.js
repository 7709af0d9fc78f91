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
// nothing.  It checks no backend's health: a client's retries meet a dead
// backend as often as a live one.  `stats` counts, per backend, the
// connections it was given and those it refused.

const net = require('node:net')

async function roundRobin (backends) {
  const sockets = new Set()
  const stats = { sent: backends.map(() => 0), refused: backends.map(() => 0) }
  let turn = 0
  const track = (socket) => {
    sockets.add(socket)
    socket.on('close', () => sockets.delete(socket))
    socket.on('error', () => {})
  }
  const server = net.createServer((client) => {
    const n = turn++ % backends.length
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
  const { port } = server.address()
  return {
    url: `http://127.0.0.1:${port}`,
    stats,
    close () {
      for (const s of sockets) s.destroy()
      return new Promise((resolve) => server.close(resolve))
    }
  }
}

module.exports = { roundRobin }
