//! Per-user rate-limit budgets: the bucket hash.

use std::sync::atomic::Ordering;

use super::slots::{self, this_database, Hash};
use super::table::EntryKey;
use super::{control, shared};
use crate::policy::Micros;
use crate::rate::{Bucket, Charge, RateLimit, Receipt};

/// One user's rate-limit bucket. Its theoretical arrival time is kept as
/// two halves: entries are only 8-byte aligned, and an `i128` wants 16.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct BucketEntry {
    pub(crate) key: EntryKey,
    /// Written as 0, as in `StatsEntry`.
    pub(crate) padding: u32,
    pub(crate) tat_high: i64,
    pub(crate) tat_low: u64,
    pub(crate) per_period: i32,
    pub(crate) padding_2: i32,
    pub(crate) period: Micros,
}

impl BucketEntry {
    pub(crate) fn new(key: EntryKey, bucket: Bucket) -> BucketEntry {
        let mut entry = BucketEntry {
            key,
            padding: 0,
            tat_high: 0,
            tat_low: 0,
            per_period: 0,
            padding_2: 0,
            period: 0,
        };
        entry.set(bucket);
        entry
    }

    pub(crate) fn bucket(&self) -> Bucket {
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

fn key_of(user: pgrx::Uuid) -> EntryKey {
    EntryKey {
        db: this_database(),
        id: *user.as_bytes(),
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
    /// Not preloaded, or no room for the bucket (the hash is full, or this
    /// database holds its share): fail closed.
    Unavailable,
}

fn take_of(charge: Charge) -> Take {
    match charge {
        Charge::Passed(receipt) => Take::Passed(receipt),
        Charge::Limited { retry_after } => Take::Limited { retry_after },
        Charge::Never => Take::Never,
    }
}

/// Charges `cost` tokens to `user`'s bucket under `limit` at `now`.
pub(crate) fn take(user: pgrx::Uuid, limit: RateLimit, cost: i32, now: Micros) -> Take {
    let Some(s) = shared() else {
        return Take::Unavailable;
    };
    // A cost no budget can ever pass (or a limit no issuing function
    // stores) takes no room: entering a bucket for it would only fill the
    // hash, and the database's share, with budgets that hold nothing back.
    if !limit.is_valid() || cost > limit.per_period {
        return Take::Never;
    }
    let control = control(s);
    let key = key_of(user);
    let taken = s.buckets.with_entry(
        s,
        &control.tracked_buckets,
        key,
        || {
            let total = control.tracked_buckets.load(Ordering::Relaxed);
            slots::may_enter(s, Hash::Budgets, key.db, total)
        },
        |e: &mut BucketEntry| {
            *e = BucketEntry::new(key, Bucket::full(limit));
            // Counted under the partition lock, so that no scan that
            // removes it can come between the entry and its count.
            slots::count_entered(Hash::Budgets, key.db);
        },
        |e: &mut BucketEntry| {
            let mut bucket = e.bucket();
            let charge = bucket.charge(limit, cost, now);
            e.set(bucket);
            take_of(charge)
        },
    );
    match taken {
        Some((take, _)) => take,
        None => {
            control.buckets_full.fetch_add(1, Ordering::Relaxed);
            Take::Unavailable
        }
    }
}

/// What `take` would give, without charging anything: for a call that is
/// refused for another reason, to report `rate_limited` first.
pub(crate) fn peek(user: pgrx::Uuid, limit: RateLimit, cost: i32, now: Micros) -> Take {
    let Some(s) = shared() else {
        return Take::Unavailable;
    };
    let bucket = s
        .buckets
        .with_found(s, key_of(user), false, |e: Option<&mut BucketEntry>| {
            e.map_or_else(|| Bucket::full(limit), |e| e.bucket())
        });
    let mut copy = bucket;
    take_of(copy.charge(limit, cost, now))
}

/// Gives back, at `now`, what `take` drew for a call that then failed. A
/// bucket that is gone (dropped once full) owes nothing.
pub(crate) fn refund(user: pgrx::Uuid, receipt: Receipt, now: Micros) {
    let Some(s) = shared() else { return };
    s.buckets
        .with_found(s, key_of(user), true, |e: Option<&mut BucketEntry>| {
            if let Some(e) = e {
                let mut bucket = e.bucket();
                bucket.refund(receipt, now);
                e.set(bucket);
            }
        });
}
