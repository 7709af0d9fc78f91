'use strict'
// The plugin's overhead per request: the same fastify route with and
// without it, loaded by autocannon in the same run, beside the AccMan round
// trips measured by the client in that run.  Each service runs in its own
// process; AccMan in another.  `npm run bench:plugin [-- seconds]`.

const path = require('node:path')
const { spawn } = require('node:child_process')
const autocannon = require('autocannon')
const { AccManClient, UnexpectedReply } = require('..')
const { AccManServer } = require('../test/helpers/accman')

const CRED = 'bench-plugin'

function startApp (variant, accmanUrl) {
  const child = spawn(process.execPath, [path.join(__dirname, 'plugin-app.js'), variant, accmanUrl],
    { stdio: ['ignore', 'pipe', 'inherit'] })
  return new Promise((resolve, reject) => {
    child.stdout.once('data', (d) => resolve({ url: String(d).trim(), child }))
    child.once('exit', (code) => reject(new Error(`${variant} exited with ${code}`)))
  })
}

function load (url, connections, seconds) {
  return autocannon({ url: url + '/w', connections, duration: seconds, headers: { accman: CRED } })
}

async function roundTrips (acc, n) {
  const times = { tot: [], mod: [] }
  for (let i = 0; i < n; i++) {
    let t0 = process.hrtime.bigint()
    await acc.tot(CRED)
    times.tot.push(Number(process.hrtime.bigint() - t0) / 1e3)
    t0 = process.hrtime.bigint()
    await acc.mod(CRED, -1, { key: `rt-${process.pid}-${i}` })
    times.mod.push(Number(process.hrtime.bigint() - t0) / 1e3)
  }
  const median = (a) => a.sort((x, y) => x - y)[a.length >> 1]
  return { tot: median(times.tot), mod: median(times.mod) }
}

async function main () {
  const seconds = Number(process.argv[2] || 5)
  const server = new AccManServer({ tokens: false })
  await server.start()
  const acc = new AccManClient({ url: server.url })
  const variants = ['bare', 'one-mod', 'check', 'check-fresh0']
  try {
    await acc.mod(CRED, 1e15)
    try {
      const h = await acc.hold(CRED, -1, { ttlS: 60 })
      await acc.settle(CRED, h.hold, 0)
      variants.push('reserve')
    } catch (err) {
      if (!(err instanceof UnexpectedReply)) throw err
      console.log('reserve mode not measured: this AccMan has no PATCH /hold yet')
    }
    const rt = await roundTrips(acc, 500)
    console.log(`node ${process.version}; AccManClient round trips, median of 500: ` +
      `tot ${rt.tot.toFixed(0)} µs, durable mod ${rt.mod.toFixed(0)} µs`)
    const results = {}
    for (const connections of [1, 16]) {
      for (const variant of variants) {
        const { url, child } = await startApp(variant, server.url)
        try {
          await load(url, connections, 1) // warm-up
          const r = await load(url, connections, seconds)
          if (r.non2xx || r.errors) throw new Error(`${variant}: ${r.non2xx} non-2xx, ${r.errors} errors`)
          results[`${variant}/${connections}`] = r
        } finally {
          child.kill('SIGTERM')
        }
      }
      // Time per request from the throughput (autocannon's latencies are
      // whole milliseconds); with one connection it is the latency.
      const us = (v) => connections * 1e6 / results[`${v}/${connections}`].requests.average
      console.log(`\n${connections} connection(s), ${seconds} s each:`)
      for (const variant of variants) {
        const r = results[`${variant}/${connections}`]
        console.log(`  ${variant.padEnd(13)} ${Math.round(r.requests.average).toString().padStart(6)} req/s, ` +
          `${us(variant).toFixed(0).padStart(5)} µs a request, p99 ${r.latency.p99} ms` +
          (variant === 'bare' ? '' : `; adds ${(us(variant) - us('bare')).toFixed(0)} µs to bare, ` +
          `${((us(variant) - us('bare')) / (us('one-mod') - us('bare'))).toFixed(2)}x what one-mod adds`))
      }
    }
  } finally {
    await acc.close()
    await server.close()
  }
}

main().catch((e) => { console.error(e); process.exit(1) })
