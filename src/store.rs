//! The only module that touches `api_keys`.
//!
//! Every statement names the table with its schema: our functions run with
//! `search_path = pg_catalog, pg_temp`, so an unqualified name could resolve
//! to a caller's temporary table. Values are always bound parameters.
//!
//! Kept plans use only the 0.1.0 columns, because this library also serves
//! databases still at 0.1.0 (between installing the package and ALTER
//! EXTENSION UPDATE). Statements that need the 0.2.0 columns are prepared
//! when used, by 0.2.0 functions only.

use std::cell::{Cell, RefCell};
use std::panic::AssertUnwindSafe;
use std::rc::Rc;

use pgrx::datum::DatumWithOid;
use pgrx::oids_of;
use pgrx::prelude::*;
use pgrx::spi::{OwnedPreparedStatement, SpiClient, SpiHeapTupleData};
use pgrx::PgSqlErrorCode;

use crate::error::{KeyError, KeyResult};
use crate::index_probe::{self, ReadSnapshot};
use crate::jsonb::StoredJsonb;
use crate::own_table::{self, STATEMENT_MARK};
use crate::policy::Micros;

/// Channel of the revocation events; the payload is the key id.
pub const REVOKED_CHANNEL: &str = "makima_keys_revoked";

/// What a lookup should read beyond the columns every verification needs.
#[derive(Debug, Clone, Copy)]
pub struct Reading {
    /// `key_prefix`, `name` and `metadata`, which only mk_verify_detail shows.
    pub labels: bool,
    /// `scopes`, for the forms that take required scopes.
    pub scopes: bool,
}

/// A row found by hash. Timestamps are PostgreSQL's microseconds.
pub struct FoundKey {
    pub id: pgrx::Uuid,
    pub user_id: pgrx::Uuid,
    pub key_prefix: Option<String>,
    pub name: Option<String>,
    pub last_used_at: Option<Micros>,
    pub revoked_at: Option<Micros>,
    pub expires_at: Option<Micros>,
    /// Read only when asked for; `None` also means "unrestricted".
    pub scopes: Option<Vec<String>>,
    pub metadata: Option<StoredJsonb>,
}

pub struct IssuedRow {
    pub id: pgrx::Uuid,
    pub created_at: TimestampWithTimeZone,
}

/// What a new key carries besides its hash and prefix (0.2.0 options).
pub struct NewKey<'a> {
    pub name: Option<&'a str>,
    pub expires_at: Option<TimestampWithTimeZone>,
    pub scopes: Option<Vec<String>>,
    pub metadata: Option<StoredJsonb>,
}

impl NewKey<'_> {
    fn has_options(&self) -> bool {
        self.expires_at.is_some() || self.scopes.is_some() || self.metadata.is_some()
    }
}

/// The user's active key, as a rotation inherits from it.
pub struct ActiveKey {
    pub scopes: Option<Vec<String>>,
    pub metadata: Option<StoredJsonb>,
    /// `expires_at - created_at`, when it expires.
    pub lifetime: Option<Micros>,
}

/// Plans kept for the life of the backend, or until a schema changes: the
/// last_used_at write and issuing.
struct KeptPlans {
    namespace: pg_sys::Oid,
    touch: OwnedPreparedStatement,
    insert: OwnedPreparedStatement,
}

thread_local! {
    // Borrowed only to take an `Rc`: the plans run with no borrow held, so a
    // statement that ends up calling mk_verify again cannot find it borrowed.
    static KEPT_PLANS: RefCell<Option<Rc<KeptPlans>>> = const { RefCell::new(None) };
    /// Set by any change to pg_namespace: the kept plans name the schema,
    /// so after a rename they are prepared again with the new name.
    static SCHEMAS_CHANGED: Cell<bool> = const { Cell::new(false) };
    static NAMESPACE_CALLBACK_REGISTERED: Cell<bool> = const { Cell::new(false) };
}

#[pg_guard]
unsafe extern "C-unwind" fn forget_kept_plans(
    _arg: pg_sys::Datum,
    _cache: std::ffi::c_int,
    _hash: u32,
) {
    // Only a flag: the plans may be running right now.
    SCHEMAS_CHANGED.set(true);
}

/// A live key: not revoked, or revoked with a date still ahead (grace period).
const LIVE: &str = "(revoked_at IS NULL OR revoked_at > pg_catalog.clock_timestamp())";

/// `api_keys` in the schema of the calling function, which is the
/// extension's schema because the extension is not relocatable.
pub struct Store {
    namespace: pg_sys::Oid,
    owner: pg_sys::Oid,
    /// Whether revocations send `makima_keys_revoked` events (not for the
    /// 0.1.0 entry points, which never did).
    events: bool,
}

/// What a call needs to know about the function it runs in.
#[derive(Clone, Copy)]
struct CalledFunction {
    oid: pg_sys::Oid,
    namespace: pg_sys::Oid,
    owner: pg_sys::Oid,
}

/// Functions remembered per backend: enough for a session that alternates
/// between the verification functions.
const REMEMBERED_FUNCTIONS: usize = 4;

thread_local! {
    /// The last functions asked about: every call of mk_verify asks, and a
    /// pg_proc lookup costs a tenth of the index probe.
    static CALLED_FUNCTIONS: Cell<[Option<CalledFunction>; REMEMBERED_FUNCTIONS]> =
        const { Cell::new([None; REMEMBERED_FUNCTIONS]) };
    static NEXT_SLOT: Cell<usize> = const { Cell::new(0) };
    static PROC_CALLBACK_REGISTERED: Cell<bool> = const { Cell::new(false) };
}

/// Any change to pg_proc (ALTER FUNCTION ... OWNER TO, SET SCHEMA, ...) forgets it.
#[pg_guard]
unsafe extern "C-unwind" fn forget_called_function(
    _arg: pg_sys::Datum,
    _cache: std::ffi::c_int,
    _hash: u32,
) {
    CALLED_FUNCTIONS.with(|cached| cached.set([None; REMEMBERED_FUNCTIONS]));
}

unsafe fn called_function(fn_oid: pg_sys::Oid) -> CalledFunction {
    if !PROC_CALLBACK_REGISTERED.get() {
        pg_sys::CacheRegisterSyscacheCallback(
            pg_sys::SysCacheIdentifier::PROCOID as std::ffi::c_int,
            Some(forget_called_function),
            pg_sys::Datum::from(0),
        );
        PROC_CALLBACK_REGISTERED.set(true);
    }
    if let Some(cached) = CALLED_FUNCTIONS
        .get()
        .into_iter()
        .flatten()
        .find(|f| f.oid == fn_oid)
    {
        return cached;
    }
    let tuple = pg_sys::SearchSysCache1(
        pg_sys::SysCacheIdentifier::PROCOID as std::ffi::c_int,
        pg_sys::Datum::from(fn_oid),
    );
    assert!(!tuple.is_null(), "the called function exists");
    let form = pg_sys::heap_tuple_get_struct::<pg_sys::FormData_pg_proc>(tuple);
    let found = CalledFunction {
        oid: fn_oid,
        namespace: (*form).pronamespace,
        owner: (*form).proowner,
    };
    pg_sys::ReleaseSysCache(tuple);
    let slot = NEXT_SLOT.get();
    let mut remembered = CALLED_FUNCTIONS.get();
    remembered[slot] = Some(found);
    CALLED_FUNCTIONS.set(remembered);
    NEXT_SLOT.set((slot + 1) % REMEMBERED_FUNCTIONS);
    found
}

/// Runs `f` (which executes SQL) as the function's owner with
/// `search_path = pg_catalog, pg_temp`: what SECURITY DEFINER and a pinned
/// search_path do for a whole call, for just the statements that need it.
///
/// The verification functions are SECURITY INVOKER so that their usual
/// path, an index probe that resolves no names and needs no privilege
/// check, does not pay for a search_path change on every call (about a
/// tenth of a verification). Only the last_used_at write and the SQL
/// fallback run statements, and they run them here. If `f` raises, the
/// (sub)transaction abort restores the user id and the setting, as it does
/// for SECURITY DEFINER.
fn with_owner_rights<R>(owner: pg_sys::Oid, f: impl FnOnce() -> R) -> R {
    unsafe {
        let mut saved_user = pg_sys::InvalidOid;
        let mut saved_context: std::ffi::c_int = 0;
        pg_sys::GetUserIdAndSecContext(&mut saved_user, &mut saved_context);
        pg_sys::SetUserIdAndSecContext(
            owner,
            saved_context | pg_sys::SECURITY_LOCAL_USERID_CHANGE as std::ffi::c_int,
        );
        let nest_level = pg_sys::NewGUCNestLevel();
        pg_sys::set_config_option(
            c"search_path".as_ptr(),
            c"pg_catalog, pg_temp".as_ptr(),
            pg_sys::GucContext::PGC_USERSET,
            pg_sys::GucSource::PGC_S_SESSION,
            pg_sys::GucAction::GUC_ACTION_SAVE,
            true,
            0,
            false,
        );
        let result = f();
        pg_sys::AtEOXact_GUC(true, nest_level);
        pg_sys::SetUserIdAndSecContext(saved_user, saved_context);
        result
    }
}

impl Store {
    /// # Safety
    /// `fcinfo` must be the call's own, valid `FunctionCallInfo`.
    pub unsafe fn for_call(fcinfo: pg_sys::FunctionCallInfo) -> Store {
        let function = called_function((*(*fcinfo).flinfo).fn_oid);
        Store {
            namespace: function.namespace,
            owner: function.owner,
            events: true,
        }
    }

    /// The same store, sending no revocation events.
    pub fn without_events(self) -> Store {
        Store {
            events: false,
            ..self
        }
    }

    /// Sends one `makima_keys_revoked` event per key id (if this store
    /// sends events); returns the count.
    fn announce_revoked(
        &self,
        ids: impl Iterator<Item = pgrx::spi::SpiResult<Option<pgrx::Uuid>>>,
    ) -> i32 {
        let mut count = 0;
        for id in ids {
            let id = id.expect("key id").expect("key id is not null");
            if self.events {
                announce(id);
            }
            count += 1;
        }
        count
    }

    /// `template` with `{api_keys}` replaced by the quoted, schema-qualified
    /// table name and `{live}` by the live-key condition. Not on the verify
    /// path, which probes the index directly and only prepares the kept
    /// plans on its first write or fallback.
    fn sql(&self, template: &str) -> String {
        let schema =
            unsafe { std::ffi::CStr::from_ptr(pg_sys::get_namespace_name(self.namespace)) };
        let table = format!(
            "{}.api_keys",
            pgrx::spi::quote_identifier(schema.to_string_lossy())
        );
        let statement = template
            .replace("{api_keys}", &table)
            .replace("{live}", LIVE);
        format!("{STATEMENT_MARK}{statement}")
    }

    /// The oid of `api_keys` in our schema, found by the schema's oid (never
    /// by its name); `InvalidOid` if there is none.
    fn table(&self) -> pg_sys::Oid {
        unsafe { pg_sys::get_relname_relid(c"api_keys".as_ptr(), self.namespace) }
    }

    /// `Spi::connect_mut`, with the statements it runs held to our table
    /// (see `own_table`).
    fn connect<R>(&self, f: impl FnOnce(&mut SpiClient<'_>) -> R) -> R {
        connect_to(self.table(), f)
    }

    fn with_kept_plans<R>(
        &self,
        client: &mut SpiClient<'_>,
        f: impl FnOnce(&mut SpiClient<'_>, &KeptPlans) -> R,
    ) -> R {
        if !NAMESPACE_CALLBACK_REGISTERED.get() {
            unsafe {
                pg_sys::CacheRegisterSyscacheCallback(
                    pg_sys::SysCacheIdentifier::NAMESPACEOID as std::ffi::c_int,
                    Some(forget_kept_plans),
                    pg_sys::Datum::from(0),
                );
            }
            NAMESPACE_CALLBACK_REGISTERED.set(true);
        }
        if SCHEMAS_CHANGED.replace(false) {
            KEPT_PLANS.with(|cell| *cell.borrow_mut() = None);
        }
        let kept = KEPT_PLANS.with(|cell| {
            cell.borrow()
                .as_ref()
                .filter(|p| p.namespace == self.namespace)
                .cloned()
        });
        let plans = match kept {
            Some(plans) => plans,
            None => {
                // SKIP LOCKED: a verification never waits for a row lock; if
                // someone holds the row, the timestamp simply is not written.
                // The locked row is joined in FROM, not a sublink: see own_table.
                let touch = client
                    .prepare_mut(
                        &self.sql(
                            "UPDATE {api_keys} k SET last_used_at = pg_catalog.now()
                               FROM (SELECT id FROM {api_keys}
                                      WHERE id = $1 AND {live}
                                      FOR NO KEY UPDATE SKIP LOCKED) locked
                              WHERE k.id = locked.id",
                        ),
                        &oids_of![pgrx::Uuid],
                    )
                    .expect("prepare last_used_at update")
                    .keep();
                let insert = client
                    .prepare_mut(
                        &self.sql(
                            "INSERT INTO {api_keys} (user_id, key_hash, key_prefix, name)
                             VALUES ($1, $2, $3, $4)
                             RETURNING id, created_at",
                        ),
                        &oids_of![pgrx::Uuid, String, String, String],
                    )
                    .expect("prepare key insert")
                    .keep();
                let plans = Rc::new(KeptPlans {
                    namespace: self.namespace,
                    touch,
                    insert,
                });
                KEPT_PLANS.with(|cell| *cell.borrow_mut() = Some(Rc::clone(&plans)));
                plans
            }
        };
        f(client, &plans)
    }

    /// Finds the row whose `key_hash` is `hash`, live or not.
    pub fn find_by_hash(&self, hash: &str, reading: Reading) -> Option<FoundKey> {
        if let Some(found) = index_probe::find_by_hash(self.namespace, hash, reading) {
            return found;
        }
        // The index is missing or not the one the install made: same answer
        // through the executor, only slower.
        with_owner_rights(self.owner, || self.find_by_hash_in_sql(hash, reading))
    }

    /// The lookup through the executor, reading with the same snapshot as
    /// the probe ([`ReadSnapshot`]). Prepared per call: it only serves a
    /// database whose index is missing or altered, and a kept plan would
    /// read with the transaction's snapshot.
    fn find_by_hash_in_sql(&self, hash: &str, reading: Reading) -> Option<FoundKey> {
        // k.*: the 0.2.0 columns when they exist, read by name.
        let sql = self.sql("SELECT k.* FROM {api_keys} k WHERE k.key_hash = $1 LIMIT 1");
        let sql = std::ffi::CString::new(sql).expect("no NUL in our SQL");
        self.connect(|_client| unsafe {
            let mut arg_types = [pg_sys::TEXTOID];
            let plan = pg_sys::SPI_prepare(sql.as_ptr(), 1, arg_types.as_mut_ptr());
            assert!(!plan.is_null(), "prepare key lookup");
            let snapshot = pg_sys::ffi::pg_guard_ffi_boundary(|| ReadSnapshot::take());
            let mut values = [hash.into_datum().expect("a text datum")];
            let nulls = [b' ' as std::ffi::c_char];
            let status = pg_sys::SPI_execute_snapshot(
                plan,
                values.as_mut_ptr(),
                nulls.as_ptr(),
                snapshot.get(),
                std::ptr::null_mut(),
                true,
                false,
                1,
            );
            assert_eq!(status, pg_sys::SPI_OK_SELECT as i32, "key lookup");
            let table = pg_sys::SPI_tuptable;
            // Read while the snapshot is active: values may be TOASTed.
            let found = ((*table).numvals > 0).then(|| {
                let row = pgrx::spi::SpiHeapTupleData::new((*table).tupdesc, *(*table).vals)
                    .expect("key row")
                    .expect("a row");
                found_from_row(&row, reading)
            });
            pg_sys::ffi::pg_guard_ffi_boundary(|| snapshot.release());
            found
        })
    }

    /// Sets `last_used_at = now()` unless another transaction holds the row.
    /// Skipped, never waited for, when the table, one of its indexes or its
    /// TOAST table is locked in a mode that conflicts with the write (a plain
    /// CREATE INDEX, LOCK TABLE ... IN SHARE MODE, a REINDEX of another index).
    pub fn touch_last_used(&self, id: pgrx::Uuid) {
        let table = self.table();
        if table == pg_sys::InvalidOid || !unsafe { lock_for_write_without_waiting(table) } {
            return;
        }
        with_owner_rights(self.owner, || {
            connect_to(table, |client| {
                self.with_kept_plans(client, |client, plans| {
                    client
                        .update(&plans.touch, None, &[id.into()])
                        .expect("last_used_at update");
                })
            })
        })
    }

    /// Inserts a new active key. If the user already has one, raises
    /// `KeyError::ActiveKeyExists` for `function`.
    ///
    /// The seed's partial unique index decides, also between concurrent
    /// callers (the later one waits for the earlier one's transaction). A
    /// plain INSERT costs a tenth less than INSERT ... ON CONFLICT DO NOTHING,
    /// which probes the index once more and takes a speculative-insertion
    /// lock. Its unique violation is turned into our error at once, inside
    /// the handler, so nothing runs on the failed statement's state. Every
    /// unique violation of this INSERT is that one: the other unique indexes
    /// are on a random uuid and on the SHA-256 of 256 random bits.
    pub fn insert_active(
        &self,
        user_id: pgrx::Uuid,
        key_hash: &str,
        key_prefix: &str,
        new: NewKey<'_>,
        function: &'static str,
    ) -> IssuedRow {
        let insert = AssertUnwindSafe(|| self.insert_row(user_id, key_hash, key_prefix, new));
        PgTryBuilder::new(insert)
            .catch_when(PgSqlErrorCode::ERRCODE_UNIQUE_VIOLATION, |_| {
                KeyError::ActiveKeyExists {
                    user_id: crate::api::to_uuid(user_id),
                }
                .raise(function)
            })
            .execute()
    }

    fn insert_row(
        &self,
        user_id: pgrx::Uuid,
        key_hash: &str,
        key_prefix: &str,
        new: NewKey<'_>,
    ) -> IssuedRow {
        self.connect(|client| {
            if new.has_options() {
                let args: [DatumWithOid; 7] = [
                    user_id.into(),
                    key_hash.into(),
                    key_prefix.into(),
                    new.name.into(),
                    new.expires_at.into(),
                    new.scopes.into(),
                    new.metadata.into(),
                ];
                let table = client
                    .update(
                        &self.sql(
                            "INSERT INTO {api_keys}
                                    (user_id, key_hash, key_prefix, name, expires_at, scopes, metadata)
                             VALUES ($1, $2, $3, $4, $5, $6, $7)
                             RETURNING id, created_at",
                        ),
                        None,
                        &args,
                    )
                    .expect("insert key");
                issued_row(table)
            } else {
                let args: [DatumWithOid; 4] = [
                    user_id.into(),
                    key_hash.into(),
                    key_prefix.into(),
                    new.name.into(),
                ];
                self.with_kept_plans(client, |client, plans| {
                    issued_row(
                        client
                            .update(&plans.insert, None, &args)
                            .expect("insert key"),
                    )
                })
            }
        })
    }

    /// Ends the user's live keys as [`Store::end_user_keys`] does, and returns
    /// what the active one held, for the rotation to pass on. 0.2.0 only.
    ///
    /// One statement, so that two rotations racing behave as in 0.1.0: the
    /// second waits for the first's row lock, then finds nothing live in its
    /// snapshot, and its insert meets the first's new key (23505).
    pub fn end_user_keys_inheriting(
        &self,
        user_id: pgrx::Uuid,
        grace: Option<Interval>,
    ) -> Option<ActiveKey> {
        let grace = grace.unwrap_or_else(|| Interval::from_micros(0));
        self.connect(|client| {
            // Joined to itself: `old` shows the row as it was before this update.
            let ended = client
                .update(
                    &self.sql(
                        "UPDATE {api_keys} k
                            SET revoked_at = LEAST(COALESCE(k.revoked_at, 'infinity'),
                                                   pg_catalog.now() + $2)
                           FROM {api_keys} old
                          WHERE old.id = k.id AND k.user_id = $1
                            AND (k.revoked_at IS NULL OR k.revoked_at > pg_catalog.clock_timestamp())
                          RETURNING k.id, old.revoked_at IS NULL, k.scopes, k.metadata,
                                    k.expires_at, k.created_at",
                    ),
                    None,
                    &[user_id.into(), grace.into()],
                )
                .expect("revoke user keys");
            let mut active = None;
            let mut ids = Vec::new();
            for row in ended {
                ids.push(row.get::<pgrx::Uuid>(1));
                if row.get::<bool>(2).expect("was active") == Some(true) {
                    let scopes: Option<Vec<Option<String>>> = row.get(3).expect("scopes");
                    let expires_at: Option<TimestampWithTimeZone> = row.get(5).expect("expires_at");
                    let created_at: Option<TimestampWithTimeZone> = row.get(6).expect("created_at");
                    active = Some(ActiveKey {
                        scopes: scopes.map(|s| s.into_iter().flatten().collect()),
                        metadata: row.get(4).expect("metadata"),
                        lifetime: expires_at.zip(created_at).map(|(e, c)| {
                            pg_sys::TimestampTz::from(e) - pg_sys::TimestampTz::from(c)
                        }),
                    });
                }
            }
            self.announce_revoked(ids.into_iter());
            active
        })
    }

    /// Ends every live key of `user_id`: at `now() + grace` for the active
    /// key, and no later than that for keys already in a grace period.
    /// Sends a revocation event for each; returns how many it ended.
    pub fn end_user_keys(&self, user_id: pgrx::Uuid, grace: Option<Interval>) -> i32 {
        let grace = grace.unwrap_or_else(|| Interval::from_micros(0));
        self.connect(|client| {
            let table = client
                .update(
                    &self.sql(
                        "UPDATE {api_keys}
                            SET revoked_at = LEAST(COALESCE(revoked_at, 'infinity'),
                                                   pg_catalog.now() + $2)
                          WHERE user_id = $1 AND {live}
                          RETURNING id",
                    ),
                    None,
                    &[user_id.into(), grace.into()],
                )
                .expect("revoke user keys");
            self.announce_revoked(table.map(|row| row.get::<pgrx::Uuid>(1)))
        })
    }

    /// Sets `revoked_at = now()` on the live keys whose `column` equals `value`
    /// and announces each; returns how many.
    fn revoke_where(
        &self,
        client: &mut SpiClient<'_>,
        column: &str,
        value: DatumWithOid<'_>,
    ) -> i32 {
        let revoked = client
            .update(
                &self.sql(&format!(
                    "UPDATE {{api_keys}} SET revoked_at = pg_catalog.now()
                      WHERE {column} = $1 AND {{live}}
                      RETURNING id"
                )),
                None,
                &[value],
            )
            .expect("revoke key");
        self.announce_revoked(revoked.map(|row| row.get::<pgrx::Uuid>(1)))
    }

    /// `Ok(true)` if this call ended a live key, `Ok(false)` if it had ended.
    pub fn revoke(&self, id: pgrx::Uuid) -> KeyResult<bool> {
        self.connect(|client| {
            if self.revoke_where(client, "id", id.into()) > 0 {
                return Ok(true);
            }
            let exists = client
                .select(
                    &self.sql("SELECT 1 FROM {api_keys} WHERE id = $1"),
                    Some(1),
                    &[id.into()],
                )
                .expect("find key");
            if exists.is_empty() {
                Err(KeyError::KeyNotFound {
                    id: crate::api::to_uuid(id),
                })
            } else {
                Ok(false)
            }
        })
    }

    /// Ends the live key stored under `hash`; true if there was one.
    pub fn revoke_by_hash(&self, hash: &str) -> bool {
        self.connect(|client| self.revoke_where(client, "key_hash", hash.into()) > 0)
    }
}

/// `Spi::connect_mut`, with the statements it runs held to `table`, the
/// oid of our `api_keys` (see `own_table`).
fn connect_to<R>(table: pg_sys::Oid, f: impl FnOnce(&mut SpiClient<'_>) -> R) -> R {
    let _expecting = own_table::expect(table);
    Spi::connect_mut(f)
}

/// The row an `INSERT ... RETURNING id, created_at` made.
fn issued_row(table: pgrx::spi::SpiTupleTable<'_>) -> IssuedRow {
    let row = table.first();
    IssuedRow {
        id: row.get(1).expect("id").expect("id is not null"),
        created_at: row
            .get(2)
            .expect("created_at")
            .expect("created_at is not null"),
    }
}

/// A lookup row read by column name; 0.2.0 columns may be absent.
fn found_from_row(row: &SpiHeapTupleData<'_>, reading: Reading) -> FoundKey {
    // A missing column is one this database does not have yet (0.1.0); any
    // other problem, such as a column whose type was changed, must not read
    // as "no expiry" or "unrestricted": it fails the call.
    fn optional<T: IntoDatum + FromDatum>(row: &SpiHeapTupleData<'_>, column: &str) -> Option<T> {
        match row.get_by_name::<T, _>(column) {
            Ok(value) => value,
            Err(pgrx::spi::SpiError::SpiError(pgrx::spi::SpiErrorCodes::NoAttribute)) => None,
            Err(e) => panic!("api_keys.{column} is not what makima_keys expects: {e}"),
        }
    }
    let micros = |column: &str| {
        optional::<TimestampWithTimeZone>(row, column).map(pg_sys::TimestampTz::from)
    };
    FoundKey {
        id: optional(row, "id").expect("id is not null"),
        user_id: optional(row, "user_id").expect("user_id is not null"),
        key_prefix: optional(row, "key_prefix").filter(|_| reading.labels),
        name: optional(row, "name").filter(|_| reading.labels),
        last_used_at: micros("last_used_at"),
        revoked_at: micros("revoked_at"),
        expires_at: micros("expires_at"),
        scopes: optional::<Vec<Option<String>>>(row, "scopes")
            .filter(|_| reading.scopes)
            .map(|s| s.into_iter().flatten().collect()),
        metadata: optional(row, "metadata").filter(|_| reading.labels),
    }
}

/// `pg_notify('makima_keys_revoked', id)`: PostgreSQL delivers it when (and
/// only if) the transaction commits.
fn announce(id: pgrx::Uuid) {
    let payload = crate::api::to_uuid(id).to_string();
    unsafe {
        pgrx::direct_function_call_as_datum(
            pg_sys::pg_notify,
            &[REVOKED_CHANNEL.into_datum(), payload.as_str().into_datum()],
        );
    }
}

/// Whether this call may write `last_used_at`: never when the write could
/// raise or hold a row lock past the caller's statement.
///
/// - Not inside a transaction block (`BEGIN ... COMMIT`, or several
///   statements sent as one query string): the row lock of the write would
///   last until that transaction ends, and a revoke of the key would wait
///   for it while the key keeps verifying. Alone in its transaction, the
///   verification's statement is the whole transaction.
/// - Not in parallel mode, where PostgreSQL cannot assign a transaction id.
/// - Not read-only, not on a standby, and not under a transaction snapshot
///   (REPEATABLE READ or SERIALIZABLE), where touching a row another
///   session just touched would raise a serialization failure.
pub fn may_write_last_used() -> bool {
    unsafe {
        !pg_sys::IsTransactionBlock()
            && !pg_sys::IsInParallelMode()
            && !pg_sys::XactReadOnly
            && !pg_sys::RecoveryInProgress()
            && pg_sys::XactIsoLevel < pg_sys::XACT_REPEATABLE_READ as i32
    }
}

/// Takes `RowExclusiveLock` on `table`, its indexes, its TOAST table and
/// that table's index only if each is free at once; false (the write is
/// skipped) if any is not. The UPDATE then finds every lock it needs
/// already held, and waits for none. Locks taken stay until the transaction
/// ends, as the UPDATE's would.
unsafe fn lock_for_write_without_waiting(table: pg_sys::Oid) -> bool {
    unsafe { lock_with_indexes_without_waiting(table, true) }
}

unsafe fn lock_with_indexes_without_waiting(relation: pg_sys::Oid, with_toast: bool) -> bool {
    let mode = pg_sys::RowExclusiveLock as pg_sys::LOCKMODE;
    unsafe {
        if !pg_sys::ConditionalLockRelationOid(relation, mode) {
            return false;
        }
        let rel = pg_sys::try_relation_open(relation, pg_sys::NoLock as pg_sys::LOCKMODE);
        if rel.is_null() {
            return false;
        }
        let indexes = pgrx::PgList::<pg_sys::Oid>::from_pg(pg_sys::RelationGetIndexList(rel));
        let toast = (*(*rel).rd_rel).reltoastrelid;
        pg_sys::relation_close(rel, pg_sys::NoLock as pg_sys::LOCKMODE);
        indexes
            .iter_oid()
            .all(|index| pg_sys::ConditionalLockRelationOid(index, mode))
            && (!with_toast
                || toast == pg_sys::InvalidOid
                || lock_with_indexes_without_waiting(toast, false))
    }
}
