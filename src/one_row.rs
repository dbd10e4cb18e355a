//! The one row of the issuing and detail functions, returned in materialize mode.
//!
//! pgrx's `TableIterator` returns rows one call at a time (value-per-call):
//! PostgreSQL calls the function once for the row and once more to hear
//! that there are no more. For a SECURITY DEFINER function each call pays
//! the `SET search_path` of its definition, and the first one also reads
//! the result type from pg_proc again, though the executor has just built
//! it. In materialize mode the function is called once, writes its row
//! into a tuplestore and takes the row type the executor passes in
//! (`expectedDesc`).

use pgrx::pg_sys;

/// Where the one row goes: the call's tuplestore and its row type of `N`
/// columns (checked in [`OneRow::begin`], so [`OneRow::put`] takes exactly
/// `N` values).
pub(crate) struct OneRow<const N: usize> {
    store: *mut pg_sys::Tuplestorestate,
    desc: pg_sys::TupleDesc,
}

impl<const N: usize> OneRow<N> {
    /// Sets up materialize mode for this call, for a row of `types`.
    ///
    /// Call it before anything is written: in a context that cannot take a
    /// set (no `ReturnSetInfo`, or materialize mode not allowed) it raises
    /// 0A000 and the call has changed nothing.
    ///
    /// # Safety
    /// `fcinfo` must be the call's own, valid `FunctionCallInfo`, and the
    /// function must be declared to return a set of rows of `types`.
    pub(crate) unsafe fn begin(
        fcinfo: pg_sys::FunctionCallInfo,
        types: &[pg_sys::Oid; N],
    ) -> OneRow<N> {
        // SAFETY: the caller's contract: fcinfo is this call's own, so its resultinfo is what the executor passed.
        unsafe {
            let rsinfo = (*fcinfo).resultinfo.cast::<pg_sys::ReturnSetInfo>();
            let has_expected_desc = !rsinfo.is_null()
                && (*rsinfo).type_ == pg_sys::NodeTag::T_ReturnSetInfo
                && !(*rsinfo).expectedDesc.is_null();
            // Without an expected row type (a caller other than the executor),
            // PostgreSQL reads it from the function's declaration instead.
            let flags = if has_expected_desc {
                pg_sys::MAT_SRF_USE_EXPECTED_DESC
            } else {
                0
            };
            // Raises if the caller cannot take a set in materialize mode.
            // On 15 this is InitMaterializedSRF under the name it had in 15.0;
            // 15.1 renamed it and kept this symbol, so the library loads on
            // every 15.x. 16 dropped the old name.
            #[cfg(feature = "pg15")]
            pg_sys::SetSingleFuncCall(fcinfo, flags);
            #[cfg(not(feature = "pg15"))]
            pg_sys::InitMaterializedSRF(fcinfo, flags);
            let row = OneRow {
                store: (*rsinfo).setResult,
                desc: (*rsinfo).setDesc,
            };
            // The row is built from our own values: refuse a row type that is
            // not the declared one rather than write values of the wrong type.
            if !row.has_types(types) {
                pgrx::ereport!(
                    ERROR,
                    pgrx::PgSqlErrorCode::ERRCODE_DATATYPE_MISMATCH,
                    "the row type this call must return is not the one makima_keys declares"
                );
            }
            row
        }
    }

    unsafe fn has_types(&self, types: &[pg_sys::Oid; N]) -> bool {
        // SAFETY: self.desc is the row type set up by `begin` for this call.
        unsafe {
            if (*self.desc).natts as usize != N {
                return false;
            }
            // PgTupleDesc reads the attributes the way each major lays them out
            // (18 keeps them after an array of compact attributes).
            let desc = pgrx::PgTupleDesc::from_pg_unchecked(self.desc);
            desc.iter()
                .zip(types)
                .all(|(attr, &expected)| !attr.attisdropped && attr.atttypid == expected)
        }
    }

    /// Writes the row (`None` is SQL NULL); the tuplestore copies the values.
    ///
    /// # Safety
    /// Each datum must be a valid value of its column's type.
    pub(crate) unsafe fn put(self, values: [Option<pg_sys::Datum>; N]) {
        // SAFETY: the caller's contract (values of the row's types); store and desc come from `begin`.
        unsafe {
            let mut nulls = values.map(|value| value.is_none());
            let mut datums = values.map(|value| value.unwrap_or(pg_sys::Datum::from(0)));
            pg_sys::tuplestore_putvalues(
                self.store,
                self.desc,
                datums.as_mut_ptr(),
                nulls.as_mut_ptr(),
            );
        }
    }
}
