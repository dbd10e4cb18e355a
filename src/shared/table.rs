//! A hash split into [`PARTITIONS`] dynahash tables of its own, each with
//! its own LWLock, and the guard that holds such a lock.
//!
//! One dynahash per partition (rather than one table created with
//! `HASH_PARTITION`) is what lets a scan hold one partition at a time: a
//! sequential scan of a partitioned dynahash walks every bucket of every
//! partition, so it needs every partition lock at once. Here a scan of one
//! partition holds that partition's lock only, and verifications of keys in
//! the other fifteen go on meanwhile.
//!
//! The partition of a key is the top four bits of its dynahash hash code;
//! the table inside uses the low bits for its buckets, so the two never
//! correlate.

use std::ffi::c_void;
use std::ptr;
use std::sync::atomic::{AtomicU64, Ordering};

use pgrx::pg_sys;

use super::{lock_at, Shared, REGISTRY_LOCK};

/// Partitions of each hash (and LWLocks of each): a power of two.
pub(crate) const PARTITIONS: usize = 16;
const PARTITION_BITS: u32 = PARTITIONS.trailing_zeros();

/// What a visit answers for an entry.
#[derive(PartialEq, Eq)]
pub(crate) enum Keep {
    Yes,
    No,
}

/// A database and a key or user id: the key of both hashes. 20 bytes, no
/// padding, so dynahash can hash and compare it as bytes.
#[repr(C)]
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub(crate) struct EntryKey {
    pub(crate) db: u32,
    pub(crate) id: [u8; 16],
}

/// Entries every partition holds at most, for a hash of `capacity` entries
/// in all: the total is counted exactly (`Table::count`), and this leaves
/// room for the unevenness of the hash function (with 100,000 keys the
/// fullest of 16 partitions holds about 6,450, 3% over the mean): six
/// standard deviations of a binomial count over the mean, and 64 more.
pub(crate) fn partition_capacity(capacity: u64) -> u64 {
    let mean = capacity.div_ceil(PARTITIONS as u64);
    mean + 6 * (mean as f64).sqrt() as u64 + 64
}

/// One hash: its partitions, the first of its LWLocks, and its entry count.
#[derive(Clone, Copy)]
pub(crate) struct Table {
    pub(crate) parts: [*mut pg_sys::HTAB; PARTITIONS],
    pub(crate) lock_base: usize,
}

/// An LWLock of our tranche, held until dropped.
pub(crate) struct Held {
    lock: *mut pg_sys::LWLock,
}

impl Held {
    /// Takes lock `index` of our tranche. The lock protocol (see `mod.rs`)
    /// is checked in debug builds: partition locks of one hash are taken in
    /// ascending order, never two hashes at once, and nothing is taken
    /// while the registry lock is held.
    pub(crate) fn take(s: Shared, index: usize, exclusive: bool) -> Held {
        debug_assert!(
            protocol_allows(s, index),
            "makima_keys lock protocol: lock {index} taken out of order"
        );
        let mode = if exclusive {
            pg_sys::LWLockMode::LW_EXCLUSIVE
        } else {
            pg_sys::LWLockMode::LW_SHARED
        };
        let lock = lock_at(s, index);
        // SAFETY: one of our tranche's locks, valid for the server's life.
        unsafe { pg_sys::LWLockAcquire(lock, mode) };
        Held { lock }
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        // Under pgrx an ERROR unwinds as a Rust panic, and this runs during
        // that unwinding. PostgreSQL's error cleanup (LWLockReleaseAll in
        // the abort) releases every LWLock, and releasing one here after it
        // reset the interrupt hold-off count would trip its assertions: so,
        // as pgrx's own lock guards do, nothing is released while a panic
        // unwinds. Nothing raises under our locks today (see the protocol);
        // this keeps it safe if something ever does.
        if std::thread::panicking() {
            return;
        }
        // SAFETY: taken by `Held::take` in this process and not released.
        unsafe { pg_sys::LWLockRelease(self.lock) }
    }
}

/// Whether taking lock `index` now keeps the order of the lock protocol.
fn protocol_allows(s: Shared, index: usize) -> bool {
    // SAFETY: asks PostgreSQL which of our locks this process holds.
    let held = |i: usize| unsafe { pg_sys::LWLockHeldByMe(lock_at(s, i)) };
    if held(REGISTRY_LOCK) {
        return false;
    }
    if index == REGISTRY_LOCK {
        return true;
    }
    let base = index - index % PARTITIONS;
    let other_base = if base == 0 { PARTITIONS } else { 0 };
    let later_of_same = (index..base + PARTITIONS).any(held);
    let any_of_other = (other_base..other_base + PARTITIONS).any(held);
    !later_of_same && !any_of_other
}

impl Table {
    fn hash_of(&self, key: &EntryKey) -> (u32, usize) {
        // SAFETY: every partition hashes `EntryKey` as bytes (HASH_BLOBS).
        let hash = unsafe { pg_sys::get_hash_value(self.parts[0], ptr::from_ref(key).cast()) };
        (hash, (hash >> (32 - PARTITION_BITS)) as usize)
    }

    /// Finds `key`, or when it is missing and `may_enter` allows it (and the
    /// hash holds fewer than `capacity` entries), enters it and gives it to
    /// `init`; then gives the entry to `f`, with its partition locked
    /// exclusively, and whether it was entered now. `None`: missing, and
    /// not entered.
    pub(crate) fn with_entry<E, R>(
        &self,
        s: Shared,
        count: &AtomicU64,
        key: EntryKey,
        may_enter: impl FnOnce() -> bool,
        init: impl FnOnce(&mut E),
        f: impl FnOnce(&mut E) -> R,
    ) -> Option<(R, bool)> {
        let (hash, part) = self.hash_of(&key);
        let _held = Held::take(s, self.lock_base + part, true);
        // SAFETY: `parts[part]` holds entries of type `E` (EntryKey first),
        // and its lock is held exclusively while the entry is used.
        unsafe {
            let mut entry =
                search(self.parts[part], &key, hash, pg_sys::HASHACTION::HASH_FIND).cast::<E>();
            if entry.is_null() {
                if !may_enter() {
                    return None;
                }
                if count.fetch_add(1, Ordering::Relaxed) >= s.capacity {
                    count.fetch_sub(1, Ordering::Relaxed);
                    return None;
                }
                entry = search(
                    self.parts[part],
                    &key,
                    hash,
                    pg_sys::HASHACTION::HASH_ENTER_NULL,
                )
                .cast::<E>();
                if entry.is_null() {
                    count.fetch_sub(1, Ordering::Relaxed);
                    return None;
                }
                init(&mut *entry);
                return Some((f(&mut *entry), true));
            }
            Some((f(&mut *entry), false))
        }
    }

    /// Gives `f` the entry of `key` if there is one (never enters it), with
    /// its partition locked, shared or exclusive.
    pub(crate) fn with_found<E, R>(
        &self,
        s: Shared,
        key: EntryKey,
        exclusive: bool,
        f: impl FnOnce(Option<&mut E>) -> R,
    ) -> R {
        let (hash, part) = self.hash_of(&key);
        let _held = Held::take(s, self.lock_base + part, exclusive);
        // SAFETY: as in `with_entry`; only ever finds.
        unsafe {
            let entry =
                search(self.parts[part], &key, hash, pg_sys::HASHACTION::HASH_FIND).cast::<E>();
            f(entry.as_mut())
        }
    }

    /// Visits every entry, one partition at a time with only that
    /// partition's lock held (shared): what `f` sees is each partition as
    /// it was while `f` visited it, not one instant of the whole hash.
    pub(crate) fn visit<E>(&self, s: Shared, mut f: impl FnMut(&E)) {
        for part in 0..PARTITIONS {
            let _held = Held::take(s, self.lock_base + part, false);
            // SAFETY: the partition is locked; its entries are `E`.
            unsafe { scan(self.parts[part], |e: *mut E| f(&*e)) };
        }
    }

    /// Visits every entry, one partition at a time with that partition's
    /// lock held exclusively, and removes those `f` answers `Keep::No` for
    /// (after `f` has seen them). Returns how many it removed.
    pub(crate) fn visit_mut<E>(&self, s: Shared, mut f: impl FnMut(&mut E) -> Keep) -> u64 {
        let mut removed = 0;
        for part in 0..PARTITIONS {
            let _held = Held::take(s, self.lock_base + part, true);
            // SAFETY: the partition is locked exclusively; dynahash allows
            // removing the entry a sequential scan just returned.
            unsafe {
                scan(self.parts[part], |e: *mut E| {
                    if f(&mut *e) == Keep::No {
                        pg_sys::hash_search(
                            self.parts[part],
                            e as *const c_void,
                            pg_sys::HASHACTION::HASH_REMOVE,
                            ptr::null_mut(),
                        );
                        removed += 1;
                    }
                })
            };
        }
        removed
    }

    /// Every entry, copied, with no lock taken.
    ///
    /// # Safety
    /// No other process changes the hash meanwhile (the postmaster, at exit).
    pub(crate) unsafe fn copy_unlocked<E: Copy>(&self) -> Vec<E> {
        let mut out = Vec::new();
        for part in self.parts {
            // SAFETY: the caller's contract; the entries are `E`.
            unsafe { scan(part, |e: *mut E| out.push(*e)) };
        }
        out
    }
}

/// # Safety
/// `table` is one of our partitions, locked as its use requires.
unsafe fn search(
    table: *mut pg_sys::HTAB,
    key: &EntryKey,
    hash: u32,
    action: pg_sys::HASHACTION::Type,
) -> *mut c_void {
    let mut found = false;
    // SAFETY: the caller's contract.
    unsafe {
        pg_sys::hash_search_with_hash_value(
            table,
            ptr::from_ref(key).cast(),
            hash,
            action,
            &mut found,
        )
    }
}

/// Calls `f` on every entry of one partition.
///
/// # Safety
/// The partition is locked (exclusively if `f` removes entries), or no
/// other process is left.
unsafe fn scan<E>(table: *mut pg_sys::HTAB, mut f: impl FnMut(*mut E)) {
    // SAFETY: the caller's contract; a scan that reaches its end needs no
    // hash_seq_term.
    unsafe {
        let mut status: pg_sys::HASH_SEQ_STATUS = std::mem::zeroed();
        pg_sys::hash_seq_init(&mut status, table);
        loop {
            let entry = pg_sys::hash_seq_search(&mut status).cast::<E>();
            if entry.is_null() {
                break;
            }
            f(entry);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partitions_hold_a_full_hash_with_room_for_unevenness() {
        for capacity in [100, 1_000, 100_000, 1_000_000, 1_073_741_823] {
            let each = partition_capacity(capacity);
            assert!(each * PARTITIONS as u64 >= capacity);
            // at most 3% (plus a constant) over an even split from 1,000,000 on
            if capacity >= 1_000_000 {
                assert!(each <= capacity / 16 + capacity / 512 + 66, "{capacity}");
            }
        }
    }
}
