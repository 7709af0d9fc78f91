'use strict'
// The example service as a user runs it: `node examples/server.js` or
// `npm run example` beside a running AccMan (no tokens, loopback), then
// curl-like requests, and the SIGTERM a process manager sends to stop it.

const test = require('node:test')
const assert = require('node:assert/strict')
const fs = require('node:fs')
const os = require('node:os')
const path = require('node:path')
const { spawn } = require('node:child_process')
const { AccManClient, limits } = require('..')

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms))
const { AccManServer } = require('./helpers/accman')
const { proxyTo } = require('./helpers/proxy')

const EXAMPLE = path.join(__dirname, '..', 'examples', 'server.js')

// The environment the example is given: the test's own, less the example's
// variables (a developer's ACCMAN_MODE must not change what a test sees),
// plus `env`.
function exampleEnv (env) {
  const base = { ...process.env }
  for (const name of ['ACCMAN_URL', 'ACCMAN_TOKEN', 'ACCMAN_MODE', 'ACCMAN_ON_UNAVAILABLE', 'ACCMAN_HOLD_TTL_S']) {
    delete base[name]
  }
  return { ...base, PORT: '0', LOG_LEVEL: 'info', ...env }
}

// The example on a free port, talking to AccMan at `accmanUrl`, with `env`
// added to its environment: its URL, its process, its log lines (pino's
// objects) and its exit.  Given `copyMs`, it runs as its main() with that
// signal copy window, instead of as `node examples/server.js`.
async function startExample (t, accmanUrl, env = {}, copyMs = undefined) {
  const args = copyMs === undefined ? [EXAMPLE] : ['-e', `require(${JSON.stringify(EXAMPLE)}).main(${copyMs})`]
  const child = spawn(process.execPath, args, {
    env: exampleEnv({ ACCMAN_URL: accmanUrl, ...env }),
    stdio: ['ignore', 'pipe', 'inherit']
  })
  t.after(() => child.kill('SIGKILL'))
  const logs = []
  const exited = new Promise((resolve) => child.on('exit', (code, signal) => resolve({ code, signal })))
  let out = ''
  const url = await new Promise((resolve, reject) => {
    child.stdout.on('data', (d) => {
      out += d
      let nl
      while ((nl = out.indexOf('\n')) >= 0) {
        logs.push(JSON.parse(out.slice(0, nl)))
        out = out.slice(nl + 1)
        const m = /Server listening at (http:\/\/127\.0\.0\.1:\d+)/.exec(logs.at(-1).msg)
        if (m) resolve(m[1])
      }
    })
    exited.then(({ code }) => reject(new Error(`the example exited with ${code}`)))
  })
  return { url, child, logs, exited }
}

async function startAccMan (t) {
  const server = new AccManServer({ tokens: false })
  await server.start()
  t.after(() => server.close())
  const acc = new AccManClient({ url: server.url })
  t.after(() => acc.close())
  return { server, acc }
}

test('the example charges a report by its rows and sets the header', async (t) => {
  const { server, acc } = await startAccMan(t)
  await acc.mod('example-user', 100)
  const { url } = await startExample(t, server.url)
  const weather = await fetch(url + '/weather', { headers: { accman: 'example-user' } })
  assert.equal(weather.headers.get('accman'), '99')
  const report = await fetch(url + '/report?rows=42', { headers: { accman: 'example-user' } })
  assert.equal(report.status, 200)
  assert.equal(report.headers.get('accman'), '94')
  for (const rows of ['1e1', '0', '101', '-5', '4.5', ' 9', '']) {
    const refused = await fetch(url + '/report?rows=' + encodeURIComponent(rows),
      { headers: { accman: 'example-user' } })
    assert.deepEqual([refused.status, await refused.json()], [400, { error: 'rows must be 1 to 100' }], rows)
  }
  assert.equal(await acc.tot('example-user'), 94) // the 400s were not charged
  assert.equal((await fetch(url + '/status')).status, 200)
  assert.match(await (await fetch(url + '/metrics')).text(), /accman_plugin_charged_total 2/)
})

test('ACCMAN_MODE=reserve: the example holds a report\'s estimate, then settles what it cost', async (t) => {
  const { server, acc } = await startAccMan(t)
  await acc.mod('example-reserve', 100)
  const { url } = await startExample(t, server.url, { ACCMAN_MODE: 'reserve' })
  const report = await fetch(url + '/report?rows=42', { headers: { accman: 'example-reserve' } })
  assert.deepEqual([report.status, report.headers.get('accman')], [200, '95'])
  // Newest first: the settle's return of 5 of the 10 held, then the hold,
  // made with the plugin's hold key (check mode would show one mod of -5).
  const [settle, hold] = (await acc.past('example-reserve')).past
  assert.deepEqual([settle.by, hold.by], [5, -10])
  assert.match(hold.key, /-h$/)
})

test('ACCMAN_ON_UNAVAILABLE=open: with AccMan out of reach the example serves unpaid', async (t) => {
  const { server } = await startAccMan(t)
  const proxy = await proxyTo(server.url)
  t.after(() => proxy.close())
  proxy.set('refuse')
  const open = await startExample(t, proxy.url, { ACCMAN_ON_UNAVAILABLE: 'open' })
  const served = await fetch(open.url + '/weather', { headers: { accman: 'example-open' } })
  assert.deepEqual([served.status, served.headers.get('accman')], [200, null])
  const closed = await startExample(t, proxy.url)
  assert.equal((await fetch(closed.url + '/weather', { headers: { accman: 'example-open' } })).status, 503)
})

// The example run to its exit, with `env` added: its exit code (null if
// it was still running after START_REFUSED_MS, and was killed) and its
// stderr.
const START_REFUSED_MS = 10000
async function runExample (env) {
  const child = spawn(process.execPath, [EXAMPLE], { env: exampleEnv(env), stdio: ['ignore', 'ignore', 'pipe'] })
  const timer = setTimeout(() => child.kill('SIGKILL'), START_REFUSED_MS)
  let stderr = ''
  child.stderr.on('data', (d) => { stderr += d })
  const code = await new Promise((resolve) => child.on('exit', resolve))
  clearTimeout(timer)
  return { code, stderr }
}

test('a wrong ACCMAN_MODE or ACCMAN_HOLD_TTL_S stops the example at start, naming the option', async () => {
  const url = 'http://127.0.0.1:1' // never reached: the options are refused first
  const mode = await runExample({ ACCMAN_URL: url, ACCMAN_MODE: 'reserv' })
  assert.equal(mode.code, 1)
  assert.match(mode.stderr, /TypeError: mode must be 'check' or 'reserve', not "reserv"/)
  const ttl = await runExample({ ACCMAN_URL: url, ACCMAN_HOLD_TTL_S: '0' })
  assert.equal(ttl.code, 1)
  assert.match(ttl.stderr, /TypeError: holdTtlS must be an integer from 1 to 86400, not 0/)
  // A ttl in check mode, which holds nothing, would go unused: refused too.
  const unused = await runExample({ ACCMAN_URL: url, ACCMAN_HOLD_TTL_S: '30' })
  assert.equal(unused.code, 1)
  assert.match(unused.stderr, /TypeError: holdTtlS is the ttl of reserve mode's holds: with mode 'check' nothing is held/)
  // Read in plain digits, as the Python example reads it: Number() would
  // take 0x5a, 1e1 and ' 90 ' as numbers.
  for (const bad of ['0x5a', '1e1', ' 90 ']) {
    const r = await runExample({ ACCMAN_URL: url, ACCMAN_HOLD_TTL_S: bad })
    assert.equal(r.code, 1, bad)
    assert.match(r.stderr, new RegExp(`TypeError: ACCMAN_HOLD_TTL_S must be whole seconds in plain digits, not ${JSON.stringify(bad).replace(/[.*+?^${}()|[\]\\]/g, '\\$&')}`))
  }
})

test('a PORT not in plain digits, or past 65535, stops the example at start, naming it', async () => {
  const url = 'http://127.0.0.1:1' // never reached: the port is refused first
  // Number() reads each of the first four as 0 (a free port): the example
  // would listen where nobody asked it to, as PORT=1e3 would on port 1000.
  for (const bad of ['0x0', '0e3', ' 0', '0.0', '65536']) {
    const r = await runExample({ ACCMAN_URL: url, PORT: bad })
    assert.equal(r.code, 1, bad)
    assert.match(r.stderr, new RegExp(`TypeError: PORT must be a port in plain digits, 0 to 65535, not ${JSON.stringify(bad).replace(/[.*+?^${}()|[\]\\]/g, '\\$&')}`))
  }
})

// A charge owed by the example: one paid request, then AccMan out of reach
// (a proxy that drops connections) for the next, admitted on the balance
// just seen, whose charge cannot land.
async function oweCharge (t, cred, copyMs = undefined) {
  const { server, acc } = await startAccMan(t)
  await acc.mod(cred, 10)
  const proxy = await proxyTo(server.url)
  t.after(() => proxy.close())
  const example = await startExample(t, proxy.url, {}, copyMs)
  const paid = await fetch(example.url + '/weather', { headers: { accman: cred } })
  assert.equal(paid.headers.get('accman'), '9')
  proxy.set('refuse')
  const owed = await fetch(example.url + '/weather', { headers: { accman: cred } })
  assert.deepEqual([owed.status, owed.headers.get('accman')], [200, null])
  return { acc, proxy, example }
}

test('SIGTERM with a charge owed: the example closes fastify and the charge lands', async (t) => {
  const { acc, proxy, example } = await oweCharge(t, 'example-term-lands')
  example.child.kill('SIGTERM')
  proxy.set('pass') // AccMan is back within the drain time
  assert.deepEqual(await example.exited, { code: 0, signal: null })
  assert.equal(await acc.tot('example-term-lands'), 8)
  assert.deepEqual(example.logs.filter((l) => l.level >= 50), [])
})

test('SIGTERM with a charge owed and AccMan gone: the charge is stranded and logged', async (t) => {
  const { acc, example } = await oweCharge(t, 'example-term-strands')
  const sent = performance.now()
  example.child.kill('SIGTERM')
  assert.deepEqual(await example.exited, { code: 0, signal: null })
  assert.ok(performance.now() - sent >= limits.CLOSE_DRAIN_MS - 100) // it waited the drain time
  const errors = example.logs.filter((l) => l.level === 50).map((l) => l.msg)
  // The proxy drops each connection it accepts: the client cannot tell
  // whether its last attempt was read, so the charge is stranded either as
  // owed or as of unknown outcome (Owed.close), never silently.
  assert.equal(errors.length, 1)
  assert.match(errors[0], /^accman: stranded charge(: the account owes 1|, outcome unknown: look for \S+-c in the account's history)/)
  assert.equal(await acc.tot('example-term-strands'), 9)
})

// A copy window no stall of this process between the two signals can
// outlast: the second must come within it, and on a loaded machine
// SIGNAL_COPY_MS can pass between the example's 'closing' and the test's
// second kill.
const STALL_PROOF_COPY_MS = 60000

test('two SIGINTs a moment apart (a Ctrl-C under npm run): the example still drains, and the charge lands', async (t) => {
  const { acc, proxy, example } = await oweCharge(t, 'example-int-twice', STALL_PROOF_COPY_MS)
  // The terminal's SIGINT, then npm's forwarded copy once the first is
  // handled (sent together, the kernel would merge them into one).
  example.child.kill('SIGINT')
  while (!example.logs.some((l) => l.msg === 'closing')) await sleep(5)
  example.child.kill('SIGINT')
  proxy.set('pass')
  assert.deepEqual(await example.exited, { code: 0, signal: null })
  assert.equal(await acc.tot('example-int-twice'), 8)
  assert.equal(example.logs.filter((l) => l.msg === 'closing').length, 1)
})

// Whether the process `pid` catches `signal` now.  Linux lists the signals
// a process catches in /proc/PID/status (SigCgt, a mask: bit n - 1 for
// signal n); node stops catching one once its last listener is removed,
// and the signal then takes its default action.
function catches (pid, signal) {
  const status = fs.readFileSync(`/proc/${pid}/status`, 'utf8')
  const caught = BigInt('0x' + /^SigCgt:\s*([0-9a-f]+)$/m.exec(status)[1])
  return ((caught >> BigInt(os.constants.signals[signal] - 1)) & 1n) === 1n
}

test('a second signal after the copy window ends the example at once', async (t) => {
  const { example } = await oweCharge(t, 'example-term-twice')
  let exited = false
  example.exited.then(() => { exited = true })
  example.child.kill('SIGTERM')
  // The copy window opens as the example handles the first signal, which
  // it logs, and ends as its timer removes the copy listeners, which a
  // loaded machine may run late too: a signal that comes before then is
  // taken for a copy, however long ago the window was due to end.  The
  // second goes once the example no longer catches SIGTERM (or has
  // exited, which the assertion below then shows).
  while (!example.logs.some((l) => l.msg === 'closing')) await sleep(5)
  while (!exited && catches(example.child.pid, 'SIGTERM')) await sleep(5)
  example.child.kill('SIGTERM') // AccMan is still gone: the drain would take CLOSE_DRAIN_MS
  assert.deepEqual(await example.exited, { code: null, signal: 'SIGTERM' })
  // Ended before its drain did, which strands the charge, and says so.
  assert.deepEqual(example.logs.filter((l) => l.level >= 50), [])
})

// npm as a user runs it: the npm that runs this test (npm_execpath), or the
// one on PATH.
function spawnNpm (args, options) {
  const npmCli = process.env.npm_execpath
  if (npmCli && npmCli.endsWith('.js')) return spawn(process.execPath, [npmCli, ...args], options)
  return spawn('npm', args, options)
}

function alive (pid) {
  try {
    process.kill(pid, 0)
    return true
  } catch {
    return false
  }
}

test('SIGTERM to `npm run example` reaches the example: it closes, and no node is left behind', async (t) => {
  const { server } = await startAccMan(t)
  const npm = spawnNpm(['run', 'example'], {
    cwd: path.join(__dirname, '..'),
    env: exampleEnv({ ACCMAN_URL: server.url }),
    stdio: ['ignore', 'pipe', 'inherit']
  })
  t.after(() => npm.kill('SIGKILL'))
  const exited = new Promise((resolve) => npm.on('exit', (code, signal) => resolve({ code, signal })))
  // npm's own lines (`> fastify-accman@... example`) come first; the
  // example's are pino's JSON, with its pid.
  const logs = []
  let out = ''
  const listening = new Promise((resolve, reject) => {
    npm.stdout.on('data', (d) => {
      out += d
      let nl
      while ((nl = out.indexOf('\n')) >= 0) {
        const line = out.slice(0, nl)
        out = out.slice(nl + 1)
        if (!line.startsWith('{')) continue
        logs.push(JSON.parse(line))
        if (/^Server listening at /.test(logs.at(-1).msg)) resolve(logs.at(-1).pid)
      }
    })
    exited.then(({ code }) => reject(new Error(`npm run example exited with ${code}`)))
  })
  const pid = await listening
  t.after(() => { if (alive(pid)) process.kill(pid, 'SIGKILL') })
  assert.notEqual(pid, npm.pid)
  npm.kill('SIGTERM')
  assert.deepEqual(await exited, { code: 0, signal: null })
  assert.deepEqual(logs.filter((l) => l.msg === 'closing').map((l) => l.signal), ['SIGTERM'])
  assert.equal(alive(pid), false)
})
