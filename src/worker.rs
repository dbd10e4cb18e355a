//! The background workers of the shared tier (only when preloaded).
//!
//! - The **launcher** is connected to no database, so it never blocks a
//!   `DROP DATABASE`. Every `makima_keys.flush_interval` seconds it starts
//!   one short-lived **flush worker** per database in the shared list, one
//!   at a time, and waits for it, but never longer than [`ENTER_DEADLINE`]
//!   for it to enter its database: a database that cannot be entered (a
//!   `RENAME` or a `CREATE DATABASE ... TEMPLATE` holding it) delays the
//!   others by seconds, not for as long as that transaction stays open.
//!   It keeps per database how the last round went, backs off a database
//!   that keeps failing, logs once when a database starts failing and once
//!   when it recovers, then makes room in the shared hashes. On a standby
//!   it only makes room.
//! - A **flush worker** connects to its database, first sends
//!   `makima_keys_revoked` for keys that ended by time since the last round
//!   (so that a failing write never holds announcements back), then writes
//!   the `last_used_at` its keys are owed (batched UPDATEs that skip rows
//!   another transaction holds: those wait for the next round), and exits.
//!   It finds the table by OID in every transaction and runs its statements
//!   under the guard of `store` (a statement that would resolve to any other
//!   table raises before it runs), with the rights of the table's owner, as
//!   a security-restricted operation, with a pinned search_path.
//!
//! No worker is registered in binary-upgrade mode (`pg_upgrade`).

use std::sync::atomic::Ordering;
use std::time::Duration;

use pgrx::bgworkers::{
    BackgroundWorker, BackgroundWorkerBuilder, BackgroundWorkerStatus, BgWorkerStartTime,
    DynamicBackgroundWorker, SignalWakeFlags,
};
use pgrx::prelude::*;

use crate::clock;
use crate::policy::Micros;
use crate::settings;
use crate::shared::{self, DatabaseSlot, Outcome, Phase};
use crate::store::{expecting_own_table, STATEMENT_MARK};

/// Keys written per UPDATE statement (and per transaction).
const FLUSH_BATCH: usize = 10_000;
/// How long a flush worker may take to enter its database before the
/// launcher stops it and goes on with the next database.
const ENTER_DEADLINE: Duration = Duration::from_secs(5);
/// How long a flush worker may take for its whole round before the
/// launcher stops it (a million keys owed take well under a minute).
const ROUND_DEADLINE: Duration = Duration::from_secs(300);
/// How long the launcher waits for a worker it stopped to exit.
const STOP_DEADLINE: Duration = Duration::from_secs(10);
/// The lock_timeout the flush worker runs with, its connection included.
const LOCK_TIMEOUT: &std::ffi::CStr = c"1s";

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
            if !self::wait(Duration::from_micros(wait as u64)) {
                break;
            }
            continue;
        }
        round();
        next_round = clock::wall_clock() + interval_micros();
    }
    // Exit code 1, as PostgreSQL's own launchers exit on SIGTERM (through
    // FATAL): a background worker that exits with 0 is never restarted, so
    // a launcher stopped with pg_terminate_backend would be gone until the
    // server restarts. At shutdown nothing is restarted anyway.
    // SAFETY: ends this process as PostgreSQL's own exit path does.
    unsafe { pg_sys::proc_exit(1) };
}

static STOPPING: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Whether SIGTERM came, remembered: pgrx's flag is cleared by each read.
fn stop_requested() -> bool {
    if BackgroundWorker::sigterm_received() {
        STOPPING.store(true, Ordering::Relaxed);
    }
    STOPPING.load(Ordering::Relaxed)
}

/// Waits on the latch; `false` when the process is to stop. pgrx's
/// `wait_latch` reads (and so clears) the SIGTERM flag itself: what it saw
/// is remembered here, or a SIGTERM that came during a wait for a flush
/// worker would be lost and the launcher would never exit.
fn wait(timeout: Duration) -> bool {
    if BackgroundWorker::wait_latch(Some(timeout)) {
        return true;
    }
    STOPPING.store(true, Ordering::Relaxed);
    false
}

/// What pg_database says of a database (the launcher reads shared
/// catalogs only).
#[derive(Debug, PartialEq, Eq)]
enum DatabaseState {
    Present,
    Gone,
    /// Left invalid by an interrupted `DROP DATABASE` (PostgreSQL 15.4 and
    /// later): it refuses connections for ever and can only be dropped.
    Invalid,
}

fn database_state(db: pg_sys::Oid) -> DatabaseState {
    BackgroundWorker::transaction(|| {
        // SAFETY: a syscache lookup of a shared catalog in a transaction;
        // the tuple is read, then released.
        unsafe {
            let tuple = pg_sys::SearchSysCache1(
                pg_sys::SysCacheIdentifier::DATABASEOID as i32,
                pg_sys::Datum::from(db),
            );
            if tuple.is_null() {
                return DatabaseState::Gone;
            }
            let form = pg_sys::heap_tuple_get_struct::<pg_sys::FormData_pg_database>(tuple);
            let invalid = (*form).datconnlimit == pg_sys::DATCONNLIMIT_INVALID_DB;
            pg_sys::ReleaseSysCache(tuple);
            if invalid {
                DatabaseState::Invalid
            } else {
                DatabaseState::Present
            }
        }
    })
}

fn interval_micros() -> Micros {
    Micros::from(settings::flush_interval_secs()) * 1_000_000
}

/// One round: a flush worker per database (not on a standby), then room.
fn round() {
    // Where the last round stopped for lack of a worker slot: this round
    // starts there, so the databases after it are not always the ones left.
    static START_AT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    // SAFETY: reads shared recovery state.
    if !unsafe { pg_sys::RecoveryInProgress() } {
        let mut databases = shared::databases();
        let start = databases
            .iter()
            .position(|(index, _)| *index >= START_AT.load(Ordering::Relaxed))
            .unwrap_or(0);
        databases.rotate_left(start);
        START_AT.store(0, Ordering::Relaxed);
        for (index, db) in databases {
            if stop_requested() {
                return;
            }
            let Some(slot) = shared::slot(index) else {
                return;
            };
            let now = clock::wall_clock();
            if !shared::due(slot, now) || worker_still_running(slot) {
                continue;
            }
            match database_state(db) {
                DatabaseState::Present => {}
                DatabaseState::Gone | DatabaseState::Invalid => {
                    shared::forget_database(index, db);
                    continue;
                }
            }
            if !flush(index, db, slot) {
                START_AT.store(index, Ordering::Relaxed);
                break;
            }
        }
    }
    shared::make_room(clock::wall_clock(), 0.9, 0.8);
    report_full_hashes();
}

/// Whether the slot's last flush worker is still alive (its launcher
/// exited and a new one started meanwhile): no second one is started.
fn worker_still_running(slot: &DatabaseSlot) -> bool {
    let pid = slot.worker_pid.load(Ordering::Acquire);
    // SAFETY: signal 0 only checks that the process exists.
    pid != 0 && unsafe { libc_kill(pid, 0) } == 0
}

extern "C" {
    #[link_name = "kill"]
    fn libc_kill(pid: i32, signal: i32) -> i32;
}

extern "C-unwind" {
    /// PostgreSQL's SIGTERM handler of backends (`tcop/postgres.c`), by its
    /// C symbol: pgrx's `pg_sys::die` is a guarded Rust wrapper, not a
    /// signal handler.
    #[link_name = "die"]
    fn postgres_die(signal: std::ffi::c_int);
}

/// Starts the flush worker of one database and waits for it; records the
/// outcome. `false` when no background worker slot was free.
fn flush(index: usize, db: pg_sys::Oid, slot: &DatabaseSlot) -> bool {
    shared::set_phase(slot, Phase::Starting);
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
        slot.sqlstate.store(0, Ordering::Relaxed);
        conclude(db, slot, Outcome::NoWorkerSlot);
        return false;
    };
    let stopped_by_us = match wait_for(worker, slot) {
        // The launcher stops; the worker goes on and holds its slot.
        Waited::Stopping => return true,
        Waited::Exited => false,
        Waited::Stopped => true,
    };
    // The slot was given to another database meanwhile (this one was
    // forgotten): nothing to record.
    if slot.db.load(Ordering::Acquire) != db.to_u32() {
        return true;
    }
    let outcome = match shared::phase(slot) {
        Phase::Done => Outcome::Ok,
        // A worker of a launcher before a restart still holds the slot.
        Phase::Busy => return true,
        Phase::NoExtension => {
            // Dropping makima_keys dropped its keys.
            shared::forget_database(index, db);
            return true;
        }
        Phase::Starting if database_state(db) != DatabaseState::Present => {
            shared::forget_database(index, db);
            return true;
        }
        Phase::Starting => Outcome::NotEntered,
        Phase::Connected | Phase::AnnounceFailed => Outcome::AnnounceFailed,
        Phase::Announced => Outcome::WriteFailed,
    };
    if stopped_by_us {
        // What the worker raised was our own termination, not a reason.
        slot.sqlstate.store(0, Ordering::Relaxed);
    }
    conclude(db, slot, outcome);
    true
}

/// How a wait for a flush worker ended.
enum Waited {
    Exited,
    /// Past a deadline (to enter its database, or for the whole round):
    /// stopped by the launcher.
    Stopped,
    /// The launcher was asked to stop (the worker may still run).
    Stopping,
}

/// Waits for the worker to exit. Stops it (SIGTERM, which is PostgreSQL's
/// `die` in the worker) when it has not entered its database within
/// `ENTER_DEADLINE`, or has not finished its round within `ROUND_DEADLINE`
/// (statement_timeout bounds each of our statements, but a trigger of the
/// owner's may change it); after a stop, waits at most `STOP_DEADLINE`.
fn wait_for(worker: DynamicBackgroundWorker, slot: &DatabaseSlot) -> Waited {
    let started = std::time::Instant::now();
    let mut stopped_at = None;
    loop {
        let pid = match worker.pid() {
            Ok(pid) => Some(pid),
            Err(BackgroundWorkerStatus::Stopped) => {
                return if stopped_at.is_some() {
                    Waited::Stopped
                } else {
                    Waited::Exited
                }
            }
            Err(BackgroundWorkerStatus::PostmasterDied) => return Waited::Stopping,
            Err(_) => None,
        };
        if stop_requested() {
            return Waited::Stopping;
        }
        let elapsed = started.elapsed();
        let late = (shared::phase(slot) == Phase::Starting && elapsed > ENTER_DEADLINE)
            || elapsed > ROUND_DEADLINE;
        match (stopped_at, pid) {
            (None, Some(pid)) if late => {
                // SAFETY: SIGTERM to our own flush worker.
                unsafe { libc_kill(pid, 15) };
                stopped_at = Some(std::time::Instant::now());
            }
            // It holds its slot until it exits: no second worker starts there.
            (Some(at), _) if at.elapsed() > STOP_DEADLINE => return Waited::Stopped,
            _ => {}
        }
        if !wait(Duration::from_millis(100)) {
            return Waited::Stopping;
        }
    }
}

/// Records the outcome, and logs when a database starts or stops failing.
fn conclude(db: pg_sys::Oid, slot: &DatabaseSlot, outcome: Outcome) {
    let failed_before =
        shared::record_outcome(slot, outcome, clock::wall_clock(), interval_micros());
    let name = database_name(db);
    if outcome == Outcome::Ok {
        if failed_before > 0 {
            pgrx::log!(
                "makima_keys: the flush of database \"{name}\" succeeded again after {failed_before} \
                 failed rounds; what its keys were owed is written"
            );
        }
        return;
    }
    if failed_before == 0 {
        let sqlstate = slot.sqlstate.load(Ordering::Relaxed);
        let reason = if sqlstate == 0 {
            String::new()
        } else {
            format!(" (SQLSTATE {})", shared::unpack_sqlstate(sqlstate))
        };
        let hint = match outcome {
            Outcome::NotEntered => {
                "a transaction holds the database (ALTER DATABASE ... RENAME, \
                 CREATE DATABASE ... TEMPLATE) or it refuses connections"
            }
            Outcome::NoWorkerSlot => "raise max_worker_processes",
            _ => {
                "see the worker's error above; a trigger on api_keys that raises is a common cause"
            }
        };
        pgrx::log!(
            "makima_keys: the flush of database \"{name}\" failed: {}{reason}; last_used_at \
             stays owed and the database is tried again with backoff ({hint})",
            outcome.as_str()
        );
    }
}

fn database_name(db: pg_sys::Oid) -> String {
    BackgroundWorker::transaction(|| {
        // SAFETY: a syscache lookup in a transaction; NULL when gone.
        let name = unsafe { pg_sys::get_database_name(db) };
        if name.is_null() {
            format!("{}", db.to_u32())
        } else {
            // SAFETY: a palloc'd C string.
            unsafe { std::ffi::CStr::from_ptr(name) }
                .to_string_lossy()
                .into_owned()
        }
    })
}

/// Logs, once per round in which it happened, that a shared hash had no
/// room: verifications then wrote `last_used_at` themselves (statistics
/// hash) or rate-limited calls failed closed (bucket hash). Counts only.
fn report_full_hashes() {
    use std::sync::atomic::AtomicU64;
    static LAST: [AtomicU64; 2] = [AtomicU64::new(0), AtomicU64::new(0)];
    let Some(usage) = shared::usage() else { return };
    let untracked = usage.untracked - LAST[0].swap(usage.untracked, Ordering::Relaxed);
    let refused = usage.buckets_full - LAST[1].swap(usage.buckets_full, Ordering::Relaxed);
    if untracked > 0 || refused > 0 {
        pgrx::log!(
            "makima_keys: shared hashes full ({} entries each): {} verifications were not \
             tracked, {} rate-limited calls answered rate_limit_unavailable; {} keys and {} \
             budgets are held, and a database that holds its share is refused before a hash is \
             full (SELECT * FROM mk_shared_status()); raise makima_keys.max_tracked_keys",
            usage.capacity,
            untracked,
            refused,
            usage.tracked_keys,
            usage.tracked_budgets
        );
    }
}

// ---- the flush worker ----

thread_local! {
    static MY_SLOT_INDEX: std::cell::Cell<Option<usize>> = const { std::cell::Cell::new(None) };
}
static mut PREVIOUS_EMIT_LOG_HOOK: pg_sys::emit_log_hook_type = None;

/// Records the SQLSTATE of every ERROR this worker raises in its slot, so
/// that the launcher and `mk_shared_status()` can say why a round failed.
#[pg_guard]
unsafe extern "C-unwind" fn remember_error(edata: *mut pg_sys::ErrorData) {
    // SAFETY: the hook's argument, valid for this call; chaining the
    // previous hook is PostgreSQL's convention.
    unsafe {
        if (*edata).elevel >= pg_sys::PGERROR as i32 {
            if let Some(slot) = MY_SLOT_INDEX.get().and_then(shared::slot) {
                slot.sqlstate.store((*edata).sqlerrcode, Ordering::Relaxed);
            }
        }
        if let Some(previous) = PREVIOUS_EMIT_LOG_HOOK {
            previous(edata);
        }
    }
}

/// Gives the slot back when this worker exits, however it exits.
#[pg_guard]
unsafe extern "C-unwind" fn release_slot(_code: i32, arg: pg_sys::Datum) {
    if let Some(slot) = shared::slot(arg.value()) {
        // SAFETY: a plain read of this process's pid.
        let me = unsafe { pg_sys::MyProcPid };
        let _ = slot
            .worker_pid
            .compare_exchange(me, 0, Ordering::AcqRel, Ordering::Relaxed);
    }
}

/// A flush worker: one database, one round.
#[pg_guard]
#[no_mangle]
pub extern "C-unwind" fn mk_flush_main(arg: pg_sys::Datum) {
    let argument = arg.value() as u64;
    let index = (argument >> 32) as usize;
    let db = pg_sys::Oid::from(argument as u32);
    // SIGTERM is PostgreSQL's `die`, as in a backend: it only sets flags,
    // and the next CHECK_FOR_INTERRUPTS ends the process with FATAL (a wait
    // for a lock to enter the database included). So the launcher, a fast
    // shutdown or DROP DATABASE ... WITH (FORCE) stop this worker whatever
    // statement it is in; pgrx's handler would only set a flag read between
    // batches.
    // SAFETY: installs PostgreSQL's handler, then lets the signals
    // PostgreSQL blocked at start through.
    unsafe {
        set_sigterm_to_die();
        pg_sys::BackgroundWorkerUnblockSignals();
    }
    let Some(slot) = shared::slot(index) else {
        return;
    };
    // A worker started by a launcher that has since exited may find its slot
    // forgotten and given to another database: it leaves it alone.
    if slot.db.load(Ordering::Acquire) != db.to_u32() {
        return;
    }
    // SAFETY: a plain read of this process's pid.
    let me = unsafe { pg_sys::MyProcPid };
    // One worker per slot: one that a launcher before a restart started may
    // still be running. Claimed only from 0, or from a holder that is gone.
    let claimed = match slot
        .worker_pid
        .compare_exchange(0, me, Ordering::AcqRel, Ordering::Acquire)
    {
        Ok(_) => true,
        // SAFETY: signal 0 only checks that the process exists.
        Err(holder) if unsafe { libc_kill(holder, 0) } != 0 => slot
            .worker_pid
            .compare_exchange(holder, me, Ordering::AcqRel, Ordering::Acquire)
            .is_ok(),
        Err(_) => false,
    };
    if !claimed {
        shared::set_phase(slot, Phase::Busy);
        return;
    }
    // SAFETY: registers a callback of this process, and our error hook.
    unsafe {
        pg_sys::before_shmem_exit(Some(release_slot), pg_sys::Datum::from(index));
        MY_SLOT_INDEX.set(Some(index));
        PREVIOUS_EMIT_LOG_HOOK = pg_sys::emit_log_hook;
        pg_sys::emit_log_hook = Some(remember_error);
    }
    // Before connecting: the connection itself waits for the database's
    // lock, and this lock_timeout bounds that wait too.
    override_database_settings();
    BackgroundWorker::connect_worker_to_spi_by_oid(Some(db), None);
    override_database_settings();
    shared::set_phase(slot, Phase::Connected);

    let Some(table) = BackgroundWorker::transaction(find_table) else {
        shared::set_phase(slot, Phase::NoExtension);
        return;
    };
    // Ended keys first: a write that fails (an owner's trigger that raises)
    // must not hold their announcement back.
    // And an announcement that fails (a statement timeout on a large
    // table, a full NOTIFY queue) must not hold the write back: it is
    // caught, logged and recorded, and the same window is tried again next
    // round.
    let from = slot.announced_until.load(Ordering::Relaxed);
    let until = clock::wall_clock();
    let announced = in_caught_transaction(|| announce_ended(&table, from, until));
    match announced {
        Ok(()) => {
            slot.announced_until.fetch_max(until, Ordering::Relaxed);
        }
        Err(sqlstate) => slot.sqlstate.store(sqlstate, Ordering::Relaxed),
    }
    shared::set_phase(slot, Phase::Announced);

    let owed = shared::owed(db);
    let started = std::time::Instant::now();
    let mut paid = 0;
    for batch in owed.chunks(FLUSH_BATCH) {
        pgrx::check_for_interrupts!();
        let done: std::collections::HashSet<pgrx::Uuid> =
            BackgroundWorker::transaction(|| write_last_used(&table, batch));
        let done: Vec<(pgrx::Uuid, Micros)> = batch
            .iter()
            .filter(|(id, _)| done.contains(id))
            .copied()
            .collect();
        shared::paid(db, &done);
        paid += done.len();
    }
    if !owed.is_empty() {
        // For bench/shared.py, which measures the flush's cost.
        pgrx::debug1!(
            "makima_keys flush: {paid} of {} keys owed last_used_at done in {:.3} ms",
            owed.len(),
            started.elapsed().as_secs_f64() * 1000.0
        );
    }
    slot.written.store(paid as u64, Ordering::Relaxed);
    if announced.is_err() {
        // The writes went through; the round failed all the same.
        shared::set_phase(slot, Phase::AnnounceFailed);
        return;
    }
    shared::set_phase(slot, Phase::Done);
}

/// PostgreSQL's `die` as the SIGTERM handler (`pqsignal` is
/// `pqsignal_be` in a backend from PostgreSQL 18 on).
///
/// # Safety
/// Called once at the worker's start, before signals are unblocked.
unsafe fn set_sigterm_to_die() {
    // SAFETY: the caller's contract; `die` is PostgreSQL's own handler.
    unsafe {
        #[cfg(not(feature = "pg18"))]
        pg_sys::pqsignal(pg_sys::SIGTERM as i32, Some(postgres_die));
        #[cfg(feature = "pg18")]
        pg_sys::pqsignal_be(pg_sys::SIGTERM as i32, Some(postgres_die));
    }
}

/// Runs `f` in a transaction of its own; an ERROR in it is caught, logged
/// at LOG (it names no key: our statements carry key ids at most), and the
/// transaction is aborted. `Err` holds the error's packed SQLSTATE.
fn in_caught_transaction(
    f: impl FnOnce() + std::panic::UnwindSafe + std::panic::RefUnwindSafe,
) -> Result<(), i32> {
    let caught = PgTryBuilder::new(|| {
        BackgroundWorker::transaction(f);
        Ok(())
    })
    .catch_others(|error| {
        let (code, message) = match &error {
            pg_sys::panic::CaughtError::PostgresError(report)
            | pg_sys::panic::CaughtError::ErrorReport(report) => {
                (report.sql_error_code() as i32, report.message().to_string())
            }
            pg_sys::panic::CaughtError::RustPanic { ereport, .. } => (
                ereport.sql_error_code() as i32,
                ereport.message().to_string(),
            ),
        };
        pgrx::log!("makima_keys: announcing ended keys failed: {message}");
        Err(code)
    })
    .execute();
    if caught.is_err() {
        // SAFETY: the error was caught and its state flushed by pgrx: end
        // the failed transaction, as a worker's error path does.
        unsafe { pg_sys::AbortCurrentTransaction() };
    }
    caught
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
        (c"lock_timeout", LOCK_TIMEOUT),
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

/// Our `api_keys` in this database, by OID. Its name and its owner are
/// looked up again from the OID in every transaction (`as_it_is_now`).
struct Table {
    oid: pg_sys::Oid,
}

fn find_table() -> Option<Table> {
    Spi::connect(|client| {
        let found = client
            .select(
                "SELECT c.oid
                   FROM pg_catalog.pg_extension e
                   JOIN pg_catalog.pg_class c ON c.relnamespace OPERATOR(pg_catalog.=) e.extnamespace
                  WHERE e.extname OPERATOR(pg_catalog.=) 'makima_keys'
                    AND c.relname OPERATOR(pg_catalog.=) 'api_keys'
                    AND c.relkind OPERATOR(pg_catalog.=) 'r'",
                Some(1),
                &[],
            )
            .expect("find api_keys");
        let row = found.into_iter().next()?;
        Some(Table {
            oid: row.get::<pg_sys::Oid>(1).expect("oid")?,
        })
    })
}

/// Locks the table by OID (so it cannot be dropped, altered or given to
/// another owner under the transaction) and gives its name, schema-qualified
/// and quoted, and its owner, as they are now: a schema renamed or an owner
/// changed since the last transaction is followed, never remembered.
fn as_it_is_now(table: &Table) -> (String, pg_sys::Oid) {
    // SAFETY: locks a relation by OID in this transaction (lock_timeout
    // bounds the wait); released at its end.
    unsafe { pg_sys::LockRelationOid(table.oid, pg_sys::RowExclusiveLock as i32) };
    Spi::connect(|client| {
        let row = client
            .select(
                "SELECT pg_catalog.concat(pg_catalog.quote_ident(n.nspname), '.',
                                          pg_catalog.quote_ident(c.relname)), c.relowner
                   FROM pg_catalog.pg_class c
                   JOIN pg_catalog.pg_namespace n ON n.oid OPERATOR(pg_catalog.=) c.relnamespace
                  WHERE c.oid OPERATOR(pg_catalog.=) $1",
                Some(1),
                &[table.oid.into()],
            )
            .expect("look up api_keys by OID")
            .first();
        let name = row.get::<String>(1).expect("name");
        let owner = row.get::<pg_sys::Oid>(2).expect("owner");
        (
            name.expect("api_keys is locked, so it exists"),
            owner.expect("a table has an owner"),
        )
    })
}

/// Runs `f` with the rights of the table's owner, as a security-restricted
/// operation (as autovacuum and REFRESH MATERIALIZED VIEW do), with only
/// pg_catalog on the search path, and with our statements held to this
/// table: a trigger the owner wrote runs as the owner, never as the
/// superuser this worker connected as, and a statement that would resolve
/// to another table raises before it runs. (Timeouts: see
/// `override_database_settings`.)
fn as_owner<R>(table: &Table, f: impl FnOnce(&str) -> R) -> R {
    let (name, owner) = as_it_is_now(table);
    let mut saved_user = pg_sys::InvalidOid;
    let mut saved_context = 0;
    // SAFETY: saves and sets the current user, as PostgreSQL's own callers
    // do; an ERROR in `f` aborts the transaction, which restores both.
    unsafe {
        pg_sys::GetUserIdAndSecContext(&mut saved_user, &mut saved_context);
        pg_sys::SetUserIdAndSecContext(
            owner,
            saved_context
                | pg_sys::SECURITY_LOCAL_USERID_CHANGE as i32
                | pg_sys::SECURITY_RESTRICTED_OPERATION as i32,
        );
    }
    Spi::run("SELECT pg_catalog.set_config('search_path', 'pg_catalog, pg_temp', true)")
        .expect("pin search_path");
    let result = {
        let _guard = expecting_own_table(table.oid);
        f(&name)
    };
    // SAFETY: restores what was saved above.
    unsafe { pg_sys::SetUserIdAndSecContext(saved_user, saved_context) };
    result
}

/// Writes `last_used_at` for `batch`; returns the keys that need nothing
/// more (written, not due, or gone). A key whose row another transaction
/// holds is skipped, never waited for, and stays owed.
fn write_last_used(
    table: &Table,
    batch: &[(pgrx::Uuid, Micros)],
) -> std::collections::HashSet<pgrx::Uuid> {
    let ids: Vec<pgrx::Uuid> = batch.iter().map(|(id, _)| *id).collect();
    let times: Vec<TimestampWithTimeZone> = batch
        .iter()
        .map(|(_, at)| TimestampWithTimeZone::try_from(*at).expect("a verification time"))
        .collect();
    let interval = f64::from(settings::last_used_interval_secs());
    // Three statements, none with a CTE or a subquery, so that the guard
    // can check every relation each one names: lock the due rows nobody
    // holds (only due rows: a row lock is a WAL record and a dirtied page),
    // write them, then find which due rows were held by others.
    const OWED: &str = "ROWS FROM (pg_catalog.unnest($1::pg_catalog.uuid[]),
                                   pg_catalog.unnest($2::pg_catalog.timestamptz[])) AS o(id, used_at)";
    // OPERATOR(...) binds like any other operator, left to right: the
    // subtraction needs its parentheses.
    const DUE: &str = "(k.last_used_at IS NULL
                        OR k.last_used_at OPERATOR(pg_catalog.<)
                           (o.used_at OPERATOR(pg_catalog.-) pg_catalog.make_interval(secs => $3)))";
    as_owner(table, |t| {
        Spi::connect_mut(|client| {
            let lock = format!(
                "{STATEMENT_MARK}SELECT k.id FROM {t} k, {OWED}
                  WHERE k.id OPERATOR(pg_catalog.=) o.id AND {DUE}
                  ORDER BY k.id FOR UPDATE OF k SKIP LOCKED"
            );
            let locked: Vec<pgrx::Uuid> = client
                .update(
                    &lock,
                    None,
                    &[ids.clone().into(), times.clone().into(), interval.into()],
                )
                .expect("lock the due rows")
                .map(|row| {
                    row.get::<pgrx::Uuid>(1)
                        .expect("id")
                        .expect("id is not null")
                })
                .collect();
            let locked_set: std::collections::HashSet<pgrx::Uuid> =
                locked.iter().copied().collect();
            let (locked_times, rest): (Vec<_>, Vec<_>) =
                batch.iter().partition(|(id, _)| locked_set.contains(id));
            if !locked_times.is_empty() {
                let write = format!(
                    "{STATEMENT_MARK}UPDATE {t} k SET last_used_at = o.used_at FROM {OWED}
                      WHERE k.id OPERATOR(pg_catalog.=) o.id"
                );
                let write_ids: Vec<pgrx::Uuid> = locked_times.iter().map(|(id, _)| *id).collect();
                let write_times: Vec<TimestampWithTimeZone> = locked_times
                    .iter()
                    .map(|(_, at)| TimestampWithTimeZone::try_from(*at).expect("a time"))
                    .collect();
                client
                    .update(
                        &write,
                        None,
                        &[write_ids.into(), write_times.into(), interval.into()],
                    )
                    .expect("write last_used_at");
            }
            // Of the rest, those still due are held by another transaction.
            let rest_ids: Vec<pgrx::Uuid> = rest.iter().map(|(id, _)| *id).collect();
            let rest_times: Vec<TimestampWithTimeZone> = rest
                .iter()
                .map(|(_, at)| TimestampWithTimeZone::try_from(*at).expect("a time"))
                .collect();
            let held: std::collections::HashSet<pgrx::Uuid> = if rest_ids.is_empty() {
                Default::default()
            } else {
                let still_due = format!(
                    "{STATEMENT_MARK}SELECT k.id FROM {t} k, {OWED}
                      WHERE k.id OPERATOR(pg_catalog.=) o.id AND {DUE}"
                );
                client
                    .select(
                        &still_due,
                        None,
                        &[rest_ids.into(), rest_times.into(), interval.into()],
                    )
                    .expect("find the held rows")
                    .map(|row| {
                        row.get::<pgrx::Uuid>(1)
                            .expect("id")
                            .expect("id is not null")
                    })
                    .collect()
            };
            batch
                .iter()
                .map(|(id, _)| *id)
                .filter(|id| !held.contains(id))
                .collect()
        })
    })
}

/// Sends `makima_keys_revoked` for every key whose end (the earlier of
/// `expires_at` and `revoked_at`) fell in `(from, until]`.
fn announce_ended(table: &Table, from: Micros, until: Micros) {
    let from = TimestampWithTimeZone::try_from(from).ok();
    let until = TimestampWithTimeZone::try_from(until).expect("now");
    as_owner(table, |t| {
        let sql = format!(
            "{STATEMENT_MARK}SELECT pg_catalog.count(pg_catalog.pg_notify('makima_keys_revoked', k.id::pg_catalog.text))
               FROM {t} k
              WHERE (k.expires_at IS NOT NULL OR k.revoked_at IS NOT NULL)
                AND LEAST(k.expires_at, k.revoked_at) OPERATOR(pg_catalog.>)
                    COALESCE($1, '-infinity'::pg_catalog.timestamptz)
                AND LEAST(k.expires_at, k.revoked_at) OPERATOR(pg_catalog.<=) $2"
        );
        Spi::connect_mut(|client| {
            client
                .update(&sql, None, &[from.into(), until.into()])
                .expect("announce ended keys");
        })
    });
}
