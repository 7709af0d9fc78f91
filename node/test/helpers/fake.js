'use strict'
// A fake AccMan for the faults a real one does not make on demand: it counts
// the request heads it receives and answers each with `answer(head)`: bytes
// to write, or null to stay silent (a hung server).

const net = require('node:net')

async function fakeAccMan (answer) {
  const heads = []
  const sockets = new Set()
  const server = net.createServer((socket) => {
    sockets.add(socket)
    socket.on('close', () => sockets.delete(socket))
    socket.on('error', () => {})
    let buf = ''
    socket.on('data', (d) => {
      buf += d.toString('latin1')
      let end
      while ((end = buf.indexOf('\r\n\r\n')) >= 0) {
        const head = buf.slice(0, end)
        buf = buf.slice(end + 4)
        heads.push(head)
        const out = answer(head)
        if (out !== null) socket.write(out)
      }
    })
  })
  await new Promise((resolve) => server.listen(0, '127.0.0.1', resolve))
  return {
    url: `http://127.0.0.1:${server.address().port}`,
    heads,
    close () {
      for (const s of sockets) s.destroy()
      return new Promise((resolve) => server.close(resolve))
    }
  }
}

function reply (status, body) {
  return `HTTP/1.1 ${status} X\r\nContent-Type: application/json\r\nContent-Length: ${Buffer.byteLength(body)}\r\n\r\n${body}`
}

module.exports = { fakeAccMan, reply }
