"""The parts of bench/load.py (and bench/ab.py): servers, runners, the
plan of figures, the measuring in rounds, the report, and the profile;
and what the disk tools (bench/fsync_cost.py, bench/log_sketch.py) share.

    base      constants shared by the parts, and BenchError
    disk      the disk tools' block size and file layouts (zeros, unwritten)
    cpu       how busy each CPU was during a figure, and waiting for quiet
    irqs      which CPUs take the disk's interrupts
    servers   every server under test, started pinned on loopback and stopped by group
    runners   wrk and redis-benchmark, run pinned, their output parsed
    plan      the figures: which route at which connections, for each server
    measure   the figures taken round by round, the servers alternating; medians
    report    ratios, goals, the markdown table and load.json
    profile   AccMan under py-spy and perf
"""
