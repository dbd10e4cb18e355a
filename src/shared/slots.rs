//! The list of databases the tier serves: one slot each, at most
//! [`MAX_DATABASES`]. A slot holds the database's junk counts, how far its
//! ended keys were announced, what its flush worker is doing and how its
//! last rounds went (the health `mk_shared_status()` shows), and how many
//! entries of each hash it holds (its share, below).
//!
//! Every field is an atomic read without a lock; the registry lock guards
//! only the assignment of a slot to a database and its release.
//!
//! **Shares.** With `n` databases registered, each is guaranteed
//! `capacity / n` entries of each hash: a database may take more only from
//! room no other database is still guaranteed. So one database (a tenant
//! whose key administrator issues and uses keys by the hundred thousand,
//! or whose flush fails every round) can never take from another the room
//! that other is guaranteed. The rule is [`within_share`], pure.

use std::cell::Cell;
use std::sync::atomic::{AtomicI32, AtomicI64, AtomicU32, AtomicU64, Ordering};

use pgrx::pg_sys;

use super::{shared, Held, Shared, NEVER, REGISTRY_LOCK};
use crate::policy::Micros;

/// Databases whose keys the worker flushes and announces at once.
pub(crate) const MAX_DATABASES: usize = 256;

#[repr(C)]
pub(crate) struct DatabaseSlot {
    /// 0: a free slot.
    pub(crate) db: AtomicU32,
    pub(crate) not_found: AtomicU64,
    pub(crate) malformed: AtomicU64,
    pub(crate) since: AtomicI64,
    /// Keys that ended after this instant and up to `announced_until` were
    /// (or, once the worker gets there, will be) announced by the worker.
    pub(crate) covered_from: AtomicI64,
    /// Only ever moves forward (`fetch_max`).
    pub(crate) announced_until: AtomicI64,
    /// How far this database's current (or last) flush worker got
    /// (`Phase`).
    pub(crate) phase: AtomicU32,
    /// The pid of the flush worker working on this slot, 0 when none: a
    /// second worker (a restarted launcher's) leaves the slot alone.
    pub(crate) worker_pid: AtomicI32,
    /// The SQLSTATE (PostgreSQL's packed code) of the last ERROR the
    /// worker raised in this database; 0 when its last round succeeded.
    pub(crate) sqlstate: AtomicI32,
    /// `Outcome` of the last round that tried this database.
    pub(crate) outcome: AtomicU32,
    pub(crate) last_attempt_at: AtomicI64,
    pub(crate) last_success_at: AtomicI64,
    pub(crate) failures: AtomicU32,
    /// No round tries this database before then (backoff after failures).
    pub(crate) next_attempt_at: AtomicI64,
    /// Keys written by the last successful round.
    pub(crate) written: AtomicU64,
    /// Entries this database holds in the statistics and bucket hashes.
    pub(crate) keys: AtomicU64,
    pub(crate) budgets: AtomicU64,
}

/// How far a flush worker got, as it tells the launcher.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub(crate) enum Phase {
    /// Started, not connected to its database yet.
    Starting = 0,
    Connected = 1,
    /// Ended keys announced; writing `last_used_at`.
    Announced = 2,
    Done = 3,
    /// makima_keys is not installed in the database (any more).
    NoExtension = 4,
    /// Another worker holds the slot: this one did nothing.
    Busy = 5,
    /// Announcing ended keys failed (caught); the writes were made.
    AnnounceFailed = 6,
}

impl Phase {
    fn from_u32(value: u32) -> Phase {
        match value {
            1 => Phase::Connected,
            2 => Phase::Announced,
            3 => Phase::Done,
            4 => Phase::NoExtension,
            5 => Phase::Busy,
            6 => Phase::AnnounceFailed,
            _ => Phase::Starting,
        }
    }
}

/// How the last round went for a database, as `mk_shared_status()` shows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub(crate) enum Outcome {
    /// No round has tried it yet.
    None = 0,
    Ok = 1,
    /// The worker could not enter the database in time (a lock on the
    /// database: a RENAME or a CREATE DATABASE ... TEMPLATE in progress),
    /// or connections are refused.
    NotEntered = 2,
    /// The worker raised an error while announcing ended keys.
    AnnounceFailed = 3,
    /// The worker raised an error while writing `last_used_at`.
    WriteFailed = 4,
    /// No background worker slot was free (`max_worker_processes`).
    NoWorkerSlot = 5,
}

impl Outcome {
    pub(crate) fn from_u32(value: u32) -> Outcome {
        match value {
            1 => Outcome::Ok,
            2 => Outcome::NotEntered,
            3 => Outcome::AnnounceFailed,
            4 => Outcome::WriteFailed,
            5 => Outcome::NoWorkerSlot,
            _ => Outcome::None,
        }
    }

    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Outcome::None => "not yet",
            Outcome::Ok => "ok",
            Outcome::NotEntered => "could not enter the database",
            Outcome::AnnounceFailed => "announcing ended keys failed",
            Outcome::WriteFailed => "writing last_used_at failed",
            Outcome::NoWorkerSlot => "no background worker slot",
        }
    }
}

thread_local! {
    /// This backend's slot in the list of databases, once registered.
    static MY_SLOT: Cell<Option<usize>> = const { Cell::new(None) };
}

pub(crate) fn slot_at(s: Shared, index: usize) -> &'static DatabaseSlot {
    // SAFETY: index < MAX_DATABASES; the control struct lives as long as the server.
    unsafe { &(*s.control).databases[index] }
}

pub(crate) fn this_database() -> u32 {
    // SAFETY: a plain read of this backend's database.
    unsafe { pg_sys::MyDatabaseId }.to_u32()
}

/// This database's slot, registering it on first use: from then on the
/// worker flushes and announces its keys.
pub(crate) fn my_slot() -> Option<&'static DatabaseSlot> {
    let s = shared()?;
    let db = this_database();
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

/// This database's slot if it has one; never registers (a read of
/// `mk_key_stats` must not take one of the slots).
pub(crate) fn found_slot(db: u32) -> Option<&'static DatabaseSlot> {
    let s = shared()?;
    (0..MAX_DATABASES)
        .map(|i| slot_at(s, i))
        .find(|slot| slot.db.load(Ordering::Acquire) == db)
}

/// The database of every slot (0: free).
fn registered(s: Shared) -> Vec<u32> {
    (0..MAX_DATABASES)
        .map(|i| slot_at(s, i).db.load(Ordering::Acquire))
        .collect()
}

/// The slot `db` has, or else the first free one; `None` when it has none
/// and none is free. Pure.
pub(crate) fn pick_slot(dbs: &[u32], db: u32) -> Option<usize> {
    dbs.iter()
        .position(|&d| d == db)
        .or_else(|| dbs.iter().position(|&d| d == 0))
}

fn register(s: Shared, db: u32) -> Option<usize> {
    let _held = Held::take(s, REGISTRY_LOCK, true);
    let index = pick_slot(&registered(s), db)?;
    let slot = slot_at(s, index);
    if slot.db.load(Ordering::Acquire) == db {
        return Some(index);
    }
    let now = crate::clock::wall_clock();
    slot.not_found.store(0, Ordering::Relaxed);
    slot.malformed.store(0, Ordering::Relaxed);
    slot.since.store(now, Ordering::Relaxed);
    slot.covered_from.store(now, Ordering::Relaxed);
    slot.announced_until.store(now, Ordering::Relaxed);
    reset_health(slot);
    slot.keys.store(0, Ordering::Relaxed);
    slot.budgets.store(0, Ordering::Relaxed);
    slot.db.store(db, Ordering::Release);
    Some(index)
}

pub(crate) fn reset_health(slot: &DatabaseSlot) {
    slot.phase.store(Phase::Done as u32, Ordering::Relaxed);
    slot.worker_pid.store(0, Ordering::Relaxed);
    slot.sqlstate.store(0, Ordering::Relaxed);
    slot.outcome.store(Outcome::None as u32, Ordering::Relaxed);
    slot.last_attempt_at.store(NEVER, Ordering::Relaxed);
    slot.last_success_at.store(NEVER, Ordering::Relaxed);
    slot.failures.store(0, Ordering::Relaxed);
    slot.next_attempt_at.store(NEVER, Ordering::Relaxed);
    slot.written.store(0, Ordering::Relaxed);
}

/// Frees slot `index` if it still holds `db`.
pub(crate) fn release(s: Shared, index: usize, db: u32) {
    let _held = Held::take(s, REGISTRY_LOCK, true);
    let _ = slot_at(s, index)
        .db
        .compare_exchange(db, 0, Ordering::AcqRel, Ordering::Relaxed);
}

/// The databases in the list, with their slot index.
pub(crate) fn databases() -> Vec<(usize, pg_sys::Oid)> {
    let Some(s) = shared() else { return Vec::new() };
    registered(s)
        .into_iter()
        .enumerate()
        .filter(|(_, db)| *db != 0)
        .map(|(i, db)| (i, pg_sys::Oid::from(db)))
        .collect()
}

pub(crate) fn slot(index: usize) -> Option<&'static DatabaseSlot> {
    shared().map(|s| slot_at(s, index))
}

pub(crate) fn phase(slot: &DatabaseSlot) -> Phase {
    Phase::from_u32(slot.phase.load(Ordering::Acquire))
}

pub(crate) fn set_phase(slot: &DatabaseSlot, phase: Phase) {
    slot.phase.store(phase as u32, Ordering::Release);
}

/// Which hash a share is counted in.
#[derive(Clone, Copy)]
pub(crate) enum Hash {
    Stats,
    Budgets,
}

pub(crate) fn held_by(slot: &DatabaseSlot, hash: Hash) -> &AtomicU64 {
    match hash {
        Hash::Stats => &slot.keys,
        Hash::Budgets => &slot.budgets,
    }
}

/// Whether database `db` may enter one more entry in `hash`, which holds
/// `total` of `capacity`: the share rule of this module's header. A
/// database without a slot (more than `MAX_DATABASES` at once) is
/// guaranteed nothing and may use only room nobody is guaranteed.
pub(crate) fn may_enter(s: Shared, hash: Hash, db: u32, total: u64) -> bool {
    let mut own = None;
    let mut others = Vec::with_capacity(8);
    for i in 0..MAX_DATABASES {
        let slot = slot_at(s, i);
        let slot_db = slot.db.load(Ordering::Acquire);
        if slot_db == 0 {
            continue;
        }
        let held = held_by(slot, hash).load(Ordering::Relaxed);
        if slot_db == db {
            own = Some(held);
        } else {
            others.push(held);
        }
    }
    within_share(own, &others, total, s.capacity)
}

/// The share rule, pure: `own` entries held by the database entering one
/// (`None`: it has no slot), `others` those each other registered database
/// holds, `total` the hash's entries, of `capacity`.
pub(crate) fn within_share(own: Option<u64>, others: &[u64], total: u64, capacity: u64) -> bool {
    if total >= capacity {
        return false;
    }
    let registered = others.len() as u64 + u64::from(own.is_some());
    let guaranteed = capacity / registered.max(1);
    if own.is_some_and(|held| held < guaranteed) {
        return true;
    }
    let still_guaranteed: u64 = others
        .iter()
        .map(|&held| guaranteed.saturating_sub(held))
        .sum();
    total + still_guaranteed < capacity
}

/// Counts an entry `db` entered in `hash` (removals are counted by
/// `eviction`, per scan).
pub(crate) fn count_entered(hash: Hash, db: u32) {
    if let Some(slot) = found_slot(db) {
        held_by(slot, hash).fetch_add(1, Ordering::Relaxed);
    }
}

/// PostgreSQL's packed SQLSTATE as its five characters.
pub(crate) fn unpack_sqlstate(code: i32) -> String {
    (0..5)
        .map(|i| char::from((((code >> (6 * i)) & 0x3F) as u8) + b'0'))
        .collect()
}

/// Rounds to skip after `failures` failed rounds in a row: 1, 2, 4, ...
/// up to 32 (with a 10 s interval, about five minutes). Pure.
pub(crate) fn backoff_rounds(failures: u32) -> i64 {
    1i64 << failures.saturating_sub(1).min(5)
}

/// Whether the launcher may try this database at `now`.
pub(crate) fn due(slot: &DatabaseSlot, now: Micros) -> bool {
    slot.next_attempt_at.load(Ordering::Relaxed) <= now
}

/// Records a round's outcome for the slot; returns the failures in a row
/// before this round (so the caller logs only changes of state).
pub(crate) fn record_outcome(
    slot: &DatabaseSlot,
    outcome: Outcome,
    now: Micros,
    interval: Micros,
) -> u32 {
    slot.outcome.store(outcome as u32, Ordering::Relaxed);
    slot.last_attempt_at.store(now, Ordering::Relaxed);
    if outcome == Outcome::Ok {
        slot.last_success_at.store(now, Ordering::Relaxed);
        slot.sqlstate.store(0, Ordering::Relaxed);
        slot.next_attempt_at.store(NEVER, Ordering::Relaxed);
        return slot.failures.swap(0, Ordering::Relaxed);
    }
    let before = slot.failures.fetch_add(1, Ordering::Relaxed);
    if outcome == Outcome::NoWorkerSlot {
        // The server's shortage, not the database's: no backoff.
        return before;
    }
    let wait = backoff_rounds(before + 1).saturating_mul(interval);
    // Rounds come one interval apart: half an interval before the round
    // `wait` from now, so that the rounds before it are skipped and that
    // one is not.
    slot.next_attempt_at
        .store(now.saturating_add(wait - interval / 2), Ordering::Relaxed);
    before
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sqlstates_unpack_to_their_five_characters() {
        // MAKE_SQLSTATE('5','5','P','0','3'), lock_not_available
        let pack = |s: &[u8; 5]| {
            s.iter().enumerate().fold(0i32, |code, (i, c)| {
                code | ((i32::from(*c - b'0') & 0x3F) << (6 * i))
            })
        };
        assert_eq!(unpack_sqlstate(pack(b"55P03")), "55P03");
        assert_eq!(unpack_sqlstate(pack(b"P0001")), "P0001");
    }

    #[test]
    fn a_database_keeps_its_slot_and_a_new_one_takes_the_first_free() {
        assert_eq!(pick_slot(&[5, 0, 7, 0], 7), Some(2));
        assert_eq!(pick_slot(&[5, 0, 7, 0], 9), Some(1));
        assert_eq!(pick_slot(&[5, 6], 9), None);
        assert_eq!(pick_slot(&[5, 6], 6), Some(1));
    }

    #[test]
    fn one_database_may_fill_the_whole_hash() {
        assert!(within_share(Some(99), &[], 99, 100));
        assert!(!within_share(Some(100), &[], 100, 100));
    }

    #[test]
    fn a_database_over_its_share_never_takes_what_another_is_guaranteed() {
        // Two databases of 100: 50 each guaranteed. A holds 50, B 0.
        assert!(!within_share(Some(50), &[0], 50, 100));
        // B still gets its 50.
        assert!(within_share(Some(0), &[50], 50, 100));
        assert!(within_share(Some(49), &[50], 99, 100));
        // B idle with 10: the 40 it is still guaranteed stay free for it.
        assert!(!within_share(Some(50), &[10], 60, 100));
        // Room nobody is guaranteed is anyone's: 101 split in two leaves 1.
        assert!(within_share(Some(50), &[50], 100, 101));
        assert!(!within_share(Some(51), &[50], 101, 101));
    }

    #[test]
    fn a_database_without_a_slot_uses_only_unguaranteed_room() {
        assert!(!within_share(None, &[0, 0], 0, 100));
        assert!(!within_share(None, &[50, 40], 90, 100));
        assert!(within_share(None, &[50, 50], 100, 101));
        assert!(within_share(None, &[], 0, 100));
    }

    #[test]
    fn a_database_under_its_share_is_refused_only_by_a_full_hash() {
        // A filled everything before B registered: B is under its share,
        // but no entry is free until the launcher makes room.
        assert!(!within_share(Some(0), &[100], 100, 100));
    }

    #[test]
    fn backoff_doubles_up_to_32_rounds() {
        let rounds: Vec<i64> = (1..=8).map(backoff_rounds).collect();
        assert_eq!(rounds, [1, 2, 4, 8, 16, 32, 32, 32]);
        assert_eq!(backoff_rounds(0), 1);
        assert_eq!(backoff_rounds(u32::MAX), 32);
    }
}
