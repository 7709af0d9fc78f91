'use strict'
// The tests' own PostgreSQL servers (helpers/pg.js): one that a test kills
// leaves nothing behind it outside its directory, which destroy() removes.

const test = require('node:test')
const assert = require('node:assert/strict')
const fs = require('node:fs')
const path = require('node:path')
const { PgCluster } = require('./helpers/pg')

test('a killed server keeps its shared memory in its own directory, removed with it',
  async () => {
    const pg = await PgCluster.create()
    try {
      await pg.kill()
      const segments = fs.readdirSync(path.join(pg.data, 'pg_dynshmem'))
      assert.ok(segments.length > 0 && segments.every((name) => name.startsWith('mmap.')),
        `pg_dynshmem holds ${JSON.stringify(segments)}`)
    } finally {
      pg.destroy()
    }
    assert.equal(fs.existsSync(pg.base), false)
  })
