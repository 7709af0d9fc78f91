'use strict'
// The plugin's options and each route's price, checked when the plugin is
// registered and when a route is added: configuration that is wrong is
// refused at startup with an error naming what is wrong, never found by
// the requests that meet it.

const limits = require('./limits')

// Every option the plugin takes.
const OPTIONS = [
  'url', 'token', 'client', 'cost', 'mode', 'onUnavailable', 'exempt', 'header', 'chargeErrors',
  'holdTtlS', 'checkFreshMs', 'timeoutMs', 'retries', 'connections', 'ca', 'onUnpaid'
]
// The options that make the plugin's own client: with `client` given, they
// would have no effect, so they are refused.
const CLIENT_OPTIONS = ['url', 'token', 'timeoutMs', 'retries', 'connections', 'ca']
// fastify's own options of register(), which it hands to the plugin too.
const REGISTER_OPTIONS = ['prefix', 'logLevel', 'logSerializers']
const KNOWN = new Set([...OPTIONS, ...REGISTER_OPTIONS])
const HEADER_RE = /^[A-Za-z0-9-]+$/
const SHOWN_CHARS_MAX = 40 // how much of a wrong string value a message quotes

// A value as an error message shows it: a string quoted (its start only),
// a bigint with its n, only the type of anything else.
function shown (value) {
  if (typeof value === 'string') {
    const start = value.length > SHOWN_CHARS_MAX ? value.slice(0, SHOWN_CHARS_MAX) + '...' : value
    return JSON.stringify(start)
  }
  if (typeof value === 'bigint') return `${value}n`
  if (typeof value === 'number' || typeof value === 'boolean' || value === null) {
    return String(value)
  }
  // An async function's result: an amount is wanted now, not later.
  if (typeof value === 'object' && typeof value.then === 'function') {
    return 'a promise (it must not be async)'
  }
  const type = typeof value
  return `${/^[aeiou]/.test(type) ? 'an' : 'a'} ${type}`
}

function isAmount (value) {
  return (typeof value === 'number' && Number.isSafeInteger(value) && value >= 0) ||
    (typeof value === 'bigint' && value >= 0n && value <= limits.INT64_MAX)
}

// What an amount may be, as error messages say it: 2^60 as a number is a
// non-negative integer, but not a safe one.
const AMOUNT = 'a non-negative integer (a safe-integer number, or a bigint up to 2^63-1)'

// An amount of money as a bigint: a non-negative safe integer or bigint.
function amount (value, what) {
  if (!isAmount(value)) {
    throw new TypeError(`${what} must be ${AMOUNT}, not ${shown(value)}`)
  }
  return BigInt(value)
}

function price (value, what) {
  return typeof value === 'function' ? value : amount(value, what)
}

function choice (value, allowed, what) {
  if (!allowed.includes(value)) {
    const names = allowed.map((a) => `'${a}'`).join(' or ')
    throw new TypeError(`${what} must be ${names}, not ${shown(value)}`)
  }
  return value
}

function flag (value, what) {
  if (typeof value !== 'boolean') {
    throw new TypeError(`${what} must be true or false, not ${shown(value)}`)
  }
  return value
}

function integer (value, what, lo, hi) {
  if (!Number.isInteger(value) || value < lo || value > hi) {
    throw new TypeError(`${what} must be an integer from ${lo} to ${hi}, not ${shown(value)}`)
  }
  return value
}

function headerName (value) {
  if (typeof value !== 'string' || !HEADER_RE.test(value)) {
    throw new TypeError(`header must be a plain header name, not ${shown(value)}`)
  }
  return value.toLowerCase()
}

// A request's route as error messages name it.
function routeOf (request, options = request.routeOptions) {
  return `${request.method} ${options ? options.url : request.url}`
}

// An error thrown by a function of the service's (exempt, a cost
// function): a refusal it means (a 4xx status, as fastify's
// httpErrors have) goes to the consumer as it is; anything else is a bug,
// a 500 named with the function, the route and the stage.
function thrownBy (err, what) {
  const status = err === null || typeof err !== 'object' ? undefined : err.statusCode ?? err.status
  if (Number.isInteger(status) && status >= 400 && status < 500) return err
  const message = err instanceof Error ? err.message : String(err)
  return new Error(`${what} threw: ${message}`, { cause: err })
}

// An exempt function's answer, at once: true exempts, a falsy value
// (false, undefined: a function that returns nothing for "not exempt")
// meters.  Anything else (a promise, which an async function returns, a
// string) would be truthy and exempt every request silently: a 500
// naming the route.
function exemptBy (fn) {
  return (request, options = request.routeOptions) => {
    let verdict
    try {
      verdict = fn(request, options)
    } catch (err) {
      throw thrownBy(err, `the exempt function at ${routeOf(request, options)}`)
    }
    if (verdict === true || !verdict) return verdict === true
    throw new TypeError(`the result of the exempt function at ${routeOf(request, options)} ` +
      `must be true, or false (or another falsy value), not ${shown(verdict)}`)
  }
}

function exemptTest (exempt) {
  if (typeof exempt === 'function') return exemptBy(exempt)
  if (!Array.isArray(exempt) || exempt.some((p) => typeof p !== 'string')) {
    throw new TypeError(
      'exempt must be an array of paths (a trailing * matches a prefix) or a function')
  }
  // A route's path and a URL's both start with /: an entry without it
  // (a typo) would exempt nothing, silently.  '*' alone is every path.
  const wrong = exempt.find((p) => !(p.startsWith('/') || p === '*'))
  if (wrong !== undefined) {
    throw new TypeError(`exempt: ${shown(wrong)} is not a path starting with /, nor *`)
  }
  const exact = new Set(exempt.filter((p) => !p.endsWith('*')))
  const prefixes = exempt.filter((p) => p.endsWith('*')).map((p) => p.slice(0, -1))
  const test = (request, options = request.routeOptions) => {
    const path = routePath(request, options)
    return exact.has(path) || prefixes.some((p) => path.startsWith(p))
  }
  test.entries = exempt.slice() // for ready()'s check of what they name (routes.js)
  return test
}

// The path that `exempt` names: the route fastify chose, as declared (its
// prefix included), so that another spelling of the URL (`/h%65alth`, a
// trailing slash, another case) is exempt exactly when its route is, and a
// URL that only looks exempt (`/docs/` routed to a priced `/docs`) is not;
// the URL's own path for a request that matched no route (admission never
// asks: such a request is not metered, admit.js).
function routePath (request, options) {
  const url = options ? options.url : undefined
  if (typeof url === 'string') return url
  const q = request.url.indexOf('?')
  return q < 0 ? request.url : request.url.slice(0, q)
}

// A misspelt option would otherwise be ignored and its default taken
// silently (`modee: 'reserve'` serving in check mode).
function refuseUnknown (opts) {
  const unknown = Object.keys(opts).filter((name) => !KNOWN.has(name))
  if (unknown.length) {
    throw new TypeError(`unknown option${unknown.length > 1 ? 's' : ''} ${unknown.join(', ')}: ` +
      `fastify-accman takes ${OPTIONS.join(', ')}`)
  }
}

// The plugin's settings from its options, each checked; the client's own
// options (url, token, timeoutMs, retries, connections, ca) are checked by
// AccManClient, and refused beside a client given whole.
function settings (opts) {
  refuseUnknown(opts)
  if (opts.client !== undefined) {
    // Anything else would pass ready() and fail each request that calls
    // it.  Known by its tag, which a copy of the package loaded twice
    // shares, where instanceof would not.
    if (Object.prototype.toString.call(opts.client) !== '[object AccManClient]') {
      throw new TypeError('client must be an AccManClient made with { bigint: true }, ' +
        `not ${shown(opts.client)}`)
    }
    const mixed = CLIENT_OPTIONS.filter((name) => opts[name] !== undefined)
    if (mixed.length) {
      const many = mixed.length > 1
      throw new TypeError(`${mixed.join(', ')} ${many ? 'are options' : 'is an option'} ` +
        `of the client: with client given, set ${many ? 'them' : 'it'} on that AccManClient`)
    }
  }
  const onUnpaid = opts.onUnpaid ?? null
  if (onUnpaid !== null && typeof onUnpaid !== 'function') {
    throw new TypeError(`onUnpaid must be a function, not ${shown(onUnpaid)}`)
  }
  // An option left out takes its default; one given as null is a wrong
  // value like any other (`cost: null` is not "the default price").
  const given = (name, value) => opts[name] === undefined ? value : opts[name]
  const mode = choice(given('mode', 'check'), ['check', 'reserve'], 'mode')
  const holdTtlS = integer(given('holdTtlS', limits.HOLD_TTL_S_DEFAULT), 'holdTtlS', 1,
    limits.HOLD_TTL_S_MAX)
  // Check mode holds nothing: a ttl given to it would go unused unsaid, and
  // the operator would believe requests bounded by it.  As the Python
  // middleware's hold_ttl_s.
  if (opts.holdTtlS !== undefined && mode !== 'reserve') {
    throw new TypeError(`holdTtlS is the ttl of reserve mode's holds: with mode '${mode}' ` +
      "nothing is held; leave it out, or set mode 'reserve'")
  }
  return {
    mode,
    open: choice(given('onUnavailable', 'closed'), ['closed', 'open'], 'onUnavailable') === 'open',
    header: headerName(given('header', 'accman')),
    cost: price(given('cost', 1), 'cost'),
    exempt: exemptTest(given('exempt', [])),
    chargeErrors: flag(given('chargeErrors', false), 'chargeErrors'),
    holdTtlS,
    checkFreshMs: integer(given('checkFreshMs', limits.CHECK_FRESH_MS_DEFAULT), 'checkFreshMs', 0,
      limits.CHECK_FRESH_MS_MAX),
    onUnpaid
  }
}

// A route's `config.accman`, checked in onRoute: absent (the default
// cost), false (never metered), a cost function or an amount.  A wrong one
// fails the route's registration, naming the route and the value, instead
// of failing every request to it with a 500.
function checkRoute (route) {
  const value = route.config ? route.config.accman : undefined
  if (value === undefined || value === false || typeof value === 'function' || isAmount(value)) {
    return
  }
  const methods = [].concat(route.method).join(',')
  throw new TypeError(`config.accman of the route ${methods} ${route.url} must be ` +
    `${AMOUNT}, a function or false, not ${shown(value)}`)
}

// A route priced by its `config.accman` that `exempt` (an array) also
// names, its declared `path` matching an entry: exempt wins, so the price
// would never be charged, and the route its author meant to sell would be
// served free unsaid.  Refused, as the Python middleware refuses a price
// that only exempt paths match.
function checkExempt (route, path, exempt) {
  const value = route.config ? route.config.accman : undefined
  if (value === undefined || value === false || !exempt.entries) return
  const names = (e) => e.endsWith('*') ? path.startsWith(e.slice(0, -1)) : path === e
  const by = exempt.entries.find(names)
  if (by === undefined) return
  const methods = [].concat(route.method).join(',')
  throw new TypeError(`config.accman of the route ${methods} ${path} is a price, but exempt ` +
    `names the route (by ${shown(by)}): an exempt route is never metered`)
}

module.exports = { settings, checkRoute, checkExempt, amount, price, shown, routeOf, thrownBy }
