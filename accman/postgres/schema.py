"""The PostgreSQL schema, versioned, and the migrations that make it.

Every object is named `accman_*`, in the connection's schema (search_path).
`accman_schema` holds one row: the schema version and the 16-byte key that
hashes credentials (SPEC "Values": credentials are not stored in clear).  A
migration runs in one transaction under an advisory lock, so front-ends
started together migrate once; a store whose version is newer than this
AccMan knows is refused, never downgraded.

The rules of a batch live in the database (accman_apply): every account a
batch touches is locked (`FOR UPDATE`, in hid order, so that two batches
never wait on each other in a cycle), and min, overflow, keys, seq, holds
and events are judged there against the locked rows.  Python never reads a
balance to write it back: two front-ends on one database stay exact.
"""

from __future__ import annotations

from accman.postgres.schema_v1 import V1_APPLY, V1_EXPIRE, V1_NUMBER, V1_TABLES
from accman.postgres.schema_v2 import V2
from accman.postgres.schema_v3 import V3
from accman.postgres.schema_v4 import V4
from accman.postgres.schema_v5 import V5
from accman.postgres.schema_v6 import V6
from accman.postgres.schema_v7 import V7
from accman.postgres.schema_v8 import V8

# Codes in accman_apply's r_code (accman.postgres.store maps them to errors).
OK = 0
NO_ACCOUNT = 1
INSUFFICIENT = 2
KEY_REUSED = 3
OVERFLOW = 4
TOO_MANY_HOLDS_ACCOUNT = 5
TOO_MANY_HOLDS_STORE = 6
NO_HOLD = 7
HOLD_ENDED = 8              # settled before, with another use
USE_OVER_HOLD = 9
HOLD_EXPIRED = 10           # ended by its expiry
OVERFLOW_HELD = 11          # the balance and what open holds give back would not fit

# Op kinds (and history kinds, event types 1-4; 5 is low_balance).
READ = 0
MOD = 1
HOLD = 2
SETTLE = 3
EXPIRE = 4
LOW_BALANCE = 5
EVENT_TYPES = {MOD: "mod", HOLD: "hold", SETTLE: "settle", EXPIRE: "expire",
               LOW_BALANCE: "low_balance"}

NOTIFY_CHANNEL = "accman_events"

# (version, statements): applied in order, each once, in one transaction.
MIGRATIONS: list[tuple[int, str]] = [
    (1, V1_TABLES + V1_NUMBER + V1_APPLY + V1_EXPIRE),
    (2, V2),
    (3, V3),
    (4, V4),
    (5, V5),
    (6, V6),
    (7, V7),
    (8, V8),
]
SCHEMA_VERSION = MIGRATIONS[-1][0]
