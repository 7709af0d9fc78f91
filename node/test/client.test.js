'use strict'
// The client against a real AccMan server (the repository's Python package)
// and, for faults a real server does not make on demand, a fake one.

const test = require('node:test')
const assert = require('node:assert/strict')
const net = require('node:net')
const util = require('node:util')
const { AccManClient } = require('..')
const E = require('../src/errors')
const { CALLS_IN_FLIGHT_MAX, RETRY_PAUSE_MAX_MS } = require('../src/limits')
const { TOKENS, sharedAccMan } = require('./helpers/accman')
const { fakeAccMan, reply } = require('./helpers/fake')
const { proxyTo } = require('./helpers/proxy')
const { until } = require('./helpers/app')

const acc = sharedAccMan(test, { service: true })

test('tot, mod with min and key, past: the SPEC\'s results', async () => {
  assert.deepEqual(await acc.mint.mod('c-basic', 100), { tot: 100, seq: 1 })
  assert.equal(await acc.service.tot('c-basic'), 100)
  assert.deepEqual(await acc.service.mod('c-basic', -30, { min: 0, key: 'k1' }), { tot: 70, seq: 2 })
  // The same key again answers the first reply and changes nothing.
  assert.deepEqual(await acc.service.mod('c-basic', -30, { min: 0, key: 'k1' }), { tot: 70, seq: 2 })
  assert.equal(await acc.service.tot('c-basic'), 70)
  const page = await acc.service.past('c-basic', { limit: 1 })
  assert.equal(page.past.length, 1)
  assert.deepEqual({ ...page.past[0], at: 0 }, { seq: 2, by: -30, tot: 70, at: 0, key: 'k1', hold: null })
  assert.equal(page.next, 2)
  const older = await acc.service.past('c-basic', { before: page.next })
  assert.deepEqual(older.past.map((e) => e.seq), [1])
  assert.equal(older.next, null)
})

test('the SPEC\'s error codes arrive as typed errors, and change nothing', async () => {
  await acc.mint.mod('c-err', 10)
  await assert.rejects(acc.service.mod('c-err', -11, { min: 0 }), (e) => e instanceof E.Insufficient && e.tot === 10)
  await assert.rejects(acc.service.tot('c-none'), E.NoAccount)
  await acc.service.mod('c-err', -1, { key: 'same' })
  await assert.rejects(acc.service.mod('c-err', -2, { key: 'same' }), E.KeyReused)
  await assert.rejects(acc.service.mod('c-err', 5), E.Forbidden) // a funding mod needs mint
  await assert.rejects(acc.mint.mod('c-err', 2n ** 63n - 1n), E.Overflow)
  const noToken = new AccManClient({ url: acc.server.url })
  // AccMan's own words whole: "Bearer token" is prose, not a quoted secret.
  await assert.rejects(noToken.tot('c-err'), (e) => e instanceof E.Unauthorized &&
    e.detail.includes('this call needs an Authorization: Bearer token'))
  await noToken.close()
  const wrongPath = new AccManClient({ url: acc.server.url + '/nothing-here', token: TOKENS.mint })
  await assert.rejects(wrongPath.tot('c-err'), (e) => e instanceof E.UnexpectedReply && e.status === 404)
  await wrongPath.close()
  assert.equal(await acc.service.tot('c-err'), 9)
})

test('bigint: true gives exact balances past 2^53; the default refuses to round them', async () => {
  const big = new AccManClient({ url: acc.server.url, token: TOKENS.mint, bigint: true })
  assert.deepEqual(await big.mod('c-big', 2n ** 60n), { tot: 2n ** 60n, seq: 1n })
  assert.equal(await big.tot('c-big'), 2n ** 60n)
  await assert.rejects(acc.mint.tot('c-big'), (e) => e instanceof E.Unrepresentable && e.reply.tot === 2n ** 60n)
  await big.close()
})

test('a token never appears in the client\'s inspection or errors', async () => {
  assert.ok(!util.inspect(acc.service, { depth: 5, showHidden: false }).includes(TOKENS.service))
  const err = await acc.service.tot('c-none').catch((e) => e)
  assert.ok(!util.inspect(err).includes(TOKENS.service))
  assert.ok(!err.message.includes('c-none'))
})

test('AccMan stopped: Unreachable (nothing sent); restarted: the same client carries on', async () => {
  await acc.mint.mod('c-restart', 50)
  const client = new AccManClient({ url: acc.server.url, token: TOKENS.service, retries: 0 })
  assert.equal(await client.tot('c-restart'), 50)
  await acc.server.stop()
  await assert.rejects(client.mod('c-restart', -1), E.Unreachable)
  await acc.server.start()
  assert.deepEqual(await client.mod('c-restart', -1, { key: 'after' }), { tot: 49, seq: 2 })
  await client.close()
})

// A fake AccMan that leaves hung each request `answer` gives null for, on
// the mocked clock of test `t` (t.mock.timers).  An attempt's deadline
// covers its connect: on the real clock a loaded machine can reach it
// before the connect is handled, and the attempt goes unsent, which changes
// what is counted.  `drive(call, deadlineMs)` settles as `call` does, and
// moves the clock past a deadline only once the fake has read the request
// it leaves hung, then at once past the retry's pause.
async function hangingFake (t, answer) {
  t.mock.timers.enable({ apis: ['setTimeout'] })
  let hung = 0
  const fake = await fakeAccMan((head) => {
    const out = answer(head)
    if (out === null) hung++
    return out
  })
  t.after(() => fake.close())
  const immediate = () => new Promise((resolve) => setImmediate(resolve))
  fake.drive = async (call, deadlineMs) => {
    let settled = false
    call.then(() => { settled = true }, () => { settled = true })
    const end = Date.now() + 20000 // the real clock: a request that never comes fails the test
    // `call` was just made: the fake cannot have read its first request yet.
    for (let passed = hung; !settled; await immediate()) {
      if (hung > passed) {
        passed++
        t.mock.timers.tick(deadlineMs)
        await immediate() // the attempt's error has reached the call, which set its pause
        t.mock.timers.tick(RETRY_PAUSE_MAX_MS)
      } else if (Date.now() > end) {
        throw new Error(`no request left hung after ${passed} of them`)
      }
    }
    return call
  }
  return fake
}

test('a hung AccMan: CallTimeout; a keyless mod is sent once, a keyed one retried', async (t) => {
  const fake = await hangingFake(t, () => null)
  const client = new AccManClient({ url: fake.url, timeoutMs: 100, retries: 2 })
  t.after(() => client.close())
  await assert.rejects(fake.drive(client.mod('c', -1), 100), E.CallTimeout)
  assert.equal(fake.heads.length, 1)
  await assert.rejects(fake.drive(client.mod('c', -1, { key: 'k' }), 100), E.CallTimeout)
  assert.equal(fake.heads.length, 1 + 3)
  assert.ok(fake.heads.slice(1).every((h) => h.startsWith('PATCH /mod?cred=c&by=-1&key=k ')))
  await assert.rejects(fake.drive(client.tot('c'), 100), E.OutcomeUnknown)
  assert.equal(fake.heads.length, 1 + 3 + 3)
})

// A server that accepts each connection and closes it at once, reading
// nothing.  undici writes a new connection's request as soon as it opens,
// so the close comes after the request went into the socket: the client
// cannot tell it from a server that read the request and died before
// answering, and a keyless mod is not sent again.
test('a server that closes each connection as it opens: OutcomeUnknown, a keyless mod sent once, a keyed one retried', async () => {
  let connections = 0
  const closer = net.createServer((socket) => {
    connections++
    socket.destroy()
  })
  await new Promise((resolve) => closer.listen(0, '127.0.0.1', resolve))
  const client = new AccManClient({ url: `http://127.0.0.1:${closer.address().port}`, retries: 2 })
  try {
    await assert.rejects(client.mod('c', -1), (err) => err.constructor === E.OutcomeUnknown)
    assert.equal(connections, 1)
    await assert.rejects(client.mod('c', -1, { key: 'k' }), (err) => err.constructor === E.OutcomeUnknown)
    assert.equal(connections, 1 + 3)
  } finally {
    await client.close()
    await new Promise((resolve) => closer.close(resolve))
  }
})

test('a 503 is retried for reads and keyed mods only; busy for any call', async () => {
  let answers = []
  const fake = await fakeAccMan(() => reply(...answers.shift()))
  const client = new AccManClient({ url: fake.url, retries: 1 })
  answers = [[503, '{"error":"unavailable","detail":"d"}'], [503, '{"error":"unavailable","detail":"d"}']]
  await assert.rejects(client.mod('c', -1), E.Unavailable)
  assert.equal(fake.heads.length, 1)
  answers = [[503, '{"error":"unavailable","detail":"d"}'], [200, '{"tot":1,"seq":2}']]
  assert.deepEqual(await client.mod('c', -1, { key: 'k' }), { tot: 1, seq: 2 })
  answers = [[503, '{"error":"busy","detail":"d"}'], [200, '{"tot":0,"seq":3}']]
  assert.deepEqual(await client.mod('c', -1), { tot: 0, seq: 3 })
  assert.equal(fake.heads.length, 5)
  await client.close()
  await fake.close()
})

test('503 not_applied and shutting_down were refused before applying: retried for any call, a keyless mod among them', async () => {
  let answers = []
  const fake = await fakeAccMan(() => reply(...answers.shift()))
  const client = new AccManClient({ url: fake.url, retries: 1 })
  for (const [code, type] of [['not_applied', E.NotApplied], ['shutting_down', E.ShuttingDown]]) {
    const refusal = [503, `{"error":"${code}","detail":"nothing of this call was applied"}`]
    const err = E.errorOfReply(503, JSON.parse(refusal[1]))
    assert.ok(err instanceof type && err instanceof E.NotApplied && err instanceof E.Unavailable, code)
    assert.deepEqual([err.code, err.status, E.mayHaveLanded(err)], [code, 503, false])
    answers = [refusal, [200, '{"tot":1,"seq":2}']]
    assert.deepEqual(await client.mod('c', -1), { tot: 1, seq: 2 }) // keyless: sent again
    answers = [refusal, refusal]
    await assert.rejects(client.hold('c', -1, { ttlS: 60 }), type)
  }
  assert.equal(fake.heads.length, 8)
  // Busy is one too; a plain unavailable is not, and may have landed.
  assert.ok(E.errorOfReply(503, { error: 'busy', detail: 'd' }) instanceof E.NotApplied)
  const plain = E.errorOfReply(503, { error: 'unavailable', detail: 'd' })
  assert.ok(!(plain instanceof E.NotApplied) && E.mayHaveLanded(plain))
  await client.close()
  await fake.close()
})

test('a code of AccMan\'s form that names a property of every object is no code of its own', () => {
  // Looked up in an ordinary object, `constructor` made a String of the
  // detail, not an error, and `__proto__` threw a TypeError.  They are the
  // only properties of Object.prototype of AccMan's form (lower case).
  for (const code of ['constructor', '__proto__']) {
    const refused = E.errorOfReply(409, { error: code, detail: 'd' })
    assert.ok(refused instanceof E.UnexpectedReply, `409 ${code}`)
    assert.deepEqual([refused.code, refused.status], [code, 409])
    const unavailable = E.errorOfReply(503, { error: code, detail: 'd' })
    assert.equal(unavailable.constructor, E.Unavailable, `503 ${code}`)
    assert.ok(E.mayHaveLanded(unavailable))
  }
})

test('a keyed mod answered by a failed commit stays unknown when its retries are refused not_applied', async () => {
  // Refused before it applied, the retry says nothing of the first
  // attempt, whose commit failed and may have applied.
  const answers = [[503, '{"error":"unavailable","detail":"the commit failed"}'],
    [503, '{"error":"not_applied","detail":"the store is closed"}'],
    [503, '{"error":"shutting_down","detail":"the server is shutting down"}']]
  const fake = await fakeAccMan(() => reply(...answers.shift()))
  const client = new AccManClient({ url: fake.url, retries: 2 })
  await assert.rejects(client.mod('c', -1, { key: 'k' }),
    (err) => err.code === 'unavailable' && !(err instanceof E.NotApplied) && E.mayHaveLanded(err))
  assert.equal(fake.heads.length, 3)
  await client.close()
  await fake.close()
})

test('a reply that breaks framing or JSON is BadReply', async () => {
  const fake = await fakeAccMan((head) => head.includes('cred=frame')
    ? 'HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\n{}'
    : reply(200, '{"tot":"ten"}'))
  const client = new AccManClient({ url: fake.url, retries: 0 })
  await assert.rejects(client.tot('json'), E.BadReply)
  await assert.rejects(client.tot('frame'), E.BadReply)
  await client.close()
  await fake.close()
})

test('CALLS_IN_FLIGHT_MAX: one call more is Busy at once, nothing sent', async () => {
  const fake = await fakeAccMan(() => null)
  const client = new AccManClient({ url: fake.url, timeoutMs: 60000, connections: 1, retries: 0 })
  const pending = Array.from({ length: CALLS_IN_FLIGHT_MAX }, () => client.tot('c').catch((e) => e))
  await assert.rejects(client.tot('c'), (e) => e instanceof E.Busy)
  await fake.close()
  const errors = await Promise.all(pending)
  assert.ok(errors.every((e) => e instanceof E.AccManError))
  await client.close()
})

test('a call waiting for a connection past its deadline is Unreachable and never sent', async (t) => {
  const fake = await fakeAccMan(() => null)
  const client = new AccManClient({ url: fake.url, timeoutMs: 500, connections: 1, retries: 0 })
  t.after(async () => {
    await fake.close()
    await client.close()
  })
  const first = client.mod('c', -1).catch((e) => e)
  await until(() => fake.heads.length === 1)
  const second = client.mod('c', -2).catch((e) => e)
  // Both deadlines pass while the loop is blocked, so both timers fire in
  // one pass with no I/O between: the connection the first call gives up
  // cannot carry the second before the second's deadline.
  Atomics.wait(new Int32Array(new SharedArrayBuffer(4)), 0, 0, 600)
  assert.ok(await first instanceof E.CallTimeout, String(await first))
  const late = await second
  assert.ok(late instanceof E.Unreachable, String(late))
  assert.equal(late.message, 'no AccMan connection within 500 ms: nothing was sent')
  await new Promise((resolve) => setTimeout(resolve, 100))
  assert.deepEqual(fake.heads.map((h) => h.split(' ')[1]), ['/mod?cred=c&by=-1'])
})

test('options are checked when the client is made', () => {
  assert.throws(() => new AccManClient({ url: 'ftp://x' }), TypeError)
  assert.throws(() => new AccManClient({ url: 'http://x/?a=1' }), TypeError)
  assert.throws(() => new AccManClient({ url: 'http://x', token: 'has space' }), TypeError)
  assert.throws(() => new AccManClient({ url: 'http://x', timeoutMs: 0 }), TypeError)
  assert.throws(() => new AccManClient({ url: 'http://x', connections: 0 }), TypeError)
  assert.throws(() => new AccManClient({ url: 'http://x', retries: 11 }), TypeError)
  // A misspelt option is refused, never its default taken silently.
  assert.throws(() => new AccManClient({ url: 'http://x', timeoutMS: 1, retrys: 9 }),
    { name: 'TypeError', message: 'unknown options timeoutMS, retrys: AccManClient takes url, token, timeoutMs, connections, retries, bigint, ca' })
  assert.throws(() => new AccManClient({ url: 'http://x', bigint: 'yes' }), { message: 'bigint must be true or false, not "yes"' })
  // A wrong value is shown: one from the environment is a string, in range.
  assert.throws(() => new AccManClient({ url: 'http://x', timeoutMs: '5000' }),
    { name: 'TypeError', message: 'timeoutMs must be an integer from 1 to 3600000, not "5000"' })
  assert.throws(() => new AccManClient({ url: 'http://x', retries: 1.5 }),
    { name: 'TypeError', message: 'retries must be an integer from 0 to 10, not 1.5' })
  assert.throws(() => new AccManClient({ url: 'http://x', connections: null }),
    { name: 'TypeError', message: 'connections must be an integer from 1 to 1024, not null' })
  assert.throws(() => new AccManClient('http://x'), { message: /the options of AccManClient must be an object/ })
})

test('a url with a space or a control character is refused, as the Python client does', () => {
  // The URL parser dropped a tab inside the port (port 23001) and spaces at
  // either end: the client reached another port than its URL reads.
  for (const url of ['http://127.0.0.1:2\t3001', ' http://h/', 'http://h/\n', 'http://h :1']) {
    assert.throws(() => new AccManClient({ url }), {
      name: 'TypeError',
      message: 'url holds a space or a control character: the URL parser drops a tab or a ' +
        'line break wherever it is, and spaces at either end'
    }, JSON.stringify(url))
  }
})

test('a url the parser would read as another host or path is refused', () => {
  // new URL() took `\\` for `/`, `http:h` and `http:///h` for `http://h`, and
  // decoded `%31` in a host: `http://evil.example\\.127.0.0.1` reached
  // evil.example.  The Python client refuses each of them too.
  for (const url of ['http://h\\accman', 'http://evil.example\\.127.0.0.1', 'http:h:8080',
    'http:\\\\h:8080', 'http:/h', 'https:///h', 'http://127.0.0.%31']) {
    assert.throws(() => new AccManClient({ url }), {
      name: 'TypeError',
      message: 'url must be written http://HOST[:PORT][/PATH] (or https://), with no \\ ' +
        'anywhere nor % in its host: the URL parser would read another host or path'
    }, JSON.stringify(url))
  }
})

test('a url host that is no name nor IP address is refused when the client is made', async () => {
  // Taken, each call of such a client failed Unreachable (ENOTFOUND); the
  // Python client refuses the same hosts.
  const why = 'url host must be a name (labels of 1 to 63 characters: A-Z a-z 0-9 - _) or an IP address'
  for (const [url, host] of [
    ['https://a..b/', 'a..b'], ['https://.a/', '.a'], ['https://./', '.'],
    ['http://a..:8080', 'a..'], ['http://a\u3002\u3002b', 'a..b'], ['https://a!b/', 'a!b'],
    ['http://' + 'a'.repeat(64) + '.example', 'a'.repeat(64) + '.example']
  ]) {
    assert.throws(() => new AccManClient({ url }),
      { name: 'TypeError', message: `${why}, not ${JSON.stringify(host)}` }, url)
  }
  // The root's dot, a label of 63, an international name (new URL() writes
  // it in its xn-- form), IP addresses.
  for (const [url, where] of [
    ['https://accman.example./', 'https://accman.example.'],
    ['http://' + 'a'.repeat(63) + '.example', 'http://' + 'a'.repeat(63) + '.example'],
    ['http://b\u00fccher.example:8080', 'http://xn--bcher-kva.example:8080'],
    ['http://[::1]:8080', 'http://[::1]:8080'], ['http://127.0.0.1:8080', 'http://127.0.0.1:8080']
  ]) {
    const client = new AccManClient({ url })
    assert.equal(client.where, where)
    await client.close()
  }
})

test('an empty token is no token, as null is: no Authorization header is sent', async () => {
  // `token: process.env.ACCMAN_TOKEN` with the variable set but empty, as
  // the Python clients take it.
  const fake = await fakeAccMan(() => reply(200, '{"tot":7}'))
  try {
    for (const token of ['', null, undefined]) {
      const client = new AccManClient({ url: fake.url, token })
      try {
        assert.equal(await client.tot('c'), 7)
      } finally {
        await client.close()
      }
    }
  } finally {
    await fake.close()
  }
  assert.equal(fake.heads.length, 3)
  for (const head of fake.heads) assert.doesNotMatch(head, /authorization/i)
  assert.throws(() => new AccManClient({ url: 'http://x', token: ' ' }), { name: 'TypeError', message: /b64token: letters, digits and - \. _ ~ \+ \/, with = only at its end/ })
  // A token of another type is named by its type, not judged as a b64token.
  for (const [token, said] of [[5, '5'], [true, 'true'], [Buffer.from('tok'), 'an object']]) {
    assert.throws(() => new AccManClient({ url: 'http://x', token }),
      { name: 'TypeError', message: `token must be a string, not ${said}` })
  }
})

test('a call\'s misspelt option is refused and sends nothing: a keyed mod never goes out keyless', async () => {
  await acc.mint.mod('c-opts', 100)
  const refused = [
    [() => acc.service.mod('c-opts', -60, { Key: 'req-1' }), 'unknown option Key: mod takes min, key, low'],
    [() => acc.service.mod('c-opts', -1, 'req-1'), 'the options of mod must be an object { min, key, low }'],
    [() => acc.service.hold('c-opts', -1, { ttlS: 5, kye: 'h1' }), 'unknown option kye: hold takes ttlS, min, key'],
    [() => acc.service.hold('c-opts', -1, { ttl: 5 }), 'unknown option ttl: hold takes ttlS, min, key'],
    [() => acc.service.past('c-opts', { limt: 1 }), 'unknown option limt: past takes limit, before']
  ]
  for (const [call, message] of refused) await assert.rejects(call(), { name: 'TypeError', message })
  assert.equal(await acc.service.tot('c-opts'), 100)
  assert.equal((await acc.service.past('c-opts')).past.length, 1) // nothing went out
})

test('low on a funding mod sets the account\'s threshold; on a charge it is refused', async () => {
  assert.deepEqual(await acc.mint.mod('c-low', 100, { key: 'fund', low: 50 }), { tot: 100, seq: 1 })
  await assert.rejects(acc.service.mod('c-low', -1, { low: 5 }), { name: 'BadRequest', message: /low is set by a funding mod only/ })
  await acc.service.mod('c-low', -60) // 40: crosses 50
  const events = await fetch(acc.server.url + '/events', { headers: { authorization: 'Bearer ' + TOKENS.mint } })
  const lows = (await events.json()).events.filter((e) => e.type === 'low_balance')
  assert.deepEqual(lows.map((e) => [e.seq, e.tot]), [[2, 40]])
})

test('a closed client refuses calls with Unreachable', async () => {
  const client = new AccManClient({ url: acc.server.url, token: TOKENS.service })
  await client.close()
  await assert.rejects(client.tot('c-basic'), E.Unreachable)
})

test('a keyed mod whose first attempt may have landed stays OutcomeUnknown when its retries meet a refused connect', async () => {
  await acc.mint.mod('c-maybe', 10)
  const proxy = await proxyTo(acc.server.url)
  const client = new AccManClient({ url: proxy.url, token: TOKENS.service, retries: 2 })
  try {
    proxy.set('delay', 60000) // the request reaches AccMan at once; its reply is held back
    const call = client.mod('c-maybe', -3, { key: 'maybe-1' })
    await until(() => proxy.targets.some((t) => t.startsWith('/mod?')))
    await proxy.close() // the held reply is lost; every retry's connect is refused
    await assert.rejects(call, (err) => err instanceof E.OutcomeUnknown)
  } finally {
    await client.close()
  }
  assert.equal(await acc.service.tot('c-maybe'), 7) // it had landed: "not applied" would be wrong
})

test('a keyed mod whose reply was lost ends Unrepresentable, applied, when its retry gets a 200 past 2^53', async () => {
  const big = new AccManClient({ url: acc.server.url, token: TOKENS.mint, bigint: true })
  await big.mod('c-lost-big', 2n ** 60n)
  const proxy = await proxyTo(acc.server.url)
  // A deadline no slow machine reaches: the first attempt ends as its connection is dropped.
  const client = new AccManClient({ url: proxy.url, token: TOKENS.service, retries: 1, timeoutMs: 60000 })
  try {
    proxy.dropReplies(/[?&]key=lost-big(&|$)/) // the mod applies; its reply never comes
    const call = client.mod('c-lost-big', -3, { key: 'lost-big' })
    await until(() => proxy.dropped.length === 1)
    proxy.dropReplies(null)
    proxy.set('refuse') // its connection dropped: OutcomeUnknown, retried ...
    proxy.set('pass') // ... and answered with the first reply, a 200
    await assert.rejects(call, (err) => err instanceof E.Unrepresentable && err.status === 200 &&
      err.reply.tot === 2n ** 60n - 3n && err.reply.seq === 2n)
    assert.equal(proxy.targets.filter((t) => t.startsWith('/mod?')).length, 2)
    assert.equal((await big.past('c-lost-big')).past.length, 2) // applied once
  } finally {
    await Promise.all([client.close(), proxy.close(), big.close()])
  }
})

// A refusal judged by the balance (insufficient) or by an account not yet
// opened (no_account) says nothing of an attempt still on its way (a stalled
// front-end): it may meet a balance topped up, or an account opened, meanwhile.
// [refusal, balance before, the charge, the balance once the late attempt applied]
for (const [refusal, before, by, after] of [['insufficient', 10, -15, 5], ['no_account', 0, -4, 6]]) {
  test(`a keyed charge whose first attempt arrives late stays OutcomeUnknown though its retry is refused ${refusal}`, async () => {
    const cred = `c-late-${refusal}`
    if (before) await acc.mint.mod(cred, before)
    const proxy = await proxyTo(acc.server.url)
    const client = new AccManClient({ url: proxy.url, token: TOKENS.service, retries: 1, timeoutMs: 500 })
    try {
      proxy.set('hold')
      const call = client.mod(cred, by, { min: 0, key: `late-${refusal}` })
      await until(() => proxy.targets.some((t) => t.startsWith('/mod?')))
      proxy.set('pass') // the retry reaches AccMan at once, and is refused
      await assert.rejects(call, (err) => err instanceof E.OutcomeUnknown)
      await acc.mint.mod(cred, 10) // topped up, or opened, after the refusal
      proxy.release()
      await until(async () => (await acc.service.tot(cred)) === after) // the first attempt applied
    } finally {
      await client.close()
      await proxy.close()
    }
  })
}

test('a keyed mod answered by a failed commit stays unknown when its retries find no AccMan', async () => {
  const fake = await fakeAccMan(() => {
    setImmediate(() => fake.close()) // AccMan gone after answering: the retries are refused
    return reply(503, '{"error":"unavailable","detail":"the store cannot commit"}')
  })
  const client = new AccManClient({ url: fake.url, retries: 2 })
  // A plain 503 is "not acknowledged", not "not applied": never Unreachable.
  await assert.rejects(client.mod('c', -1, { key: 'k' }),
    (err) => err instanceof E.Unavailable && !(err instanceof E.Unreachable))
  await client.close()
})

test('a keyed mod with its reply lost stays unknown when a proxy answers its retry', async (t) => {
  const answers = [null, reply(404, '{"error":"not_found","detail":"a proxy"}')]
  const fake = await hangingFake(t, () => answers.shift())
  const client = new AccManClient({ url: fake.url, retries: 1, timeoutMs: 300 })
  t.after(() => client.close())
  await assert.rejects(fake.drive(client.mod('c', -1, { key: 'k' }), 300), E.OutcomeUnknown)
  assert.equal(fake.heads.length, 2)
})

test('a reply\'s detail that quotes the request shows no credential or token', async () => {
  // Not AccMan at the URL (a proxy, a firewall): its detail quotes the head.
  const fake = await fakeAccMan((head) => {
    const status = head.startsWith('GET') ? 400 : 401
    return reply(status, JSON.stringify({ error: 'x', detail: 'x'.repeat(150) + head }))
  })
  const cred = 'SECRETcred' + 'c'.repeat(40)
  const client = new AccManClient({ url: fake.url, token: 'SECRETtoken' + 't'.repeat(40), retries: 0 })
  try {
    for (const call of [() => client.tot(cred), () => client.mod(cred, -1)]) {
      const err = await call().then(() => null, (e) => e)
      assert.ok(err instanceof E.AccManError, String(err))
      assert.ok(err.detail.includes('<not shown>') && err.detail.length <= 200, err.detail)
      for (const text of [err.detail, err.message, err.stack, util.inspect(err)]) {
        assert.ok(!text.includes('SECRET'), text)
      }
    }
  } finally {
    await client.close()
    await fake.close()
  }
})

for (const echo of [
  'token Zm9vYmFyYmF6…', // cut short by what quotes it
  '...c0ffee-abc', // the credential's head
  'it said Zm9vYmFyYmF6cXV4%2B%2FZm9vYmFy%3D%3D, whole', // percent-encoded
  'token=vYmFyYmF6cXV4+/Z', // a piece inside a longer word
  'upstream refused Bearer%20Zm9vYmFyYmF6cXV4%2B%2FZm9v', // encoded and cut
  'upstream refused bearer%20zm9v Zm9vYmFyYmF6cXV4%2b%2fZm9vYmFy%3d%3d', // lower-case hex
  'Authorization: Bearer Zm9vYmF', // another's, cut short: any bearer value
  'Authorization: Bearer token-1f2e3d4c5b6a7980' // another's, starting like prose
]) {
  test(`a piece of a secret of 8 characters or more is out of sight: ${echo}`, async () => {
    const cred = 'c0ffee-abcdef0123456789'
    const token = 'Zm9vYmFyYmF6cXV4+/Zm9vYmFy=='
    const fake = await fakeAccMan(() => reply(400, JSON.stringify({
      error: 'bad_request', detail: `the balance is short; ${echo}`
    })))
    const client = new AccManClient({ url: fake.url, token, retries: 0 })
    try {
      const err = await client.tot(cred).then(() => null, (e) => e)
      assert.ok(err.detail.startsWith('the balance is short; ') && err.detail.includes('<not shown>'), err.detail)
      const n = E.SECRET_PIECE_CHARS_MIN
      for (const secret of [cred, token]) {
        for (let i = 0; i + n <= secret.length; i++) {
          assert.ok(!err.detail.includes(secret.slice(i, i + n)), err.detail)
          assert.ok(!err.message.includes(secret.slice(i, i + n)) && !err.stack.includes(secret.slice(i, i + n)))
        }
      }
    } finally {
      await client.close()
      await fake.close()
    }
  })
}

test('any quoted cred= or bearer value goes, and a short credential only where it stands alone', async () => {
  const fake = await fakeAccMan(() => reply(400, JSON.stringify({
    error: 'x'.repeat(41),
    detail: 'the balance a; GET /tot?cred=OTHERcred HTTP/1.1 Authorization: Bearer OTHERtoken; a'
  })))
  const client = new AccManClient({ url: fake.url, token: 't0k', retries: 0 })
  try {
    const err = await client.tot('a').then(() => null, (e) => e)
    assert.equal(err.detail, 'the balance <not shown>; GET /tot?cred=<not shown> HTTP/1.1 ' +
      'Authorization: Bearer <not shown>; <not shown>')
    assert.equal(err.code, 'unexpected')
  } finally {
    await client.close()
    await fake.close()
  }
})
