'use strict'
// What the plugin does to the service's connections from fastify's close()
// on.  fastify runs the onClose hooks, the owed calls' drain among them,
// only once every connection has ended, so a connection that close() waits
// on holds the drain back, past the SIGKILL of a process manager, which
// loses the owed calls unlogged.  So the connections kept alive after a
// response are kept briefly (shortenKeepAlive), and those on which no
// request has begun are ended (endUnused).  The plugin's own routes close
// their connections as they answer (charge.js).  Closing does that for
// every server fastify listens on, and makes the drain wait for those
// fastify's close() does not wait for.

const tls = require('node:tls')
const limits = require('./limits')

// From close() on, a connection kept alive after its response ends within
// CLOSE_KEEP_ALIVE_MS, whichever scope's route answered it.  server.close()
// ends the connections idle at that moment, while one whose request was
// under way is kept alive after its response for keepAliveTimeout
// (fastify's 72 s).  The plugin's onSend closes the connections of its own
// scope (charge.js), but a route in a sibling or parent scope never meets
// that hook.  Node reads the server's keepAliveTimeout as each response
// ends, so the shorter one holds for every response that ends from now on,
// with no hook on other scopes' routes: the server is closing, and an idle
// connection is what fastify's own close ends (forceCloseConnections
// 'idle').  0 is Node's "never".  HTTP/2 servers have no such timeout
// (fastify closes their sessions).  Returns what puts it back, for
// onClose: fastify runs that hook once the server has closed, or at once
// for a server it does not close (a serverFactory's that the service
// listens on itself, and may share), which goes on serving as it did.
function shortenKeepAlive (server) {
  const ms = server ? server.keepAliveTimeout : undefined
  if (typeof ms !== 'number' || (ms !== 0 && ms <= limits.CLOSE_KEEP_ALIVE_MS)) return () => {}
  server.keepAliveTimeout = limits.CLOSE_KEEP_ALIVE_MS
  return () => {
    if (server.keepAliveTimeout === limits.CLOSE_KEEP_ALIVE_MS) server.keepAliveTimeout = ms
  }
}

// The server's connections, from the plugin's registration on, for
// endUnused, each held while it is open: `tcp`, every connection's own
// socket; over TLS (an https server, or HTTP/2's secure one), `secure`,
// the socket of each whose handshake is done, which HTTP reads the
// connection's requests from.  `serving`: the HTTP sockets with a request
// whose response has not closed, and how many; `inPart`: when close()
// first saw each of those with a head come in part (headsInPart).
function connectionsOf (server) {
  const conns = { tcp: new Set(), secure: new Set(), serving: new Map(), inPart: new Map() }
  if (!server || typeof server.on !== 'function') return conns
  const hold = (set) => (socket) => {
    set.add(socket)
    socket.once('close', () => {
      set.delete(socket)
      conns.inPart.delete(socket)
    })
  }
  server.on('connection', hold(conns.tcp))
  if (server instanceof tls.Server) server.on('secureConnection', hold(conns.secure))
  // A response queued behind a pipelined one may never close when the
  // connection drops (Node 20): the socket's close ends its count, watched
  // once per socket, however many requests it carries.
  const watched = new WeakSet()
  server.on('request', (req, res) => {
    const socket = req.socket
    if (!watched.has(socket)) {
      watched.add(socket)
      socket.once('close', () => conns.serving.delete(socket))
    }
    conns.serving.set(socket, (conns.serving.get(socket) || 0) + 1)
    res.once('close', () => {
      const left = conns.serving.get(socket) - 1
      if (left > 0) conns.serving.set(socket, left)
      else conns.serving.delete(socket)
    })
  })
  return conns
}

// A TCP connection, by the addresses at both ends, which no two open
// connections share: a secure socket has those of the TCP socket it
// wraps.  A Unix socket's connections have none, nor may a socket no
// longer connected: such sockets match each other, and only each other.
const addressesOf = (socket) =>
  `${socket.remoteAddress} ${socket.remotePort} ${socket.localAddress} ${socket.localPort}`

// The TCP sockets of the connections on which no request has begun: those
// whose HTTP side has read nothing.  Without TLS that is the TCP socket
// itself.  Over TLS it is the secure socket, which counts the bytes
// decrypted, where the TCP socket counts the handshake too; a connection
// still in its handshake has none, and has begun no request.  Ending the
// TCP socket ends its secure socket with it.  A TCP socket that cannot be
// told apart from one whose request has begun (no addresses) is kept.
function unused (server, conns) {
  const tcp = [...conns.tcp]
  if (!(server instanceof tls.Server)) return tcp.filter((socket) => socket.bytesRead === 0)
  const begun = new Set([...conns.secure].filter((socket) => socket.bytesRead > 0).map(addressesOf))
  return tcp.filter((socket) => !begun.has(addressesOf(socket)))
}

// The HTTP/1 sockets that have read a byte and have no request whose
// response is open: a head come in part, a request answered early whose
// body is still coming (its client may see a reset after that response),
// or a connection kept alive after its response (which shortenKeepAlive
// ends sooner).  Each is returned once CLOSE_HEAD_MS has passed since it
// was first seen so, at `now`, if it has nothing left to write.  Only a
// socket that Node's HTTP/1 parser reads (its `parser`, which an
// 'upgrade' hands over and HTTP/2 has none of) is looked at: a
// WebSocket's is the service's to end.
function headsInPart (server, conns, now) {
  const http = server instanceof tls.Server ? conns.secure : conns.tcp
  const due = []
  for (const socket of http) {
    const parser = socket.parser
    if (parser === null || typeof parser !== 'object' || socket.bytesRead === 0 ||
        conns.serving.has(socket)) {
      conns.inPart.delete(socket)
      continue
    }
    const seen = conns.inPart.get(socket)
    if (seen === undefined) conns.inPart.set(socket, now)
    else if (now - seen >= limits.CLOSE_HEAD_MS && socket.writableLength === 0) due.push(socket)
  }
  return due
}

// From close() on, a connection on which no request has begun is ended.
// Node's server.close() ends the idle connections, but one that never
// began a request is not idle to Node, and stays open until its client
// closes it: a proxy or a browser opens such connections ahead of
// requests, over TLS with the handshake done.  Nothing was asked on such a
// connection, so ending it loses nothing; a connection whose request has
// begun is left to end as its response does, and one handed over by an
// 'upgrade' (a WebSocket) as the service's code ends it; one whose
// request's head has come in part gets CLOSE_HEAD_MS for the rest (fastify
// answers it with its 503 once closing), then is ended (headsInPart).  It
// is done once the server has stopped listening (fastify closes it after
// the preClose hooks), checked every CLOSE_KEEP_ALIVE_MS until onClose: a
// server that fastify does not close (a serverFactory's that the service
// listens on itself) keeps listening and keeps them.  Returns what stops
// the checks, for onClose.
function endUnused (server, conns) {
  if (!server || typeof server.listening !== 'boolean') return () => {}
  const sweep = () => {
    if (server.listening) return
    for (const socket of unused(server, conns)) socket.destroy()
    for (const socket of headsInPart(server, conns, Date.now())) socket.destroy()
  }
  const timer = setInterval(sweep, limits.CLOSE_KEEP_ALIVE_MS)
  timer.unref()
  setImmediate(sweep)
  return () => clearInterval(timer)
}

// The servers fastify listens on besides fastify.server: listening on
// `localhost`, fastify.listen() opens one for each further address the
// name resolves to (::1 beside 127.0.0.1), and closes them once
// fastify.server has closed, but its close() waits for none of them: the
// onClose hooks, the owed calls' drain among them, run while requests on
// them are under way, whose charges would then find the plugin closed.
// fastify has no public way to them: it keeps them in the instance under
// its own symbol `fastify.serverBindings` (fastify.addresses() reads it),
// found here by its description, on the instance or the scope it was made
// from.  fastify.addresses(), which is public, lists their addresses, and
// tells the plugin when one has a server not found here (unwatched).
const BINDINGS = 'fastify.serverBindings'

function secondaryServers (fastify) {
  for (let o = fastify; o !== null; o = Object.getPrototypeOf(o)) {
    const symbol = Object.getOwnPropertySymbols(o).find((s) => s.description === BINDINGS)
    if (symbol !== undefined) return Array.isArray(o[symbol]) ? [...o[symbol]] : []
  }
  return []
}

// An address as fastify.addresses() and server.address() give it: a Unix
// socket's path, or an IP address and port.
const addressKey = (a) => typeof a === 'string' ? a : `${a.address} ${a.port}`

// The addresses of `addresses` that none of `servers` listens on.
function unwatched (addresses, servers) {
  const watched = new Set(servers.map((s) => s.address()).filter(Boolean).map(addressKey))
  return addresses.filter((a) => !watched.has(addressKey(a)))
}

// One server fastify listens on, with its connections (connectionsOf) and,
// for a secondary one, the promise of its 'close' (all its connections
// ended); what begin() changed, to put back.
function watch (server, secondary) {
  return {
    server,
    secondary,
    conns: connectionsOf(server),
    closed: secondary ? new Promise((resolve) => server.once('close', resolve)) : null,
    keepAliveBack: () => {},
    sweepEnd: () => {}
  }
}

// The close-time handling of every server fastify listens on: listened()
// at onListen finds the secondary ones, begin() at preClose shortens the
// keep-alive and ends the unused connections of each, end() at onClose
// waits for the secondary ones that fastify has closed to end their
// connections, as fastify waits for its main server's, so that their
// requests' charges come before the drain.  That wait is bounded by
// CLOSE_SERVERS_MS, and one cut short is said.  A connection a secondary
// server accepted before the plugin's onListen hook ran is not seen: none
// is when the onListen hooks before it wait on no I/O or timer, for
// fastify runs them in the turn of the event loop in which its servers
// began to listen.  Nor is one of a server not found, said at onListen.
class Closing {
  constructor (fastify, log) {
    this.fastify = fastify
    this.log = log
    this.watched = [watch(fastify.server, false)]
  }

  listened () {
    for (const server of secondaryServers(this.fastify)) {
      if (!this.watched.some((w) => w.server === server)) this.watched.push(watch(server, true))
    }
    const missed = unwatched(this.fastify.addresses(), this.watched.map((w) => w.server))
    if (missed.length) {
      this.log.warn({ addresses: missed.map(addressKey) },
        'accman: fastify listens on addresses whose server the plugin did not find: at ' +
        'close() their connections are not ended, and the charges of their requests may ' +
        'come after the owed calls\' drain, served unpaid')
    }
  }

  begin () {
    for (const w of this.watched) {
      w.keepAliveBack = shortenKeepAlive(w.server)
      w.sweepEnd = endUnused(w.server, w.conns)
    }
  }

  // The keep-alive is put back, as a server that fastify does not close
  // serves on, but on the secondary servers that fastify closed: one that
  // outlasted CLOSE_SERVERS_MS has connections still, which keep the
  // short one.
  async end () {
    await this.secondariesClosed()
    for (const w of this.watched) {
      w.sweepEnd()
      if (!w.secondary || w.server.listening) w.keepAliveBack()
    }
  }

  async secondariesClosed () {
    const closing = this.watched.filter((w) => w.secondary && !w.server.listening)
    if (!closing.length) return
    let timer
    const late = new Promise((resolve) => {
      timer = setTimeout(resolve, limits.CLOSE_SERVERS_MS, false)
    })
    const closed = Promise.all(closing.map((w) => w.closed)).then(() => true)
    const done = await Promise.race([closed, late])
    clearTimeout(timer)
    if (done) return
    const open = closing.reduce((n, w) => n + w.conns.tcp.size, 0)
    this.log.warn({ connections: open },
      'accman: connections of fastify\'s servers besides fastify.server still open ' +
      `${limits.CLOSE_SERVERS_MS} ms after they began to close: the owed calls drain now, ` +
      'and the charge of a request still under way on them is stranded, served unpaid')
  }
}

module.exports = { shortenKeepAlive, connectionsOf, endUnused, unwatched, Closing }
