'use strict'
// README.md as a user reads it: every file it points to is in the
// repository.  No AccMan needed.

const test = require('node:test')
const assert = require('node:assert/strict')
const fs = require('node:fs')
const path = require('node:path')

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
