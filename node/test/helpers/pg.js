'use strict'
// A real PostgreSQL server for the tests, from Debian's binaries, made as
// tests/postgres/pgcluster.py makes one: under root, `initdb` and `pg_ctl`
// run as the `postgres` user (PostgreSQL refuses to run as root) in a
// temporary directory given to it; under another user, as that user.  It
// listens on 127.0.0.1 only, on a free port, trusts local connections (the
// directory is private to the run) and commits durably (`fsync`,
// `synchronous_commit`: what a 200 means).  stop(), start() and restart()
// are the database's own faults, as tests/postgres/pgcluster.py makes them
// (`pg_ctl` with a shutdown mode: `fast` rolls back and disconnects its
// sessions, `immediate` quits without a checkpoint, to recover at the
// next start).  destroy() stops it and removes its directory; so does the
// process's exit, or a SIGINT or SIGTERM that ends it, for a test that
// never got there.

const { execFile, execFileSync } = require('node:child_process')
const fs = require('node:fs')
const net = require('node:net')
const os = require('node:os')
const path = require('node:path')
const { promisify } = require('node:util')

const PG_USER = 'postgres'
// Debian's layout: /usr/lib/postgresql/<major>/bin; the newest is taken.
const PG_LIB = '/usr/lib/postgresql'
const START_TIMEOUT_S = 60
const STOP_MODES = ['smart', 'fast', 'immediate']
// What every test server runs with: small shared memory (servers of other
// tests may run beside it on a small machine), durability as in production.
const CONF = {
  listen_addresses: "'127.0.0.1'",
  max_connections: '200',
  shared_buffers: "'128MB'",
  synchronous_commit: 'on',
  fsync: 'on',
  log_min_messages: 'warning',
  logging_collector: 'off'
}
// The clusters' ports are taken below the kernel's ephemeral ports, where
// the servers the tests start on port 0 never land, and each is claimed
// for the life of the process by an abstract Unix socket named as
// pgcluster.py names its own, so that no other test run takes it too.
const PORTS_FIRST = 20000
const CLAIM_PREFIX = '\0accman-tests-port-'
const STOP_SIGNALS = ['SIGINT', 'SIGTERM']

const run = promisify(execFile)

function pgBin () {
  const majors = fs.existsSync(PG_LIB)
    ? fs.readdirSync(PG_LIB).filter((d) => /^\d+$/.test(d)).sort((a, b) => a - b)
    : []
  if (majors.length === 0) {
    throw new Error(`PostgreSQL's server binaries are not installed in ${PG_LIB} ` +
      '(Debian: apt-get install postgresql)')
  }
  return path.join(PG_LIB, majors[majors.length - 1], 'bin')
}

// The command that runs PostgreSQL's binary `bin` with `args`: as the
// postgres user when we are root.
function command (bin, args) {
  const file = path.join(pgBin(), bin)
  if (process.getuid() !== 0) return [file, args]
  return ['runuser', ['-u', PG_USER, '--', file, ...args]]
}

function asPostgres (bin, args) {
  return run(...command(bin, args), { maxBuffer: 1 << 20 })
}

function listening (server, where) {
  return new Promise((resolve) => {
    server.once('error', () => resolve(false))
    server.listen(where, () => resolve(true))
  })
}

function ephemeralFirst () {
  try {
    return Number(fs.readFileSync('/proc/sys/net/ipv4/ip_local_port_range', 'utf8').split(/\s+/)[0])
  } catch {
    return 32768
  }
}

// A free port below the ephemeral ones, and the claim that keeps it ours.
async function freePort () {
  const span = ephemeralFirst() - PORTS_FIRST
  if (!(span > 0)) throw new Error(`no ports below the ephemeral ones from ${PORTS_FIRST}`)
  const start = Math.floor(Math.random() * span)
  for (let k = 0; k < span; k++) {
    const port = PORTS_FIRST + (start + k) % span
    const claim = net.createServer()
    if (!(await listening(claim, CLAIM_PREFIX + port))) continue // another run's
    const probe = net.createServer()
    if (await listening(probe, { port, host: '127.0.0.1' })) {
      await new Promise((resolve) => probe.close(resolve))
      claim.unref()
      return { port, claim }
    }
    claim.close() // taken by another program
  }
  throw new Error(`no free port from ${PORTS_FIRST} below the ephemeral ones`)
}

function stopMode (mode) {
  if (!STOP_MODES.includes(mode)) {
    throw new TypeError(`pg_ctl's shutdown mode is one of ${STOP_MODES.join(', ')}, not ${mode}`)
  }
  return mode
}

class PgCluster {
  constructor (base, port, claim) {
    this.base = base
    this.data = path.join(base, 'data')
    this.log = path.join(base, 'log')
    this.port = port
    this.claim = claim
    this.onExit = () => this.destroy()
    process.once('exit', this.onExit)
    // The signal is raised again once the cluster is gone: with no
    // listener left, it ends the process as it would have.
    this.onSignal = (signal) => {
      this.destroy()
      process.kill(process.pid, signal)
    }
    for (const signal of STOP_SIGNALS) process.once(signal, this.onSignal)
  }

  // initdb a new cluster in a directory of its own, and start it.
  static async create () {
    const { port, claim } = await freePort()
    const base = fs.mkdtempSync(path.join(os.tmpdir(), 'accman-node-pg-'))
    const pg = new PgCluster(base, port, claim)
    try {
      fs.chmodSync(base, 0o755)
      if (process.getuid() === 0) await run('chown', [PG_USER, base])
      await asPostgres('initdb', ['-D', pg.data, '-U', PG_USER, '--auth=trust',
        '--no-instructions', '-E', 'UTF8', '--locale=C'])
      const conf = { ...CONF, port: String(port), unix_socket_directories: `'${base}'` }
      fs.appendFileSync(path.join(pg.data, 'postgresql.conf'),
        Object.entries(conf).map(([k, v]) => `${k} = ${v}\n`).join(''))
      await asPostgres('pg_ctl', ['-D', pg.data, '-l', pg.log, '-w', '-t',
        String(START_TIMEOUT_S), 'start'])
    } catch (err) {
      pg.destroy()
      throw err
    }
    return pg
  }

  // The server stopped with pg_ctl's shutdown `mode`, its directory kept.
  async stop (mode = 'fast') {
    await asPostgres('pg_ctl', ['-D', this.data, '-m', stopMode(mode), '-w', 'stop'])
  }

  // The server started again on its port, after stop().
  async start () {
    await asPostgres('pg_ctl', ['-D', this.data, '-l', this.log, '-w', '-t',
      String(START_TIMEOUT_S), 'start'])
  }

  // The server stopped with `mode` and started again, in one pg_ctl.
  async restart (mode = 'fast') {
    await asPostgres('pg_ctl', ['-D', this.data, '-l', this.log, '-m', stopMode(mode), '-w',
      '-t', String(START_TIMEOUT_S), 'restart'])
  }

  url (db = 'postgres') {
    return `postgresql://${PG_USER}@127.0.0.1:${this.port}/${db}`
  }

  async createDatabase (db) {
    await run(path.join(pgBin(), 'psql'), ['-X', '-q', '-v', 'ON_ERROR_STOP=1', '-h', '127.0.0.1',
      '-p', String(this.port), '-U', PG_USER, '-d', 'postgres', '-c', `CREATE DATABASE "${db}"`])
    return this.url(db)
  }

  // Stops the server and removes its directory: synchronous, so that the
  // process's exit can do it too.
  destroy () {
    process.removeListener('exit', this.onExit)
    for (const signal of STOP_SIGNALS) process.removeListener(signal, this.onSignal)
    if (fs.existsSync(path.join(this.data, 'postmaster.pid'))) {
      try {
        execFileSync(...command('pg_ctl', ['-D', this.data, '-m', 'immediate', '-w', 'stop']),
          { stdio: 'ignore' })
      } catch {} // not running after all: nothing to stop
    }
    fs.rmSync(this.base, { recursive: true, force: true })
    this.claim.close()
  }
}

module.exports = { PgCluster }
