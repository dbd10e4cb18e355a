//! The verification hot path: one probe of the unique index on `key_hash`,
//! straight through the access methods, without SPI or the executor.
//!
//! This is what an executor index scan node does for `WHERE key_hash = $1`,
//! minus planning, plan caching and executor start-up, which cost several
//! times the probe itself. Visibility follows the rules SPI applies to a
//! volatile function: a fresh snapshot per call (READ COMMITTED) that also
//! sees this transaction's own earlier commands.

use std::ffi::CStr;

use pgrx::prelude::*;

use crate::store::FoundKey;

const TABLE: &CStr = c"api_keys";
const HASH_INDEX: &CStr = c"idx_api_keys_key_hash_unique";

/// Column positions (0-based) in `api_keys`, found by name: an adopted table
/// may have extra columns, and dropped columns leave gaps.
struct Columns {
    id: usize,
    user_id: usize,
    key_hash: usize,
    key_prefix: usize,
    name: usize,
    last_used_at: usize,
    revoked_at: usize,
}

unsafe fn columns(tupdesc: pg_sys::TupleDesc) -> Option<Columns> {
    let natts = (*tupdesc).natts as usize;
    let attrs = (*tupdesc).attrs.as_slice(natts);
    let find = |wanted: &str| {
        attrs.iter().position(|a| {
            !a.attisdropped
                && CStr::from_ptr(a.attname.data.as_ptr()).to_bytes() == wanted.as_bytes()
        })
    };
    Some(Columns {
        id: find("id")?,
        user_id: find("user_id")?,
        key_hash: find("key_hash")?,
        key_prefix: find("key_prefix")?,
        name: find("name")?,
        last_used_at: find("last_used_at")?,
        revoked_at: find("revoked_at")?,
    })
}

/// Looks `hash` up in `api_keys` of `namespace`.
///
/// `None`: the index cannot be used as expected (missing, invalid, or not the
/// plain unique index on `key_hash` the install created); the caller then
/// takes the SPI path. `Some(None)`: no such key.
pub fn find_by_hash(
    namespace: pg_sys::Oid,
    hash: &str,
    last_used_interval_secs: f64,
    with_labels: bool,
) -> Option<Option<FoundKey>> {
    unsafe {
        let heap_oid = pg_sys::get_relname_relid(TABLE.as_ptr(), namespace);
        let index_oid = pg_sys::get_relname_relid(HASH_INDEX.as_ptr(), namespace);
        if heap_oid == pg_sys::InvalidOid || index_oid == pg_sys::InvalidOid {
            return None;
        }
        let lock = pg_sys::AccessShareLock as pg_sys::LOCKMODE;
        let heap = pg_sys::table_open(heap_oid, lock);
        let index = pg_sys::index_open(index_oid, lock);
        let usable = usable_columns(heap, heap_oid, index);
        let found = usable.map(|cols| {
            probe(
                heap,
                index,
                &cols,
                hash,
                last_used_interval_secs,
                with_labels,
            )
        });
        // Like the executor, keep the locks until the end of the transaction.
        pg_sys::index_close(index, pg_sys::NoLock as pg_sys::LOCKMODE);
        pg_sys::table_close(heap, pg_sys::NoLock as pg_sys::LOCKMODE);
        found
    }
}

/// The columns, if `index` is the valid, non-partial, one-column unique
/// btree on `api_keys.key_hash`.
unsafe fn usable_columns(
    heap: pg_sys::Relation,
    heap_oid: pg_sys::Oid,
    index: pg_sys::Relation,
) -> Option<Columns> {
    let form = (*index).rd_index;
    let cols = columns((*heap).rd_att)?;
    let keys = (*form).indkey.values.as_slice(1);
    let ok = (*form).indrelid == heap_oid
        && (*form).indisvalid
        && (*form).indisready
        && (*form).indisunique
        && (*form).indnatts == 1
        && (*(*index).rd_rel).relam == pg_sys::BTREE_AM_OID
        && keys[0] as usize == cols.key_hash + 1
        && pg_sys::RelationGetIndexPredicate(index).is_null()
        && pg_sys::RelationGetIndexExpressions(index).is_null();
    ok.then_some(cols)
}

unsafe fn probe(
    heap: pg_sys::Relation,
    index: pg_sys::Relation,
    cols: &Columns,
    hash: &str,
    last_used_interval_secs: f64,
    with_labels: bool,
) -> Option<FoundKey> {
    // What SPI does before a statement in a volatile function.
    pg_sys::CommandCounterIncrement();
    pg_sys::PushActiveSnapshot(pg_sys::GetTransactionSnapshot());
    pg_sys::UpdateActiveSnapshotCommandId();
    let snapshot = pg_sys::GetActiveSnapshot();

    let mut key: pg_sys::ScanKeyData = std::mem::zeroed();
    pg_sys::ScanKeyEntryInitialize(
        &mut key,
        0,
        1,
        pg_sys::BTEqualStrategyNumber as pg_sys::StrategyNumber,
        pg_sys::InvalidOid,
        *(*index).rd_indcollation,
        pg_sys::Oid::from(pg_sys::F_TEXTEQ),
        hash.into_datum().expect("text datum"),
    );
    let scan = pg_sys::index_beginscan(heap, index, snapshot, 1, 0);
    pg_sys::index_rescan(scan, &mut key, 1, std::ptr::null_mut(), 0);
    let slot = pg_sys::table_slot_create(heap, std::ptr::null_mut());

    let found =
        if pg_sys::index_getnext_slot(scan, pg_sys::ScanDirection::ForwardScanDirection, slot) {
            let natts = (*(*heap).rd_att).natts as usize;
            if ((*slot).tts_nvalid as usize) < natts {
                pg_sys::slot_getsomeattrs_int(slot, natts as i32);
            }
            let values = std::slice::from_raw_parts((*slot).tts_values, natts);
            let nulls = std::slice::from_raw_parts((*slot).tts_isnull, natts);
            let uuid = |i: usize| {
                pgrx::Uuid::from_datum(values[i], nulls[i]).expect("uuid column is not null")
            };
            let text = |i: usize| {
                if with_labels {
                    String::from_datum(values[i], nulls[i])
                } else {
                    None
                }
            };
            let last_used_due = nulls[cols.last_used_at] || {
                // now() is the transaction start; timestamps are microseconds.
                let now = pg_sys::GetCurrentTransactionStartTimestamp();
                let last_used = values[cols.last_used_at].value() as i64;
                last_used <= now - (last_used_interval_secs * 1e6) as i64
            };
            Some(FoundKey {
                id: uuid(cols.id),
                user_id: uuid(cols.user_id),
                key_prefix: text(cols.key_prefix),
                name: text(cols.name),
                active: nulls[cols.revoked_at],
                last_used_due,
            })
        } else {
            None
        };

    pg_sys::ExecDropSingleTupleTableSlot(slot);
    pg_sys::index_endscan(scan);
    pg_sys::PopActiveSnapshot();
    found
}
