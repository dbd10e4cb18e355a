//! The SQL surface: argument checks, then `key_format`/`hashing`, then `store`.
//!
//! Functions that touch `api_keys` are SECURITY DEFINER with
//! `search_path = pg_catalog, pg_temp`; `store` qualifies the table itself.

use pgrx::prelude::*;
use rand::rngs::OsRng;

use crate::error::{KeyError, KeyResult};
use crate::hashing::hash_key;
use crate::key_format::{self, KeyShape};
use crate::settings;
use crate::store::{self, Store};

/// The seed declares `name VARCHAR(255)`.
const NAME_MAX_CHARS: usize = 255;

pub fn to_uuid(id: pgrx::Uuid) -> uuid::Uuid {
    uuid::Uuid::from_bytes(*id.as_bytes())
}

// pgrx reads the return type from the signature, so the two issuing
// functions spell it out; this alias is for the Rust side.
type IssuedKey = TableIterator<
    'static,
    (
        name!(id, pgrx::Uuid),
        name!(key, String),
        name!(key_prefix, String),
        name!(created_at, TimestampWithTimeZone),
    ),
>;

fn required<T>(value: Option<T>, argument: &'static str) -> KeyResult<T> {
    value.ok_or(KeyError::NullArgument { argument })
}

fn check_name(name: Option<&str>) -> KeyResult<()> {
    let length = name.map_or(0, |n| n.chars().count());
    if length > NAME_MAX_CHARS {
        return Err(KeyError::NameTooLong {
            length,
            limit: NAME_MAX_CHARS,
        });
    }
    Ok(())
}

fn issue(store: &Store, user_id: pgrx::Uuid, name: Option<&str>) -> KeyResult<IssuedKey> {
    let key = key_format::generate(&mut OsRng).map_err(|_| KeyError::RandomnessUnavailable)?;
    let prefix = key_format::display_prefix(&key).to_owned();
    let row = store
        .insert_active(user_id, &hash_key(&key), &prefix, name)
        .ok_or(KeyError::ActiveKeyExists {
            user_id: to_uuid(user_id),
        })?;
    Ok(TableIterator::once((row.id, key, prefix, row.created_at)))
}

/// Issues a new active key for `user_id`. The key is returned once and stored nowhere.
#[pg_extern(security_definer, volatile, parallel_unsafe)]
#[search_path(pg_catalog, pg_temp)]
fn mk_issue_key(
    user_id: Option<pgrx::Uuid>,
    name: default!(Option<&str>, "NULL"),
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
        issue(&unsafe { Store::for_call(fcinfo) }, user_id, name)
    });
    result.unwrap_or_else(|e| e.raise("mk_issue_key"))
}

/// Revokes the user's active key, if any, and issues a new one, in one statement.
#[pg_extern(security_definer, volatile, parallel_unsafe)]
#[search_path(pg_catalog, pg_temp)]
fn mk_rotate_key(
    user_id: Option<pgrx::Uuid>,
    name: default!(Option<&str>, "NULL"),
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
        let store = unsafe { Store::for_call(fcinfo) };
        store.revoke_user_keys(user_id);
        issue(&store, user_id, name)
    });
    result.unwrap_or_else(|e| e.raise("mk_rotate_key"))
}

/// What a verification found; `Malformed` and `NotFound` carry no row.
enum Verdict {
    Malformed,
    NotFound,
    Found(store::FoundKey),
}

fn verify_key(fcinfo: pg_sys::FunctionCallInfo, key: Option<&str>, with_labels: bool) -> Verdict {
    let Some(key) = key else {
        return Verdict::Malformed;
    };
    if key_format::shape(key) == KeyShape::Malformed {
        return Verdict::Malformed;
    }
    let store = unsafe { Store::for_call(fcinfo) };
    let interval = settings::last_used_interval_secs();
    match store.find_by_hash(&hash_key(key), f64::from(interval), with_labels) {
        None => Verdict::NotFound,
        Some(found) => {
            if found.active && found.last_used_due && store::may_write_last_used() {
                store.touch_last_used(found.id);
            }
            Verdict::Found(found)
        }
    }
}

/// The user id of an active key; NULL for anything else. Never raises for any text.
#[pg_extern(security_definer, volatile, parallel_unsafe)]
#[search_path(pg_catalog, pg_temp)]
fn mk_verify(key: Option<&str>, fcinfo: pg_sys::FunctionCallInfo) -> Option<pgrx::Uuid> {
    match verify_key(fcinfo, key, false) {
        Verdict::Found(found) if found.active => Some(found.user_id),
        _ => None,
    }
}

/// Always one row: why a key does or does not verify.
// pgrx reads the column names from the literal return type.
#[allow(clippy::type_complexity)]
#[pg_extern(security_definer, volatile, parallel_unsafe)]
#[search_path(pg_catalog, pg_temp)]
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
    let row = match verify_key(fcinfo, key, true) {
        Verdict::Malformed => ("malformed".to_owned(), None, None, None, None),
        Verdict::NotFound => ("not_found".to_owned(), None, None, None, None),
        Verdict::Found(found) => (
            if found.active { "valid" } else { "revoked" }.to_owned(),
            Some(found.id),
            Some(found.user_id),
            found.key_prefix,
            found.name,
        ),
    };
    TableIterator::once(row)
}

/// True when this call revoked an active key, false when it was already revoked.
#[pg_extern(security_definer, volatile, parallel_unsafe)]
#[search_path(pg_catalog, pg_temp)]
fn mk_revoke(id: Option<pgrx::Uuid>, fcinfo: pg_sys::FunctionCallInfo) -> bool {
    let result = required(id, "id").and_then(|id| unsafe { Store::for_call(fcinfo) }.revoke(id));
    result.unwrap_or_else(|e| e.raise("mk_revoke"))
}

/// Revokes every active key of a user; returns how many this call revoked.
#[pg_extern(security_definer, volatile, parallel_unsafe)]
#[search_path(pg_catalog, pg_temp)]
fn mk_revoke_user_keys(user_id: Option<pgrx::Uuid>, fcinfo: pg_sys::FunctionCallInfo) -> i32 {
    let result = required(user_id, "user_id")
        .map(|user_id| unsafe { Store::for_call(fcinfo) }.revoke_user_keys(user_id));
    result.unwrap_or_else(|e| e.raise("mk_revoke_user_keys"))
}

/// The `key_hash` stored for a key: lower-case hex SHA-256 of its UTF-8 bytes.
#[pg_extern(immutable, strict, parallel_safe)]
fn mk_hash_key(key: &str) -> String {
    hash_key(key)
}

/// Our format with a valid checksum; no table access.
#[pg_extern(immutable, strict, parallel_safe)]
fn mk_key_is_well_formed(key: &str) -> bool {
    key_format::is_well_formed(key)
}
