'use strict'
// The tests' own PostgreSQL servers (helpers/pg.js): one that a test kills
// leaves nothing behind it outside its directory, which destroy() removes,
// but the System V segment that destroy() removes too.

const test = require('node:test')
const assert = require('node:assert/strict')
const fs = require('node:fs')
const path = require('node:path')
const os = require('node:os')
const { PgCluster, lockFileSegment } = require('./helpers/pg')

// The ids of the System V segments that /proc lists.
const shmIds = () => fs.readFileSync('/proc/sysvipc/shm', 'utf8').trim().split('\n').slice(1)
  .map((row) => Number(row.trim().split(/\s+/)[1]))

test('a killed server keeps its shared memory in its own directory, removed with it',
  async () => {
    const pg = await PgCluster.create()
    let segment = null
    try {
      await pg.kill()
      const segments = fs.readdirSync(path.join(pg.data, 'pg_dynshmem'))
      assert.ok(segments.length > 0 && segments.every((name) => name.startsWith('mmap.')),
        `pg_dynshmem holds ${JSON.stringify(segments)}`)
      // The small System V segment a killed postmaster leaves too: the
      // id on its lock file's seventh line.
      const line = fs.readFileSync(path.join(pg.data, 'postmaster.pid'), 'utf8').split('\n')[6]
      segment = Number(line.trim().split(/\s+/)[1])
      assert.ok(shmIds().includes(segment), `${segment} not listed`)
    } finally {
      pg.destroy()
    }
    assert.equal(fs.existsSync(pg.base), false)
    assert.ok(!shmIds().includes(segment), `${segment} left`)
  })

// PostgreSQL writes the segment's key, a C int, as an unsigned long: a
// negative key (its data directory's inode past 2^31) as 20 digits, past
// a Number's exact range.  Read as its 32 bits, as /proc's signed key is.
test('a lock file\'s key written as a 20-digit unsigned long is read as its 32 bits', () => {
  const data = fs.mkdtempSync(path.join(os.tmpdir(), 'accman-lockfile-'))
  try {
    const lines = ['99999', data, '1', '5432', '/tmp', '127.0.0.1',
      '18446744071562071615  13172779', 'ready']
    fs.writeFileSync(path.join(data, 'postmaster.pid'), lines.join('\n') + '\n')
    assert.deepEqual(lockFileSegment(data), [-2147480001 >>> 0, 13172779])
  } finally {
    fs.rmSync(data, { recursive: true, force: true })
  }
})
