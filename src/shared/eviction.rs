//! Making room in the hashes, and forgetting a database.
//!
//! What may be dropped: a budget that is full again (forgetting it hands
//! out nothing), and a key's statistics when the key is owed nothing
//! (only counts are lost). A key owed a `last_used_at` and a budget that
//! still holds something back are never dropped. Among keys, those of
//! databases over their share go first, then the least recently called:
//! [`choose`], pure.

use std::collections::HashSet;
use std::sync::atomic::Ordering;

use pgrx::pg_sys;

use super::budgets::BucketEntry;
use super::slots::{self, slot_at, MAX_DATABASES};
use super::stats::StatsEntry;
use super::table::{EntryKey, Keep};
use super::{control, shared, Shared};
use crate::policy::Micros;

/// A key whose statistics may be dropped.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Candidate {
    pub(crate) key: EntryKey,
    pub(crate) last_call_at: Micros,
    /// Its database holds more than its guaranteed share.
    pub(crate) over_share: bool,
}

/// The `excess` candidates to drop: those of databases over their share
/// first, then the least recently called. Pure.
pub(crate) fn choose(mut candidates: Vec<Candidate>, excess: usize) -> HashSet<EntryKey> {
    candidates.sort_unstable_by_key(|c| (!c.over_share, c.last_call_at));
    candidates.into_iter().take(excess).map(|c| c.key).collect()
}

/// Entries removed per database, to take off their slots' counts.
#[derive(Default)]
struct Removed(Vec<(u32, u64)>);

impl Removed {
    fn add(&mut self, db: u32) {
        match self.0.iter_mut().find(|(d, _)| *d == db) {
            Some((_, n)) => *n += 1,
            None => self.0.push((db, 1)),
        }
    }

    fn apply(self, s: Shared, hash: slots::Hash) {
        for i in 0..MAX_DATABASES {
            let slot = slot_at(s, i);
            let db = slot.db.load(Ordering::Acquire);
            if let Some((_, n)) = self.0.iter().find(|(d, _)| *d == db && db != 0) {
                let _ = slots::held_by(slot, hash).fetch_update(
                    Ordering::Relaxed,
                    Ordering::Relaxed,
                    |held| Some(held.saturating_sub(*n)),
                );
            }
        }
    }
}

/// Makes room when a hash is over `high` (a fraction of its size), and for
/// every database at its share (which is refused entries long before the
/// hash is that full): drops full budgets, and statistics of keys owed
/// nothing, least recently called first, down to `low` of the hash or of
/// the database's share (see the module's header). Returns (keys, budgets)
/// dropped.
pub(crate) fn make_room(now: Micros, high: f64, low: f64) -> (u64, u64) {
    let Some(s) = shared() else { return (0, 0) };
    let control = control(s);
    let capacity = s.capacity as f64;
    let mut dropped_budgets = 0;
    let budgets_at_share = at_share(s, slots::Hash::Budgets);
    if control.tracked_buckets.load(Ordering::Relaxed) as f64 > high * capacity
        || !budgets_at_share.is_empty()
    {
        dropped_budgets = remove_where(
            s,
            slots::Hash::Budgets,
            |e: &BucketEntry| e.key.db,
            |e| e.bucket().is_full(now),
        );
    }
    let tracked = control.tracked_keys.load(Ordering::Relaxed);
    let keys_at_share = at_share(s, slots::Hash::Stats);
    let over_hash = tracked as f64 > high * capacity;
    if !over_hash && keys_at_share.is_empty() {
        return (0, dropped_budgets);
    }
    let guaranteed = guaranteed_share(s);
    let mut candidates: Vec<(u32, Candidate)> = Vec::new();
    s.stats.visit(s, |e: &StatsEntry| {
        if !e.is_owed() {
            let over_share = keys_at_share.iter().any(|(db, _)| *db == e.key.db);
            candidates.push((
                e.key.db,
                Candidate {
                    key: e.key,
                    last_call_at: e.last_call_at,
                    over_share,
                },
            ));
        }
    });
    let mut chosen = HashSet::new();
    // Each database at its share, down to `low` of its share.
    for (db, held) in &keys_at_share {
        let excess = held.saturating_sub((low * guaranteed as f64) as u64) as usize;
        let own = candidates
            .iter()
            .filter(|(d, _)| d == db)
            .map(|(_, c)| *c)
            .collect();
        chosen.extend(choose(own, excess));
    }
    // The whole hash, down to `low` of it.
    if over_hash {
        let excess = tracked
            .saturating_sub((low * capacity) as u64)
            .saturating_sub(chosen.len() as u64) as usize;
        let rest = candidates
            .into_iter()
            .map(|(_, c)| c)
            .filter(|c| !chosen.contains(&c.key))
            .collect();
        chosen.extend(choose(rest, excess));
    }
    let mut dropped_keys = 0;
    if !chosen.is_empty() {
        dropped_keys = remove_where(
            s,
            slots::Hash::Stats,
            |e: &StatsEntry| e.key.db,
            // Owed since it was chosen: kept.
            |e| !e.is_owed() && chosen.contains(&e.key),
        );
    }
    (dropped_keys, dropped_budgets)
}

/// Removes from `hash` the entries `drop` answers true for, and takes them
/// off the hash's count and their databases' counts. Returns how many.
fn remove_where<E>(
    s: Shared,
    hash: slots::Hash,
    db_of: impl Fn(&E) -> u32,
    drop: impl Fn(&E) -> bool,
) -> u64 {
    let (table, count) = match hash {
        slots::Hash::Stats => (s.stats, &control(s).tracked_keys),
        slots::Hash::Budgets => (s.buckets, &control(s).tracked_buckets),
    };
    let mut removed = Removed::default();
    let dropped = table.visit_mut(s, |e: &mut E| {
        if drop(e) {
            removed.add(db_of(e));
            Keep::No
        } else {
            Keep::Yes
        }
    });
    count.fetch_sub(dropped, Ordering::Relaxed);
    removed.apply(s, hash);
    dropped
}

/// `max_tracked_keys / n` for `n` databases registered.
fn guaranteed_share(s: Shared) -> u64 {
    let registered = (0..MAX_DATABASES)
        .filter(|&i| slot_at(s, i).db.load(Ordering::Acquire) != 0)
        .count() as u64;
    s.capacity / registered.max(1)
}

/// The databases that hold at least their share of `hash` while more than
/// one is registered (one alone may fill the hash): (db, entries held).
fn at_share(s: Shared, hash: slots::Hash) -> Vec<(u32, u64)> {
    let guaranteed = guaranteed_share(s);
    if guaranteed >= s.capacity {
        return Vec::new();
    }
    (0..MAX_DATABASES)
        .map(|i| slot_at(s, i))
        .map(|slot| {
            (
                slot.db.load(Ordering::Acquire),
                slots::held_by(slot, hash).load(Ordering::Relaxed),
            )
        })
        .filter(|(db, held)| *db != 0 && *held >= guaranteed)
        .collect()
}

/// Forgets a database: its slot, its keys' statistics and what they are
/// owed, and its users' budgets (the database is gone, left invalid by an
/// interrupted DROP DATABASE, or makima_keys is no longer installed there).
pub(crate) fn forget_database(index: usize, db: pg_sys::Oid) {
    let Some(s) = shared() else { return };
    let db = db.to_u32();
    let control = control(s);
    let removed = s.stats.visit_mut(
        s,
        |e: &mut StatsEntry| {
            if e.key.db == db {
                Keep::No
            } else {
                Keep::Yes
            }
        },
    );
    control.tracked_keys.fetch_sub(removed, Ordering::Relaxed);
    let removed = s.buckets.visit_mut(
        s,
        |e: &mut BucketEntry| {
            if e.key.db == db {
                Keep::No
            } else {
                Keep::Yes
            }
        },
    );
    control
        .tracked_buckets
        .fetch_sub(removed, Ordering::Relaxed);
    slots::release(s, index, db);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn candidate(n: u8, last_call_at: Micros, over_share: bool) -> Candidate {
        Candidate {
            key: EntryKey { db: 1, id: [n; 16] },
            last_call_at,
            over_share,
        }
    }

    #[test]
    fn the_least_recently_called_go_first() {
        let chosen = choose(
            vec![
                candidate(1, 30, false),
                candidate(2, 10, false),
                candidate(3, 20, false),
            ],
            2,
        );
        assert_eq!(chosen.len(), 2);
        assert!(chosen.contains(&candidate(2, 0, false).key));
        assert!(chosen.contains(&candidate(3, 0, false).key));
    }

    #[test]
    fn keys_of_a_database_over_its_share_go_before_older_ones() {
        let chosen = choose(vec![candidate(1, 10, false), candidate(2, 99, true)], 1);
        assert!(chosen.contains(&candidate(2, 0, true).key));
    }

    #[test]
    fn never_more_than_asked_nor_more_than_there_are() {
        assert!(choose(vec![candidate(1, 1, false)], 0).is_empty());
        assert_eq!(choose(vec![candidate(1, 1, false)], 5).len(), 1);
    }
}
