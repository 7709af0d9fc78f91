"""Type stubs of accman.ledger._ledger (ext/ledger.pyx with records.pxi,
changes.pxi, holds.pxi and lane.pxi): the in-memory book, the record
formats and the Lane; no I/O."""

from collections.abc import Callable
from typing import Any, Final

FORMAT_VERSION: Final[int]
HID_BYTES: Final[int]
ACCOUNT_PREFIX: Final[bytes]      # store format 1 only
HISTORY_END: Final[bytes]
HISTORY_PREFIX: Final[bytes]
KEY_PREFIX: Final[bytes]
HOLD_PREFIX: Final[bytes]
OPEN_HOLD_PREFIX: Final[bytes]
HOLD_KEY_BYTES: Final[int]
LOW_PREFIX: Final[bytes]
EVENT_PREFIX: Final[bytes]        # store format 2's one record per event
EVENTS_PREFIX: Final[bytes]       # store format 3's one record per batch
EVENTS_META_KEY: Final[bytes]
HOLD_OPEN: Final[int]
HOLD_SETTLED: Final[int]
HOLD_EXPIRED: Final[int]
EV_MOD: Final[int]
EV_HOLD: Final[int]
EV_SETTLE: Final[int]
EV_EXPIRE: Final[int]
EV_LOW: Final[int]
EVENT_NAMES: Final[dict[int, str]]
READ_TOT: Final[int]              # Book.read_ordered's `what`
READ_SEQ: Final[int]

# -- records (records.pxi) ------------------------------------------------------

def pack_account(tot: int, seq: int) -> bytes:
    """A store-format-1 account record (for tests that build one)."""
def unpack_account(value: bytes) -> tuple[int, int]:
    """-> (tot, seq); ValueError when the record is not a version-1 account."""
def history_key(hid: bytes, seq: int) -> bytes: ...
def history_key_seq(key: bytes) -> int: ...
def hold_key(hid: bytes, hold: int) -> bytes: ...
def open_hold_key(hid: bytes, hold: int) -> bytes: ...
def event_key(event_id: int) -> bytes: ...
def event_key_id(key: bytes) -> int:
    """The id of an event record's key, or the last id of an events record's."""
def events_key(last_id: int) -> bytes:
    """The key of the LevelDB record of a batch's events, ..last_id."""
def unpack_history(value: bytes) -> tuple[int, int, int, str | None, int | None]:
    """-> (by, tot, at_ms, key or None, hold or None)."""
def unpack_history_group(seq: int, value: bytes, first: int = 1, last: int = ...) -> list[
        tuple[int, int, int, int, str | None, int | None]]:
    """(seq, by, tot, at_ms, key, hold) of the entries first..last of the
    history record whose key's seq is `seq`, newest first; ValueError if
    the record does not parse whole."""
def unpack_key(value: bytes) -> tuple[int, int, int, int | None, int]:
    """-> (seq, by, tot, min or None, ttl_s: 0 for a mod's key)."""
def unpack_hold(value: bytes) -> tuple[int, int, int, int, int, int]:
    """-> (amount, expires_ms, state, use, end_seq, end_tot)."""
def pack_open_hold(amount: int, expires_ms: int) -> bytes: ...
def unpack_open_hold(value: bytes) -> tuple[int, int]:
    """-> (amount, expires_ms)."""
def unpack_low(value: bytes) -> int: ...
def unpack_events_meta(value: bytes) -> tuple[int, int]:
    """-> (first, last) event ids kept."""
def unpack_event(value: bytes) -> tuple[str, bytes, int, int, int, int, str | None, int | None]:
    """A store-format-2 event -> (type name, hid, seq, by, tot, at_ms, key, hold)."""
def wal_record(puts: list[tuple[bytes, bytes]]) -> bytearray:
    """The payload of a log record of (key, value) puts (the store's own)."""
def fill_write_batch(wb: Any, payload: bytes | bytearray) -> int:
    """Puts leveldb_puts(payload) into LevelDB's write batch."""

# -- changes (changes.pxi) ------------------------------------------------------

def decode_changes(first: int, data: bytes | bytearray) -> list[tuple]:
    """-> [(event id, kind, hid, seq, by, tot, at_ms, key or None, hold or
    None)] of a block of change entries whose first event is `first`."""
def changes_span(first: int, data: bytes | bytearray) -> tuple[int, int]:
    """-> (last event id, newest at_ms) of a block of change entries."""
def leveldb_puts(payload: bytes | bytearray) -> list[tuple[bytes, bytes | None]]:
    """What LevelDB gets for a log record's payload (None: a delete)."""
def leveldb_batch_body(ops: list[tuple[bytes, bytes | None]]) -> bytes:
    """LevelDB's write batch of `ops` past its sequence number (count, entries)."""
def unpack_events(key: bytes, value: bytes) -> tuple[int, bytes]:
    """-> (first event id, change entries) of a batch's events record."""

Outcome = tuple[int, int] | tuple[int, int, int] | Exception
Done = Callable[[Any], None]

class Account:
    @property
    def hid(self) -> bytes: ...
    @property
    def tot(self) -> int:
        """The durable balance."""
    @property
    def seq(self) -> int:
        """The durable history length; 0 while the account is not durable."""
    @property
    def pending(self) -> tuple[int, int]:
        """(tot, seq) with every applied change, durable or not."""
    @property
    def low(self) -> int | None:
        """Its low-balance threshold; None: the ledger's default."""
    @property
    def open_holds(self) -> int: ...
    @property
    def held(self) -> int:
        """What its open holds took (pending, like ptot)."""

class Batch:
    @property
    def no(self) -> int:
        """Batches are numbered in the order they are made, sealed and made durable."""
    @property
    def nmods(self) -> int: ...
    @property
    def ndeletes(self) -> int: ...
    @property
    def wal(self) -> bytearray:
        """Its log record's payload: its puts, then (once sealed) its changes."""
    @property
    def changes(self) -> bytearray:
        """An entry per change (ext/changes.pxi)."""
    @property
    def first_event(self) -> int: ...
    @property
    def nevents(self) -> int: ...
    @property
    def done_loop(self) -> list[tuple[Done, Outcome]]: ...
    @property
    def done_direct(self) -> list[tuple[Done, Outcome]]: ...

class PendingKey:
    """An idempotency key whose change is applied but not yet durable."""

class Hold:
    """An open hold, or one whose end is not durable yet (holds.pxi)."""

class Book:
    """Accounts in memory and the batches that make them durable."""
    open_batches: list[Batch]
    queued_mods: int
    batch_mods_max: int
    queued_mods_max: int
    open_holds: int
    open_holds_durable: int
    accounts_durable: int
    holds_max: int
    holds_per_account_max: int
    holds_expired: int
    next_event: int
    events_first: int
    low_default: int | None
    failed: bool
    durable_no: int
    unapplied: list[Batch]
    failed_no: int
    failed_untried: bool
    def __init__(self, salt: bytes, get: Callable[[bytes], bytes | None],
                 batch_mods_max: int = ..., queued_mods_max: int = ...,
                 next_event: int = 1, low_default: int | None = None,
                 holds_max: int = ..., holds_per_account_max: int = ...) -> None: ...
    def load(self, hid: bytes, tot: int, seq: int) -> None:
        """Adds an account read from the store at open."""
    def load_low(self, hid: bytes, low: int) -> None: ...
    def load_hold(self, hid: bytes, hold: int, amount: int, expires_ms: int) -> None: ...
    def __len__(self) -> int: ...
    def hid_of(self, cred: str) -> bytes: ...
    def tot(self, cred: str) -> int | None:
        """The durable balance of `cred`, or None when it has no durable account."""
    def account(self, cred: str) -> Account | None:
        """The account with durable state, or None."""
    def read_ordered(self, cred: str, what: int, done: Done, on_loop: bool) -> Any:
        """A read pipelined behind writes: the value now, NoAccount, or None
        when `done` waits for the account's pending batch."""
    def apply(self, cred: str, by: int, min_: int | None, key: str | None, done: Done,
              on_loop: bool, at_ms: int, low: int | None = None) -> Outcome | None:
        """Applies one mod to the pending state; None when `done` waits for
        a batch, else the final outcome.  Raises BadRequest, Unavailable, Busy."""
    def hold(self, cred: str, by: int, ttl_s: int, min_: int | None, key: str | None,
             done: Done, on_loop: bool, at_ms: int) -> Outcome | None: ...
    def settle(self, cred: str, hold: int, use: int, done: Done, on_loop: bool,
               at_ms: int) -> Outcome | None: ...
    def expire_due(self, now_ms: int, most: int) -> int:
        """Ends at most `most` holds due by `now_ms`; how many it ended."""
    def next_expiry_ms(self) -> int | None:
        """When the next open hold is due, or None."""
    def has_work(self) -> bool: ...
    def delete(self, key: bytes) -> None:
        """A record deleted in the filling batch (events past retention)."""
    def seal(self) -> Batch: ...
    def finish(self, batch: Batch) -> None:
        """The batch is durable: its balances become visible."""
    def applied(self, batch: Batch) -> None:
        """LevelDB has the batch: what it stored is read from there."""
    def history_tail(self, hid: bytes, first: int, last: int) -> list[tuple[int, bytes]]:
        """(seq, history value) of the durable batches LevelDB lacks."""
    def fail(self, batch: Batch | None, tried: bool = True) -> list[Batch]: ...

class Lane:
    """The server's C-level way into the book (ext/lane.pxi): mods and /tot
    reads for ext/pipeline.pyx, with no Python call per request.  It has
    no Python methods."""
    def __init__(self, book: Book, committer: Any, failed_details: tuple[str, str],
                 wall_clock: bool) -> None: ...
