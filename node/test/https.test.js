'use strict'
// The client over https: a real AccMan behind a TLS-terminating proxy
// (helpers/proxy.js), with certificates made by openssl and a private CA
// trusted as the README tells users to: a client's own `ca`, or
// NODE_EXTRA_CA_CERTS.  Node reads that variable as a process starts, so
// the calls that rely on it run in a child.  And the plugin in a service
// that is itself https: what its close() ends and what it waits for.

const test = require('node:test')
const assert = require('node:assert/strict')
const { execFile, execFileSync } = require('node:child_process')
const fs = require('node:fs')
const net = require('node:net')
const os = require('node:os')
const path = require('node:path')
const { setTimeout: later } = require('node:timers/promises')
const tls = require('node:tls')
const { promisify } = require('node:util')
const Fastify = require('fastify')
const accman = require('..')
const { AccManClient, NoAccount, Unreachable } = accman
const { AccManServer, TOKENS } = require('./helpers/accman')
const { proxyTo } = require('./helpers/proxy')
const { serviceApp, until } = require('./helpers/app')

const PACKAGE = path.resolve(__dirname, '..')

// A funding mod, a keyless charge, a tot and a past; or what the first
// call that failed threw.  One JSON line on stdout.
const CALLS = `
const { AccManClient, mayHaveLanded } = require(process.argv[1])
const [url, token, cred] = process.argv.slice(2)
const acc = new AccManClient({ url, token, retries: 0 })
const out = []
;(async () => {
  try {
    out.push(await acc.mod(cred, 10), await acc.mod(cred, -3), await acc.tot(cred))
    out.push((await acc.past(cred)).past.map((e) => e.by))
  } catch (err) {
    out.push({ error: err.constructor.name, message: err.message, landed: mayHaveLanded(err) })
  }
  await acc.close()
  console.log(JSON.stringify(out))
})()
`

const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'accman-https-'))
// A certificate for `name` (its subjectAltName `alt`) in dir/<file>.pem and
// its key in dir/<file>.key.
function selfSigned (file, name, alt) {
  execFileSync('openssl', ['req', '-x509', '-newkey', 'ec', '-pkeyopt',
    'ec_paramgen_curve:prime256v1', '-nodes', '-days', '2', '-subj', `/CN=${name}`,
    '-addext', `subjectAltName=${alt}`, '-keyout', path.join(dir, file + '.key'),
    '-out', path.join(dir, file + '.pem')], { stdio: 'ignore' })
  const read = (ext) => fs.readFileSync(path.join(dir, file + ext))
  return { key: read('.key'), cert: read('.pem') }
}
const certs = {
  ok: selfSigned('ok', '127.0.0.1', 'IP:127.0.0.1'),
  other: selfSigned('other', 'other.test', 'DNS:other.test'),
  stranger: selfSigned('stranger', '127.0.0.1', 'IP:127.0.0.1'),
  dotted: selfSigned('dotted', 'accman.test', 'DNS:accman.test')
}
// The private CA a user trusts: every certificate but the stranger's.
const BUNDLE = path.join(dir, 'bundle.pem')
fs.writeFileSync(BUNDLE, Buffer.concat([certs.ok.cert, certs.other.cert, certs.dotted.cert]))

let server = null
let direct = null // to AccMan itself, over http
test.before(async () => {
  server = new AccManServer()
  await server.start()
  direct = new AccManClient({ url: server.url, token: TOKENS.mint })
})
test.after(async () => {
  await direct?.close()
  await server?.close()
  fs.rmSync(dir, { recursive: true, force: true })
})

// CALLS through an https proxy with `cert`, run as `argv` (before node).
async function through (cert, cred, { argv = [], host = '127.0.0.1' } = {}) {
  const proxy = await proxyTo(server.url, { tls: cert })
  try {
    const url = `https://${host}:${proxy.port}`
    const cmd = [...argv, process.execPath, '-e', CALLS, PACKAGE, url, TOKENS.mint, cred]
    const { stdout } = await promisify(execFile)(cmd[0], cmd.slice(1), {
      env: { ...process.env, NODE_EXTRA_CA_CERTS: BUNDLE }, timeout: 10000
    })
    return { out: JSON.parse(stdout), served: proxy.served, names: proxy.names }
  } finally {
    await proxy.close()
  }
}

test('a mod, a tot and a past through https, the private CA in NODE_EXTRA_CA_CERTS', async () => {
  const { out } = await through(certs.ok, 'c-https')
  assert.deepEqual(out, [{ tot: 10, seq: 1 }, { tot: 7, seq: 2 }, 7, [-3, 10]])
})

for (const [which, why] of [['stranger', ': self-signed certificate (DEPTH_ZERO_SELF_SIGNED_CERT)'],
  ['other', "altnames: IP: 127.0.0.1 is not in the cert's list (ERR_TLS_CERT_ALTNAME_INVALID)"]]) {
  test(`a certificate not trusted for the host (${which}): Unreachable, nothing sent`, async () => {
    // The handshake fails before the request is written: a keyless mod
    // did not land, and the error names the check that failed.
    const { out, served } = await through(certs[which], `c-https-${which}`)
    assert.equal(out.length, 1)
    assert.equal(out[0].error, 'Unreachable')
    assert.equal(out[0].landed, false)
    assert.ok(out[0].message.includes(why), out[0].message)
    assert.equal(served, 0)
    await assert.rejects(direct.tot(`c-https-${which}`), NoAccount)
  })
}

test('a host with the root\'s dot is named to TLS without it', async () => {
  // https://accman.test.:PORT (a fully qualified name): the SNI name goes
  // without the dot (RFC 6066 3), and the certificate for accman.test
  // passes (Node's check drops the dot itself; undici's SNI did not).  The
  // name resolves in a child whose /etc/hosts is its own (a mount
  // namespace of its own, as the Python side's tests do).
  const hosts = path.join(dir, 'hosts')
  fs.writeFileSync(hosts, '127.0.0.1 localhost accman.test.\n')
  const argv = ['unshare', '--mount', 'sh', '-c', 'mount --bind "$0" /etc/hosts && exec "$@"',
    hosts]
  const { out, names } = await through(certs.dotted, 'c-https-dot', { argv, host: 'accman.test.' })
  assert.deepEqual(out, [{ tot: 10, seq: 1 }, { tot: 7, seq: 2 }, 7, [-3, 10]])
  assert.deepEqual([...new Set(names)], ['accman.test'])
})

test('ca trusts a private CA for one client, with no NODE_EXTRA_CA_CERTS', async () => {
  // In this process, which started before the private CA was made, so
  // trusts none of it: the same calls without `ca` are refused as
  // untrusted, so `ca` is what makes them pass.
  const proxy = await proxyTo(server.url, { tls: certs.ok })
  const url = `https://127.0.0.1:${proxy.port}`
  const calls = async (options, cred) => {
    const acc = new AccManClient({ url, token: TOKENS.mint, retries: 0, ...options })
    try {
      return [await acc.mod(cred, 10), await acc.tot(cred)]
    } finally {
      await acc.close()
    }
  }
  try {
    await assert.rejects(calls({}, 'c-https-ca'), (err) => err instanceof Unreachable &&
      err.message.includes('self-signed certificate (DEPTH_ZERO_SELF_SIGNED_CERT)'))
    assert.equal(proxy.served, 0)
    await assert.rejects(direct.tot('c-https-ca'), NoAccount)
    assert.deepEqual(await calls({ ca: fs.readFileSync(BUNDLE) }, 'c-https-ca'),
      [{ tot: 10, seq: 1 }, 10])
    assert.deepEqual(await calls({ ca: [certs.other.cert, certs.ok.cert.toString()] },
      'c-https-ca'), [{ tot: 20, seq: 2 }, 20])
  } finally {
    await proxy.close()
  }
})

test('a ca that is not PEM certificates, or is given with http://, is refused', () => {
  const url = 'https://127.0.0.1:1'
  const cert = certs.ok.cert.toString()
  for (const [ca, why] of [
    [42, 'ca must be a PEM string or Buffer, not 42'],
    [[cert, {}], 'ca[1] must be a PEM string or Buffer, not an object'],
    [[], 'ca must not be an empty array'],
    [BUNDLE, 'ca holds no PEM certificate (-----BEGIN CERTIFICATE-----)'],
    [cert.replace(/\n[A-Za-z0-9+/]{8}/, '\n'), 'ca holds a PEM certificate that does not parse']
  ]) {
    assert.throws(() => new AccManClient({ url, ca }), { name: 'TypeError', message: why })
  }
  assert.throws(() => new AccManClient({ url: 'http://127.0.0.1:1', ca: cert }),
    { name: 'TypeError', message: 'ca is for an https:// url; this url is http://' })
})

test('the plugin makes its client with ca, and refuses ca beside a client of its own', async () => {
  const proxy = await proxyTo(server.url, { tls: certs.ok })
  const app = Fastify()
  try {
    await direct.mod('c-https-plugin', 5)
    await app.register(accman, {
      url: `https://127.0.0.1:${proxy.port}`, token: TOKENS.service, ca: certs.ok.cert, retries: 0
    })
    app.get('/w', async () => ({ ok: true }))
    const res = await app.inject({ url: '/w', headers: { accman: 'c-https-plugin' } })
    assert.equal(res.statusCode, 200, res.body)
    await app.close()
    assert.equal(await direct.tot('c-https-plugin'), 4)
    assert.ok(proxy.served >= 1)
  } finally {
    await app.close()
    await proxy.close()
  }
  const shared = Fastify()
  await assert.rejects(shared.register(accman, { client: direct, ca: certs.ok.cert }).ready(),
    { name: 'TypeError', message: /^ca is an option of the client/ })
})

// A close() that waits on a connection waits until its client closes it,
// for ever if the client never does: the deadline only turns that hang
// into a failure, and is far past what a close that waits on nothing takes.
const CLOSED_WITHIN_MS = 10000
async function within (promise, what) {
  const late = Symbol('late')
  const out = await Promise.race([promise, later(CLOSED_WITHIN_MS, late, { ref: false })])
  if (out === late) assert.fail(`${what} within ${CLOSED_WITHIN_MS} ms`)
  return out
}

// A TLS connection to the https service `app` (by default at its port,
// trusting certs.ok), once the service's side of it (`server`) has
// finished its handshake too (the client's may finish first); `closed`
// resolves with the text the client received once its side closes.
async function tlsTo (app, to = { port: app.server.address().port, host: '127.0.0.1', ca: certs.ok.cert }) {
  const secured = new Promise((resolve) => app.server.once('secureConnection', resolve))
  const socket = tls.connect(to)
  socket.on('error', () => {})
  let text = ''
  socket.setEncoding('utf8')
  socket.on('data', (d) => { text += d })
  const closed = new Promise((resolve) => socket.once('close', () => resolve(text)))
  return { socket, server: await secured, closed }
}

// A connection to `app` at `to` still in its TLS handshake: a TLS record's
// header, and then nothing, once the service has read it.
async function stalledTo (app, to) {
  const accepted = new Promise((resolve) => app.server.once('connection', resolve))
  const socket = net.connect(to, () => socket.write(Buffer.from([0x16, 0x03, 0x01, 0x00, 0x50])))
  socket.on('error', () => {})
  const closed = new Promise((resolve) => socket.once('close', resolve))
  const server = await accepted
  await until(() => server.bytesRead === 5)
  return { socket, closed }
}

test('the plugin\'s close() in an https service ends the connections with no request begun, and waits for the rest', async () => {
  // A proxy or a browser opens connections ahead of their requests, TLS
  // handshake and all; fastify runs the onClose hooks, the owed calls'
  // drain among them, only once every connection has ended.
  await direct.mod('c-https-close', 10)
  const { app } = await serviceApp({ url: server.url, token: TOKENS.service }, { https: certs.ok })
  const sockets = []
  let closed = false
  try {
    const idle = await tlsTo(app) // handshake done, no request
    sockets.push(idle.socket)
    // One still in its handshake: a TLS record's header, then nothing.
    const stalled = await stalledTo(app, { port: app.server.address().port, host: '127.0.0.1' })
    sockets.push(stalled.socket)
    // A paid request under way (its handler waits until fastify closes the
    // server), and one whose head has come in part.
    const paid = await tlsTo(app)
    sockets.push(paid.socket)
    const partial = await tlsTo(app)
    sockets.push(partial.socket)
    paid.socket.write('GET /gated HTTP/1.1\r\nHost: x\r\naccman: c-https-close\r\n\r\n')
    partial.socket.write('GET /w HTTP/1.1\r\nHost: x\r\n')
    await until(() => app.served === 1 && partial.server.bytesRead > 0)
    const closing = app.close().then(() => { closed = true })
    await within(Promise.all([idle.closed, stalled.closed]),
      'the connections with no request begun are not ended')
    // The one begun is not cut: fastify answers it, now closing, with its 503.
    partial.socket.write('accman: c-https-close\r\n\r\n')
    assert.match(await within(partial.closed, 'no answer to the request begun'),
      /^HTTP\/1\.1 503 Service Unavailable\r\n/)
    const answer = (await within(paid.closed, 'no answer to the paid request')).split('\r\n')
    assert.equal(answer[0], 'HTTP/1.1 200 OK')
    assert.ok(answer.includes('accman: 9') && answer.includes('connection: close'), answer.join('\n'))
    await within(closing, 'close() still waits')
    assert.equal(await direct.tot('c-https-close'), 9)
  } finally {
    for (const socket of sockets) socket.destroy()
    if (!closed) app.server.closeAllConnections()
    await app.close()
  }
})

test('the plugin\'s close() in an https service on a Unix socket ends the connections with no request begun', async () => {
  // A Unix socket's connections have no addresses to tell them apart by.
  const app = Fastify({ https: certs.ok })
  await app.register(accman, { url: server.url, token: TOKENS.service })
  const at = path.join(dir, 'service.sock')
  await app.listen({ path: at })
  const sockets = []
  let closed = false
  try {
    // The certificate names 127.0.0.1, which a Unix socket is not.
    const idle = await tlsTo(app, { path: at, rejectUnauthorized: false })
    sockets.push(idle.socket)
    const stalled = await stalledTo(app, { path: at })
    sockets.push(stalled.socket)
    const closing = app.close().then(() => { closed = true })
    await within(Promise.all([idle.closed, stalled.closed]),
      'the connections with no request begun are not ended')
    await within(closing, 'close() still waits')
  } finally {
    for (const socket of sockets) socket.destroy()
    if (!closed) app.server.closeAllConnections()
    await app.close()
  }
})
