"""What makes clusters one store, and the checks `serve` and `migrate`
make of the clusters they are given before they change or serve any
(accman.postgres.migrate does the changing).

Every cluster of a store holds the same credential-hash key and its own
random cluster id, and records the store's events' home; the home records
the other clusters (accman_merged).  A store's setup is not one
transaction: `accman migrate` migrates each cluster in its own, then
records the home on each, the home first.  Until the home is recorded
there, a cluster that a migrate of several is setting up (one that holds
no account: one that does is a store of one already) holds in
events_home how many clusters that migrate was given (setting_up): serve
and migrate refuse it given with another count, so that no cluster of a
store meant to be several serves as a store of one and opens accounts that
the store of several would then look for on another cluster.  The count is
all a cluster can hold then: the ids of the clusters not migrated yet do
not exist, and the order of the --store URLs is not part of a store (an
account's cluster is chosen by rendezvous hashing over the ids).
"""

from __future__ import annotations

from typing import NamedTuple

from accman.errors import StoreError
from accman.postgres.connecting import DRIVER_ERRORS
from accman.postgres.errors import CausedStoreError, describe, store_error
from accman.postgres.schema import SCHEMA_VERSION

CLUSTER_ID_BYTES = 16
# The schema version that records the events' home (schema_v2): a store of
# several clusters at an older one numbered its events on each.
HOME_SCHEMA_VERSION = 2
# events_home of a cluster being set up by a migrate of several, before the
# home is recorded there: these 12 zero bytes, then the count of clusters it
# was given (4 bytes, big-endian).  A random cluster id begins so once in
# 2**96; it fits the column's check (16 bytes), so the schema's version
# stays, and an AccMan that does not know it refuses the cluster as one
# whose events' home is not given.
SETUP_PREFIX = bytes(12)


class ClusterInfo(NamedTuple):
    version: int
    hash_key: bytes
    cluster_id: bytes
    events_home: bytes | None = None
    # On the events' home of a store of several: the other clusters' ids.
    members: frozenset = frozenset()

    @property
    def home(self) -> bytes | None:
        """The store's events' home as recorded here, None while not."""
        return None if self.setup_of is not None else self.events_home

    @property
    def setup_of(self) -> int | None:
        """How many clusters the migrate setting this one up was given,
        while that setup has not recorded the home here."""
        h = self.events_home
        if h is None or h[:len(SETUP_PREFIX)] != SETUP_PREFIX:
            return None
        return int.from_bytes(h[len(SETUP_PREFIX):], "big")


def setting_up(count: int) -> bytes:
    """events_home of a cluster being set up by a migrate of `count`."""
    return SETUP_PREFIX + count.to_bytes(CLUSTER_ID_BYTES - len(SETUP_PREFIX), "big")


def check_version(version: int) -> None:
    if version > SCHEMA_VERSION:
        raise StoreError(f"the store's schema is version {version}, newer than this "
                         f"AccMan's {SCHEMA_VERSION}: upgrade AccMan")


def which(numbers: list[int], count: int) -> str:
    """Clusters named by their place among the store's URLs (from 1), as
    /health and the log name them: "a cluster" on a store of one."""
    if count == 1:
        return "a cluster"
    return f"cluster{'s' * (len(numbers) > 1)} {', '.join(map(str, numbers))} of {count}"


async def of_cluster(step, n: int, count: int):
    """Awaits `step`, a step on the cluster given `n`th (from 0) of `count`:
    its StoreError names the cluster when the store has several."""
    try:
        return await step
    except StoreError as e:
        if count == 1:
            raise
        raise CausedStoreError(f"{which([n + 1], count)}: {e.detail}",
                               describe(e)) from None


def check_not_twice(infos: list[ClusterInfo | None]) -> None:
    first = {}
    for n, i in enumerate(infos, 1):
        if i is not None and first.setdefault(i.cluster_id, n) != n:
            raise StoreError(f"{which([first[i.cluster_id], n], len(infos))} are the same "
                             "cluster, named twice")


def check_before_migrating(infos: list[ClusterInfo | None]) -> None:
    """What `migrate` refuses before it changes anything: a schema newer
    than this AccMan's, clusters of two stores, one named twice, some
    clusters of a store of several without the others (more than the store
    has is a cluster being added), and a cluster whose setup is unfinished
    given with another count than its setup's."""
    found = [i for i in infos if i is not None]
    for i in found:
        check_version(i.version)
    if len({i.hash_key for i in found}) > 1:
        raise StoreError("the clusters disagree on the credential-hash key: they are not "
                         "one store")
    check_not_twice(infos)
    _check_members(found, exact=False)
    check_setup_count(infos)


def served_if_growing(infos: list[ClusterInfo | None]) -> list[int]:
    """The clusters (1-based) of a store set up already, a store of one or
    one whose home records its clusters, that `infos` gives more clusters
    beside (after check_before_migrating): front-ends may serve it, and
    must be stopped before one is added (accman.postgres.serving).  None
    for a store given whole, or a setup in progress (clusters marked by
    setting_up, or bare)."""
    homes = {i.home for i in infos if i is not None} - {None}
    if homes:
        home = next(i for i in infos if i is not None and i.cluster_id in homes)
        own = home.members | {home.cluster_id}
        served = [n for n, i in enumerate(infos, 1) if i is not None and i.cluster_id in own]
        return served if len(served) < len(infos) else []
    if len(infos) < 2:
        return []
    return [n for n, i in enumerate(infos, 1) if i is not None and i.setup_of is None]


def check_infos(infos: list[ClusterInfo | None]) -> bytes:
    """The store's hash key, after checking that the clusters make one
    store, all of it, at this AccMan's version, its setup finished."""
    check_setup_count(infos)
    bare = [n for n, i in enumerate(infos, 1) if i is None]
    if bare:
        raise StoreError(f"{which(bare, len(infos))} has no AccMan schema: run `accman "
                         "migrate --store URL` with every cluster's URL")
    if len({i.hash_key for i in infos}) != 1:
        raise StoreError("the clusters disagree on the credential-hash key: they are not "
                         "one store")
    check_not_twice(infos)
    for n, i in enumerate(infos, 1):
        if i.version != SCHEMA_VERSION:
            raise StoreError(f"{which([n], len(infos))}'s schema is version {i.version}, "
                             f"this AccMan's is {SCHEMA_VERSION}: run `accman migrate "
                             "--store URL`")
    if len(infos) > 1 and None in {i.home for i in infos}:
        raise StoreError("the store's setup by `accman migrate` was not finished: run "
                         "`accman migrate` with the same --store list to finish it")
    _check_members(infos, exact=True)
    return infos[0].hash_key


def _check_members(infos: list[ClusterInfo], exact: bool) -> None:
    """A store of several clusters is given whole (`exact`), or with more
    (a cluster being added, to `migrate`): a front-end given some of its
    clusters would open accounts where the others cannot see them, and
    number events on its own."""
    homes = {i.home for i in infos} - {None}
    if not homes:
        return
    if len(homes) > 1:
        raise StoreError("the clusters disagree on where the store's events are numbered: "
                         "they are not one store")
    home = homes.pop()
    given = {i.cluster_id: i for i in infos}
    if home not in given:
        raise StoreError("the store's events are numbered on a cluster not given: "
                         "give every cluster of the store with --store")
    store = given[home].members | {home}
    if not store <= given.keys() or (exact and store != given.keys()):
        were = "was" if len(given) == 1 else "were"
        raise StoreError(f"the store has {len(store)} clusters and {len(given)} {were} given "
                         f"({len(store & given.keys())} of its own): give every cluster of "
                         "the store with --store, or run `accman migrate` with all of them "
                         "to add one")


def check_setup_count(infos: list[ClusterInfo | None]) -> None:
    """A cluster whose setup is unfinished serves, and is migrated, only
    given with as many clusters as that setup was (or as a cluster the
    home records, whose record is then finished)."""
    recorded = set()
    for i in infos:
        if i is not None and i.home == i.cluster_id:
            recorded |= i.members
    wrong: dict[int, list[int]] = {}
    for n, i in enumerate(infos, 1):
        if i is not None and i.setup_of not in (None, len(infos)) \
                and i.cluster_id not in recorded:
            wrong.setdefault(i.setup_of, []).append(n)
    if wrong:
        meant, numbers = min(wrong.items())
        raise StoreError(f"{which(numbers, len(infos))} {'was' if len(numbers) == 1 else 'were'}"
                         f" being set up by `accman migrate` as part of a store of {meant} "
                         f"clusters, and that setup was not finished ({len(infos)} given): "
                         f"run `accman migrate` with the same {meant} --store URLs, which "
                         "finishes it")


def _unfinished(why: str, reason: str) -> StoreError:
    return StoreError(f"the store's setup by `accman migrate` was not finished ({why}){reason}; "
                      "stop the front-ends and run `accman migrate` with the same --store "
                      "list, which finishes it, then move the accounts of the clusters added "
                      '(docs/SCALING.md, "Several clusters")')


def _holding(held: list[int], count: int) -> str:
    return (f", and {which(held, count)} {'holds' if len(held) == 1 else 'hold'} accounts: "
            "serve does not finish the setup of a store that holds accounts")


async def check_not_growing(conns, infos: list[ClusterInfo | None]) -> None:
    """A front-end (`serve`) does not add a cluster to a store set up
    already: a front-end serving that store goes on with the clusters it
    has, and the accounts that rank the new cluster would answer
    `no_account` (a funding mod opening a second one).  Adding one is
    SCALING.md's procedure, with the front-ends stopped: `accman migrate`,
    then the accounts moved.

    The store set up already is the clusters its home records; with no
    cluster recorded as its own home, the clusters that name no home and
    bear no mark, each a store of one (or a store of several from before
    the home).  A cluster given beside it is refused; with no such store
    (new clusters, or a setup in progress: front-ends started together)
    nothing is.  The refusal says the setup was unfinished when a migrate
    cut short shows, by a home named that does not record itself (an
    AccMan that recorded the others first) or by a cluster marked by a
    migrate of this count; else that a cluster is being added, to a store
    that holds accounts or not."""
    count = len(infos)
    found = [i for i in infos if i is not None]
    home = next((i for i in found if i.home == i.cluster_id), None)
    own = (home.members | {home.cluster_id} if home is not None
           else {i.cluster_id for i in found if i.events_home is None})
    new = [n for n, i in enumerate(infos, 1) if i is None or i.cluster_id not in own]
    if not own or not new:
        return
    held = await _held(conns, infos, lambda i: i.cluster_id in own)
    named = [n for n, i in enumerate(infos, 1)
             if i is not None and i.cluster_id in {j.home for j in found}]
    if home is None and named:
        why = f"{which(named, count)}, the store's events' home, does not record its clusters"
    elif any(i.setup_of == count for i in found):
        why = (f"the home does not record {which(new, count)} yet" if home is not None else
               f"no cluster of the {count} given is recorded as the store's events' home")
    else:
        why = None
    if why:
        raise _unfinished(why, _holding(held, count) if held else
                          ": serve does not add a cluster to a store set up already")
    is_ = "is" if len(new) == 1 else "are"
    if held:
        raise StoreError(f"{which(new, count)} {is_} not of the store, which holds accounts "
                         f"(on {which(held, count)}): serve does not add a cluster, whose "
                         "accounts would not be found; stop the front-ends, run `accman "
                         'migrate` with every --store and move the accounts (docs/SCALING.md, '
                         '"Several clusters")')
    store = [n for n, i in enumerate(infos, 1) if i is not None and i.cluster_id in own]
    raise StoreError(f"{which(new, count)} {is_} not of the store, which {which(store, count)} "
                     f"already make{'s' * (len(store) == 1)}: serve does not add a cluster, "
                     "which a front-end serving the store would not know of; stop the "
                     "front-ends and run `accman migrate` with every --store "
                     '(docs/SCALING.md, "Several clusters")')


async def check_not_pending(conns, infos: list[ClusterInfo | None]) -> None:
    """A cluster the home records that does not record the home yet (a
    migrate adding it cut short between the two records) is finished by
    `serve` only while the store holds no account (front-ends started
    together on new clusters, one reading while another records): else
    the accounts that rank it are not moved yet, and finishing the setup
    is `accman migrate`'s, with the front-ends stopped, before they are.
    The clusters pending are read again after the accounts: one that
    records the home by then was finished meanwhile (by a front-end started
    together with this one), which may have opened the accounts since; a
    mark on a cluster the home records gives way only to the home, so one
    still there was there when the accounts were read."""
    homes = [i for i in infos if i is not None and i.home == i.cluster_id]
    pending = [n for n, i in enumerate(infos, 1) if homes and i is not None
               and i.setup_of is not None and i.cluster_id in homes[0].members]
    if not pending:
        return
    count = len(infos)
    held = await _held(conns, infos, lambda i: i.setup_of is None)
    if held:
        pending = [n for n in pending if await of_cluster(_marked(conns[n - 1]), n - 1, count)]
    if held and pending:
        raise _unfinished(f"{which(pending, count)} {'does' if len(pending) == 1 else 'do'} "
                          "not record the store's events' home yet", _holding(held, count))


async def check_homeless(conns, infos: list[ClusterInfo | None], grow: bool) -> None:
    """Clusters of AccMan's schema, several, none recorded as the events'
    home: as an `accman migrate` cut short before it recorded the home
    leaves them, or clusters given one key by such a migrate and then each
    served alone (by an AccMan that served such a cluster alone).  The home
    is chosen (settle_home) only while at most one of them holds accounts,
    whose events are then the store's: two that do are separate stores,
    each numbering its events from 1, and one made the other's home would
    number its events again, past the ids already read, and hide the
    accounts that rank the other cluster.  `serve` (not `grow`) chooses no
    home for a store that holds accounts: finishing a migration is
    `accman migrate`'s, with the front-ends stopped, and without the home's
    record a front-end cannot tell that it was given every cluster of the
    store.  A store with no account yet (front-ends started together on
    new clusters) is settled at start.  A store of several from before the
    home (HOME_SCHEMA_VERSION) gets one as ever: its clusters were one
    store, and it served no /events."""
    found = [(n, i) for n, i in enumerate(infos) if i is not None]
    if len(found) < 2 or any(i.home is not None or i.version < HOME_SCHEMA_VERSION
                             for _, i in found):
        return
    held = [n + 1 for n, _ in found
            if await of_cluster(holds_accounts(conns[n]), n, len(infos))]
    if len(held) > 1:
        raise StoreError(f"{which(held, len(infos))} each hold accounts and none is recorded "
                         "as the store's events' home: they are separate stores, each "
                         "numbering its events from 1, which AccMan does not merge; give "
                         "each its own --store")
    if held and not grow:
        raise _unfinished(f"no cluster of the {len(infos)} given is recorded as the store's "
                          "events' home", _holding(held, len(infos)))


async def _held(conns, infos: list[ClusterInfo | None], which_ones) -> list[int]:
    """The clusters (1-based) of `infos` that `which_ones` takes and that
    hold accounts."""
    return [n for n, (c, i) in enumerate(zip(conns, infos, strict=True), 1)
            if i is not None and which_ones(i)
            and await of_cluster(holds_accounts(c), n - 1, len(infos))]


async def _marked(conn) -> bool:
    """Whether the cluster's events_home is a setup's mark (setting_up)."""
    try:
        home = await conn.fetchval("SELECT events_home FROM accman_schema")
    except DRIVER_ERRORS as e:
        raise store_error(e, "cannot read the schema of a cluster of the store") from None
    return home is not None and bytes(home)[:len(SETUP_PREFIX)] == SETUP_PREFIX


async def holds_accounts(conn) -> bool:
    try:
        return await conn.fetchval("SELECT EXISTS (SELECT 1 FROM accman_accounts)")
    except DRIVER_ERRORS as e:
        raise store_error(e, "cannot read the accounts of a cluster of the store") from None
