//! The shared-memory tier, which exists only when makima_keys is in
//! `shared_preload_libraries`: per-key statistics and the `last_used_at`
//! each key is owed (one hash), per-user rate-limit buckets (another), and
//! the databases the flush worker visits.
//!
//! Both hashes are PostgreSQL's own (`ShmemInitHash`), sized once by
//! `makima_keys.max_tracked_keys`, partitioned 16 ways with one LWLock per
//! partition, so verifications of different keys rarely meet on a lock.
//! Entries are counted here (not by dynahash) so that the size is exact,
//! and inserted with `HASH_ENTER_NULL`, never `HASH_ENTER` (which raises
//! "out of shared memory"): a full hash is an answer, never an error.
//!
//! A clean shutdown saves everything to `pg_stat/makima_keys.state`, which
//! the next start loads (and deletes, so a crash starts afresh).

use std::cell::Cell;
use std::ffi::c_void;
use std::ptr;
use std::sync::atomic::{AtomicI64, AtomicU32, AtomicU64, Ordering};

use pgrx::pg_sys;
use pgrx::prelude::*;

use crate::policy::{KeyStatus, Micros};
use crate::rate::{Bucket, Charge, RateLimit, Receipt};
use crate::settings;

/// Lock partitions of each hash (a power of two, as dynahash needs).
const PARTITIONS: usize = 16;
/// LWLocks of our tranche: the stats partitions, the bucket partitions,
/// then one for the list of databases.
const LOCKS: usize = 2 * PARTITIONS + 1;
const REGISTRY_LOCK: usize = 2 * PARTITIONS;
const TRANCHE: &std::ffi::CStr = c"makima_keys";
/// Databases whose keys the worker flushes and announces at once.
pub(crate) const MAX_DATABASES: usize = 256;
/// No time: a `last_used_at` nobody is owed, a key never verified.
pub(crate) const NEVER: Micros = i64::MIN;
const STATE_FILE: &str = "pg_stat/makima_keys.state";
const STATE_MAGIC: &[u8; 8] = b"MKSTATE1";

/// Statuses counted per key, in the columns of `mk_key_stats`.
pub(crate) const COUNTED: [KeyStatus; 8] = [
    KeyStatus::Valid,
    KeyStatus::Revoked,
    KeyStatus::Expired,
    KeyStatus::InsufficientScope,
    KeyStatus::RateLimitUnavailable,
    KeyStatus::RateLimited,
    KeyStatus::UsageExceeded,
    KeyStatus::UsageUnavailable,
];

fn counted_index(status: KeyStatus) -> usize {
    COUNTED
        .iter()
        .position(|s| *s == status)
        .expect("every status of a found key is counted")
}

/// A database and a key or user id: the key of both hashes. 20 bytes, no
/// padding, so dynahash can hash and compare it as bytes.
#[repr(C)]
#[derive(Clone, Copy, PartialEq, Eq)]
struct EntryKey {
    db: u32,
    id: [u8; 16],
}

/// One key's statistics, and the `last_used_at` it is owed.
#[repr(C)]
#[derive(Clone, Copy)]
pub(crate) struct StatsEntry {
    key: EntryKey,
    /// Written as 0: the state file copies entries byte for byte, and no
    /// byte of them may be left uninitialised.
    padding: u32,
    pub(crate) counts: [u64; COUNTED.len()],
    /// The last successful verification.
    pub(crate) last_valid_at: Micros,
    /// The last call of any status.
    pub(crate) last_call_at: Micros,
    /// Since when these counts run.
    pub(crate) since: Micros,
    /// The `last_used_at` the worker is to write; `NEVER` when none.
    pending: Micros,
}

/// One user's rate-limit bucket. Its theoretical arrival time is kept as
/// two halves: entries are only 8-byte aligned, and an `i128` wants 16.
#[repr(C)]
#[derive(Clone, Copy)]
struct BucketEntry {
    key: EntryKey,
    /// Written as 0, as in `StatsEntry`.
    padding: u32,
    tat_high: i64,
    tat_low: u64,
    per_period: i32,
    padding_2: i32,
    period: Micros,
}

impl BucketEntry {
    fn bucket(&self) -> Bucket {
        Bucket {
            tat: (i128::from(self.tat_high) << 64) | i128::from(self.tat_low),
            limit: RateLimit {
                per_period: self.per_period,
                period: self.period,
            },
        }
    }

    fn set(&mut self, bucket: Bucket) {
        self.padding = 0;
        self.padding_2 = 0;
        self.tat_high = (bucket.tat >> 64) as i64;
        self.tat_low = bucket.tat as u64;
        self.per_period = bucket.limit.per_period;
        self.period = bucket.limit.period;
    }
}

/// A database whose keys are tracked: its junk counts (`not_found`,
/// `malformed`), and how far the worker has announced keys that end.
#[repr(C)]
pub(crate) struct DatabaseSlot {
    /// 0: a free slot.
    db: AtomicU32,
    not_found: AtomicU64,
    malformed: AtomicU64,
    since: AtomicI64,
    /// Keys that ended after this instant and up to `announced_until` were
    /// (or, once the worker gets there, will be) announced by the worker.
    covered_from: AtomicI64,
    announced_until: AtomicI64,
    /// What the last flush worker of this database got to (`WorkerState`).
    worker_state: AtomicU32,
}

/// How far a flush worker got, as it tells the launcher.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub(crate) enum WorkerState {
    Starting = 0,
    Connected = 1,
    Done = 2,
    NoExtension = 3,
}

#[repr(C)]
struct Control {
    tracked_keys: AtomicU64,
    tracked_buckets: AtomicU64,
    /// Verifications that found the statistics hash full.
    untracked: AtomicU64,
    /// Rate-limited calls that found the bucket hash full.
    buckets_full: AtomicU64,
    databases: [DatabaseSlot; MAX_DATABASES],
}

/// Pointers into shared memory, set in the postmaster and inherited by
/// every process it forks.
#[derive(Clone, Copy)]
struct Shared {
    control: *mut Control,
    stats: *mut pg_sys::HTAB,
    buckets: *mut pg_sys::HTAB,
    locks: *mut pg_sys::LWLockPadded,
    capacity: u64,
}

static mut SHARED: Option<Shared> = None;
static mut PREV_SHMEM_REQUEST: pg_sys::shmem_request_hook_type = None;
static mut PREV_SHMEM_STARTUP: pg_sys::shmem_startup_hook_type = None;

thread_local! {
    /// This backend's slot in the list of databases, once registered.
    static MY_SLOT: Cell<Option<usize>> = const { Cell::new(None) };
}

fn shared() -> Option<Shared> {
    // SAFETY: written only by the postmaster before it forks anyone, and
    // by the shmem startup hook of this process; read-only afterwards.
    unsafe { *ptr::addr_of!(SHARED) }
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
    my_slot().is_some()
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

fn stats_size(capacity: u64) -> usize {
    // SAFETY: a pure size computation.
    unsafe { pg_sys::hash_estimate_size(capacity as _, std::mem::size_of::<StatsEntry>()) }
}

fn buckets_size(capacity: u64) -> usize {
    // SAFETY: a pure size computation.
    unsafe { pg_sys::hash_estimate_size(capacity as _, std::mem::size_of::<BucketEntry>()) }
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
    let size = std::mem::size_of::<Control>() + stats_size(capacity) + buckets_size(capacity);
    // SAFETY: called from shmem_request_hook, where these requests belong.
    unsafe {
        pg_sys::RequestAddinShmemSpace(size);
        pg_sys::RequestNamedLWLockTranche(TRANCHE.as_ptr(), LOCKS as i32);
    }
}

fn hash_info<E>() -> pg_sys::HASHCTL {
    pg_sys::HASHCTL {
        keysize: std::mem::size_of::<EntryKey>(),
        entrysize: std::mem::size_of::<E>(),
        num_partitions: PARTITIONS as _,
        ..Default::default()
    }
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
    // HASH_FIXED_SIZE: every entry is allocated here, at start; a full
    // hash never takes the spare shared memory PostgreSQL's own tables
    // (locks, predicate locks) grow into.
    let flags =
        (pg_sys::HASH_ELEM | pg_sys::HASH_BLOBS | pg_sys::HASH_PARTITION | pg_sys::HASH_FIXED_SIZE)
            as i32;
    // SAFETY: the shmem startup hook, under AddinShmemInitLock as
    // PostgreSQL asks (MainLWLockArray[21] in 15 to 18).
    unsafe {
        let init_lock = ptr::addr_of_mut!((*pg_sys::MainLWLockArray.add(21)).lock);
        pg_sys::LWLockAcquire(init_lock, pg_sys::LWLockMode::LW_EXCLUSIVE);
        let mut found = false;
        let control = pg_sys::ShmemInitStruct(
            c"makima_keys".as_ptr(),
            std::mem::size_of::<Control>(),
            &mut found,
        )
        .cast::<Control>();
        if !found {
            ptr::write_bytes(control.cast::<u8>(), 0, std::mem::size_of::<Control>());
        }
        let mut info = hash_info::<StatsEntry>();
        let stats = pg_sys::ShmemInitHash(
            c"makima_keys stats".as_ptr(),
            capacity as _,
            capacity as _,
            &mut info,
            flags,
        );
        let mut info = hash_info::<BucketEntry>();
        let buckets = pg_sys::ShmemInitHash(
            c"makima_keys rate buckets".as_ptr(),
            capacity as _,
            capacity as _,
            &mut info,
            flags,
        );
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
            load_state();
            pg_sys::on_shmem_exit(Some(save_state_at_exit), pg_sys::Datum::from(0));
        }
    }
}

/// A partition lock held until dropped.
struct Held(*mut pg_sys::LWLock);

impl Held {
    fn take(s: Shared, index: usize, exclusive: bool) -> Held {
        let mode = if exclusive {
            pg_sys::LWLockMode::LW_EXCLUSIVE
        } else {
            pg_sys::LWLockMode::LW_SHARED
        };
        // SAFETY: index < LOCKS, the size of our tranche.
        unsafe {
            let lock = ptr::addr_of_mut!((*s.locks.add(index)).lock);
            pg_sys::LWLockAcquire(lock, mode);
            Held(lock)
        }
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        // SAFETY: taken by `Held::take` in this process. On an ERROR,
        // PostgreSQL releases every LWLock itself and this never runs.
        unsafe { pg_sys::LWLockRelease(self.0) }
    }
}

fn key_of(id: pgrx::Uuid) -> EntryKey {
    EntryKey {
        // SAFETY: a plain read of this backend's database.
        db: unsafe { pg_sys::MyDatabaseId }.to_u32(),
        id: *id.as_bytes(),
    }
}

/// Finds (or, if there is room, enters) `key` in `table` with partition
/// lock `lock_base + partition` held exclusively, and gives the entry to
/// `f`. `None` when the entry is missing and the hash is full.
fn with_entry<E: Copy, R>(
    s: Shared,
    table: *mut pg_sys::HTAB,
    lock_base: usize,
    count: &AtomicU64,
    key: EntryKey,
    init: impl FnOnce(&mut E),
    f: impl FnOnce(&mut E) -> R,
) -> Option<R> {
    // SAFETY: `table` is one of our shared hashes, whose entries are `E`
    // with `EntryKey` first; the partition lock of the key's hash code is
    // held while the entry is used.
    unsafe {
        let hash = pg_sys::get_hash_value(table, ptr::addr_of!(key).cast());
        let _held = Held::take(s, lock_base + hash as usize % PARTITIONS, true);
        let mut found = false;
        let mut entry = pg_sys::hash_search_with_hash_value(
            table,
            ptr::addr_of!(key).cast(),
            hash,
            pg_sys::HASHACTION::HASH_FIND,
            &mut found,
        )
        .cast::<E>();
        if entry.is_null() {
            if count.fetch_add(1, Ordering::Relaxed) >= s.capacity {
                count.fetch_sub(1, Ordering::Relaxed);
                return None;
            }
            entry = pg_sys::hash_search_with_hash_value(
                table,
                ptr::addr_of!(key).cast(),
                hash,
                pg_sys::HASHACTION::HASH_ENTER_NULL,
                &mut found,
            )
            .cast::<E>();
            if entry.is_null() {
                count.fetch_sub(1, Ordering::Relaxed);
                return None;
            }
            init(&mut *entry);
        }
        Some(f(&mut *entry))
    }
}

/// Gives `f` the entry of `key` in `table` if there is one (never enters
/// it), with partition lock `lock_base + partition` held, shared or
/// exclusive.
fn with_found<E, R>(
    s: Shared,
    table: *mut pg_sys::HTAB,
    lock_base: usize,
    key: EntryKey,
    exclusive: bool,
    f: impl FnOnce(Option<&mut E>) -> R,
) -> R {
    // SAFETY: as in `with_entry`; only ever finds.
    unsafe {
        let hash = pg_sys::get_hash_value(table, ptr::addr_of!(key).cast());
        let _held = Held::take(s, lock_base + hash as usize % PARTITIONS, exclusive);
        let entry = pg_sys::hash_search_with_hash_value(
            table,
            ptr::addr_of!(key).cast(),
            hash,
            pg_sys::HASHACTION::HASH_FIND,
            ptr::null_mut(),
        )
        .cast::<E>();
        f(entry.as_mut())
    }
}

fn new_stats(now: Micros) -> impl FnOnce(&mut StatsEntry) {
    move |e| {
        e.padding = 0;
        e.counts = [0; COUNTED.len()];
        e.last_valid_at = NEVER;
        e.last_call_at = NEVER;
        e.since = now;
        e.pending = NEVER;
    }
}

/// Counts a call that found key `id` with `status`; for a valid key,
/// `owe_last_used` also records that `last_used_at` is owed `now`.
/// `false`: the key is not tracked and the hash is full (the caller then
/// writes `last_used_at` itself, as without preloading).
pub(crate) fn record(id: pgrx::Uuid, status: KeyStatus, now: Micros, owe_last_used: bool) -> bool {
    let Some(s) = shared() else { return false };
    // SAFETY: the control struct lives as long as the server.
    let control = unsafe { &*s.control };
    let recorded = with_entry(
        s,
        s.stats,
        0,
        &control.tracked_keys,
        key_of(id),
        new_stats(now),
        |e: &mut StatsEntry| {
            e.counts[counted_index(status)] += 1;
            e.last_call_at = now;
            if status == KeyStatus::Valid {
                e.last_valid_at = now;
                if owe_last_used {
                    e.pending = e.pending.max(now);
                }
            }
        },
    );
    if recorded.is_none() {
        control.untracked.fetch_add(1, Ordering::Relaxed);
    }
    recorded.is_some()
}

/// Counts a call whose text was no key (`malformed`) or no key of the
/// table (`not_found`), in the database's one row for them.
pub(crate) fn record_unknown(malformed: bool) {
    if let Some(slot) = my_slot() {
        let counter = if malformed {
            &slot.malformed
        } else {
            &slot.not_found
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

/// What a rate-limited call gets from its user's bucket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Take {
    /// Passed; the receipt gives back what was drawn if the call fails.
    Passed(Receipt),
    Limited {
        retry_after: Micros,
    },
    Never,
    /// Not preloaded, or the bucket hash is full: fail closed.
    Unavailable,
}

/// Charges `cost` tokens to `user`'s bucket under `limit` at `now`.
pub(crate) fn take(user: pgrx::Uuid, limit: RateLimit, cost: i32, now: Micros) -> Take {
    let Some(s) = shared() else {
        return Take::Unavailable;
    };
    // SAFETY: the control struct lives as long as the server.
    let control = unsafe { &*s.control };
    let taken = with_entry(
        s,
        s.buckets,
        PARTITIONS,
        &control.tracked_buckets,
        key_of(user),
        |e: &mut BucketEntry| e.set(Bucket::full(limit)),
        |e: &mut BucketEntry| {
            let mut bucket = e.bucket();
            let charge = bucket.charge(limit, cost, now);
            e.set(bucket);
            match charge {
                Charge::Passed(receipt) => Take::Passed(receipt),
                Charge::Limited { retry_after } => Take::Limited { retry_after },
                Charge::Never => Take::Never,
            }
        },
    );
    taken.unwrap_or_else(|| {
        control.buckets_full.fetch_add(1, Ordering::Relaxed);
        Take::Unavailable
    })
}

/// What `take` would give, without charging anything: for a call that is
/// refused for another reason, to report `rate_limited` first.
pub(crate) fn peek(user: pgrx::Uuid, limit: RateLimit, cost: i32, now: Micros) -> Take {
    let Some(s) = shared() else {
        return Take::Unavailable;
    };
    let bucket = with_found(
        s,
        s.buckets,
        PARTITIONS,
        key_of(user),
        false,
        |e: Option<&mut BucketEntry>| e.map_or_else(|| Bucket::full(limit), |e| e.bucket()),
    );
    let mut copy = bucket;
    match copy.charge(limit, cost, now) {
        Charge::Passed(receipt) => Take::Passed(receipt),
        Charge::Limited { retry_after } => Take::Limited { retry_after },
        Charge::Never => Take::Never,
    }
}

/// Gives back, at `now`, what `take` drew for a call that then failed. A
/// bucket that is gone (dropped once full) owes nothing.
pub(crate) fn refund(user: pgrx::Uuid, receipt: Receipt, now: Micros) {
    let Some(s) = shared() else { return };
    with_found(
        s,
        s.buckets,
        PARTITIONS,
        key_of(user),
        true,
        |e: Option<&mut BucketEntry>| {
            if let Some(e) = e {
                let mut bucket = e.bucket();
                bucket.refund(receipt, now);
                e.set(bucket);
            }
        },
    );
}

fn slot_at(s: Shared, index: usize) -> &'static DatabaseSlot {
    // SAFETY: index < MAX_DATABASES; the control struct lives as long as the server.
    unsafe { &(*s.control).databases[index] }
}

/// This database's slot, registering it on first use: from then on the
/// worker flushes and announces its keys.
fn my_slot() -> Option<&'static DatabaseSlot> {
    let s = shared()?;
    // SAFETY: a plain read of this backend's database.
    let db = unsafe { pg_sys::MyDatabaseId }.to_u32();
    if let Some(index) = MY_SLOT.get() {
        let slot = slot_at(s, index);
        if slot.db.load(Ordering::Acquire) == db {
            return Some(slot);
        }
    }
    let index = register(s, db)?;
    MY_SLOT.set(Some(index));
    Some(slot_at(s, index))
}

fn register(s: Shared, db: u32) -> Option<usize> {
    let _held = Held::take(s, REGISTRY_LOCK, true);
    let slots = (0..MAX_DATABASES).map(|i| (i, slot_at(s, i)));
    if let Some((i, _)) = slots
        .clone()
        .find(|(_, slot)| slot.db.load(Ordering::Acquire) == db)
    {
        return Some(i);
    }
    let (i, slot) = slots
        .clone()
        .find(|(_, slot)| slot.db.load(Ordering::Acquire) == 0)?;
    let now = crate::clock::wall_clock();
    slot.not_found.store(0, Ordering::Relaxed);
    slot.malformed.store(0, Ordering::Relaxed);
    slot.since.store(now, Ordering::Relaxed);
    slot.covered_from.store(now, Ordering::Relaxed);
    slot.announced_until.store(now, Ordering::Relaxed);
    slot.worker_state
        .store(WorkerState::Done as u32, Ordering::Relaxed);
    slot.db.store(db, Ordering::Release);
    Some(i)
}

/// Since when the worker announces keys of this database that end by
/// time (so that issue and revoke need not): `None` when it does not
/// (not preloaded, or no room in the list of databases).
/// Looks the database up without registering it: until a 0.4.0
/// verification registers it, issue and revoke announce as before.
pub(crate) fn expiries_announced_from() -> Option<Micros> {
    let s = shared()?;
    // SAFETY: a plain read of this backend's database.
    let db = unsafe { pg_sys::MyDatabaseId }.to_u32();
    (0..MAX_DATABASES)
        .map(|i| slot_at(s, i))
        .find(|slot| slot.db.load(Ordering::Acquire) == db)
        .map(|slot| slot.covered_from.load(Ordering::Relaxed))
}

/// One row of `mk_key_stats`: a key, or (`key_id` None) the database's
/// calls with no key.
pub(crate) struct StatsRow {
    pub(crate) key_id: Option<pgrx::Uuid>,
    pub(crate) counts: [u64; COUNTED.len()],
    pub(crate) not_found: u64,
    pub(crate) malformed: u64,
    pub(crate) last_valid_at: Option<Micros>,
    pub(crate) last_call_at: Option<Micros>,
    pub(crate) since: Micros,
}

/// Every entry of `table`, copied under all its partition locks (shared).
fn entries<E: Copy>(s: Shared, table: *mut pg_sys::HTAB, lock_base: usize) -> Vec<E> {
    let _held: Vec<Held> = (0..PARTITIONS)
        .map(|p| Held::take(s, lock_base + p, false))
        .collect();
    // SAFETY: every partition is locked, so the scan sees a stable table.
    unsafe { raw_entries(table) }
}

/// The statistics of this database: its keys, then one row for the calls
/// that named no key. `None` when not preloaded.
pub(crate) fn stats_rows() -> Option<Vec<StatsRow>> {
    let s = shared()?;
    let slot = my_slot();
    // SAFETY: a plain read of this backend's database.
    let db = unsafe { pg_sys::MyDatabaseId }.to_u32();
    let mut rows: Vec<StatsRow> = entries::<StatsEntry>(s, s.stats, 0)
        .into_iter()
        .filter(|e| e.key.db == db)
        .map(|e| StatsRow {
            key_id: Some(pgrx::Uuid::from_bytes(e.key.id)),
            counts: e.counts,
            not_found: 0,
            malformed: 0,
            last_valid_at: (e.last_valid_at != NEVER).then_some(e.last_valid_at),
            last_call_at: (e.last_call_at != NEVER).then_some(e.last_call_at),
            since: e.since,
        })
        .collect();
    if let Some(slot) = slot {
        rows.push(StatsRow {
            key_id: None,
            counts: [0; COUNTED.len()],
            not_found: slot.not_found.load(Ordering::Relaxed),
            malformed: slot.malformed.load(Ordering::Relaxed),
            last_valid_at: None,
            last_call_at: None,
            since: slot.since.load(Ordering::Relaxed),
        });
    }
    Some(rows)
}

/// Zeroes this database's counts; what is owed to `last_used_at` and the
/// rate-limit buckets are kept. `false` when not preloaded.
pub(crate) fn reset_stats() -> bool {
    let Some(s) = shared() else { return false };
    // SAFETY: a plain read of this backend's database.
    let db = unsafe { pg_sys::MyDatabaseId }.to_u32();
    let now = crate::clock::wall_clock();
    for_each_entry_mut::<StatsEntry>(s, s.stats, 0, |e| {
        if e.key.db == db {
            e.counts = [0; COUNTED.len()];
            e.last_valid_at = NEVER;
            e.last_call_at = NEVER;
            e.since = now;
        }
        Keep::Yes
    });
    if let Some(slot) = my_slot() {
        slot.not_found.store(0, Ordering::Relaxed);
        slot.malformed.store(0, Ordering::Relaxed);
        slot.since.store(now, Ordering::Relaxed);
    }
    true
}

#[derive(PartialEq, Eq)]
enum Keep {
    Yes,
    No,
}

/// Visits every entry of `table` under all its partition locks
/// (exclusive), removing those `f` answers `Keep::No` for. Returns how
/// many it removed.
fn for_each_entry_mut<E>(
    s: Shared,
    table: *mut pg_sys::HTAB,
    lock_base: usize,
    mut f: impl FnMut(&mut E) -> Keep,
) -> u64 {
    let _held: Vec<Held> = (0..PARTITIONS)
        .map(|p| Held::take(s, lock_base + p, true))
        .collect();
    let mut removed = 0;
    // SAFETY: every partition is locked exclusively; dynahash allows
    // removing the entry a sequential scan just returned.
    unsafe {
        let mut status: pg_sys::HASH_SEQ_STATUS = std::mem::zeroed();
        pg_sys::hash_seq_init(&mut status, table);
        loop {
            let entry = pg_sys::hash_seq_search(&mut status).cast::<E>();
            if entry.is_null() {
                break;
            }
            if f(&mut *entry) == Keep::No {
                pg_sys::hash_search(
                    table,
                    entry as *const c_void,
                    pg_sys::HASHACTION::HASH_REMOVE,
                    ptr::null_mut(),
                );
                removed += 1;
            }
        }
    }
    removed
}

// ---- for the worker ----

/// The databases in the list, with their slot index.
pub(crate) fn databases() -> Vec<(usize, pg_sys::Oid)> {
    let Some(s) = shared() else { return Vec::new() };
    (0..MAX_DATABASES)
        .filter_map(|i| {
            let db = slot_at(s, i).db.load(Ordering::Acquire);
            (db != 0).then(|| (i, pg_sys::Oid::from(db)))
        })
        .collect()
}

pub(crate) fn set_worker_state(index: usize, state: WorkerState) {
    if let Some(s) = shared() {
        slot_at(s, index)
            .worker_state
            .store(state as u32, Ordering::Release);
    }
}

pub(crate) fn worker_state(index: usize) -> WorkerState {
    let Some(s) = shared() else {
        return WorkerState::Done;
    };
    match slot_at(s, index).worker_state.load(Ordering::Acquire) {
        1 => WorkerState::Connected,
        2 => WorkerState::Done,
        3 => WorkerState::NoExtension,
        _ => WorkerState::Starting,
    }
}

/// The window of key ends the worker is to announce next in slot `index`.
pub(crate) fn announced_until(index: usize) -> Micros {
    shared().map_or(NEVER, |s| {
        slot_at(s, index).announced_until.load(Ordering::Relaxed)
    })
}

pub(crate) fn set_announced_until(index: usize, until: Micros) {
    if let Some(s) = shared() {
        slot_at(s, index)
            .announced_until
            .store(until, Ordering::Relaxed);
    }
}

/// Forgets a database: its slot, its keys' statistics and what they are
/// owed, and its users' buckets (the database is gone, or makima_keys is
/// no longer installed there).
pub(crate) fn forget_database(index: usize, db: pg_sys::Oid) {
    let Some(s) = shared() else { return };
    let db = db.to_u32();
    // SAFETY: the control struct lives as long as the server.
    let control = unsafe { &*s.control };
    let removed = for_each_entry_mut::<StatsEntry>(s, s.stats, 0, |e| {
        if e.key.db == db {
            Keep::No
        } else {
            Keep::Yes
        }
    });
    control.tracked_keys.fetch_sub(removed, Ordering::Relaxed);
    let removed = for_each_entry_mut::<BucketEntry>(s, s.buckets, PARTITIONS, |e| {
        if e.key.db == db {
            Keep::No
        } else {
            Keep::Yes
        }
    });
    control
        .tracked_buckets
        .fetch_sub(removed, Ordering::Relaxed);
    let _held = Held::take(s, REGISTRY_LOCK, true);
    let _ = slot_at(s, index)
        .db
        .compare_exchange(db, 0, Ordering::AcqRel, Ordering::Relaxed);
}

/// What database `db`'s keys are owed: (key id, last_used_at).
pub(crate) fn owed(db: pg_sys::Oid) -> Vec<(pgrx::Uuid, Micros)> {
    let Some(s) = shared() else { return Vec::new() };
    let db = db.to_u32();
    entries::<StatsEntry>(s, s.stats, 0)
        .into_iter()
        .filter(|e| e.key.db == db && e.pending != NEVER)
        .map(|e| (pgrx::Uuid::from_bytes(e.key.id), e.pending))
        .collect()
}

/// Marks `paid` as written: each key owes nothing more unless a newer
/// verification came in since it was read.
pub(crate) fn paid(db: pg_sys::Oid, paid: &[(pgrx::Uuid, Micros)]) {
    let Some(s) = shared() else { return };
    let db = db.to_u32();
    for (id, at) in paid {
        let key = EntryKey {
            db,
            id: *id.as_bytes(),
        };
        with_found(s, s.stats, 0, key, true, |e: Option<&mut StatsEntry>| {
            if let Some(e) = e.filter(|e| e.pending == *at) {
                e.pending = NEVER;
            }
        });
    }
}

/// Makes room when a hash is over `high` (a fraction of its size): drops
/// the full buckets (forgetting one hands out nothing), and the keys that
/// owe nothing, least recently called first, down to `low`. Never drops a
/// key that is owed a `last_used_at`, nor a bucket that is not full.
/// Returns (keys, buckets) dropped.
pub(crate) fn make_room(now: Micros, high: f64, low: f64) -> (u64, u64) {
    let Some(s) = shared() else { return (0, 0) };
    // SAFETY: the control struct lives as long as the server.
    let control = unsafe { &*s.control };
    let capacity = s.capacity as f64;
    let mut dropped_buckets = 0;
    if control.tracked_buckets.load(Ordering::Relaxed) as f64 > high * capacity {
        dropped_buckets = for_each_entry_mut::<BucketEntry>(s, s.buckets, PARTITIONS, |e| {
            if e.bucket().is_full(now) {
                Keep::No
            } else {
                Keep::Yes
            }
        });
        control
            .tracked_buckets
            .fetch_sub(dropped_buckets, Ordering::Relaxed);
    }
    let mut dropped_keys = 0;
    let tracked = control.tracked_keys.load(Ordering::Relaxed);
    if tracked as f64 > high * capacity {
        let mut idle: Vec<Micros> = entries::<StatsEntry>(s, s.stats, 0)
            .into_iter()
            .filter(|e| e.pending == NEVER)
            .map(|e| e.last_call_at)
            .collect();
        let excess = tracked.saturating_sub((low * capacity) as u64) as usize;
        if excess > 0 && !idle.is_empty() {
            idle.sort_unstable();
            let cutoff = idle[excess.min(idle.len()) - 1];
            dropped_keys = for_each_entry_mut::<StatsEntry>(s, s.stats, 0, |e| {
                if e.pending == NEVER && e.last_call_at <= cutoff {
                    Keep::No
                } else {
                    Keep::Yes
                }
            });
            control
                .tracked_keys
                .fetch_sub(dropped_keys, Ordering::Relaxed);
        }
    }
    (dropped_keys, dropped_buckets)
}

/// How full the tier is.
pub(crate) struct Usage {
    pub(crate) capacity: u64,
    /// Verifications that found the statistics hash full, since the start.
    pub(crate) untracked: u64,
    /// Rate-limited calls that found the bucket hash full, since the start.
    pub(crate) buckets_full: u64,
}

pub(crate) fn usage() -> Option<Usage> {
    let s = shared()?;
    // SAFETY: the control struct lives as long as the server.
    let c = unsafe { &*s.control };
    Some(Usage {
        capacity: s.capacity,
        untracked: c.untracked.load(Ordering::Relaxed),
        buckets_full: c.buckets_full.load(Ordering::Relaxed),
    })
}

// ---- saved at a clean shutdown, loaded at the next start ----

fn push<T: Copy>(out: &mut Vec<u8>, value: &T) {
    // SAFETY: T is one of our plain repr(C) records of integers and bytes.
    let bytes = unsafe {
        std::slice::from_raw_parts((value as *const T).cast::<u8>(), std::mem::size_of::<T>())
    };
    out.extend_from_slice(bytes);
}

fn pull<T: Copy>(input: &mut &[u8]) -> Option<T> {
    let size = std::mem::size_of::<T>();
    if input.len() < size {
        return None;
    }
    // SAFETY: `size` bytes written by `push` for the same T (the header
    // checks the sizes); read unaligned.
    let value = unsafe { ptr::read_unaligned(input.as_ptr().cast::<T>()) };
    *input = &input[size..];
    Some(value)
}

/// A database slot as saved.
#[repr(C)]
#[derive(Clone, Copy)]
struct SavedSlot {
    db: u32,
    padding: u32,
    not_found: u64,
    malformed: u64,
    since: Micros,
    covered_from: Micros,
    announced_until: Micros,
}

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
    let mut out = Vec::new();
    out.extend_from_slice(STATE_MAGIC);
    for size in [
        std::mem::size_of::<SavedSlot>(),
        std::mem::size_of::<StatsEntry>(),
        std::mem::size_of::<BucketEntry>(),
    ] {
        push(&mut out, &(size as u64));
    }
    let slots: Vec<SavedSlot> = (0..MAX_DATABASES)
        .map(|i| slot_at(s, i))
        .filter(|slot| slot.db.load(Ordering::Relaxed) != 0)
        .map(|slot| SavedSlot {
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
    let (stats, buckets) = unsafe {
        (
            raw_entries::<StatsEntry>(s.stats),
            raw_entries::<BucketEntry>(s.buckets),
        )
    };
    push(&mut out, &(slots.len() as u64));
    slots.iter().for_each(|v| push(&mut out, v));
    push(&mut out, &(stats.len() as u64));
    stats.iter().for_each(|v| push(&mut out, v));
    push(&mut out, &(buckets.len() as u64));
    buckets.iter().for_each(|v| push(&mut out, v));
    let temporary = format!("{STATE_FILE}.tmp");
    if std::fs::write(&temporary, &out).is_ok() {
        let _ = std::fs::rename(&temporary, STATE_FILE);
    }
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

/// Every entry of `table`, copied.
///
/// # Safety
/// No other process changes `table` meanwhile: all its partition locks are
/// held, or no other process is left.
unsafe fn raw_entries<E: Copy>(table: *mut pg_sys::HTAB) -> Vec<E> {
    let mut out = Vec::new();
    // SAFETY: the caller's contract; entries of our hashes are `E`.
    unsafe {
        let mut status: pg_sys::HASH_SEQ_STATUS = std::mem::zeroed();
        pg_sys::hash_seq_init(&mut status, table);
        loop {
            let entry = pg_sys::hash_seq_search(&mut status).cast::<E>();
            if entry.is_null() {
                break;
            }
            out.push(*entry);
        }
    }
    out
}

/// Loads what the last clean shutdown saved, then deletes the file.
fn load_state() {
    let Ok(bytes) = std::fs::read(STATE_FILE) else {
        return;
    };
    let _ = std::fs::remove_file(STATE_FILE);
    if load_from(&bytes).is_none() {
        pgrx::warning!("makima_keys: ignored {STATE_FILE}, which is not of this version");
    }
}

fn load_from(bytes: &[u8]) -> Option<()> {
    let s = shared()?;
    let mut input = bytes.strip_prefix(STATE_MAGIC.as_slice())?;
    let sizes = [
        std::mem::size_of::<SavedSlot>(),
        std::mem::size_of::<StatsEntry>(),
        std::mem::size_of::<BucketEntry>(),
    ];
    for size in sizes {
        if pull::<u64>(&mut input)? != size as u64 {
            return None;
        }
    }
    // SAFETY: the control struct lives as long as the server; nothing else runs yet.
    let control = unsafe { &*s.control };
    let slots = pull::<u64>(&mut input)?;
    for i in 0..slots as usize {
        let saved: SavedSlot = pull(&mut input)?;
        if i >= MAX_DATABASES {
            continue;
        }
        let slot = slot_at(s, i);
        slot.not_found.store(saved.not_found, Ordering::Relaxed);
        slot.malformed.store(saved.malformed, Ordering::Relaxed);
        slot.since.store(saved.since, Ordering::Relaxed);
        slot.covered_from
            .store(saved.covered_from, Ordering::Relaxed);
        slot.announced_until
            .store(saved.announced_until, Ordering::Relaxed);
        slot.worker_state
            .store(WorkerState::Done as u32, Ordering::Relaxed);
        slot.db.store(saved.db, Ordering::Release);
    }
    let stats = pull::<u64>(&mut input)?;
    for _ in 0..stats {
        let saved: StatsEntry = pull(&mut input)?;
        let _ = with_entry(
            s,
            s.stats,
            0,
            &control.tracked_keys,
            saved.key,
            |_: &mut StatsEntry| {},
            |e: &mut StatsEntry| *e = saved,
        );
    }
    let buckets = pull::<u64>(&mut input)?;
    for _ in 0..buckets {
        let saved: BucketEntry = pull(&mut input)?;
        let _ = with_entry(
            s,
            s.buckets,
            PARTITIONS,
            &control.tracked_buckets,
            saved.key,
            |_: &mut BucketEntry| {},
            |e: &mut BucketEntry| *e = saved,
        );
    }
    Some(())
}
