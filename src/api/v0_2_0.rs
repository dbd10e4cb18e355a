//! The 0.2.0 C symbols of the functions that changed in 0.3.0. A database
//! at 0.2.0 or 0.2.1 calls them until ALTER EXTENSION makima_keys UPDATE;
//! they keep the 0.2.0 arguments and result columns. Such a database has no
//! credit columns, so verifications through them never spend, and issuing
//! never ends an expired active key (it answers 23505, as 0.2.0 did).

use pgrx::prelude::*;

use super::args::{grace_period, issue_options, required, with_requirement};
use super::issue::{issue, issuing_call, plain_key, rotated_key};
use super::verify::{detail_of, verified_user, verify_key, Contract, DETAIL_ROW_TYPES_0_2_0};
use crate::jsonb::StoredJsonb;
use crate::one_row::OneRow;
use crate::policy::Requirement;
use crate::store::{Insert, NewKey};

#[pg_extern(sql = false)]
fn mk_issue_key_v2(
    user_id: Option<pgrx::Uuid>,
    name: Option<&str>,
    expires_in: Option<Interval>,
    scopes: Option<Array<&str>>,
    metadata: Option<StoredJsonb>,
    fcinfo: pg_sys::FunctionCallInfo,
) {
    // SAFETY: our own fcinfo; the 0.2.0 script declares rows of these types.
    unsafe {
        issuing_call(fcinfo, "mk_issue_key", |store| {
            let user_id = required(user_id, "user_id")?;
            let options = issue_options(name, expires_in, scopes, metadata)?;
            let new = NewKey {
                expires_at: options.expires_at,
                scopes: options.scopes,
                metadata: options.metadata,
                ..plain_key(name)
            };
            issue(store, user_id, new, Insert::Columns0_2, "mk_issue_key")
        })
    }
}

#[pg_extern(sql = false)]
fn mk_rotate_key_v2(
    user_id: Option<pgrx::Uuid>,
    name: Option<&str>,
    expires_in: Option<Interval>,
    scopes: Option<Array<&str>>,
    metadata: Option<StoredJsonb>,
    grace: Option<Interval>,
    fcinfo: pg_sys::FunctionCallInfo,
) {
    // SAFETY: our own fcinfo; the 0.2.0 script declares rows of these types.
    unsafe {
        issuing_call(fcinfo, "mk_rotate_key", |store| {
            let user_id = required(user_id, "user_id")?;
            let options = issue_options(name, expires_in, scopes, metadata)?;
            let grace = grace_period(grace)?;
            let active = store.end_user_keys_inheriting(user_id, grace, false, false);
            let given = NewKey {
                expires_at: options.expires_at,
                scopes: options.scopes,
                metadata: options.metadata,
                ..plain_key(name)
            };
            let new = rotated_key(name, given, active);
            issue(store, user_id, new, Insert::Columns0_2, "mk_rotate_key")
        })
    }
}

#[pg_extern(sql = false)]
fn mk_verify_v2(key: Option<&str>, fcinfo: pg_sys::FunctionCallInfo) -> Option<pgrx::Uuid> {
    verified_user(verify_key(
        fcinfo,
        key,
        Requirement::None,
        false,
        1,
        Contract::V0_2,
    ))
}

#[pg_extern(sql = false)]
fn mk_verify_scoped(
    key: Option<&str>,
    required_scopes: Option<Array<&str>>,
    fcinfo: pg_sys::FunctionCallInfo,
) -> Option<pgrx::Uuid> {
    with_requirement(required_scopes, |requirement| {
        verified_user(verify_key(
            fcinfo,
            key,
            requirement,
            false,
            1,
            Contract::V0_2,
        ))
    })
}

#[pg_extern(sql = false)]
fn mk_verify_detail_v2(key: Option<&str>, fcinfo: pg_sys::FunctionCallInfo) {
    // SAFETY: our own fcinfo; the 0.2.0 script declares rows of these types.
    let row = unsafe { OneRow::begin(fcinfo, &DETAIL_ROW_TYPES_0_2_0) };
    detail_of(verify_key(
        fcinfo,
        key,
        Requirement::None,
        true,
        1,
        Contract::V0_2,
    ))
    .put_0_2_0(row);
}

#[pg_extern(sql = false)]
fn mk_verify_detail_scoped(
    key: Option<&str>,
    required_scopes: Option<Array<&str>>,
    fcinfo: pg_sys::FunctionCallInfo,
) {
    // SAFETY: our own fcinfo; the 0.2.0 script declares rows of these types.
    let row = unsafe { OneRow::begin(fcinfo, &DETAIL_ROW_TYPES_0_2_0) };
    let detail = with_requirement(required_scopes, |requirement| {
        detail_of(verify_key(
            fcinfo,
            key,
            requirement,
            true,
            1,
            Contract::V0_2,
        ))
    });
    detail.put_0_2_0(row);
}
