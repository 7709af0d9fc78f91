"""Counters and histograms for GET /metrics, in the Prometheus text format
(version 0.0.4).  The server updates them on the event loop thread only, so
nothing here locks; rendering happens on request, never per event."""

from bisect import bisect_left
from collections import defaultdict

CONTENT_TYPE = b"text/plain; version=0.0.4; charset=utf-8"

# From a sub-millisecond fsync on a fast disk to a stalled one.
MOD_LATENCY_BUCKETS_S = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005,
                         0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
# Powers of four up to limits.BATCH_MODS_MAX (4096).
BATCH_SIZE_BUCKETS = (1, 4, 16, 64, 256, 1024, 4096)
# One batch made durable (its synced write-ahead log record; LevelDB gets it
# after the replies): ~0.2 ms on a local SSD, far more on a slow or failing
# disk.
FSYNC_BUCKETS_S = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01,
                   0.025, 0.05, 0.1, 0.25, 0.5, 1.0)


class Histogram:
    __slots__ = ("bounds", "counts", "sum", "count")

    def __init__(self, bounds):
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(self.bounds) + 1)   # the last one is +Inf
        self.sum = 0
        self.count = 0

    def observe(self, value):
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value
        self.count += 1

    def observe_all(self, values):
        """`observe` of each value, in one call (a batch's mod latencies)."""
        counts, bounds = self.counts, self.bounds
        for value in values:
            counts[bisect_left(bounds, value)] += 1
        self.sum += sum(values)
        self.count += len(values)

    def render(self, name, help_text, out):
        out.append(f"# HELP {name} {help_text}")
        out.append(f"# TYPE {name} histogram")
        running = 0
        for bound, n in zip(self.bounds, self.counts[:-1], strict=True):
            running += n
            out.append(f'{name}_bucket{{le="{_num(bound)}"}} {running}')
        out.append(f'{name}_bucket{{le="+Inf"}} {self.count}')
        out.append(f"{name}_sum {_num(self.sum)}")
        out.append(f"{name}_count {self.count}")


def _num(value):
    if isinstance(value, float):
        return repr(value)
    return str(value)


# Ledger stats whose meaning we know are exported under these names; any
# other numeric stat is exported as a gauge `accman_ledger_<key>`.
_KNOWN_STATS = {
    "batches": ("accman_batches_total", "counter", "Write batches committed."),
    "mods": ("accman_mods_committed_total", "counter",
             "Mods made durable by committed batches."),
    "fsync_s_total": ("accman_fsync_seconds_total", "counter",
                      "Time spent making batches durable (the synced log write, or "
                      "PostgreSQL's whole commit)."),
    "checkpoints": ("accman_checkpoints_total", "counter",
                    "Write-ahead log checkpoints (LevelDB's logs synced): when "
                    "the log wraps, at open and at close."),
    "checkpoint_s_total": ("accman_checkpoint_seconds_total", "counter",
                           "Time spent in checkpoints; a batch waits behind one."),
    "gave_way_s_total": ("accman_gave_way_seconds_total", "counter",
                         "Time the loop slept to give LevelDB's compaction, starved, "
                         "its share of the core."),
    "fill_waits": ("accman_fill_waits_total", "counter",
                   "Batches held back for the callers just answered to call again "
                   "(the fill wait)."),
    "fill_misses": ("accman_fill_misses_total", "counter",
                    "Fill waits that ran out, the callers not back (on the embedded "
                    "store, over turns that queued nothing): callers out of step."),
    "fill_skips": ("accman_fill_skips_total", "counter",
                   "Fill waits not begun, after a miss."),
    "back_to_back_writes": ("accman_back_to_back_writes_total", "counter",
                            "Writes of the changes queued during the last write, "
                            "sealed at its end (the embedded store, where the disk "
                            "answers them faster than after a gap)."),
    "accounts": ("accman_accounts", "gauge", "Accounts in the ledger."),
    "clusters": ("accman_ledger_clusters", "gauge",
                 "PostgreSQL clusters the store's accounts are spread over (--store, "
                 "once for each)."),
    "open_holds": ("accman_open_holds", "gauge", "Holds open now (SPEC \"Holds\")."),
    "holds_expired": ("accman_holds_expired_total", "counter",
                      "Holds that ended by themselves, unsettled within their ttl."),
    "events_last": ("accman_events_written_total", "counter",
                    "Events written: the newest event id."),
    "events_first": ("accman_events_first", "gauge", "The oldest event id kept."),
    "events_trimmed": ("accman_events_trimmed_total", "counter",
                       "Events this server deleted past the retention since it started."),
    "queued_mods": ("accman_queued_mods", "gauge",
                    "Mods applied in memory, waiting for their batch to be durable."),
    "last_batch_mods": ("accman_last_batch_mods", "gauge",
                        "Mods in the last committed batch."),
}


class Metrics:
    """What the server counts.  `requests` is keyed by (route name, status),
    except the /tot 200s, the most frequent reply by far: `tot_ok` counts
    them (an attribute increment, not a dict update keyed by a tuple), and
    they are rendered as requests_total{route="tot",status="200"}."""

    def __init__(self):
        self.requests = defaultdict(int)
        self.tot_ok = 0
        self.mod_latency_s = Histogram(MOD_LATENCY_BUCKETS_S)
        self.batch_size = Histogram(BATCH_SIZE_BUCKETS)
        self.fsync_s = Histogram(FSYNC_BUCKETS_S)
        self.connections_refused = 0
        self.head_timeouts = 0
        self.idle_closes = 0
        self.budget_pauses = 0
        self.turns_spent = 0
        self.webhook = None         # the webhook's Deliverer, when there is one

    def observe_batches(self, sizes, fsync_times_s):
        for n in sizes:
            self.batch_size.observe(n)
        for t in fsync_times_s:
            self.fsync_s.observe(t)

    def render(self, *, open_connections, healthy, buffered_bytes=0, stats=None) -> bytes:
        out = [
            "# HELP accman_requests_total Requests answered, by route and status.",
            "# TYPE accman_requests_total counter",
        ]
        requests = dict(self.requests)
        if self.tot_ok:
            requests["tot", 200] = self.tot_ok
        for (route, status), n in sorted(requests.items()):
            out.append(f'accman_requests_total{{route="{route}",status="{status}"}} {n}')
        self.mod_latency_s.render(
            "accman_mod_latency_seconds",
            "From a mod's arrival to its outcome: durable, or refused.", out)
        self.batch_size.render("accman_batch_size_mods",
                               "Mods per committed write batch.", out)
        self.fsync_s.render("accman_fsync_seconds",
                            "One batch made durable: its synced log write, or "
                            "PostgreSQL's whole commit.", out)
        out += [
            "# HELP accman_open_connections Client connections open now.",
            "# TYPE accman_open_connections gauge",
            f"accman_open_connections {open_connections}",
            "# HELP accman_healthy 1 while the store can commit, else 0.",
            "# TYPE accman_healthy gauge",
            f"accman_healthy {1 if healthy else 0}",
            "# HELP accman_connections_refused_total Connections closed at once: "
            "over CONNECTIONS_MAX or CONNECTIONS_PER_PEER_MAX.",
            "# TYPE accman_connections_refused_total counter",
            f"accman_connections_refused_total {self.connections_refused}",
            "# HELP accman_head_timeouts_total Connections cut by HEAD_TIMEOUT_S.",
            "# TYPE accman_head_timeouts_total counter",
            f"accman_head_timeouts_total {self.head_timeouts}",
            "# HELP accman_idle_closes_total Connections closed by IDLE_TIMEOUT_S.",
            "# TYPE accman_idle_closes_total counter",
            f"accman_idle_closes_total {self.idle_closes}",
            "# HELP accman_buffered_bytes Bytes held for all connections: replies "
            "unread, requests unparsed, and requests parsed and not yet taken.",
            "# TYPE accman_buffered_bytes gauge",
            f"accman_buffered_bytes {buffered_bytes}",
            "# HELP accman_budget_pauses_total Times SERVER_BUFFER_BYTES_MAX, less what "
            "it keeps for connections holding nothing, was passed and connections "
            "holding bytes stopped being read.",
            "# TYPE accman_budget_pauses_total counter",
            f"accman_budget_pauses_total {self.budget_pauses}",
            "# HELP accman_turns_spent_total Loop turns ended: their TURN_REQUESTS_MAX "
            "requests all taken, or the share costly reads may take of them, the rest "
            "going on next turn.",
            "# TYPE accman_turns_spent_total counter",
            f"accman_turns_spent_total {self.turns_spent}",
        ]
        if self.webhook is not None:
            render_webhook(self.webhook, stats or {}, out)
        done = set()
        for key, value in sorted((stats or {}).items()):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            name, kind, help_text = _KNOWN_STATS.get(
                key, (f"accman_ledger_{_metric_name(key)}", "gauge",
                      f"Ledger statistic {key}."))
            if name in done:
                continue
            done.add(name)
            out.append(f"# HELP {name} {help_text}")
            out.append(f"# TYPE {name} {kind}")
            out.append(f"{name} {_num(value)}")
        out.append("")
        return "\n".join(out).encode("ascii")


def render_webhook(w, stats, out):
    """The webhook deliverer's (accman/server/webhooks.py) figures."""
    out += [
        "# HELP accman_webhook_cursor The id of the last event the webhook's receiver "
        "acknowledged (saved durably within WEBHOOK_CURSOR_SAVE_INTERVAL_S plus the time "
        "a save takes: more while the disk is slow to take it).",
        "# TYPE accman_webhook_cursor gauge",
        f"accman_webhook_cursor {w.cursor}",
        "# HELP accman_webhook_leading 1 while this front-end delivers; 0 while it does "
        "not (another front-end of its store holds the webhook's role, or the store "
        "cannot be reached).",
        "# TYPE accman_webhook_leading gauge",
        f"accman_webhook_leading {int(w.leading)}",
        "# HELP accman_webhook_lag_events Events written and not yet acknowledged by "
        "the webhook's receiver.",
        "# TYPE accman_webhook_lag_events gauge",
        f"accman_webhook_lag_events {w.lag(stats)}",
        "# HELP accman_webhook_batches_total POSTs the webhook's receiver acknowledged.",
        "# TYPE accman_webhook_batches_total counter",
        f"accman_webhook_batches_total {w.batches}",
        "# HELP accman_webhook_events_total Events in those POSTs.",
        "# TYPE accman_webhook_events_total counter",
        f"accman_webhook_events_total {w.events}",
        "# HELP accman_webhook_failures_total Delivery attempts that failed: no "
        "connection, no reply in time, or a status other than 2xx.",
        "# TYPE accman_webhook_failures_total counter",
        f"accman_webhook_failures_total {w.failures}",
        "# HELP accman_webhook_failing Attempts failed in a row since the last delivery "
        "(0 while delivery works).",
        "# TYPE accman_webhook_failing gauge",
        f"accman_webhook_failing {w.failing}",
        "# HELP accman_webhook_events_skipped_total Events trimmed from the store (past "
        "its retention) before the receiver acknowledged them.",
        "# TYPE accman_webhook_events_skipped_total counter",
        f"accman_webhook_events_skipped_total {w.skipped}",
    ]


def _metric_name(key):
    return "".join(c if c.isascii() and (c.isalnum() or c == "_") else "_"
                   for c in str(key))
