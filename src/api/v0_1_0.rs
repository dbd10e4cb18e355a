//! The 0.1.0 C symbols of functions that changed in 0.2.0. A database at
//! 0.1.0 calls them until ALTER EXTENSION makima_keys UPDATE; they keep the
//! 0.1.0 arguments and result columns, use only the 0.1.0 columns and send
//! no revocation events. Their return types are spelled out: pgrx resolves
//! them even with `sql = false`, and refuses a type alias.

use pgrx::prelude::*;

use super::args::{check_name, required};
use super::call::store_for;
use super::issue::{issue, plain_key, Issued};
use super::verify::{detail_of, verified_user, verify_key, Contract};
use crate::policy::Requirement;
use crate::store::Insert;

#[pg_extern(sql = false)]
fn mk_issue_key(
    user_id: Option<pgrx::Uuid>,
    name: Option<&str>,
    fcinfo: pg_sys::FunctionCallInfo,
) -> TableIterator<
    'static,
    (
        name!(id, pgrx::Uuid),
        name!(key, String),
        name!(key_prefix, String),
        name!(created_at, TimestampWithTimeZone),
    ),
> {
    let result = required(user_id, "user_id").and_then(|user_id| {
        check_name(name)?;
        let store = store_for(fcinfo).without_events();
        issue(
            &store,
            user_id,
            plain_key(name),
            Insert::Columns0_2,
            "mk_issue_key",
        )
        .map(Issued::into_table)
    });
    result.unwrap_or_else(|e| e.raise("mk_issue_key"))
}

#[pg_extern(sql = false)]
fn mk_rotate_key(
    user_id: Option<pgrx::Uuid>,
    name: Option<&str>,
    fcinfo: pg_sys::FunctionCallInfo,
) -> TableIterator<
    'static,
    (
        name!(id, pgrx::Uuid),
        name!(key, String),
        name!(key_prefix, String),
        name!(created_at, TimestampWithTimeZone),
    ),
> {
    let result = required(user_id, "user_id").and_then(|user_id| {
        check_name(name)?;
        let store = store_for(fcinfo).without_events();
        store.end_user_keys(user_id, None);
        issue(
            &store,
            user_id,
            plain_key(name),
            Insert::Columns0_2,
            "mk_rotate_key",
        )
        .map(Issued::into_table)
    });
    result.unwrap_or_else(|e| e.raise("mk_rotate_key"))
}

#[allow(clippy::type_complexity)]
#[pg_extern(sql = false)]
fn mk_verify_detail(
    key: Option<&str>,
    fcinfo: pg_sys::FunctionCallInfo,
) -> TableIterator<
    'static,
    (
        name!(status, String),
        name!(key_id, Option<pgrx::Uuid>),
        name!(user_id, Option<pgrx::Uuid>),
        name!(key_prefix, Option<String>),
        name!(name, Option<String>),
    ),
> {
    let detail = detail_of(verify_key(
        fcinfo,
        key,
        Requirement::None,
        true,
        1,
        Contract::V0_2,
    ));
    TableIterator::once((
        detail.status.to_owned(),
        detail.key_id,
        detail.user_id,
        detail.key_prefix,
        detail.name,
    ))
}

#[pg_extern(sql = false)]
fn mk_verify(key: Option<&str>, fcinfo: pg_sys::FunctionCallInfo) -> Option<pgrx::Uuid> {
    verified_user(verify_key(
        fcinfo,
        key,
        Requirement::None,
        false,
        1,
        Contract::V0_2,
    ))
}

// 0.1.0 sent no events: a revoking transaction could be prepared (2PC).
#[pg_extern(sql = false)]
fn mk_revoke(id: Option<pgrx::Uuid>, fcinfo: pg_sys::FunctionCallInfo) -> bool {
    let result = required(id, "id").and_then(|id| store_for(fcinfo).without_events().revoke(id));
    result.unwrap_or_else(|e| e.raise("mk_revoke"))
}

#[pg_extern(sql = false)]
fn mk_revoke_user_keys(user_id: Option<pgrx::Uuid>, fcinfo: pg_sys::FunctionCallInfo) -> i32 {
    let result = required(user_id, "user_id").map(|user_id| {
        store_for(fcinfo)
            .without_events()
            .end_user_keys(user_id, None)
    });
    result.unwrap_or_else(|e| e.raise("mk_revoke_user_keys"))
}
