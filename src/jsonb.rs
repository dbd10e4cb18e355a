//! `jsonb` values passed through as PostgreSQL's own bytes.
//!
//! pgrx's `JsonB` goes through `serde_json`, which rounds numbers such as
//! 12345678901234567890.123 and reorders nothing we could undo. Metadata is
//! the caller's data, so we never parse it: we check its top-level type and
//! size with PostgreSQL's functions and hand the datum on unchanged.

use pgrx::callconv::{Arg, ArgAbi, BoxRet, FcInfo};
use pgrx::nullable::Nullable;
use pgrx::prelude::*;

/// A detoasted copy of a `jsonb` datum, in the memory context that was
/// current when it was read.
#[derive(Clone, Copy, Debug)]
pub(crate) struct StoredJsonb(pg_sys::Datum);

impl StoredJsonb {
    /// `jsonb_typeof()` of the value: "object", "array", "string", ...
    pub(crate) fn type_name(&self) -> String {
        // SAFETY: self.0 is a detoasted jsonb value (see `from_polymorphic_datum`).
        unsafe {
            pgrx::direct_function_call::<String>(pg_sys::jsonb_typeof, &[Some(self.0)])
                .expect("jsonb_typeof is never null")
        }
    }

    /// Size in bytes of the stored (binary) form.
    pub(crate) fn stored_size(&self) -> usize {
        // SAFETY: self.0 points to a detoasted varlena.
        unsafe { pgrx::varlena::varsize_any(self.0.cast_mut_ptr()) }
    }
}

impl FromDatum for StoredJsonb {
    unsafe fn from_polymorphic_datum(
        datum: pg_sys::Datum,
        is_null: bool,
        _typoid: pg_sys::Oid,
    ) -> Option<Self> {
        // SAFETY: the caller passes a datum of type jsonb (FromDatum's contract), which PostgreSQL can detoast and copy.
        unsafe {
            if is_null {
                return None;
            }
            // A copy: the value may live in a tuple or SPI result that is freed
            // before we are done with it, or be a TOAST pointer.
            let copy = pg_sys::pg_detoast_datum_copy(datum.cast_mut_ptr());
            Some(StoredJsonb(pg_sys::Datum::from(copy)))
        }
    }
}

impl IntoDatum for StoredJsonb {
    fn into_datum(self) -> Option<pg_sys::Datum> {
        Some(self.0)
    }

    fn type_oid() -> pg_sys::Oid {
        pg_sys::JSONBOID
    }
}

// SAFETY: arguments are unboxed with FromDatum above, which copies them.
unsafe impl<'fcx> ArgAbi<'fcx> for StoredJsonb {
    unsafe fn unbox_arg_unchecked(arg: Arg<'_, 'fcx>) -> Self {
        // SAFETY: pgrx calls this with an argument of our declared type, jsonb.
        unsafe {
            let index = arg.index();
            arg.unbox_arg_using_from_datum()
                .unwrap_or_else(|| panic!("argument {index} must not be null"))
        }
    }

    unsafe fn unbox_nullable_arg(arg: Arg<'_, 'fcx>) -> Nullable<Self> {
        // SAFETY: pgrx calls this with an argument of our declared type, jsonb.
        unsafe { arg.unbox_arg_using_from_datum().into() }
    }
}

impl_sql_translatable!(StoredJsonb, "jsonb");

// SAFETY: returns the datum unchanged, as a jsonb by reference.
unsafe impl BoxRet for StoredJsonb {
    unsafe fn box_into<'fcx>(self, fcinfo: &mut FcInfo<'fcx>) -> pgrx::datum::Datum<'fcx> {
        // SAFETY: the datum is a jsonb value, the function's declared return type.
        unsafe { fcinfo.return_raw_datum(self.0) }
    }
}
