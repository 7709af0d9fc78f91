'use strict'
// A real fastify service with the plugin registered, listening on a free
// loopback port, with one route for each kind of price.

const Fastify = require('fastify')
const accman = require('../..')

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms))

async function serviceApp (options) {
  const app = Fastify({ logger: false })
  await app.register(accman, options)
  app.get('/w', async () => ({ ok: true }))
  app.get('/fail', async (request, reply) => reply.code(500).send({ error: 'boom' }))
  app.get('/throw', async () => { throw new Error('the handler failed') })
  app.get('/free', { config: { accman: false } }, async () => ({ free: true }))
  app.get('/health', async () => ({ up: true }))
  app.get('/pricey', { config: { accman: 5 } }, async () => ({ pricey: true }))
  // Up to 10 held or required; charged one per ten rows of the answer.
  app.get('/rows', {
    config: {
      accman: (request, reply, stage) => stage === 'estimate' ? 10 : Math.ceil(Number(reply.getHeader('x-rows')) / 10)
    }
  }, async (request, reply) => {
    reply.header('x-rows', request.query.rows)
    return { rows: Number(request.query.rows) }
  })
  app.get('/badcost', { config: { accman: (request, reply, stage) => stage === 'estimate' ? 1 : -1 } }, async () => ({}))
  app.get('/slow', async (request) => {
    await sleep(Number(request.query.ms))
    return { slow: true }
  })
  const url = await app.listen({ port: 0, host: '127.0.0.1' })
  return { app, url }
}

function get (url, cred, extra = {}) {
  const headers = cred === undefined ? {} : { accman: cred }
  return fetch(url, { headers, ...extra }).then(async (r) => ({
    status: r.status, accman: r.headers.get('accman'), headers: r.headers, body: await r.json()
  }))
}

module.exports = { serviceApp, get, sleep }
