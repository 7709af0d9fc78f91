"""The figures: which route, at which connections, for each server, and how
each server is funded and warmed up before them.

    tot             GET /tot of one funded credential
    tot_pipelined   the same, PIPELINE_DEPTH requests per write
    mod             durable PATCH `by=-1&min=0`, cycling over CYCLE_CREDS funded credentials
    mod_pipelined   the same, PIPELINE_DEPTH requests per write
    mod_unique      durable PATCH `by=1`, a new credential every request

Redis runs the same shapes with redis-benchmark: GET of one key for /tot,
INCRBY -1 over CYCLE_CREDS keys for /mod, INCRBY 1 of a new key for the new
credential, with `-P PIPELINE_DEPTH` for the pipelined rows.  nginx has only
the /tot rows: its static 200 is the /tot reply's size.
"""

import itertools

from .base import BenchError
from .runners import RedisBenchmark, fund_accounts, run_wrk

SCENARIOS = {
    # name: (title, connections)
    "tot": ("/tot", (1, 16, 64)),
    "tot_pipelined": ("/tot pipelined x16", (16, 64)),
    "mod": ("/mod durable", (1, 16, 64)),
    "mod_pipelined": ("/mod durable pipelined x16", (16, 64)),
    "mod_unique": ("/mod durable, new cred", (64,)),
}
DURABLE = ("mod", "mod_pipelined", "mod_unique")
DURATION_S = 5                   # per measured figure
WARMUP_S = 1                     # per server, not recorded
PIPELINE_DEPTH = 16
PACE_MEAN_MS = 3                 # mod_paced: each caller's mean wait between calls
CYCLE_CREDS = 1000               # /mod cycles over this many funded accounts
CYCLE_PREFIX = "bench-"
FUND_BY = 10 ** 12               # no charge of a run is refused for want of funds
TOT_CRED = "bench-0"             # the /tot credential: the first cycled account
WARMUP_CONNECTIONS = 64
READ_ONLY = ("tot", "tot_pipelined")


def keys(scenarios=SCENARIOS):
    """Every (scenario, connections) of the plan, in the order they are taken."""
    return [(s, c) for s, (_, conns) in scenarios.items() for c in conns]


# The wrk script of each scenario (bench/wrk/), and its arguments.
WRK_SCRIPTS = {
    "tot": "tot.lua",
    "tot_pipelined": "tot_pipeline.lua",
    "mod": "mod_cycle.lua",
    "mod_pipelined": "mod_pipeline.lua",
    "mod_unique": "mod_unique.lua",
}


def wrk_runners(server, run_id, only=None):
    """{(scenario, conns): runner(duration_s)} for an HTTP server with /tot
    and /mod; `only` limits the scenarios."""
    unique = itertools.count()
    args = {
        "tot": lambda: [TOT_CRED],
        "tot_pipelined": lambda: [TOT_CRED, PIPELINE_DEPTH],
        "mod": lambda: [CYCLE_PREFIX, CYCLE_CREDS],
        "mod_pipelined": lambda: [CYCLE_PREFIX, CYCLE_CREDS, PIPELINE_DEPTH],
        # A prefix per run, so that every round opens new accounts.
        "mod_unique": lambda: [f"u{run_id}-{next(unique)}-"],
    }

    def runner(scenario, conns):
        def run(duration_s):
            return run_wrk(server.url, WRK_SCRIPTS[scenario], args[scenario](), conns,
                           duration_s, server.pid)
        return run
    return {(s, c): runner(s, c) for s, c in keys() if only is None or s in only}


def redis_runners(server, run_id):
    port, pgid = server.port, server.pid

    def bench(command, c, pipeline=1, keyspace=None):
        runs = RedisBenchmark(port, command, c, pipeline, keyspace)
        return lambda d: runs(d, pgid)

    get = ["GET", "bench:tot"]
    incr = ["INCRBY", "bench:__rand_int__", "-1"]
    new = ["INCRBY", f"u{run_id}:__rand_int__", "1"]
    shapes = {
        "tot": lambda c: bench(get, c),
        "tot_pipelined": lambda c: bench(get, c, PIPELINE_DEPTH),
        "mod": lambda c: bench(incr, c, keyspace=CYCLE_CREDS),
        "mod_pipelined": lambda c: bench(incr, c, PIPELINE_DEPTH, keyspace=CYCLE_CREDS),
        "mod_unique": lambda c: bench(new, c, keyspace=10 ** 12),
    }
    return {(s, c): shapes[s](c) for s, c in keys()}


def prepare_http(server, warmup_s):
    """Fund the cycled accounts, then warm /tot and /mod up (not recorded)."""
    fund_accounts(server.port, CYCLE_PREFIX, CYCLE_CREDS, FUND_BY)
    run_wrk(server.url, WRK_SCRIPTS["tot"], [TOT_CRED], WARMUP_CONNECTIONS, warmup_s)
    run_wrk(server.url, WRK_SCRIPTS["mod"], [CYCLE_PREFIX, CYCLE_CREDS], WARMUP_CONNECTIONS,
            warmup_s)


def prepare_nginx(server, warmup_s):
    run_wrk(server.url, WRK_SCRIPTS["tot"], [TOT_CRED], WARMUP_CONNECTIONS, warmup_s)


def prepare_redis(server, warmup_s):
    """The /tot key; redis-benchmark's sizing probes are its warm-up."""
    reply = server.command("SET", "bench:tot", str(FUND_BY))
    if not reply.startswith(b"+OK"):
        raise BenchError(f"redis SET answered {reply[:80]!r}")


# name: (prepare(server, warmup_s), runners(server, run_id))
PLANS = {
    "accman": (prepare_http, wrk_runners),
    "sketch": (prepare_http, wrk_runners),
    "uvicorn": (prepare_http, wrk_runners),
    "nginx": (prepare_nginx, lambda server, run_id: wrk_runners(server, run_id, READ_ONLY)),
    "redis": (prepare_redis, redis_runners),
}
