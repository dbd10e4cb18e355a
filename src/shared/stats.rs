//! Per-key statistics, and the `last_used_at` each key is owed: the
//! statistics hash.

use std::sync::atomic::Ordering;

use pgrx::pg_sys;

use super::slots::{self, found_slot, my_slot, this_database, Hash};
use super::table::{EntryKey, Keep};
use super::{control, shared, NEVER};
use crate::policy::{KeyStatus, Micros};

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

/// One key's statistics, and the `last_used_at` it is owed.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct StatsEntry {
    pub(crate) key: EntryKey,
    /// Written as 0: the state file copies entries byte for byte, and no
    /// byte of them may be left uninitialised.
    pub(crate) padding: u32,
    pub(crate) counts: [u64; COUNTED.len()],
    /// The last successful verification.
    pub(crate) last_valid_at: Micros,
    /// The last call of any status.
    pub(crate) last_call_at: Micros,
    /// Since when these counts run.
    pub(crate) since: Micros,
    /// The `last_used_at` the worker is to write; `NEVER` when none.
    pub(crate) pending: Micros,
}

impl StatsEntry {
    pub(crate) fn new(key: EntryKey, now: Micros) -> StatsEntry {
        StatsEntry {
            key,
            padding: 0,
            counts: [0; COUNTED.len()],
            last_valid_at: NEVER,
            last_call_at: NEVER,
            since: now,
            pending: NEVER,
        }
    }

    pub(crate) fn is_owed(&self) -> bool {
        self.pending != NEVER
    }
}

fn key_of(id: pgrx::Uuid) -> EntryKey {
    EntryKey {
        db: this_database(),
        id: *id.as_bytes(),
    }
}

/// Counts a call that found key `id` with `status`; for a valid key,
/// `owe_last_used` also records that `last_used_at` is owed `now`.
/// `false`: the key is not tracked and cannot be (the hash is full, or
/// this database holds its share): the caller then writes `last_used_at`
/// itself, as without preloading.
pub(crate) fn record(id: pgrx::Uuid, status: KeyStatus, now: Micros, owe_last_used: bool) -> bool {
    let Some(s) = shared() else { return false };
    let control = control(s);
    let key = key_of(id);
    let recorded = s.stats.with_entry(
        s,
        &control.tracked_keys,
        key,
        || {
            let total = control.tracked_keys.load(Ordering::Relaxed);
            slots::may_enter(s, Hash::Stats, key.db, total)
        },
        |e: &mut StatsEntry| {
            *e = StatsEntry::new(key, now);
            // Counted under the partition lock (see `budgets::take`).
            slots::count_entered(Hash::Stats, key.db);
        },
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
    match recorded {
        Some(_) => true,
        None => {
            control.untracked.fetch_add(1, Ordering::Relaxed);
            false
        }
    }
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

/// The statistics of this database: its keys, then one row for the calls
/// that named no key. `None` when not preloaded. Reading registers
/// nothing: a database no verification registered has no rows.
pub(crate) fn stats_rows() -> Option<Vec<StatsRow>> {
    let s = shared()?;
    let db = this_database();
    let mut rows = Vec::new();
    s.stats.visit(s, |e: &StatsEntry| {
        if e.key.db == db {
            rows.push(StatsRow {
                key_id: Some(pgrx::Uuid::from_bytes(e.key.id)),
                counts: e.counts,
                not_found: 0,
                malformed: 0,
                last_valid_at: (e.last_valid_at != NEVER).then_some(e.last_valid_at),
                last_call_at: (e.last_call_at != NEVER).then_some(e.last_call_at),
                since: e.since,
            });
        }
    });
    if let Some(slot) = found_slot(db) {
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
    let db = this_database();
    let now = crate::clock::wall_clock();
    s.stats.visit_mut(s, |e: &mut StatsEntry| {
        if e.key.db == db {
            e.counts = [0; COUNTED.len()];
            e.last_valid_at = NEVER;
            e.last_call_at = NEVER;
            e.since = now;
        }
        Keep::Yes
    });
    if let Some(slot) = found_slot(db) {
        slot.not_found.store(0, Ordering::Relaxed);
        slot.malformed.store(0, Ordering::Relaxed);
        slot.since.store(now, Ordering::Relaxed);
    }
    true
}

/// What database `db`'s keys are owed: (key id, last_used_at).
pub(crate) fn owed(db: pg_sys::Oid) -> Vec<(pgrx::Uuid, Micros)> {
    let Some(s) = shared() else { return Vec::new() };
    let db = db.to_u32();
    let mut out = Vec::new();
    s.stats.visit(s, |e: &StatsEntry| {
        if e.key.db == db && e.is_owed() {
            out.push((pgrx::Uuid::from_bytes(e.key.id), e.pending));
        }
    });
    out
}

/// How many keys of each database are owed a `last_used_at`: (db, count).
pub(crate) fn owed_counts() -> Vec<(u32, u64)> {
    let Some(s) = shared() else { return Vec::new() };
    let mut counts: Vec<(u32, u64)> = Vec::new();
    s.stats.visit(s, |e: &StatsEntry| {
        if e.is_owed() {
            match counts.iter_mut().find(|(db, _)| *db == e.key.db) {
                Some((_, n)) => *n += 1,
                None => counts.push((e.key.db, 1)),
            }
        }
    });
    counts
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
        s.stats
            .with_found(s, key, true, |e: Option<&mut StatsEntry>| {
                if let Some(e) = e.filter(|e| e.pending == *at) {
                    e.pending = NEVER;
                }
            });
    }
}
