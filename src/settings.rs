//! `makima_keys.last_used_interval`: how stale `last_used_at` may get before
//! a successful verification writes it again.

use pgrx::guc::{GucContext, GucFlags, GucRegistry, GucSetting};

static LAST_USED_INTERVAL: GucSetting<i32> = GucSetting::<i32>::new(60);

pub(crate) fn register() {
    GucRegistry::define_int_guc(
        c"makima_keys.last_used_interval",
        c"Seconds between writes of api_keys.last_used_at for one key.",
        c"A successful verification sets last_used_at = now() when it is NULL or older than this. \
          0 writes on every verification. Larger values mean fewer writes and less WAL.",
        &LAST_USED_INTERVAL,
        0,
        i32::MAX,
        GucContext::Userset,
        GucFlags::UNIT_S,
    );
    // Every name under makima_keys. is ours: `SET makima_keys.typo = 1` is
    // then an error instead of a silently ignored placeholder.
    // SAFETY: a static C string; called from _PG_init.
    unsafe { pgrx::pg_sys::MarkGUCPrefixReserved(c"makima_keys".as_ptr()) };
}

pub(crate) fn last_used_interval_secs() -> i32 {
    LAST_USED_INTERVAL.get()
}
