//! Revocation: by key id, by user, and by the plaintext of a leaked key.

use pgrx::prelude::*;

use super::args::required;
use super::call::store_for;
use crate::hashing::hash_key;
use crate::key_format::{self, KeyShape};

/// True when this call ended a live key, false when it had already ended.
#[pg_extern(name = "mk_revoke", security_definer, volatile, parallel_unsafe)]
#[search_path(pg_catalog, pg_temp)]
fn mk_revoke_v2(id: Option<pgrx::Uuid>, fcinfo: pg_sys::FunctionCallInfo) -> bool {
    let result = required(id, "id").and_then(|id| store_for(fcinfo).revoke(id));
    result.unwrap_or_else(|e| e.raise("mk_revoke"))
}

/// Ends every live key of a user; returns how many this call ended.
#[pg_extern(
    name = "mk_revoke_user_keys",
    security_definer,
    volatile,
    parallel_unsafe
)]
#[search_path(pg_catalog, pg_temp)]
fn mk_revoke_user_keys_v2(user_id: Option<pgrx::Uuid>, fcinfo: pg_sys::FunctionCallInfo) -> i32 {
    let result =
        required(user_id, "user_id").map(|user_id| store_for(fcinfo).end_user_keys(user_id, None));
    result.unwrap_or_else(|e| e.raise("mk_revoke_user_keys"))
}

/// Ends the live key whose plaintext is `key` (a leaked key reported by a
/// secret scanner). False for anything else, and never an error: the answer
/// says nothing about keys that merely resemble `key`.
#[pg_extern(security_definer, volatile, parallel_unsafe)]
#[search_path(pg_catalog, pg_temp)]
fn mk_revoke_key(key: Option<&str>, fcinfo: pg_sys::FunctionCallInfo) -> bool {
    match key {
        Some(key) if key_format::shape(key) != KeyShape::Malformed => {
            store_for(fcinfo).revoke_by_hash(&hash_key(key))
        }
        _ => false,
    }
}
