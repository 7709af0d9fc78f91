'use strict'
// Which transport the client is built on: the same GET /tot against the same
// real AccMan, in the same run, through undici's Pool (pipelining 1 and 10),
// node:http with a keep-alive Agent, and plain fetch.  Prints calls per
// second and each against fetch.  `node bench/transport.js [rounds]`.

const http = require('node:http')
const { Pool } = require('undici')
const { AccManServer } = require('../test/helpers/accman')

const CALLS = 2000
const CONCURRENT = 64

async function run (name, call, inFlight) {
  const t0 = process.hrtime.bigint()
  let next = 0
  async function worker () {
    while (next < CALLS) { next++; await call() }
  }
  await Promise.all(Array.from({ length: inFlight }, worker))
  const s = Number(process.hrtime.bigint() - t0) / 1e9
  return CALLS / s
}

async function main () {
  const rounds = Number(process.argv[2] || 5)
  const server = new AccManServer({ tokens: false })
  const url = await server.start()
  try {
    const u = new URL(url)
    const cred = 'bench-transport'
    await fetch(`${url}/mod?cred=${cred}&by=1000`, { method: 'PATCH' })
    const path = `/tot?cred=${cred}`
    const pool1 = new Pool(url, { connections: 8, pipelining: 1 })
    const pool10 = new Pool(url, { connections: 8, pipelining: 10 })
    const agent = new http.Agent({ keepAlive: true, maxSockets: 8 })
    const viaPool = (pool) => async () => {
      const r = await pool.request({ path, method: 'GET' })
      JSON.parse(await r.body.text())
    }
    const viaHttp = () => new Promise((resolve, reject) => {
      const req = http.request({ host: u.hostname, port: u.port, path, agent }, (res) => {
        let body = ''
        res.setEncoding('utf8')
        res.on('data', (d) => { body += d })
        res.on('end', () => { JSON.parse(body); resolve() })
      })
      req.on('error', reject)
      req.end()
    })
    const viaFetch = async () => { await (await fetch(url + path)).json() }
    const kinds = [['fetch', viaFetch], ['node:http Agent', viaHttp],
      ['undici Pool', viaPool(pool1)], ['undici Pool pipelining 10', viaPool(pool10)]]
    for (const inFlight of [1, CONCURRENT]) {
      const best = {}
      for (let r = 0; r < rounds; r++) {
        for (const [name, call] of kinds) {
          const rate = await run(name, call, inFlight)
          best[name] = Math.max(best[name] || 0, rate)
        }
      }
      console.log(`\n${CALLS} GET /tot, ${inFlight} in flight, best of ${rounds} rounds:`)
      for (const [name] of kinds) {
        console.log(`  ${name.padEnd(28)} ${Math.round(best[name]).toString().padStart(7)} calls/s` +
          `  ${(best[name] / best.fetch).toFixed(2)}x fetch`)
      }
    }
    await pool1.close(); await pool10.close(); agent.destroy()
  } finally {
    await server.close()
  }
}

main().catch((e) => { console.error(e); process.exit(1) })
