//! The makima key format, with no Postgres in it.
//!
//! A key is `mk_` + 43 base-62 characters (256 bits from the RNG it is given)
//! + a 6-character checksum: CRC-32 (zlib/IEEE) of the 43 body characters,
//!   written in base 62 and left-padded with `0`. 52 characters in all.

use rand::RngCore;

/// The base-62 alphabet, in the order the checksum encoding uses.
pub(crate) const ALPHABET: &[u8; 62] =
    b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
pub(crate) const KEY_PREFIX: &str = "mk_";
pub(crate) const BODY_LEN: usize = 43;
pub(crate) const CHECKSUM_LEN: usize = 6;
pub(crate) const KEY_LEN: usize = KEY_PREFIX.len() + BODY_LEN + CHECKSUM_LEN;
/// What `key_prefix` stores: `mk_` and the first six body characters.
pub(crate) const DISPLAY_PREFIX_LEN: usize = KEY_PREFIX.len() + 6;
/// Anything longer is rejected before it is hashed, whatever its format.
pub(crate) const MAX_KEY_BYTES: usize = 1024;

/// `IN_ALPHABET[b]`: whether byte `b` is one of [`ALPHABET`]. A table, because
/// `ALPHABET.contains(b)` is a memchr per character on the verify path.
const IN_ALPHABET: [bool; 256] = {
    let mut table = [false; 256];
    let mut i = 0;
    while i < ALPHABET.len() {
        table[ALPHABET[i] as usize] = true;
        i += 1;
    }
    table
};

/// 248 = 4 * 62: bytes at or above it are thrown away so that every
/// character is equally likely (no modulo bias).
const REJECTION_LIMIT: u8 = 248;

/// How a candidate key string looks before any table is consulted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum KeyShape {
    /// Our format with a valid checksum.
    WellFormed,
    /// Not ours, but it may be a key adopted from elsewhere: look up its hash.
    Foreign,
    /// Empty, longer than [`MAX_KEY_BYTES`], or our prefix and length with a
    /// body or checksum that does not check out.
    Malformed,
}

/// Draws a new key from `rng`. The only failure is the RNG's own.
pub(crate) fn generate<R: RngCore + ?Sized>(rng: &mut R) -> Result<String, rand::Error> {
    let mut body = [0u8; BODY_LEN];
    let mut filled = 0;
    let mut pool = [0u8; 64];
    while filled < BODY_LEN {
        rng.try_fill_bytes(&mut pool)?;
        for &byte in pool.iter().filter(|&&b| b < REJECTION_LIMIT) {
            if filled == BODY_LEN {
                break;
            }
            body[filled] = ALPHABET[usize::from(byte % 62)];
            filled += 1;
        }
    }
    let mut key = String::with_capacity(KEY_LEN);
    key.push_str(KEY_PREFIX);
    // Both parts are ASCII from ALPHABET.
    key.push_str(std::str::from_utf8(&body).expect("alphabet is ASCII"));
    key.push_str(std::str::from_utf8(&checksum(&body)).expect("alphabet is ASCII"));
    Ok(key)
}

/// CRC-32 of `body` in base 62, left-padded with `0` to six characters.
pub(crate) fn checksum(body: &[u8]) -> [u8; CHECKSUM_LEN] {
    let mut value = crc32fast::hash(body);
    let mut out = [b'0'; CHECKSUM_LEN];
    for slot in out.iter_mut().rev() {
        *slot = ALPHABET[(value % 62) as usize];
        value /= 62;
    }
    out
}

/// Classifies `candidate` in time bounded by [`MAX_KEY_BYTES`], never by its length.
pub(crate) fn shape(candidate: &str) -> KeyShape {
    let bytes = candidate.as_bytes();
    if bytes.is_empty() || bytes.len() > MAX_KEY_BYTES {
        return KeyShape::Malformed;
    }
    if bytes.len() != KEY_LEN || !bytes.starts_with(KEY_PREFIX.as_bytes()) {
        return KeyShape::Foreign;
    }
    let (body, check) = bytes[KEY_PREFIX.len()..].split_at(BODY_LEN);
    if body.iter().all(|&b| IN_ALPHABET[usize::from(b)]) && checksum(body) == check {
        KeyShape::WellFormed
    } else {
        KeyShape::Malformed
    }
}

pub(crate) fn is_well_formed(candidate: &str) -> bool {
    shape(candidate) == KeyShape::WellFormed
}

/// The part of a key that is stored in `key_prefix` and safe to show.
/// Keys of other formats keep at most their first nine characters.
pub(crate) fn display_prefix(key: &str) -> &str {
    let end = key
        .char_indices()
        .nth(DISPLAY_PREFIX_LEN)
        .map_or(key.len(), |(i, _)| i);
    &key[..end]
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    // Computed independently with Python:
    //   b62 = lambda n: ''.join(A[n // 62**i % 62] for i in reversed(range(6)))
    //   b62(zlib.crc32(body.encode()))
    const VECTORS: &[(&str, u32, &str)] = &[
        (
            "0000000000000000000000000000000000000000000",
            2_018_072_207,
            "2CZclj",
        ),
        (
            "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQ",
            3_891_398_524,
            "4FLuWK",
        ),
        (
            "ZZZZZZZZZZZZZZZZZZZZZZZZZZZZZZZZZZZZZZZZZZZ",
            3_830_303_482,
            "4BDYuQ",
        ),
    ];

    #[test]
    fn alphabet_table_matches_the_alphabet() {
        for b in 0..=255u8 {
            assert_eq!(IN_ALPHABET[usize::from(b)], ALPHABET.contains(&b), "{b}");
        }
    }

    #[test]
    fn checksum_matches_zlib_crc32_in_base62() {
        for (body, crc, expected) in VECTORS {
            assert_eq!(crc32fast::hash(body.as_bytes()), *crc, "crc of {body}");
            assert_eq!(&checksum(body.as_bytes()), expected.as_bytes(), "{body}");
        }
    }

    #[test]
    fn checksum_of_empty_input_is_zero_padded() {
        // crc32(b"") == 0
        assert_eq!(&checksum(b""), b"000000");
    }

    #[test]
    fn generated_keys_have_the_documented_layout() {
        let mut rng = StdRng::seed_from_u64(7);
        for _ in 0..1000 {
            let key = generate(&mut rng).unwrap();
            assert_eq!(key.len(), KEY_LEN);
            assert!(key.starts_with(KEY_PREFIX));
            assert!(key[3..].bytes().all(|b| ALPHABET.contains(&b)));
            assert_eq!(shape(&key), KeyShape::WellFormed);
            assert_eq!(display_prefix(&key), &key[..9]);
        }
    }

    #[test]
    fn known_key_is_well_formed() {
        let key = format!("mk_{}{}", VECTORS[1].0, VECTORS[1].2);
        assert_eq!(key.len(), 52);
        assert!(is_well_formed(&key));
    }

    #[test]
    fn every_single_character_change_is_caught() {
        let key = generate(&mut StdRng::seed_from_u64(1)).unwrap();
        for pos in 3..KEY_LEN {
            for &replacement in ALPHABET.iter() {
                let mut bytes = key.clone().into_bytes();
                if bytes[pos] == replacement {
                    continue;
                }
                bytes[pos] = replacement;
                let changed = String::from_utf8(bytes).unwrap();
                assert_eq!(shape(&changed), KeyShape::Malformed, "pos {pos}");
            }
        }
    }

    #[test]
    fn shapes_of_hostile_and_foreign_input() {
        assert_eq!(shape(""), KeyShape::Malformed);
        assert_eq!(shape(&"x".repeat(MAX_KEY_BYTES + 1)), KeyShape::Malformed);
        assert_eq!(shape(&"x".repeat(MAX_KEY_BYTES)), KeyShape::Foreign);
        assert_eq!(shape("mk_abc123"), KeyShape::Foreign);
        assert_eq!(shape("sk_live_something"), KeyShape::Foreign);
        // Right prefix and length, characters outside the alphabet.
        let bad = format!("mk_{}", "-".repeat(BODY_LEN + CHECKSUM_LEN));
        assert_eq!(shape(&bad), KeyShape::Malformed);
        // A multibyte character of the right byte length is not ours.
        let multibyte = format!(
            "mk_{}é{}",
            "a".repeat(BODY_LEN - 1),
            "0".repeat(CHECKSUM_LEN - 1)
        );
        assert_eq!(multibyte.len(), KEY_LEN);
        assert_eq!(shape(&multibyte), KeyShape::Malformed);
    }

    #[test]
    fn display_prefix_respects_character_boundaries() {
        assert_eq!(display_prefix("mk_abc123"), "mk_abc123");
        assert_eq!(display_prefix("short"), "short");
        assert_eq!(display_prefix("ééééééééééé"), "ééééééééé");
    }

    /// An RNG that always fails, as getrandom does when the OS cannot serve it.
    struct BrokenRng;
    impl rand::RngCore for BrokenRng {
        fn next_u32(&mut self) -> u32 {
            unreachable!()
        }
        fn next_u64(&mut self) -> u64 {
            unreachable!()
        }
        fn fill_bytes(&mut self, _: &mut [u8]) {
            unreachable!()
        }
        fn try_fill_bytes(&mut self, _: &mut [u8]) -> Result<(), rand::Error> {
            Err(rand::Error::new(std::io::Error::other("no entropy")))
        }
    }

    #[test]
    fn rng_failure_is_an_error_never_a_key() {
        assert!(generate(&mut BrokenRng).is_err());
    }

    /// An RNG that returns only bytes the rejection step must drop, then good ones.
    struct MostlyRejectedRng(u32);
    impl rand::RngCore for MostlyRejectedRng {
        fn next_u32(&mut self) -> u32 {
            unreachable!()
        }
        fn next_u64(&mut self) -> u64 {
            unreachable!()
        }
        fn fill_bytes(&mut self, _: &mut [u8]) {
            unreachable!()
        }
        fn try_fill_bytes(&mut self, dest: &mut [u8]) -> Result<(), rand::Error> {
            self.0 += 1;
            let byte = if self.0 < 5 { 255 } else { 61 };
            dest.fill(byte);
            Ok(())
        }
    }

    #[test]
    fn rejected_bytes_never_reach_the_key() {
        let key = generate(&mut MostlyRejectedRng(0)).unwrap();
        assert_eq!(&key[3..46], "z".repeat(BODY_LEN));
    }

    #[test]
    fn characters_are_uniform_over_the_alphabet() {
        let mut rng = StdRng::seed_from_u64(42);
        let mut counts = [0u64; 62];
        let keys = 20_000;
        for _ in 0..keys {
            let key = generate(&mut rng).unwrap();
            for b in key[3..3 + BODY_LEN].bytes() {
                counts[ALPHABET.iter().position(|&a| a == b).unwrap()] += 1;
            }
        }
        let expected = (keys * BODY_LEN) as f64 / 62.0;
        let chi2: f64 = counts
            .iter()
            .map(|&c| (c as f64 - expected).powi(2) / expected)
            .sum();
        // 61 degrees of freedom: the 0.999 quantile is about 100.9.
        assert!(chi2 < 100.9, "chi-square {chi2}");
    }

    /// An independent oracle: bitwise CRC-32 and base 62 by division, written
    /// from the format's description rather than from the code above.
    fn reference_shape(s: &str) -> KeyShape {
        fn crc32_bitwise(data: &[u8]) -> u32 {
            let mut crc = !0u32;
            for &byte in data {
                crc ^= u32::from(byte);
                for _ in 0..8 {
                    crc = if crc & 1 == 1 {
                        (crc >> 1) ^ 0xEDB8_8320
                    } else {
                        crc >> 1
                    };
                }
            }
            !crc
        }
        let b = s.as_bytes();
        if b.is_empty() || b.len() > 1024 {
            return KeyShape::Malformed;
        }
        if b.len() != 52 || &b[..3] != b"mk_" {
            return KeyShape::Foreign;
        }
        let body = &b[3..46];
        if !body.iter().all(u8::is_ascii_alphanumeric) {
            return KeyShape::Malformed;
        }
        let mut n = u64::from(crc32_bitwise(body));
        let mut digits = Vec::new();
        for _ in 0..6 {
            digits.push(ALPHABET[(n % 62) as usize]);
            n /= 62;
        }
        digits.reverse();
        if digits == b[46..] {
            KeyShape::WellFormed
        } else {
            KeyShape::Malformed
        }
    }

    /// One million generated inputs: random text of every kind and length
    /// around the limits, and real keys mutated in one or more places.
    #[test]
    fn a_million_generated_inputs_classify_like_the_reference() {
        let mut rng = StdRng::seed_from_u64(0x6d6b5f);
        let pools: [&[char]; 4] = [
            &['m', 'k', '_', 'a', 'Z', '0', '9'],
            &['\0', '\u{1}', '\n', '\u{7f}', ' ', '\'', '\\'],
            &['é', 'ß', '鍵', '🔑', '\u{202e}'],
            &['-', '+', '/', '=', '%', '.'],
        ];
        let real_keys: Vec<Vec<char>> = (0..1024)
            .map(|_| generate(&mut rng).unwrap().chars().collect())
            .collect();
        let mut seen = [0usize; 3];
        for case in 0..1_000_000u32 {
            let input = match case % 4 {
                // A real key with a few characters replaced, inserted or removed.
                0 | 1 => {
                    let mut key = real_keys[rng.gen_range(0..real_keys.len())].clone();
                    for _ in 0..rng.gen_range(0..3) {
                        let pos = rng.gen_range(0..key.len());
                        match rng.gen_range(0..3) {
                            0 => key[pos] = ALPHABET[rng.gen_range(0..62)] as char,
                            1 => key.insert(pos, pools[rng.gen_range(0..4)][0]),
                            _ => {
                                key.remove(pos);
                            }
                        }
                    }
                    key.into_iter().collect::<String>()
                }
                // "mk_" and 49 random alphabet characters.
                2 => {
                    let tail: String = (0..49)
                        .map(|_| ALPHABET[rng.gen_range(0..62)] as char)
                        .collect();
                    format!("mk_{tail}")
                }
                // Random characters of every kind, lengths around the limits.
                _ => {
                    let len = *[0usize, 1, 51, 52, 53, 1023, 1024, 1025]
                        .get(rng.gen_range(0..16))
                        .unwrap_or(&rng.gen_range(0..80));
                    let pool = pools[rng.gen_range(0..4)];
                    if len > 80 {
                        // Long ones: one character repeated, a few others spliced in.
                        let mut chars = vec![pool[0]; len];
                        for _ in 0..4 {
                            chars[rng.gen_range(0..len)] = pool[rng.gen_range(0..pool.len())];
                        }
                        chars.into_iter().collect()
                    } else {
                        (0..len)
                            .map(|_| pool[rng.gen_range(0..pool.len())])
                            .collect()
                    }
                }
            };
            let got = shape(&input);
            assert_eq!(got, reference_shape(&input), "case {case}: {input:?}");
            seen[got as usize] += 1;
        }
        // The generator reached every class.
        assert!(seen.iter().all(|&n| n > 1000), "{seen:?}");
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(20_000))]

        #[test]
        fn shape_never_panics_and_bounds_hold(s in ".{0,1100}") {
            let got = shape(&s);
            if s.is_empty() || s.len() > MAX_KEY_BYTES {
                prop_assert_eq!(got, KeyShape::Malformed);
            }
            if got == KeyShape::WellFormed {
                prop_assert_eq!(s.len(), KEY_LEN);
            }
        }

    }
}
