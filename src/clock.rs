//! The two clocks the rules read, as PostgreSQL's microseconds since
//! 2000-01-01 UTC ([`Micros`]).
//!
//! - [`transaction_start`] is SQL's `now()`: what the statements of the
//!   store write (`created_at`, `revoked_at`, `last_used_at`) and what
//!   issue options are counted from.
//! - [`wall_clock`] is `clock_timestamp()`: what a verification compares
//!   `expires_at` and `revoked_at` with, so that a key ends when its time
//!   comes, however long the caller's transaction has run.

use pgrx::prelude::*;

use crate::policy::{Every, Micros};

/// `now()`: the start of the current transaction.
pub(crate) fn transaction_start() -> Micros {
    // SAFETY: reads a backend-local value; valid inside any transaction,
    // which every SQL function call is.
    unsafe { pg_sys::GetCurrentTransactionStartTimestamp() }
}

/// `now()` as a SQL value.
pub(crate) fn transaction_start_timestamp() -> TimestampWithTimeZone {
    TimestampWithTimeZone::try_from(transaction_start()).expect("now() is a valid timestamp")
}

/// `clock_timestamp()`: the time of the call.
pub(crate) fn wall_clock() -> Micros {
    // SAFETY: reads the system clock; no Postgres state involved.
    unsafe { pg_sys::GetCurrentTimestamp() }
}

/// A stored or computed instant as a SQL value; past the largest timestamp
/// PostgreSQL can store, `infinity`.
pub(crate) fn timestamp_or_infinity(at: Micros) -> TimestampWithTimeZone {
    TimestampWithTimeZone::try_from(at)
        .unwrap_or_else(|_| TimestampWithTimeZone::positive_infinity())
}

/// An interval as the refill arithmetic of `policy` takes it.
/// `interval` as a fixed number of microseconds, as `EXTRACT(EPOCH FROM
/// interval)` counts it: a month is 30 days and a day 24 hours.
/// Saturates instead of overflowing.
pub(crate) fn fixed_length(interval: Interval) -> Micros {
    const DAY: i128 = 86_400_000_000;
    let micros = i128::from(interval.months()) * 30 * DAY
        + i128::from(interval.days()) * DAY
        + i128::from(interval.micros());
    micros.clamp(i128::from(Micros::MIN), i128::from(Micros::MAX)) as Micros
}

pub(crate) fn period(interval: Interval) -> Every {
    Every {
        months: interval.months(),
        days: interval.days(),
        micros: interval.micros(),
    }
}
