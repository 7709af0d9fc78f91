'use strict'
// The Node client for AccMan: a pool of keep-alive HTTP/1.1 connections
// (undici's Pool: measured against node:http with a keep-alive Agent in
// bench/transport.js, see README "Performance"), values checked before they
// are sent, replies decoded strictly, and typed errors that say what a
// failure means for money (errors.js).
//
// Retries: reads, keyed mods and holds, and settles (a settle with the same
// `use` answers its first reply again, SPEC "Holds") are repeated after an
// unknown outcome or a 503; a keyless mod or hold only when nothing was sent
// (Unreachable) or AccMan refused it before applying (NotApplied: Busy and
// ShuttingDown among them).

const { X509Certificate } = require('node:crypto')
const { Pool } = require('undici')
const limits = require('./limits')
const {
  AccManError, Busy, NotApplied, Unavailable, Unreachable, OutcomeUnknown, CallTimeout, BadReply,
  mayHaveLanded, definite, applied, unechoed
} = require('./errors')
const values = require('./values')
const { shown } = require('./options')

const TOKEN_RE = /^[A-Za-z0-9._~+/-]+=*$/ // RFC 6750 b64token
// undici's errors for a reply that breaks HTTP/1.1 framing (llhttp's are HPE_*).
const FRAMING_CODES = new Set(['UND_ERR_HEADERS_OVERFLOW', 'UND_ERR_RES_CONTENT_LENGTH_MISMATCH'])
const PREFIX_RE = /^(\/[A-Za-z0-9._~-]+)+$/
// A host that is not an IP literal: a name of labels of 1 to 63 characters
// (RFC 1035 2.3.4), the root's dot at most at its end, as the Python client
// takes it (accman/calling/requests.py).  new URL() writes an international
// name in its xn-- form and an IPv4 address in dotted decimal, but keeps an
// empty or long label (`a..b`, `.a`, `.`) and `!$&'()*+,;=~` in a host: the
// resolver would refuse each call of such a client (ENOTFOUND), and `https://./`
// would reach TLS as an empty name.  An IPv6 literal is in brackets.
const LABELS_RE = /^(?:[A-Za-z0-9_-]{1,63}\.)*[A-Za-z0-9_-]{1,63}\.?$/

// A space, or an ASCII or Latin-1 control character: the URL parser drops a
// tab or a line break wherever it is (`:2<TAB>3001` is port 23001) and
// spaces at either end, so the URL would reach another port or host than
// it reads; the Python client refuses them too (accman/calling/requests.py).
const SPACE_OR_CONTROL_RE = /[\x00-\x20\x7f-\x9f]/

// The form the Python client reads: the URL parser takes a `\` for a `/`,
// `http:h` and `http:///h` for `http://h`, and decodes `%31` in a host, so
// that a URL would reach another host or path than it reads
// (`http://evil.example\.127.0.0.1` is evil.example).
const URL_FORM_RE = /^https?:\/\/[^/\\?#%]+(?:[/?#][^\\]*)?$/i

function parseUrl (url) {
  if (typeof url === 'string' && SPACE_OR_CONTROL_RE.test(url)) {
    throw new TypeError('url holds a space or a control character: the URL parser drops a ' +
      'tab or a line break wherever it is, and spaces at either end')
  }
  if (typeof url === 'string' && /^https?:/i.test(url) && !URL_FORM_RE.test(url)) {
    throw new TypeError('url must be written http://HOST[:PORT][/PATH] (or https://), with no ' +
      '\\ anywhere nor % in its host: the URL parser would read another host or path')
  }
  let u
  try {
    u = new URL(url)
  } catch {
    throw new TypeError('url must be an absolute http:// or https:// URL of AccMan')
  }
  if (u.protocol !== 'http:' && u.protocol !== 'https:') {
    throw new TypeError('url must start with http:// or https://')
  }
  if (u.search || u.hash || u.username || u.password) {
    throw new TypeError('url takes no query, fragment or userinfo')
  }
  if (!u.hostname.startsWith('[') && !LABELS_RE.test(u.hostname)) {
    throw new TypeError('url host must be a name (labels of 1 to 63 characters: A-Z a-z 0-9 ' +
      `- _) or an IP address, not ${JSON.stringify(u.hostname)}`)
  }
  const prefix = u.pathname.replace(/\/+$/, '')
  if (prefix && !PREFIX_RE.test(prefix)) {
    throw new TypeError('url path must be plain ASCII segments')
  }
  // TLS is given the host without the root's dot, as the SNI name and the
  // name the certificate is checked for (RFC 6066 3; a certificate names
  // `accman.example` for `accman.example.`); undici would send it as written.
  const tlsName = u.protocol === 'https:' && u.hostname.endsWith('.')
    ? u.hostname.slice(0, -1)
    : undefined
  return { origin: u.origin, prefix, tlsName }
}

// Why a connection failed before its request was written, in the words of
// the error and its code: a TLS handshake's names the check that failed,
// `self-signed certificate (DEPTH_ZERO_SELF_SIGNED_CERT)`.
function connectReason (err) {
  if (err.code === 'UND_ERR_CONNECT_TIMEOUT') return 'timed out'
  const message = String(err.message || '').replace(/[\s:]+$/, '') // node's may end in ': '
  if (!err.code || message.includes(err.code)) return message || String(err.code)
  return message ? `${message} (${err.code})` : err.code
}

const PEM_CERT_RE = /-----BEGIN CERTIFICATE-----[^-]+-----END CERTIFICATE-----/g

// The `ca` option: the certificates an https connection trusts instead of
// Node's default ones, as node:tls's `ca` takes them (a PEM string or
// Buffer, or an array of them).  node:tls skips what is not a PEM
// certificate without a word, which would leave a typo trusting nothing,
// so each entry must hold certificates and each must parse.  Given with
// http:// it would be silently unused, so it is refused there.
function caOption (ca, https) {
  if (ca === undefined || ca === null) return undefined
  if (!https) throw new TypeError('ca is for an https:// url; this url is http://')
  const entries = Array.isArray(ca) ? ca : [ca]
  if (entries.length === 0) throw new TypeError('ca must not be an empty array')
  entries.forEach((entry, i) => {
    const what = Array.isArray(ca) ? `ca[${i}]` : 'ca'
    if (typeof entry !== 'string' && !Buffer.isBuffer(entry)) {
      throw new TypeError(`${what} must be a PEM string or Buffer, not ${shown(entry)}`)
    }
    const pems = String(entry).match(PEM_CERT_RE)
    if (!pems) throw new TypeError(`${what} holds no PEM certificate (-----BEGIN CERTIFICATE-----)`)
    for (const pem of pems) {
      try {
        new X509Certificate(pem) // eslint-disable-line no-new
      } catch {
        throw new TypeError(`${what} holds a PEM certificate that does not parse`)
      }
    }
  })
  return ca
}

// A wrong value is shown (options.js, shown): `timeoutMs: '5000'` from the
// environment is in range, and only its type says why it is refused.
function intOption (value, what, lo, hi) {
  if (!Number.isSafeInteger(value) || value < lo || value > hi) {
    throw new TypeError(`${what} must be an integer from ${lo} to ${hi}, not ${shown(value)}`)
  }
  return value
}

// One attempt of one call, as an undici dispatch handler.  `sent` turns true
// when undici is about to write the request: an error before that means
// nothing reached AccMan (Unreachable), after it the outcome is unknown.
// undici writes the whole request in the same call, and a new connection's
// request as soon as the connection opens; it looks at a reused connection
// for the server's close before writing, and a request that meets a close
// there goes on a new connection or fails unsent.  So a close seen once
// `sent` came after the request went into the socket: it may come from a
// server that read the request and died before answering, even when it was
// one that closes each connection as it opens.
class Attempt {
  constructor (client, resolve, reject) {
    this.client = client
    this.resolve = resolve
    this.reject = reject
    this.sent = false
    this.done = false
    this.controller = null
    this.status = 0
    this.chunks = []
    this.bytes = 0
    this.timer = setTimeout(() => this.expire(), client.timeoutMs)
  }

  finish (err, value) {
    if (this.done) return
    this.done = true
    clearTimeout(this.timer)
    this.client._inFlight--
    if (err) this.reject(err)
    else this.resolve(value)
  }

  expire () {
    const ms = this.client.timeoutMs
    if (this.sent) {
      this.finish(new CallTimeout(`no reply from AccMan within ${ms} ms`))
      if (this.controller) this.controller.abort(new Error('timeout'))
    } else {
      // Still queued for a connection: it will be aborted before it is written.
      this.finish(new Unreachable(`no AccMan connection within ${ms} ms: nothing was sent`))
    }
  }

  onRequestStart (controller) {
    this.controller = controller
    if (this.done) {
      controller.abort(new Error('timeout')) // expired while queued: never written
      return
    }
    this.sent = true
  }

  onResponseStart (controller, status) {
    if (status >= 200) this.status = status
  }

  onResponseData (controller, chunk) {
    this.bytes += chunk.length
    if (this.bytes > limits.REPLY_BODY_BYTES_MAX) {
      this.finish(new BadReply('reply body over REPLY_BODY_BYTES_MAX'))
      controller.abort(new Error('reply too large'))
      return
    }
    this.chunks.push(chunk)
  }

  onResponseEnd () {
    const body = this.chunks.length === 1 ? this.chunks[0] : Buffer.concat(this.chunks)
    this.finish(null, [this.status, body.toString('utf8')])
  }

  onResponseError (controller, err) {
    if (this.done) return
    const where = this.client.where
    if (!this.sent) {
      this.finish(new Unreachable(`cannot reach AccMan at ${where}: ${connectReason(err)}`))
    } else if (FRAMING_CODES.has(err.code) || String(err.code).startsWith('HPE_')) {
      this.finish(new BadReply(`the reply from ${where} broke HTTP/1.1 framing`))
    } else {
      this.finish(new OutcomeUnknown(`the connection to AccMan at ${where} broke before the reply`))
    }
  }
}

// Whether a failed attempt may be sent again: a call that is `safe` to
// repeat (a read, a keyed change, a settle) after any unknown outcome or
// 503; any call when nothing of it was applied.
function retryable (err, safe) {
  if (err instanceof Unreachable || err instanceof NotApplied) return true
  if (err instanceof OutcomeUnknown || err instanceof Unavailable) return safe
  return false
}

function pauseMs (attempt) {
  return Math.min(limits.RETRY_PAUSE_MS * 2 ** attempt, limits.RETRY_PAUSE_MAX_MS)
}

const CLIENT_OPTIONS = ['url', 'token', 'timeoutMs', 'connections', 'retries', 'bigint', 'ca']

class AccManClient {
  constructor (options) {
    const {
      url, token, timeoutMs = limits.TIMEOUT_MS_DEFAULT, connections = limits.CONNECTIONS_DEFAULT,
      retries = limits.RETRIES_DEFAULT, bigint = false, ca
    } = values.checkOptions(options, 'AccManClient', CLIENT_OPTIONS)
    const { origin, prefix, tlsName } = parseUrl(url)
    this.where = origin + prefix // for messages: no token
    this.timeoutMs = intOption(timeoutMs, 'timeoutMs', 1, 3600000)
    const connect = { timeout: this.timeoutMs }
    if (tlsName) connect.servername = tlsName
    const trusted = caOption(ca, origin.startsWith('https:'))
    if (trusted !== undefined) connect.ca = trusted
    this.retries = intOption(retries, 'retries', 0, limits.RETRIES_MAX)
    intOption(connections, 'connections', 1, limits.CONNECTIONS_MAX)
    if (typeof bigint !== 'boolean') {
      throw new TypeError(`bigint must be true or false, not ${shown(bigint)}`)
    }
    this.bigint = bigint
    this._prefix = prefix
    this._headers = null
    // An empty token is no token, as null is: `token: process.env.ACCMAN_TOKEN`
    // set but empty is a server without tokens, as on the Python side.
    if (token !== undefined && token !== null && typeof token !== 'string') {
      throw new TypeError(`token must be a string, not ${shown(token)}`)
    }
    if (token !== undefined && token !== null && token !== '') {
      if (!TOKEN_RE.test(token)) {
        throw new TypeError('token must be an RFC 6750 b64token: letters, digits and ' +
          '- . _ ~ + /, with = only at its end (null, undefined or empty: none)')
      }
      this._headers = ['authorization', 'Bearer ' + token]
    }
    this._pool = new Pool(origin, {
      connections,
      pipelining: 1,
      keepAliveTimeout: limits.IDLE_REUSE_MS,
      keepAliveMaxTimeout: limits.IDLE_REUSE_MS,
      maxHeaderSize: limits.REPLY_HEAD_BYTES_MAX,
      headersTimeout: 0, // each attempt has its own deadline (Attempt)
      bodyTimeout: 0,
      connect
    })
    this._inFlight = 0
    this._closed = false
    Object.defineProperty(this, '_headers', { enumerable: false }) // no token in inspect()
  }

  // Every call returns a promise: a value refused before anything is sent
  // (BadRequest, TypeError) rejects it as AccMan's own refusal would.

  // The durable balance.  NoAccount for an unknown credential.
  async tot (cred) {
    return this._call('GET', values.targetTot(cred), true, values.decodeTot)
  }

  // Changes the balance by `by`; { tot, seq } once durable.  With `min` it
  // applies only if the new balance is >= min, else Insufficient (.tot);
  // with `key` it applies at most once; `low` (funding only) sets the
  // account's low-balance threshold (not part of what the key names).
  async mod (cred, by, options) {
    const { min, key, low } = values.checkOptions(options, 'mod', ['min', 'key', 'low'])
    const target = values.targetMod(cred, by, min, key, low)
    return this._call('PATCH', target, key !== undefined && key !== null, values.decodeMod)
  }

  // One page of history, newest first: { account, past, next }, `next` the
  // `before` of the following page or null.
  async past (cred, options) {
    const { limit, before } = values.checkOptions(options, 'past', ['limit', 'before'])
    return this._call('GET', values.targetPast(cred, limit, before), true, values.decodePast)
  }

  // Holds -by (by < 0) for up to ttlS seconds: { hold, tot, seq }, `tot` what
  // is left to spend.  `min` defaults to 0 on the server.
  async hold (cred, by, options) {
    const { ttlS, min, key } = values.checkOptions(options, 'hold', ['ttlS', 'min', 'key'])
    const target = values.targetHold(cred, by, ttlS, min, key)
    return this._call('PATCH', target, key !== undefined && key !== null, values.decodeHold)
  }

  // Ends a hold: `use` of it is spent, the rest returns.  { tot, seq }.
  async settle (cred, hold, use) {
    return this._call('PATCH', values.targetSettle(cred, hold, use), true, values.decodeSettle)
  }

  // Waits for the calls in flight, then closes every connection; later
  // calls fail with Unreachable.
  async close () {
    if (this._closed) return
    this._closed = true
    await this._pool.close()
  }

  // Once an attempt may have landed, the call ends with that error unless
  // a later attempt gets a definite answer (a success, a 200 too large for
  // numbers: errors.applied, or a refusal that settles it:
  // errors.definite): a retry refused before it was read (NotApplied,
  // Unreachable, a 401 or 403, which come before the key is looked up) or
  // answered by something that is not AccMan says nothing of the earlier
  // attempt.
  async _call (method, target, safe, decode) {
    const path = this._prefix + target
    let maybe = null
    for (let attempt = 0; ; attempt++) {
      try {
        const [status, text] = await this._attempt(method, path)
        return decode(status, text, this.bigint)
      } catch (err) {
        if (maybe === null && mayHaveLanded(err)) maybe = err
        if (!(err instanceof AccManError) || attempt >= this.retries || this._closed ||
            !retryable(err, safe)) {
          const ending = maybe !== null && !mayHaveLanded(err) && !definite(err) && !applied(err)
            ? maybe
            : err
          throw unechoed(ending, this._secrets(target))
        }
      }
      await new Promise((resolve) => setTimeout(resolve, pauseMs(attempt)))
    }
  }

  // What a reply's detail must not show of this call's request.
  _secrets (target) {
    const cred = /[?&]cred=([^&]+)/.exec(target)
    return [cred ? cred[1] : null, this._headers ? this._headers[1].slice('Bearer '.length) : null]
  }

  _attempt (method, path) {
    if (this._closed) return Promise.reject(new Unreachable('the AccMan client is closed'))
    if (this._inFlight >= limits.CALLS_IN_FLIGHT_MAX) {
      return Promise.reject(new Busy(
        'more than CALLS_IN_FLIGHT_MAX AccMan calls in flight: nothing was sent'))
    }
    this._inFlight++
    return new Promise((resolve, reject) => {
      const attempt = new Attempt(this, resolve, reject)
      try {
        const idempotent = method === 'GET'
        this._pool.dispatch({ method, path, headers: this._headers, idempotent }, attempt)
      } catch (err) {
        const why = err.code || err.message
        attempt.finish(new Unreachable(`cannot send to AccMan at ${this.where}: ${why}`))
      }
    })
  }

  get [Symbol.toStringTag] () {
    return 'AccManClient'
  }
}

module.exports = { AccManClient }
