//! What every call has: its own `FunctionCallInfo`, from pgrx's wrapper.

use pgrx::prelude::*;

use crate::store::Store;

/// The store of the function being called (its schema and owner).
pub(super) fn store_for(fcinfo: pg_sys::FunctionCallInfo) -> Store {
    // SAFETY: every caller passes the fcinfo pgrx's wrapper gave it, which
    // is this call's own and valid for its whole duration.
    unsafe { Store::for_call(fcinfo) }
}
