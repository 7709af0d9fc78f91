'use strict'
// The pure core: values checked before sending, replies decoded strictly
// with exact integers, errors typed by status and code.  No I/O.

const test = require('node:test')
const assert = require('node:assert/strict')
const v = require('../src/values')
const E = require('../src/errors')
const { INT64_MAX, INT64_MIN, CRED_CHARS_MAX, KEY_CHARS_MAX, PAST_LIMIT_MAX, HOLD_TTL_S_MAX } = require('../src/limits')

test('targets carry exactly the SPEC parameters', () => {
  assert.equal(v.targetTot('alice'), '/tot?cred=alice')
  assert.equal(v.targetMod('a', -3, 0, 'k-1'), '/mod?cred=a&by=-3&min=0&key=k-1')
  assert.equal(v.targetMod('a', 5n), '/mod?cred=a&by=5')
  assert.equal(v.targetPast('a', 10, 7), '/past?cred=a&limit=10&before=7')
  assert.equal(v.targetHold('a', -10, 60, 0, 'h'), '/hold?cred=a&by=-10&ttl=60&min=0&key=h')
  assert.equal(v.targetSettle('a', 4, 0), '/settle?cred=a&hold=4&use=0')
  assert.equal(v.targetMod('a', INT64_MIN), `/mod?cred=a&by=${INT64_MIN}`)
  assert.equal(v.targetHold('a', -INT64_MAX, 60), `/hold?cred=a&by=${-INT64_MAX}&ttl=60`)
  // A hold of -2^63 would give back 2^63 at its end: refused before it is sent.
  assert.throws(() => v.targetHold('a', INT64_MIN, 60), E.BadRequest)
})

test('a credential or key outside the SPEC alphabet or length is refused, never echoed', () => {
  for (const bad of ['', 'a b', 'a%20b', 'é', 'a&by=5', 'x'.repeat(CRED_CHARS_MAX + 1)]) {
    assert.throws(() => v.targetTot(bad), (e) => e instanceof E.BadRequest && !e.message.includes(bad || '\u0000'))
  }
  assert.doesNotThrow(() => v.targetTot('x'.repeat(CRED_CHARS_MAX)))
  assert.throws(() => v.targetMod('a', -1, null, 'k'.repeat(KEY_CHARS_MAX + 1)), E.BadRequest)
  assert.doesNotThrow(() => v.targetMod('a', -1, null, 'k'.repeat(KEY_CHARS_MAX)))
  assert.throws(() => v.targetTot(5), TypeError)
})

test('a value left out is missing, a wrong one is named by its type, never by its contents', () => {
  assert.throws(() => v.targetHold('a', -10), { name: 'TypeError', message: 'ttlS is missing: an integer (a safe-integer number or a bigint)' })
  assert.throws(() => v.targetSettle('a', 3), { name: 'TypeError', message: 'use is missing: an integer (a safe-integer number or a bigint)' })
  assert.throws(() => v.targetTot(), { name: 'TypeError', message: 'cred is missing: a string' })
  assert.throws(() => v.targetMod('a', 1.5), { message: 'by must be an integer (a safe-integer number or a bigint), not 1.5' })
  assert.throws(() => v.targetMod('a', '5'), { message: 'by must be an integer (a safe-integer number or a bigint), not a string' })
  assert.throws(() => v.targetMod('a', null), { message: 'by must be an integer (a safe-integer number or a bigint), not null' })
  assert.throws(() => v.targetTot(12345), { message: 'cred must be a string, not a number' }) // a credential is never shown
  assert.throws(() => v.targetMod('a', -1, null, {}), { message: 'key must be a string, not an object' })
})

test('amounts are integers in int64: no floats, no unsafe numbers, no zero by', () => {
  assert.throws(() => v.targetMod('a', 0), /by must not be 0/)
  assert.throws(() => v.targetMod('a', 0n), /by must not be 0/)
  assert.throws(() => v.targetMod('a', 1.5), TypeError)
  assert.throws(() => v.targetMod('a', 2 ** 53), TypeError) // not a safe integer: would be rounded
  assert.throws(() => v.targetMod('a', '5'), TypeError)
  assert.throws(() => v.targetMod('a', INT64_MAX + 1n), E.BadRequest)
  assert.throws(() => v.targetMod('a', -1, INT64_MIN - 1n), E.BadRequest)
  assert.throws(() => v.targetPast('a', PAST_LIMIT_MAX + 1), E.BadRequest)
  assert.throws(() => v.targetPast('a', 0), E.BadRequest)
  assert.throws(() => v.targetHold('a', 10, 60), /must be negative/)
  assert.throws(() => v.targetHold('a', -10, HOLD_TTL_S_MAX + 1), E.BadRequest)
  assert.throws(() => v.targetHold('a', -10, 0), E.BadRequest)
  assert.throws(() => v.targetSettle('a', 1, -1), E.BadRequest)
})

test('replies decode with exact integers, as numbers or bigints', () => {
  assert.equal(v.decodeTot(200, '{"tot":-7}', false), -7)
  assert.equal(v.decodeTot(200, '{"tot":9223372036854775807}', true), INT64_MAX)
  assert.deepEqual(v.decodeMod(200, '{"tot":5,"seq":2}', false), { tot: 5, seq: 2 })
  assert.deepEqual(v.decodeMod(200, '{ "seq": 2, "tot": 5 }', false), { tot: 5, seq: 2 })
  assert.deepEqual(v.decodeHold(200, '{"hold":3,"tot":90,"seq":3}', true), { hold: 3n, tot: 90n, seq: 3n })
  const page = v.decodePast(200, '{"account":"ab","past":[{"seq":2,"by":-1,"tot":4,"at":9,"key":"7","hold":null},' +
    '{"seq":1,"by":5,"tot":5,"at":8,"key":null}],"next":null}', false)
  assert.deepEqual(page, {
    account: 'ab',
    past: [{ seq: 2, by: -1, tot: 4, at: 9, key: '7', hold: null }, { seq: 1, by: 5, tot: 5, at: 8, key: null, hold: null }],
    next: null
  })
})

test('a balance past 2^53 is never rounded: Unrepresentable with the exact reply, or a bigint', () => {
  const body = '{"tot":9007199254740993,"seq":4}'
  assert.throws(() => v.decodeMod(200, body, false),
    (e) => e instanceof E.Unrepresentable && e.reply.tot === 9007199254740993n && e.status === 200)
  assert.deepEqual(v.decodeMod(200, body, true), { tot: 9007199254740993n, seq: 4n })
})

test('replies outside the SPEC shapes are BadReply (an unknown outcome)', () => {
  for (const body of ['', '[]', '{"tot":"5"}', '{"tot":5.5}', '{"tot":1e3}', '{"tot":99999999999999999999}']) {
    assert.throws(() => v.decodeTot(200, body, false), E.BadReply, body)
  }
  assert.throws(() => v.decodeMod(200, '{"tot":5}', false), E.BadReply)
  assert.throws(() => v.decodePast(200, '{"past":[{"seq":1}],"next":null}', false), E.BadReply)
  assert.throws(() => v.decodePast(200, '{"past":[],"next":"x"}', false), E.BadReply)
  assert.throws(() => v.decodeMod(409, '{"error":"insufficient"}', false), E.BadReply)
  assert.ok(new E.BadReply('x') instanceof E.OutcomeUnknown)
})

test('numbers outside the SPEC ranges are BadReply, on the fast path as on the JSON one', () => {
  // Every number is signed 64-bit; seqs and holds count from 1; `at` is unix ms.
  for (const bigint of [false, true]) {
    for (const body of ['{"tot":9223372036854775808}', '{"tot":-9223372036854775809}',
      '{"tot":9999999999999999999}', '{ "tot": 9999999999999999999 }']) {
      assert.throws(() => v.decodeTot(200, body, bigint), E.BadReply, body)
    }
    for (const body of ['{"tot":5,"seq":9223372036854775808}', '{"tot":5,"seq":0}', '{"tot":5,"seq":-1}',
      '{"tot":-9999999999999999999,"seq":1}', '{ "tot": 5, "seq": 0 }']) {
      assert.throws(() => v.decodeMod(200, body, bigint), E.BadReply, body)
    }
    for (const body of ['{"hold":0,"tot":2,"seq":3}', '{"hold":3,"tot":2,"seq":0}',
      '{"hold":9223372036854775808,"tot":2,"seq":3}']) {
      assert.throws(() => v.decodeHold(200, body, bigint), E.BadReply, body)
    }
  }
})

test('a /past page not newest first, or whose next skips or repeats, is BadReply', () => {
  const entry = (seq, more = '') => `{"seq":${seq},"by":-1,"tot":4,"at":9,"key":null${more}}`
  const bad = [
    [[entry(2), entry(3)], 'null'], [[entry(2), entry(2)], 'null'], [[entry(3), entry(2)], '1'],
    [[entry(3), entry(2)], '3'], [[], '2'], [[entry(0)], 'null'], [[entry(1, ',"hold":0')], 'null'],
    [['{"seq":1,"by":-1,"tot":4,"at":-1,"key":null}'], 'null']
  ]
  for (const [past, next] of bad) {
    const body = `{"account":"ab","past":[${past.join(',')}],"next":${next}}`
    assert.throws(() => v.decodePast(200, body, false), E.BadReply, body)
  }
  const good = `{"account":"ab","past":[${entry(9)},${entry(5, ',"hold":3')}],"next":5}`
  assert.deepEqual(v.decodePast(200, good, true).past.map((e) => e.seq), [9n, 5n])
})

test('error replies become the SPEC\'s typed errors', () => {
  const cases = [
    [409, '{"error":"insufficient","tot":4,"detail":"d"}', E.Insufficient],
    [409, '{"error":"key_reused","detail":"d"}', E.KeyReused],
    [409, '{"error":"overflow","detail":"d"}', E.Overflow],
    [409, '{"error":"hold_ended","detail":"d"}', E.HoldEnded],
    [409, '{"error":"too_many_holds","detail":"d"}', E.TooManyHolds],
    [404, '{"error":"no_account","detail":"d"}', E.NoAccount],
    [404, '{"error":"no_hold","detail":"d"}', E.NoHold],
    [404, '{"error":"not_found","detail":"d"}', E.UnexpectedReply],
    [401, '{"error":"unauthorized","detail":"d"}', E.Unauthorized],
    [403, '{"error":"forbidden","detail":"d"}', E.Forbidden],
    [400, '{"error":"bad_request","detail":"d"}', E.BadRequest],
    [503, '{"error":"busy","detail":"d"}', E.Busy],
    [503, '{"error":"unavailable","detail":"d"}', E.Unavailable],
    [502, 'Bad Gateway', E.OutcomeUnknown],
    [405, '{"error":"method_not_allowed"}', E.UnexpectedReply]
  ]
  for (const [status, body, cls] of cases) {
    assert.throws(() => v.decodeMod(status, body, false), (e) => e instanceof cls && e.status === status, body)
  }
  assert.throws(() => v.decodeMod(409, '{"error":"insufficient","detail":"\\"tot\\":7","tot":4}', false),
    (e) => e.tot === 4 && e.detail === '"tot":7')
  assert.ok(new E.Unreachable('x') instanceof E.Unavailable)
  assert.ok(!(new E.OutcomeUnknown('x') instanceof E.Unavailable))
})
