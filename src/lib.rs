//! makima_keys: issue, hash, verify and revoke API keys inside PostgreSQL.
//!
//! Layers, each using only the ones below it:
//! - `api`: the SQL functions, a thin layer of argument checks over
//! - `store`: the only code that touches `api_keys` (statements, the index
//!   probe, the snapshot it reads with, the guard on our own statements);
//! - plain Rust with no database: `key_format`, `hashing`, `policy`,
//!   `error`; and small Postgres helpers: `clock`, `settings`, `jsonb`,
//!   `one_row`.
#![deny(unsafe_op_in_unsafe_fn)]
#![deny(clippy::undocumented_unsafe_blocks)]

use pgrx::prelude::*;

mod api;
mod clock;
mod error;
mod hashing;
mod jsonb;
mod key_format;
mod one_row;
mod policy;
mod rate;
mod settings;
mod shared;
mod store;
mod worker;

#[cfg(test)]
mod frozen_scripts;
#[cfg(any(test, feature = "pg_test"))]
mod pg_tests;

#[cfg(any(feature = "pg13", feature = "pg14"))]
compile_error!(
    "makima_keys needs PostgreSQL 15 or later (MarkGUCPrefixReserved, InitMaterializedSRF)"
);

::pgrx::pg_module_magic!(name, version);

// The SQL that pgrx cannot generate, in the order the install script runs it.
// The table, its indexes and the adoption of a pre-existing makima table.
extension_sql_file!("../sql/src/bootstrap.sql", name = "bootstrap", bootstrap);
// The 0.2.0 columns and the mk_keys view; the upgrade script runs the same block.
extension_sql_file!(
    "../sql/src/schema_0_2_0.sql",
    name = "schema_0_2_0",
    requires = ["bootstrap"]
);
// 0.3.0: the credit columns and mk_keys with them; the upgrade script runs
// the same block.
extension_sql_file!(
    "../sql/src/schema_0_3_0.sql",
    name = "schema_0_3_0",
    requires = ["schema_0_2_0"]
);
// 0.4.0: the rate-limit columns, the index of key ends, mk_keys with them;
// the upgrade script runs the same block.
extension_sql_file!(
    "../sql/src/schema_0_4_0.sql",
    name = "schema_0_4_0",
    requires = ["schema_0_3_0"]
);
// 0.2.1: the call that restores the users foreign key after a logical
// restore; the upgrade script creates the same function.
extension_sql_file!(
    "../sql/src/user_foreign_key.sql",
    name = "user_foreign_key",
    requires = ["bootstrap"]
);
// The functions that return their one row in materialize mode (see
// `one_row`), whose definitions pgrx cannot generate.
extension_sql_file!(
    "../sql/src/functions.sql",
    name = "functions",
    requires = ["bootstrap"]
);
// Privileges, once every function exists.
extension_sql_file!("../sql/src/finalize.sql", name = "finalize", finalize);

#[pg_guard]
pub extern "C-unwind" fn _PG_init() {
    // SAFETY: plain reads of flags the postmaster sets before loading us.
    let (preloading, binary_upgrade) = unsafe {
        (
            pg_sys::process_shared_preload_libraries_in_progress,
            pg_sys::IsBinaryUpgrade,
        )
    };
    settings::register(preloading);
    store::install_statement_guard();
    if preloading {
        shared::install_hooks();
        // pg_upgrade starts servers in binary-upgrade mode: no worker may
        // write to a database being restored.
        if !binary_upgrade {
            worker::register_launcher();
        }
    }
}

/// Required by `cargo pgrx test`.
#[cfg(test)]
pub mod pg_test {
    pub fn setup(_options: Vec<&str>) {}

    #[must_use]
    pub fn postgresql_conf_options() -> Vec<&'static str> {
        vec![]
    }
}
