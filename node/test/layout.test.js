'use strict'
// The layout's bounds, the rule tests/test_layout.py keeps for the Python
// package: no module of the package (index.js, src/) over 500 lines, no
// line over 100 characters, no function over 80 lines.  A file or a
// function past them is doing two jobs.

const test = require('node:test')
const assert = require('node:assert/strict')
const fs = require('node:fs')
const path = require('node:path')

const ROOT = path.resolve(__dirname, '..')
const MODULE_LINES_MAX = 500
const LINE_CHARS_MAX = 100
const FUNCTION_LINES_MAX = 80

const SOURCES = ['index.js'].concat(fs.readdirSync(path.join(ROOT, 'src'))
  .filter((name) => name.endsWith('.js')).sort().map((name) => `src/${name}`))
// A `(...) {` after these is a statement's block, not a function's body.
const CONTROL = new Set(['if', 'for', 'while', 'switch', 'catch', 'with', 'await'])
// After these names a `/` starts a regular expression, not a division.
const BEFORE_REGEX = new Set([
  'return', 'typeof', 'case', 'do', 'else', 'in', 'of', 'new', 'delete', 'void', 'throw',
  'instanceof', 'yield', 'await'
])

// Where the quoted string or the regular expression that opens at `i`
// ends (the index after it): `\` escapes, and in a regular expression a
// `/` inside `[...]` does not end it.
function quotedEnd (text, i) {
  const close = text[i]
  let inClass = false
  for (let j = i + 1; j < text.length; j++) {
    const c = text[j]
    if (c === '\\') j++
    else if (close === '/' && c === '[') inClass = true
    else if (close === '/' && c === ']') inClass = false
    else if (c === close && !inClass) return j + 1
  }
  return text.length
}

// Where a template literal's text that starts at `i` ends: at its closing
// backquote (`end`) or at a `${` (`expr`), with the index after it.
function templateEnd (text, i) {
  for (let j = i; j < text.length; j++) {
    if (text[j] === '\\') j++
    else if (text[j] === '`') return { at: j + 1, expr: false }
    else if (text[j] === '$' && text[j + 1] === '{') return { at: j + 2, expr: true }
  }
  return { at: text.length, expr: false }
}

function regexMayStart (prev) {
  if (prev === undefined) return true
  if (prev.type === 'name') return BEFORE_REGEX.has(prev.value)
  return prev.type === 'punct' && !')]}'.includes(prev.value)
}

// The tokens of a JavaScript source that braces and parentheses are made
// of, each with its line: names, `=>` and single punctuation; strings,
// template text, regular expressions and numbers as one token each;
// comments and white space dropped.  A template's `${...}` is code, so its
// tokens are kept.
function tokens (text) {
  const out = []
  const braces = [] // per `{` open: whether it is a template's `${`
  let line = 1
  let i = 0
  const skip = (to, type) => {
    for (let j = i; j < to; j++) if (text[j] === '\n') line++
    if (type) out.push({ type, value: '', line })
    i = to
  }
  while (i < text.length) {
    const c = text[i]
    const rest = text.slice(i, i + 2)
    if (/\s/.test(c)) skip(i + 1)
    else if (rest === '//') skip(text.indexOf('\n', i) < 0 ? text.length : text.indexOf('\n', i))
    else if (rest === '/*') skip(text.indexOf('*/', i) < 0 ? text.length : text.indexOf('*/', i) + 2)
    else if (c === '"' || c === "'") skip(quotedEnd(text, i), 'string')
    else if (c === '`' || (c === '}' && braces.at(-1) === true)) {
      if (c === '}') braces.pop()
      const end = templateEnd(text, i + 1)
      if (end.expr) braces.push(true)
      skip(end.at, 'string')
    } else if (c === '/' && regexMayStart(out.at(-1))) {
      skip(quotedEnd(text, i), 'regex')
    } else if (/[\w$]/.test(c)) {
      const m = /^[\w$]+/.exec(text.slice(i, i + 200))
      out.push({ type: /^\d/.test(m[0]) ? 'number' : 'name', value: m[0], line })
      i += m[0].length
    } else if (rest === '=>') {
      out.push({ type: 'punct', value: '=>', line })
      i += 2
    } else {
      if (c === '{') braces.push(false)
      if (c === '}') braces.pop()
      out.push({ type: 'punct', value: c, line })
      i++
    }
  }
  return out
}

// The name and first line of the function whose body the `{` at token `k`
// opens, or null when that `{` opens no function body.  `parenOf` maps
// each `)` seen so far to its `(`.
function functionAt (toks, k, parenOf) {
  const before = toks[k - 1]
  if (!before || before.type !== 'punct') return null
  if (before.value === '=>') {
    const at = toks[k - 2].value === ')' ? parenOf.get(k - 2) : k - 2 // the parameters
    const eq = toks[at - 1] && toks[at - 1].value === 'async' ? at - 2 : at - 1
    const named = eq > 0 && toks[eq].value === '=' && toks[eq - 1].type === 'name'
    return { name: named ? toks[eq - 1].value : '(arrow)', line: toks[at].line }
  }
  if (before.value !== ')') return null
  const head = toks[parenOf.get(k - 1) - 1]
  if (!head || head.type !== 'name' || CONTROL.has(head.value)) return null
  return { name: head.value, line: head.line }
}

// [name, lines] of each function of a JavaScript source whose body is in
// braces: a declaration or expression (`function f (...) {`), a method,
// getter or setter of a class or object (`name (...) {`), or an arrow
// (`(...) => {`).  Its lines run from its header (the name, or an arrow's
// parameters) to its closing `}`; braces in strings, templates' text,
// regular expressions and comments are not counted.  An arrow whose body
// is one expression has no braces and is not measured: such a body does
// not run for a screen.
function functions (text) {
  const toks = tokens(text)
  const open = [] // per `(`, `[` or `{` not yet closed: its token, and its function
  const parenOf = new Map()
  const found = []
  toks.forEach((t, k) => {
    if (t.type !== 'punct') return
    if ('([{'.includes(t.value)) {
      open.push({ k, fn: t.value === '{' ? functionAt(toks, k, parenOf) : null })
    } else if (')]}'.includes(t.value) && open.length) {
      const o = open.pop()
      if (t.value === ')') parenOf.set(k, o.k)
      if (o.fn) found.push([o.fn.name, t.line - o.fn.line + 1])
    }
  })
  return found
}

for (const file of SOURCES) {
  test(`${file}: at most ${MODULE_LINES_MAX} lines of at most ${LINE_CHARS_MAX} characters, ` +
    `functions of at most ${FUNCTION_LINES_MAX} lines`, () => {
    const text = fs.readFileSync(path.join(ROOT, file), 'utf8')
    const rows = text.split('\n')
    if (rows.at(-1) === '') rows.pop()
    const past = rows.length > MODULE_LINES_MAX ? [`${rows.length} lines`] : []
    rows.forEach((row, i) => {
      if (row.length > LINE_CHARS_MAX) past.push(`line ${i + 1}: ${row.length} characters`)
    })
    for (const [name, n] of functions(text)) {
      if (n > FUNCTION_LINES_MAX) past.push(`function ${name}: ${n} lines`)
    }
    assert.deepEqual(past, [])
  })
}

test('the function measure counts each function whole, and only functions', () => {
  const text = [
    'const RE = /^[{]{1,2}\\/$/ // a { in a comment',
    'function f (a,',
    '  b) {',
    '  if (a) { return `${b}{` }',
    "  return '}'",
    '}',
    'class C {',
    '  async m () {',
    '    const g = (x) => {',
    '      return { x, y: `a${`${x}}`}` }',
    '    }',
    '    try { g(1) } catch (err) { throw err }',
    '    return g',
    '  }',
    '}',
    'const h = x => x / 2 / 1',
    'const k = async () => {}'
  ].join('\n')
  assert.deepEqual(functions(text), [['f', 5], ['g', 3], ['m', 7], ['k', 1]])
})
