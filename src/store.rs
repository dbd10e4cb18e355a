//! The only module that touches `api_keys`.
//!
//! Every statement names the table with its schema: our functions run with
//! `search_path = pg_catalog, pg_temp`, so an unqualified name could resolve
//! to a caller's temporary table. Values are always bound parameters.

use std::cell::RefCell;

use pgrx::datum::DatumWithOid;
use pgrx::oids_of;
use pgrx::prelude::*;
use pgrx::spi::{OwnedPreparedStatement, SpiClient};

use crate::error::{KeyError, KeyResult};
use crate::index_probe;

/// What a lookup by hash found.
pub struct FoundKey {
    pub id: pgrx::Uuid,
    pub user_id: pgrx::Uuid,
    pub key_prefix: Option<String>,
    pub name: Option<String>,
    pub active: bool,
    /// `last_used_at` is NULL or older than the interval passed to the lookup.
    pub last_used_due: bool,
}

pub struct IssuedRow {
    pub id: pgrx::Uuid,
    pub created_at: TimestampWithTimeZone,
}

/// Plans kept for the life of the backend: the last_used_at write, issuing,
/// and the lookup used when the key_hash index cannot be probed directly.
struct KeptPlans {
    namespace: pg_sys::Oid,
    lookup: OwnedPreparedStatement,
    touch: OwnedPreparedStatement,
    insert: OwnedPreparedStatement,
}

thread_local! {
    static KEPT_PLANS: RefCell<Option<KeptPlans>> = const { RefCell::new(None) };
}

/// `api_keys` in the schema of the calling function, which is the
/// extension's schema because the extension is not relocatable.
pub struct Store {
    namespace: pg_sys::Oid,
}

impl Store {
    /// # Safety
    /// `fcinfo` must be the call's own, valid `FunctionCallInfo`.
    pub unsafe fn for_call(fcinfo: pg_sys::FunctionCallInfo) -> Store {
        Store {
            namespace: pg_sys::get_func_namespace((*(*fcinfo).flinfo).fn_oid),
        }
    }

    /// `template` with `{api_keys}` replaced by the quoted, schema-qualified
    /// table name. Not on the verify path, which probes the index directly
    /// and only prepares the kept plans on its first write or fallback.
    fn sql(&self, template: &str) -> String {
        let schema =
            unsafe { std::ffi::CStr::from_ptr(pg_sys::get_namespace_name(self.namespace)) };
        let table = format!(
            "{}.api_keys",
            pgrx::spi::quote_identifier(schema.to_string_lossy())
        );
        template.replace("{api_keys}", &table)
    }

    fn with_kept_plans<R>(
        &self,
        client: &mut SpiClient<'_>,
        f: impl FnOnce(&mut SpiClient<'_>, &KeptPlans) -> R,
    ) -> R {
        KEPT_PLANS.with(|cell| {
            let mut kept = cell.borrow_mut();
            if kept.as_ref().map(|p| p.namespace) != Some(self.namespace) {
                let lookup = client
                    .prepare(
                        &self.sql(
                            "SELECT id, user_id, key_prefix::text, name::text,
                                    revoked_at IS NULL,
                                    last_used_at IS NULL
                                      OR last_used_at <= pg_catalog.now()
                                         - pg_catalog.make_interval(secs => $2)
                               FROM {api_keys}
                              WHERE key_hash = $1
                              LIMIT 1",
                        ),
                        &oids_of![String, f64],
                    )
                    .expect("prepare key lookup")
                    .keep();
                // SKIP LOCKED: a verification never waits for a row lock; if
                // someone holds the row, the timestamp simply is not written.
                let touch = client
                    .prepare_mut(
                        &self.sql(
                            "UPDATE {api_keys} SET last_used_at = pg_catalog.now()
                              WHERE id = (SELECT id FROM {api_keys}
                                           WHERE id = $1 AND revoked_at IS NULL
                                           FOR NO KEY UPDATE SKIP LOCKED)",
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
                             ON CONFLICT (user_id) WHERE revoked_at IS NULL DO NOTHING
                             RETURNING id, created_at",
                        ),
                        &oids_of![pgrx::Uuid, String, String, String],
                    )
                    .expect("prepare key insert")
                    .keep();
                *kept = Some(KeptPlans {
                    namespace: self.namespace,
                    lookup,
                    touch,
                    insert,
                });
            }
            f(client, kept.as_ref().expect("plans were just kept"))
        })
    }

    /// Finds the row whose `key_hash` is `hash`, active or not. `with_labels`
    /// also reads `key_prefix` and `name`, which only mk_verify_detail shows.
    pub fn find_by_hash(
        &self,
        hash: &str,
        last_used_interval_secs: f64,
        with_labels: bool,
    ) -> Option<FoundKey> {
        if let Some(found) =
            index_probe::find_by_hash(self.namespace, hash, last_used_interval_secs, with_labels)
        {
            return found;
        }
        // The index is missing or not the one the install made: same answer
        // through the executor, only slower.
        Spi::connect_mut(|client| {
            self.with_kept_plans(client, |client, plans| {
                let args: [DatumWithOid; 2] = [hash.into(), last_used_interval_secs.into()];
                let table = client
                    .select(&plans.lookup, Some(1), &args)
                    .expect("key lookup");
                if table.is_empty() {
                    return None;
                }
                let row = table.first();
                Some(FoundKey {
                    id: row.get(1).expect("id").expect("id is not null"),
                    user_id: row.get(2).expect("user_id").expect("user_id is not null"),
                    key_prefix: row.get(3).expect("key_prefix"),
                    name: row.get(4).expect("name"),
                    active: row.get(5).expect("active").unwrap_or(false),
                    last_used_due: row.get(6).expect("due").unwrap_or(false),
                })
            })
        })
    }

    /// Sets `last_used_at = now()` unless another transaction holds the row.
    pub fn touch_last_used(&self, id: pgrx::Uuid) {
        Spi::connect_mut(|client| {
            self.with_kept_plans(client, |client, plans| {
                client
                    .update(&plans.touch, None, &[id.into()])
                    .expect("last_used_at update");
            })
        })
    }

    /// Inserts a new active key; `None` when the user already has one
    /// (the partial unique index decides, also between concurrent callers).
    pub fn insert_active(
        &self,
        user_id: pgrx::Uuid,
        key_hash: &str,
        key_prefix: &str,
        name: Option<&str>,
    ) -> Option<IssuedRow> {
        Spi::connect_mut(|client| {
            self.with_kept_plans(client, |client, plans| {
                let args: [DatumWithOid; 4] = [
                    user_id.into(),
                    key_hash.into(),
                    key_prefix.into(),
                    name.into(),
                ];
                let table = client
                    .update(&plans.insert, None, &args)
                    .expect("insert key");
                if table.is_empty() {
                    return None;
                }
                let row = table.first();
                Some(IssuedRow {
                    id: row.get(1).expect("id").expect("id is not null"),
                    created_at: row
                        .get(2)
                        .expect("created_at")
                        .expect("created_at is not null"),
                })
            })
        })
    }

    /// Revokes every active key of `user_id`; returns how many this call revoked.
    pub fn revoke_user_keys(&self, user_id: pgrx::Uuid) -> i32 {
        Spi::connect_mut(|client| {
            let table = client
                .update(
                    &self.sql(
                        "UPDATE {api_keys} SET revoked_at = pg_catalog.now()
                          WHERE user_id = $1 AND revoked_at IS NULL",
                    ),
                    None,
                    &[user_id.into()],
                )
                .expect("revoke user keys");
            i32::try_from(table.len()).unwrap_or(i32::MAX)
        })
    }

    /// `Ok(true)` if this call revoked the key, `Ok(false)` if it was already revoked.
    pub fn revoke(&self, id: pgrx::Uuid) -> KeyResult<bool> {
        Spi::connect_mut(|client| {
            let revoked = client
                .update(
                    &self.sql(
                        "UPDATE {api_keys} SET revoked_at = pg_catalog.now()
                          WHERE id = $1 AND revoked_at IS NULL
                          RETURNING id",
                    ),
                    None,
                    &[id.into()],
                )
                .expect("revoke key");
            if !revoked.is_empty() {
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
}

/// Whether this transaction may write `last_used_at` without risking an
/// error: not read-only, not on a standby, and not under a transaction
/// snapshot (REPEATABLE READ or SERIALIZABLE), where touching a row another
/// session just touched would raise a serialization failure.
pub fn may_write_last_used() -> bool {
    unsafe {
        !pg_sys::XactReadOnly
            && !pg_sys::RecoveryInProgress()
            && pg_sys::XactIsoLevel < pg_sys::XACT_REPEATABLE_READ as i32
    }
}
