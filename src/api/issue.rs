//! Issuing: `mk_issue_key` and `mk_rotate_key`. Their SQL definitions are in
//! `sql/src/functions.sql`: they return their one row in materialize mode
//! (see `one_row`), which pgrx cannot declare.

use pgrx::prelude::*;
use rand::rngs::OsRng;

use super::args::{grace_period, issue_options, required};
use super::call::store_for;
use crate::clock;
use crate::error::{KeyError, KeyResult};
use crate::hashing::hash_key;
use crate::jsonb::StoredJsonb;
use crate::key_format;
use crate::one_row::OneRow;
use crate::policy;
use crate::store::{IssuedRow, NewKey, Store};

// pgrx reads the return type from the signature, so the 0.1.0 issuing
// functions spell it out; this alias is for the Rust side.
pub(super) type IssuedKey = TableIterator<
    'static,
    (
        name!(id, pgrx::Uuid),
        name!(key, String),
        name!(key_prefix, String),
        name!(created_at, TimestampWithTimeZone),
    ),
>;

/// A new key, as the issuing functions return it.
pub(super) struct Issued {
    row: IssuedRow,
    key: String,
    prefix: String,
}

/// The columns of the issuing functions' rows: id, key, key_prefix, created_at.
const ISSUED_ROW_TYPES: [pg_sys::Oid; 4] = [
    pg_sys::UUIDOID,
    pg_sys::TEXTOID,
    pg_sys::TEXTOID,
    pg_sys::TIMESTAMPTZOID,
];

impl Issued {
    /// For the 0.1.0 entry points, which keep pgrx's value-per-call return.
    pub(super) fn into_table(self) -> IssuedKey {
        TableIterator::once((self.row.id, self.key, self.prefix, self.row.created_at))
    }

    fn into_row(self, row: OneRow<4>) {
        let values = [
            self.row.id.into_datum(),
            self.key.into_datum(),
            self.prefix.into_datum(),
            self.row.created_at.into_datum(),
        ];
        // SAFETY: the values are of ISSUED_ROW_TYPES, which `row` was begun with.
        unsafe { row.put(values) }
    }
}

/// Generates a key and stores its hash; the plaintext is returned once and
/// stored nowhere.
pub(super) fn issue(
    store: &Store,
    user_id: pgrx::Uuid,
    new: NewKey<'_>,
    function: &'static str,
) -> KeyResult<Issued> {
    let key = key_format::generate(&mut OsRng).map_err(|_| KeyError::RandomnessUnavailable)?;
    let prefix = key_format::display_prefix(&key).to_owned();
    let row = store.insert_active(user_id, &hash_key(&key), &prefix, new, function);
    Ok(Issued { row, key, prefix })
}

/// A key with a name and no 0.2.0 options.
pub(super) fn plain_key(name: Option<&str>) -> NewKey<'_> {
    NewKey {
        name,
        expires_at: None,
        scopes: None,
        metadata: None,
    }
}

/// Issues a new active key for `user_id`. The key is returned once and stored nowhere.
#[pg_extern(sql = false)]
fn mk_issue_key_v2(
    user_id: Option<pgrx::Uuid>,
    name: Option<&str>,
    expires_in: Option<Interval>,
    scopes: Option<Array<&str>>,
    metadata: Option<StoredJsonb>,
    fcinfo: pg_sys::FunctionCallInfo,
) {
    // SAFETY: our own fcinfo; functions.sql declares rows of these types.
    let row = unsafe { OneRow::begin(fcinfo, &ISSUED_ROW_TYPES) };
    let result = required(user_id, "user_id").and_then(|user_id| {
        let options = issue_options(name, expires_in, scopes, metadata)?;
        let new = NewKey {
            name,
            expires_at: options.expires_at,
            scopes: options.scopes,
            metadata: options.metadata,
        };
        let store = store_for(fcinfo);
        issue(&store, user_id, new, "mk_issue_key")
    });
    match result {
        Ok(issued) => issued.into_row(row),
        Err(e) => e.raise("mk_issue_key"),
    }
}

/// Ends the user's live keys (the active one after `grace`) and issues a new
/// one, in one statement. Options not given are taken from the active key
/// (`policy::inherited`, `policy::rotated_expiry`), so a rotation never
/// widens what a key may do.
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
    // SAFETY: our own fcinfo; functions.sql declares rows of these types.
    let row = unsafe { OneRow::begin(fcinfo, &ISSUED_ROW_TYPES) };
    let result = required(user_id, "user_id").and_then(|user_id| {
        let options = issue_options(name, expires_in, scopes, metadata)?;
        let grace = grace_period(grace)?;
        let store = store_for(fcinfo);
        let active = store.end_user_keys_inheriting(user_id, grace);
        let (lifetime, active_scopes, active_metadata) = match active {
            Some(active) => (active.lifetime, active.scopes, active.metadata),
            None => (None, None, None),
        };
        let expires_at = policy::rotated_expiry(
            options.expires_at.map(pg_sys::TimestampTz::from),
            lifetime,
            clock::transaction_start(),
        );
        let new = NewKey {
            name,
            expires_at: expires_at.map(clock::timestamp_or_infinity),
            scopes: policy::inherited(options.scopes, active_scopes),
            metadata: policy::inherited(options.metadata, active_metadata),
        };
        issue(&store, user_id, new, "mk_rotate_key")
    });
    match result {
        Ok(issued) => issued.into_row(row),
        Err(e) => e.raise("mk_rotate_key"),
    }
}
