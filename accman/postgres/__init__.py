"""AccMan's store on PostgreSQL: accman/store.py's interface on one or more
PostgreSQL clusters (docs/SCALING.md).

Wiring it into the server is a few lines on the server's loop:

    from accman.postgres import PgStore, migrate_sync
    store = loop.run_until_complete(PgStore.open(urls, low_default=low))
    store.bind_loop(loop, deliver=server.deliver)
    ...
    loop.run_until_complete(store.aclose())      # or store.close() off the loop

and `accman migrate --store URL ...` is `print(migrate_sync(urls))`.  Both
raise accman.errors.StoreError with a sentence to show when a cluster
cannot be reached or is not (yet) an AccMan store.
"""

from accman.postgres.migrate import migrate, migrate_sync
from accman.postgres.store import PgStore

__all__ = ["PgStore", "migrate", "migrate_sync"]
