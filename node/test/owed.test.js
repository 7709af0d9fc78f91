'use strict'
// The owed queue's stranding: a call an attempt of which may have landed is
// stranded of unknown outcome however it is stranded, so that onUnpaid
// never bills a charge that landed.  Against a fake AccMan (a proxy's 404).

const test = require('node:test')
const assert = require('node:assert/strict')
const { AccManClient } = require('..')
const E = require('../src/errors')
const { Owed, Charge, Settle } = require('../src/owed')
const { fakeAccMan, reply } = require('./helpers/fake')

const quiet = { info () {}, warn () {}, error () {} }

function recorder () {
  const stranded = []
  return { stranded, strand: (item, why, unknown) => stranded.push([item.key, why, unknown === true]) }
}

test('a charge whose reply was lost, then answered by a proxy\'s 404, is stranded unknown', async () => {
  const fake = await fakeAccMan(() => reply(404, '{"error":"not_found","detail":"a proxy"}'))
  const client = new AccManClient({ url: fake.url, retries: 0 })
  const { stranded, strand } = recorder()
  const owed = new Owed(client, strand, quiet)
  owed.add(new Charge('c', 2n, 'k-404'), new E.OutcomeUnknown('no reply'))
  assert.ok(await owed.drain(5000))
  assert.deepEqual(stranded, [['k-404', 'not_found', true]])
  await client.close()
  await fake.close()
})

test('a charge that may have landed, stranded because the queue is closed, is unknown', async () => {
  const { stranded, strand } = recorder()
  const owed = new Owed(null, strand, quiet)
  await owed.close(0)
  owed.add(new Charge('c', 2n, 'k-late'), new E.OutcomeUnknown('no reply'))
  owed.add(new Charge('c', 2n, 'k-unsent'), new E.Unreachable('nothing sent'))
  assert.deepEqual(stranded, [['k-late', 'shutting down', true], ['k-unsent', 'shutting down', false]])
})

test('a charge refused 503 not_applied is owed, retried, and stranded at close unpaid, never unknown', async () => {
  // Refused before it applied, each attempt leaves nothing to look for: the
  // account owes the charge (onUnpaid bills it), where a plain 503 (a
  // commit that failed) leaves its outcome unknown.
  const answer = reply(503, '{"error":"not_applied","detail":"the store cannot commit, nothing applied"}')
  const fake = await fakeAccMan(() => answer)
  const client = new AccManClient({ url: fake.url, retries: 0 })
  const { stranded, strand } = recorder()
  const owed = new Owed(client, strand, quiet)
  try {
    owed.add(new Charge('c', 2n, 'k-unapplied'), E.errorOfReply(503, JSON.parse(answer.split('\r\n\r\n')[1])))
    owed.add(new Charge('c', 3n, 'k-plain'), E.errorOfReply(503, { error: 'unavailable', detail: 'the commit failed' }))
    while (fake.heads.length < 2) await new Promise((resolve) => setTimeout(resolve, 10)) // retried
    await owed.close(0)
  } finally {
    await client.close()
    await fake.close()
  }
  assert.deepEqual(stranded, [['k-unapplied', 'shutting down', false], ['k-plain', 'shutting down', true]])
})

// 503 not_applied says nothing of this call's earlier attempts (SERVER.md
// "Errors"): once one may have landed, the call stays of unknown outcome
// however many later attempts are refused so.
test('a charge owed after not_applied, answered unavailable once, is unknown after later not_applied', async () => {
  let plain = 1
  const fake = await fakeAccMan(() => plain-- > 0
    ? reply(503, '{"error":"unavailable","detail":"the commit failed"}')
    : reply(503, '{"error":"not_applied","detail":"the store takes no writes"}'))
  const client = new AccManClient({ url: fake.url, retries: 0 })
  const { stranded, strand } = recorder()
  const owed = new Owed(client, strand, quiet)
  try {
    owed.add(new Charge('c', 2n, 'k-mixed'), new E.NotApplied('the store takes no writes'))
    while (fake.heads.length < 3) await new Promise((resolve) => setTimeout(resolve, 10))
    await owed.close(0)
  } finally {
    await client.close()
    await fake.close()
  }
  assert.deepEqual(stranded, [['k-mixed', 'shutting down', true]])
})

// A settle that may have landed, whose hold then answers hold_ended, is
// charged as a keyed mod; that mod refused not_applied leaves the settle's
// earlier attempt what it was: unknown, never billed.
test('a settle answered unavailable, then charged as a mod refused not_applied, stays unknown', async () => {
  let plain = 1
  const fake = await fakeAccMan((head) => {
    if (head.startsWith('PATCH /mod?')) {
      return reply(503, '{"error":"not_applied","detail":"the store takes no writes"}')
    }
    return plain-- > 0
      ? reply(503, '{"error":"unavailable","detail":"the commit failed"}')
      : reply(409, '{"error":"hold_ended","detail":"the hold has ended"}')
  })
  const client = new AccManClient({ url: fake.url, retries: 0 })
  const { stranded, strand } = recorder()
  const owed = new Owed(client, strand, quiet)
  try {
    owed.add(new Settle('c', 7n, 2n, 5n, 'r1'), new E.NotApplied('the store takes no writes'))
    while (!fake.heads.some((h) => h.startsWith('PATCH /mod?'))) {
      await new Promise((resolve) => setTimeout(resolve, 10))
    }
    await owed.close(0)
  } finally {
    await client.close()
    await fake.close()
  }
  assert.ok(fake.heads.some((h) => h.startsWith('PATCH /mod?') && h.includes('key=r1-c')))
  assert.deepEqual(stranded, [['hold 7', 'shutting down', true]])
})

// setTimeout waits 1 ms for what it cannot take (a string is coerced, a
// delay past 2^31 - 1 ms or below 0 is 1 ms): drain() would answer false
// at once, as if calls were still owed, rather than say what was wrong.
test('drain() refuses a timeout that is no whole number of ms a timer can wait', async () => {
  const owed = new Owed(null, () => {}, quiet)
  for (const bad of ['5000', -1, 1.5, 2 ** 31, null, NaN]) {
    await assert.rejects(owed.drain(bad),
      (err) => err instanceof TypeError && /^timeoutMs must be an integer from 0 to 2147483647, not /.test(err.message),
      String(bad))
  }
  assert.equal(await owed.drain(0), true)
})
