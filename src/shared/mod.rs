//! The shared-memory tier, which exists only when makima_keys is in
//! `shared_preload_libraries`: per-key statistics and the `last_used_at`
//! each key is owed (the statistics hash), per-user rate-limit budgets (the
//! bucket hash), and the databases the flush worker visits (the slots).
//!
//! - [`table`]: a hash split into 16 partitions, each a dynahash of its own
//!   with its own LWLock, and the guard that holds such a lock;
//! - [`stats`], [`budgets`]: what the two hashes hold;
//! - [`slots`]: the databases served, their health and their shares;
//! - [`eviction`]: making room, forgetting a database;
//! - [`state_file`]: what a clean shutdown saves and the next start loads.
//!
//! Both hashes are sized once by `makima_keys.max_tracked_keys` and
//! allocated whole at start (`HASH_FIXED_SIZE`). Entries are counted here,
//! so the size is exact, and entered with `HASH_ENTER_NULL`, never
//! `HASH_ENTER` (which raises "out of shared memory"): a full hash is an
//! answer, never an error.
//!
//! # Lock protocol
//!
//! Our tranche `makima_keys` has 33 LWLocks:
//!
//! | locks | guard |
//! | --- | --- |
//! | 0 to 15 | one partition of the statistics hash each: finding, entering, changing and removing its entries |
//! | 16 to 31 | one partition of the bucket hash each, likewise |
//! | 32, the registry lock | giving a slot to a database and taking it back (`db` of a slot) |
//!
//! Everything else in a slot, and the counts in `Control`, are atomics
//! read and written without a lock.
//!
//! - A verification holds one partition lock at a time, for one entry.
//! - A scan (statistics rows, what is owed, making room, forgetting a
//!   database) holds one partition lock at a time, in ascending order;
//!   no scan holds every partition at once.
//! - Never a lock of each hash at once, and nothing is taken while the
//!   registry lock is held; the registry lock is never taken under a
//!   partition lock.
//! - Under any of our locks: only reads and writes of shared memory and
//!   atomics, and Rust allocations (which abort, never raise). No SPI, no
//!   catalog access, no `ereport`, no call that can raise an ERROR.
//!
//! `Held::take` checks the order in debug builds (`LWLockHeldByMe`).

mod budgets;
mod eviction;
mod slots;
mod state_file;
mod stats;
mod table;

use std::ffi::CString;
use std::ptr;
use std::sync::atomic::{AtomicU64, Ordering};

use pgrx::pg_sys;
use pgrx::prelude::*;

use crate::policy::Micros;
use crate::settings;
use table::{partition_capacity, Held, Table, PARTITIONS};

pub(crate) use budgets::{peek, refund, take, Take};
pub(crate) use eviction::{forget_database, make_room};
pub(crate) use slots::{
    databases, due, phase, record_outcome, set_phase, slot, unpack_sqlstate, DatabaseSlot, Outcome,
    Phase, MAX_DATABASES,
};
pub(crate) use stats::StatsRow;
pub(crate) use stats::{owed, owed_counts, paid, record, record_unknown, reset_stats, stats_rows};

/// LWLocks of our tranche: the stats partitions, the bucket partitions,
/// then the registry lock.
const LOCKS: usize = 2 * PARTITIONS + 1;
pub(crate) const REGISTRY_LOCK: usize = 2 * PARTITIONS;
const TRANCHE: &std::ffi::CStr = c"makima_keys";
/// No time: a `last_used_at` nobody is owed, a key never verified.
pub(crate) const NEVER: Micros = i64::MIN;

#[repr(C)]
pub(crate) struct Control {
    tracked_keys: AtomicU64,
    tracked_buckets: AtomicU64,
    /// Verifications that found no room in the statistics hash.
    untracked: AtomicU64,
    /// Rate-limited calls that found no room in the bucket hash.
    buckets_full: AtomicU64,
    databases: [DatabaseSlot; MAX_DATABASES],
}

/// Pointers into shared memory, set in the postmaster and inherited by
/// every process it forks.
#[derive(Clone, Copy)]
pub(crate) struct Shared {
    control: *mut Control,
    stats: Table,
    buckets: Table,
    locks: *mut pg_sys::LWLockPadded,
    capacity: u64,
}

static mut SHARED: Option<Shared> = None;
static mut PREV_SHMEM_REQUEST: pg_sys::shmem_request_hook_type = None;
static mut PREV_SHMEM_STARTUP: pg_sys::shmem_startup_hook_type = None;

fn shared() -> Option<Shared> {
    // SAFETY: written only by the postmaster before it forks anyone, and
    // by the shmem startup hook of this process; read-only afterwards.
    unsafe { *ptr::addr_of!(SHARED) }
}

fn control(s: Shared) -> &'static Control {
    // SAFETY: the control struct lives as long as the server.
    unsafe { &*s.control }
}

fn lock_at(s: Shared, index: usize) -> *mut pg_sys::LWLock {
    assert!(index < LOCKS);
    // SAFETY: index < LOCKS, the size of our tranche.
    unsafe { ptr::addr_of_mut!((*s.locks.add(index)).lock) }
}

/// Whether this server preloaded makima_keys: the shared tier exists.
pub(crate) fn is_ready() -> bool {
    shared().is_some()
}

/// Whether the tier serves this database: preloaded, and the database has
/// (or now gets) a place in the list the worker visits. Without one (more
/// than `MAX_DATABASES` at once), its verifications write `last_used_at`
/// themselves and are not counted, as without preloading: what they would
/// be owed could never be written.
pub(crate) fn serves_this_database() -> bool {
    slots::my_slot().is_some()
}

/// Since when the worker announces keys of this database that end by
/// time (so that issue and revoke need not): `None` when it does not
/// (not preloaded, or no room in the list of databases).
/// Looks the database up without registering it: until a 0.4.0
/// verification registers it, issue and revoke announce as before.
pub(crate) fn expiries_announced_from() -> Option<Micros> {
    slots::found_slot(slots::this_database()).map(|slot| slot.covered_from.load(Ordering::Relaxed))
}

/// Called from `_PG_init` while the library is being preloaded.
pub(crate) fn install_hooks() {
    // SAFETY: _PG_init of a preloaded library runs in the postmaster,
    // single-threaded, before any hook is called.
    unsafe {
        PREV_SHMEM_REQUEST = pg_sys::shmem_request_hook;
        pg_sys::shmem_request_hook = Some(request_shmem);
        PREV_SHMEM_STARTUP = pg_sys::shmem_startup_hook;
        pg_sys::shmem_startup_hook = Some(start_shmem);
    }
}

fn hash_size<E>(capacity: u64) -> usize {
    // SAFETY: a pure size computation.
    let partition =
        unsafe { pg_sys::hash_estimate_size(partition_capacity(capacity) as _, size_of::<E>()) };
    partition * PARTITIONS
}

#[pg_guard]
unsafe extern "C-unwind" fn request_shmem() {
    // SAFETY: the previous hook, called as PostgreSQL would.
    unsafe {
        if let Some(previous) = PREV_SHMEM_REQUEST {
            previous();
        }
    }
    let capacity = settings::max_tracked_keys();
    let size = size_of::<Control>()
        + hash_size::<stats::StatsEntry>(capacity)
        + hash_size::<budgets::BucketEntry>(capacity);
    // SAFETY: called from shmem_request_hook, where these requests belong.
    unsafe {
        pg_sys::RequestAddinShmemSpace(size);
        pg_sys::RequestNamedLWLockTranche(TRANCHE.as_ptr(), LOCKS as i32);
    }
}

/// Creates (in the postmaster) or attaches to (in an EXEC_BACKEND child)
/// the partitions of one hash.
///
/// # Safety
/// Called from the shmem startup hook, under AddinShmemInitLock.
unsafe fn init_table<E>(name: &str, capacity: u64, lock_base: usize) -> Table {
    let each = partition_capacity(capacity) as std::ffi::c_long;
    // HASH_FIXED_SIZE: every entry is allocated here, at start; a full
    // hash never takes the spare shared memory PostgreSQL's own tables
    // (locks, predicate locks) grow into.
    let flags = (pg_sys::HASH_ELEM | pg_sys::HASH_BLOBS | pg_sys::HASH_FIXED_SIZE) as i32;
    let mut parts = [ptr::null_mut(); PARTITIONS];
    for (p, part) in parts.iter_mut().enumerate() {
        let mut info = pg_sys::HASHCTL {
            keysize: size_of::<table::EntryKey>(),
            entrysize: size_of::<E>(),
            ..Default::default()
        };
        let name = CString::new(format!("{name} {p}")).expect("no NUL");
        // SAFETY: the caller's contract; ShmemInitHash copies the name.
        *part = unsafe { pg_sys::ShmemInitHash(name.as_ptr(), each, each, &mut info, flags) };
    }
    Table { parts, lock_base }
}

#[pg_guard]
unsafe extern "C-unwind" fn start_shmem() {
    // SAFETY: the previous hook, called as PostgreSQL would.
    unsafe {
        if let Some(previous) = PREV_SHMEM_STARTUP {
            previous();
        }
    }
    let capacity = settings::max_tracked_keys();
    // SAFETY: the shmem startup hook, under AddinShmemInitLock as
    // PostgreSQL asks (MainLWLockArray[21] in 15 to 18).
    unsafe {
        let init_lock = ptr::addr_of_mut!((*pg_sys::MainLWLockArray.add(21)).lock);
        pg_sys::LWLockAcquire(init_lock, pg_sys::LWLockMode::LW_EXCLUSIVE);
        let mut found = false;
        let control =
            pg_sys::ShmemInitStruct(c"makima_keys".as_ptr(), size_of::<Control>(), &mut found)
                .cast::<Control>();
        if !found {
            ptr::write_bytes(control.cast::<u8>(), 0, size_of::<Control>());
        }
        let stats = init_table::<stats::StatsEntry>("makima_keys stats", capacity, 0);
        let buckets =
            init_table::<budgets::BucketEntry>("makima_keys rate buckets", capacity, PARTITIONS);
        let locks = pg_sys::GetNamedLWLockTranche(TRANCHE.as_ptr());
        SHARED = Some(Shared {
            control,
            stats,
            buckets,
            locks,
            capacity,
        });
        pg_sys::LWLockRelease(init_lock);
        if !pg_sys::IsUnderPostmaster {
            if let Some(saved) = state_file::load() {
                restore(saved);
            }
            pg_sys::on_shmem_exit(Some(save_state_at_exit), pg_sys::Datum::from(0));
        }
    }
}

/// How full the tier is, since the start.
pub(crate) struct Usage {
    pub(crate) capacity: u64,
    pub(crate) tracked_keys: u64,
    pub(crate) tracked_budgets: u64,
    /// Verifications that found no room in the statistics hash.
    pub(crate) untracked: u64,
    /// Rate-limited calls that found no room in the bucket hash.
    pub(crate) buckets_full: u64,
}

pub(crate) fn usage() -> Option<Usage> {
    let s = shared()?;
    let c = control(s);
    Some(Usage {
        capacity: s.capacity,
        tracked_keys: c.tracked_keys.load(Ordering::Relaxed),
        tracked_budgets: c.tracked_buckets.load(Ordering::Relaxed),
        untracked: c.untracked.load(Ordering::Relaxed),
        buckets_full: c.buckets_full.load(Ordering::Relaxed),
    })
}

// ---- saved at a clean shutdown, loaded at the next start ----

#[pg_guard]
unsafe extern "C-unwind" fn save_state_at_exit(code: i32, _arg: pg_sys::Datum) {
    // After a crash shared memory is not to be trusted: start afresh. An
    // immediate shutdown exits with code 0 but killed backends in the
    // middle of their work, as a crash does: only a shutdown that wrote
    // its shutdown checkpoint saves.
    if code != 0 || !shut_down_cleanly() {
        return;
    }
    let Some(s) = shared() else { return };
    let saved_slots = (0..MAX_DATABASES)
        .map(|i| slots::slot_at(s, i))
        .filter(|slot| slot.db.load(Ordering::Relaxed) != 0)
        .map(|slot| state_file::SavedSlot {
            db: slot.db.load(Ordering::Relaxed),
            padding: 0,
            not_found: slot.not_found.load(Ordering::Relaxed),
            malformed: slot.malformed.load(Ordering::Relaxed),
            since: slot.since.load(Ordering::Relaxed),
            covered_from: slot.covered_from.load(Ordering::Relaxed),
            announced_until: slot.announced_until.load(Ordering::Relaxed),
        })
        .collect();
    // SAFETY: the postmaster exits; no other process is left.
    let saved = unsafe {
        state_file::Saved {
            slots: saved_slots,
            stats: s.stats.copy_unlocked(),
            buckets: s.buckets.copy_unlocked(),
        }
    };
    state_file::save(&state_file::encode(
        &state_file::Writer::this_build(),
        &saved,
    ));
}

/// Whether the control file says the cluster shut down cleanly (a primary
/// or a standby), as it does only after the shutdown checkpoint.
fn shut_down_cleanly() -> bool {
    let read = std::panic::AssertUnwindSafe(|| {
        let mut crc_ok = false;
        // SAFETY: reads the control file of our own data directory.
        let state = unsafe { (*pg_sys::get_controlfile(pg_sys::DataDir, &mut crc_ok)).state };
        crc_ok
            && (state == pg_sys::DBState::DB_SHUTDOWNED
                || state == pg_sys::DBState::DB_SHUTDOWNED_IN_RECOVERY)
    });
    PgTryBuilder::new(read).catch_others(|_| false).execute()
}

/// Puts what a clean shutdown saved back into shared memory, in the
/// postmaster before anything else runs. Keys owed a `last_used_at` go in
/// first: when `max_tracked_keys` was lowered and not everything fits,
/// statistics are dropped before any owed write, and whatever is dropped
/// is logged with its count.
fn restore(saved: state_file::Saved) {
    let Some(s) = shared() else { return };
    let c = control(s);
    for (i, saved_slot) in saved.slots.iter().enumerate().take(MAX_DATABASES) {
        let slot = slots::slot_at(s, i);
        slot.not_found
            .store(saved_slot.not_found, Ordering::Relaxed);
        slot.malformed
            .store(saved_slot.malformed, Ordering::Relaxed);
        slot.since.store(saved_slot.since, Ordering::Relaxed);
        slot.covered_from
            .store(saved_slot.covered_from, Ordering::Relaxed);
        slot.announced_until
            .store(saved_slot.announced_until, Ordering::Relaxed);
        slots::reset_health(slot);
        slot.db.store(saved_slot.db, Ordering::Release);
    }
    let mut held: Vec<(u32, u64, u64)> = Vec::new();
    let mut count = |db: u32, budget: bool| {
        let index = match held.iter().position(|(d, _, _)| *d == db) {
            Some(i) => i,
            None => {
                held.push((db, 0, 0));
                held.len() - 1
            }
        };
        if budget {
            held[index].2 += 1;
        } else {
            held[index].1 += 1;
        }
    };
    let (owed, idle): (Vec<_>, Vec<_>) = saved.stats.into_iter().partition(|e| e.is_owed());
    let mut dropped_owed = 0u64;
    let mut dropped_idle = 0u64;
    for (entries, dropped) in [(owed, &mut dropped_owed), (idle, &mut dropped_idle)] {
        for saved_entry in entries {
            let entered = s.stats.with_entry(
                s,
                &c.tracked_keys,
                saved_entry.key,
                || true,
                |e: &mut stats::StatsEntry| *e = saved_entry,
                |_| (),
            );
            match entered {
                Some(_) => count(saved_entry.key.db, false),
                None => *dropped += 1,
            }
        }
    }
    // Budgets that still hold calls back first: dropping a full one gives
    // nothing away, dropping the others would hand out calls.
    let now = crate::clock::wall_clock();
    let (holding, full): (Vec<_>, Vec<_>) = saved
        .buckets
        .into_iter()
        .partition(|e| !e.bucket().is_full(now));
    let mut dropped_budgets = 0u64;
    for saved_entry in holding.into_iter().chain(full) {
        let entered = s.buckets.with_entry(
            s,
            &c.tracked_buckets,
            saved_entry.key,
            || true,
            |e: &mut budgets::BucketEntry| *e = saved_entry,
            |_| (),
        );
        match entered {
            Some(_) => count(saved_entry.key.db, true),
            None => dropped_budgets += 1,
        }
    }
    for i in 0..MAX_DATABASES {
        let slot = slots::slot_at(s, i);
        let db = slot.db.load(Ordering::Relaxed);
        if let Some((_, keys, budgets)) = held.iter().find(|(d, _, _)| *d == db && db != 0) {
            slot.keys.store(*keys, Ordering::Relaxed);
            slot.budgets.store(*budgets, Ordering::Relaxed);
        }
    }
    if dropped_owed + dropped_idle + dropped_budgets > 0 {
        pgrx::warning!(
            "makima_keys: makima_keys.max_tracked_keys ({}) is too small for the state saved at \
             shutdown: {} keys owed a last_used_at (which will not be written), {} keys' \
             statistics and {} rate-limit budgets were not restored",
            s.capacity,
            dropped_owed,
            dropped_idle,
            dropped_budgets
        );
    }
}

/// What `mk_shared_status()` shows of one database.
pub(crate) struct DatabaseStatus {
    pub(crate) oid: pg_sys::Oid,
    pub(crate) outcome: Outcome,
    pub(crate) sqlstate: Option<String>,
    pub(crate) last_attempt_at: Micros,
    pub(crate) last_success_at: Micros,
    pub(crate) failures: u32,
    pub(crate) next_attempt_at: Micros,
    pub(crate) written: u64,
}

/// One row of `mk_shared_status()`: a database, or (`database` None) the
/// whole tier.
pub(crate) struct StatusRow {
    pub(crate) database: Option<DatabaseStatus>,
    pub(crate) owed: u64,
    pub(crate) keys: u64,
    pub(crate) budgets: u64,
    pub(crate) capacity: u64,
    pub(crate) untracked: u64,
    pub(crate) refused: u64,
}

/// The rows of `mk_shared_status()`; `None` when not preloaded.
pub(crate) fn status_rows() -> Option<Vec<StatusRow>> {
    let s = shared()?;
    let owed = owed_counts();
    let mut rows = Vec::new();
    for i in 0..MAX_DATABASES {
        let slot = slots::slot_at(s, i);
        let db = slot.db.load(Ordering::Acquire);
        if db == 0 {
            continue;
        }
        let sqlstate = slot.sqlstate.load(Ordering::Relaxed);
        rows.push(StatusRow {
            database: Some(DatabaseStatus {
                oid: pg_sys::Oid::from(db),
                outcome: Outcome::from_u32(slot.outcome.load(Ordering::Relaxed)),
                sqlstate: (sqlstate != 0).then(|| unpack_sqlstate(sqlstate)),
                last_attempt_at: slot.last_attempt_at.load(Ordering::Relaxed),
                last_success_at: slot.last_success_at.load(Ordering::Relaxed),
                failures: slot.failures.load(Ordering::Relaxed),
                next_attempt_at: slot.next_attempt_at.load(Ordering::Relaxed),
                written: slot.written.load(Ordering::Relaxed),
            }),
            owed: owed.iter().find(|(d, _)| *d == db).map_or(0, |(_, n)| *n),
            keys: slot.keys.load(Ordering::Relaxed),
            budgets: slot.budgets.load(Ordering::Relaxed),
            capacity: s.capacity,
            untracked: 0,
            refused: 0,
        });
    }
    let c = control(s);
    rows.push(StatusRow {
        database: None,
        owed: owed.iter().map(|(_, n)| n).sum(),
        keys: c.tracked_keys.load(Ordering::Relaxed),
        budgets: c.tracked_buckets.load(Ordering::Relaxed),
        capacity: s.capacity,
        untracked: c.untracked.load(Ordering::Relaxed),
        refused: c.buckets_full.load(Ordering::Relaxed),
    });
    Some(rows)
}
