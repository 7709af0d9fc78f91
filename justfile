# AccMan tasks.  `just --list` shows them.  The venv is .venv, as in README.md.
py := ".venv/bin/python"

# create the venv and install AccMan with its test, benchmark and lint tools (editable)
setup:
    python3 -m venv .venv
    .venv/bin/pip install -e '.[dev]'

# recompile the Cython modules in ext/ in place
build:
    {{py}} setup.py build_ext --inplace

# the same with Cython's checks on (what CI runs the native tests against once)
build-debug:
    ACCMAN_DEBUG=1 {{py}} setup.py build_ext --inplace

# the whole test suite (what CI runs)
test: build
    {{py}} -m pytest

# run the service on its embedded LevelDB
serve data="./accman-data" port="8080":
    .venv/bin/accman serve --data {{data}} --port {{port}}

# in-process ledger, client and middleware benchmarks (pytest-benchmark)
bench: build
    {{py}} -m pytest bench/bench_ledger.py bench/bench_client.py bench/bench_asgi.py --benchmark-enable -n 0 -p no:cacheprovider -s

# HTTP load benchmark: AccMan and its peers, 3 rounds of 5 s per figure; writes bench/results/
bench-load: build
    {{py}} bench/load.py

# the load benchmark's smoke form: one round of 1 s per figure, nothing written
bench-quick: build
    {{py}} bench/load.py --quick

# AccMan profiled under load (py-spy, perf); writes bench/results/profile/
bench-profile: build
    {{py}} bench/load.py --profile-only

# the long crash checker (kill -9 rounds for minutes; prints the seed)
crash:
    ACCMAN_CRASH_LONG=1 {{py}} -m pytest tests/test_ledger_crash.py tests/test_damaged_files.py tests/reliability/test_bank.py -n 0 -p no:cacheprovider -s

# the long events checker: four readers of the stream (the clients' followers, `accman
# events --follow`, a webhook receiver) while AccMan is SIGKILLed under load, then on a
# PostgreSQL store of two clusters, restarted and stopped, two front-ends (prints the seed)
crash-events:
    ACCMAN_CRASH_LONG=1 {{py}} -m pytest tests/reliability/test_events_bank.py tests/reliability/test_events_bank_pg.py -n 0 -p no:cacheprovider -s

# the long calling-side bank checker: paid requests through uvicorn and the middleware
# while AccMan is killed every second or two, both modes, on the embedded store and on
# PostgreSQL (restarted, stopped, failed over; two front-ends behind a proxy; prints the seed)
crash-calling:
    ACCMAN_CRASH_LONG=1 {{py}} -m pytest tests/reliability/test_calling_bank.py tests/reliability/test_calling_bank_pg.py -n 0 -p no:cacheprovider -s

# the bank checkers through the Node plugin, long: 30 kill rounds a mode, then 31 faults a
# mode through two front-ends on PostgreSQL (prints the seeds)
crash-node:
    cd node && ACCMAN_CRASH_LONG=1 node --test --test-concurrency=1 --test-timeout=3600000 test/bank.test.js test/bank_pg.test.js

# the long power-loss emulation: every crash point of longer recorded runs, and the
# damaged-file property with many more flips (needs strace; prints the counts)
powercut:
    ACCMAN_CRASH_LONG=1 {{py}} -m pytest tests/test_powercut.py tests/test_damaged_files.py -n 0 -p no:cacheprovider -s

# bounded soak run: connection churn and pipelined floods, RSS measured
soak:
    {{py}} bench/soak.py

# style and static checks
lint:
    {{py}} -m ruff check accman tests bench examples

# the PostgreSQL store's loads for a minute each (bank checker, failover)
pg-long:
    ACCMAN_PG_LONG=1 {{py}} -m pytest tests/postgres/test_front_ends.py tests/postgres/test_failover.py -n 0 -p no:cacheprovider

# the PostgreSQL store's figures over HTTP against pgbench, same run (docs/SCALING.md)
bench-pg-http:
    {{py}} bench/pg_http.py --rounds 5 --save

# the PostgreSQL store's figures in process against pgbench (docs/SCALING.md's first figures)
bench-pg:
    {{py}} bench/pg_store.py --json bench/results/pg_store.json
