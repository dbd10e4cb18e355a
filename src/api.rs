//! The SQL surface: argument checks, then `key_format`/`hashing`/`policy`,
//! then `store`.
//!
//! Functions that touch `api_keys` are SECURITY DEFINER with
//! `search_path = pg_catalog, pg_temp`; `store` qualifies the table itself.
//!
//! Functions whose SQL signature or behaviour changed in 0.2.0 have new C
//! symbols (the `_v2` Rust names): a session that still runs the 0.1.0
//! library after ALTER EXTENSION UPDATE then fails to find them, instead of
//! applying 0.1.0 rules (no expiry, no grace) to 0.2.0 keys. The 0.1.0
//! symbols stay in `v0_1_0`, without SQL of their own, for databases still
//! at 0.1.0 when this library is installed.

use pgrx::prelude::*;
use rand::rngs::OsRng;

use crate::error::{KeyError, KeyResult};
use crate::hashing::{hash_key, KeyHash};
use crate::jsonb::StoredJsonb;
use crate::key_format::{self, KeyShape};
use crate::one_row::OneRow;
use crate::policy::{self, KeyStatus, Requirement, ScopeProblem};
use crate::settings;
use crate::store::{self, IssuedRow, NewKey, Reading, Store};

/// The seed declares `name VARCHAR(255)`.
const NAME_MAX_CHARS: usize = 255;

pub fn to_uuid(id: pgrx::Uuid) -> uuid::Uuid {
    uuid::Uuid::from_bytes(*id.as_bytes())
}

// pgrx reads the return type from the signature, so the issuing functions
// spell it out; this alias is for the Rust side.
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

/// `now()`: the start of the transaction, as the SQL the store runs sees it.
fn transaction_start() -> TimestampWithTimeZone {
    let now = unsafe { pg_sys::GetCurrentTransactionStartTimestamp() };
    TimestampWithTimeZone::try_from(now).expect("now() is a valid timestamp")
}

/// `now() + interval`, which must lie after `now()`.
fn expiry(expires_in: Option<Interval>) -> KeyResult<Option<TimestampWithTimeZone>> {
    let Some(expires_in) = expires_in else {
        return Ok(None);
    };
    let now = transaction_start();
    // Calendar arithmetic in the session's time zone, as SQL's now() + interval.
    let at = now + expires_in;
    if at <= now {
        return Err(KeyError::NotPositive {
            argument: "expires_in",
        });
    }
    Ok(Some(at))
}

/// A grace period that ends now (or NULL) means none at all.
fn grace_period(grace: Option<Interval>) -> KeyResult<Option<Interval>> {
    let Some(grace) = grace else {
        return Ok(None);
    };
    let now = transaction_start();
    let end = now + grace;
    if end < now {
        return Err(KeyError::Negative { argument: "grace" });
    }
    Ok((end > now).then_some(grace))
}

fn checked_scopes(scopes: Option<Array<'_, &str>>) -> KeyResult<Option<Vec<String>>> {
    let Some(scopes) = scopes else {
        return Ok(None);
    };
    policy::normalize_scopes(scopes.iter())
        .map(Some)
        .map_err(|problem| match problem {
            ScopeProblem::NullElement => KeyError::NullScope,
            ScopeProblem::Invalid { position } => KeyError::InvalidScope { position },
            ScopeProblem::TooMany { count } => KeyError::TooManyScopes {
                count,
                limit: policy::MAX_SCOPES,
            },
        })
}

fn checked_metadata(metadata: Option<StoredJsonb>) -> KeyResult<Option<StoredJsonb>> {
    let Some(metadata) = metadata else {
        return Ok(None);
    };
    let found = metadata.type_name();
    if found != "object" {
        return Err(KeyError::MetadataNotObject { found });
    }
    let size = metadata.stored_size();
    if size > policy::MAX_METADATA_BYTES {
        return Err(KeyError::MetadataTooLarge {
            size,
            limit: policy::MAX_METADATA_BYTES,
        });
    }
    Ok(Some(metadata))
}

/// The 0.2.0 issue options, checked before anything is written.
struct IssueOptions {
    expires_at: Option<TimestampWithTimeZone>,
    scopes: Option<Vec<String>>,
    metadata: Option<StoredJsonb>,
}

fn issue_options(
    name: Option<&str>,
    expires_in: Option<Interval>,
    scopes: Option<Array<'_, &str>>,
    metadata: Option<StoredJsonb>,
) -> KeyResult<IssueOptions> {
    check_name(name)?;
    Ok(IssueOptions {
        expires_at: expiry(expires_in)?,
        scopes: checked_scopes(scopes)?,
        metadata: checked_metadata(metadata)?,
    })
}

/// A new key, as the issuing functions return it.
struct Issued {
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
    fn into_table(self) -> IssuedKey {
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

fn issue(
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

fn plain_key(name: Option<&str>) -> NewKey<'_> {
    NewKey {
        name,
        expires_at: None,
        scopes: None,
        metadata: None,
    }
}

/// Issues a new active key for `user_id`. The key is returned once and stored nowhere.
///
/// The SQL is written out because the row is returned in materialize mode
/// (see `one_row`), which pgrx cannot declare; it is the definition pgrx
/// generated for 0.2.0, without its comments.
#[pg_extern(sql = r#"
CREATE FUNCTION "mk_issue_key"(
	"user_id" uuid,
	"name" TEXT DEFAULT NULL,
	"expires_in" interval DEFAULT NULL,
	"scopes" TEXT[] DEFAULT NULL,
	"metadata" jsonb DEFAULT NULL
) RETURNS TABLE (
	"id" uuid,
	"key" TEXT,
	"key_prefix" TEXT,
	"created_at" timestamp with time zone
)
VOLATILE SECURITY DEFINER PARALLEL UNSAFE
SET search_path TO pg_catalog, pg_temp
LANGUAGE c
AS 'MODULE_PATHNAME', 'mk_issue_key_v2_wrapper';
"#)]
fn mk_issue_key_v2(
    user_id: Option<pgrx::Uuid>,
    name: Option<&str>,
    expires_in: Option<Interval>,
    scopes: Option<Array<&str>>,
    metadata: Option<StoredJsonb>,
    fcinfo: pg_sys::FunctionCallInfo,
) {
    // SAFETY: our own fcinfo; the SQL above declares rows of these types.
    let row = unsafe { OneRow::begin(fcinfo, &ISSUED_ROW_TYPES) };
    let result = required(user_id, "user_id").and_then(|user_id| {
        let options = issue_options(name, expires_in, scopes, metadata)?;
        let new = NewKey {
            name,
            expires_at: options.expires_at,
            scopes: options.scopes,
            metadata: options.metadata,
        };
        issue(
            &unsafe { Store::for_call(fcinfo) },
            user_id,
            new,
            "mk_issue_key",
        )
    });
    match result {
        Ok(issued) => issued.into_row(row),
        Err(e) => e.raise("mk_issue_key"),
    }
}

/// Ends the user's live keys (the active one after `grace`) and issues a new
/// one, in one statement. Options not given are taken from the active key,
/// so a rotation never widens what a key may do.
///
/// The SQL is written out for the reason given at `mk_issue_key_v2`.
#[pg_extern(sql = r#"
CREATE FUNCTION "mk_rotate_key"(
	"user_id" uuid,
	"name" TEXT DEFAULT NULL,
	"expires_in" interval DEFAULT NULL,
	"scopes" TEXT[] DEFAULT NULL,
	"metadata" jsonb DEFAULT NULL,
	"grace" interval DEFAULT NULL
) RETURNS TABLE (
	"id" uuid,
	"key" TEXT,
	"key_prefix" TEXT,
	"created_at" timestamp with time zone
)
VOLATILE SECURITY DEFINER PARALLEL UNSAFE
SET search_path TO pg_catalog, pg_temp
LANGUAGE c
AS 'MODULE_PATHNAME', 'mk_rotate_key_v2_wrapper';
"#)]
fn mk_rotate_key_v2(
    user_id: Option<pgrx::Uuid>,
    name: Option<&str>,
    expires_in: Option<Interval>,
    scopes: Option<Array<&str>>,
    metadata: Option<StoredJsonb>,
    grace: Option<Interval>,
    fcinfo: pg_sys::FunctionCallInfo,
) {
    // SAFETY: our own fcinfo; the SQL above declares rows of these types.
    let row = unsafe { OneRow::begin(fcinfo, &ISSUED_ROW_TYPES) };
    let result = required(user_id, "user_id").and_then(|user_id| {
        let options = issue_options(name, expires_in, scopes, metadata)?;
        let grace = grace_period(grace)?;
        let store = unsafe { Store::for_call(fcinfo) };
        let active = store.end_user_keys_inheriting(user_id, grace);
        let new = match active {
            None => NewKey {
                name,
                expires_at: options.expires_at,
                scopes: options.scopes,
                metadata: options.metadata,
            },
            Some(active) => NewKey {
                name,
                expires_at: options.expires_at.or_else(|| {
                    active.lifetime.map(|lifetime| {
                        let start = pg_sys::TimestampTz::from(transaction_start());
                        TimestampWithTimeZone::try_from(start.saturating_add(lifetime))
                            .unwrap_or_else(|_| TimestampWithTimeZone::positive_infinity())
                    })
                }),
                scopes: options.scopes.or(active.scopes),
                metadata: options.metadata.or(active.metadata),
            },
        };
        issue(&store, user_id, new, "mk_rotate_key")
    });
    match result {
        Ok(issued) => issued.into_row(row),
        Err(e) => e.raise("mk_rotate_key"),
    }
}

/// What a verification found; `Malformed` and `NotFound` carry no row.
enum Verdict {
    Malformed,
    NotFound,
    Found(store::FoundKey, KeyStatus),
}

fn verify_key(
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
    let store = unsafe { Store::for_call(fcinfo) };
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
        unsafe { pg_sys::GetCurrentTimestamp() }
    } else {
        0
    };
    let scopes_ok = policy::satisfies(found.scopes.as_deref(), requirement);
    let status = policy::status(found.revoked_at, found.expires_at, now, scopes_ok);
    if status == KeyStatus::Valid
        && last_used_due(found.last_used_at)
        && store::may_write_last_used()
    {
        store.touch_last_used(found.id);
    }
    Verdict::Found(found, status)
}

/// `last_used_at` is NULL or older than the configured interval before now().
fn last_used_due(last_used_at: Option<policy::Micros>) -> bool {
    last_used_at.is_none_or(|last_used| {
        let now = unsafe { pg_sys::GetCurrentTransactionStartTimestamp() };
        let interval = i64::from(settings::last_used_interval_secs()) * 1_000_000;
        last_used <= now - interval
    })
}

fn verified_user(verdict: Verdict) -> Option<pgrx::Uuid> {
    match verdict {
        Verdict::Found(found, KeyStatus::Valid) => Some(found.user_id),
        _ => None,
    }
}

/// The user id of a live key; NULL for anything else. Never raises for any text.
///
/// SECURITY INVOKER on purpose: see `store::with_owner_rights`. The probe
/// resolves no names and the statements it may run get the owner's rights
/// and a pinned search_path there.
#[pg_extern(name = "mk_verify", volatile, parallel_unsafe)]
fn mk_verify_v2(key: Option<&str>, fcinfo: pg_sys::FunctionCallInfo) -> Option<pgrx::Uuid> {
    verified_user(verify_key(fcinfo, key, Requirement::None, false))
}

/// Collects a `text[]` of required scopes; NULL stays "unknown".
fn with_requirement<R>(
    required_scopes: Option<Array<'_, &str>>,
    f: impl FnOnce(Requirement<'_>) -> R,
) -> R {
    match required_scopes {
        None => f(Requirement::Unknown),
        Some(array) => {
            let wanted: Vec<Option<&str>> = array.iter().collect();
            f(Requirement::All(&wanted))
        }
    }
}

/// The user id of a live key that holds every scope in `required_scopes`;
/// NULL for anything else. Never raises for any text.
/// SECURITY INVOKER for the same reason as `mk_verify(text)`.
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

type DetailRow = (
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

fn detail_row(verdict: Verdict) -> DetailRow {
    let timestamp =
        |t: Option<policy::Micros>| t.and_then(|t| TimestampWithTimeZone::try_from(t).ok());
    match verdict {
        Verdict::Malformed => (
            "malformed".into(),
            None,
            None,
            None,
            None,
            None,
            None,
            None,
            None,
        ),
        Verdict::NotFound => (
            "not_found".into(),
            None,
            None,
            None,
            None,
            None,
            None,
            None,
            None,
        ),
        Verdict::Found(found, status) => (
            status.as_str().into(),
            Some(found.id),
            Some(found.user_id),
            found.key_prefix,
            found.name,
            timestamp(found.expires_at),
            timestamp(found.revoked_at),
            found.scopes,
            found.metadata,
        ),
    }
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
///
/// The SQL is written out for the reason given at `mk_issue_key_v2`.
#[pg_extern(sql = r#"
CREATE FUNCTION "mk_verify_detail"(
	"key" TEXT
) RETURNS TABLE (
	"status" TEXT,
	"key_id" uuid,
	"user_id" uuid,
	"key_prefix" TEXT,
	"name" TEXT,
	"expires_at" timestamp with time zone,
	"revoked_at" timestamp with time zone,
	"scopes" TEXT[],
	"metadata" jsonb
)
VOLATILE SECURITY DEFINER PARALLEL UNSAFE
SET search_path TO pg_catalog, pg_temp
LANGUAGE c
AS 'MODULE_PATHNAME', 'mk_verify_detail_v2_wrapper';
"#)]
fn mk_verify_detail_v2(key: Option<&str>, fcinfo: pg_sys::FunctionCallInfo) {
    // SAFETY: our own fcinfo; the SQL above declares rows of these types.
    let row = unsafe { OneRow::begin(fcinfo, &DETAIL_ROW_TYPES) };
    put_detail_row(
        row,
        detail_row(verify_key(fcinfo, key, Requirement::None, true)),
    );
}

/// As `mk_verify_detail(key)`, with status `insufficient_scope` for a live
/// key that lacks one of `required_scopes`.
#[pg_extern(sql = r#"
CREATE FUNCTION "mk_verify_detail"(
	"key" TEXT,
	"required_scopes" TEXT[]
) RETURNS TABLE (
	"status" TEXT,
	"key_id" uuid,
	"user_id" uuid,
	"key_prefix" TEXT,
	"name" TEXT,
	"expires_at" timestamp with time zone,
	"revoked_at" timestamp with time zone,
	"scopes" TEXT[],
	"metadata" jsonb
)
VOLATILE SECURITY DEFINER PARALLEL UNSAFE
SET search_path TO pg_catalog, pg_temp
LANGUAGE c
AS 'MODULE_PATHNAME', 'mk_verify_detail_scoped_wrapper';
"#)]
fn mk_verify_detail_scoped(
    key: Option<&str>,
    required_scopes: Option<Array<&str>>,
    fcinfo: pg_sys::FunctionCallInfo,
) {
    // SAFETY: our own fcinfo; the SQL above declares rows of these types.
    let row = unsafe { OneRow::begin(fcinfo, &DETAIL_ROW_TYPES) };
    let detail = with_requirement(required_scopes, |requirement| {
        detail_row(verify_key(fcinfo, key, requirement, true))
    });
    put_detail_row(row, detail);
}

/// True when this call ended a live key, false when it had already ended.
#[pg_extern(name = "mk_revoke", security_definer, volatile, parallel_unsafe)]
#[search_path(pg_catalog, pg_temp)]
fn mk_revoke_v2(id: Option<pgrx::Uuid>, fcinfo: pg_sys::FunctionCallInfo) -> bool {
    let result = required(id, "id").and_then(|id| unsafe { Store::for_call(fcinfo) }.revoke(id));
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
    let result = required(user_id, "user_id")
        .map(|user_id| unsafe { Store::for_call(fcinfo) }.end_user_keys(user_id, None));
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
            unsafe { Store::for_call(fcinfo) }.revoke_by_hash(&hash_key(key))
        }
        _ => false,
    }
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

/// The 0.1.0 C symbols of functions that changed in 0.2.0. A database at
/// 0.1.0 calls them until ALTER EXTENSION makima_keys UPDATE; they keep the
/// 0.1.0 arguments and result columns, use only the 0.1.0 columns and send
/// no revocation events. Their return types are spelled out like those of
/// the functions with SQL: pgrx resolves them even with `sql = false`, and
/// refuses a type alias.
mod v0_1_0 {
    use super::*;

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
            let store = unsafe { Store::for_call(fcinfo) }.without_events();
            issue(&store, user_id, plain_key(name), "mk_issue_key").map(Issued::into_table)
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
            let store = unsafe { Store::for_call(fcinfo) }.without_events();
            store.end_user_keys(user_id, None);
            issue(&store, user_id, plain_key(name), "mk_rotate_key").map(Issued::into_table)
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
        let (status, key_id, user_id, key_prefix, name, ..) =
            detail_row(verify_key(fcinfo, key, Requirement::None, true));
        TableIterator::once((status, key_id, user_id, key_prefix, name))
    }

    #[pg_extern(sql = false)]
    fn mk_verify(key: Option<&str>, fcinfo: pg_sys::FunctionCallInfo) -> Option<pgrx::Uuid> {
        verified_user(verify_key(fcinfo, key, Requirement::None, false))
    }

    // 0.1.0 sent no events: a revoking transaction could be prepared (2PC).
    #[pg_extern(sql = false)]
    fn mk_revoke(id: Option<pgrx::Uuid>, fcinfo: pg_sys::FunctionCallInfo) -> bool {
        let result = required(id, "id").and_then(|id| {
            unsafe { Store::for_call(fcinfo) }
                .without_events()
                .revoke(id)
        });
        result.unwrap_or_else(|e| e.raise("mk_revoke"))
    }

    #[pg_extern(sql = false)]
    fn mk_revoke_user_keys(user_id: Option<pgrx::Uuid>, fcinfo: pg_sys::FunctionCallInfo) -> i32 {
        let result = required(user_id, "user_id").map(|user_id| {
            unsafe { Store::for_call(fcinfo) }
                .without_events()
                .end_user_keys(user_id, None)
        });
        result.unwrap_or_else(|e| e.raise("mk_revoke_user_keys"))
    }
}
