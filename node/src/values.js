'use strict'
// Requests and replies, with no I/O (h11's shape): values are checked
// before anything is sent, so nothing odd reaches the wire, and replies are
// decoded strictly into results or typed errors.
//
// Integers are exact.  AccMan's balances are signed 64-bit, past what a JS
// number holds exactly (2^53), so replies are decoded with integers kept as
// their digits and converted at the end: to numbers (the default, refused
// with Unrepresentable when one would lose precision) or to bigints.

const {
  CRED_CHARS_MAX, KEY_CHARS_MAX, INT64_MIN, INT64_MAX, PAST_LIMIT_MAX, HOLD_TTL_S_MAX
} = require('./limits')
const {
  BadRequest, BadReply, Unrepresentable, errorOfReply
} = require('./errors')

const NAME_RE = /^[A-Za-z0-9_-]+$/

// A credential or a key.  The value is never echoed: it may be a live
// credential.
function checkName (value, what, charsMax) {
  if (value === undefined) throw new TypeError(`${what} is missing: a string`)
  if (typeof value !== 'string') {
    throw new TypeError(`${what} must be a string, not ${typeName(value, false)}`)
  }
  if (value.length < 1 || value.length > charsMax || !NAME_RE.test(value)) {
    throw new BadRequest(`${what} must be 1 to ${charsMax} characters from A-Z a-z 0-9 _ -`)
  }
  return value
}

// What a wrong value was, for a message: its type, not its contents (a
// credential may be in it), but an amount's number as it is (1.5, 2 ** 53).
function typeName (value, number = true) {
  if (value === null) return 'null'
  if (typeof value === 'number' && number) return String(value)
  return `${/^[aeiou]/.test(typeof value) ? 'an' : 'a'} ${typeof value}`
}

// An integer (a safe-integer number or a bigint) in [lo, hi], as its decimal
// digits.  A required one left out is said to be missing.
function checkInt (value, what, lo = INT64_MIN, hi = INT64_MAX) {
  let big
  if (typeof value === 'bigint') {
    big = value
  } else if (typeof value === 'number' && Number.isSafeInteger(value)) {
    big = BigInt(value)
  } else if (value === undefined) {
    throw new TypeError(`${what} is missing: an integer (a safe-integer number or a bigint)`)
  } else {
    throw new TypeError(`${what} must be an integer (a safe-integer number or a bigint), ` +
      `not ${typeName(value)}`)
  }
  if (big < lo || big > hi) throw new BadRequest(`${what} must be between ${lo} and ${hi}`)
  return String(big)
}

function checkBy (by, what = 'by') {
  const s = checkInt(by, what)
  if (s === '0') throw new BadRequest(`${what} must not be 0`)
  return s
}

const cred = (c) => checkName(c, 'cred', CRED_CHARS_MAX)

function targetTot (c) {
  return '/tot?cred=' + cred(c)
}

function targetMod (c, by, min, key, low) {
  const amount = checkBy(by)
  let t = '/mod?cred=' + cred(c) + '&by=' + amount
  if (min !== undefined && min !== null) t += '&min=' + checkInt(min, 'min')
  if (key !== undefined && key !== null) t += '&key=' + checkName(key, 'key', KEY_CHARS_MAX)
  if (low !== undefined && low !== null) {
    const l = checkInt(low, 'low')
    if (amount[0] === '-') {
      throw new BadRequest('low is set by a funding mod only (by > 0), not by a charge')
    }
    t += '&low=' + l
  }
  return t
}

// A call's options: an object (or nothing) with no name but `names`, so
// that a misspelt one (`Key`, `ttl`) is refused rather than ignored (a mod
// meant to be keyed going out without its key).
function checkOptions (options, call, names) {
  if (options === undefined) return {}
  if (options === null || typeof options !== 'object' || Array.isArray(options)) {
    throw new TypeError(`the options of ${call} must be an object { ${names.join(', ')} }`)
  }
  const unknown = Object.keys(options).filter((name) => !names.includes(name))
  if (unknown.length) {
    throw new TypeError(`unknown option${unknown.length > 1 ? 's' : ''} ${unknown.join(', ')}: ` +
      `${call} takes ${names.join(', ')}`)
  }
  return options
}

function targetPast (c, limit, before) {
  let t = '/past?cred=' + cred(c)
  if (limit !== undefined && limit !== null) {
    t += '&limit=' + checkInt(limit, 'limit', 1n, BigInt(PAST_LIMIT_MAX))
  }
  if (before !== undefined && before !== null) t += '&before=' + checkInt(before, 'before', 1n)
  return t
}

function targetHold (c, by, ttlS, min, key) {
  const amount = checkBy(by)
  if (amount[0] !== '-') throw new BadRequest('by of a hold must be negative (the amount held)')
  // Its end would give back 2^63, past the range: the server's 400, said here.
  if (amount === String(INT64_MIN)) {
    throw new BadRequest(`by of a hold must be from ${-INT64_MAX} to -1`)
  }
  let t = '/hold?cred=' + cred(c) + '&by=' + amount +
    '&ttl=' + checkInt(ttlS, 'ttlS', 1n, BigInt(HOLD_TTL_S_MAX))
  if (min !== undefined && min !== null) t += '&min=' + checkInt(min, 'min')
  if (key !== undefined && key !== null) t += '&key=' + checkName(key, 'key', KEY_CHARS_MAX)
  return t
}

function targetSettle (c, hold, use) {
  return '/settle?cred=' + cred(c) + '&hold=' + checkInt(hold, 'hold', 1n) +
    '&use=' + checkInt(use, 'use', 0n)
}

// --- replies ---------------------------------------------------------------
// The two replies of the hot path, in the compact form AccMan writes them,
// are read without the JSON decoder.
const TOT_RE = /^\{"tot":(-?(?:0|[1-9][0-9]{0,18}))\}$/
const MOD_RE = /^\{"tot":(-?(?:0|[1-9][0-9]{0,18})),"seq":([1-9][0-9]{0,18})\}$/
// A JSON string or number token: strings are skipped whole, so a digit
// inside one is never taken for a number.
const TOKEN_RE = /"(?:[^"\\]|\\.)*"|-?[0-9]+(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?/g
const INT_RE = /^-?(?:0|[1-9][0-9]*)$/
const INT_TAG = '\u0000int'

// JSON with every integer kept as its digits, wrapped in a tagged object
// that no AccMan reply contains.
function parseExact (text) {
  const tagged = text.replace(TOKEN_RE,
    (m) => (m[0] === '"' || !INT_RE.test(m)) ? m : `{"\\u0000int":"${m}"}`)
  try {
    return JSON.parse(tagged)
  } catch {
    return undefined
  }
}

// The exact integer of a parsed value, as a bigint, or undefined.
function exactInt (v) {
  if (v === null || typeof v !== 'object' || typeof v[INT_TAG] !== 'string') return undefined
  return int64(v[INT_TAG])
}

// The integer of decimal `digits` within signed 64 bits, or undefined (the
// fast paths' patterns allow 19 digits).
function int64 (digits) {
  const big = BigInt(digits)
  return big >= INT64_MIN && big <= INT64_MAX ? big : undefined
}

// A result with bigint fields, as the caller asked for it.
function present (status, result, bigint) {
  if (bigint) return result
  const out = convert(result)
  if (out === undefined) throw new Unrepresentable(status, result)
  return out
}

function convert (v) {
  if (typeof v === 'bigint') {
    const safe = v >= BigInt(Number.MIN_SAFE_INTEGER) && v <= BigInt(Number.MAX_SAFE_INTEGER)
    return safe ? Number(v) : undefined
  }
  if (Array.isArray(v)) {
    const out = new Array(v.length)
    for (let i = 0; i < v.length; i++) {
      out[i] = convert(v[i])
      if (out[i] === undefined) return undefined
    }
    return out
  }
  if (v !== null && typeof v === 'object') {
    const out = {}
    for (const k of Object.keys(v)) {
      out[k] = convert(v[k])
      if (out[k] === undefined) return undefined
    }
    return out
  }
  return v
}

// The JSON object of a 200, or throws the typed error of anything else.
function ok (status, text, bigint) {
  const obj = parseExact(text)
  if (status === 200) {
    if (obj === null || typeof obj !== 'object' || Array.isArray(obj)) {
      throw new BadReply('reply body is not a JSON object')
    }
    return obj
  }
  const body = obj !== null && typeof obj === 'object' ? obj : null
  let tot = body ? exactInt(body.tot) : undefined
  if (tot !== undefined && !bigint) tot = present(status, { tot }, false).tot
  throw errorOfReply(status, body, tot)
}

// The least value of a field where it is not INT64_MIN: seqs and holds
// count from 1 (SPEC "Routes", "Holds"), `at` is unix milliseconds.
const LEAST = { seq: 1n, hold: 1n, at: 0n }

function ints (obj, names, what) {
  const out = {}
  for (const name of names) {
    const v = exactInt(obj[name])
    if (v === undefined) throw new BadReply(`${what} reply without an integer ${name}`)
    if (LEAST[name] !== undefined && v < LEAST[name]) {
      throw new BadReply(`${what} reply with ${name} ${v}, below ${LEAST[name]}`)
    }
    out[name] = v
  }
  return out
}

function decodeTot (status, text, bigint) {
  if (status === 200) {
    const m = TOT_RE.exec(text)
    if (m !== null) {
      if (bigint) {
        const tot = int64(m[1])
        if (tot !== undefined) return tot
      }
      const n = Number(m[1])
      if (Number.isSafeInteger(n)) return n
    }
  }
  return present(status, ints(ok(status, text, bigint), ['tot'], '/tot'), bigint).tot
}

function decodeMod (status, text, bigint) {
  if (status === 200) {
    const m = MOD_RE.exec(text)
    if (m !== null) {
      if (bigint) {
        const tot = int64(m[1])
        const seq = int64(m[2])
        if (tot !== undefined && seq !== undefined) return { tot, seq }
      }
      const tot = Number(m[1])
      const seq = Number(m[2])
      if (Number.isSafeInteger(tot) && Number.isSafeInteger(seq)) return { tot, seq }
    }
  }
  return present(status, ints(ok(status, text, bigint), ['tot', 'seq'], 'the'), bigint)
}

function decodeHold (status, text, bigint) {
  return present(status, ints(ok(status, text, bigint), ['hold', 'tot', 'seq'], '/hold'), bigint)
}

function decodeEntry (e) {
  if (e === null || typeof e !== 'object') throw new BadReply('/past entry is not an object')
  const entry = ints(e, ['seq', 'by', 'tot', 'at'], '/past entry:')
  const key = e.key === undefined ? null : e.key
  if (key !== null && typeof key !== 'string') {
    throw new BadReply('/past entry with a key that is not a string')
  }
  entry.key = key
  entry.hold = null
  if (e.hold !== undefined && e.hold !== null) {
    entry.hold = exactInt(e.hold)
    if (entry.hold === undefined || entry.hold < LEAST.hold) {
      throw new BadReply('/past entry with a hold that is not an integer from 1')
    }
  }
  return entry
}

function decodePast (status, text, bigint) {
  const obj = ok(status, text, bigint)
  if (!Array.isArray(obj.past)) throw new BadReply('/past reply without a past list')
  let next = null
  if (obj.next !== null && obj.next !== undefined) {
    next = exactInt(obj.next)
    if (next === undefined) throw new BadReply('/past reply with a next that is not an integer')
  }
  const account = typeof obj.account === 'string' ? obj.account : null
  const past = obj.past.map(decodeEntry)
  checkPastOrder(past, next)
  return present(status, { account, past, next }, bigint)
}

// Newest first, each seq below the one before it (SPEC "Routes"), and
// `next`, the `before` of the next page, its last seq: the one value that
// neither skips nor repeats an entry.
function checkPastOrder (past, next) {
  for (let i = 1; i < past.length; i++) {
    const [newer, older] = [past[i - 1].seq, past[i].seq]
    if (older >= newer) {
      throw new BadReply(`/past reply not newest first: seq ${older} after ${newer}`)
    }
  }
  if (next !== null && (past.length === 0 || next !== past[past.length - 1].seq)) {
    const last = past.length ? `its last seq ${past[past.length - 1].seq}` : 'no entries'
    throw new BadReply(`/past reply whose next ${next} is not the before of the next page ` +
      `(${last})`)
  }
}

module.exports = {
  checkName,
  checkInt,
  targetTot,
  targetMod,
  checkOptions,
  targetPast,
  targetHold,
  targetSettle,
  parseExact,
  exactInt,
  decodeTot,
  decodeMod,
  decodeHold,
  decodeSettle: decodeMod,
  decodePast
}
