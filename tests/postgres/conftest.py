"""Fixtures that start real PostgreSQL servers (tests/postgres/pgcluster.py).

    def test_x(pg_url):          # a fresh, empty database on the shared server
    def test_y(pg):              # the session's server itself (a Cluster)
    def test_z(pg_factory):      # servers of the test's own, destroyed after it

One server is started per test session and torn down at its end (`pg`, in
tests/conftest.py: the server fixtures' "postgresql" store runs on it too);
each test gets a database of its own on it, so tests cannot see each
other's accounts.  Tests that kill or promote servers make their own.
"""

import itertools

import pytest

from .pgcluster import Cluster

_db_numbers = itertools.count(1)


@pytest.fixture
def pg_url(pg):
    return pg.create_database(f"t{next(_db_numbers)}")


@pytest.fixture
def pg_factory():
    made = []

    def make(**kw):
        c = Cluster.create(**kw)
        made.append(c)
        return c

    try:
        yield make
    finally:
        for c in made:
            c.destroy()
