'use strict'
// What the plugin does to the service's connections from fastify's close()
// on.  fastify runs the onClose hooks, the owed calls' drain among them,
// only once every connection has ended, so a connection that close() waits
// on holds the drain back, past the SIGKILL of a process manager, which
// loses the owed calls unlogged.  So the connections kept alive after a
// response are kept briefly (shortenKeepAlive), and those on which no
// request has begun are ended (endUnused).  The plugin's own routes close
// their connections as they answer (charge.js).

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
// connection's requests from.
function connectionsOf (server) {
  const conns = { tcp: new Set(), secure: new Set() }
  if (!server || typeof server.on !== 'function') return conns
  const hold = (set) => (socket) => {
    set.add(socket)
    socket.once('close', () => set.delete(socket))
  }
  server.on('connection', hold(conns.tcp))
  if (server instanceof tls.Server) server.on('secureConnection', hold(conns.secure))
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

// From close() on, a connection on which no request has begun is ended.
// Node's server.close() ends the idle connections, but one that never
// began a request is not idle to Node, and stays open until its client
// closes it: a proxy or a browser opens such connections ahead of
// requests, over TLS with the handshake done.  Nothing was asked on such a
// connection, so ending it loses nothing; a connection whose request has
// begun is left to end as its response does, though the request's head
// has not all come (fastify answers it with its 503 once closing), and so
// is one handed over by an 'upgrade' (a WebSocket).  It is done once the
// server has stopped listening (fastify closes it after the preClose
// hooks), checked every CLOSE_KEEP_ALIVE_MS: a server that fastify does
// not close (a serverFactory's that the service listens on itself) keeps
// listening and keeps them.  Returns what stops the checks, for onClose.
function endUnused (server, conns) {
  if (!server || typeof server.listening !== 'boolean') return () => {}
  const sweep = () => {
    if (server.listening) return
    clearInterval(timer)
    for (const socket of unused(server, conns)) socket.destroy()
  }
  const timer = setInterval(sweep, limits.CLOSE_KEEP_ALIVE_MS)
  timer.unref()
  setImmediate(sweep)
  return () => clearInterval(timer)
}

module.exports = { shortenKeepAlive, connectionsOf, endUnused }
