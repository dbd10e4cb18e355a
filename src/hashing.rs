//! The stored form of a key: lower-case hex SHA-256 of its UTF-8 bytes, the
//! same as `encode(sha256(convert_to(key, 'UTF8')), 'hex')` in SQL.

use sha2::{Digest, Sha256};

pub(crate) const HASH_HEX_LEN: usize = 64;

pub(crate) fn hash_key(key: &str) -> String {
    KeyHash::of(key).as_str().to_owned()
}

/// The hex hash on the stack: the verify path needs it only as a borrowed
/// `&str` and should not allocate for it.
pub(crate) struct KeyHash([u8; HASH_HEX_LEN]);

impl KeyHash {
    pub(crate) fn of(key: &str) -> KeyHash {
        let mut hex = [0u8; HASH_HEX_LEN];
        hex::encode_to_slice(Sha256::digest(key.as_bytes()), &mut hex)
            .expect("64 hex digits fit 32 bytes");
        KeyHash(hex)
    }

    pub(crate) fn as_str(&self) -> &str {
        std::str::from_utf8(&self.0).expect("hex digits are ASCII")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_vectors() {
        // hashlib.sha256(b"...").hexdigest()
        assert_eq!(
            hash_key(""),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        assert_eq!(
            hash_key("mk_abc"),
            "a32e980105d0bf6651f896287e5b52d3e40dc1fc0983324ebc32b21d76cfe195"
        );
    }

    #[test]
    fn stack_hash_equals_the_allocated_one() {
        for key in ["", "mk_abc", "ünïcödé", &"x".repeat(1024)] {
            assert_eq!(
                KeyHash::of(key).as_str(),
                hex::encode(Sha256::digest(key.as_bytes()))
            );
        }
    }

    #[test]
    fn hex_is_lower_case_and_fits_the_column() {
        let h = hash_key("MK_ANYTHING");
        assert_eq!(h.len(), HASH_HEX_LEN);
        assert!(h
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)));
    }
}
