'use strict'
// The owed queue's stranding: a call an attempt of which may have landed is
// stranded of unknown outcome however it is stranded, so that onUnpaid
// never bills a charge that landed.  Against a fake AccMan (a proxy's 404).

const test = require('node:test')
const assert = require('node:assert/strict')
const { AccManClient } = require('..')
const E = require('../src/errors')
const { Owed, Charge } = require('../src/owed')
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
