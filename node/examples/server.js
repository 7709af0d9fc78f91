'use strict'
// An example service that charges per request through AccMan.
//
// Beside a running AccMan (`.venv/bin/accman serve --data ./accman-data`
// at the repository root serves http://127.0.0.1:8080, loopback only):
//
//   cd node && npm ci
//   npm run example            # or: ACCMAN_MODE=reserve PORT=3001 node examples/server.js
//
// (the npm script execs node, so that the SIGTERM npm forwards reaches it)
//
// then, with a funded credential (`.venv/bin/accman open --by 100` prints one):
//
//   curl -i -H "accman: $cred" http://127.0.0.1:3000/weather
//   curl -i -H "accman: $cred" "http://127.0.0.1:3000/report?rows=42"
//
// The environment, by the names the Python example (examples/app.py) reads:
// ACCMAN_URL (default http://127.0.0.1:8080), ACCMAN_TOKEN (unset or
// empty: no token), ACCMAN_MODE (check, the default, or reserve),
// ACCMAN_ON_UNAVAILABLE (closed, the default, or open) and
// ACCMAN_HOLD_TTL_S (reserve mode only, default 90; check mode holds
// nothing, and refuses it); the plugin refuses a wrong value, which stops
// the example at start, as does a ttl or a PORT not in plain digits.  PORT
// (default 3000, on 127.0.0.1) and LOG_LEVEL (pino's, default info) keep
// their plain names: the Python example has them from uvicorn, and
// `accman serve` warns of an ACCMAN_ name that no part of AccMan reads.

const Fastify = require('fastify')
const accman = require('..')

const ACCMAN_URL = process.env.ACCMAN_URL || 'http://127.0.0.1:8080'
const PORT_DEFAULT = 3000
const PORT_MAX = 65535
// A report has at most this many rows, so costs at most a tenth of it.
const REPORT_ROWS_MAX = 100

// A number in plain digits: Number() would take 0x5a, 1e1 and ' 90 ', and
// an example that listens on port 1000 for PORT=1e3 listens where nobody
// asked it to.
const PLAIN_DIGITS = /^(0|[1-9][0-9]*)$/

// ACCMAN_HOLD_TTL_S in plain digits, as the Python example reads it; the
// plugin checks its range.
function holdTtlS (text) {
  if (!text) return undefined
  if (!PLAIN_DIGITS.test(text)) {
    throw new TypeError(`ACCMAN_HOLD_TTL_S must be whole seconds in plain digits, not ${JSON.stringify(text)}`)
  }
  return Number(text)
}

// PORT in plain digits, 0 (a free one) to 65535; unset or empty: 3000.
function listenPort (text) {
  if (!text) return PORT_DEFAULT
  if (!PLAIN_DIGITS.test(text) || Number(text) > PORT_MAX) {
    throw new TypeError(`PORT must be a port in plain digits, 0 to ${PORT_MAX}, not ${JSON.stringify(text)}`)
  }
  return Number(text)
}

async function build () {
  const app = Fastify({ logger: { level: process.env.LOG_LEVEL || 'info' } })
  await app.register(accman, {
    url: ACCMAN_URL,
    token: process.env.ACCMAN_TOKEN, // read,charge; none when AccMan has no tokens
    cost: 1, // the default price of a request
    mode: process.env.ACCMAN_MODE || 'check',
    onUnavailable: process.env.ACCMAN_ON_UNAVAILABLE || 'closed', // closed: 503 when AccMan cannot be reached
    holdTtlS: holdTtlS(process.env.ACCMAN_HOLD_TTL_S), // unset or empty: the default; reserve mode only
    exempt: ['/health', '/metrics']
  })

  app.get('/health', async () => ({ up: true }))
  app.get('/metrics', async (request, reply) => reply.type('text/plain').send(app.accman.metrics()))
  app.get('/weather', async () => ({ city: 'Lisbon', celsius: 21 }))
  // A report costs one per started ten rows; it may cost up to 10, so that
  // much is required (check) or held (reserve) before it runs.  `rows` is 1
  // to REPORT_ROWS_MAX in plain digits (default 10), as in the Python
  // example; anything else is a 400, which is not charged.
  app.get('/report', {
    config: {
      accman: (request, reply, stage) => stage === 'estimate'
        ? REPORT_ROWS_MAX / 10
        : Math.ceil(Number(reply.getHeader('x-rows') || 0) / 10)
    }
  }, async (request, reply) => {
    const text = request.query.rows ?? '10'
    const rows = PLAIN_DIGITS.test(text) ? Number(text) : 0
    if (rows < 1 || rows > REPORT_ROWS_MAX) {
      return reply.code(400).send({ error: `rows must be 1 to ${REPORT_ROWS_MAX}` })
    }
    reply.header('x-rows', String(rows))
    return { rows: Array.from({ length: rows }, (_, i) => i) }
  })
  app.get('/status', { config: { accman: false } }, async () => ({ free: true }))
  return app
}

// fastify does not close itself on a signal, and a process that ends at
// SIGTERM loses the charges it still owes AccMan.  close() gives them
// CLOSE_DRAIN_MS to land and logs any it must strand; then the process
// exits.  A second signal ends it at once (node's default action), but not
// one within `copyMs` (SIGNAL_COPY_MS unless given) of the first: that is
// a copy.  A Ctrl-C under `npm run example` reaches node twice, a
// millisecond apart: from the terminal, to its whole process group, and as
// npm forwards it; a process manager that signals the group does the same
// with SIGTERM.
const SIGNAL_COPY_MS = 500
const SIGNALS = ['SIGTERM', 'SIGINT']

function closeOnSignals (app, copyMs = SIGNAL_COPY_MS) {
  const copy = () => {}
  const close = (signal) => {
    for (const s of SIGNALS) {
      process.on(s, copy) // before the removal: no moment under the default action
      process.removeListener(s, close)
    }
    setTimeout(() => {
      for (const s of SIGNALS) process.removeListener(s, copy)
    }, copyMs).unref()
    app.log.info({ signal }, 'closing')
    app.close().then(() => process.exit(0), (err) => {
      app.log.error({ err }, 'close failed')
      process.exit(1)
    })
  }
  for (const s of SIGNALS) process.on(s, close)
}

// The example as `node examples/server.js` runs it; `copyMs` goes to
// closeOnSignals (the tests give a window no loaded machine can outlast).
function main (copyMs) {
  return Promise.resolve()
    .then(async () => {
      const port = listenPort(process.env.PORT) // refused before the plugin is built
      const app = await build()
      closeOnSignals(app, copyMs)
      return app.listen({ port, host: '127.0.0.1' })
    })
    .catch((err) => {
      console.error(err)
      process.exit(1)
    })
}

if (require.main === module) main()

module.exports = { build, closeOnSignals, main, SIGNAL_COPY_MS }
