'use strict'
// fastify-accman: charges each request to the account named by its ACCMAN
// header, in the shape of @fastify/rate-limit.  onRequest admits (check
// mode: the balance covers the estimate, read by a probe of the token's
// charge role until the role is seen; reserve mode: a hold of the
// estimate: admit.js), onSend charges or settles and sets the ACCMAN
// response header to the new balance (charge.js), the response's close
// before its end (a consumer who left), onRequestAbort and onResponse end
// a hold that no response settled (meter.js), onRoute checks each route's
// price, and onReady warns of the routes it meters without having checked
// them (routes.js); from preClose on, responses close their connections
// (charge.js), and those of other scopes are kept alive briefly
// (shortenKeepAlive), and those that never sent a request are ended
// (endUnused).  This module sets up those hooks.  README.md has the
// sequence of calls and every failure.

const crypto = require('node:crypto')
const fp = require('fastify-plugin')
const limits = require('./limits')
const { fingerprint } = require('./owed')
const { checkRoute, checkExempt } = require('./options')
const {
  uncheckedRoutes, uncheckedWarning, unroutedExempt, unroutedWarning, headSiblings
} = require('./routes')
const { Meter } = require('./meter')

// `fn`, named `name`: printRoutes() shows a route's hooks by name.
function named (name, fn) {
  Object.defineProperty(fn, 'name', { value: name })
  return fn
}

// From close() on, a connection kept alive after its response ends within
// CLOSE_KEEP_ALIVE_MS, whichever scope's route answered it.  fastify's
// close() runs the onClose hooks, the owed calls' drain among them, only
// once every connection has ended; server.close() ends the connections
// idle at that moment, while one whose request was under way is kept alive
// after its response for keepAliveTimeout (fastify's 72 s).  The plugin's
// onSend closes the connections of its own scope (charge.js), but a route in a
// sibling or parent scope never meets that hook.  Node reads the server's
// keepAliveTimeout as each response ends, so the shorter one holds for
// every response that ends from now on, with no hook on other scopes'
// routes: the server is closing, and an idle connection is what fastify's
// own close ends (forceCloseConnections 'idle').  0 is Node's "never".
// HTTP/2 servers have no such timeout (fastify closes their sessions).
// Returns what puts it back, for onClose: fastify runs that hook once the
// server has closed, or at once for a server it does not close (a
// serverFactory's that the service listens on itself, and may share),
// which goes on serving as it did.
function shortenKeepAlive (server) {
  const ms = server ? server.keepAliveTimeout : undefined
  if (typeof ms !== 'number' || (ms !== 0 && ms <= limits.CLOSE_KEEP_ALIVE_MS)) return () => {}
  server.keepAliveTimeout = limits.CLOSE_KEEP_ALIVE_MS
  return () => {
    if (server.keepAliveTimeout === limits.CLOSE_KEEP_ALIVE_MS) server.keepAliveTimeout = ms
  }
}

// The server's connections, from the plugin's registration on, for
// endUnused: a Set that holds each while it is open.
function connectionsOf (server) {
  const sockets = new Set()
  if (!server || typeof server.on !== 'function') return sockets
  server.on('connection', (socket) => {
    sockets.add(socket)
    socket.once('close', () => sockets.delete(socket))
  })
  return sockets
}

// From close() on, a connection that has sent nothing is ended.  Node's
// server.close() ends the idle connections, but one that never sent a
// request is not idle to Node, and stays open until its client closes it
// (a proxy or a browser opens such connections ahead of requests), while
// fastify runs the onClose hooks, the owed calls' drain among them, only
// once every connection has ended: past the SIGKILL of a process manager,
// which loses the owed calls unlogged.  Nothing was asked on such a
// connection, so ending it loses nothing.  It is done once the server has
// stopped listening (fastify closes it after the preClose hooks), checked
// every CLOSE_KEEP_ALIVE_MS: a server that fastify does not close (a
// serverFactory's that the service listens on itself) keeps listening and
// keeps them.  A connection over TLS has read its handshake, and is left.
// Returns what stops the checks, for onClose.
function endUnused (server, sockets) {
  if (!server || typeof server.listening !== 'boolean') return () => {}
  const sweep = () => {
    if (server.listening) return
    clearInterval(timer)
    for (const socket of sockets) {
      if (socket.bytesRead === 0) socket.destroy()
    }
  }
  const timer = setInterval(sweep, limits.CLOSE_KEEP_ALIVE_MS)
  timer.unref()
  setImmediate(sweep)
  return () => clearInterval(timer)
}

// The onSend hook the plugin puts last on each route it checked
// (Meter.chargeLast).  It is passed over at once, with no promise, when
// nothing was left to it; else its promise is fastify's to await (an
// error thrown by what fastify does next is then fastify's, never an
// unhandled rejection).
function lastHookOf (meter) {
  return (request, reply, payload, done) => {
    if (!request.accman?.deferred) return done(null, payload)
    return meter.chargeLast(request, reply, payload)
  }
}

async function fastifyAccman (fastify, opts) {
  const meter = new Meter(fastify, opts)
  fastify.decorate('accman', {
    client: meter.client,
    stats: meter.stats,
    metrics: () => meter.metrics(),
    drain: (timeoutMs = limits.CLOSE_DRAIN_MS) => meter.owed.drain(timeoutMs)
  })
  fastify.decorateRequest('accman', null)
  // Every route the plugin meters has its onRequest hook; every route it
  // checked, its preHandler (Meter.beforeHandler).  Their names are this
  // registration's own, for the plugin may be registered in more than one
  // scope.
  const id = crypto.randomBytes(4).toString('hex')
  const admitName = `fastify-accman ${id} admit`
  const checkedName = `fastify-accman ${id} checked`
  const checkedHook = named(checkedName, (request, reply, done) => {
    meter.beforeHandler(request, reply)
    done()
  })
  // Every route it checked also has its onSend hook after every other
  // (lastHook): fastify runs a route's own hooks after its scope's.
  const lastHook = lastHookOf(meter)
  let routesChecked = 0
  const declared = [] // the paths of the routes added after the plugin
  const markSiblingHead = headSiblings(fastify)
  fastify.addHook('onRoute', (route) => {
    checkRoute(route)
    markSiblingHead(route)
    // A prefixed '/' route answers /v1 and /v1/, both routed to '/v1'
    // (routeOptions.url), which is what exempt names.
    const path = route.prefix && route.routePath === '/' ? route.prefix : route.url
    checkExempt(route, path, meter.exempt)
    routesChecked++
    declared.push(path)
    route.preHandler = [].concat(route.preHandler ?? [], checkedHook)
    route.onSend = [].concat(route.onSend ?? [], lastHook)
  })
  fastify.addHook('onReady', async () => {
    const text = fastify.printRoutes({ includeMeta: ['onRequest', 'preHandler'] })
    const { unchecked, readable, paths } =
      uncheckedRoutes(text, admitName, checkedName, routesChecked)
    if (!readable) {
      meter.log.warn('accman: printRoutes() is not in the shape known: ' +
        'routes added before the plugin are not found')
    }
    if (unchecked.length) meter.log.warn(uncheckedWarning(unchecked))
    // Only when printRoutes() was read: else routes added before the plugin are not known.
    const unrouted = readable
      ? unroutedExempt(meter.exempt.entries ?? [], declared.concat(paths))
      : []
    if (unrouted.length) meter.log.warn(unroutedWarning(unrouted))
  })
  fastify.addHook('onRequest', named(admitName, (request, reply) => meter.admit(request, reply)))
  fastify.addHook('onSend', (request, reply, payload) => meter.charge(request, reply, payload))
  fastify.addHook('onRequestAbort', async (request) => {
    if (request.accman) meter.left(request.accman)
  })
  fastify.addHook('onResponse', async (request, reply) => {
    const state = request.accman
    if (!state) return
    if (!state.ended && !state.gone && state.unpaid === null && reply.statusCode < 400) {
      meter.unmetered(request) // answered past onSend: reply.hijack() or reply.raw
    }
    meter.end(state)
  })
  const sockets = connectionsOf(fastify.server)
  let keepAliveBack = () => {}
  let sweepEnd = () => {}
  fastify.addHook('preClose', async () => {
    meter.closing = true
    keepAliveBack = shortenKeepAlive(fastify.server)
    sweepEnd = endUnused(fastify.server, sockets)
  })
  fastify.addHook('onClose', () => {
    keepAliveBack()
    sweepEnd()
    return meter.close()
  })
}

const plugin = fp(fastifyAccman, { fastify: '5.x', name: 'fastify-accman' })

module.exports = { plugin, fingerprint, Meter }
