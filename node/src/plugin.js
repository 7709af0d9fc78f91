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
// (charge.js), those of other scopes are kept alive briefly, and those on
// which no request has begun are ended, on every server fastify listens
// on, found at onListen (closing.js).  This module sets up those hooks.
// README.md has the sequence of calls and every failure.

const crypto = require('node:crypto')
const fp = require('fastify-plugin')
const limits = require('./limits')
const { fingerprint } = require('./owed')
const { checkRoute, checkExempt } = require('./options')
const {
  uncheckedRoutes, uncheckedWarning, unroutedExempt, unroutedWarning, headSiblings
} = require('./routes')
const { Meter } = require('./meter')
const { Closing } = require('./closing')

// `fn`, named `name`: printRoutes() shows a route's hooks by name.
function named (name, fn) {
  Object.defineProperty(fn, 'name', { value: name })
  return fn
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
  const closing = new Closing(fastify, meter.log)
  fastify.addHook('onListen', async () => closing.listened())
  fastify.addHook('preClose', async () => {
    meter.closing = true
    closing.begin()
  })
  fastify.addHook('onClose', async () => {
    await closing.end()
    return meter.close()
  })
}

const plugin = fp(fastifyAccman, { fastify: '5.x', name: 'fastify-accman' })

module.exports = { plugin, fingerprint, Meter }
