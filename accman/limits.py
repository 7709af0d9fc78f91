"""Every bound AccMan keeps, named with its unit, and why.

TigerBeetle's rule: put a limit on everything.  Each constant here has a test
that reaches it (tests/ names it) and a documented answer when a client does.
"""

# --- values (SPEC "Values") -------------------------------------------------
CRED_CHARS_MAX = 128          # SPEC: a credential is 1..128 characters.
KEY_CHARS_MAX = 64            # SPEC: an idempotency key is 1..64 characters.
INT64_MIN = -(2 ** 63)        # Balances, amounts and mins are signed 64-bit.
INT64_MAX = 2 ** 63 - 1

# --- /past pages ------------------------------------------------------------
PAST_LIMIT_DEFAULT = 100      # SPEC: default page size.
PAST_LIMIT_MAX = 1000         # SPEC: limit is 1..1000; a page stays < ~100 KiB.
# The longest JSON of one history entry, and of one event (int64 extremes,
# a 64-character key, the separator): a /past or /events reply answered out
# of line is counted at (limit + 1) times this against its connection's
# WRITE_BUFFER_BYTES_MAX until it is sent, since its size is not known
# before the store answers.
PAST_ENTRY_BYTES_MAX = 206
EVENT_BYTES_MAX = 297

# --- holds (SPEC "Holds") -----------------------------------------------------
HOLD_TTL_S_MAX = 86400        # SPEC: ttl is 1..86400 seconds.
# A reading of a Ledger's own clock (`clock_ms`, unix milliseconds) is 0
# to the last millisecond of the year 9999: every time kept (a change's
# `at`, a hold's expiry, at most HOLD_TTL_S_MAX later) stays far inside
# int64.  Another reading is refused: a ValueError to the call that read it,
# nothing applied; the writer's own housekeeping waits for a good one.
CLOCK_MS_MAX = 253_402_300_799_999
# Open holds per account: a service holds one per request in flight, so a
# few thousand covers the busiest consumer; more is a leak in the caller.
HOLDS_PER_ACCOUNT_MAX = 4096
# Open holds in all: each costs memory until it ends (settled or expired),
# and expiry walks them; a million is ~100 MiB at most.  Over either bound:
# 409 too_many_holds, nothing held.
HOLDS_MAX = 1_000_000

# --- events (SPEC "Events") -----------------------------------------------------
# SPEC: default page of GET /events.  The request parser gives /past and
# /events one default (PAST_LIMIT_DEFAULT's), and the clients refuse a page
# over this one: the two stay equal (tests/test_server_events.py).
EVENTS_LIMIT_DEFAULT = 100
EVENTS_LIMIT_MAX = 1000       # SPEC: limit is 1..1000.
EVENTS_WAIT_S_MAX = 60        # SPEC: wait is 0..60 seconds.
# Events are kept at least this long (SPEC: default 7 days); older ones may
# be trimmed, and asking for them is 410 events_trimmed.
EVENTS_RETENTION_S_DEFAULT = 7 * 24 * 3600
# The shortest retention `accman serve --events-retention` takes: one
# second, the command line's smallest unit.  A retention of 0 would keep no
# event for a reader, so no store takes it.
EVENTS_RETENTION_S_MIN = 1
# The shortest retention a store's Python API takes (tests use short ones):
# one tick of the clock of events, a unix millisecond.  A shorter one is a
# retention of 0 ms, and its trimming passes, one per retention, would keep
# the writer's thread spinning.
EVENTS_RETENTION_S_API_MIN = 0.001
# The longest retention a store takes (--events-retention): a century, as
# good as "keep them all", with the cut-off still a plain 64-bit time.
EVENTS_RETENTION_S_MAX = 100 * 365 * 24 * 3600
# Long polls waiting at once, server-wide: each is one entry in a list, no
# thread, no timer of its own.  Over it: 503 busy, retry.
EVENTS_WAITERS_MAX = 1024

# --- webhooks (SPEC "Events", `accman serve --webhook`) ------------------------
# Events in one POST: the most one read of the store returns (EVENTS_LIMIT_MAX).
# Under load a batch grows to it; a receiver that keeps up gets small ones.
WEBHOOK_EVENTS_PER_POST_MAX = 1000
# One POST's JSON body.  An event is at most ~300 bytes, so 1000 of them fit;
# the cap keeps a body under the 1 MiB that common receivers accept by
# default (nginx's client_max_body_size).  A batch over it is cut to a
# prefix that fits; the rest goes in the next POST.
WEBHOOK_BODY_BYTES_MAX = 512 * 1024
# One delivery attempt, from connect (TLS included) to the end of the reply's
# head, its status line and headers (and any interim 1xx heads before it): a
# receiver that takes longer is a failed attempt, retried.  Stripe gives 20 s,
# GitHub 10 s; a receiver should answer at once and work later.
WEBHOOK_ATTEMPT_TIMEOUT_S = 10.0
# The reply's status line and headers; the body is never read.  A longer
# head is a failed attempt, said naming this bound.
WEBHOOK_REPLY_HEAD_BYTES_MAX = 16 * 1024
# Retries after a failed attempt wait base * 2^(n-1), at most the cap, each
# jittered down by up to half (so that many servers behind one receiver do
# not retry in step).  The cap bounds how long a receiver that is back waits.
WEBHOOK_BACKOFF_BASE_S = 0.5
WEBHOOK_BACKOFF_CAP_S = 30.0
# The deliverer's long poll of the store: one waiter (of EVENTS_WAITERS_MAX).
WEBHOOK_POLL_WAIT_S = 30.0
# Under a steady stream of events, POSTs start at most once per linger
# (counted from when the last one started, its bytes made), so that a
# receiver that keeps up gets ~100 POSTs a second of many events, not one
# per commit batch (Kafka's linger.ms): a POST costs the server's loop a
# connection and a cursor save whatever its size.  After a quiet spell the
# first event leaves at once.
WEBHOOK_LINGER_S = 0.01
# The webhook's cursor is saved (two fsyncs: the file, the directory) at
# most this often, beside delivery: a receiver that keeps up with a busy
# server would otherwise have the disk sync a cursor per POST, next to the
# commits.  After a crash, what was acknowledged since the last save (at
# most this long's worth) is sent again; a stop saves at once.
WEBHOOK_CURSOR_SAVE_INTERVAL_S = 0.1
# On a store that front-ends share (PostgreSQL), one of them delivers: the
# one holding the webhook's role (accman.postgres.cursors).  The others try
# to take it this often, and the holder checks this often that its session,
# which holds the role, is alive: a hand-over takes about this long.
WEBHOOK_LEAD_INTERVAL_S = 1.0
# The HMAC key: the secret file's bytes, surrounding whitespace stripped.
# 16 bytes at least, as for tokens, so that a placeholder never signs; a few
# KiB at most (HMAC hashes a longer key down anyway).
WEBHOOK_SECRET_BYTES_MIN = 16
WEBHOOK_SECRET_BYTES_MAX = 4096

# --- group commit -----------------------------------------------------------
# One write batch holds at most this many changes (each a history entry and
# an event, and a key record when keyed): big enough to amortise a durable
# write over many, small enough that one batch never stalls replies for
# long (docs/PERFORMANCE.md has what one costs).
BATCH_MODS_MAX = 4096
# Mods applied in memory but not yet durable, over all batches waiting to be
# written.  Beyond it a submit is refused with 503 `busy` (back-pressure)
# instead of queueing without bound.  16 batches of BATCH_MODS_MAX: at the
# disk's rate that is well under a second of writes.  The server's caps allow
# more in flight (CONNECTIONS_MAX x PIPELINE_REQUESTS_MAX = 262144), so a
# flood of pipelined mods from many connections can reach it and gets `busy`.
QUEUED_MODS_MAX = 65536

# --- HTTP/1.1 framing (SPEC "Limits") ----------------------------------------
# The longest valid AccMan request line is about 330 bytes (a /mod with a
# 128-char cred, 64-char key and two int64s).  2 KiB leaves room for odd
# clients and is far below nginx's 8 KiB large_client_header_buffers.
REQUEST_LINE_BYTES_MAX = 2048          # over it: 414
# All header lines of one request, like nginx's/h11's 8-16 KiB defaults.
HEADER_BYTES_MAX = 8192                # over it: 431
HEADERS_MAX = 64                       # header lines per request; over it: 431
# Empty lines before a request line are skipped (RFC 9112 2.2 asks for "at
# least one"; a client may send a stray CRLF after a body), up to this many:
# beyond it 400, closed, or a client could hold a connection for ever with
# a CRLF now and then, no request ever starting its deadline.
REQUEST_BLANK_LINES_MAX = 4            # over it: 400
# The routes take no body.  A client library that sends a small body anyway
# (an empty JSON object, say) is read and ignored up to this size; larger is
# 413.  Chunked bodies are refused (400): there is nothing to stream.
BODY_BYTES_MAX = 1024                  # over it: 413

# --- connections ------------------------------------------------------------
CONNECTIONS_MAX = 4096                 # beyond it new connections are closed at once
# Descriptors kept free for the store (its logs, tables, checkpoint, lock)
# below the process's limit: the connection cap is lowered to stay this far
# under RLIMIT_NOFILE, so running out of descriptors refuses connections and
# never a commit.
FDS_RESERVED = 256
# Connections from one peer address: one client cannot take every slot.
# Services call from a handful of hosts with pools of tens of connections;
# behind a proxy that hides them, raise it (ACCMAN_CONNECTIONS_PER_PEER_MAX).
CONNECTIONS_PER_PEER_MAX = 1024
# Requests parsed but not yet answered on one connection.  When a client
# pipelines more than this without reading, the server stops reading its
# socket (back-pressure) until replies drain; the rest of a read waits
# unparsed.  It is also the most requests one connection gets taken per
# loop turn, so that one client cannot hold the loop.
PIPELINE_REQUESTS_MAX = 64
# Requests taken per loop turn over all connections.  However many clients
# flood, a turn stays short (a millisecond or two of parsing and answering),
# so a new connection or a health check waits a few turns behind a flood of
# cheap requests (uvloop accepts about one connection a turn while the loop
# is busy); the connections held back go on next turn, in turn.  Costly
# reads (below) are taken while they leave a quarter of the turn (a turn's
# first, whatever it costs): a cheap request, a health check, among
# clients flooding them is answered in the turn that reads it.
TURN_REQUESTS_MAX = 512
# What a request of a costly route counts for in that budget, in requests:
# a /metrics render is ~10 /tot's work, and a page of /past or /events one
# request per PAGE_ENTRIES_PER_TURN_REQUEST entries it holds (docs/
# PERFORMANCE.md has the measurement).  A flood of them keeps turns short.
METRICS_TURN_REQUESTS = 10
PAGE_ENTRIES_PER_TURN_REQUEST = 3
# A connection's pass at its requests ends once their answers have cost
# this many requests more than one each (the two above), or have spent the
# turn: it goes on after the connections waiting behind it, so that clients
# flooding costly reads each get a little of every turn, and a costly read
# among them waits one pass of each flooder, not its whole pipeline.
PASS_CHARGE_MAX = 64
# Bytes of replies queued in the transport before the server pauses reading
# from that client (uvloop's write buffer high-water mark).
WRITE_BUFFER_BYTES_MAX = 256 * 1024
# Bytes held for all connections together: replies not yet read by their
# clients, requests received but not yet parsed, and requests parsed but
# not yet taken (REQUEST_HELD_BYTES each), so that many clients that never
# read cannot exhaust memory.  A part of it, OVER_BUDGET_READ_BYTES for
# each of CONNECTIONS_MAX connections (at most half of it), is kept for
# the connections holding nothing: over the rest, connections holding
# bytes stop being read until the total falls to three quarters of the
# rest, and one holding none reads OVER_BUDGET_READ_BYTES at most and is
# answered one request at a time, so that a client that reads its
# replies (a health check) is still served.  A read under the rest takes
# the total past it by OVER_BUDGET_READ_BYTES (and a request held back) at
# most, and over it only a connection holding nothing is read, that much:
# the part kept covers a read of every connection, and only replies pass
# the budget (those owed when the rest is passed, then one at a time per
# connection whose client has stopped reading).
SERVER_BUFFER_BYTES_MAX = 64 * 1024 * 1024
# The most one socket read takes (uvloop's own reads are 256 KB): what a
# connection may hold unparsed behind the pipeline cap or its write buffer.
READ_BYTES_MAX = 256 * 1024
# A request parsed and not yet taken (held back behind the pipeline cap,
# the write buffer or the turn), as SERVER_BUFFER_BYTES_MAX counts it: its
# object weighs more than its bytes did, and at most this much
# (docs/PERFORMANCE.md has the measurement).
REQUEST_HELD_BYTES = 1024
# A read of a connection holding nothing once the buffered bytes are past
# what SERVER_BUFFER_BYTES_MAX does not keep for them: a health check's or
# a mod's request whole.
OVER_BUDGET_READ_BYTES = 1024
# From the first byte of a request head to its end.  Trickled bytes do not
# reset it (slowloris): a head must arrive whole within this time.
HEAD_TIMEOUT_S = 10.0
# An idle keep-alive connection (no request in progress, nothing owed) is
# closed after this long, like nginx's keepalive_timeout default of 75 s.
IDLE_TIMEOUT_S = 75.0
# A connection whose client does not read its replies (paused) is making
# progress while the reply bytes it has not taken, in the server and in the
# kernel, go down by this much (or a quarter of them, if less) within
# IDLE_TIMEOUT_S: a slow reader is served, one that trickles is dropped
# (its replies keep the server's budget spent).
PAUSED_PROGRESS_BYTES_MIN = 64 * 1024
# The same, for a connection none of whose requests has yet carried a valid
# token (with tokens configured): unauthenticated sockets cannot hold slots.
UNAUTHED_IDLE_TIMEOUT_S = 10.0
# After the server decides to close a connection (a framing error, `Connection:
# close`, the head deadline, idle), it sends its last replies and a FIN, then
# keeps reading and discarding for up to this long before closing.  Closing
# at once while the client is still sending makes the kernel answer with a
# reset, and a reset can destroy the reply before the client reads it:
# Apache's and nginx's lingering close (nginx: lingering_timeout 5 s).
LINGER_S = 2.0
# On SIGTERM: how long in-flight requests get to be answered before close.
SHUTDOWN_GRACE_S = 10.0

# The lowest priority a thread can be given (`accman serve --compaction-nice`).
NICE_MAX = 19
