"""makima_keys 0.4.0, the shared tier: mk_verify on a cluster that preloads
makima_keys (shared_preload_libraries), where a valid verification records
the call in shared memory and the flush worker writes last_used_at, against
the bare indexed lookup of the same round; next to it the same pair on a
cluster that does not preload makima_keys, side by side in one run.

Started by bench/shared.sh, which builds and installs the release build and
starts both clusters (the preloaded one with its server log at --log). This
script loads keys into both, runs pgbench in alternating rounds, measures WAL
outside the flush, the flush's cost per 10,000 keys and shared memory per
tracked key, and prints PASS/FAIL per target with the regime of every number.
It is not part of the test suite: timings on shared machines are noisy, so
only ratios measured in the same run are judged.

How the flush is timed. The flush worker writes every
makima_keys.flush_interval seconds, in the background; a run that happened
to see no round, or the round of the previous case, would be judged on
somebody else's cost. So between runs the preloaded cluster rests with
flush_interval = 3600 and nothing owed, and each run sets the interval
(default 10 s) as it starts, with ALTER SYSTEM and one reload: the launcher
plans its next round one interval from then, so the round comes one
interval into the run and writes what that interval's verifications owe,
as in the steady state. Rounds then follow every interval with no reload,
which is checked (target 6).
The timed window (pgbench's per-second log) starts 2 s before that round,
after an untimed warm-up of interval - 2 seconds, and is as long as
--seconds: with --seconds equal to the interval it holds one round's work for
one interval's verifications. After the run a round at flush_interval = 1
writes the rest (outside any timed window), and the table is vacuumed and
checkpointed. Rounds are seen in the server log: the worker's DEBUG1 line
"makima_keys flush: N of M keys owed last_used_at done in X ms" and the
postmaster's DEBUG1 lines for each flush worker (log_min_messages = debug1
is set with ALTER SYSTEM for the whole run).
"""

import argparse
import csv
import hashlib
import os
import pathlib
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from types import SimpleNamespace

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import bench  # noqa: E402  (bench/bench.py: load, pgbench, settle, median, per_round_ratio)
from bench import SCRIPTS, log, median, per_round_ratio  # noqa: E402

PRELOADED = "preloaded"
NOT_PRELOADED = "not preloaded"
CLIENTS = 4
# The preloaded database keeps the default last_used_interval; it decides
# which owed keys the flush writes (and, in the "60 s interval" case, is also
# given to the clients as PGOPTIONS, as bench.py does).
LAST_USED_INTERVAL = 60
PGOPTIONS_60 = f"-c makima_keys.last_used_interval={LAST_USED_INTERVAL}"
# Between runs: no round comes.
RESTING_INTERVAL = 3600
# Keys of bench.lkeys: a rate limit no run can reach.
RATE_LIMIT, RATE_PERIOD = 2_000_000_000, "1 second"

# (case, cluster, pgbench script, state of last_used_at before the run).
# Case names carry their cluster, so that bench.median and
# bench.per_round_ratio pair each case with the baseline of its own cluster.
# "as left": whatever the load and the earlier runs left (the share of keys
# due is printed); "due": every key stamped 2 hours ago; "warm": every key of
# the run's set stamped just before the run (the best case: the flush
# updates no row). The not-preloaded cases are bench.py's: interval 3600 after every
# key was stamped at load, and its "60 s interval" case.
CASES = [
    ("preloaded: bare lookup", PRELOADED, "lookup.sql", None),
    ("preloaded: mk_verify, 60 s interval", PRELOADED, "mk_verify.sql", "as left"),
    ("preloaded: mk_verify, keys due", PRELOADED, "mk_verify.sql", "due"),
    ("preloaded: mk_verify, warm", PRELOADED, "mk_verify.sql", "warm"),
    ("preloaded: mk_verify, rate-limited keys", PRELOADED, "mk_verify_limited.sql", "warm"),
    ("preloaded: mk_verify, unlimited keys", PRELOADED, "mk_verify_unlimited.sql", "warm"),
    ("not preloaded: bare lookup", NOT_PRELOADED, "lookup.sql", None),
    ("not preloaded: mk_verify", NOT_PRELOADED, "mk_verify.sql", None),
    ("not preloaded: mk_verify, 60 s interval", NOT_PRELOADED, "mk_verify.sql", None),
]
# The key set (bench table) each script draws from.
KEY_SETS = {"lookup.sql": "bench.keys", "mk_verify.sql": "bench.keys",
            "mk_verify_limited.sql": "bench.lkeys", "mk_verify_unlimited.sql": "bench.ukeys"}


def max_tracked_keys(args):
    """makima_keys.max_tracked_keys for the preloaded cluster: every key of
    the run tracked, with the hashes at most 80% full (the worker starts
    dropping idle keys above 90%)."""
    return (args.keys + args.limited_keys) * 5 // 4 + 1000


# ---- the server log of the preloaded cluster ----

REGISTERED = re.compile(r'(?<!un)registering background worker "makima_keys flush"')
EXITED = re.compile(r'background worker "makima_keys flush" \(PID \d+\) exited')
FLUSHED = re.compile(r"makima_keys flush: (\d+) of (\d+) keys owed last_used_at done in ([\d.]+) ms")
CRASHED = re.compile(r"terminated by signal|terminating any other active server processes")
HASHES_FULL = "makima_keys: shared hashes full"


class ServerLog:
    def __init__(self, path):
        self.path = pathlib.Path(path)

    def offset(self):
        return self.path.stat().st_size

    def lines(self, start, end=None):
        """Whole lines written between two offsets (to the end by default)."""
        with self.path.open("rb") as f:
            f.seek(start)
            data = f.read() if end is None else f.read(end - start)
        if end is None:
            data = data[:data.rfind(b"\n") + 1]
        lines = data.decode(errors="replace").splitlines()
        for line in lines:
            if CRASHED.search(line):
                raise RuntimeError(f"the preloaded server crashed: {line.strip()} (see {self.path})")
        return lines


def flushes(lines):
    """(owed keys done, owed keys, ms) of each flush line."""
    return [(int(m[1]), int(m[2]), float(m[3])) for m in map(FLUSHED.search, lines) if m]


class Flush:
    """Drives and watches the preloaded cluster's flush rounds."""

    def __init__(self, conn, server_log):
        self.conn = conn
        self.log = server_log

    def set_interval(self, seconds):
        """ALTER SYSTEM + reload: the launcher rereads its settings at once and
        starts its next round one new interval from now (or sooner, when the
        one it had planned comes first)."""
        self.conn.execute(f"ALTER SYSTEM SET makima_keys.flush_interval = {int(seconds)}")
        self.conn.execute("SELECT pg_reload_conf()")

    def worker_running(self):
        return self.conn.execute("SELECT count(*) FROM pg_stat_activity"
                                 " WHERE backend_type = 'makima_keys flush'").fetchone()[0] > 0

    def quiesce(self, quiet=3.0):
        """Waits until no flush worker runs and none started for `quiet` s
        (the round that was planned at the old interval may still come)."""
        seen = self.log.offset()
        last_change = time.monotonic()
        while time.monotonic() - last_change < quiet:
            time.sleep(0.2)
            now = self.log.offset()
            if self.worker_running() or any(REGISTERED.search(l) or EXITED.search(l)
                                            for l in self.log.lines(seen, now)):
                last_change = time.monotonic()
            seen = now

    def settle(self, since, timeout=600):
        """Writes everything owed: once nothing verifies any more (from log
        offset `since` on), a round that starts afterwards takes all that is
        owed. Sets flush_interval = 1, waits for such a round to end, then
        rests at RESTING_INTERVAL. Returns the flush lines of that round."""
        self.set_interval(1)
        started = time.monotonic()
        # A round already running (the run's own) delays the next one.
        deadline = started + 30
        while True:
            lines = self.log.lines(since)
            registered = next((i for i, l in enumerate(lines) if REGISTERED.search(l)), None)
            if registered is not None and any(EXITED.search(l) for l in lines[registered:]):
                done = flushes(lines[registered:])
                break
            if registered is None:
                if self.worker_running():
                    deadline = time.monotonic() + 30
                elif time.monotonic() > deadline:
                    raise RuntimeError("no flush round started within 30 s at flush_interval = 1"
                                       f" (see {self.log.path})")
            if time.monotonic() - started > timeout:
                raise RuntimeError(f"no flush round ended within {timeout} s (see {self.log.path})")
            time.sleep(0.2)
        self.set_interval(RESTING_INTERVAL)
        self.quiesce()
        return done


# ---- pgbench ----

def run_pgbench(args, port, script, warmup, seconds, pgoptions=None):
    """One pgbench run of warmup + seconds; tps and mean latency over the
    last `seconds` only, from pgbench's per-second aggregated log (one file
    per thread, each with its own one-second intervals from its start)."""
    env = dict(os.environ)
    if pgoptions:
        env["PGOPTIONS"] = pgoptions
    with tempfile.TemporaryDirectory() as logs:
        cmd = ["pgbench", "-n", "-M", "prepared", "-h", args.host, "-p", str(port), "-U", "postgres",
               "-c", str(CLIENTS), "-j", str(CLIENTS), "-T", str(warmup + seconds),
               "-D", f"keys={args.keys}", "-D", f"lkeys={args.limited_keys}",
               "-l", "--aggregate-interval=1", "--log-prefix", f"{logs}/agg",
               "-f", str(SCRIPTS / script), args.db]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout
        transactions, latency_us = 0, 0
        for path in pathlib.Path(logs).glob("agg.*"):
            # interval_start num_transactions sum_latency_us ...
            intervals = [line.split() for line in path.read_text().splitlines() if line.strip()]
            first = int(intervals[0][0])
            for fields in intervals:
                if warmup <= int(fields[0]) - first < warmup + seconds:
                    transactions += int(fields[1])
                    latency_us += int(fields[2])
    processed = int(re.search(r"number of transactions actually processed: (\d+)", out).group(1))
    return {"tps": transactions / seconds, "latency_ms": latency_us / max(transactions, 1) / 1000,
            "processed": processed}


# ---- load ----

def load_preloaded(args, pre):
    """bench.py's load (users, one key each, stamped once), then keys with
    a rate limit for their own users (bench.lkeys) and a set of as many
    keys without one (bench.ukeys, the first keys of bench.keys)."""
    bench.load(pre)
    with bench.connect(pre) as conn:
        conn.execute(f"ALTER DATABASE {pre.db} RESET makima_keys.last_used_interval")
        started = time.perf_counter()
        conn.execute(f"CREATE TABLE bench.limited_users AS"
                     f" SELECT gen_random_uuid() AS id FROM generate_series(1, {int(args.limited_keys)})")
        conn.execute("INSERT INTO users SELECT id FROM bench.limited_users")
        conn.execute(f"""CREATE TABLE bench.lkeys AS
                         SELECT (row_number() OVER ())::int AS i, k.key, mk_hash_key(k.key) AS hash
                           FROM bench.limited_users u,
                                LATERAL mk_issue_key(u.id, rate_limit => {RATE_LIMIT},
                                                     rate_period => '{RATE_PERIOD}') k""")
        conn.execute("ALTER TABLE bench.lkeys ADD PRIMARY KEY (i)")
        conn.execute(f"CREATE TABLE bench.ukeys AS SELECT i, key, hash FROM bench.keys"
                     f" WHERE i <= {int(args.limited_keys)}")
        conn.execute("ALTER TABLE bench.ukeys ADD PRIMARY KEY (i)")
        passed = conn.execute("SELECT count(mk_verify(key)) FROM bench.lkeys").fetchone()[0]
        assert passed == args.limited_keys, f"only {passed} of {args.limited_keys} rate-limited keys verify"
        conn.execute("VACUUM ANALYZE")
        log(f"loaded {args.limited_keys} keys with rate_limit => {RATE_LIMIT:,} per {RATE_PERIOD}"
            f" in {time.perf_counter() - started:.1f} s")


def stamp(conn, when, key_set=None):
    """Sets last_used_at of every key (or of those of a bench key set) to
    `when`, then vacuums and checkpoints, outside any timed run."""
    where = f" WHERE key_hash IN (SELECT hash FROM {key_set})" if key_set else ""
    conn.execute(f"UPDATE public.api_keys SET last_used_at = {when}{where}")
    conn.execute("VACUUM public.api_keys")
    conn.execute("CHECKPOINT")


def due_share(conn, key_set):
    return conn.execute(
        f"SELECT avg((k.last_used_at IS NULL OR k.last_used_at < now() - interval '{LAST_USED_INTERVAL} s')::int)"
        f"  FROM public.api_keys k JOIN {key_set} b ON b.hash = k.key_hash").fetchone()[0]


# ---- the measurements ----

def preloaded_run(args, pre, flush, case, script, state):
    """One run on the preloaded cluster (see the module docstring)."""
    key_set = KEY_SETS[script]
    with bench.connect(pre) as conn:
        if state == "due":
            stamp(conn, "now() - interval '2 hours'")
        elif state == "warm":
            stamp(conn, "now()", key_set if key_set != "bench.keys" else None)
        due = due_share(conn, key_set) if script != "lookup.sql" else None
    start = flush.log.offset()
    before = flush.conn.execute("SELECT pg_current_wal_lsn()").fetchone()[0]
    flush.set_interval(args.flush_interval)
    result = run_pgbench(args, args.port, script, args.flush_interval - 2, args.seconds,
                         PGOPTIONS_60 if "60 s interval" in case else None)
    end = flush.log.offset()
    wal = flush.conn.execute("SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), %s)", (before,)).fetchone()[0]
    result["wal_per_tx"] = float(wal) / result["processed"]
    in_run = flush.log.lines(start, end)
    flush.settle(end)
    # A round of the run that ended after it: its line came after `end`.
    lines = flush.log.lines(start)
    settle_round = next((i for i, l in enumerate(lines) if REGISTERED.search(l) and i >= len(in_run)),
                        len(lines))
    result["rounds"] = sum(bool(REGISTERED.search(l)) for l in in_run)
    result["flushed"] = flushes(lines[:settle_round])
    result["due"] = due
    bench.settle(pre)
    return result


def wal_outside_flush(args, pre, flush):
    """WAL per verification of keys that are all due, with flush_interval =
    3600 so that no round runs: what the verifications themselves write."""
    with bench.connect(pre) as conn:
        flush.set_interval(RESTING_INTERVAL)
        flush.quiesce()
        stamp(conn, "now() - interval '2 hours'")
        before = conn.execute("SELECT pg_current_wal_lsn()").fetchone()[0]
        start = flush.log.offset()
        result = run_pgbench(args, args.port, "mk_verify.sql", 0, args.seconds, PGOPTIONS_60)
        wal = conn.execute("SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), %s)", (before,)).fetchone()[0]
        rounds = sum(bool(REGISTERED.search(l)) for l in flush.log.lines(start))
        flush.settle(flush.log.offset())
    bench.settle(pre)
    return float(wal) / result["processed"], result["processed"], rounds


def wal_stats(conn):
    """WAL position, WAL records and full-page images so far, and rows
    updated in api_keys. The flush worker's statistics are in once it has
    exited; this backend's own (the stamping UPDATE) are sent first."""
    conn.execute("SELECT pg_stat_force_next_flush()")
    conn.execute("SELECT 1")
    conn.execute("SELECT pg_stat_clear_snapshot()")
    return conn.execute(
        "SELECT pg_current_wal_lsn(), w.wal_records, w.wal_fpi, t.n_tup_upd"
        "  FROM pg_stat_wal w, pg_stat_user_tables t WHERE t.relid = 'public.api_keys'::regclass").fetchone()


def flush_cost(args, pre, flush):
    """Flush rounds of `--flush-keys` distinct keys (random keys spread over
    the table), each verified once with no round running, every one of them
    due (a key that is not due owes nothing, so no round sees it). Each state is measured twice, both times right after a
    checkpoint: with full_page_writes on (the first change of each page
    after a checkpoint logs the whole page) and off (the records alone).
    Returns one dict per state."""
    n = min(args.flush_keys, args.keys)
    out = []
    with bench.connect(pre) as conn:
        conn.execute("DROP TABLE IF EXISTS bench.flush_sample")
        conn.execute(f"CREATE TABLE bench.flush_sample AS SELECT key, hash FROM bench.keys"
                     f" ORDER BY random() LIMIT {int(n)}")
        flush.set_interval(RESTING_INTERVAL)
        flush.quiesce()
        try:
            # Only due keys: a verification of a key that is not due owes
            # nothing, so a round has nothing to do for it.
            for state in ("due",):
                measured = {}
                for full_page_writes in ("on", "off"):
                    if state == "due":
                        stamp(conn, "now() - interval '2 hours'", "bench.flush_sample")
                    conn.execute(f"ALTER SYSTEM SET full_page_writes = {full_page_writes}")
                    conn.execute("SELECT pg_reload_conf()")
                    conn.execute("SELECT count(mk_verify(key)) FROM bench.flush_sample")
                    conn.execute("CHECKPOINT")
                    lsn, records, fpi, updated = wal_stats(conn)
                    lines = flush.settle(flush.log.offset())
                    lsn2, records2, fpi2, updated2 = wal_stats(conn)
                    wal = float(conn.execute("SELECT pg_wal_lsn_diff(%s, %s)", (lsn2, lsn)).fetchone()[0])
                    done, owed, ms = lines[0] if lines else (0, 0, float("nan"))
                    measured[full_page_writes] = {"done": done, "owed": owed, "ms": ms, "wal": wal,
                                                  "records": records2 - records, "fpi": fpi2 - fpi,
                                                  "updated": updated2 - updated}
                    log(f"flush of {n:,} keys verified once each, {state}, full_page_writes {full_page_writes}:"
                        f" {done:,} of {owed:,} owed keys done in {ms:.1f} ms, {updated2 - updated:,} rows"
                        f" updated; WAL {wal:,.0f} bytes ({records2 - records:,} records,"
                        f" {fpi2 - fpi:,} full-page images)")
                on, off = measured["on"], measured["off"]
                out.append({"state": state, "keys": n, "owed": on["owed"], "done": on["done"],
                            "ms": statistics.median([on["ms"], off["ms"]]), "ms_each": (on["ms"], off["ms"]),
                            "updated": on["updated"], "wal_fpw": on["wal"], "fpi": on["fpi"],
                            "wal_records_only": off["wal"], "records": off["records"]})
        finally:
            conn.execute("ALTER SYSTEM RESET full_page_writes")
            conn.execute("SELECT pg_reload_conf()")
    bench.settle(pre)
    return out


def wait_for_flush(flush, since, timeout):
    """Seconds until a flush line appears after log offset `since`, or None
    if none does within `timeout` s."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if flushes(flush.log.lines(since)):
            return time.monotonic() - started
        time.sleep(0.2)
    return None


def rounds_without_reload(flush, pre, window=6):
    """Whether flush rounds keep coming every flush_interval with no reload:
    flush_interval = 1 is set (the one reload), a first round writes some
    keys, then keys are verified again and, with no reload, the next round
    is to write them and rounds are to keep starting over `window` s.
    Returns (seconds until the first round wrote, seconds until a later
    round wrote the keys verified after it, rounds started in the window);
    None where nothing came."""
    with bench.connect(pre) as conn:
        flush.set_interval(1)
        start = flush.log.offset()
        conn.execute("SELECT count(mk_verify(key)) FROM bench.keys WHERE i <= 100")
        first = wait_for_flush(flush, start, 30)
        start = flush.log.offset()
        began = time.monotonic()
        conn.execute("SELECT count(mk_verify(key)) FROM bench.keys WHERE i > 100 AND i <= 200")
        later = wait_for_flush(flush, start, window)
        time.sleep(max(0.0, window - (time.monotonic() - began)))
        rounds = sum(bool(REGISTERED.search(l)) for l in flush.log.lines(start))
        flush.settle(flush.log.offset())
    return first, later, rounds


# max_tracked_keys of the short-lived clusters of the shared memory
# measurement: the smallest allowed, the default, and the full run's size.
PROBE_KEYS = (100, 100_000, 1_000_000)


def shmem_per_key(args):
    """Shared memory per unit of makima_keys.max_tracked_keys (one entry in
    each of the two hashes), from short-lived preloaded clusters that differ
    only in max_tracked_keys: the difference over the difference in keys.
    The hash elements are in the "<anonymous>" row of pg_shmem_allocations,
    so the whole allocated sum is compared (free space excluded), and the
    server's shared_memory_size (whole MB) beside it. Each hash also has a
    bucket array sized to the next power of two, so the cost per key depends
    a little on where max_tracked_keys falls: it is given against the
    smallest cluster at the default and at 1,000,000, and between the two."""
    pg_bin = os.environ.get("MK_PG_BIN") or os.path.dirname(shutil.which("postgres") or shutil.which("pg_config"))
    env = {**os.environ, "MK_PG_BIN": pg_bin}
    cluster = str(HERE.parent / "scripts" / "cluster.sh")
    measured = {}
    for keys in PROBE_KEYS:
        work = tempfile.mkdtemp(prefix="makima-keys-shmem.")
        os.chmod(work, 0o755)
        try:
            subprocess.run(["bash", cluster, "start", work, str(args.probe_port),
                            "shared_preload_libraries=makima_keys", f"makima_keys.max_tracked_keys={keys}"],
                           check=True, env=env)
            probe = SimpleNamespace(host=args.host, port=args.probe_port, db="postgres")
            with bench.connect(probe) as conn:
                allocated = conn.execute("SELECT sum(allocated_size) FROM pg_shmem_allocations"
                                         " WHERE name IS NOT NULL").fetchone()[0]
                size = conn.execute("SHOW shared_memory_size").fetchone()[0]
            measured[keys] = (int(allocated), int(re.match(r"(\d+)MB", size).group(1)) * 1024 * 1024)
        finally:
            subprocess.run(["bash", cluster, "stop", work], env=env)
            shutil.rmtree(work, ignore_errors=True)
    log("shared memory: " + "; ".join(f"max_tracked_keys {k:,}: allocated {a:,} bytes, shared_memory_size"
                                      f" {m // 2**20} MB" for k, (a, m) in measured.items()))

    def per_key(low, high, which):
        return (measured[high][which] - measured[low][which]) / (high - low)

    smallest, default, large = PROBE_KEYS
    return {"pairs": [(low, high, per_key(low, high, 0), per_key(low, high, 1))
                      for low, high in ((smallest, default), (smallest, large), (default, large))]}


def library_identity():
    """The installed makima_keys library: a build installed by someone else
    during the run would void the numbers (and crash the servers)."""
    libdir = subprocess.run(["pg_config", "--pkglibdir"], check=True, capture_output=True, text=True).stdout.strip()
    path = pathlib.Path(libdir) / "makima_keys.so"
    stat = path.stat()
    return (str(path), stat.st_size, time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(stat.st_mtime)),
            hashlib.sha256(path.read_bytes()).hexdigest()[:12])


# ---- the run ----

def regime(args, case, state, result=None):
    keys = args.limited_keys if ("rate-limited" in case or "unlimited" in case) else args.keys
    if case.startswith(NOT_PRELOADED):
        text = f"{keys:,} keys at random, {args.seconds} s"
        if "60 s interval" in case:
            return text + ", last_used_interval 60 (a due key is written by its verification)"
        return text + ", last_used_interval 3600, every key stamped at load (bench.py's steady state)"
    text = f"{keys:,} keys at random, {args.flush_interval - 2}+{args.seconds} s"
    if state is None:
        return text + ", nothing owed"
    what = {"as left": "last_used_at as the load and earlier runs left it, PGOPTIONS last_used_interval=60",
            "due": "every key stamped 2 h before (all due)",
            "warm": "every key of the set stamped just before (none due)"}[state]
    if "rate-limited" in case:
        what += f", rate_limit {RATE_LIMIT:,} per {RATE_PERIOD}"
    if result is not None and result.get("due") is not None:
        what += f", {100 * float(result['due']):.0f}% due at start"
    return f"{text}, {what}"


def describe_flush(result):
    """The flush rounds of a preloaded run, and the WAL of the whole run
    (warm-up and the round included) per transaction."""
    wal = f"; WAL {result['wal_per_tx']:.1f} bytes per transaction"
    rounds = result.get("flushed") or []
    if not rounds:
        return f"flush: {result['rounds']} round(s) started, nothing owed{wal}"
    done = sum(r[0] for r in rounds)
    owed = sum(r[1] for r in rounds)
    ms = sum(r[2] for r in rounds)
    return f"flush: {len(rounds)} round(s), {done:,} of {owed:,} owed done in {ms:,.0f} ms{wal}"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=26470, help="the preloaded cluster")
    parser.add_argument("--plain-port", type=int, default=26471, help="the cluster that does not preload makima_keys")
    parser.add_argument("--probe-port", type=int, default=26472,
                        help="short-lived preloaded clusters for the shared memory per key")
    parser.add_argument("--log", help="server log of the preloaded cluster (bench/shared.sh passes it)")
    parser.add_argument("--db", default="makima_bench")
    parser.add_argument("--keys", type=int, default=200_000, help="users with one key each (default 200,000)")
    parser.add_argument("--limited-keys", type=int, default=100_000,
                        help="keys with a rate limit, and as many without, for target 3 (default 100,000)")
    parser.add_argument("--seconds", type=int, default=10, help="timed window of each pgbench run")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds of pgbench runs")
    parser.add_argument("--flush-interval", type=int, default=10,
                        help="makima_keys.flush_interval during the preloaded runs (default 10, at least 3)")
    parser.add_argument("--flush-keys", type=int, default=10_000, help="keys of the flush measurement")
    parser.add_argument("--no-probe", action="store_true", help="skip the shared memory measurement")
    parser.add_argument("--print-max-tracked-keys", action="store_true",
                        help="print the max_tracked_keys the preloaded cluster needs, and exit")
    parser.add_argument("--out", default=str(HERE / "results"))
    args = parser.parse_args()
    args.limited_keys = min(args.limited_keys, args.keys)
    if args.print_max_tracked_keys:
        print(max_tracked_keys(args))
        return 0
    if args.flush_interval < 3:
        parser.error("--flush-interval must be at least 3")
    if not args.log:
        parser.error("--log is required (the preloaded cluster's server log)")
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    # bench.py's functions take their settings from one namespace per cluster.
    common = dict(host=args.host, db=args.db, keys=args.keys, sample=min(100_000, args.keys), credit_keys=1,
                  seconds=args.seconds)
    pre = SimpleNamespace(port=args.port, **common)
    plain = SimpleNamespace(port=args.plain_port, **common)

    began = time.monotonic()
    library = library_identity()
    log(f"machine: {platform.node()}, {os.cpu_count()} cores, {platform.platform()}")
    log(f"library: {library[0]}, {library[1]:,} bytes, {library[2]} UTC, sha256 {library[3]}")
    with bench.connect(SimpleNamespace(host=args.host, port=args.port, db="postgres")) as conn:
        version = conn.execute("SHOW server_version").fetchone()[0]
        tracked = int(conn.execute("SHOW makima_keys.max_tracked_keys").fetchone()[0])
        preload = conn.execute("SHOW shared_preload_libraries").fetchone()[0]
        conn.execute("ALTER SYSTEM SET log_min_messages = debug1")
        conn.execute("SELECT pg_reload_conf()")
    with bench.connect(SimpleNamespace(host=args.host, port=args.plain_port, db="postgres")) as conn:
        plain_preload = conn.execute("SHOW shared_preload_libraries").fetchone()[0]
    assert "makima_keys" in preload, f"port {args.port} does not preload makima_keys"
    assert "makima_keys" not in plain_preload, f"port {args.plain_port} preloads makima_keys"
    log(f"PostgreSQL {version}; preloaded cluster on {args.port} (max_tracked_keys {tracked:,}),"
        f" not preloaded on {args.plain_port}")
    if tracked < max_tracked_keys(args):
        log(f"warning: max_tracked_keys {tracked:,} < {max_tracked_keys(args):,}: keys may go untracked")
    log(f"regimes: {CLIENTS} clients, pgbench -M prepared; preloaded runs: {args.flush_interval - 2} s warm-up"
        f" + {args.seconds} s timed, flush_interval {args.flush_interval} s set as each run starts (one round"
        f" in the window), the rest flushed after it, last_used_interval {LAST_USED_INTERVAL} (the default);"
        f" not preloaded runs: {args.seconds} s, as bench.py")
    if args.seconds < args.flush_interval:
        log(f"note: a {args.seconds} s window holds a whole round of {args.flush_interval} s of verifications:"
            " the flush weighs more than in the steady state")

    shmem = None if args.no_probe else shmem_per_key(args)

    server_log = ServerLog(args.log)
    log("loading the preloaded cluster")
    load_preloaded(args, pre)
    log("loading the cluster that does not preload makima_keys")
    bench.load(plain)
    with bench.connect(pre) as conn:
        flush = Flush(conn, server_log)
        # Nothing owed and no round between runs; the load's stamps are flushed.
        flush.settle(server_log.offset())
        bench.settle(pre)
        rows = []
        for target in (pre, plain):
            with bench.connect(target) as c:
                # Vacuum runs between runs (bench.settle), never during one.
                c.execute("ALTER TABLE public.api_keys SET (autovacuum_enabled = false)")
                c.execute("ALTER TABLE public.users SET (autovacuum_enabled = false)")
        try:
            wal, wal_calls, wal_rounds = wal_outside_flush(args, pre, flush)
            log(f"WAL per verification outside the flush (all keys due, flush_interval {RESTING_INTERVAL}):"
                f" {wal:.3f} bytes over {wal_calls:,} calls, {wal_rounds} flush rounds during the run")
            for rnd in range(1, args.rounds + 1):
                cases = CASES if rnd % 2 else list(reversed(CASES))
                for case, cluster, script, state in cases:
                    if cluster == PRELOADED:
                        result = preloaded_run(args, pre, flush, case, script, state)
                    else:
                        tps, latency = bench.pgbench(plain, script, CLIENTS, case)
                        result = {"tps": tps, "latency_ms": latency}
                        if "mk_verify, 60 s" in case:
                            bench.settle(plain)
                    rows.append({"round": rnd, "case": case, "clients": CLIENTS, **result})
                    extra = f"  {describe_flush(result)}" if cluster == PRELOADED else ""
                    log(f"round {rnd}  {case:42} {result['tps']:9.0f} tps {result['latency_ms']:7.3f} ms"
                        f"  [{regime(args, case, state, result)}]{extra}")
            cost = flush_cost(args, pre, flush)
            first_round, later_round, window_rounds = rounds_without_reload(flush, pre)
            refusals = conn.execute(
                "SELECT coalesce(sum(s.rate_limited + s.rate_limit_unavailable), 0)"
                "  FROM mk_key_stats s JOIN public.api_keys k ON k.id = s.key_id"
                " WHERE k.rate_limit IS NOT NULL").fetchone()[0]
        finally:
            for target in (pre, plain):
                with bench.connect(target) as c:
                    c.execute("ALTER TABLE public.api_keys RESET (autovacuum_enabled)")
                    c.execute("ALTER TABLE public.users RESET (autovacuum_enabled)")
    full = sum(HASHES_FULL in line for line in server_log.lines(0))

    with open(out / "shared.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["kind", "round", "case", "clients", "tps", "latency_ms", "flush_rounds",
                         "flushed_keys", "flush_ms", "due_at_start", "value"])
        for r in rows:
            flushed = r.get("flushed") or []
            writer.writerow(["throughput", r["round"], r["case"], r["clients"], f"{r['tps']:.1f}",
                             f"{r['latency_ms']:.3f}", r.get("rounds", ""),
                             sum(x[0] for x in flushed) if "flushed" in r else "",
                             f"{sum(x[2] for x in flushed):.1f}" if "flushed" in r else "",
                             "" if r.get("due") is None else f"{float(r['due']):.3f}",
                             f"{r['wal_per_tx']:.2f} bytes WAL per transaction" if "wal_per_tx" in r else ""])
        writer.writerow(["wal", "", "preloaded: mk_verify, keys due, no flush", CLIENTS, "", "", wal_rounds, "", "",
                         "1.000", f"{wal:.4f} bytes per call"])
        for c in cost:
            writer.writerow(["flush", "", f"flush of {c['keys']} keys, {c['state']}", "", "", "", 1,
                             c["done"], f"{c['ms']:.1f}", "",
                             f"{c['wal_records_only']:.0f} bytes WAL without full-page images,"
                             f" {c['wal_fpw']:.0f} with {c['fpi']} after a checkpoint, {c['updated']} rows updated"])
        for low, high, allocated, size in (shmem or {}).get("pairs", []):
            writer.writerow(["shmem", "", f"bytes per tracked key, max_tracked_keys {low} -> {high}",
                             "", "", "", "", "", "", "", f"{allocated:.1f}"])

    log("")
    log(f"medians of {args.rounds} round(s), {CLIENTS} clients; x lookup: median of the per-round ratios to the"
        " bare lookup of the same cluster")
    log(f"{'case':44}{'tps':>10}{'lat ms':>9}{'x lookup':>10}  regime")
    for case, cluster, script, state in CASES:
        baseline = f"{cluster}: bare lookup"
        ratio = "" if case == baseline else f"{per_round_ratio(rows, case, baseline, CLIENTS):.2f}"
        dues = [float(r["due"]) for r in rows if r["case"] == case and r.get("due") is not None]
        result = {"due": statistics.median(dues)} if dues else None
        log(f"{case:44}{median(rows, case, CLIENTS):>10.0f}{median(rows, case, CLIENTS, 'latency_ms'):>9.3f}"
            f"{ratio:>10}  {regime(args, case, state, result)}")
    flushed = [sum(x[0] for x in r["flushed"]) for r in rows if r.get("flushed")]
    if flushed:
        log(f"flush rounds inside the preloaded verification runs: median {statistics.median(flushed):,.0f}"
            " owed keys done per run")

    def ratio(case, baseline):
        return per_round_ratio(rows, case, baseline, CLIENTS)

    as_left = ratio("preloaded: mk_verify, 60 s interval", "preloaded: bare lookup")
    due = ratio("preloaded: mk_verify, keys due", "preloaded: bare lookup")
    warm = ratio("preloaded: mk_verify, warm", "preloaded: bare lookup")
    limited = ratio("preloaded: mk_verify, rate-limited keys", "preloaded: mk_verify, unlimited keys")
    plain_ratio = ratio("not preloaded: mk_verify", "not preloaded: bare lookup")
    plain_60 = ratio("not preloaded: mk_verify, 60 s interval", "not preloaded: bare lookup")
    as_left_due = statistics.median(float(r["due"]) for r in rows
                                    if r["case"] == "preloaded: mk_verify, 60 s interval")
    steady = first_round is not None and later_round is not None and window_rounds >= 3
    targets = [
        (f"1a preloaded, cold keys ({args.keys:,}), 60 s interval ({100 * as_left_due:.0f}% due at start):"
         " mk_verify >= 0.9 x bare lookup", f"{as_left:.2f}", as_left >= 0.9),
        (f"1b preloaded, cold keys ({args.keys:,}), all keys due: mk_verify >= 0.9 x bare lookup",
         f"{due:.2f}", due >= 0.9),
        ("2  preloaded: WAL per verification outside the flush < 1 byte (keys due, no round)",
         f"{wal:.3f}", wal < 1.0),
        (f"3  preloaded: rate-limited keys >= 0.9 x unlimited keys ({args.limited_keys:,} each)",
         f"{limited:.2f}", limited >= 0.9),
        ("4  not preloaded: mk_verify >= 0.95 x bare lookup (bench.py's target)", f"{plain_ratio:.2f}",
         plain_ratio >= 0.95),
        ("6  preloaded: flush rounds come every flush_interval without a reload (flush_interval 1, one reload)",
         ("first round wrote " + ("never" if first_round is None else f"after {first_round:.1f} s")
          + ", keys verified after it written " + ("never" if later_round is None else f"{later_round:.1f} s later")
          + f", {window_rounds} rounds started in 6 s"), steady),
    ]
    log("")
    failed = 0
    for name, value, met in targets:
        failed += not met
        log(f"{'PASS' if met else 'FAIL'}  {name}: {value}")
    log(f"      1: best case for reference (every key stamped just before the run): warm {warm:.2f} x bare lookup")
    log(f"      4: next to it, mk_verify / bare lookup: preloaded warm {warm:.2f}, preloaded all due {due:.2f};"
        f" not preloaded {plain_ratio:.2f}, not preloaded 60 s interval (every due key written by its call)"
        f" {plain_60:.2f}")
    log("")
    if shmem:
        log("5  shared memory per tracked key (one entry in each of the two hashes), allocated"
            " (pg_shmem_allocations) and shared_memory_size, between clusters of max_tracked_keys: "
            + "; ".join(f"{low:,} -> {high:,}: {allocated:.1f} and {size:.1f} bytes"
                        for low, high, allocated, size in shmem["pairs"]))
    for c in cost:
        per = 10_000 / c["owed"] if c["owed"] else float("nan")
        log(f"5  flush, {c['keys']:,} distinct keys verified once each, {c['state']}: {c['ms'] * per:,.1f} ms per"
            f" 10,000 keys (rounds of {c['owed']:,} owed keys: {c['ms_each'][0]:.1f} and {c['ms_each'][1]:.1f} ms;"
            f" {c['done']:,} done, {c['updated']:,} rows updated); WAL per 10,000 keys:"
            f" {c['wal_records_only'] * per:,.0f} bytes in {c['records'] * per:,.0f} records (full_page_writes off),"
            f" {c['wal_fpw'] * per:,.0f} bytes with {c['fpi'] * per:,.0f} full-page images right after a checkpoint")
    log("")
    log(f"check: rate-limited verifications refused during the run: {refusals}")
    if full:
        log(f"warning: the server log reports full shared hashes {full} time(s): raise max_tracked_keys")
    if library_identity() != library:
        log("warning: the installed makima_keys library changed during the run: these numbers are void")
        failed += 1
    log(f"\nresults: {out / 'shared.csv'}; the run took {(time.monotonic() - began) / 60:.1f} minutes")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
