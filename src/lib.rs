//! makima_keys: issue, hash, verify and revoke API keys inside PostgreSQL.
//!
//! `key_format` and `hashing` are plain Rust; `api` is the SQL surface and
//! `store` the only code that touches `api_keys`.

use pgrx::prelude::*;

pub mod api;
pub mod error;
pub mod hashing;
pub mod index_probe;
pub mod jsonb;
pub mod key_format;
pub mod one_row;
mod own_table;
pub mod policy;
pub mod settings;
pub mod store;

#[cfg(any(feature = "pg13", feature = "pg14"))]
compile_error!(
    "makima_keys needs PostgreSQL 15 or later (MarkGUCPrefixReserved, InitMaterializedSRF)"
);

::pgrx::pg_module_magic!(name, version);

// The table, its indexes and the adoption of a pre-existing makima table.
extension_sql_file!("../sql/bootstrap.sql", name = "bootstrap", bootstrap);
// The 0.2.0 columns and the mk_keys view; the upgrade script runs the same block.
extension_sql_file!(
    "../sql/schema_0_2_0.sql",
    name = "schema_0_2_0",
    requires = ["bootstrap"]
);
// 0.2.1: the call that restores the users foreign key after a logical
// restore; the upgrade script creates the same function.
extension_sql_file!(
    "../sql/user_foreign_key.sql",
    name = "user_foreign_key",
    requires = ["bootstrap"]
);
// Privileges, once every function exists.
extension_sql_file!("../sql/finalize.sql", name = "finalize", finalize);

#[pg_guard]
pub extern "C-unwind" fn _PG_init() {
    settings::register();
    own_table::install();
}

// pgrx needs the test module inline; its body lives in pg_tests.rs.
#[cfg(any(test, feature = "pg_test"))]
#[pg_schema]
mod tests {
    include!("pg_tests.rs");
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
