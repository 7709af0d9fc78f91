'use strict'
// Every bound the Node package keeps, named with its unit, and why
// (TigerBeetle's rule: a limit on everything).  The SPEC's value bounds
// mirror accman/limits.py; the client's and the plugin's own mirror
// accman/calling/client.py and asgi.py.

// --- values (SPEC "Values", "Holds") -----------------------------------------
const CRED_CHARS_MAX = 128 // a credential is 1..128 of A-Z a-z 0-9 _ -
const KEY_CHARS_MAX = 64 // an idempotency key is 1..64 of the same
const INT64_MIN = -(2n ** 63n) // balances, amounts and mins are signed 64-bit
const INT64_MAX = 2n ** 63n - 1n
const PAST_LIMIT_MAX = 1000 // /past?limit is 1..1000
const HOLD_TTL_S_MAX = 86400 // /hold?ttl is 1..86400 seconds

// --- the client ----------------------------------------------------------------
// One attempt of a call, from asking for a connection to the parsed reply.
// A mod waits for its group commit (a few ms); 5 s is far beyond that yet
// short enough that a hung AccMan does not hang the calling service.
const TIMEOUT_MS_DEFAULT = 5000
// Keep-alive connections per client.  One connection carries tens of
// thousands of calls a second; a few more keep one slow group commit from
// holding up the reads behind it.
const CONNECTIONS_DEFAULT = 8
const CONNECTIONS_MAX = 1024
// Calls started and not yet answered, over all connections.  Beyond it a
// call fails at once with Busy (back-pressure, nothing sent) instead of
// queueing in the pool without bound.
const CALLS_IN_FLIGHT_MAX = 4096
// Extra attempts for a retryable call, pausing RETRY_PAUSE_MS doubling up to
// RETRY_PAUSE_MAX_MS between them.
const RETRIES_DEFAULT = 2
const RETRIES_MAX = 10
const RETRY_PAUSE_MS = 25
const RETRY_PAUSE_MAX_MS = 1000
// An idle keep-alive connection is closed after this long instead of being
// reused: well before the server's IDLE_TIMEOUT_S (75 s), so that a request
// is never written just as the server closes the connection (the race that
// turns a keyless mod into an unknown outcome).
const IDLE_REUSE_MS = 30000
// Reply framing: AccMan's heads are a status line and a handful of headers;
// a /past page of PAST_LIMIT_MAX entries with 64-character keys and int64
// values is about 200 KiB.
const REPLY_HEAD_BYTES_MAX = 8192
const REPLY_BODY_BYTES_MAX = 1 << 20

// --- the fastify plugin --------------------------------------------------------
// The plugin's client is bounded tighter than the client's default: a
// request waits at most this long per attempt for its admission.
const PLUGIN_TIMEOUT_MS_DEFAULT = 2000
const PLUGIN_RETRIES_DEFAULT = 1
// A hold (reserve mode) ends by itself after this long if the service never
// settles it (a crash): a little over a typical request timeout (60 s), so
// that a dead service's holds come back within minutes; the same default
// as the Python middleware's (docs/CALLING.md).
const HOLD_TTL_S_DEFAULT = 90
// Check mode admits on a balance read from AccMan (a tot, or a charge's
// reply) at most this long ago in this process, so that a paid request
// costs one round trip, not two.  Refusals are always confirmed by a fresh
// tot.  0 reads the balance for every request.
const CHECK_FRESH_MS_DEFAULT = 1000
// The most checkFreshMs may be: a minute of other servers' charges is as
// wide an overdraft window as check mode should ever open.
const CHECK_FRESH_MS_MAX = 60000
// Balances remembered for check mode; when full the oldest go first.
const CHECK_CACHE_ENTRIES_MAX = 10000
// Charges and settles still owed after their response (they met a failure),
// retried in the background with their key.  Beyond the bound a new one is
// logged as stranded at once rather than held without limit.
const OWED_MAX = 10000
// Attempts per owed call, pausing OWED_PAUSE_MS doubling up to
// OWED_PAUSE_MAX_MS (over two minutes of pauses in all) before it is stranded.
const OWED_ATTEMPTS_MAX = 20
const OWED_PAUSE_MS = 100
const OWED_PAUSE_MAX_MS = 10000
// At close, how long releases under way and owed calls get to land.  Then
// no owed call starts and none is retried; the one under way finishes
// (bounded by the client's timeout and retries), and the rest are stranded.
// Then async onUnpaid calls get as long again.
const CLOSE_DRAIN_MS = 5000
// From fastify's close() on, how long a connection is kept alive after its
// response (the server's keepAliveTimeout, to which Node may add its own
// keepAliveTimeoutBuffer, 1 s): close() waits for every connection to end
// before the owed calls drain, and fastify's 72 s outlasts what a process
// manager waits before SIGKILL.  Not 0, which Node reads as "never".
// Also how often close() looks for the server to have stopped listening,
// to end the connections on which no request has begun (closing.js).
const CLOSE_KEEP_ALIVE_MS = 100
// At close, how long the servers fastify listens on besides its main one
// (one for each further address of `localhost`) get to end their
// connections once fastify has closed them, before the owed calls drain:
// fastify's close() waits for none of them, and a charge that comes after
// the drain is stranded.  Bounded, unlike fastify's wait for its main
// server, so that a stream left open there (server-sent events) cannot
// hold the drain past a process manager's SIGKILL; as long as the drain.
const CLOSE_SERVERS_MS = 5000
// From close() on, how long a connection whose request's head has come in
// part gets for the rest of it (and fastify's 503): a head never finished
// would hold close(), and the owed calls' drain behind it, for as long as
// its client keeps it open, past a process manager's SIGKILL.  Nothing is
// asked on it until the head is whole (closing.js, headsInPart).
const CLOSE_HEAD_MS = 1000
// A log line that every refused request meets (AccMan unreachable, the
// service's token refused) is said again at most this often (repeats.js).
const REPEAT_MS = 10000
// The repeated lines kept.  A line is known by its fields, which hold the
// reply's error code, and a foreign server at a wrong URL may send a new
// code with every reply: past this many, the line met longest ago is
// forgotten (said at once if it comes back), so that they stay bounded.
// Its repeats not yet said are said as it goes: at most one line more per
// new line said.
const REPEATED_LINES_MAX = 64
// Routes named in the error that fails ready() when the plugin meters routes
// whose price it never checked: enough to find them; the rest are counted.
const ROUTES_NAMED_MAX = 10

module.exports = {
  CRED_CHARS_MAX,
  KEY_CHARS_MAX,
  INT64_MIN,
  INT64_MAX,
  PAST_LIMIT_MAX,
  HOLD_TTL_S_MAX,
  TIMEOUT_MS_DEFAULT,
  CONNECTIONS_DEFAULT,
  CONNECTIONS_MAX,
  CALLS_IN_FLIGHT_MAX,
  RETRIES_DEFAULT,
  RETRIES_MAX,
  RETRY_PAUSE_MS,
  RETRY_PAUSE_MAX_MS,
  IDLE_REUSE_MS,
  REPLY_HEAD_BYTES_MAX,
  REPLY_BODY_BYTES_MAX,
  PLUGIN_TIMEOUT_MS_DEFAULT,
  PLUGIN_RETRIES_DEFAULT,
  HOLD_TTL_S_DEFAULT,
  CHECK_FRESH_MS_DEFAULT,
  CHECK_FRESH_MS_MAX,
  CHECK_CACHE_ENTRIES_MAX,
  OWED_MAX,
  OWED_ATTEMPTS_MAX,
  OWED_PAUSE_MS,
  OWED_PAUSE_MAX_MS,
  CLOSE_DRAIN_MS,
  CLOSE_KEEP_ALIVE_MS,
  CLOSE_SERVERS_MS,
  CLOSE_HEAD_MS,
  REPEAT_MS,
  REPEATED_LINES_MAX,
  ROUTES_NAMED_MAX
}
