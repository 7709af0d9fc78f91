'use strict'
// The routes the plugin meters without having checked their price.
//
// fastify runs a plugin's onRoute hook only for the routes added after the
// plugin loads, yet at ready() it gives the plugin's request hooks to every
// route of the plugin's scope, those added before it too (a route declared
// before register(), or just after a register() that is not awaited): such
// a route is metered, and its `config.accman` was never checked.  fastify 5
// has no public API that lists routes with their options; printRoutes()
// lists each route with the names of its hooks.  So the plugin names its
// onRequest hook, which every route it meters has, and gives each route it
// checks a preHandler of another name: a route with the first and not the
// second was never checked.

const { ROUTES_NAMED_MAX } = require('./limits')

// printRoutes() draws a tree: each line is an indent of `│   ` or four
// spaces per level, then `├── ` or `└── ` and a node's path segment, with
// ` (METHODS)` and the route's constraints when a route ends there.  Lines
// under a node without a branch carry its hooks (`• (onRequest) [names]`)
// or another route ending at the same node.  A node's path is the segments
// from the root down; a root without a segment is shown as EMPTY_ROOT.
const INDENT_RE = /^(?:│ {3}| {4})*/
const BRANCH_RE = /^[├└]── /
const ENTRY_RE = /^(.*) \(([A-Z][A-Z-]*(?:, [A-Z][A-Z-]*)*)\)(?: (\{.*\}))?$/
const HOOKS_RE = /^• \(([A-Za-z]+)\) (\[.*\])$/
const EMPTY_ROOT = '(empty root node)'

// The routes of printRoutes({ includeMeta: [hooks] }): each with its path,
// methods, constraints (as printed) and the names of its hooks.
function printedRoutes (text) {
  const segments = []
  const routes = []
  let route = null
  for (const line of text.split('\n')) {
    const indent = INDENT_RE.exec(line)[0]
    let rest = line.slice(indent.length)
    if (BRANCH_RE.test(rest)) {
      rest = rest.slice(4)
      const entry = ENTRY_RE.exec(rest)
      const segment = entry ? entry[1] : rest
      segments.length = indent.length / 4
      segments.push(segment === EMPTY_ROOT ? '' : segment)
      route = entry ? addRoute(routes, segments.join(''), entry) : null
      continue
    }
    const hooks = HOOKS_RE.exec(rest)
    if (hooks && route) {
      route.hooks[hooks[1]] = hookNames(hooks[2])
      continue
    }
    const entry = ENTRY_RE.exec(rest)
    if (entry && segments.length) route = addRoute(routes, segments.join(''), entry)
  }
  return routes
}

function addRoute (routes, path, entry) {
  const route = { path, methods: entry[2].split(', '), constraints: entry[3] || null, hooks: {} }
  routes.push(route)
  return route
}

function hookNames (json) {
  try {
    const names = JSON.parse(json)
    return Array.isArray(names) ? names : []
  } catch {
    return []
  }
}

// How printRoutes() shows a hook: its function's name and `()`.
function printedName (hookName) {
  return `${hookName}()`
}

// The routes that carry the hook named `meteredBy` (onRequest) and not the
// one named `checkedBy` (preHandler).  A route that answers only OPTIONS is
// let through: a CORS plugin registers before this one, so that its headers
// are on this plugin's refusals, and adds a route for preflights (OPTIONS
// *), which never carry a credential and are answered in its hook.
// `readable` is false when no route carries `checkedBy` though the plugin
// checked `checked` routes: then the text is not in the shape read here.
function uncheckedRoutes (text, meteredBy, checkedBy, checked) {
  const routes = printedRoutes(text)
  // A prefixed '/' route is printed as /v1 and /v1/, and routed as '/v1'.
  const printed = new Set(routes.map((r) => r.path))
  const slashed = (p) => p.length > 1 && p.endsWith('/') && printed.has(p.slice(0, -1))
  const paths = [...printed].filter((p) => !slashed(p))
  const has = (route, hook, name) => (route.hooks[hook] || []).includes(printedName(name))
  const unchecked = routes.filter((r) => has(r, 'onRequest', meteredBy) &&
    !has(r, 'preHandler', checkedBy) && !r.methods.every((m) => m === 'OPTIONS'))
  const readable = checked === 0 || routes.some((r) => has(r, 'preHandler', checkedBy))
  return { unchecked, readable, paths }
}

// The exempt entries (options.js) that name no route of `paths`: an exact
// one that is no route's declared path, a prefix (`/docs/*`) that begins
// none.  They exempt only requests that no route answers (their 404s), which
// is seldom what was meant: a typo, or a route's URL where its declared path
// (`/users/:id`) is what exempt names.
function unroutedExempt (entries, paths) {
  return entries.filter((entry) => entry.endsWith('*')
    ? !paths.some((path) => path.startsWith(entry.slice(0, -1)))
    : !paths.includes(entry))
}

function routeName (route) {
  const constraints = route.constraints ? ' ' + route.constraints : ''
  return `${route.methods.join(',')} ${route.path}${constraints}`
}

// The warning at ready(): the routes named, up to ROUTES_NAMED_MAX.  Not an
// error: their prices are checked at each of their requests instead, where
// a bad one fails the request with a 500 and nothing is served free, and a
// working app that registered the plugin without awaiting it keeps working.
function uncheckedWarning (unchecked) {
  const names = unchecked.slice(0, ROUTES_NAMED_MAX).map(routeName)
  if (unchecked.length > ROUTES_NAMED_MAX) {
    names.push(`and ${unchecked.length - ROUTES_NAMED_MAX} more`)
  }
  const one = unchecked.length === 1
  return `accman: ${one ? 'a route' : unchecked.length + ' routes'} added before the plugin, ` +
    'whose price is checked at each request instead of at ready(): ' +
    `${names.join('; ')}. Register the plugin before ` +
    'the routes it meters (await fastify.register(...) before adding them)'
}

// The warning at ready(): the entries named, up to ROUTES_NAMED_MAX.
function unroutedWarning (unrouted) {
  const names = unrouted.slice(0, ROUTES_NAMED_MAX)
  if (unrouted.length > ROUTES_NAMED_MAX) {
    names.push(`and ${unrouted.length - ROUTES_NAMED_MAX} more`)
  }
  return `accman: exempt names no route: ${names.join(', ')}; it exempts only requests that no ` +
    'route answers (exempt names routes by their declared path)'
}

// fastify's own HEAD routes, the siblings it adds beside each GET route
// (exposeHeadRoutes, or a route's exposeHeadRoute), have an onSend hook
// after every plugin's that cancels a web stream and sends no body: a
// locked web stream is answered 200 there, while a HEAD route the app
// declared (fastify.head, or a route whose methods name HEAD) sends it as
// a GET does, and fastify refuses it with a 500.  fastify tells them apart
// by no public option, so the plugin's onRoute hook does: fastify adds the
// sibling as it adds its GET, and runs onRoute for it next, with the GET's
// options (its handler among them) and its url (and the url with a slash
// for a prefixed '/' route, which fastify also serves).  A HEAD route
// declared after its GET is refused by fastify (declared first, it is
// found before the GET and no sibling is made), but a HEAD route with a
// constraint may stand beside the sibling, and come next with the same
// handler and url: each expected url is matched once, so it stays the
// app's.  A sibling is marked in its `config` by SIBLING_HEAD, which
// request.routeOptions.config keeps.
const SIBLING_HEAD = Symbol('fastify-accman sibling HEAD route')

function headSiblings (fastify) {
  let expected = null // the handler and urls of the sibling(s) the last GET route makes
  return function mark (route) {
    const methods = [].concat(route.method)
    if (expected !== null && methods.length === 1 && methods[0] === 'HEAD' &&
        route.handler === expected.handler && expected.urls.includes(route.url)) {
      route.config = { ...route.config, [SIBLING_HEAD]: true }
      expected.urls = expected.urls.filter((url) => url !== route.url)
      if (expected.urls.length === 0) expected = null
      return
    }
    expected = null
    const exposed = route.exposeHeadRoute ?? fastify.initialConfig.exposeHeadRoutes ?? true
    if (exposed && methods.includes('GET') && !methods.includes('HEAD')) {
      const urls = [route.url]
      if (route.prefix && route.routePath === '') urls.push(route.url + '/')
      expected = { handler: route.handler, urls }
    }
  }
}

// Whether `request` came by fastify's sibling HEAD route (headSiblings).
function bySiblingHead (request) {
  const options = request.routeOptions
  return request.method === 'HEAD' && options !== undefined && options.config !== undefined &&
    options.config[SIBLING_HEAD] === true
}

module.exports = {
  uncheckedRoutes, uncheckedWarning, unroutedExempt, unroutedWarning, headSiblings, bySiblingHead
}
