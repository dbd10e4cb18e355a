//! The only code that touches `api_keys`.
//!
//! - `Store` (here): the statements of issuing, revoking and the
//!   `last_used_at` write, with their kept plans and revocation events;
//! - [`probe`]: the verification's lookup, one probe of the `key_hash`
//!   index, with the SQL fallback here for a database whose index is
//!   missing or altered; both read with [`snapshot::ReadSnapshot`];
//! - [`row`]: the rows as Rust values; [`owner`]: whose rights our
//!   statements run with; [`own_table`]: the guard that holds them to our
//!   own table; [`write_lock`]: when `last_used_at` may be written.
//!
//! Every statement names the table with its schema: our functions run with
//! `search_path = pg_catalog, pg_temp`, so an unqualified name could resolve
//! to a caller's temporary table. Values are always bound parameters.
//!
//! Kept plans use only the 0.1.0 columns, because this library also serves
//! databases still at 0.1.0 (between installing the package and ALTER
//! EXTENSION UPDATE). Statements that need the 0.2.0 columns are prepared
//! when used, by 0.2.0 functions only.

mod own_table;
mod owner;
mod probe;
mod row;
mod snapshot;
mod unguarded;
mod write_lock;

use std::cell::{Cell, OnceCell, RefCell};
use std::panic::AssertUnwindSafe;
use std::rc::Rc;

use pgrx::datum::DatumWithOid;
use pgrx::oids_of;
use pgrx::prelude::*;
use pgrx::spi::{OwnedPreparedStatement, SpiClient};
use pgrx::PgSqlErrorCode;

use crate::clock::{self, timestamp_or_infinity};
use crate::error::{KeyError, KeyResult};
use crate::policy::{Micros, LIVE_SQL};
/// For the flush worker, whose statements the same guard holds to the table.
pub(crate) use own_table::{expect as expecting_own_table, STATEMENT_MARK};
use owner::{called_function, with_owner_rights};
use row::{found_from_row, inherited_from, issued_row};
pub(crate) use row::{ActiveKey, FoundKey, IssuedRow, NewKey, Reading};
use snapshot::ReadSnapshot;
use write_lock::lock_for_write_without_waiting;
pub(crate) use write_lock::{in_recovery, may_spend_credits, may_write_last_used};

/// Installs the analysis hook of [`own_table`]; once per backend, from `_PG_init`.
pub(crate) fn install_statement_guard() {
    own_table::install();
}

/// Channel of the revocation events; the payload is the key id.
const REVOKED_CHANNEL: &str = "makima_keys_revoked";
/// Channel of the events of a key whose credits a verification used up;
/// the payload is the key id.
const USAGE_CHANNEL: &str = "makima_keys_usage";

/// Plans kept for the life of the backend, or until a schema changes: the
/// last_used_at write and issuing.
struct KeptPlans {
    namespace: pg_sys::Oid,
    touch: OwnedPreparedStatement,
    insert: OwnedPreparedStatement,
    /// 0.3.0 statements, prepared on first use by a 0.3.0 function (their
    /// columns exist only from 0.3.0 on).
    spend: OnceCell<OwnedPreparedStatement>,
    insert_v3: OnceCell<OwnedPreparedStatement>,
    /// 0.4.0: the insert with the rate-limit columns.
    insert_v4: OnceCell<OwnedPreparedStatement>,
}

/// What spending needs to know of a due refill: the `refilled_at` it was
/// computed from and the one it moves to.
#[derive(Clone, Copy)]
pub(crate) struct DueRefill {
    pub(crate) from: Micros,
    pub(crate) to: Micros,
}

/// Which insert issuing runs.
#[derive(Clone, Copy)]
pub(crate) enum Insert {
    /// The 0.1.0 and 0.2.0 columns, for databases not yet at 0.3.0.
    Columns0_2,
    /// Every column; `end_expired`: an expired active key is ended first
    /// (0.3.0 mk_issue_key), instead of answering 23505.
    Columns0_3 { end_expired: bool },
    /// 0.4.0: every column, the rate limit too.
    Columns0_4 { end_expired: bool },
}

/// The outcome of a spend statement.
pub(crate) enum Spent {
    /// The credits left after this call.
    Left(i32),
    /// The row no longer satisfied the spend when its lock was had
    /// (revoked, expired, spent or refilled by another transaction).
    Changed,
    /// A lock on the table or an index was taken: not waited for.
    Unavailable,
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

/// `api_keys` in the schema of the calling function, which is the
/// extension's schema because the extension is not relocatable.
pub(crate) struct Store {
    namespace: pg_sys::Oid,
    owner: pg_sys::Oid,
    /// Whether revocations send `makima_keys_revoked` events (not for the
    /// 0.1.0 entry points, which never did).
    events: bool,
}

impl Store {
    /// # Safety
    /// `fcinfo` must be the call's own, valid `FunctionCallInfo`.
    pub(crate) unsafe fn for_call(fcinfo: pg_sys::FunctionCallInfo) -> Store {
        // SAFETY: the caller's contract.
        let function = called_function(unsafe { (*(*fcinfo).flinfo).fn_oid });
        Store {
            namespace: function.namespace,
            owner: function.owner,
            events: true,
        }
    }

    /// The same store, sending no revocation events.
    pub(crate) fn without_events(self) -> Store {
        Store {
            events: false,
            ..self
        }
    }

    /// Sends a revocation event for each key `ended` (its id and
    /// `expires_at`) and returns how many there were. A key that had already
    /// expired is left to the worker when it announces this database's keys
    /// that end by time (preloaded, since `from`): it announces each once.
    fn announce_revoked(
        &self,
        ended: impl Iterator<Item = (pgrx::Uuid, Option<TimestampWithTimeZone>)>,
    ) -> i32 {
        let worker_announces_from = crate::shared::expiries_announced_from();
        let now = clock::wall_clock();
        let mut count = 0;
        for (id, expires_at) in ended {
            let announced_by_worker =
                worker_announces_from
                    .zip(expires_at)
                    .is_some_and(|(from, at)| {
                        let at = pg_sys::TimestampTz::from(at);
                        at > from && at <= now
                    });
            if self.events && !announced_by_worker {
                announce(id);
            }
            count += 1;
        }
        count
    }

    /// `template` with `{api_keys}` replaced by the quoted, schema-qualified
    /// table name and `{live}` by the live-key condition (`{k.live}`: of
    /// the rows aliased `k`). Not on the verify
    /// path, which probes the index directly and only prepares the kept
    /// plans on its first write or fallback.
    fn sql(&self, template: &str) -> String {
        // SAFETY: our function's schema exists while the function runs.
        let schema =
            unsafe { std::ffi::CStr::from_ptr(pg_sys::get_namespace_name(self.namespace)) };
        let table = format!(
            "{}.api_keys",
            pgrx::spi::quote_identifier(schema.to_string_lossy())
        );
        let statement = template
            .replace("{api_keys}", &table)
            .replace("{live}", LIVE_SQL)
            .replace("{k.live}", &LIVE_SQL.replace("revoked_at", "k.revoked_at"));
        format!("{STATEMENT_MARK}{statement}")
    }

    /// The oid of `api_keys` in our schema, found by the schema's oid (never
    /// by its name); `InvalidOid` if there is none.
    fn table(&self) -> pg_sys::Oid {
        // SAFETY: a catalog lookup by name and schema oid.
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
            // SAFETY: registers a plain function for the life of the backend.
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
                    spend: OnceCell::new(),
                    insert_v3: OnceCell::new(),
                    insert_v4: OnceCell::new(),
                });
                KEPT_PLANS.with(|cell| *cell.borrow_mut() = Some(Rc::clone(&plans)));
                plans
            }
        };
        f(client, &plans)
    }

    /// Finds the row whose `key_hash` is `hash`, live or not.
    pub(crate) fn find_by_hash(&self, hash: &str, reading: Reading) -> Option<FoundKey> {
        if let Some(found) = probe::find_by_hash(self.namespace, hash, reading) {
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
        // SAFETY: SPI is connected; the snapshot is taken and released in
        // this call, and the row is read while it is active.
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
    pub(crate) fn touch_last_used(&self, id: pgrx::Uuid) {
        let table = self.table();
        // SAFETY: inside the verification's transaction, on our table's oid.
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

    /// Spends `cost` credits of key `id` in the caller's transaction, after
    /// the refill `refill` if one was due when the key was read. Waits for
    /// another transaction holding the row (so two can never both spend the
    /// last credit), never for a table or index lock. Also sets
    /// `last_used_at`. In REPEATABLE READ or SERIALIZABLE, a row changed
    /// since the transaction's snapshot raises 40001, as any UPDATE does.
    pub(crate) fn spend_credits(
        &self,
        id: pgrx::Uuid,
        cost: i32,
        refill: Option<DueRefill>,
    ) -> Spent {
        let table = self.table();
        // SAFETY: inside the verification's transaction, on our table's oid.
        if table == pg_sys::InvalidOid || !unsafe { lock_for_write_without_waiting(table) } {
            return Spent::Unavailable;
        }
        let from = refill.map(|r| timestamp_or_infinity(r.from));
        let to = refill.map(|r| timestamp_or_infinity(r.to));
        with_owner_rights(self.owner, || {
            connect_to(table, |client| {
                self.with_kept_plans(client, |client, plans| {
                    let spend = plans.spend.get_or_init(|| {
                        // $3: the refilled_at a due refill was computed from;
                        // if another transaction refilled first, its credits
                        // count instead. The key must still be live.
                        client
                            .prepare_mut(
                                &self.sql(
                                    "UPDATE {api_keys} k
                                        SET credits = CASE WHEN k.refilled_at = $3
                                                           THEN k.refill_amount
                                                           ELSE k.credits END - $2,
                                            refilled_at = CASE WHEN k.refilled_at = $3
                                                               THEN $4 ELSE k.refilled_at END,
                                            last_used_at = pg_catalog.now()
                                      WHERE k.id = $1 AND {k.live}
                                        AND (k.expires_at IS NULL
                                             OR k.expires_at > pg_catalog.clock_timestamp())
                                        AND CASE WHEN k.refilled_at = $3
                                                 THEN k.refill_amount
                                                 ELSE k.credits END >= $2
                                      RETURNING k.credits",
                                ),
                                &oids_of![
                                    pgrx::Uuid,
                                    i32,
                                    TimestampWithTimeZone,
                                    TimestampWithTimeZone
                                ],
                            )
                            .expect("prepare credit spend")
                            .keep()
                    });
                    let left = client
                        .update(
                            spend,
                            None,
                            &[id.into(), cost.into(), from.into(), to.into()],
                        )
                        .expect("credit spend");
                    match left.into_iter().next() {
                        Some(row) => Spent::Left(
                            row.get::<i32>(1)
                                .expect("credits")
                                .expect("credits is not null"),
                        ),
                        None => Spent::Changed,
                    }
                })
            })
        })
    }

    /// Sends `makima_keys_usage` for key `id`, whose last credit this call
    /// spent: delivered at commit, never after a rollback (which gives the
    /// credits back). The row lock of the spend makes this call the only one
    /// to cross to zero.
    pub(crate) fn announce_used_up(&self, id: pgrx::Uuid) {
        if self.events {
            notify(USAGE_CHANNEL, id);
        }
    }

    /// Ends the user's active key if it has expired (`revoked_at` = its
    /// `expires_at`), announcing it; true if there was one. Runs only after
    /// an insert met an active key, so it is prepared per call.
    fn end_expired_active(&self, client: &mut SpiClient<'_>, user_id: pgrx::Uuid) -> bool {
        let ended = client
            .update(
                &self.sql(
                    "UPDATE {api_keys} SET revoked_at = expires_at
                      WHERE user_id = $1 AND revoked_at IS NULL
                        AND expires_at <= pg_catalog.clock_timestamp()
                      RETURNING id, expires_at",
                ),
                None,
                &[user_id.into()],
            )
            .expect("end expired key");
        self.announce_revoked(ended.map(|row| {
            (
                row.get::<pgrx::Uuid>(1)
                    .expect("key id")
                    .expect("key id is not null"),
                row.get::<TimestampWithTimeZone>(2).expect("expires_at"),
            )
        })) > 0
    }

    /// The 0.3.0 insert (and with `rates`, the 0.4.0 one): every column, and
    /// ON CONFLICT DO NOTHING on the one-active-key-per-user index, so that
    /// meeting the user's active key leaves the transaction usable. `None`:
    /// the user has an active key.
    fn insert_v3(
        &self,
        client: &mut SpiClient<'_>,
        args: &[DatumWithOid<'_>],
        rates: bool,
    ) -> Option<IssuedRow> {
        self.with_kept_plans(client, |client, plans| {
            let cell = if rates {
                &plans.insert_v4
            } else {
                &plans.insert_v3
            };
            let insert = cell.get_or_init(|| {
                let (rate_columns, rate_values) = if rates {
                    (", rate_limit, rate_period", ", $12, $13")
                } else {
                    ("", "")
                };
                let mut types = oids_of![
                    pgrx::Uuid,
                    String,
                    String,
                    String,
                    TimestampWithTimeZone,
                    Vec<String>,
                    crate::jsonb::StoredJsonb,
                    i32,
                    i32,
                    Interval,
                    TimestampWithTimeZone
                ]
                .to_vec();
                if rates {
                    types.extend_from_slice(&oids_of![i32, Interval]);
                }
                // A key that refills starts its schedule now, or (rotation)
                // keeps the one of the key it replaces.
                client
                    .prepare_mut(
                        &self.sql(&format!(
                            "INSERT INTO {{api_keys}}
                                    (user_id, key_hash, key_prefix, name, expires_at, scopes,
                                     metadata, credits, refill_amount, refill_every, refilled_at
                                     {rate_columns})
                             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10,
                                     CASE WHEN $10::interval IS NOT NULL
                                          THEN COALESCE($11, pg_catalog.now()) END
                                     {rate_values})
                             ON CONFLICT (user_id) WHERE revoked_at IS NULL DO NOTHING
                             RETURNING id, created_at"
                        )),
                        &types,
                    )
                    .expect("prepare key insert")
                    .keep()
            });
            let inserted = client.update(insert, None, args).expect("insert key");
            (!inserted.is_empty()).then(|| issued_row(inserted))
        })
    }

    /// Inserts a new active key. If the user already has one, raises
    /// `KeyError::ActiveKeyExists` for `function`.
    ///
    /// The seed's partial unique index decides, also between concurrent
    /// callers (the later one waits for the earlier one's transaction). A
    /// plain INSERT costs less than INSERT ... ON CONFLICT DO NOTHING,
    /// which probes the index once more and takes a speculative-insertion
    /// lock. Its unique violation is turned into our error at once, inside
    /// the handler, so nothing runs on the failed statement's state. Every
    /// unique violation of this INSERT is that one: the other unique indexes
    /// are on a random uuid and on the SHA-256 of 256 random bits.
    pub(crate) fn insert_active(
        &self,
        user_id: pgrx::Uuid,
        key_hash: &str,
        key_prefix: &str,
        new: NewKey<'_>,
        how: Insert,
        function: &'static str,
    ) -> IssuedRow {
        let insert =
            AssertUnwindSafe(|| self.insert_row(user_id, key_hash, key_prefix, new, how, function));
        PgTryBuilder::new(insert)
            .catch_when(PgSqlErrorCode::ERRCODE_UNIQUE_VIOLATION, |_| {
                KeyError::ActiveKeyExists { user_id }.raise(function)
            })
            .execute()
    }

    fn insert_row(
        &self,
        user_id: pgrx::Uuid,
        key_hash: &str,
        key_prefix: &str,
        new: NewKey<'_>,
        how: Insert,
        function: &'static str,
    ) -> IssuedRow {
        self.connect(|client| {
            if let Insert::Columns0_3 { end_expired } | Insert::Columns0_4 { end_expired } = how {
                let rates = matches!(how, Insert::Columns0_4 { .. });
                let (refill_amount, refill_every) = new.refill.unzip();
                let (rate_limit, rate_period) = new.rate_limit.unzip();
                let mut args: Vec<DatumWithOid> = vec![
                    user_id.into(),
                    key_hash.into(),
                    key_prefix.into(),
                    new.name.into(),
                    new.expires_at.into(),
                    new.scopes.into(),
                    new.metadata.into(),
                    new.credits.into(),
                    refill_amount.into(),
                    refill_every.into(),
                    new.refilled_at.into(),
                ];
                if rates {
                    args.push(rate_limit.into());
                    args.push(rate_period.into());
                }
                if let Some(row) = self.insert_v3(client, &args, rates) {
                    return row;
                }
                // The user has an active key: if it has expired, it ends
                // and the insert is tried once more.
                if end_expired && self.end_expired_active(client, user_id) {
                    if let Some(row) = self.insert_v3(client, &args, rates) {
                        return row;
                    }
                }
                KeyError::ActiveKeyExists { user_id }.raise(function)
            } else if new.has_options() {
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
    /// what the active one held, for the rotation to pass on. 0.2.0 and later;
    /// `with_credits` (0.3.0) also moves the active key's credits: they are
    /// returned for the new key, and the old one keeps none (so that a
    /// rotation never doubles a budget, even in a grace period).
    ///
    /// One statement ends the keys, so that two rotations racing behave as in
    /// 0.1.0: the second waits for the first's row lock, then finds nothing
    /// live in its snapshot, and its insert meets the first's new key (23505).
    pub(crate) fn end_user_keys_inheriting(
        &self,
        user_id: pgrx::Uuid,
        grace: Option<Interval>,
        with_credits: bool,
        with_rates: bool,
    ) -> Option<ActiveKey> {
        let grace = grace.unwrap_or_else(|| Interval::from_micros(0));
        // The credit columns in RETURNING are the row as locked, after any
        // concurrent spend (this UPDATE sets none of them).
        let credit_columns = match (with_credits, with_rates) {
            (true, true) => {
                ", k.credits, k.refill_amount, k.refill_every, k.refilled_at, \
                 k.rate_limit, k.rate_period"
            }
            (true, false) => ", k.credits, k.refill_amount, k.refill_every, k.refilled_at",
            (false, _) => "",
        };
        self.connect(|client| {
            // Joined to itself: `old` shows the row as it was before this update.
            let ended = client
                .update(
                    &self.sql(&format!(
                        "UPDATE {{api_keys}} k
                            SET revoked_at = LEAST(COALESCE(k.revoked_at, 'infinity'),
                                                   pg_catalog.now() + $2)
                           FROM {{api_keys}} old
                          WHERE old.id = k.id AND k.user_id = $1
                            AND {{k.live}}
                          RETURNING k.id, old.revoked_at IS NULL, k.scopes, k.metadata,
                                    k.expires_at, k.created_at{credit_columns}"
                    )),
                    None,
                    &[user_id.into(), grace.into()],
                )
                .expect("revoke user keys");
            let mut active = None;
            let mut ids = Vec::new();
            for row in ended {
                let id = row
                    .get::<pgrx::Uuid>(1)
                    .expect("key id")
                    .expect("key id is not null");
                if row.get::<bool>(2).expect("was active") == Some(true) {
                    active = Some((id, inherited_from(&row, 3, with_credits, with_rates)));
                }
                // A rotation announces every key it ends: a new end earlier
                // than the key's expiry could fall in a window the worker
                // has passed already.
                ids.push((id, None));
            }
            self.announce_revoked(ids.into_iter());
            let Some((id, active)) = active else {
                // No active key (revoked, or rotated away with a grace period
                // and then revoked): the user's latest key is what a rotation
                // may not widen, or a revoke followed by a rotation would hand
                // out an unlimited key.
                return with_credits
                    .then(|| self.latest_key(client, user_id, with_rates))
                    .flatten();
            };
            if active.credits.is_some() {
                // Locked by the UPDATE above: nothing can spend in between.
                client
                    .update(
                        &self.sql(
                            "UPDATE {api_keys}
                                SET credits = 0, refill_amount = NULL, refill_every = NULL,
                                    refilled_at = NULL
                              WHERE id = $1",
                        ),
                        None,
                        &[id.into()],
                    )
                    .expect("move credits");
            }
            Some(active)
        })
    }

    /// What the user's most recently issued key holds, live or not (0.3.0
    /// columns included), for a rotation that finds no active key.
    fn latest_key(
        &self,
        client: &mut SpiClient<'_>,
        user_id: pgrx::Uuid,
        with_rates: bool,
    ) -> Option<ActiveKey> {
        let rate_columns = if with_rates {
            ", rate_limit, rate_period"
        } else {
            ""
        };
        let latest = client
            .select(
                &self.sql(&format!(
                    "SELECT scopes, metadata, expires_at, created_at, credits, refill_amount,
                            refill_every, refilled_at{rate_columns}
                       FROM {{api_keys}} WHERE user_id = $1
                      ORDER BY created_at DESC, id DESC LIMIT 1"
                )),
                Some(1),
                &[user_id.into()],
            )
            .expect("latest key");
        let row = latest.into_iter().next()?;
        Some(inherited_from(&row, 1, true, with_rates))
    }

    /// Ends every live key of `user_id`: at `now() + grace` for the active
    /// key, and no later than that for keys already in a grace period.
    /// Sends a revocation event for each; returns how many it ended.
    pub(crate) fn end_user_keys(&self, user_id: pgrx::Uuid, grace: Option<Interval>) -> i32 {
        let grace = grace.unwrap_or_else(|| Interval::from_micros(0));
        self.connect(|client| {
            let table = client
                .update(
                    &self.sql(&format!(
                        "UPDATE {{api_keys}}
                            SET revoked_at = LEAST(COALESCE(revoked_at, 'infinity'),
                                                   pg_catalog.now() + $2)
                          WHERE user_id = $1 AND {{live}}
                          RETURNING id, {}",
                        expires_at_if_announced(self.table())
                    )),
                    None,
                    &[user_id.into(), grace.into()],
                )
                .expect("revoke user keys");
            self.announce_revoked(table.map(|row| {
                (
                    row.get::<pgrx::Uuid>(1)
                        .expect("key id")
                        .expect("key id is not null"),
                    row.get::<TimestampWithTimeZone>(2).expect("expires_at"),
                )
            }))
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
                      RETURNING id, {}",
                    expires_at_if_announced(self.table())
                )),
                None,
                &[value],
            )
            .expect("revoke key");
        self.announce_revoked(revoked.map(|row| {
            (
                row.get::<pgrx::Uuid>(1)
                    .expect("key id")
                    .expect("key id is not null"),
                row.get::<TimestampWithTimeZone>(2).expect("expires_at"),
            )
        }))
    }

    /// `Ok(true)` if this call ended a live key, `Ok(false)` if it had ended.
    pub(crate) fn revoke(&self, id: pgrx::Uuid) -> KeyResult<bool> {
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
                Err(KeyError::KeyNotFound { id })
            } else {
                Ok(false)
            }
        })
    }

    /// Ends the live key stored under `hash`; true if there was one.
    pub(crate) fn revoke_by_hash(&self, hash: &str) -> bool {
        self.connect(|client| self.revoke_where(client, "key_hash", hash.into()) > 0)
    }
}

/// What the revoking statements return beside each key id for
/// `announce_revoked`: the key's `expires_at` when its end stays that
/// expiry (it expired no later than its new `revoked_at`), which is what
/// the worker announces once it passes, in a database at 0.4.0 whose
/// expiries the worker announces; NULL otherwise (then the event is sent
/// here). `table` is our api_keys: a database recreated at 0.1.0 has no
/// `expires_at`.
fn expires_at_if_announced(table: pg_sys::Oid) -> &'static str {
    // SAFETY: a syscache lookup of a column of our table.
    let has_expiry = unsafe { pg_sys::SearchSysCacheExistsAttName(table, c"expires_at".as_ptr()) };
    if has_expiry && crate::shared::expiries_announced_from().is_some() {
        "CASE WHEN expires_at <= revoked_at THEN expires_at END"
    } else {
        "NULL::timestamptz"
    }
}

/// `Spi::connect_mut`, with the statements it runs held to `table`, the
/// oid of our `api_keys` (see `own_table`).
fn connect_to<R>(table: pg_sys::Oid, f: impl FnOnce(&mut SpiClient<'_>) -> R) -> R {
    let _expecting = own_table::expect(table);
    Spi::connect_mut(f)
}

/// `pg_notify('makima_keys_revoked', id)`: PostgreSQL delivers it when (and
/// only if) the transaction commits.
fn announce(id: pgrx::Uuid) {
    notify(REVOKED_CHANNEL, id);
}

/// `pg_notify(channel, id)`.
fn notify(channel: &str, id: pgrx::Uuid) {
    let payload = id.to_string();
    // SAFETY: pg_notify with two text arguments, as SQL calls it.
    unsafe {
        pgrx::direct_function_call_as_datum(
            pg_sys::pg_notify,
            &[channel.into_datum(), payload.as_str().into_datum()],
        );
    }
}
