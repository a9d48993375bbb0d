//! The on-disk cache of compiled kernels: one file per program under `$NATTEN_RS_CACHE_DIR`
//! (default `~/.cache/natten_rs`), named by a stable hash of everything that determines the
//! binary (source, options, architecture, NVRTC version). Files are written to a temporary name
//! and renamed into place, so readers never see half a file; each carries a header (magic, key,
//! lengths, checksum) so that a truncated or corrupt file reads as a miss and is rebuilt.
//!
//! The cache only ever saves time: failing to read or write it is never an error.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// First bytes of every cache file (the trailing digit is the format version).
const MAGIC: &[u8; 8] = b"NATRSKC1";
/// Bytes before the payload: magic, key, log length, binary length, checksum.
const HEADER_LEN: usize = 8 + 4 * 8;

/// FNV-1a, 64-bit: a hash that is the same on every platform, Rust version and run (unlike
/// std's `DefaultHasher`), so cache file names stay valid across builds.
#[derive(Clone, Copy, Debug)]
pub struct StableHasher(u64);

impl StableHasher {
    const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;

    /// A hasher in its initial state.
    pub fn new() -> Self {
        StableHasher(Self::OFFSET)
    }

    /// Hash `bytes`, preceded by their length so that `["ab", "c"]` and `["a", "bc"]` differ.
    pub fn write_part(&mut self, bytes: &[u8]) -> &mut Self {
        self.write_raw(&(bytes.len() as u64).to_le_bytes());
        self.write_raw(bytes)
    }

    fn write_raw(&mut self, bytes: &[u8]) -> &mut Self {
        for &b in bytes {
            self.0 = (self.0 ^ u64::from(b)).wrapping_mul(Self::PRIME);
        }
        self
    }

    /// The hash of everything written so far.
    pub fn finish(&self) -> u64 {
        self.0
    }
}

impl Default for StableHasher {
    fn default() -> Self {
        Self::new()
    }
}

/// Checksum of a payload.
fn checksum(bytes: &[u8]) -> u64 {
    StableHasher::new().write_part(bytes).finish()
}

/// What the cache holds for one program: the compiler's log (register and spill counts) and
/// the binary.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    /// NVRTC's program log.
    pub log: String,
    /// The CUBIN image.
    pub binary: Vec<u8>,
}

/// The cache directory: `$NATTEN_RS_CACHE_DIR`, else `~/.cache/natten_rs`; `None` when neither
/// can be named (the cache is then off). Read at every use, so a change takes effect at once.
pub fn directory() -> Option<PathBuf> {
    match std::env::var_os("NATTEN_RS_CACHE_DIR") {
        Some(dir) if !dir.is_empty() => Some(PathBuf::from(dir)),
        _ => std::env::var_os("HOME")
            .filter(|home| !home.is_empty())
            .map(|home| PathBuf::from(home).join(".cache").join("natten_rs")),
    }
}

/// Path of the file for `key` in `dir`.
pub fn path(dir: &Path, key: u64) -> PathBuf {
    dir.join(format!("{key:016x}.cubin"))
}

/// Serialise an entry with its header.
fn encode(key: u64, entry: &Entry) -> Vec<u8> {
    let log = entry.log.as_bytes();
    let mut payload = Vec::with_capacity(log.len() + entry.binary.len());
    payload.extend_from_slice(log);
    payload.extend_from_slice(&entry.binary);
    let mut out = Vec::with_capacity(HEADER_LEN + payload.len());
    out.extend_from_slice(MAGIC);
    for word in [
        key,
        log.len() as u64,
        entry.binary.len() as u64,
        checksum(&payload),
    ] {
        out.extend_from_slice(&word.to_le_bytes());
    }
    out.extend_from_slice(&payload);
    out
}

/// Parse a file's bytes; `None` for anything but an intact entry for `key`.
fn decode(key: u64, bytes: &[u8]) -> Option<Entry> {
    let header = bytes.get(..HEADER_LEN)?;
    if &header[..8] != MAGIC {
        return None;
    }
    let word = |n: usize| {
        let at = 8 + 8 * n;
        u64::from_le_bytes(header[at..at + 8].try_into().expect("8 bytes"))
    };
    let (stored_key, log_len, binary_len, sum) = (word(0), word(1), word(2), word(3));
    let payload = &bytes[HEADER_LEN..];
    let expected_len = log_len.checked_add(binary_len)?;
    if stored_key != key || payload.len() as u64 != expected_len || checksum(payload) != sum {
        return None;
    }
    let (log, binary) = payload.split_at(usize::try_from(log_len).ok()?);
    Some(Entry {
        log: String::from_utf8(log.to_vec()).ok()?,
        binary: binary.to_vec(),
    })
}

/// The entry for `key`, or `None` when there is no intact one. A damaged file is removed, so
/// that the rebuilt entry replaces it.
pub fn load(dir: &Path, key: u64) -> Option<Entry> {
    let path = path(dir, key);
    let bytes = fs::read(&path).ok()?;
    let entry = decode(key, &bytes);
    if entry.is_none() {
        // Best effort: a file that cannot be removed is overwritten by the next store anyway.
        let _ = fs::remove_file(&path);
    }
    entry
}

/// Write the entry for `key` atomically: to a temporary file in `dir`, then renamed over the
/// final name (a rename within one directory is atomic), so concurrent processes only ever see
/// a complete file or none.
pub fn store(dir: &Path, key: u64, entry: &Entry) -> std::io::Result<()> {
    static SERIAL: AtomicU64 = AtomicU64::new(0);
    fs::create_dir_all(dir)?;
    let serial = SERIAL.fetch_add(1, Ordering::Relaxed);
    let temp = dir.join(format!(".{key:016x}.{}.{serial}.tmp", std::process::id()));
    let written = fs::File::create(&temp).and_then(|mut file| {
        file.write_all(&encode(key, entry))?;
        file.sync_all()
    });
    let renamed = written.and_then(|()| fs::rename(&temp, path(dir, key)));
    if renamed.is_err() {
        let _ = fs::remove_file(&temp);
    }
    renamed
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "natten_rs_cache_test_{name}_{}",
            std::process::id()
        ));
        let _ = fs::remove_dir_all(&dir);
        dir
    }

    fn entry() -> Entry {
        Entry {
            log: "ptxas info    : Used 32 registers".into(),
            binary: (0..=255).collect(),
        }
    }

    #[test]
    fn fnv1a_matches_the_published_vectors() {
        let raw = |s: &str| StableHasher::new().write_raw(s.as_bytes()).finish();
        assert_eq!(raw(""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(raw("a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(raw("foobar"), 0x8594_4171_f739_67e8);
    }

    #[test]
    fn parts_are_length_prefixed() {
        let hash = |parts: &[&str]| {
            let mut h = StableHasher::new();
            parts.iter().for_each(|p| {
                h.write_part(p.as_bytes());
            });
            h.finish()
        };
        assert_ne!(hash(&["ab", "c"]), hash(&["a", "bc"]));
    }

    #[test]
    fn round_trip_and_every_damage_is_a_miss() {
        let bytes = encode(7, &entry());
        assert_eq!(decode(7, &bytes), Some(entry()));
        assert_eq!(decode(8, &bytes), None, "another key");
        for cut in [0, 5, HEADER_LEN, bytes.len() - 1] {
            assert_eq!(decode(7, &bytes[..cut]), None, "truncated at {cut}");
        }
        for at in [0, 9, HEADER_LEN + 3, bytes.len() - 1] {
            let mut flipped = bytes.clone();
            flipped[at] ^= 0x10;
            assert_eq!(decode(7, &flipped), None, "byte {at} flipped");
        }
        let mut longer = bytes.clone();
        longer.push(0);
        assert_eq!(decode(7, &longer), None, "trailing bytes");
    }

    #[test]
    fn store_then_load_leaves_no_temporary_files() {
        let dir = scratch_dir("store");
        store(&dir, 42, &entry()).unwrap();
        assert_eq!(load(&dir, 42), Some(entry()));
        let names: Vec<_> = fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(names, vec![format!("{:016x}.cubin", 42)]);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_damaged_file_is_removed_and_replaced() {
        let dir = scratch_dir("damaged");
        store(&dir, 3, &entry()).unwrap();
        let file = path(&dir, 3);
        let bytes = fs::read(&file).unwrap();
        fs::write(&file, &bytes[..bytes.len() / 2]).unwrap();
        assert_eq!(load(&dir, 3), None);
        assert!(!file.exists());
        store(&dir, 3, &entry()).unwrap();
        assert_eq!(load(&dir, 3), Some(entry()));
        fs::remove_dir_all(&dir).unwrap();
    }
}
