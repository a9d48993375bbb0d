//! NVRTC (through cudarc, loaded at first use): compile a `KernelKey` to a CUBIN for one GPU
//! architecture, with the compiler's log (warnings, and ptxas's register and spill counts).

use std::ffi::{c_char, CString};
use std::fmt;
use std::sync::OnceLock;

use cudarc::nvrtc::sys::{self as nv, nvrtcResult};

use super::kernels::{KernelKey, HEADERS};
use crate::error::{Error, Result};

/// A GPU architecture to compile for: `sm_80`, `sm_90a`, ...
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Arch {
    /// `10 * major + minor` of the compute capability.
    pub number: u32,
    /// Whether the arch-specific (`a`) feature set is targeted.
    pub specific: bool,
}

impl Arch {
    /// The architecture to build for a device of compute capability `major.minor`: its exact
    /// one, with the arch-specific feature set on 9.0 (Hopper's wgmma and setmaxnreg need it).
    pub fn for_capability(major: u32, minor: u32) -> Arch {
        Arch {
            number: 10 * major + minor,
            specific: (major, minor) == (9, 0),
        }
    }

    /// Parse `sm_XY` or `sm_XYa`.
    pub fn parse(text: &str) -> Result<Arch> {
        let invalid = || Error::invalid("arch", "an architecture like 'sm_80' or 'sm_90a'", text);
        let digits = text.strip_prefix("sm_").ok_or_else(invalid)?;
        let (digits, specific) = match digits.strip_suffix('a') {
            Some(d) => (d, true),
            None => (digits, false),
        };
        if digits.len() < 2 || !digits.bytes().all(|b| b.is_ascii_digit()) {
            return Err(invalid());
        }
        let number = digits.parse().map_err(|_| invalid())?;
        Ok(Arch { number, specific })
    }
}

impl fmt::Display for Arch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "sm_{}{}",
            self.number,
            if self.specific { "a" } else { "" }
        )
    }
}

/// What to install when libnvrtc is missing.
pub const INSTALL_HINT: &str = "libnvrtc (NVRTC, the CUDA runtime compiler) could not be loaded; \
install the one matching torch's CUDA version: `pip install nvidia-cuda-nvrtc-cu12` for CUDA 12 \
or `pip install nvidia-cuda-nvrtc` for CUDA 13 (natten_rs finds it inside the `nvidia` package)";

/// Check that libnvrtc can be loaded; cudarc's loader panics on a missing library, so every
/// entry point here calls this first. Success is remembered; failure is not (a later attempt
/// may find a library that Python has loaded since).
pub fn ensure_library() -> Result<()> {
    static FOUND: OnceLock<()> = OnceLock::new();
    if FOUND.get().is_some() {
        return Ok(());
    }
    // SAFETY: only tries to dlopen libnvrtc under its usual names.
    if unsafe { nv::is_culib_present() } {
        let _ = FOUND.set(());
        return Ok(());
    }
    Err(Error::Kernel {
        message: INSTALL_HINT.into(),
        log: String::new(),
    })
}

fn check(what: &str, result: nvrtcResult, log: &str) -> Result<()> {
    match result {
        nvrtcResult::NVRTC_SUCCESS => Ok(()),
        other => Err(Error::Kernel {
            message: format!("NVRTC {what} failed: {other:?}"),
            log: log.to_string(),
        }),
    }
}

/// NVRTC's version `(major, minor)`.
pub fn version() -> Result<(i32, i32)> {
    ensure_library()?;
    let (mut major, mut minor) = (0, 0);
    // SAFETY: two valid out-pointers.
    check(
        "version query",
        unsafe { nv::nvrtcVersion(&mut major, &mut minor) },
        "",
    )?;
    Ok((major, minor))
}

/// The architectures (`10 * major + minor`) this NVRTC can generate code for.
pub fn supported_archs() -> Result<Vec<u32>> {
    ensure_library()?;
    let mut count = 0;
    // SAFETY: a valid out-pointer.
    check(
        "arch query",
        unsafe { nv::nvrtcGetNumSupportedArchs(&mut count) },
        "",
    )?;
    let mut archs = vec![0i32; usize::try_from(count).unwrap_or(0)];
    // SAFETY: `archs` holds the `count` entries NVRTC writes.
    check(
        "arch query",
        unsafe { nv::nvrtcGetSupportedArchs(archs.as_mut_ptr()) },
        "",
    )?;
    Ok(archs.into_iter().map(|a| a as u32).collect())
}

/// Refuse an architecture this NVRTC cannot compile for, naming the ones it can.
pub fn check_arch(arch: Arch) -> Result<()> {
    let supported = supported_archs()?;
    if supported.contains(&arch.number) {
        return Ok(());
    }
    let (major, minor) = version()?;
    let names: Vec<String> = supported.iter().map(|n| format!("sm_{n}")).collect();
    Err(Error::invalid(
        "arch",
        format!(
            "an architecture NVRTC {major}.{minor} supports ({}); a newer nvidia-cuda-nvrtc \
             supports newer GPUs",
            names.join(", ")
        ),
        arch.to_string(),
    ))
}

/// Whether kernels compile with source line numbers, for profilers that attribute counters to
/// lines of kernels/*.cu (Nsight Compute, nvdisasm): `NATTEN_RS_LINEINFO=1`. The code is the
/// same.
pub fn line_info() -> bool {
    std::env::var_os("NATTEN_RS_LINEINFO").is_some_and(|v| v == "1")
}

/// The options a variant is compiled with (before any fallback, see `compile`).
pub fn options(key: &KernelKey, arch: Arch) -> Vec<String> {
    let mut options = vec![
        format!("--gpu-architecture={arch}"),
        "--std=c++17".to_string(),
        // ptxas's resource report (registers, spills) into the log.
        "--ptxas-options=-v".to_string(),
    ];
    if line_info() {
        options.push("--generate-line-info".to_string());
    }
    options.extend(key.defines());
    options
}

/// A compiled program.
#[derive(Clone, Debug)]
pub struct Compiled {
    /// The CUBIN image.
    pub cubin: Vec<u8>,
    /// NVRTC's log (warnings, ptxas's report).
    pub log: String,
}

/// Compile `key` for `arch`. NVRTC versions that do not know `--ptxas-options` compile without
/// the resource report.
pub fn compile(key: &KernelKey, arch: Arch) -> Result<Compiled> {
    ensure_library()?;
    let options = options(key, arch);
    match compile_with(key, &options) {
        Err(Error::Kernel { message, .. }) if message.contains("NVRTC_ERROR_INVALID_OPTION") => {
            let plain: Vec<String> = options
                .into_iter()
                .filter(|o| !o.starts_with("--ptxas-options"))
                .collect();
            compile_with(key, &plain)
        }
        result => result,
    }
}

/// A program handle that is destroyed when dropped.
struct Program(nv::nvrtcProgram);

impl Drop for Program {
    fn drop(&mut self) {
        // SAFETY: the handle came from nvrtcCreateProgram and is destroyed once.
        unsafe { nv::nvrtcDestroyProgram(&mut self.0) };
    }
}

fn c_string(text: &str) -> Result<CString> {
    CString::new(text).map_err(|_| Error::Kernel {
        message: "kernel source or option holds a NUL byte".into(),
        log: String::new(),
    })
}

fn compile_with(key: &KernelKey, options: &[String]) -> Result<Compiled> {
    let source = c_string(key.source.text())?;
    let name = c_string(key.source.file_name())?;
    let names: Vec<CString> = HEADERS
        .iter()
        .map(|h| c_string(h.0))
        .collect::<Result<_>>()?;
    let texts: Vec<CString> = HEADERS
        .iter()
        .map(|h| c_string(h.1))
        .collect::<Result<_>>()?;
    let headers: Vec<*const c_char> = texts.iter().map(|t| t.as_ptr()).collect();
    let include_names: Vec<*const c_char> = names.iter().map(|n| n.as_ptr()).collect();
    let mut handle = std::ptr::null_mut();
    // SAFETY: every pointer is a NUL-terminated string alive until the program is destroyed
    // (they outlive `program`, dropped first at the end of this function); `headers` and
    // `include_names` hold one entry per header.
    let created = unsafe {
        nv::nvrtcCreateProgram(
            &mut handle,
            source.as_ptr(),
            name.as_ptr(),
            HEADERS.len() as i32,
            headers.as_ptr(),
            include_names.as_ptr(),
        )
    };
    check("program creation", created, "")?;
    let program = Program(handle);
    let options: Vec<CString> = options.iter().map(|o| c_string(o)).collect::<Result<_>>()?;
    let pointers: Vec<*const c_char> = options.iter().map(|o| o.as_ptr()).collect();
    // SAFETY: a live program; `pointers` holds `len` option strings alive for the call.
    let compiled =
        unsafe { nv::nvrtcCompileProgram(program.0, pointers.len() as i32, pointers.as_ptr()) };
    let log = program_log(&program)?;
    check(&format!("compilation of {}", key.name()), compiled, &log)?;
    Ok(Compiled {
        cubin: cubin(&program)?,
        log,
    })
}

fn program_log(program: &Program) -> Result<String> {
    let mut size = 0usize;
    // SAFETY: a live program and a valid out-pointer.
    check(
        "log query",
        unsafe { nv::nvrtcGetProgramLogSize(program.0, &mut size) },
        "",
    )?;
    let mut bytes = vec![0u8; size.max(1)];
    // SAFETY: `bytes` holds the `size` bytes (with the NUL) NVRTC writes.
    let got = unsafe { nv::nvrtcGetProgramLog(program.0, bytes.as_mut_ptr().cast()) };
    check("log query", got, "")?;
    let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
    Ok(String::from_utf8_lossy(&bytes[..end]).into_owned())
}

fn cubin(program: &Program) -> Result<Vec<u8>> {
    let mut size = 0usize;
    // SAFETY: a compiled program and a valid out-pointer.
    check(
        "CUBIN query",
        unsafe { nv::nvrtcGetCUBINSize(program.0, &mut size) },
        "",
    )?;
    let mut bytes = vec![0u8; size];
    // SAFETY: `bytes` holds the `size` bytes NVRTC writes.
    let got = unsafe { nv::nvrtcGetCUBIN(program.0, bytes.as_mut_ptr().cast()) };
    check("CUBIN query", got, "")?;
    Ok(bytes)
}

/// ptxas's resource report for one kernel, read from a compile log.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Resources {
    /// Registers per thread.
    pub registers: u32,
    /// Bytes of spill stores.
    pub spill_stores: u32,
    /// Bytes of spill loads.
    pub spill_loads: u32,
    /// Bytes of stack frame.
    pub stack: u32,
}

/// The resource report of kernel `symbol` in `log`, when ptxas wrote one.
pub fn resources(log: &str, symbol: &str) -> Option<Resources> {
    let quoted = format!("'{symbol}'");
    let section = log
        .split("Compiling entry function")
        .skip(1)
        .find(|s| s.trim_start().starts_with(&quoted))?;
    let number_before = |what: &str| -> Option<u32> {
        let head = &section[..section.find(what)?];
        head.split_whitespace().last()?.parse().ok()
    };
    Some(Resources {
        registers: number_before(" registers")?,
        spill_stores: number_before(" bytes spill stores")?,
        spill_loads: number_before(" bytes spill loads")?,
        stack: number_before(" bytes stack frame")?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arch_names_round_trip() {
        for name in ["sm_80", "sm_86", "sm_90a", "sm_100", "sm_120a"] {
            assert_eq!(Arch::parse(name).unwrap().to_string(), name);
        }
        for bad in ["80", "sm80", "sm_", "sm_8", "sm_9x", "compute_80", "sm_90b"] {
            assert!(
                matches!(Arch::parse(bad), Err(Error::Invalid { arg: "arch", .. })),
                "{bad}"
            );
        }
        assert_eq!(Arch::for_capability(9, 0).to_string(), "sm_90a");
        assert_eq!(Arch::for_capability(8, 6).to_string(), "sm_86");
        assert_eq!(Arch::for_capability(12, 0).to_string(), "sm_120");
    }

    #[test]
    fn compiles_a_variant_when_libnvrtc_is_present() {
        if ensure_library().is_err() {
            eprintln!("libnvrtc is not on the loader path: skipped");
            return;
        }
        let key = super::super::kernels::representative_keys()[5];
        let compiled = compile(&key, Arch::parse("sm_80").unwrap()).unwrap();
        assert!(!compiled.cubin.is_empty());
        assert!(!compiled.log.contains("warning"), "{}", compiled.log);
        for f in key.source.functions() {
            let r = resources(&compiled.log, f.symbol()).expect("a ptxas report");
            assert!(r.registers > 0);
        }
    }

    #[test]
    fn resources_are_read_per_kernel() {
        let log = "ptxas info    : 0 bytes gmem\n\
            ptxas info    : Compiling entry function 'na_b' for 'sm_90a'\n\
            ptxas info    : Function properties for na_b\n\
            ptxas         .     8 bytes stack frame, 4 bytes spill stores, 12 bytes spill loads\n\
            ptxas info    : Used 40 registers, used 1 barriers, 2048 bytes smem\n\
            ptxas info    : Compiling entry function 'na_a' for 'sm_90a'\n\
            ptxas info    : Function properties for na_a\n\
            ptxas         .     0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads\n\
            ptxas info    : Used 64 registers, used 0 barriers\n";
        let b = resources(log, "na_b").unwrap();
        assert_eq!(
            (b.registers, b.spill_stores, b.spill_loads, b.stack),
            (40, 4, 12, 8)
        );
        let a = resources(log, "na_a").unwrap();
        assert_eq!(
            (a.registers, a.spill_stores, a.spill_loads, a.stack),
            (64, 0, 0, 0)
        );
        assert_eq!(resources(log, "na_c"), None);
        assert_eq!(resources(log, "na"), None);
    }
}
