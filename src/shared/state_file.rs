//! The state file, `pg_stat/makima_keys.state`: what a clean shutdown
//! saves (slots, statistics, budgets, and so every `last_used_at` owed)
//! and the next start loads.
//!
//! Layout, little-endian as the machine writes it (the file never moves
//! between machines: it lives in the data directory and a crash deletes it):
//!
//! | bytes | what |
//! | --- | --- |
//! | 8 | magic `MKSTATE\0` |
//! | 4 | format ([`FORMAT`]) |
//! | 4 | PostgreSQL major the server runs |
//! | 4 + n | length and text of the makima_keys version that wrote it |
//! | 3 × 4 | sizes of a slot, a statistics entry and a budget record |
//! | 3 × 8 | how many of each follow |
//! | ... | the records |
//! | 4 | CRC-32 of every byte before it |
//!
//! [`encode`] and [`decode`] are pure. A file that does not decode (not
//! ours, truncated, corrupt, of another format, major, version or record
//! layout) is never partly loaded: [`load`] sets it aside, whole, and logs
//! why.

use std::fs;
use std::io::Write;

use pgrx::pg_sys;

use super::budgets::BucketEntry;
use super::stats::StatsEntry;
use crate::policy::Micros;

pub(crate) const STATE_FILE: &str = "pg_stat/makima_keys.state";
const REJECTED_FILE: &str = "pg_stat/makima_keys.state.rejected";
const MAGIC: &[u8; 8] = b"MKSTATE\0";
/// Bumped whenever a record's fields change meaning, size or order.
pub(crate) const FORMAT: u32 = 2;

/// A database slot as saved.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct SavedSlot {
    pub(crate) db: u32,
    pub(crate) padding: u32,
    pub(crate) not_found: u64,
    pub(crate) malformed: u64,
    pub(crate) since: Micros,
    pub(crate) covered_from: Micros,
    pub(crate) announced_until: Micros,
}

/// Everything a state file holds.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Saved {
    pub(crate) slots: Vec<SavedSlot>,
    pub(crate) stats: Vec<StatsEntry>,
    pub(crate) buckets: Vec<BucketEntry>,
}

/// Who wrote the file: it loads only into the same.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Writer {
    pub(crate) pg_major: u32,
    pub(crate) version: String,
}

impl Writer {
    pub(crate) fn this_build() -> Writer {
        Writer {
            pg_major: pg_sys::PG_VERSION_NUM / 10_000,
            version: env!("CARGO_PKG_VERSION").to_string(),
        }
    }
}

/// Why a file was not loaded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Rejected {
    NotOurs,
    Truncated,
    Corrupt,
    OtherFormat(u32),
    OtherMajor(u32),
    OtherVersion(String),
    OtherLayout,
}

impl std::fmt::Display for Rejected {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Rejected::NotOurs => write!(f, "it is not a makima_keys state file of this format"),
            Rejected::Truncated => write!(f, "it is truncated"),
            Rejected::Corrupt => write!(f, "its checksum does not match (corrupt)"),
            Rejected::OtherFormat(n) => write!(f, "it is of format {n}, not {FORMAT}"),
            Rejected::OtherMajor(n) => write!(f, "it was written by PostgreSQL {n}"),
            Rejected::OtherVersion(v) => write!(f, "it was written by makima_keys {v}"),
            Rejected::OtherLayout => write!(f, "its records are of another layout"),
        }
    }
}

/// Record types written byte for byte: `repr(C)` structs of integers and
/// byte arrays, with explicit (zeroed) padding, so every byte is
/// initialised and every bit pattern is a valid value.
///
/// # Safety
/// Implemented only for such types.
unsafe trait Record: Copy {}
// SAFETY: all three are repr(C) integers and byte arrays, padding explicit.
unsafe impl Record for SavedSlot {}
// SAFETY: as above.
unsafe impl Record for StatsEntry {}
// SAFETY: as above.
unsafe impl Record for BucketEntry {}

fn push<T: Record>(out: &mut Vec<u8>, value: &T) {
    // SAFETY: `Record` types have every byte initialised.
    let bytes = unsafe {
        std::slice::from_raw_parts(std::ptr::from_ref(value).cast::<u8>(), size_of::<T>())
    };
    out.extend_from_slice(bytes);
}

fn sizes() -> [u32; 3] {
    [
        size_of::<SavedSlot>() as u32,
        size_of::<StatsEntry>() as u32,
        size_of::<BucketEntry>() as u32,
    ]
}

/// The file's bytes. Pure.
pub(crate) fn encode(writer: &Writer, saved: &Saved) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&FORMAT.to_le_bytes());
    out.extend_from_slice(&writer.pg_major.to_le_bytes());
    out.extend_from_slice(&(writer.version.len() as u32).to_le_bytes());
    out.extend_from_slice(writer.version.as_bytes());
    for size in sizes() {
        out.extend_from_slice(&size.to_le_bytes());
    }
    for count in [saved.slots.len(), saved.stats.len(), saved.buckets.len()] {
        out.extend_from_slice(&(count as u64).to_le_bytes());
    }
    saved.slots.iter().for_each(|r| push(&mut out, r));
    saved.stats.iter().for_each(|r| push(&mut out, r));
    saved.buckets.iter().for_each(|r| push(&mut out, r));
    let crc = crc32fast::hash(&out);
    out.extend_from_slice(&crc.to_le_bytes());
    out
}

struct Reader<'a> {
    input: &'a [u8],
}

impl<'a> Reader<'a> {
    fn bytes(&mut self, n: usize) -> Result<&'a [u8], Rejected> {
        if self.input.len() < n {
            return Err(Rejected::Truncated);
        }
        let (taken, rest) = self.input.split_at(n);
        self.input = rest;
        Ok(taken)
    }

    fn u32(&mut self) -> Result<u32, Rejected> {
        Ok(u32::from_le_bytes(
            self.bytes(4)?.try_into().expect("4 bytes"),
        ))
    }

    fn u64(&mut self) -> Result<u64, Rejected> {
        Ok(u64::from_le_bytes(
            self.bytes(8)?.try_into().expect("8 bytes"),
        ))
    }

    fn records<T: Record>(&mut self, count: u64) -> Result<Vec<T>, Rejected> {
        let size = size_of::<T>();
        let bytes = self.bytes(
            usize::try_from(count)
                .ok()
                .and_then(|c| c.checked_mul(size))
                .ok_or(Rejected::Truncated)?,
        )?;
        Ok(bytes
            .chunks_exact(size)
            // SAFETY: `size` bytes, and any bytes are a valid `Record`.
            .map(|chunk| unsafe { std::ptr::read_unaligned(chunk.as_ptr().cast::<T>()) })
            .collect())
    }
}

/// What `bytes` hold, if a build like `writer` wrote them whole. Pure.
pub(crate) fn decode(bytes: &[u8], writer: &Writer) -> Result<Saved, Rejected> {
    let mut r = Reader { input: bytes };
    if r.bytes(MAGIC.len()).map_err(|_| Rejected::NotOurs)? != MAGIC {
        return Err(Rejected::NotOurs);
    }
    // The checksum first: a truncated or corrupt file is said to be so,
    // whatever its header claims.
    if bytes.len() < MAGIC.len() + 4 {
        return Err(Rejected::Truncated);
    }
    let (body, crc) = bytes.split_at(bytes.len() - 4);
    let crc_matches = crc32fast::hash(body).to_le_bytes() == crc;
    let format = r.u32()?;
    if format != FORMAT {
        return Err(Rejected::OtherFormat(format));
    }
    let pg_major = r.u32()?;
    let length = r.u32()? as usize;
    let version = String::from_utf8_lossy(r.bytes(length)?).into_owned();
    let mut saved_sizes = [0u32; 3];
    for size in &mut saved_sizes {
        *size = r.u32()?;
    }
    let counts = [r.u64()?, r.u64()?, r.u64()?];
    let expected = counts
        .iter()
        .zip(sizes())
        .try_fold(0u64, |sum, (&count, size)| {
            count.checked_mul(u64::from(size))?.checked_add(sum)
        })
        .and_then(|records| records.checked_add(4));
    match expected {
        Some(n) if (r.input.len() as u64) < n => return Err(Rejected::Truncated),
        Some(n) if r.input.len() as u64 == n => {}
        _ if !crc_matches => return Err(Rejected::Corrupt),
        _ => return Err(Rejected::OtherLayout),
    }
    if !crc_matches {
        return Err(Rejected::Corrupt);
    }
    if pg_major != writer.pg_major {
        return Err(Rejected::OtherMajor(pg_major));
    }
    if version != writer.version {
        return Err(Rejected::OtherVersion(version));
    }
    if saved_sizes != sizes() {
        return Err(Rejected::OtherLayout);
    }
    Ok(Saved {
        slots: r.records(counts[0])?,
        stats: r.records(counts[1])?,
        buckets: r.records(counts[2])?,
    })
}

/// Writes `bytes` as the state file durably: a temporary file, fsynced,
/// renamed over the old one, and the directory fsynced (PostgreSQL's
/// `durable_rename`). Every failure is logged with the OS's reason, and
/// nothing is left half-written under the real name.
pub(crate) fn save(bytes: &[u8]) {
    let temporary = format!("{STATE_FILE}.tmp");
    let written = fs::File::create(&temporary)
        .and_then(|mut file| file.write_all(bytes).and_then(|()| file.sync_all()));
    if let Err(error) = written {
        pgrx::log!(
            "makima_keys: could not write \"{temporary}\": {error}; the counts, budgets and \
             last_used_at owed in shared memory are not saved"
        );
        let _ = fs::remove_file(&temporary);
        return;
    }
    let from = std::ffi::CString::new(temporary.as_str()).expect("no NUL in a path");
    let to = std::ffi::CString::new(STATE_FILE).expect("no NUL in a path");
    // SAFETY: PostgreSQL's durable rename of two paths in our data
    // directory; it logs its own failure at LOG and returns -1.
    if unsafe { pg_sys::durable_rename(from.as_ptr(), to.as_ptr(), pg_sys::LOG as i32) } != 0 {
        pgrx::log!("makima_keys: the state in shared memory is not saved");
        let _ = fs::remove_file(&temporary);
    }
}

/// Reads the state file and removes it (a crash before the next clean
/// shutdown must start afresh). A file that does not decode is set aside
/// as `makima_keys.state.rejected`, whole, with a WARNING saying why.
pub(crate) fn load() -> Option<Saved> {
    let bytes = match fs::read(STATE_FILE) {
        Ok(bytes) => bytes,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return None,
        Err(error) => {
            pgrx::warning!(
                "makima_keys: could not read \"{STATE_FILE}\": {error}; starting afresh"
            );
            set_aside();
            return None;
        }
    };
    match decode(&bytes, &Writer::this_build()) {
        Ok(saved) => {
            // Loaded only if it is gone: a crash before the next clean
            // shutdown must start afresh, not load this again.
            if let Err(error) = fs::remove_file(STATE_FILE) {
                pgrx::warning!(
                    "makima_keys: could not remove \"{STATE_FILE}\": {error}; moving it aside, and \
                     loading it only if that works"
                );
                set_aside();
                return fs::metadata(STATE_FILE).is_err().then_some(saved);
            }
            Some(saved)
        }
        Err(why) => {
            pgrx::warning!(
                "makima_keys: \"{STATE_FILE}\" was not loaded because {why}; it is kept as \
                 \"{REJECTED_FILE}\", and the counts, budgets and last_used_at it held are not \
                 restored"
            );
            set_aside();
            None
        }
    }
}

fn set_aside() {
    if let Err(error) = fs::rename(STATE_FILE, REJECTED_FILE) {
        pgrx::warning!("makima_keys: could not rename \"{STATE_FILE}\": {error}; removing it");
        let _ = fs::remove_file(STATE_FILE);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::shared::table::EntryKey;

    fn writer() -> Writer {
        Writer {
            pg_major: 15,
            version: "0.5.0".into(),
        }
    }

    fn sample() -> Saved {
        let key = |n: u8| EntryKey { db: 5, id: [n; 16] };
        let mut entry = StatsEntry::new(key(1), 1_000);
        entry.counts[0] = 7;
        entry.pending = 2_000;
        Saved {
            slots: vec![SavedSlot {
                db: 5,
                padding: 0,
                not_found: 3,
                malformed: 4,
                since: 10,
                covered_from: 11,
                announced_until: 12,
            }],
            stats: vec![entry, StatsEntry::new(key(2), 3_000)],
            buckets: vec![BucketEntry {
                key: key(3),
                padding: 0,
                tat_high: -1,
                tat_low: 42,
                per_period: 10,
                padding_2: 0,
                period: 60_000_000,
            }],
        }
    }

    #[test]
    fn round_trip() {
        let bytes = encode(&writer(), &sample());
        assert_eq!(decode(&bytes, &writer()), Ok(sample()));
        let empty = encode(&writer(), &Saved::default());
        assert_eq!(decode(&empty, &writer()), Ok(Saved::default()));
    }

    #[test]
    fn every_truncation_is_refused_whole() {
        let bytes = encode(&writer(), &sample());
        for length in 0..bytes.len() {
            let result = decode(&bytes[..length], &writer());
            assert!(result.is_err(), "a file cut at {length} bytes loaded");
        }
        assert_eq!(
            decode(&bytes[..bytes.len() - 10], &writer()),
            Err(Rejected::Truncated)
        );
    }

    #[test]
    fn every_flipped_byte_is_refused() {
        let bytes = encode(&writer(), &sample());
        for at in 0..bytes.len() {
            let mut changed = bytes.clone();
            changed[at] ^= 0x40;
            assert!(
                decode(&changed, &writer()).is_err(),
                "byte {at} changed and it loaded"
            );
        }
        let mut changed = bytes.clone();
        let last_record = bytes.len() - 10;
        changed[last_record] ^= 1;
        assert_eq!(decode(&changed, &writer()), Err(Rejected::Corrupt));
    }

    #[test]
    fn another_writer_is_refused() {
        let bytes = encode(&writer(), &sample());
        let other_major = Writer {
            pg_major: 16,
            ..writer()
        };
        assert_eq!(decode(&bytes, &other_major), Err(Rejected::OtherMajor(15)));
        let other_version = Writer {
            version: "0.4.0".into(),
            ..writer()
        };
        assert_eq!(
            decode(&bytes, &other_version),
            Err(Rejected::OtherVersion("0.5.0".into()))
        );
    }

    #[test]
    fn another_format_or_an_old_file_is_refused() {
        let mut bytes = encode(&writer(), &sample());
        bytes[8] = 3;
        assert_eq!(decode(&bytes, &writer()), Err(Rejected::OtherFormat(3)));
        assert_eq!(
            decode(b"MKSTATE1\0\0\0\0", &writer()),
            Err(Rejected::NotOurs)
        );
        assert_eq!(decode(b"", &writer()), Err(Rejected::NotOurs));
    }

    #[test]
    fn trailing_bytes_are_refused() {
        let mut bytes = encode(&writer(), &sample());
        bytes.extend_from_slice(&[0; 8]);
        assert!(decode(&bytes, &writer()).is_err());
    }
}
