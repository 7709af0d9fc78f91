// Compiled by `npm test` (tsc): the public types as a user writes against
// them.  The @ts-expect-error lines must stay errors.
import Fastify from 'fastify'
import accman, {
  AccManClient, Insufficient, NotApplied, OutcomeUnknown, ShuttingDown, Unavailable, fingerprint
} from '../..'

async function main (): Promise<void> {
  const app = Fastify()
  await app.register(accman, {
    url: 'http://127.0.0.1:8080',
    token: 'service-token-0123456789',
    cost: 1,
    mode: 'reserve',
    onUnavailable: 'closed',
    exempt: ['/health', '/docs/*'],
    onUnpaid: (cred: string, amount: bigint) => { console.log(fingerprint(cred), amount) }
  })
  app.get('/report', {
    config: { accman: (request, reply, stage) => stage === 'estimate' ? 10 : Number(reply.getHeader('x-rows')) }
  }, async (request) => ({ held: request.accman?.estimate }))
  app.get('/free', { config: { accman: false } }, async () => 'free')
  const stats: Record<string, number> = app.accman.stats
  console.log(stats, app.accman.metrics())

  const acc = new AccManClient({ url: 'http://127.0.0.1:8080' })
  const tot: number = await acc.tot('alice')
  const { seq } = await acc.mod('alice', -3, { min: 0, key: 'req-1' })
  const n: number = seq + tot
  const big = new AccManClient({ url: 'http://127.0.0.1:8080', bigint: true })
  const exact: bigint = await big.tot('alice')
  const h = await big.hold('alice', -10n, { ttlS: 60 })
  await big.settle('alice', h.hold, 3n)
  const page = await acc.past('alice', { limit: 10 })
  const keys: Array<string | null> = page.past.map((e) => e.key)
  try {
    await acc.mod('alice', -3)
  } catch (err) {
    if (err instanceof Insufficient) console.log(err.tot, err.code, err.status)
    if (err instanceof OutcomeUnknown) console.log('unknown outcome', err.detail)
    if (err instanceof NotApplied) {
      const plain: Unavailable = err // refused before applying: send it again
      console.log(err instanceof ShuttingDown, plain.code)
    }
  }
  const pinned = new AccManClient({ url: 'https://accman.internal:8443', ca: [Buffer.from('PEM'), 'PEM'] })
  await app.register(accman, { url: 'https://accman.internal:8443', ca: 'PEM' })
  // @ts-expect-error ca is PEM text, not a path's number or a flag
  new AccManClient({ url: 'https://accman.internal:8443', ca: true })
  const shared = Fastify()
  await shared.register(accman, { client: big, cost: 2 })
  // @ts-expect-error a shared client's settings are its own, not the plugin's
  await shared.register(accman, { client: big, url: 'http://127.0.0.1:8080' })
  // @ts-expect-error a shared client's trust is its own too
  await shared.register(accman, { client: big, ca: 'PEM' })
  // @ts-expect-error a bigint client's tot is not a number
  const wrong: number = await big.tot('alice')
  // @ts-expect-error hold needs its ttlS
  await acc.hold('alice', -1, {})
  console.log(n, exact, keys, wrong, pinned)
}

void main()
