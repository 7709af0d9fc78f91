'use strict'
// The bank checker's judgment through the calling side (bank.test.js runs
// the load and the faults; this module judges what they left), as
// tests/reliability/bankcheck.py judges the server's.  It reconciles, for
// each account, what every consumer got from the service, the service's
// log and stats, and AccMan's history, by the keys the plugin gives its
// calls (`<rid>-c` a charge, `<rid>-h` a hold, README "Modes"), and
// returns what does not add up, each a sentence: none when the books balance.
//
// A record is one request as its consumer saw it and the service knew it:
// `{ id, cred, status, accman, cost, rid }`: `accman` the ACCMAN response
// header or null, `cost` what the route charges for a 2xx (0 for anything
// else, nothing being charged for it), `rid` the plugin's request id, null
// when admission refused the request (its part is then only what the log
// says of it).  An account is `{ cred, funding, entries, tot }`: what it was
// funded with, its whole history (newest first, as /past gives it) and its
// balance read after the service closed.  `holds` (key -> codes) is what
// each attempt of the plugin's holds met, attempt by attempt, as
// helpers/bankrun.js records it: a reply's status (a 503's error code), or
// the client's code for an attempt with no reply.

const { fingerprint } = require('../..')

const OWED_RE = /^accman: (charge|settle|release) queued to retry$/
const STRANDED_RE = /^accman: stranded (charge|settle|release)/
const TOP_UP_RE = /^top-\d+-\d+$/
// The client's codes for an attempt sent that got no reply: it may still
// be on its way, held by a stalled front-end, and apply later.
const NO_REPLY_CODES = ['timeout', 'outcome_unknown']

// What the service's log says of owed calls: the keys of those queued, and
// of those stranded (`unknown`: of unknown outcome, look for the key), each
// under its account's fingerprint (a hold's id is the account's own).
function owedOf (logs) {
  const queued = new Map()
  const stranded = new Map()
  for (const l of logs) {
    if (typeof l.msg !== 'string') continue
    if (OWED_RE.test(l.msg)) queued.set(`${l.account} ${l.key}`, l)
    const m = STRANDED_RE.exec(l.msg)
    if (m) {
      stranded.set(`${l.account} ${l.key}`, {
        what: m[1], amount: BigInt(l.amount), unknown: l.msg.includes('outcome unknown')
      })
    }
  }
  const queuedCount = logs.filter((l) => OWED_RE.test(l.msg)).length
  const strandedCount = logs.filter((l) => STRANDED_RE.test(l.msg)).length
  return { queued, stranded, queuedCount, strandedCount }
}

// An account's history by kind: the funding mods (its first, keyless, and
// the top-ups, keyed `top-<request id>`: helpers/bankrun.js); the charges,
// by key; the holds, by id (their start and their ends) and by key;
// anything else is of no kind the plugin or the funder makes.
function ledgerOf (entries) {
  const ledger = { funding: 0n, charges: new Map(), holds: new Map(), holdKeys: new Map(), odd: [] }
  const add = (map, k, v) => map.set(k, (map.get(k) || []).concat([v]))
  for (const e of [...entries].reverse()) {
    const by = BigInt(e.by)
    if (e.hold === null && (e.key === null || TOP_UP_RE.test(e.key)) && by > 0n) {
      ledger.funding += by
    } else if (e.hold === null && by < 0n && /-c$/.test(e.key || '')) {
      add(ledger.charges, e.key, e)
    } else if (e.hold !== null && by < 0n && /-h$/.test(e.key || '')) {
      ledger.holds.set(e.hold, { start: e, ends: [] })
      add(ledger.holdKeys, e.key, e)
    } else if (e.hold !== null && by >= 0n && ledger.holds.has(e.hold)) {
      ledger.holds.get(e.hold).ends.push(e)
    } else {
      ledger.odd.push(e)
    }
  }
  return ledger
}

// What the history charged request `rid`: its keyed charge, plus what its
// hold kept (the hold's amount less what its end gave back).  `entry` is
// the entry whose tot the response's header must show; `open` what a hold
// not yet ended still holds; `count` the charges and holds it has.
function chargedOf (ledger, rid) {
  const charges = ledger.charges.get(rid + '-c') || []
  const holds = ledger.holdKeys.get(rid + '-h') || []
  let amount = 0n
  let open = 0n
  let entry = null
  const problems = []
  for (const c of charges) {
    amount -= BigInt(c.by)
    entry = c
  }
  for (const h of holds) {
    const { ends } = ledger.holds.get(h.hold)
    const held = -BigInt(h.by)
    if (ends.length > 1) problems.push(`hold ${h.hold} has ${ends.length} ends`)
    if (ends.length === 0) {
      open += held
      continue
    }
    amount += held - BigInt(ends[0].by)
    if (entry === null) entry = ends[0]
  }
  if (charges.length > 1) problems.push(`${charges.length} charges keyed ${rid}-c`)
  if (holds.length > 1) problems.push(`${holds.length} holds keyed ${rid}-h`)
  return { amount, open, entry, holds, problems }
}

// The keys under which the log may name request `rid`'s owed calls, with
// its account's fingerprint (owedOf).
function keysOf (fp, rid, charged) {
  return [rid + '-c', rid + '-h'].concat(charged.holds.map((h) => `hold ${h.hold}`))
    .map((k) => `${fp} ${k}`)
}

// Whether request `rid`'s hold, open in the history, is an attempt that
// applied after its owed release was done (README "Failures": a refused
// repeat cannot stop a first attempt still on its way; that hold returns
// at its expiry): the log queued the release, an attempt got no reply, and
// none answered 200, so the plugin never had the hold's id to settle.
function appliedLate (fp, rid, owed, holds) {
  const codes = holds.get(rid + '-h') || []
  return owed.queued.has(`${fp} ${rid}-h`) &&
    codes.some((c) => NO_REPLY_CODES.includes(c)) && !codes.includes(200)
}

// One request, as its consumer saw it, against its account's history and
// the log.  Returns what is wrong with it, and adds what it charged to `sum`.
function judgeRecord (r, ledger, owed, holds, sum) {
  const problems = []
  const say = (what) => problems.push(`request ${r.id} (${r.status}, ACCMAN ${r.accman}): ${what}`)
  const c = chargedOf(ledger, r.rid)
  for (const p of c.problems) say(p)
  sum.charged += c.amount
  sum.open += c.open
  const keys = keysOf(fingerprint(r.cred), r.rid, c)
  const stranded = keys.map((k) => owed.stranded.get(k)).find(Boolean)
  // A hold whose settle or release was stranded returns at its expiry, and
  // so does one that applied late.
  if (c.open > 0n && !stranded && !appliedLate(fingerprint(r.cred), r.rid, owed, holds)) {
    const attempts = holds.get(r.rid + '-h')
    say(`a hold of ${c.open} never ended, and no stranded call names it ` +
      `(its attempts met ${attempts ? attempts.join(', ') : 'nothing recorded'})`)
  }
  if (stranded && stranded.unknown && c.amount > 0n) sum.unknownLanded += c.amount
  if (r.status === 'left') {
    // The consumer left: charged if its charge had begun, at most once.
    if (c.amount !== 0n && c.amount !== BigInt(r.cost)) say(`left, and charged ${c.amount}`)
    return problems
  }
  const paid = r.status >= 200 && r.status < 300
  if (!paid) {
    if (c.amount !== 0n) say(`not served, yet charged ${c.amount}`)
    return problems
  }
  if (r.accman !== null) {
    if (c.amount !== BigInt(r.cost)) say(`served as paid for ${r.cost}, charged ${c.amount}`)
    else if (c.entry !== null && String(c.entry.tot) !== r.accman) {
      say(`its header is not the balance its charge left (${c.entry.tot})`)
    }
    return problems
  }
  // Served without the header: a charge or settle still owed (README
  // "Failures"), which the log names as it is queued.
  if (!keys.some((k) => owed.queued.has(k))) {
    say('served without the balance header, and the log names no owed call of it')
  } else if (stranded && !stranded.unknown) {
    if (c.amount !== 0n) say(`stranded as never landed, yet charged ${c.amount}`)
  } else if (stranded) {
    if (c.amount !== 0n && c.amount !== BigInt(r.cost)) say(`stranded unknown, charged ${c.amount}`)
  } else if (c.amount !== BigInt(r.cost)) {
    say(`owed ${r.cost}, which landed as ${c.amount}`)
  }
  return problems
}

// The charges and holds in the history that no request accounts for: a
// charge needs a request that was served; a hold, a request, or the owed
// release of a hold of unknown outcome (README "Failures"), which moves
// nothing in the end.
function judgeOrphans (fp, ledger, rids, owed, sum) {
  const problems = []
  for (const [key, list] of ledger.charges) {
    if (!rids.has(key.slice(0, -2))) problems.push(`charge ${key} (${list[0].by}) of no request`)
  }
  for (const [key, list] of ledger.holdKeys) {
    const rid = key.slice(0, -2)
    if (rids.has(rid)) continue
    const c = chargedOf(ledger, rid)
    sum.open += c.open
    if (!owed.queued.has(`${fp} ${key}`)) problems.push(`hold ${key} (${list[0].by}) of no request`)
    else if (c.amount !== 0n) problems.push(`the released hold ${key} kept ${c.amount}`)
  }
  return problems
}

// Reserve mode never overdraws: every entry that lowers the balance under
// 0 is the charge of a hold that expired first (a keyed mod without `min`,
// its request's hold in the history: README "Modes"), the one case the
// docs allow.  That charge excuses itself only: a hold (`min` 0) or any
// other charge that lowers the balance under 0, before or after it, is an
// overdraft.  The first such entry, or null.
function overdrawn (ledger, entries) {
  const expired = new Set()
  for (const [key, list] of ledger.charges) {
    if (ledger.holdKeys.has(key.slice(0, -2) + '-h')) for (const c of list) expired.add(c.seq)
  }
  const lowers = (e) => BigInt(e.tot) < 0n && BigInt(e.by) < 0n && !expired.has(e.seq)
  return [...entries].reverse().find(lowers) || null
}

// Each entry's tot is the tot before it plus its by, from the account's
// start at 0: a mod's tot is the balance right after it (SPEC "Durability
// and order"), and a hold, its settle and its expiry move the balance by
// their `by` too (the held amount out, what returns back: SPEC "Holds").
// The first entry that breaks the chain, with the tot it should have, or
// null.
function chainBreak (entries) {
  let tot = 0n
  for (const e of [...entries].reverse()) {
    const want = tot + BigInt(e.by)
    if (BigInt(e.tot) !== want) return { e, want }
    tot = want
  }
  return null
}

function judgeAccount (mode, account, records, owed, holds, sum) {
  const ledger = ledgerOf(account.entries)
  const at = `account ${account.cred}`
  const problems = []
  const broken = chainBreak(account.entries)
  if (broken) {
    const { e, want } = broken
    problems.push(`${at}: a tot that does not follow from the bys: entry ${e.seq} ` +
      `(by ${e.by}) has tot ${e.tot}, the tot before it plus its by is ${want}`)
  }
  if (ledger.funding !== BigInt(account.funding)) {
    problems.push(`${at}: funded ${account.funding}, the history says ${ledger.funding}`)
  }
  for (const e of ledger.odd) problems.push(`${at}: an entry of no kind: ${JSON.stringify(e)}`)
  const mine = { charged: 0n, open: 0n, unknownLanded: 0n }
  const rids = new Set()
  for (const r of records) {
    if (r.rid === null) continue
    rids.add(r.rid)
    problems.push(...judgeRecord(r, ledger, owed, holds, mine).map((p) => `${at}: ${p}`))
  }
  const orphans = judgeOrphans(fingerprint(account.cred), ledger, rids, owed, mine)
  problems.push(...orphans.map((p) => `${at}: ${p}`))
  const expected = ledger.funding - mine.charged - mine.open
  if (BigInt(account.tot) !== expected) {
    problems.push(`${at}: balance ${account.tot}, funding less charges less holds open is ${expected}`)
  }
  if (mode === 'reserve') {
    const low = overdrawn(ledger, account.entries)
    if (low) problems.push(`${at}: overdrawn in reserve mode: ${JSON.stringify(low)}`)
  }
  sum.charged += mine.charged
  sum.unknownLanded += mine.unknownLanded
  return problems
}

// The whole run: every account, then the service's stats against the log
// and the histories.  `statuses`: the statuses a consumer may get.
function judge ({ mode, accounts, records, logs, stats, statuses, holds = new Map() }) {
  const owed = owedOf(logs)
  const problems = []
  for (const r of records) {
    if (!statuses.includes(r.status)) problems.push(`request ${r.id}: status ${r.status}`)
  }
  const sum = { charged: 0n, unknownLanded: 0n }
  for (const account of accounts) {
    const mine = records.filter((r) => r.cred === account.cred)
    problems.push(...judgeAccount(mode, account, mine, owed, holds, sum))
  }
  if (stats.owed !== owed.queuedCount) {
    problems.push(`stats.owed ${stats.owed}, the log queued ${owed.queuedCount}`)
  }
  if (stats.stranded !== owed.strandedCount) {
    problems.push(`stats.stranded ${stats.stranded}, the log stranded ${owed.strandedCount}`)
  }
  // The stats count a charge once the plugin sees it land; one stranded of
  // unknown outcome that landed is in the history only.
  const seen = sum.charged - sum.unknownLanded
  if (BigInt(stats.charged_amount) !== seen) {
    problems.push(`stats.charged_amount ${stats.charged_amount}, the histories charged ${seen}`)
  }
  // A charge or settle stranded as never landed is owed by the account:
  // unpaid (onUnavailable 'closed' serves nothing else unpaid).
  let unpaid = 0n
  for (const s of owed.stranded.values()) if (!s.unknown && s.what !== 'release') unpaid += s.amount
  if (BigInt(stats.unpaid_amount) !== unpaid) {
    problems.push(`stats.unpaid_amount ${stats.unpaid_amount}, the log stranded ${unpaid} unpaid`)
  }
  return problems
}

module.exports = { judge, ledgerOf, owedOf }
