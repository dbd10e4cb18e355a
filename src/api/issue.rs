//! Issuing: `mk_issue_key` and `mk_rotate_key`. Their SQL definitions are in
//! `sql/src/functions.sql`: they return their one row in materialize mode
//! (see `one_row`), which pgrx cannot declare.

use pgrx::prelude::*;
use rand::rngs::OsRng;

use super::args::{
    credit_options, grace_period, issue_options, needs_shared_tier, rate_options, required,
};
use super::call::store_for;
use crate::clock;
use crate::error::{KeyError, KeyResult};
use crate::hashing::hash_key;
use crate::jsonb::StoredJsonb;
use crate::key_format;
use crate::one_row::OneRow;
use crate::policy;
use crate::store::{ActiveKey, Insert, IssuedRow, NewKey, Store};

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
    how: Insert,
    function: &'static str,
) -> KeyResult<Issued> {
    let key = key_format::generate(&mut OsRng).map_err(|_| KeyError::RandomnessUnavailable)?;
    let prefix = key_format::display_prefix(&key).to_owned();
    let row = store.insert_active(user_id, &hash_key(&key), &prefix, new, how, function);
    Ok(Issued { row, key, prefix })
}

/// A key with a name and no later options.
pub(super) fn plain_key(name: Option<&str>) -> NewKey<'_> {
    NewKey {
        name,
        expires_at: None,
        scopes: None,
        metadata: None,
        credits: None,
        refill: None,
        refilled_at: None,
        rate_limit: None,
    }
}

/// The new key of a rotation: each option given, or else the active key's
/// (`policy::inherited`, `policy::rotated_expiry`), so a rotation never
/// widens what a key may do. Credits are one option: given, they replace
/// the active key's; not given, the active key's remaining credits and
/// refill schedule move to the new key.
pub(super) fn rotated_key<'a>(
    name: Option<&'a str>,
    given: NewKey<'a>,
    active: Option<ActiveKey>,
) -> NewKey<'a> {
    let active = active.unwrap_or(ActiveKey {
        scopes: None,
        metadata: None,
        lifetime: None,
        credits: None,
        refill: None,
        refilled_at: None,
        rate_limit: None,
    });
    let expires_at = policy::rotated_expiry(
        given.expires_at.map(pg_sys::TimestampTz::from),
        active.lifetime,
        clock::transaction_start(),
    );
    let (credits, refill, refilled_at) = if given.credits.is_some() {
        (given.credits, given.refill, None)
    } else {
        (active.credits, active.refill, active.refilled_at)
    };
    NewKey {
        name,
        expires_at: expires_at.map(clock::timestamp_or_infinity),
        scopes: policy::inherited(given.scopes, active.scopes),
        metadata: policy::inherited(given.metadata, active.metadata),
        credits,
        refill,
        refilled_at,
        rate_limit: policy::inherited(given.rate_limit, active.rate_limit),
    }
}

/// The body of every issuing function that returns its row in materialize
/// mode: the row is set up first (a caller that cannot take a set gets
/// 0A000 before anything is written), then `issue_key` runs with the
/// call's store, and its key, or its error raised for `function`, is the
/// call's answer.
///
/// # Safety
/// `fcinfo` is the call's own, and its SQL definition returns rows of
/// `ISSUED_ROW_TYPES` (sql/src/functions.sql, or an earlier version's script).
pub(super) unsafe fn issuing_call(
    fcinfo: pg_sys::FunctionCallInfo,
    function: &'static str,
    issue_key: impl FnOnce(&Store) -> KeyResult<Issued>,
) {
    // SAFETY: the caller's contract.
    let row = unsafe { OneRow::begin(fcinfo, &ISSUED_ROW_TYPES) };
    match issue_key(&store_for(fcinfo)) {
        Ok(issued) => issued.into_row(row),
        Err(e) => e.raise(function),
    }
}

/// What an issuing call was given, checked.
struct Given<'a> {
    user_id: pgrx::Uuid,
    key: NewKey<'a>,
}

#[allow(clippy::too_many_arguments)]
fn given<'a>(
    user_id: Option<pgrx::Uuid>,
    name: Option<&'a str>,
    expires_in: Option<Interval>,
    scopes: Option<Array<&str>>,
    metadata: Option<StoredJsonb>,
    credits: Option<i32>,
    refill_amount: Option<i32>,
    refill_every: Option<Interval>,
    rate_limit: Option<(Option<i32>, Option<Interval>)>,
) -> KeyResult<Given<'a>> {
    let user_id = required(user_id, "user_id")?;
    let options = issue_options(name, expires_in, scopes, metadata)?;
    let credits = credit_options(credits, refill_amount, refill_every)?;
    let rate_limit = match rate_limit {
        Some((limit, period)) => rate_options(limit, period)?,
        None => None,
    };
    Ok(Given {
        user_id,
        key: NewKey {
            name,
            expires_at: options.expires_at,
            scopes: options.scopes,
            metadata: options.metadata,
            credits: credits.credits,
            refill: credits.refill,
            refilled_at: None,
            rate_limit,
        },
    })
}

/// Issues a new active key for `user_id`. The key is returned once and
/// stored nowhere. An active key that has expired is ended first.
#[allow(clippy::too_many_arguments)]
#[pg_extern(sql = false)]
fn mk_issue_key_v3(
    user_id: Option<pgrx::Uuid>,
    name: Option<&str>,
    expires_in: Option<Interval>,
    scopes: Option<Array<&str>>,
    metadata: Option<StoredJsonb>,
    credits: Option<i32>,
    refill_amount: Option<i32>,
    refill_every: Option<Interval>,
    fcinfo: pg_sys::FunctionCallInfo,
) {
    // SAFETY: our own fcinfo; the 0.3.0 script declares rows of these types.
    unsafe {
        issuing_call(fcinfo, "mk_issue_key", |store| {
            let given = given(
                user_id,
                name,
                expires_in,
                scopes,
                metadata,
                credits,
                refill_amount,
                refill_every,
                None,
            )?;
            let how = Insert::Columns0_3 { end_expired: true };
            issue(store, given.user_id, given.key, how, "mk_issue_key")
        })
    }
}

/// `mk_issue_key` of 0.4.0: also `rate_limit` per `rate_period`.
#[allow(clippy::too_many_arguments)]
#[pg_extern(sql = false)]
fn mk_issue_key_v4(
    user_id: Option<pgrx::Uuid>,
    name: Option<&str>,
    expires_in: Option<Interval>,
    scopes: Option<Array<&str>>,
    metadata: Option<StoredJsonb>,
    credits: Option<i32>,
    refill_amount: Option<i32>,
    refill_every: Option<Interval>,
    rate_limit: Option<i32>,
    rate_period: Option<Interval>,
    fcinfo: pg_sys::FunctionCallInfo,
) {
    // SAFETY: our own fcinfo; functions.sql declares rows of these types.
    unsafe {
        issuing_call(fcinfo, "mk_issue_key", |store| {
            let given = given(
                user_id,
                name,
                expires_in,
                scopes,
                metadata,
                credits,
                refill_amount,
                refill_every,
                Some((rate_limit, rate_period)),
            )?;
            let how = Insert::Columns0_4 { end_expired: true };
            issue(store, given.user_id, given.key, how, "mk_issue_key")
        })
    }
}

/// Ends the user's live keys (the active one after `grace`) and issues a new
/// one, in one statement. Options not given are taken from the active key.
#[allow(clippy::too_many_arguments)]
#[pg_extern(sql = false)]
fn mk_rotate_key_v3(
    user_id: Option<pgrx::Uuid>,
    name: Option<&str>,
    expires_in: Option<Interval>,
    scopes: Option<Array<&str>>,
    metadata: Option<StoredJsonb>,
    grace: Option<Interval>,
    credits: Option<i32>,
    refill_amount: Option<i32>,
    refill_every: Option<Interval>,
    fcinfo: pg_sys::FunctionCallInfo,
) {
    // SAFETY: our own fcinfo; the 0.3.0 script declares rows of these types.
    unsafe {
        issuing_call(fcinfo, "mk_rotate_key", |store| {
            let given = given(
                user_id,
                name,
                expires_in,
                scopes,
                metadata,
                credits,
                refill_amount,
                refill_every,
                None,
            )?;
            let grace = grace_period(grace)?;
            let active = store.end_user_keys_inheriting(given.user_id, grace, true, false);
            let new = rotated_key(name, given.key, active);
            let how = Insert::Columns0_3 { end_expired: false };
            issue(store, given.user_id, new, how, "mk_rotate_key")
        })
    }
}

/// `mk_rotate_key` of 0.4.0: the rate limit is one more option, inherited
/// when not given. Where it cannot be kept (not preloaded), a rotation
/// that would carry one fails (55000) before anything is written.
#[allow(clippy::too_many_arguments)]
#[pg_extern(sql = false)]
fn mk_rotate_key_v4(
    user_id: Option<pgrx::Uuid>,
    name: Option<&str>,
    expires_in: Option<Interval>,
    scopes: Option<Array<&str>>,
    metadata: Option<StoredJsonb>,
    grace: Option<Interval>,
    credits: Option<i32>,
    refill_amount: Option<i32>,
    refill_every: Option<Interval>,
    rate_limit: Option<i32>,
    rate_period: Option<Interval>,
    fcinfo: pg_sys::FunctionCallInfo,
) {
    // SAFETY: our own fcinfo; functions.sql declares rows of these types.
    unsafe {
        issuing_call(fcinfo, "mk_rotate_key", |store| {
            let given = given(
                user_id,
                name,
                expires_in,
                scopes,
                metadata,
                credits,
                refill_amount,
                refill_every,
                Some((rate_limit, rate_period)),
            )?;
            let grace = grace_period(grace)?;
            let active = store.end_user_keys_inheriting(given.user_id, grace, true, true);
            let new = rotated_key(name, given.key, active);
            // An error here rolls back the ending of the old keys above.
            needs_shared_tier(new.rate_limit)?;
            let how = Insert::Columns0_4 { end_expired: false };
            issue(store, given.user_id, new, how, "mk_rotate_key")
        })
    }
}
