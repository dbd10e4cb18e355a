//! Whose rights our statements run with, and the called function's schema
//! and owner, which say which `api_keys` a call is about and whose it is.

use std::cell::Cell;

use pgrx::prelude::*;

/// What a call needs to know about the function it runs in.
#[derive(Clone, Copy)]
pub(super) struct CalledFunction {
    oid: pg_sys::Oid,
    pub(super) namespace: pg_sys::Oid,
    pub(super) owner: pg_sys::Oid,
}

/// Functions remembered per backend: enough for a session that alternates
/// between the verification functions.
const REMEMBERED_FUNCTIONS: usize = 4;

thread_local! {
    /// The last functions asked about: every call of mk_verify asks, and a
    /// pg_proc lookup is a noticeable part of one.
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

/// The schema and owner of function `fn_oid`, which must exist (it is the
/// function being called).
pub(super) fn called_function(fn_oid: pg_sys::Oid) -> CalledFunction {
    if !PROC_CALLBACK_REGISTERED.get() {
        // SAFETY: registers a plain function for the life of the backend.
        unsafe {
            pg_sys::CacheRegisterSyscacheCallback(
                pg_sys::SysCacheIdentifier::PROCOID as std::ffi::c_int,
                Some(forget_called_function),
                pg_sys::Datum::from(0),
            );
        }
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
    // SAFETY: a syscache lookup; the tuple is read, then released.
    let found = unsafe {
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
        found
    };
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
/// check, does not pay for a search_path change on every call. Only the
/// last_used_at write and the SQL fallback run statements, and they run them here. If `f` raises, the
/// (sub)transaction abort restores the user id and the setting, as it does
/// for SECURITY DEFINER.
pub(super) fn with_owner_rights<R>(owner: pg_sys::Oid, f: impl FnOnce() -> R) -> R {
    // SAFETY: the user id and GUC nest level are saved and restored in
    // PostgreSQL's own pattern; an error unwinds through the abort, which
    // restores both.
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
