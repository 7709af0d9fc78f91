"""LevelDB through plyvel, behind AccMan's write-ahead log (accman.ledger.wal):
open, lock, recover, load, verify, write batches.

plyvel's and the OS's errors become AccMan's in one place
(accman.ledger.plyvel_errors.translated), the way plyvel itself raises
every LevelDB status through one `raise_for_status`.
"""

from __future__ import annotations

import collections
import contextlib
import hmac
import json
import logging
import os
import threading

import plyvel

from accman.errors import CheckpointPostponed, FileDamage, StoreCorrupt, StoreError, WriteRefused
from accman.ledger import (_ledger, copies, datadir, found, fsck, histories, keyfile, migrate,
                           unshared, wal, walwriter)
from accman.ledger.plyvel_errors import translated

log = logging.getLogger("accman.ledger.leveldb")

META_KEY = migrate.META_KEY   # sorts before every account, history and key record
# Bumped with a migration when a record format changes (accman.ledger.migrate
# says what each format changed, and how an older one is brought forward).
STORE_FORMAT = 5
# LevelDB's defaults (4 MiB write buffer, 8 MiB block cache) are for small
# uses; a million accounts' records read at open and /past at random want more.
WRITE_BUFFER_BYTES = 16 * 1024 * 1024
BLOCK_CACHE_BYTES = 64 * 1024 * 1024
# Durable batches that LevelDB may lack at once, and their records' bytes:
# the committer writes them behind the acknowledgements (accman.ledger.
# applier); past either the writer applies them itself, so that the book's
# memory of what LevelDB lacks (and a /past's tail, which scans it) stays small.
APPLY_LAG_BATCHES_MAX = 32
APPLY_LAG_BYTES_MAX = 8 * 1024 * 1024


class Store:
    """One LevelDB directory and AccMan's write-ahead log (accman.ledger.wal)
    in it, opened by one process at a time."""

    def __init__(self, path: str, *, create: bool = True, check_files: bool = True,
                 wal_bytes_max: int = wal.WAL_BYTES_MAX,
                 wal_overrun_bytes_max: int = walwriter.WAL_OVERRUN_BYTES_MAX,
                 read_only: bool = False):
        """`check_files`: check every log record's and table block's CRC
        (accman.ledger.fsck) before LevelDB opens the directory, so that
        damage is refused before LevelDB's recovery can drop or rewrite
        anything.  Recovery (accman.ledger.wal) runs either way.

        `read_only`: change no file of the directory (`accman verify`, a
        read-only copy or mount): recovery and LevelDB run in a private
        copy (accman.ledger.copies.snapshot), under a shared lock that no
        server holds.  Reads only; there is nothing to write to."""
        self.path = os.path.abspath(datadir.checked_path(path))     # named in every message
        self.dir = self.path                    # where the files are opened
        self.read_only = read_only
        self._lock_fd, self._scratch = -1, None
        self.created = False        # this open made the store (a refused start takes it back)
        self.wal = None
        self.db = None
        self._upgrade = None        # the format record, rewritten after recovery
        self._from_format = STORE_FORMAT
        # Durable batches' records that LevelDB lacks, oldest first (write, apply).
        self._queued = collections.deque()
        self._apply_lock = threading.Lock()
        self.applied = 0
        self.forked = False         # in a child after fork(): see `fork_child`
        try:
            self._open(create, check_files, (wal_bytes_max, wal_overrun_bytes_max))
        except BaseException:
            self.close(checkpoint=False)
            raise

    def _open(self, create: bool, check_files: bool, wal_bytes: tuple) -> None:
        with translated(self.path, "open"):
            existed = os.path.isdir(self.path)
            if not existed and (self.read_only or not create):
                raise StoreError(f"{self.path}: no such data directory")
            if self.read_only:
                self._lock_fd = datadir.lock_shared(self.path)
                self.dir = self._scratch = copies.scratch_path()     # close removes it
                copies.snapshot(self.path, self._scratch)
            else:
                datadir.check_usable(self.path)
                if existed and not create and datadir.holds_nothing(self.path):
                    # Refused before the lock, whose file would be left behind.
                    raise StoreError(f"{self.path}: no store in this directory")
                datadir.make(self.path)
                self._lock()
            salt, sealed, ckpt, records = self._recover(existed, check_files, create)
            if existed and salt is None:
                # A store from before the key file: its key (the format
                # record's) pending before LevelDB's first change to it (an
                # upgrade of format 1, the log's first record).
                salt = found.key_of_keyless(self.dir, self.path, ckpt)
                if not self.read_only:
                    keyfile.write_key(self._dir_fd(), salt)
            elif existed:
                found.refuse_if_locked(self.dir, self.path)
            if not self.read_only:
                # After every check: a refused store is left as it was found.
                # Before LevelDB's first file: the default ACL makes it 0600.
                changed = datadir.tighten(self.path)
                if changed and existed:
                    log.info("%s: made the data directory 0700 and its files 0600 "
                             "(%d were open to others)", self.path, len(changed))
            self.db = plyvel.DB(
                self.dir,
                create_if_missing=create,
                paranoid_checks=True,
                write_buffer_size=WRITE_BUFFER_BYTES,
                lru_cache_size=BLOCK_CACHE_BYTES,
            )
            self.unshared = unshared.CloseOnExec(self.dir)
            datadir.sync_leveldb_current(self.dir)
        # LevelDB is written outside the log only here, before a store's
        # first checkpoint: the format record of a new store, and the
        # migration from format 1, which predates the log.  After a
        # checkpoint every LevelDB write is one record's batch, which is
        # what recovery's check of LevelDB's batches against the records relies on.
        self.salt = self._meta(salt)
        with translated(self.path, "replay the write-ahead log"):
            self._replay(records)
        with translated(self.path, "start the write-ahead log"):
            # The lsn due where the records end is skipped: a torn write of
            # it may lie there, and a write of the same lsn over it must not
            # make one record of the two writes' sectors (walsectors).
            next_lsn = (records[-1][0] + 2 if records
                        else ckpt.lsn + 1 if ckpt is not None else 1)
            self.wal = walwriter.Wal(self.dir, next_lsn, wal.Keys.of(self.salt), *wal_bytes)
            # Replayed records synced in LevelDB, and the log starts afresh:
            # before anything is written at its start, over records that
            # LevelDB's synced files may lack.
            self.checkpoint_at_open("recovery")
            if not sealed and not self.read_only:
                keyfile.seal_key(self._dir_fd())        # its first checkpoint is written
            if self._upgrade is not None:
                migrate.through_log(self, self._upgrade, self._from_format)

    def _replay(self, records) -> None:
        """The log's records after the checkpoint, written into LevelDB (in
        a store from before format 5, with the deletes of the history
        records that the replay's cover: migrate.covered_records)."""
        covered = 0
        for _, puts in records:
            if self._from_format < 5:
                deletes = migrate.covered_records(self.db, self.path, puts)
                covered += len(deletes)
                puts = puts + deletes
            wb = self.db.write_batch(transaction=True)
            for k, v in puts:
                if v is None:
                    wb.delete(k)        # events past their retention; covered records
                else:
                    wb.put(k, v)
            wb.write()
        if records:
            log.info("%s: recovery: replayed %d batches from %s%s", self.path,
                     len(records), wal.WAL_NAME, f" ({covered} history records of format "
                     f"{self._from_format} replaced)" if covered else "")

    def checkpoint_at_open(self, after: str) -> None:
        """Everything written so far applied and checkpointed (its step
        named in the error)."""
        self.apply()
        try:
            self.wal.checkpoint()
        except CheckpointPostponed as e:
            raise StoreError(f"{self.path}: open failed: the checkpoint after "
                             f"{after}: {e}") from e

    def _recover(self, existed: bool, check_files: bool, create: bool):
        """Recovery's steps 1 to 4 (accman.ledger.wal), then the file checks;
        returns the key (None for a store written before the key file),
        whether it is sealed (keyfile), the checkpoint and the records to
        replay, as (lsn, puts)."""
        path = self.dir
        salt, sealed = self._step(keyfile.read_key_sealed, path)
        keys = wal.Keys.of(salt) if salt is not None else None
        ckpt = self._checkpoint(path, salt, keys)
        if (ckpt is None and not os.path.exists(os.path.join(path, "CURRENT"))
                and not os.path.exists(os.path.join(path, wal.WAL_NAME))):
            if sealed:
                raise found.sealed_without_checkpoint(self.path)
            if fsck.has_leveldb_files(path) and not datadir.creation_cut_short(path):
                raise StoreCorrupt(f"{self.path}: LevelDB files without CURRENT: "
                                   "not an AccMan store, or damaged")
            if self.read_only or not create:
                if os.path.exists(os.path.join(self.path, datadir.FRONTEND_MARK)):
                    raise StoreError(f"{self.path}: holds the lock of a front-end of a "
                                     f"PostgreSQL store ({datadir.FRONTEND_MARK}), not an "
                                     "embedded store: its balances are in PostgreSQL")
                raise StoreError(f"{self.path}: no store in this directory")
            # A new store (or one whose creation a crash cut short: nothing
            # was stored yet): its key first, then LevelDB's first files.
            if salt is None:
                salt = keyfile.new_salt()
                keyfile.write_key(self._dir_fd(), salt)
            datadir.write_new_leveldb(path)
            self.created = True
            return salt, False, None, []
        records = []
        # Another LevelDB (not an AccMan: it would hold our lock) has the
        # directory: its files are changing under us, so neither read nor
        # cut nor checked, and found refuses it as locked.
        if existed and not datadir.locked_elsewhere(path):
            records = self._checked_records(path, salt, keys, ckpt, check_files)
        if sealed and ckpt is None:
            raise found.sealed_without_checkpoint(self.path)    # after the log's own refusal
        return salt, sealed, ckpt, records

    def _checkpoint(self, path: str, salt: bytes | None, keys):
        """The checkpoint; one failing its MAC is said as the key file's damage
        when the key is another store's (found.name_the_key)."""
        try:
            return self._step(wal.read_checkpoint, path, keys)
        except StoreCorrupt:
            if salt is not None:
                found.name_the_key(path, self.path, salt)
            raise

    def _checked_records(self, path: str, salt: bytes | None, keys, ckpt, check_files):
        """The log's records to replay, read and parsed (refused if damaged);
        LevelDB's logs cut once every check has passed, not before."""
        records = [(rec.lsn, self._puts_of(rec))
                   for rec in self._step(wal.scan, path, ckpt, keys)]
        cuts = None                 # no checkpoint: nothing to cut by
        if ckpt is not None:
            cuts = self._step(wal.logs_to_cut, path, ckpt)
        if check_files:             # the logs as they will be once cut
            fsck.check_dir(path, synced_logs=ckpt.logs if ckpt is not None else None,
                           shown_as=self.path)
        fmt = (found.refuse_another_key(path, self.path, salt, cuts, STORE_FORMAT)
               if salt is not None else None)
        if ckpt is not None:        # after the key: a key of another store is named as such
            # An older AccMan laid its records' batches out otherwise:
            # those are counted, not compared.
            self._step(wal.check_leveldb_tail, ckpt, records,
                       self._step(fsck.batches_after, path, ckpt.logs),
                       _ledger.leveldb_batch_body if fmt == STORE_FORMAT else None)
        if cuts:
            wal.cut_logs(path, cuts)
            log.info("%s: recovery: cut %d unsynced bytes from LevelDB's logs, to be "
                     "replayed from %s", self.path, sum(cuts.values()), wal.WAL_NAME)
        return records

    def _dir_fd(self) -> int:
        """The directory's descriptor, held while the store is open (the log's once it exists)."""
        if self.wal is not None:
            return self.wal.dir_fd
        if getattr(self, "_open_dir_fd", -1) < 0:
            self._open_dir_fd = os.open(self.dir, os.O_RDONLY | os.O_DIRECTORY)
        return self._open_dir_fd

    def _puts_of(self, rec: wal.Record) -> list:
        try:
            return _ledger.leveldb_puts(rec.payload)
        except ValueError as e:
            raise StoreCorrupt(f"{self.path}: {wal.WAL_NAME}: record {rec.lsn}: {e}; "
                               "refusing to serve, nothing repaired") from None

    def _step(self, fn, *args):
        """One step of recovery; a damaged file becomes StoreCorrupt, naming
        the directory as the caller knows it."""
        try:
            return fn(*args)
        except FileDamage as e:
            raise StoreCorrupt(f"{self.path}: {e}; refusing to serve, nothing "
                               "repaired") from None

    def _lock(self) -> None:
        """One AccMan process per directory, taken before recovery edits a
        file: a flock on LevelDB's LOCK file (independent of LevelDB's own
        fcntl lock on it, which it takes when it opens)."""
        self._lock_fd = datadir.lock_exclusive(self.path)

    def _meta(self, salt: bytes | None) -> bytes:
        """The format record: checked, migrated, or written in a new store
        with the key file's `salt`.  Returns the key that hashes credentials;
        the key file's copy (`salt`, None if there is none yet) must agree."""
        with translated(self.path, "read the format record"):
            raw = self.db.get(META_KEY, verify_checksums=True)
            if raw is None:
                with self.db.iterator(include_value=False) as it:
                    if next(it, None) is not None or salt is None:
                        raise StoreCorrupt(f"{self.path}: records without a format "
                                           "record: not an AccMan store, or damaged")
                meta = {"format": STORE_FORMAT, "salt": salt.hex()}
                self.db.put(META_KEY, json.dumps(meta).encode(), sync=True)
                return salt
        try:
            meta = json.loads(raw)
            fmt, stored = meta["format"], bytes.fromhex(meta["salt"])
        except (ValueError, KeyError, TypeError, RecursionError) as e:
            raise StoreCorrupt(f"{self.path}: unreadable format record") from e
        if len(stored) != keyfile.SALT_BYTES:
            raise StoreCorrupt(f"{self.path}: bad credential-hash key length")
        if salt is not None and not hmac.compare_digest(salt, stored):
            raise found.key_mismatch(self.path)
        if fmt == 1:       # holds came with format 2: no open-hold records to write
            with translated(self.path, "migrate from store format 1"):
                migrate.from_format_1(self.db, self.path, dict(meta, format=STORE_FORMAT))
        elif fmt in (2, 3, 4):
            self._from_format = fmt
            self._upgrade = dict(meta, format=STORE_FORMAT)
        elif fmt != STORE_FORMAT:
            raise found.newer_format(self.path, fmt, STORE_FORMAT)
        return stored

    # -- reads ---------------------------------------------------------------

    def accounts(self):
        """Yields (hid, tot, seq) of every account: its history's newest entry."""
        return histories.newest(self.db, self.path)

    def open_holds(self):
        """Yields (hid, hold, amount, expires_ms) of every open hold, found
        by the open-hold records alone: an ended hold is not read."""
        with translated(self.path, "load holds"):
            for k, v in self.iterate(_ledger.OPEN_HOLD_PREFIX):
                yield histories.open_hold(self.db, self.path, k, v)

    def check_all_blocks(self) -> int:
        """Reads every record once with checksums verified, so that a
        flipped byte anywhere in a table is found now, at open, rather than
        when a page of history happens to read it.  Returns the count."""
        n = 0
        with translated(self.path, "check every record"):
            with self.db.iterator(include_value=False, verify_checksums=True,
                                  fill_cache=False) as it:
                for _ in it:
                    n += 1
        return n

    def get(self, key: bytes):
        with translated(self.path, "read"):
            return self.db.get(key, verify_checksums=True)

    def history(self, hid: bytes, first_seq: int, last_seq: int) -> dict:
        """{seq: (by, tot, at_ms, key, hold)} of the entries
        first_seq..last_seq that LevelDB holds."""
        return histories.page(self.db, self.path, hid, first_seq, last_seq)

    def scan(self, start: bytes, prefix: bytes, limit: int) -> list:
        """Up to `limit` (key, value) records from `start` on, under `prefix`."""
        out = []
        stop = prefix[:-1] + bytes([prefix[-1] + 1])
        with translated(self.path, "scan"):
            with self.db.iterator(start=start, stop=stop, verify_checksums=True) as it:
                for kv in it:
                    out.append(kv)
                    if len(out) >= limit:
                        break
        return out

    def iterate(self, prefix: bytes, start: bytes | None = None):
        """Every (key, value) under a prefix (from `start` on), in order."""
        stop = prefix[:-1] + bytes([prefix[-1] + 1])
        with translated(self.path, "scan"):
            with self.db.iterator(start=start or prefix, stop=stop, verify_checksums=True,
                                  fill_cache=False) as it:
                yield from it

    # -- writes ----------------------------------------------------------------

    def write(self, wal_record) -> None:
        """Makes one batch durable: `wal_record` (its puts in the log's
        encoding, ext/ledger.pyx) to the write-ahead log, GIL released.
        LevelDB's write of it is queued for `apply`, off the acknowledgement
        path (unsynced: the record is what makes it durable).  At APPLY_LAG_*
        queued, and before a record that wraps the log (its checkpoint needs
        every record so far in LevelDB), the queued ones are applied here
        first.  After a failure (`broken`) no write is taken, nor a
        checkpoint (`apply`), so the next open replays the failed batch's
        record if it reached the disk: all of the batch, or none of it."""
        if self.wal.broken:
            raise WriteRefused(f"{self.path}: commit failed: refused, since a write before it "
                               "failed (logged as it failed); no more writes until the store "
                               "is reopened")
        if (len(self._queued) >= APPLY_LAG_BATCHES_MAX or self.wal.wraps(len(wal_record))
                or sum(map(len, self._queued)) >= APPLY_LAG_BYTES_MAX):
            self.apply()
        with translated(self.path, "commit"):
            try:
                self.wal.append(wal_record)
            except BaseException:
                self.wal.broken = True
                raise
        self._queued.append(wal_record)

    def apply(self) -> int:
        """Writes the queued durable batches into LevelDB, oldest first
        (any thread; one at a time).  Returns how many batches `write` has
        had applied since open.  After a failure (`broken`) LevelDB is not
        written again, nor a checkpoint taken: a LevelDB write that failed
        may have left part of its batch in LevelDB's log, which a retry
        would follow with the whole batch, and on a full disk a retry is
        busy work.  The log holds every queued batch whole and the next open
        replays them; until then the book keeps what LevelDB lacks."""
        with self._apply_lock:
            while self._queued and not self.wal.broken:
                with translated(self.path, "commit"):
                    try:
                        wb = self.db.write_batch()
                        _ledger.fill_write_batch(wb, self._queued[0])
                        wb.write()
                    except BaseException:
                        self.wal.broken = True
                        raise
                self._queued.popleft()
                self.applied += 1
            self.unshared.after_write()
            return self.applied

    def level0_files(self) -> int | None:
        """The tables in LevelDB's level 0 (its compaction's backlog); None once closed."""
        try:
            return int(self.db.get_property(b"leveldb.num-files-at-level0"))
        except (AttributeError, RuntimeError, TypeError, ValueError):
            return None     # closed (plyvel's RuntimeError), never opened, or not a count

    def lock_copy(self) -> int:
        """A copy of the lock's descriptor: its flock outlives close until this is closed."""
        return os.dup(self._lock_fd)

    def fork_child(self) -> None:
        """In a child after fork() (accman.ledger.forked): the child's copy
        of the flock's descriptor is closed (the parent keeps the lock), and
        from now on close writes and closes nothing: the files are the
        parent's, and LevelDB's close would wait for its threads."""
        self.forked = True
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1

    def close(self, *, checkpoint: bool = True) -> None:
        """Closes LevelDB and the log, after a checkpoint (so that the next
        open has nothing to replay) unless a write failed.  A checkpoint
        that cannot be taken is logged: the next open replays the log.
        In a forked child it does nothing (fork_child)."""
        if self.forked:
            return
        try:
            if self.db is not None and not self.db.closed:
                if checkpoint and self.wal is not None and not self.wal.broken:
                    self.apply()
                    with translated(self.path, "checkpoint at close"):
                        try:
                            self.wal.checkpoint()
                        except CheckpointPostponed as e:
                            log.warning("%s: no checkpoint at close (the next open "
                                        "replays the log, nothing is lost): %s",
                                        self.path, e)
        finally:
            self._release()

    def _release(self) -> None:
        """The log's files, LevelDB, the descriptors, then the private copy
        (it holds the key): each released even when a stop (^C) lands while
        one before it is, so that a close that raised leaves the directory
        free to open.  (ExitStack runs its callbacks last first, each one.)"""
        with contextlib.ExitStack() as each:
            each.callback(self._remove_scratch)
            each.callback(self._close_descriptors)
            if self.db is not None and not self.db.closed:
                each.callback(self.db.close)
            if self.wal is not None:
                each.callback(self.wal.close)

    def _close_descriptors(self) -> None:
        if getattr(self, "_open_dir_fd", -1) >= 0:
            os.close(self._open_dir_fd)
            self._open_dir_fd = -1
        if self._lock_fd >= 0:
            os.close(self._lock_fd)       # releases the flock, but for a lock_copy
            self._lock_fd = -1

    def _remove_scratch(self) -> None:
        if self._scratch is not None:
            copies.remove_snapshot(self._scratch)
            self._scratch = None
