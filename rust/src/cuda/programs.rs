//! Compiled programs: looked up in memory, then on disk, then compiled with NVRTC (and saved
//! to both). Needs libnvrtc but no GPU, so CI compiles every kernel through this very path.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::Instant;

use super::cache::{self, Entry, StableHasher};
use super::kernels::{KernelKey, HEADERS};
use super::lock;
use super::nvrtc::{self, Arch, Resources};
use crate::error::Result;

/// Where a program came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Origin {
    /// Already in this process.
    Memory,
    /// Read from the disk cache.
    Disk,
    /// Compiled by NVRTC now.
    Compiled,
}

impl Origin {
    /// Lower-case name for reports.
    pub fn name(self) -> &'static str {
        match self {
            Origin::Memory => "memory",
            Origin::Disk => "disk",
            Origin::Compiled => "compiled",
        }
    }
}

/// A compiled variant for one architecture.
#[derive(Debug)]
pub struct Program {
    /// The variant.
    pub key: KernelKey,
    /// The architecture it runs on.
    pub arch: Arch,
    /// The CUBIN image.
    pub cubin: Vec<u8>,
    /// NVRTC's log.
    pub log: String,
}

/// What fetching a program did: for logs and for `compile_kernels`.
#[derive(Clone, Debug)]
pub struct Report {
    /// `KernelKey::name` of the variant.
    pub variant: String,
    /// The architecture.
    pub arch: Arch,
    /// Where the binary came from.
    pub origin: Origin,
    /// Seconds spent (compiling, or reading the cache).
    pub seconds: f64,
    /// NVRTC's log.
    pub log: String,
    /// ptxas's report per kernel of the module (`None` where the log has none).
    pub kernels: Vec<(&'static str, Option<Resources>)>,
}

impl Report {
    fn new(program: &Program, origin: Origin, seconds: f64) -> Report {
        let kernels = program
            .key
            .source
            .functions()
            .iter()
            .map(|f| (f.symbol(), nvrtc::resources(&program.log, f.symbol())))
            .collect();
        Report {
            variant: program.key.name(),
            arch: program.arch,
            origin,
            seconds,
            log: program.log.clone(),
            kernels,
        }
    }
}

/// One variant's place in memory: empty until it is compiled (or read from disk).
type Slot = Arc<Mutex<Option<Arc<Program>>>>;

/// Variants in memory by key, architecture and whether they carry line information
/// (`nvrtc::line_info`), which changes the binary though not the key.
type Programs = HashMap<(KernelKey, Arch, bool), Slot>;

fn programs() -> MutexGuard<'static, Programs> {
    static PROGRAMS: OnceLock<Mutex<Programs>> = OnceLock::new();
    lock(PROGRAMS.get_or_init(Mutex::default))
}

/// The program for `key` on `arch`, from memory, the disk cache or NVRTC (in that order). Each
/// variant has its own lock, held while compiling: concurrent first uses of one variant compile
/// it once, while different variants compile side by side (NVRTC takes one program per thread).
pub fn fetch(key: KernelKey, arch: Arch) -> Result<(Arc<Program>, Report)> {
    let started = Instant::now();
    let slot = programs()
        .entry((key, arch, nvrtc::line_info()))
        .or_default()
        .clone();
    let mut slot = lock(&slot);
    if let Some(program) = slot.as_ref() {
        let report = Report::new(program, Origin::Memory, 0.0);
        return Ok((program.clone(), report));
    }
    nvrtc::check_arch(arch)?;
    let hash = cache_key(&key, arch)?;
    let dir = cache::directory();
    let (entry, origin) = match dir.as_deref().and_then(|d| cache::load(d, hash)) {
        Some(entry) => (entry, Origin::Disk),
        None => {
            let compiled = nvrtc::compile(&key, arch)?;
            let entry = Entry {
                log: compiled.log,
                binary: compiled.cubin,
            };
            if let Some(dir) = &dir {
                // The cache only saves time: a read-only or full disk must not fail the op.
                let _ = cache::store(dir, hash, &entry);
            }
            (entry, Origin::Compiled)
        }
    };
    let program = Arc::new(Program {
        key,
        arch,
        cubin: entry.binary,
        log: entry.log,
    });
    *slot = Some(program.clone());
    let report = Report::new(&program, origin, started.elapsed().as_secs_f64());
    Ok((program, report))
}

/// Forget the programs held in memory (modules already loaded on a device stay loaded), so the
/// next fetch goes to the disk cache or NVRTC.
pub fn forget() {
    programs().clear();
}

/// Stable hash of everything that determines the binary: the source and header texts, the
/// options, the architecture and NVRTC's version.
fn cache_key(key: &KernelKey, arch: Arch) -> Result<u64> {
    let (major, minor) = nvrtc::version()?;
    let mut hasher = StableHasher::new();
    for (_, text) in HEADERS {
        hasher.write_part(text.as_bytes());
    }
    hasher.write_part(key.source.text().as_bytes());
    for option in nvrtc::options(key, arch) {
        hasher.write_part(option.as_bytes());
    }
    hasher
        .write_part(arch.to_string().as_bytes())
        .write_part(format!("nvrtc {major}.{minor}").as_bytes());
    Ok(hasher.finish())
}
