"""Type stubs of accman._ledger (ext/ledger.pyx): the in-memory book and the
record formats; no I/O."""

from collections.abc import Callable
from typing import Any, Final

FORMAT_VERSION: Final[int]
HID_BYTES: Final[int]
ACCOUNT_PREFIX: Final[bytes]      # store format 1 only
HISTORY_END: Final[bytes]
HISTORY_PREFIX: Final[bytes]
KEY_PREFIX: Final[bytes]

def pack_account(tot: int, seq: int) -> bytes:
    """A store-format-1 account record (for tests that build one)."""
def unpack_account(value: bytes) -> tuple[int, int]:
    """-> (tot, seq); ValueError when the record is not a version-1 account."""
def history_key(hid: bytes, seq: int) -> bytes: ...
def history_key_seq(key: bytes) -> int: ...
def unpack_history(value: bytes) -> tuple[int, int, int, str | None]:
    """-> (by, tot, at_ms, key or None)."""
def unpack_key(value: bytes) -> tuple[int, int, int, int | None]:
    """-> (seq, by, tot, min or None)."""

Outcome = tuple[int, int] | Exception

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
        """(tot, seq) with every applied mod, durable or not."""

class Batch:
    @property
    def wb(self) -> Any: ...
    @property
    def nmods(self) -> int: ...
    @property
    def done_loop(self) -> list[tuple[Callable[[Outcome], None], Outcome]]: ...
    @property
    def done_direct(self) -> list[tuple[Callable[[Outcome], None], Outcome]]: ...

class Book:
    queued_mods: int
    batch_mods_max: int
    queued_mods_max: int
    failed: bool
    open_batches: list[Batch]
    def __init__(self, salt: bytes, new_wb: Callable[[], Any],
                 get_key: Callable[[bytes], bytes | None],
                 batch_mods_max: int = ..., queued_mods_max: int = ...) -> None: ...
    def load(self, hid: bytes, tot: int, seq: int) -> None: ...
    def __len__(self) -> int: ...
    def hid_of(self, cred: str) -> bytes: ...
    def tot(self, cred: str) -> int | None: ...
    def account(self, cred: str) -> Account | None: ...
    def apply(self, cred: str, by: int, min_: int | None, key: str | None,
              done: Callable[[Outcome], None], on_loop: bool, at_ms: int) -> Outcome | None:
        """Applies one mod to the pending state; None when `done` waits for
        a batch, else the final outcome.  Raises BadRequest, Unavailable, Busy."""
    def has_work(self) -> bool: ...
    def seal(self) -> Batch: ...
    def finish(self, batch: Batch) -> None: ...
    def fail(self, batch: Batch) -> list[Batch]: ...

class Lane:
    """The server's C-level way into the book (ext/lane.pxi): mods and /tot
    reads for ext/pipeline.pyx, with no Python call per request.  It has
    no Python methods."""
    def __init__(self, book: Book, committer: Any, failed_detail: str,
                 wall_clock: bool) -> None: ...
