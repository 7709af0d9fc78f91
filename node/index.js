'use strict'
// fastify-accman: the fastify plugin (the module itself, as fastify plugins
// are), the Node client and the typed errors.

const { plugin, fingerprint } = require('./src/plugin')
const { AccManClient } = require('./src/client')
const errors = require('./src/errors')
const limits = require('./src/limits')

module.exports = plugin
module.exports.default = plugin
module.exports.fastifyAccman = plugin
module.exports.AccManClient = AccManClient
module.exports.fingerprint = fingerprint
module.exports.limits = limits
for (const [name, value] of Object.entries(errors)) {
  if (name !== 'errorOfReply') module.exports[name] = value
}
