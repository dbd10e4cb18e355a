//! The SQL surface, by concern: `args` checks arguments, then `issue`,
//! `verify` and `revoke` apply `key_format`, `hashing` and `policy` and
//! call `store`; `key_text` needs no table; `v0_1_0` and `v0_2_0` keep the
//! C symbols of earlier versions.
//!
//! Functions that touch `api_keys` are SECURITY DEFINER with
//! `search_path = pg_catalog, pg_temp`, except the verifications (see
//! `verify`); `store` qualifies the table itself.
//!
//! Functions whose SQL signature or behaviour changed in a version have new
//! C symbols (the `_v2`, `_v3` Rust names): a session that still runs an
//! older library after ALTER EXTENSION UPDATE then fails to find them,
//! instead of applying older rules (no expiry, no credits) to newer keys.
//! The older symbols stay in `v0_1_0` and `v0_2_0`, without SQL of their
//! own, for databases not yet updated when this library is installed.

mod args;
mod call;
mod issue;
mod key_text;
mod revoke;
mod stats;
mod v0_1_0;
mod v0_2_0;
mod verify;
