'use strict'
// A real AccMan server for the tests and the benchmarks: the Python package
// installed in the repository's .venv, started on a free loopback port with
// its own data directory and tokens file (on the embedded store, or on a
// PostgreSQL store's URL, the directory then only its lock), stopped with
// SIGTERM.

const { execFile, spawn } = require('node:child_process')
const fs = require('node:fs')
const os = require('node:os')
const path = require('node:path')
const { promisify } = require('node:util')
const { AccManClient } = require('../..')

const REPO_ROOT = path.resolve(__dirname, '..', '..', '..')
const ACCMAN_BIN = process.env.ACCMAN_BIN || path.join(REPO_ROOT, '.venv', 'bin', 'accman')
const INSTALL_HINT =
  `AccMan's server is not installed at ${ACCMAN_BIN}. From the repository root run:\n` +
  "  python3 -m venv .venv && .venv/bin/pip install -e '.[test]'\n" +
  '(or set ACCMAN_BIN to an `accman` executable).'
// The server prints its address once it listens; opening a data directory
// checks every record first, so a few seconds on a loaded machine.
const START_TIMEOUT_MS = 30000
// SIGTERM lets in-flight requests finish (the server's SHUTDOWN_GRACE_S is 10 s).
const STOP_TIMEOUT_MS = 15000

// Tokens of the three kinds a deployment has: the funding side (mint), a
// service's servers (read, charge) and a reader (read).
const TOKENS = {
  mint: 'test-mint-token-0123456789abcdef',
  service: 'test-service-token-0123456789abc',
  read: 'test-read-token-0123456789abcdef'
}
const ROLES = { mint: 'read,charge,mint', service: 'read,charge', read: 'read' }

function accmanInstalled () {
  return fs.existsSync(ACCMAN_BIN)
}

// `accman migrate --store URL`: makes (or upgrades) a PostgreSQL store,
// which a start does not on a URL of several hosts.
async function migrateStore (url) {
  await promisify(execFile)(ACCMAN_BIN, ['migrate', '--store', url], { timeout: START_TIMEOUT_MS })
}

class AccManServer {
  // `fileSizeKiB`: the largest file the server may write (ulimit -f), for
  // a store whose commits fail once its write-ahead log must grow.
  // `store`: a PostgreSQL store's URL (`accman serve --store`), for
  // front-ends on one database (docs/SCALING.md).
  constructor ({ tokens = true, fileSizeKiB = null, store = null } = {}) {
    this.fileSizeKiB = fileSizeKiB
    this.store = store
    if (!accmanInstalled()) throw new Error(INSTALL_HINT)
    this.dir = fs.mkdtempSync(path.join(os.tmpdir(), 'accman-node-'))
    this.data = path.join(this.dir, 'data')
    this.tokensFile = null
    if (tokens) {
      this.tokensFile = path.join(this.dir, 'tokens')
      this.writeTokens()
    }
    this.port = 0
    this.url = null
    this.child = null
  }

  // Gives each token of TOKENS the roles `roles` names (ROLES for the
  // rest): a token changed under a running service.  The server reads its
  // tokens when it starts.
  writeTokens (roles = {}) {
    const lines = Object.keys(TOKENS).map((name) => `${roles[name] ?? ROLES[name]} ${TOKENS[name]}\n`)
    fs.writeFileSync(this.tokensFile, lines.join(''), { mode: 0o600 })
  }

  // Starts the server (again on the same port after a stop, so that clients
  // holding the URL reach the new process).
  async start () {
    const args = ['serve', '--host', '127.0.0.1', '--port', String(this.port), '--data', this.data]
    if (this.tokensFile) args.push('--tokens', this.tokensFile)
    if (this.store) args.push('--store', this.store)
    const child = this.fileSizeKiB === null
      ? spawn(ACCMAN_BIN, args, { stdio: ['ignore', 'pipe', 'pipe'] })
      : spawn('sh', ['-c', `ulimit -f ${this.fileSizeKiB} && exec "$0" "$@"`, ACCMAN_BIN, ...args],
        { stdio: ['ignore', 'pipe', 'pipe'] })
    this.child = child
    let stderr = ''
    child.stderr.setEncoding('utf8')
    child.stderr.on('data', (d) => { if (stderr.length < 8192) stderr += d })
    const url = await new Promise((resolve, reject) => {
      let out = ''
      const timer = setTimeout(() => {
        child.kill('SIGKILL')
        reject(new Error(`accman did not start within ${START_TIMEOUT_MS} ms: ${stderr}`))
      }, START_TIMEOUT_MS)
      child.stdout.setEncoding('utf8')
      child.stdout.on('data', (d) => {
        out += d
        const m = /accman: serving (http:\/\/\S+)/.exec(out)
        if (m) { clearTimeout(timer); resolve(m[1]) }
      })
      child.on('exit', (code) => {
        clearTimeout(timer)
        reject(new Error(`accman exited with ${code} before serving: ${stderr}`))
      })
    })
    child.stdout.resume()
    this.url = url
    this.port = Number(new URL(url).port)
    return url
  }

  async stop (signal = 'SIGTERM') {
    const child = this.child
    if (!child || child.exitCode !== null || child.signalCode !== null) return
    this.child = null
    await new Promise((resolve) => {
      const timer = setTimeout(() => child.kill('SIGKILL'), STOP_TIMEOUT_MS)
      child.once('exit', () => { clearTimeout(timer); resolve() })
      child.kill(signal)
    })
  }

  async close () {
    await this.stop()
    fs.rmSync(this.dir, { recursive: true, force: true })
  }
}

// One AccMan for a test file's tests, through its `test` (node:test): the
// server started before them with a client of the mint token, and with
// `service` one of the service token too, all closed after them.  The
// object returned is filled in by the before hook: its fields are read in
// the tests, not as the file loads.
function sharedAccMan (test, { service = false } = {}) {
  const acc = { server: null, mint: null, service: null }
  test.before(async () => {
    acc.server = new AccManServer()
    await acc.server.start()
    acc.mint = new AccManClient({ url: acc.server.url, token: TOKENS.mint })
    if (service) acc.service = new AccManClient({ url: acc.server.url, token: TOKENS.service })
  })
  test.after(async () => {
    await acc.mint?.close()
    await acc.service?.close()
    await acc.server?.close()
  })
  return acc
}

module.exports = {
  AccManServer, TOKENS, accmanInstalled, INSTALL_HINT, ACCMAN_BIN, migrateStore, sharedAccMan
}
