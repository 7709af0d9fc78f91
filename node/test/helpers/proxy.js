'use strict'
// A TCP proxy in front of a real AccMan, for what comes between a service
// and AccMan: in mode `refuse` it drops every connection it accepts (the
// client cannot tell whether its request was read: OutcomeUnknown), in
// mode `down` it stops listening (connections are refused: nothing is
// sent, Unreachable), in mode `delay` it holds AccMan's replies back `delayMs` (a
// stalled network: the request reaches AccMan at once, its reply late), in
// mode `hold` it holds back what each new connection sends until
// `release()`, then sends it to AccMan on a connection of its own, whether
// or not its client is still there (a front-end stalled behind a load
// balancer: the request reaches AccMan late; its reply is dropped).
// `dropReplies(re)` drops AccMan's replies to the requests whose target
// matches `re` (the request applies; its reply never comes), whatever the
// mode; `dropped` lists the targets whose reply it dropped, each once
// AccMan has answered it, that is once it has applied.  `targets` lists
// the request targets it forwarded, in order.  Given `tls` ({ key, cert })
// it terminates TLS (an https:// `url`), as the proxy before AccMan of a
// deployment that crosses machines does: `served` counts the connections
// whose handshake succeeded, `names` the SNI names they sent.

const net = require('node:net')
const tls = require('node:tls')

const REQUEST_LINE_RE = /^[A-Z]+ (\S+) HTTP\/1\.1\r$/gm

async function proxyTo (url, { tls: tlsOptions = null } = {}) {
  const upstreamAt = new URL(url)
  const sockets = new Set()
  const targets = []
  const dropped = []
  const names = []
  let served = 0
  let mode = 'pass'
  let delayMs = 0
  let dropRe = null
  const track = (socket) => {
    sockets.add(socket)
    socket.on('close', () => sockets.delete(socket))
    socket.on('error', () => {})
  }
  const timers = new Set()
  const held = []
  const later = (fn) => {
    if (delayMs === 0) return fn()
    const timer = setTimeout(() => { timers.delete(timer); fn() }, delayMs)
    timers.add(timer)
  }
  const onClient = (client) => {
    track(client)
    if (tlsOptions) {
      served++
      names.push(client.servername)
    }
    if (mode === 'refuse') {
      client.destroy()
      return
    }
    if (mode === 'hold') {
      const data = []
      held.push(data)
      client.on('data', (d) => {
        for (const m of d.toString('latin1').matchAll(REQUEST_LINE_RE)) targets.push(m[1])
        data.push(d)
      })
      return
    }
    const upstream = net.connect(Number(upstreamAt.port), upstreamAt.hostname)
    track(upstream)
    let last = '' // the target of the request whose reply comes next: one in flight at a time
    let lastDropped = false // a reply comes in chunks: its target is listed in `dropped` once
    client.on('data', (d) => {
      for (const m of d.toString('latin1').matchAll(REQUEST_LINE_RE)) {
        targets.push(m[1])
        last = m[1]
        lastDropped = false
      }
      upstream.write(d)
    })
    upstream.on('data', (d) => {
      if (dropRe === null || !dropRe.test(last)) {
        later(() => client.write(d))
      } else if (!lastDropped) {
        dropped.push(last)
        lastDropped = true
      }
    })
    client.on('close', () => upstream.destroy())
    upstream.on('close', () => later(() => client.destroy()))
  }
  const server = tlsOptions
    ? tls.createServer(tlsOptions, onClient).on('tlsClientError', () => {})
    : net.createServer(onClient)
  await new Promise((resolve) => server.listen(0, '127.0.0.1', resolve))
  const port = server.address().port
  return {
    url: `${tlsOptions ? 'https' : 'http'}://127.0.0.1:${port}`,
    port,
    targets,
    dropped,
    names,
    get served () { return served },
    // 'pass', 'refuse' or 'down' (every open connection is dropped too),
    // 'delay' or 'hold'.  Leaving 'down' listens again on the same port: await it.
    set (newMode, newDelayMs = 0) {
      const wasDown = mode === 'down'
      mode = newMode
      delayMs = newMode === 'delay' ? newDelayMs : 0
      if (mode === 'refuse' || mode === 'down') for (const s of sockets) s.destroy()
      if (mode === 'down' && !wasDown) return new Promise((resolve) => server.close(resolve))
      if (wasDown && mode !== 'down') return new Promise((resolve) => server.listen(port, '127.0.0.1', resolve))
    },
    dropReplies (re) {
      dropRe = re
    },
    // What 'hold' held back, sent to AccMan now.
    release () {
      for (const data of held.splice(0)) {
        const upstream = net.connect(Number(upstreamAt.port), upstreamAt.hostname)
        track(upstream)
        upstream.write(Buffer.concat(data))
        upstream.resume()
      }
    },
    close () {
      for (const t of timers) clearTimeout(t)
      delayMs = 0
      for (const s of sockets) s.destroy()
      if (mode === 'down') return Promise.resolve()
      return new Promise((resolve) => server.close(resolve))
    }
  }
}

module.exports = { proxyTo }
