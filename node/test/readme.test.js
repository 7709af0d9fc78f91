'use strict'
// README.md as a user reads it: every file it points to is in the
// repository, and the limits it gives are the package's, reached the way
// it says.  No AccMan needed.

const test = require('node:test')
const assert = require('node:assert/strict')
const fs = require('node:fs')
const path = require('node:path')
const vm = require('node:vm')

const PACKAGE_DIR = path.join(__dirname, '..')
const README = fs.readFileSync(path.join(PACKAGE_DIR, 'README.md'), 'utf8')

// A relative Markdown link's target, or a code span that is a relative file
// path (`examples/server.js`, `../docs/SPEC.md`): a folder, then a file
// with an extension.  Routes (`/tot`), scoped packages (`@fastify/cors`)
// and globs (`test/*.test.js`) are not files.
const LINK_RE = /\]\(([^)\s]+)\)/g
const SPAN_PATH_RE = /`((?:\.\.\/)*[\w-]+(?:\/[\w.-]+)*\/[\w-]+\.\w+)`/g

function pathsNamed (text) {
  const links = [...text.matchAll(LINK_RE)].map((m) => m[1].split('#')[0])
    .filter((target) => target && !/^[a-z]+:/i.test(target))
  const spans = [...text.matchAll(SPAN_PATH_RE)].map((m) => m[1])
  return [...new Set([...links, ...spans])]
}

test('every file README.md names, by a link or a path, is in the repository', () => {
  const named = pathsNamed(README)
  const missing = named.filter((p) => !fs.existsSync(path.resolve(PACKAGE_DIR, p)))
  assert.deepEqual(missing, [])
  assert.ok(named.includes('../docs/SPEC.md'), 'the README links the SPEC')
})

// The README's text under a `## ` heading, up to the next one.
function section (heading) {
  const start = README.indexOf(`\n## ${heading}\n`)
  assert.ok(start >= 0, `README.md has a "${heading}" section`)
  const end = README.indexOf('\n## ', start + 1)
  return README.slice(start, end < 0 ? README.length : end)
}

// A limit's value as the README writes it, in the unit its name ends in:
// `(5 s)` is 5000 for a `_MS` name and 5 for an `_S` one, `(100 ms)` is
// 100 for a `_MS` name; `(10 000)`, `(8 KiB)` and `(1 MiB)` are counts of
// things or bytes.
const SCALE = { '': 1, KiB: 1024, MiB: 1024 * 1024 }
function valueIn (name, written) {
  const m = /^([\d ]+?)(?: (s|ms|KiB|MiB))?$/.exec(written)
  assert.ok(m, `${name}'s value (${written}) is read`)
  const n = Number(m[1].replaceAll(' ', ''))
  if (m[2] === 'ms') {
    assert.match(name, /_MS(_|$)/, `${name} is a time in ms`)
    return n
  }
  if (m[2] !== 's') return n * SCALE[m[2] ?? '']
  assert.match(name, /_(MS|S)(_|$)/, `${name} is a time`)
  return /_MS(_|$)/.test(name) ? n * 1000 : n
}

test('the Register snippet is a CommonJS script as it stands: no top-level await', () => {
  const code = /```js\n([\s\S]*?)```/.exec(section('Register'))[1]
  assert.match(code, /require\('fastify-accman'\)/)
  assert.doesNotThrow(() => new vm.Script(code, { filename: 'README.md#register' }))
})

test('every js snippet compiles as a CommonJS script: no top-level await', () => {
  const codes = [...README.matchAll(/```js\n([\s\S]*?)```/g)].map((m) => m[1])
  assert.ok(codes.length >= 5, 'the README has its js snippets')
  for (const [n, code] of codes.entries()) {
    assert.doesNotThrow(() => new vm.Script(code, { filename: `README.md js snippet ${n + 1}` }))
  }
})

test("the repository README's js snippet compiles as a CommonJS script", () => {
  const root = fs.readFileSync(path.join(PACKAGE_DIR, '..', 'README.md'), 'utf8')
  const codes = [...root.matchAll(/```js\n([\s\S]*?)```/g)].map((m) => m[1])
  assert.ok(codes.length >= 1, "the repository's README has a js snippet")
  for (const code of codes) {
    assert.match(code, /require\('fastify-accman'\)/)
    assert.doesNotThrow(() => new vm.Script(code, { filename: '../README.md' }))
  }
})

test('the client snippet is a CommonJS script as it stands: no top-level await', () => {
  const code = /```js\n([\s\S]*?)```/.exec(section('The client'))[1]
  assert.match(code, /new AccManClient\(/)
  assert.doesNotThrow(() => new vm.Script(code, { filename: 'README.md#the-client' }))
})

test("the client's calls are the ones the README says it makes", () => {
  const said = /The client makes the calls a paid\s+service makes \(([^)]*)\)/.exec(section('The client'))
  assert.ok(said, 'The client section lists its calls')
  const named = [...said[1].matchAll(/`(\w+)`/g)].map((m) => m[1]).sort()
  const { AccManClient } = require('fastify-accman')
  const calls = Object.getOwnPropertyNames(AccManClient.prototype)
    .filter((name) => !name.startsWith('_') && name !== 'constructor' && name !== 'close').sort()
  assert.deepEqual(calls, named)
})

test('the limits are reached as the README says, with the values it gives', () => {
  const text = section('Limits')
  const how = /`require\('([\w-]+)'\)\.limits`/.exec(text)
  assert.ok(how, 'the Limits section says how a service requires them')
  // The package's own name, which a test resolves as a service would:
  // through package.json's `exports`, that `src/limits.js` is not in.
  const limits = require(how[1]).limits
  const given = [...text.matchAll(/`([A-Z][A-Z0-9_]+)`\s+\(([^)]+)\)/g)]
  assert.ok(given.length >= 10, 'the section gives the limits with their values')
  for (const [, name, written] of given) {
    assert.equal(limits[name], valueIn(name, written.replace(/\s+/g, ' ')), name)
  }
})

test('the Tests section names every test file', () => {
  const text = section('Tests')
  const files = fs.readdirSync(path.join(PACKAGE_DIR, 'test')).filter((n) => n.endsWith('.test.js'))
  assert.ok(files.length >= 10, 'the test files are read')
  assert.deepEqual(files.filter((name) => !text.includes(`\`${name}\``)), [])
})
