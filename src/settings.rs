//! `makima_keys.last_used_interval`: how stale `last_used_at` may get before
//! a successful verification writes it again.

use pgrx::guc::{GucContext, GucFlags, GucRegistry, GucSetting};

static LAST_USED_INTERVAL: GucSetting<i32> = GucSetting::<i32>::new(60);

pub(crate) fn register(preloading: bool) {
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
    register_shared(preloading);
    // Every name under makima_keys. is ours: `SET makima_keys.typo = 1` is
    // then an error instead of a silently ignored placeholder.
    // SAFETY: a static C string; called from _PG_init.
    unsafe { pgrx::pg_sys::MarkGUCPrefixReserved(c"makima_keys".as_ptr()) };
}

pub(crate) fn last_used_interval_secs() -> i32 {
    LAST_USED_INTERVAL.get()
}

static FLUSH_INTERVAL: GucSetting<i32> = GucSetting::<i32>::new(10);
static MAX_TRACKED_KEYS: GucSetting<i32> = GucSetting::<i32>::new(DEFAULT_MAX_TRACKED_KEYS);

/// Keys (and rate-limited users) the shared tier holds by default: about
/// 23 MB of shared memory (229 bytes a key, measured by bench/shared.sh).
pub(crate) const DEFAULT_MAX_TRACKED_KEYS: i32 = 100_000;

/// The settings of the shared tier. `max_tracked_keys` sizes shared memory,
/// so it can only be set at server start (PGC_POSTMASTER), and PostgreSQL
/// allows such a setting to be defined only while the library is being
/// preloaded: defined later, every backend that loads the library would
/// stop with FATAL. Without preloading it does not exist.
fn register_shared(preloading: bool) {
    GucRegistry::define_int_guc(
        c"makima_keys.flush_interval",
        c"Seconds between rounds of the makima_keys worker (needs shared_preload_libraries).",
        c"Each round writes the last_used_at that verifications recorded in shared memory, \
          announces keys that ended by time, and makes room in the shared hashes.",
        &FLUSH_INTERVAL,
        1,
        3600,
        GucContext::Sighup,
        GucFlags::UNIT_S,
    );
    if preloading {
        GucRegistry::define_int_guc(
            c"makima_keys.max_tracked_keys",
            c"Keys whose statistics, and users whose rate-limit buckets, shared memory holds.",
            c"Each of the two shared hashes holds this many entries; a full one never fails a \
              verification (see the README, Shared memory).",
            &MAX_TRACKED_KEYS,
            100,
            i32::MAX / 2,
            GucContext::Postmaster,
            GucFlags::default(),
        );
    }
}

pub(crate) fn flush_interval_secs() -> i32 {
    FLUSH_INTERVAL.get()
}

pub(crate) fn max_tracked_keys() -> u64 {
    MAX_TRACKED_KEYS.get() as u64
}
