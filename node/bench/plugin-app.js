'use strict'
// The service the plugin benchmark loads: one JSON route, with the plugin
// in the mode given (`bare` registers no plugin; `one-mod` makes one
// AccMan call per request itself).  Prints its URL.
const Fastify = require('fastify')
const accman = require('..')

async function main () {
  const [variant, accmanUrl] = process.argv.slice(2)
  const app = Fastify({ logger: false })
  if (variant === 'one-mod') {
    // The peer: no plugin, the route itself makes one durable keyed mod, as
    // a check-mode charge does: one AccMan round trip per request.
    const acc = new accman.AccManClient({ url: accmanUrl })
    let n = 0
    app.addHook('onSend', async (request, reply) => {
      const r = await acc.mod(request.headers.accman, -1, { key: `peer-${process.pid}-${++n}` })
      reply.header('accman', String(r.tot))
    })
  } else if (variant !== 'bare') {
    await app.register(accman, {
      url: accmanUrl,
      mode: variant === 'reserve' ? 'reserve' : 'check',
      checkFreshMs: variant === 'check-fresh0' ? 0 : undefined
    })
  }
  app.get('/w', async () => ({ city: 'Lisbon', celsius: 21 }))
  console.log(await app.listen({ port: 0, host: '127.0.0.1' }))
}

main().catch((e) => { console.error(e); process.exit(1) })
