"""Schema version 3: cursors of readers of the event stream, kept in the
store (accman.postgres.cursors), so that the front-ends of one store share
the webhook's cursor and one of them delivers each event.
"""

V3 = """
-- How far a reader of the event stream has got: the webhook's receiver has
-- acknowledged every event up to `value`.  On the events' home cluster.
CREATE TABLE accman_cursors (
    name text PRIMARY KEY CHECK (name ~ '^[a-z][a-z0-9_-]{0,31}$'),
    value bigint NOT NULL CHECK (value >= 0)
);
"""
