//! `mk_key_stats` (a view over `mk_key_stats_rows()`) and
//! `mk_key_stats_reset()`: what the shared tier counted, for this database.
//! Both need makima_keys preloaded, and raise 55000 otherwise: an empty
//! view would read as "no verifications". Neither shows key material or
//! hashes: key ids and counts only.

use pgrx::prelude::*;

use crate::error::KeyError;
use crate::shared::{self, StatsRow};
use pgrx::pg_sys;

fn count(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

fn timestamp(micros: Option<i64>) -> Option<TimestampWithTimeZone> {
    micros.and_then(|m| TimestampWithTimeZone::try_from(m).ok())
}

/// One row per key of this database that shared memory tracks, then one
/// row (key_id NULL) for the calls that named no key. Declared in
/// `sql/src/functions.sql`, under the `mk_key_stats` view.
// pgrx reads the row type from the signature: it cannot be a type alias.
#[allow(clippy::type_complexity)]
#[pg_extern(sql = false)]
fn mk_key_stats_rows() -> TableIterator<
    'static,
    (
        name!(key_id, Option<pgrx::Uuid>),
        name!(valid, i64),
        name!(revoked, i64),
        name!(expired, i64),
        name!(insufficient_scope, i64),
        name!(rate_limit_unavailable, i64),
        name!(rate_limited, i64),
        name!(usage_exceeded, i64),
        name!(usage_unavailable, i64),
        name!(not_found, i64),
        name!(malformed, i64),
        name!(last_verified_at, Option<TimestampWithTimeZone>),
        name!(last_called_at, Option<TimestampWithTimeZone>),
        name!(since, Option<TimestampWithTimeZone>),
    ),
> {
    let rows = shared::stats_rows()
        .unwrap_or_else(|| KeyError::StatisticsUnavailable.raise("mk_key_stats"));
    TableIterator::new(rows.into_iter().map(|row: StatsRow| {
        let c = row.counts;
        (
            row.key_id,
            count(c[0]),
            count(c[1]),
            count(c[2]),
            count(c[3]),
            count(c[4]),
            count(c[5]),
            count(c[6]),
            count(c[7]),
            count(row.not_found),
            count(row.malformed),
            timestamp(row.last_valid_at),
            timestamp(row.last_call_at),
            timestamp(Some(row.since)),
        )
    }))
}

/// Zeroes this database's counts. What keys are owed to `last_used_at`,
/// and the rate-limit buckets, are kept.
#[pg_extern(sql = false)]
fn mk_key_stats_reset() {
    if !shared::reset_stats() {
        KeyError::StatisticsUnavailable.raise("mk_key_stats_reset");
    }
}

/// The health of the shared tier: one row per database it serves (every
/// database of the server, not only this one: a failing database is most
/// often another), then one row (datid NULL) with the hashes' fill.
/// Declared in `sql/src/functions.sql`; not callable by PUBLIC.
// pgrx reads the row type from the signature: it cannot be a type alias.
#[allow(clippy::type_complexity)]
#[pg_extern(sql = false)]
fn mk_shared_status() -> TableIterator<
    'static,
    (
        name!(datid, Option<pg_sys::Oid>),
        name!(datname, Option<String>),
        name!(last_outcome, Option<String>),
        name!(last_sqlstate, Option<String>),
        name!(last_attempt_at, Option<TimestampWithTimeZone>),
        name!(last_success_at, Option<TimestampWithTimeZone>),
        name!(consecutive_failures, Option<i32>),
        name!(next_attempt_at, Option<TimestampWithTimeZone>),
        name!(keys_written_last_round, Option<i64>),
        name!(keys_owed, i64),
        name!(keys_tracked, i64),
        name!(budgets_tracked, i64),
        name!(capacity, Option<i64>),
        name!(untracked_calls, Option<i64>),
        name!(refused_budgets, Option<i64>),
    ),
> {
    let mut rows = shared::status_rows()
        .unwrap_or_else(|| KeyError::StatisticsUnavailable.raise("mk_shared_status"));
    // Other databases' rows (names, counts, failures) only for a role that
    // may see the server's activity: a superuser or a member of
    // pg_monitor. Everyone granted the function sees this database's row
    // and the whole tier's.
    // SAFETY: plain reads of this backend's user and database, and
    // PostgreSQL's role membership check.
    let (sees_all, this_db) = unsafe {
        (
            pg_sys::has_privs_of_role(
                pg_sys::GetUserId(),
                pg_sys::Oid::from(pg_sys::ROLE_PG_MONITOR),
            ),
            pg_sys::MyDatabaseId,
        )
    };
    if !sees_all {
        rows.retain(|row| row.database.as_ref().is_none_or(|db| db.oid == this_db));
    }
    let known = |m: i64| (m != shared::NEVER).then_some(m);
    TableIterator::new(
        rows.into_iter()
            .map(move |row: shared::StatusRow| match row.database {
                Some(db) => (
                    Some(db.oid),
                    Some(database_name(db.oid)),
                    Some(db.outcome.as_str().to_string()),
                    db.sqlstate,
                    timestamp(known(db.last_attempt_at)),
                    timestamp(known(db.last_success_at)),
                    Some(i32::try_from(db.failures).unwrap_or(i32::MAX)),
                    timestamp(known(db.next_attempt_at)),
                    Some(count(db.written)),
                    count(row.owed),
                    count(row.keys),
                    count(row.budgets),
                    None,
                    None,
                    None,
                ),
                None => (
                    None,
                    None,
                    None,
                    None,
                    None,
                    None,
                    None,
                    None,
                    None,
                    count(row.owed),
                    count(row.keys),
                    count(row.budgets),
                    Some(count(row.capacity)),
                    Some(count(row.untracked)),
                    Some(count(row.refused)),
                ),
            }),
    )
}

fn database_name(db: pg_sys::Oid) -> String {
    // SAFETY: a syscache lookup in this transaction; NULL for a database
    // dropped since it was served.
    let name = unsafe { pg_sys::get_database_name(db) };
    if name.is_null() {
        return format!("(dropped: {})", db.to_u32());
    }
    // SAFETY: a palloc'd C string.
    unsafe { std::ffi::CStr::from_ptr(name) }
        .to_string_lossy()
        .into_owned()
}
