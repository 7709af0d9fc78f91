'use strict'
// The example service as a user runs it: `node examples/server.js` beside a
// running AccMan (no tokens, loopback), then curl-like requests.

const test = require('node:test')
const assert = require('node:assert/strict')
const path = require('node:path')
const { spawn } = require('node:child_process')
const { AccManClient } = require('..')
const { AccManServer } = require('./helpers/accman')

test('the example charges a report by its rows and sets the header', async (t) => {
  const server = new AccManServer({ tokens: false })
  await server.start()
  t.after(() => server.close())
  const acc = new AccManClient({ url: server.url })
  t.after(() => acc.close())
  await acc.mod('example-user', 100)
  const child = spawn(process.execPath, [path.join(__dirname, '..', 'examples', 'server.js')], {
    env: { ...process.env, ACCMAN_URL: server.url, PORT: '0', LOG_LEVEL: 'info' },
    stdio: ['ignore', 'pipe', 'inherit']
  })
  t.after(() => child.kill('SIGTERM'))
  const url = await new Promise((resolve, reject) => {
    let out = ''
    child.stdout.on('data', (d) => {
      out += d
      const m = /Server listening at (http:\/\/127\.0\.0\.1:\d+)/.exec(out)
      if (m) resolve(m[1])
    })
    child.on('exit', (code) => reject(new Error(`the example exited with ${code}`)))
  })
  const weather = await fetch(url + '/weather', { headers: { accman: 'example-user' } })
  assert.equal(weather.headers.get('accman'), '99')
  const report = await fetch(url + '/report?rows=42', { headers: { accman: 'example-user' } })
  assert.equal(report.status, 200)
  assert.equal(report.headers.get('accman'), '94')
  assert.equal((await fetch(url + '/status')).status, 200)
  assert.match(await (await fetch(url + '/metrics')).text(), /accman_plugin_charged_total 2/)
})
