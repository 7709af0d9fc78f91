'use strict'
// The headers of an error that replaces a served response: the 503 when
// AccMan refuses its charge (check mode, 401 or 403 after the work), the
// 500 when the cost function fails at the charge.  The consumer gets
// nothing it did not pay for, yet a browser can read the refusal.

// The headers that describe a response's body: the 503 keeps none of them.
const BODY_HEADERS = new Set([
  'content-type', 'content-length', 'content-encoding', 'content-language', 'content-location',
  'content-range', 'content-disposition', 'transfer-encoding', 'etag', 'last-modified',
  'cache-control', 'expires'
])
const CORS_PREFIX = 'access-control-'

// A copy of the reply's headers as they are now; set-cookie's array is
// copied too, since a later cookie is pushed onto it.
function headersOf (reply) {
  const headers = reply.getHeaders()
  for (const name in headers) {
    if (Array.isArray(headers[name])) headers[name] = headers[name].slice()
  }
  return headers
}

// Those set before the handler ran (`before`, null when a hook answered
// before it: by other plugins' hooks, a request id, security headers, CORS)
// are the request's handling and stay, but for any that describes the
// body.  Of those set since (`now`), only CORS headers stay, from an onSend
// hook that ran before the plugin's, so that a browser can read the 503.
// The handler's own headers, its cookies among them, belong to the paid
// response and go with it.  onSend hooks that run after the plugin's add
// theirs to the 503.
function keptHeaders (before, now) {
  const kept = {}
  for (const name in before ?? {}) if (!BODY_HEADERS.has(name)) kept[name] = before[name]
  for (const name in now) if (name.startsWith(CORS_PREFIX)) kept[name] = now[name]
  return kept
}

// Replaces the reply's headers with those kept from `state.before` (the
// headers when the handler started) for an error response that takes the
// paid response's place: a 503 after a refused charge, fastify's 500 after
// a cost function's bug.
function dropHandlerHeaders (reply, state) {
  const kept = keptHeaders(state.before, reply.getHeaders())
  for (const name of Object.keys(reply.getHeaders())) reply.removeHeader(name)
  reply.headers(kept)
}

module.exports = { headersOf, keptHeaders, dropHandlerHeaders }
