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
// next start).  addStandby() makes a synchronous streaming standby of it
// (`pg_basebackup`), kill() SIGKILLs its postmaster and promote() makes a
// standby the primary: a failover, as pgcluster.py's add_standby, kill and
// promote make one.  destroy() stops it and removes its directory; so does
// the process's exit, or a SIGINT or SIGTERM that ends it, for a test that
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
// tests may run beside it on a small machine), durability as in production,
// and its dynamic shared memory in files of its own directory (pg_dynshmem),
// removed with it: the default's POSIX segments outlive a server that kill()
// ends, in /dev/shm, for good.  (No benchmark runs on these: mmap's files,
// which the kernel writes back, cost nothing the tests measure.)
const CONF = {
  listen_addresses: "'127.0.0.1'",
  max_connections: '200',
  shared_buffers: "'128MB'",
  dynamic_shared_memory_type: 'mmap',
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
// What a primary keeps for a standby stopped for seconds, so that it
// catches up by streaming when it starts again (pgcluster.py's BASE_CONF).
const PRIMARY_CONF = { wal_keep_size: "'256MB'" }
// A killed postmaster's backends exit once they see it gone; the port is
// free within this.
const KILL_TIMEOUT_MS = 60000
const KILL_POLL_MS = 20
// Where Linux lists its System V shared memory segments, and how long a
// killed postmaster's backends may take to let go of its segment.
const SYSV_SHM_LIST = '/proc/sysvipc/shm'
const KILLED_BACKENDS_END_MS = 10000
const QUERY_POLL_MS = 200
// A standby's name goes into its primary's synchronous_standby_names and
// a query of pg_stat_replication unquoted.
const STANDBY_NAME_RE = /^[a-z_][a-z0-9_]*$/

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

// A new directory for a cluster, the postgres user's when we are root.
async function newBase () {
  const base = fs.mkdtempSync(path.join(os.tmpdir(), 'accman-node-pg-'))
  fs.chmodSync(base, 0o755)
  if (process.getuid() === 0) await run('chown', [PG_USER, base])
  return base
}

function alive (pid) {
  try {
    process.kill(pid, 0)
    return true
  } catch (err) {
    return err.code !== 'ESRCH'
  }
}

function accepting (port) {
  return new Promise((resolve) => {
    const socket = net.connect(port, '127.0.0.1')
    socket.once('connect', () => { socket.destroy(); resolve(true) })
    socket.once('error', () => resolve(false))
  })
}

// The System V segment [key, id] that a postmaster's lock file names (its
// seventh line), or null: a clean or immediate stop removes the file.  The
// key is a C int written unsigned long (a negative one as 20 digits, past
// a Number's exact range): read as a bigint, kept as its 32 bits.
function lockFileSegment (data) {
  try {
    const [key, id] = fs.readFileSync(path.join(data, 'postmaster.pid'), 'utf8')
      .split('\n')[6].trim().split(/\s+/)
    const segment = [Number(BigInt.asUintN(32, BigInt(key))), Number(id)]
    return Number.isInteger(segment[1]) ? segment : null
  } catch {
    return null
  }
}

// How many processes have the segment attached; null once it is gone (or
// its id names another key's).  PostgreSQL writes the key unsigned, /proc
// signed: compared as 32 bits.
function attached ([key, id]) {
  let rows
  try {
    rows = fs.readFileSync(SYSV_SHM_LIST, 'utf8').trim().split('\n').slice(1)
  } catch {
    return null
  }
  for (const row of rows.map((line) => line.trim().split(/\s+/).map(Number))) {
    if (row[1] === id && (row[0] >>> 0) === key) return row[6]
  }
  return null
}

// A postmaster killed with SIGKILL leaves the small System V segment its
// lock file names, which only a later start in the same directory would
// remove, and each holds one of the machine's SHMMNI ids until it restarts
// (two a run of bank_pg.test.js): removed once its backends have let go of
// it; one still attached then, or whose postmaster lives, is left, as it is
// where ipcrm is missing.  Synchronous, as destroy() is.
function removeKilledSegment (data) {
  const segment = lockFileSegment(data)
  const pid = Number(fs.readFileSync(path.join(data, 'postmaster.pid'), 'utf8').split('\n')[0])
  if (segment === null || alive(pid)) return
  const deadline = performance.now() + KILLED_BACKENDS_END_MS
  let n = attached(segment)
  while (n > 0 && performance.now() < deadline) {
    Atomics.wait(new Int32Array(new SharedArrayBuffer(4)), 0, 0, KILL_POLL_MS)
    n = attached(segment)
  }
  if (n !== 0) return
  try {
    execFileSync('ipcrm', ['-m', String(segment[1])], { stdio: 'ignore' })
  } catch {} // gone meanwhile, or no ipcrm: left
}

function configure (data, conf) {
  fs.appendFileSync(path.join(data, 'postgresql.conf'),
    Object.entries(conf).map(([k, v]) => `${k} = ${v}\n`).join(''))
}

class PgCluster {
  constructor (base, port, claim) {
    this.base = base
    this.data = path.join(base, 'data')
    this.log = path.join(base, 'log')
    this.port = port
    this.claim = claim
    this.killed = false // by kill(), and not started since
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
    let pg
    try {
      pg = new PgCluster(await newBase(), port, claim)
      await asPostgres('initdb', ['-D', pg.data, '-U', PG_USER, '--auth=trust',
        '--no-instructions', '-E', 'UTF8', '--locale=C'])
      configure(pg.data, { ...CONF, port: String(port), unix_socket_directories: `'${pg.base}'` })
      await pg.start()
    } catch (err) {
      if (pg === undefined) claim.close()
      else pg.destroy()
      throw err
    }
    return pg
  }

  // The server stopped with pg_ctl's shutdown `mode`, its directory kept.
  async stop (mode = 'fast') {
    await asPostgres('pg_ctl', ['-D', this.data, '-m', stopMode(mode), '-w', 'stop'])
  }

  // The server started again on its port, after stop() or kill().
  async start () {
    this.killed = false
    await asPostgres('pg_ctl', ['-D', this.data, '-l', this.log, '-w', '-t',
      String(START_TIMEOUT_S), 'start'])
  }

  // The server stopped with `mode` and started again, in one pg_ctl.
  async restart (mode = 'fast') {
    this.killed = false
    await asPostgres('pg_ctl', ['-D', this.data, '-l', this.log, '-m', stopMode(mode), '-w',
      '-t', String(START_TIMEOUT_S), 'restart'])
  }

  // A streaming standby of this server, named `name`, from pg_basebackup,
  // in a directory of its own, started; this server then waits for it at
  // every commit (synchronous_standby_names), as pgcluster.py's
  // add_standby(sync=True).  Returns once it is this server's synchronous
  // standby (pg_stat_replication), so that a test's stop of it stalls
  // writes for sure.
  async addStandby (name) {
    if (!STANDBY_NAME_RE.test(name)) {
      throw new TypeError(`a standby's name is a lower-case SQL identifier, not ${name}`)
    }
    const { port, claim } = await freePort()
    let s
    try {
      s = new PgCluster(await newBase(), port, claim)
      await asPostgres('pg_basebackup', ['-h', '127.0.0.1', '-p', String(this.port), '-U', PG_USER,
        '-D', s.data, '-X', 'stream', '-c', 'fast'])
      const signal = path.join(s.data, 'standby.signal')
      fs.writeFileSync(signal, '')
      if (process.getuid() === 0) await run('chown', [PG_USER, signal])
      // Not `-R`: it writes primary_conninfo to postgresql.auto.conf, which
      // would override the application_name that synchronous_standby_names
      // matches.
      configure(s.data, {
        port: String(port),
        unix_socket_directories: `'${s.base}'`,
        primary_conninfo:
          `'host=127.0.0.1 port=${this.port} user=${PG_USER} application_name=${name}'`
      })
      await s.start()
    } catch (err) {
      if (s === undefined) claim.close()
      else s.destroy()
      throw err
    }
    configure(this.data, { ...PRIMARY_CONF, synchronous_standby_names: `'FIRST 1 (${name})'` })
    await asPostgres('pg_ctl', ['-D', this.data, 'reload'])
    await this.waitFor('SELECT count(*) FROM pg_stat_replication ' +
      `WHERE application_name = '${name}' AND sync_state = 'sync' AND state = 'streaming'`,
    '1', START_TIMEOUT_S * 1000)
    return s
  }

  // Until `sql` answers `want`, failing after `ms`.
  async waitFor (sql, want, ms) {
    const deadline = performance.now() + ms
    let got
    while ((got = await this.query(sql)) !== want) {
      if (performance.now() > deadline) {
        throw new Error(`${sql} answered ${got}, not ${want}, within ${ms} ms`)
      }
      await new Promise((resolve) => setTimeout(resolve, QUERY_POLL_MS))
    }
  }

  // The postmaster SIGKILLed, as a machine's or a process's crash would
  // end it; returns once it is gone and nothing answers on its port (its
  // backends exit when they see it gone, their work unfinished).
  async kill () {
    const pidFile = path.join(this.data, 'postmaster.pid')
    const pid = Number(fs.readFileSync(pidFile, 'utf8').split('\n')[0])
    process.kill(pid, 'SIGKILL')
    this.killed = true
    const deadline = performance.now() + KILL_TIMEOUT_MS
    while (alive(pid) || await accepting(this.port)) {
      if (performance.now() > deadline) {
        throw new Error(`PostgreSQL on port ${this.port} still answers ${KILL_TIMEOUT_MS} ms ` +
          'after its postmaster was killed')
      }
      await new Promise((resolve) => setTimeout(resolve, KILL_POLL_MS))
    }
  }

  // A standby made the primary (`pg_ctl promote`, waiting until it takes
  // writes).
  async promote () {
    await asPostgres('pg_ctl', ['-D', this.data, '-w', '-t', String(START_TIMEOUT_S), 'promote'])
  }

  url (db = 'postgres') {
    return `postgresql://${PG_USER}@127.0.0.1:${this.port}/${db}`
  }

  // What psql answers to `sql`, unaligned, trimmed.
  async query (sql, db = 'postgres') {
    const { stdout } = await run(path.join(pgBin(), 'psql'), ['-X', '-q', '-A', '-t',
      '-v', 'ON_ERROR_STOP=1', '-h', '127.0.0.1', '-p', String(this.port), '-U', PG_USER,
      '-d', db, '-c', sql])
    return stdout.trim()
  }

  async createDatabase (db) {
    await this.query(`CREATE DATABASE "${db}"`)
    return this.url(db)
  }

  // Stops the server, removes what a SIGKILL of it left in System V
  // memory, and its directory: synchronous, so that the process's exit can
  // do it too.
  destroy () {
    process.removeListener('exit', this.onExit)
    for (const signal of STOP_SIGNALS) process.removeListener(signal, this.onSignal)
    if (fs.existsSync(path.join(this.data, 'postmaster.pid'))) {
      // Not after a kill: pg_ctl would signal whatever process has the
      // killed postmaster's pid by now (another run's backend, say).
      if (!this.killed) {
        try {
          execFileSync(...command('pg_ctl', ['-D', this.data, '-m', 'immediate', '-w', 'stop']),
            { stdio: 'ignore' })
        } catch {} // not running after all: nothing to stop
      }
      try {
        removeKilledSegment(this.data) // the lock file is left only by a kill
      } catch {} // its lock file unreadable: nothing named to remove
    }
    fs.rmSync(this.base, { recursive: true, force: true })
    this.claim.close()
  }
}

module.exports = { PgCluster, lockFileSegment }
