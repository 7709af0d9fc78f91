"""Schema version 3: cursors of readers of the event stream, kept in the
store (accman.postgres.cursors), so that the front-ends of one store share
the webhook's cursor and one of them delivers each event.
"""

V3 = """
-- How far a reader of the event stream has got: the webhook's receiver has
-- acknowledged every event up to `value`.  `target` names the receiver
-- the last front-end to take the role delivered to (SHA-256 of its URL),
-- so that a front-end given another URL can say so.  On the events' home
-- cluster.
CREATE TABLE accman_cursors (
    name text PRIMARY KEY CHECK (name ~ '^[a-z][a-z0-9_-]{0,31}$'),
    value bigint NOT NULL CHECK (value >= 0),
    target bytea CHECK (target IS NULL OR length(target) = 32)
);
"""
