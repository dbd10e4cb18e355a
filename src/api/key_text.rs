//! The functions over a key's text alone, with no table access: public,
//! immutable and parallel safe.

use pgrx::prelude::*;

use crate::hashing::hash_key;
use crate::key_format;

/// The `key_hash` stored for a key: lower-case hex SHA-256 of its UTF-8 bytes.
#[pg_extern(immutable, strict, parallel_safe)]
fn mk_hash_key(key: &str) -> String {
    hash_key(key)
}

/// Our format with a valid checksum; no table access.
#[pg_extern(immutable, strict, parallel_safe)]
fn mk_key_is_well_formed(key: &str) -> bool {
    key_format::is_well_formed(key)
}
