'use strict'
// The client's calls per second against a plain fetch loop: the same GET
// /tot (and the client's durable PATCH /mod beside it) on the same real
// AccMan, in the same run, best of several rounds.
// `npm run bench:client [-- rounds]`.

const { AccManClient } = require('..')
const { AccManServer } = require('../test/helpers/accman')

const CALLS = 3000

async function rate (call, inFlight) {
  let next = 0
  const t0 = process.hrtime.bigint()
  async function worker () {
    while (next < CALLS) { next++; await call() }
  }
  await Promise.all(Array.from({ length: inFlight }, worker))
  return CALLS / (Number(process.hrtime.bigint() - t0) / 1e9)
}

async function main () {
  const rounds = Number(process.argv[2] || 5)
  const server = new AccManServer({ tokens: false })
  const url = await server.start()
  const acc = new AccManClient({ url })
  try {
    await acc.mod('bench-client', 1e12)
    const fetchTot = async () => {
      const r = await fetch(`${url}/tot?cred=bench-client`)
      if (r.status !== 200 || typeof (await r.json()).tot !== 'number') throw new Error('bad reply')
    }
    const clientTot = () => acc.tot('bench-client')
    const fetchMod = async () => {
      const r = await fetch(`${url}/mod?cred=bench-client&by=-1`, { method: 'PATCH' })
      if (r.status !== 200) throw new Error('bad reply')
      await r.json()
    }
    const clientMod = () => acc.mod('bench-client', -1)
    console.log(`node ${process.version}, ${CALLS} calls a round, best of ${rounds} rounds, same AccMan`)
    for (const [what, ours, theirs] of [['GET /tot', clientTot, fetchTot], ['PATCH /mod', clientMod, fetchMod]]) {
      for (const inFlight of [1, 64]) {
        let a = 0
        let b = 0
        for (let r = 0; r < rounds; r++) {
          b = Math.max(b, await rate(theirs, inFlight))
          a = Math.max(a, await rate(ours, inFlight))
        }
        console.log(`${what}, ${String(inFlight).padStart(2)} in flight: AccManClient ${Math.round(a)}/s, ` +
          `fetch ${Math.round(b)}/s: ${(a / b).toFixed(2)}x fetch`)
      }
    }
  } finally {
    await acc.close()
    await server.close()
  }
}

main().catch((e) => { console.error(e); process.exit(1) })
