'use strict'
// A real fastify service with the plugin registered, listening on a free
// loopback port, with one route for each kind of price.  `logs`, if given,
// collects the service's log lines (pino's objects: level 40 a warning, 50
// an error); `app.served` counts the handlers that ran.  `before(app)`, if
// given, adds what the test needs before the plugin registers (hooks that
// see every request, the plugin's refusals among them).  `https`, if
// given ({ key, cert }), makes it an https service (fastify's option).

const fs = require('node:fs')
const os = require('node:os')
const path = require('node:path')
const { Readable } = require('node:stream')
const Fastify = require('fastify')
const accman = require('../..')

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms))

function logTo (logs) {
  if (!logs) return false
  return { level: 'info', stream: { write: (line) => logs.push(JSON.parse(line)) } }
}

async function serviceApp (options, { logs, before, https } = {}) {
  const app = Fastify({ logger: logTo(logs), ...(https ? { https } : {}) })
  app.decorate('served', 0)
  app.addHook('preHandler', async () => { app.served++ })
  if (before) before(app)
  await app.register(accman, options)
  app.get('/w', async () => ({ ok: true }))
  app.get('/fail', async (request, reply) => reply.code(500).send({ error: 'boom' }))
  app.get('/throw', async () => { throw new Error('the handler failed') })
  // A handler that sends, then throws (?as=throw), sends a 500 too
  // (?as=send), or returns undefined (?as=none), where fastify asks for
  // `return reply` after a send and sends the undefined.
  app.get('/sendagain', async (request, reply) => {
    reply.header('x-first', 'yes').send({ first: true })
    if (request.query.as === 'throw') throw new Error('the handler failed after sending')
    if (request.query.as === 'send') return reply.code(500).header('x-second', 'yes').send({ second: true })
  })
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
  app.get('/badcost', {
    config: { accman: (request, reply, stage) => stage === 'estimate' ? 1 : -1 },
    preHandler: async (request, reply) => { reply.header('x-before', 'hook') }
  }, async (request, reply) => {
    reply.header('set-cookie', 'session=paid-response').header('x-app', 'handler')
    return {}
  })
  // As /rows, answered with a web Response (fastify 5 takes one from a
  // handler): its status and x-rows header come from the query.
  app.get('/response', {
    config: {
      accman: (request, reply, stage) => stage === 'estimate' ? 10 : Math.ceil(Number(reply.getHeader('x-rows')) / 10)
    }
  }, async (request) => new Response(JSON.stringify({ rows: Number(request.query.rows) }), {
    status: Number(request.query.status), headers: { 'content-type': 'application/json', 'x-rows': request.query.rows }
  }))
  // A web Response that fastify refuses with a 500 after the onSend hooks:
  // ?as=used, one whose body was read; ?as=error, Response.error(), whose
  // status 0 is no HTTP status; ?as=locked below.
  app.get('/badresponse', async (request, reply) => {
    if (request.query.as === 'error') return Response.error()
    // ?as=object and ?as=number, a payload that fastify cannot send: an
    // object under a content type that is not JSON, a number.
    if (request.query.as === 'object') return reply.type('text/plain').send({ not: 'text' })
    if (request.query.as === 'number') return reply.type('text/html').send(42)
    // ?as=header, a header that Node will not write: a file name past latin1.
    if (request.query.as === 'header') {
      return reply.header('content-disposition', 'attachment; filename="\u62a5\u544a.txt"').send('x')
    }
    // ?as=locked, a web stream that a reader holds: fastify refuses it too.
    if (request.query.as === 'locked') {
      const stream = new Response('locked').body
      stream.getReader()
      return reply.type('text/plain').send(stream)
    }
    const used = new Response('read already')
    await used.text()
    return used
  })
  // A web Response with no body, of the status ?status.
  app.get('/emptyresponse', async (request) => new Response(null, {
    status: Number(request.query.status), headers: { 'x-empty': 'yes' }
  }))
  // A web Response that carries an ACCMAN header of its own, as one
  // relayed from another service metered by AccMan does.
  app.get('/relayed', async () => new Response('{"relayed":true}', {
    headers: { 'content-type': 'application/json', accman: '12345' }
  }))
  app.get('/asynccost', { config: { accman: async () => 1 } }, async () => ({}))
  // A file streamed by a route whose cost function throws at 'charge':
  // as a Node stream, or with ?as=web as a web stream, or with
  // ?as=response as a web Response's body.  app.streams keeps each file
  // stream, to see that its file is closed.
  app.decorate('streams', [])
  app.get('/filethrows', {
    config: {
      accman: (request, reply, stage) => {
        if (stage === 'estimate') return 1
        throw new Error('the cost function failed')
      }
    }
  }, async (request, reply) => {
    // A file larger than a web stream reads ahead: node's own executable.
    const stream = fs.createReadStream(process.execPath)
    app.streams.push(stream)
    if (request.query.as === 'web') return reply.type('text/plain').send(Readable.toWeb(stream))
    if (request.query.as === 'response') return new Response(Readable.toWeb(stream))
    return reply.type('text/plain').send(stream)
  })
  // A file that is not there: the stream fails as it opens, after onSend.
  app.get('/nofile', async (request, reply) => reply.type('text/plain').send(fs.createReadStream(path.join(os.tmpdir(), 'accman-no-such-file'))))
  // A stream that fails `ms` after it is handed over, before its first byte.
  app.get('/streamfails', async (request, reply) => {
    const stream = new Readable({ read () {} })
    setTimeout(() => stream.destroy(new Error('the stream failed')), Number(request.query.ms))
    return reply.type('text/plain').send(stream)
  })
  // As /streamfails, a web stream, which fastify reads (and sees fail) only
  // once the onSend hooks are done.
  app.get('/webstreamfails', async (request, reply) => {
    const stream = new ReadableStream({
      start (controller) {
        setTimeout(() => controller.error(new Error('the web stream failed')), Number(request.query.ms))
      }
    })
    return reply.type('text/plain').send(stream)
  })
  app.get('/slow', async (request) => {
    await sleep(Number(request.query.ms))
    return { slow: true }
  })
  // As /slow, for a request with a body, which fastify reads before the handler.
  app.post('/slow', async (request) => {
    await sleep(Number(request.query.ms))
    return { slow: true, body: request.body }
  })
  // A handler that answers once the test calls app.openGate() (?fail=1: a
  // 500): a test that needs something done while a handler runs does it
  // before opening the gate, so a slow machine cannot let the handler end
  // first.  app.gatesPassed counts the handlers past it.
  let openGate
  const gate = new Promise((resolve) => { openGate = resolve })
  app.decorate('openGate', openGate)
  // Opened as fastify closes the server too (after the preClose hooks, the
  // plugin's among them): a test that fails before opening it does not
  // leave close() waiting on the handler, and a request under way as
  // close() starts is still under way as the server closes.
  const serverClose = app.server.close
  app.server.close = function (...args) {
    const closing = serverClose.apply(this, args)
    openGate()
    return closing
  }
  app.decorate('gatesPassed', 0)
  app.get('/gated', async (request, reply) => {
    await gate
    app.gatesPassed++
    if (request.query.fail) return reply.code(500).send({ error: 'gated and failed' })
    return { gated: true }
  })
  app.post('/gated', async (request) => {
    await gate
    app.gatesPassed++
    return { gated: true, body: request.body }
  })
  app.get('/slowfail', async (request, reply) => {
    await sleep(Number(request.query.ms))
    return reply.code(500).send({ error: 'slow and failed' })
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

// The messages of the log lines at `level` (40 warn, 50 error).
function messages (logs, level) {
  return logs.filter((l) => l.level === level).map((l) => l.msg)
}

// Waits until `ready()` (or the promise it returns) is true, polling;
// fails after `ms`.
async function until (ready, ms = 20000) {
  const end = Date.now() + ms
  while (!(await ready())) {
    if (Date.now() > end) throw new Error('timed out waiting')
    await sleep(10)
  }
}

module.exports = { serviceApp, get, sleep, messages, until }
