//! The background workers of the shared tier (only when preloaded).
//!
//! - The **launcher** is connected to no database, so it never blocks a
//!   `DROP DATABASE`. Every `makima_keys.flush_interval` seconds it starts one
//!   short-lived **flush worker** per database in the shared list, one at a
//!   time, waits for it to exit, then makes room in the shared hashes. On a
//!   standby it only makes room.
//! - A **flush worker** connects to its database, writes the
//!   `last_used_at` its keys are owed (batched UPDATEs that skip rows
//!   another transaction holds: those wait for the next round), sends
//!   `makima_keys_revoked` for keys that ended by time since the last
//!   round, and exits. Its statements run with the rights of the table's
//!   owner, as a security-restricted operation, with a pinned search_path.
//!
//! No worker is registered in binary-upgrade mode (`pg_upgrade`).

use std::time::Duration;

use pgrx::bgworkers::{
    BackgroundWorker, BackgroundWorkerBuilder, BgWorkerStartTime, SignalWakeFlags,
};
use pgrx::prelude::*;

use crate::clock;
use crate::policy::Micros;
use crate::settings;
use crate::shared::{self, WorkerState};

/// Keys written per UPDATE statement (and per transaction).
const FLUSH_BATCH: usize = 10_000;

/// Registers the launcher; called from `_PG_init` while preloading.
pub(crate) fn register_launcher() {
    BackgroundWorkerBuilder::new("makima_keys launcher")
        .set_type("makima_keys launcher")
        .set_library("makima_keys")
        .set_function("mk_launcher_main")
        // A database connection (to no database, below) is what makes
        // PostgreSQL handle SIGUSR1 in a worker: without it the postmaster's
        // notice that a flush worker exited is lost, and the wait for it
        // never ends. It also lists the launcher in pg_stat_activity.
        .enable_spi_access()
        .set_start_time(BgWorkerStartTime::ConsistentState)
        .set_restart_time(Some(Duration::from_secs(5)))
        .load();
}

/// The launcher's main loop.
#[pg_guard]
#[no_mangle]
pub extern "C-unwind" fn mk_launcher_main(_arg: pg_sys::Datum) {
    BackgroundWorker::attach_signal_handlers(SignalWakeFlags::SIGHUP | SignalWakeFlags::SIGTERM);
    // Connected to no database, as PostgreSQL's logical replication
    // launcher is: shared catalogs only, and no DROP DATABASE waits for it.
    BackgroundWorker::connect_worker_to_spi(None, None);
    let mut next_round = clock::wall_clock() + interval_micros();
    // The flags are checked before every wait, not only after one: a
    // signal that came during a round had its wake-up used by the wait for
    // the flush worker, and would otherwise be seen one interval late (at
    // 3600 s, a fast shutdown would give up on us).
    while !stop_requested() {
        if BackgroundWorker::sighup_received() {
            // SAFETY: the documented way for a worker to reread its settings.
            unsafe { pg_sys::ProcessConfigFile(pg_sys::GucContext::PGC_SIGHUP) };
            next_round = next_round.min(clock::wall_clock() + interval_micros());
        }
        let wait = next_round - clock::wall_clock();
        if wait > 0 {
            if !BackgroundWorker::wait_latch(Some(Duration::from_micros(wait as u64))) {
                break;
            }
            continue;
        }
        round();
        next_round = clock::wall_clock() + interval_micros();
    }
}

/// Whether SIGTERM came, remembered: pgrx's flag is cleared by each read.
fn stop_requested() -> bool {
    static STOPPING: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    if BackgroundWorker::sigterm_received() {
        STOPPING.store(true, std::sync::atomic::Ordering::Relaxed);
    }
    STOPPING.load(std::sync::atomic::Ordering::Relaxed)
}

/// Whether `db` is in pg_database (the launcher reads shared catalogs only).
fn database_exists(db: pg_sys::Oid) -> bool {
    BackgroundWorker::transaction(|| {
        // SAFETY: a syscache lookup of a shared catalog, in a transaction.
        unsafe {
            pg_sys::SearchSysCacheExists(
                pg_sys::SysCacheIdentifier::DATABASEOID as i32,
                pg_sys::Datum::from(db),
                pg_sys::Datum::from(0),
                pg_sys::Datum::from(0),
                pg_sys::Datum::from(0),
            )
        }
    })
}

fn interval_micros() -> Micros {
    Micros::from(settings::flush_interval_secs()) * 1_000_000
}

/// One round: a flush worker per database (not on a standby), then room.
fn round() {
    // SAFETY: reads shared recovery state.
    if !unsafe { pg_sys::RecoveryInProgress() } {
        for (index, db) in shared::databases() {
            if stop_requested() {
                return;
            }
            shared::set_worker_state(index, WorkerState::Starting);
            let argument = (index as u64) << 32 | u64::from(db.to_u32());
            let started = BackgroundWorkerBuilder::new("makima_keys flush")
                .set_type("makima_keys flush")
                .set_library("makima_keys")
                .set_function("mk_flush_main")
                .enable_spi_access()
                .set_argument(Some(pg_sys::Datum::from(argument)))
                // SAFETY: a plain read of this process's pid.
                .set_notify_pid(unsafe { pg_sys::MyProcPid })
                .load_dynamic();
            let Ok(worker) = started else {
                // No free worker slot (max_worker_processes): next round.
                break;
            };
            if worker.wait_for_shutdown().is_err() {
                return;
            }
            match shared::worker_state(index) {
                // It never connected. Only a database that is gone is
                // forgotten: one that refuses connections for a while
                // (ALLOW_CONNECTIONS false) keeps its budgets and what its
                // keys are owed.
                WorkerState::Starting if !database_exists(db) => shared::forget_database(index, db),
                // Dropping makima_keys dropped its keys.
                WorkerState::NoExtension => shared::forget_database(index, db),
                WorkerState::Starting | WorkerState::Connected | WorkerState::Done => {}
            }
        }
    }
    shared::make_room(clock::wall_clock(), 0.9, 0.8);
    report_full_hashes();
}

/// Logs, once per round in which it happened, that a shared hash was full:
/// verifications then wrote `last_used_at` themselves (statistics hash) or
/// rate-limited calls failed closed (bucket hash). Counts only.
fn report_full_hashes() {
    use std::sync::atomic::{AtomicU64, Ordering};
    static LAST: [AtomicU64; 2] = [AtomicU64::new(0), AtomicU64::new(0)];
    let Some(usage) = shared::usage() else { return };
    let untracked = usage.untracked - LAST[0].swap(usage.untracked, Ordering::Relaxed);
    let refused = usage.buckets_full - LAST[1].swap(usage.buckets_full, Ordering::Relaxed);
    if untracked > 0 || refused > 0 {
        pgrx::log!(
            "makima_keys: shared hashes full ({} entries each): {} verifications were not \
             tracked, {} rate-limited calls answered rate_limit_unavailable; raise \
             makima_keys.max_tracked_keys",
            usage.capacity,
            untracked,
            refused
        );
    }
}

/// A flush worker: one database, one round.
#[pg_guard]
#[no_mangle]
pub extern "C-unwind" fn mk_flush_main(arg: pg_sys::Datum) {
    let argument = arg.value() as u64;
    let index = (argument >> 32) as usize;
    let db = pg_sys::Oid::from(argument as u32);
    BackgroundWorker::attach_signal_handlers(SignalWakeFlags::SIGTERM);
    BackgroundWorker::connect_worker_to_spi_by_oid(Some(db), None);
    shared::set_worker_state(index, WorkerState::Connected);
    override_database_settings();

    let Some(table) = BackgroundWorker::transaction(find_table) else {
        shared::set_worker_state(index, WorkerState::NoExtension);
        return;
    };
    let owed = shared::owed(db);
    let started = std::time::Instant::now();
    let mut paid = 0;
    for batch in owed.chunks(FLUSH_BATCH) {
        if stop_requested() {
            return;
        }
        let written = BackgroundWorker::transaction(|| write_last_used(&table, batch));
        let written: Vec<(pgrx::Uuid, Micros)> = batch
            .iter()
            .filter(|(id, _)| written.contains(id))
            .copied()
            .collect();
        shared::paid(db, &written);
        paid += written.len();
    }
    if !owed.is_empty() {
        // For bench/shared.py, which measures the flush's cost.
        pgrx::debug1!(
            "makima_keys flush: {paid} of {} keys owed last_used_at done in {:.3} ms",
            owed.len(),
            started.elapsed().as_secs_f64() * 1000.0
        );
    }
    let from = shared::announced_until(index);
    let until = clock::wall_clock();
    BackgroundWorker::transaction(|| announce_ended(&table, from, until));
    shared::set_announced_until(index, until);
    shared::set_worker_state(index, WorkerState::Done);
}

/// The settings this worker runs with, whatever `ALTER DATABASE ... SET`
/// or `ALTER ROLE ... SET` say (both apply to a background worker, and the
/// database's owner may set the first): as autovacuum does, an empty
/// search_path, so that no name in our statements resolves to an object
/// the owner planted while this process still has the superuser's rights;
/// and transactions that can write, wait for nothing long, and end. What a
/// round cannot finish stays owed for the next.
fn override_database_settings() {
    for (name, value) in [
        (c"search_path", c""),
        (c"default_transaction_read_only", c"off"),
        (c"default_transaction_isolation", c"read committed"),
        (c"statement_timeout", c"10s"),
        (c"lock_timeout", c"1s"),
        (c"idle_in_transaction_session_timeout", c"0"),
        (c"synchronous_commit", c"local"),
    ] {
        // SAFETY: sets a built-in setting by name, as PostgreSQL's own
        // workers do at start.
        unsafe {
            pg_sys::SetConfigOption(
                name.as_ptr(),
                value.as_ptr(),
                pg_sys::GucContext::PGC_SUSET,
                pg_sys::GucSource::PGC_S_OVERRIDE,
            )
        };
    }
}

/// Our `api_keys` in this database: its quoted name and its owner.
struct Table {
    name: String,
    owner: pg_sys::Oid,
}

fn find_table() -> Option<Table> {
    Spi::connect(|client| {
        let found = client
            .select(
                "SELECT pg_catalog.concat(pg_catalog.quote_ident(n.nspname), '.api_keys'), c.relowner
                   FROM pg_catalog.pg_extension e
                   JOIN pg_catalog.pg_namespace n ON n.oid OPERATOR(pg_catalog.=) e.extnamespace
                   JOIN pg_catalog.pg_class c ON c.relnamespace OPERATOR(pg_catalog.=) n.oid
                  WHERE e.extname OPERATOR(pg_catalog.=) 'makima_keys'
                    AND c.relname OPERATOR(pg_catalog.=) 'api_keys'
                    AND c.relkind OPERATOR(pg_catalog.=) 'r'",
                Some(1),
                &[],
            )
            .expect("find api_keys");
        let row = found.into_iter().next()?;
        Some(Table {
            name: row.get::<String>(1).expect("name")?,
            owner: row.get::<pg_sys::Oid>(2).expect("owner")?,
        })
    })
}

/// Runs `f` with the rights of the table's owner, as a security-restricted
/// operation (as autovacuum and REFRESH MATERIALIZED VIEW do), with only
/// pg_catalog on the search path: a trigger the owner wrote runs as the
/// owner, never as the superuser this worker connected as. (Timeouts: see
/// `override_database_settings`.)
fn as_owner<R>(table: &Table, f: impl FnOnce() -> R) -> R {
    let mut saved_user = pg_sys::InvalidOid;
    let mut saved_context = 0;
    // SAFETY: saves and sets the current user, as PostgreSQL's own callers
    // do; an ERROR in `f` aborts the transaction, which restores both.
    unsafe {
        pg_sys::GetUserIdAndSecContext(&mut saved_user, &mut saved_context);
        pg_sys::SetUserIdAndSecContext(
            table.owner,
            saved_context
                | pg_sys::SECURITY_LOCAL_USERID_CHANGE as i32
                | pg_sys::SECURITY_RESTRICTED_OPERATION as i32,
        );
    }
    Spi::run("SELECT pg_catalog.set_config('search_path', 'pg_catalog, pg_temp', true)")
        .expect("pin search_path");
    let result = f();
    // SAFETY: restores what was saved above.
    unsafe { pg_sys::SetUserIdAndSecContext(saved_user, saved_context) };
    result
}

/// Writes `last_used_at` for `batch` in one statement; returns the keys
/// that need nothing more (written, not due, or gone). A key whose row
/// another transaction holds is skipped, never waited for.
fn write_last_used(table: &Table, batch: &[(pgrx::Uuid, Micros)]) -> Vec<pgrx::Uuid> {
    let ids: Vec<pgrx::Uuid> = batch.iter().map(|(id, _)| *id).collect();
    let times: Vec<TimestampWithTimeZone> = batch
        .iter()
        .map(|(_, at)| TimestampWithTimeZone::try_from(*at).expect("a verification time"))
        .collect();
    let interval = settings::last_used_interval_secs();
    // Only due rows are locked (a row lock is a WAL record and a dirtied
    // page): a key verified again within last_used_interval costs nothing.
    // Done: the rows written, those not due, and those gone. A due row that
    // another transaction holds stays owed.
    let sql = format!(
        "WITH owed AS (
              SELECT o.id, o.used_at
                FROM ROWS FROM (pg_catalog.unnest($1::uuid[]), pg_catalog.unnest($2::timestamptz[]))
                     AS o(id, used_at)),
          locked AS (
              SELECT k.id FROM {t} k JOIN owed o ON o.id = k.id
               WHERE k.last_used_at IS NULL
                  OR k.last_used_at < o.used_at - pg_catalog.make_interval(secs => $3)
               ORDER BY k.id FOR UPDATE OF k SKIP LOCKED),
          written AS (
              UPDATE {t} k SET last_used_at = o.used_at
                FROM owed o, locked l
               WHERE k.id = o.id AND l.id = o.id
                 AND (k.last_used_at IS NULL
                      OR k.last_used_at < o.used_at - pg_catalog.make_interval(secs => $3))
               RETURNING k.id)
         SELECT l.id FROM locked l
         UNION ALL
         SELECT o.id FROM owed o
          WHERE NOT EXISTS (SELECT FROM {t} k
                             WHERE k.id = o.id
                               AND (k.last_used_at IS NULL
                                    OR k.last_used_at < o.used_at - pg_catalog.make_interval(secs => $3)))",
        t = table.name
    );
    as_owner(table, || {
        Spi::connect_mut(|client| {
            client
                .update(
                    &sql,
                    None,
                    &[ids.into(), times.into(), f64::from(interval).into()],
                )
                .expect("write last_used_at")
                .map(|row| {
                    row.get::<pgrx::Uuid>(1)
                        .expect("id")
                        .expect("id is not null")
                })
                .collect()
        })
    })
}

/// Sends `makima_keys_revoked` for every key whose end (the earlier of
/// `expires_at` and `revoked_at`) fell in `(from, until]`.
fn announce_ended(table: &Table, from: Micros, until: Micros) {
    let from = TimestampWithTimeZone::try_from(from).ok();
    let until = TimestampWithTimeZone::try_from(until).expect("now");
    let sql = format!(
        "SELECT pg_catalog.count(pg_catalog.pg_notify('makima_keys_revoked', k.id::text))
           FROM {t} k
          WHERE (k.expires_at IS NOT NULL OR k.revoked_at IS NOT NULL)
            AND LEAST(k.expires_at, k.revoked_at) > COALESCE($1, '-infinity')
            AND LEAST(k.expires_at, k.revoked_at) <= $2",
        t = table.name
    );
    as_owner(table, || {
        Spi::connect_mut(|client| {
            client
                .update(&sql, None, &[from.into(), until.into()])
                .expect("announce ended keys");
        })
    });
}
