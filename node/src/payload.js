'use strict'
// The reply's payload as the plugin's onSend meets it: a handler's web
// Response taken apart as fastify takes it, a file stream waited for until
// it has opened, and a payload that will not be sent given up, so that what
// it holds (a file's fd) is freed.

const { validateHeaderName, validateHeaderValue } = require('node:http')
const { bySiblingHead } = require('./routes')

function isResponse (payload) {
  return payload !== null && typeof payload === 'object' &&
    Object.prototype.toString.call(payload) === '[object Response]'
}

// A web Response (which fastify 5 takes from a handler) as the reply's
// status, headers and body.  fastify applies a Response's status and
// headers only once the onSend hooks are done (reply.js, onSendEnd), so the
// charge would judge the reply's 200 and a cost function would not see the
// Response's headers: applied here, as fastify applies them, the charge
// and the cost function see what goes out, and the payload is the body (a
// web stream, or null), which fastify sends as it does a Response's.  One
// whose body was used is left as it is, for fastify to refuse with a 500
// (refused); reply.code() throws for Response.error()'s status 0, which
// fastify refuses the same way.
function unwrapResponse (reply, payload) {
  if (!isResponse(payload) || payload.bodyUsed) return payload
  reply.code(payload.status)
  for (const [name, value] of payload.headers) reply.header(name, value)
  // The HEAD route fastify adds beside a GET (exposeHeadRoutes) has an
  // onSend hook after every plugin's, which fails on a null payload with a
  // 500: a HEAD's body, never sent, is an empty web stream, which it cancels.
  if (payload.body === null && reply.request.method === 'HEAD') return new ReadableStream()
  return payload.body
}

// Whether fastify refuses `payload`, left by unwrapResponse, with a 500
// after the onSend hooks: a Response whose body was used; a web stream
// that a reader holds, which fastify cannot read (reply.js, sendWebStream);
// anything but nothing, a string, a Buffer or a stream (an object under a
// content type that is not JSON, a number, a boolean), which it cannot
// send (onSendEnd, FST_ERR_REP_INVALID_PAYLOAD_TYPE).  fastify reads no
// body of a 1xx or 204; its own sibling HEAD route (routes.js,
// headSiblings) cancels a web stream, locked or not, and measures any
// other payload as a string or a Buffer; a HEAD route the app declared is
// sent as a GET route is.
function refused (reply, payload) {
  if (isResponse(payload)) return payload.bodyUsed
  if (payload === undefined || payload === null || typeof payload === 'string' ||
      Buffer.isBuffer(payload)) return false
  const status = reply.statusCode
  if (status < 200 || status === 204 || typeof payload.pipe === 'function') return false
  if (typeof payload.getReader === 'function') {
    return payload.locked === true && !bySiblingHead(reply.request)
  }
  return true
}

// Whether Node refuses to write `headers` (the reply's, getHeaders()): a
// name that is no token, a value with a line break or a character past
// latin1 (a file name in Chinese in content-disposition).  fastify's
// writeHead then throws, after the onSend hooks, and it answers 500.
function unwritable (headers) {
  for (const name in headers) {
    try {
      validateHeaderName(name)
      for (const value of [].concat(headers[name])) validateHeaderValue(name, value)
    } catch {
      return true
    }
  }
  return false
}

// Ends a payload that will not be sent: a stream's resources (a file's fd)
// are freed only when it is read to its end, destroyed (a Node stream) or
// cancelled (a web stream, which a locked one refuses: its reader ends it).
function discard (payload) {
  if (payload === null || typeof payload !== 'object') return
  if (typeof payload.destroy === 'function') {
    payload.destroy()
  } else if (typeof payload.getReader === 'function' && typeof payload.cancel === 'function') {
    payload.cancel().catch(() => {})
  }
}

// Resolves once the file stream `stream` has opened, or failed to.
function opened (stream) {
  return new Promise((resolve) => {
    const done = () => {
      stream.removeListener('ready', done)
      stream.removeListener('error', done)
      resolve()
    }
    stream.once('ready', done)
    stream.once('error', done)
  })
}

module.exports = { unwrapResponse, refused, unwritable, discard, opened }
