//! Verification: `mk_verify` and `mk_verify_detail`, and the one algorithm
//! behind both (`verify_key`).
//!
//! The `mk_verify` forms are SECURITY INVOKER on purpose (see
//! `store::owner`): the probe resolves no names, and the statements it may
//! run get the owner's rights and a pinned search_path there. The
//! `mk_verify_detail` definitions are in `sql/src/functions.sql`: they
//! return their one row in materialize mode (see `one_row`).

use pgrx::prelude::*;

use super::args::with_requirement;
use super::call::store_for;
use crate::clock;
use crate::hashing::KeyHash;
use crate::jsonb::StoredJsonb;
use crate::key_format::{self, KeyShape};
use crate::one_row::OneRow;
use crate::policy::{self, KeyStatus, Micros, Requirement};
use crate::settings;
use crate::store::{self, FoundKey, Reading};

/// What a verification found; `Malformed` and `NotFound` carry no row.
pub(super) enum Verdict {
    Malformed,
    NotFound,
    Found(FoundKey, KeyStatus),
}

/// Checks the key's shape, finds its row by hash, and judges it at the wall
/// clock; a valid key whose `last_used_at` is due gets it written, when this
/// call may write (`store::may_write_last_used`).
pub(super) fn verify_key(
    fcinfo: pg_sys::FunctionCallInfo,
    key: Option<&str>,
    requirement: Requirement<'_>,
    with_labels: bool,
) -> Verdict {
    let Some(key) = key else {
        return Verdict::Malformed;
    };
    if key_format::shape(key) == KeyShape::Malformed {
        return Verdict::Malformed;
    }
    let store = store_for(fcinfo);
    let reading = Reading {
        labels: with_labels,
        scopes: with_labels || requirement != Requirement::None,
    };
    let Some(found) = store.find_by_hash(KeyHash::of(key).as_str(), reading) else {
        return Verdict::NotFound;
    };
    // The wall clock, not the transaction start: a revocation or expiry that
    // is visible must take effect, however long this transaction has run.
    // Read only for keys that can end.
    let now = if found.revoked_at.is_some() || found.expires_at.is_some() {
        clock::wall_clock()
    } else {
        0
    };
    let scopes_ok = policy::satisfies(found.scopes.as_deref(), requirement);
    let status = policy::status(found.revoked_at, found.expires_at, now, scopes_ok);
    if status == KeyStatus::Valid
        && policy::last_used_due(
            found.last_used_at,
            clock::transaction_start(),
            settings::last_used_interval_secs(),
        )
        && store::may_write_last_used()
    {
        store.touch_last_used(found.id);
    }
    Verdict::Found(found, status)
}

pub(super) fn verified_user(verdict: Verdict) -> Option<pgrx::Uuid> {
    match verdict {
        Verdict::Found(found, KeyStatus::Valid) => Some(found.user_id),
        _ => None,
    }
}

/// The user id of a live key; NULL for anything else. Never raises for any text.
#[pg_extern(name = "mk_verify", volatile, parallel_unsafe)]
fn mk_verify_v2(key: Option<&str>, fcinfo: pg_sys::FunctionCallInfo) -> Option<pgrx::Uuid> {
    verified_user(verify_key(fcinfo, key, Requirement::None, false))
}

/// The user id of a live key that holds every scope in `required_scopes`;
/// NULL for anything else. Never raises for any text.
#[pg_extern(name = "mk_verify", volatile, parallel_unsafe)]
fn mk_verify_scoped(
    key: Option<&str>,
    required_scopes: Option<Array<&str>>,
    fcinfo: pg_sys::FunctionCallInfo,
) -> Option<pgrx::Uuid> {
    with_requirement(required_scopes, |requirement| {
        verified_user(verify_key(fcinfo, key, requirement, false))
    })
}

pub(super) type DetailRow = (
    String,
    Option<pgrx::Uuid>,
    Option<pgrx::Uuid>,
    Option<String>,
    Option<String>,
    Option<TimestampWithTimeZone>,
    Option<TimestampWithTimeZone>,
    Option<Vec<String>>,
    Option<StoredJsonb>,
);

pub(super) fn detail_row(verdict: Verdict) -> DetailRow {
    let timestamp = |t: Option<Micros>| t.and_then(|t| TimestampWithTimeZone::try_from(t).ok());
    let (status, found) = match verdict {
        Verdict::Malformed => ("malformed", None),
        Verdict::NotFound => ("not_found", None),
        Verdict::Found(found, status) => (status.as_str(), Some(found)),
    };
    let Some(found) = found else {
        return (
            status.into(),
            None,
            None,
            None,
            None,
            None,
            None,
            None,
            None,
        );
    };
    (
        status.into(),
        Some(found.id),
        Some(found.user_id),
        found.key_prefix,
        found.name,
        timestamp(found.expires_at),
        timestamp(found.revoked_at),
        found.scopes,
        found.metadata,
    )
}

/// The columns of mk_verify_detail: status, key_id, user_id, key_prefix,
/// name, expires_at, revoked_at, scopes, metadata.
const DETAIL_ROW_TYPES: [pg_sys::Oid; 9] = [
    pg_sys::TEXTOID,
    pg_sys::UUIDOID,
    pg_sys::UUIDOID,
    pg_sys::TEXTOID,
    pg_sys::TEXTOID,
    pg_sys::TIMESTAMPTZOID,
    pg_sys::TIMESTAMPTZOID,
    pg_sys::TEXTARRAYOID,
    pg_sys::JSONBOID,
];

fn put_detail_row(row: OneRow<9>, detail: DetailRow) {
    let (status, key_id, user_id, key_prefix, name, expires_at, revoked_at, scopes, metadata) =
        detail;
    let values = [
        status.into_datum(),
        key_id.into_datum(),
        user_id.into_datum(),
        key_prefix.into_datum(),
        name.into_datum(),
        expires_at.into_datum(),
        revoked_at.into_datum(),
        scopes.into_datum(),
        metadata.into_datum(),
    ];
    // SAFETY: the values are of DETAIL_ROW_TYPES, which `row` was begun with.
    unsafe { row.put(values) }
}

/// Always one row: why a key does or does not verify, and what it holds.
#[pg_extern(sql = false)]
fn mk_verify_detail_v2(key: Option<&str>, fcinfo: pg_sys::FunctionCallInfo) {
    // SAFETY: our own fcinfo; functions.sql declares rows of these types.
    let row = unsafe { OneRow::begin(fcinfo, &DETAIL_ROW_TYPES) };
    put_detail_row(
        row,
        detail_row(verify_key(fcinfo, key, Requirement::None, true)),
    );
}

/// As `mk_verify_detail(key)`, with status `insufficient_scope` for a live
/// key that lacks one of `required_scopes`.
#[pg_extern(sql = false)]
fn mk_verify_detail_scoped(
    key: Option<&str>,
    required_scopes: Option<Array<&str>>,
    fcinfo: pg_sys::FunctionCallInfo,
) {
    // SAFETY: our own fcinfo; functions.sql declares rows of these types.
    let row = unsafe { OneRow::begin(fcinfo, &DETAIL_ROW_TYPES) };
    let detail = with_requirement(required_scopes, |requirement| {
        detail_row(verify_key(fcinfo, key, requirement, true))
    });
    put_detail_row(row, detail);
}
