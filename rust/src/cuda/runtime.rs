//! The driver side: each device's primary context (the context the CUDA runtime, and so torch,
//! uses), modules loaded into it, and launches on the caller's stream. The driver library is
//! opened at first use, so none of this runs (or needs libcuda) until a CUDA tensor arrives.

use std::collections::HashMap;
use std::ffi::{c_void, CStr, CString};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

use cudarc::driver::sys::{self as cu, CUresult};

use super::kernels::{Function, KernelKey};
use super::launch::Config;
use super::nvrtc::Arch;
use super::programs::{self, Report};
use super::tma::{MapPlan, TmaParams};
use crate::error::{Error, Result};

/// A CUDA stream handle as torch gives it (`torch.cuda.Stream.cuda_stream`); 0 is the legacy
/// default stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Stream(pub u64);

fn driver_error(what: &str, code: CUresult) -> Error {
    Error::Kernel {
        message: format!("CUDA driver: {what} failed: {code:?}"),
        log: String::new(),
    }
}

fn check(what: &str, code: CUresult) -> Result<()> {
    match code {
        CUresult::CUDA_SUCCESS => Ok(()),
        other => Err(driver_error(what, other)),
    }
}

/// Open libcuda and initialise the driver API, once. cudarc's loader panics on a missing
/// library, so this checks for it first.
fn ensure_driver() -> Result<()> {
    static INIT: OnceLock<()> = OnceLock::new();
    if INIT.get().is_some() {
        return Ok(());
    }
    // SAFETY: only tries to dlopen libcuda under its usual names.
    if !unsafe { cu::is_culib_present() } {
        return Err(Error::Kernel {
            message: "the CUDA driver library (libcuda) could not be loaded".into(),
            log: String::new(),
        });
    }
    // SAFETY: cuInit may be called any number of times, from any thread.
    check("cuInit", unsafe { cu::cuInit(0) })?;
    let _ = INIT.set(());
    Ok(())
}

/// A device's primary context and architecture.
struct Device {
    context: cu::CUcontext,
    arch: Arch,
}

// SAFETY: a context handle is an opaque token that the driver accepts from any thread; it is
// only used through push/pop below and is never released (torch keeps using it).
unsafe impl Send for Device {}
// SAFETY: as above; the handle is never mutated.
unsafe impl Sync for Device {}

fn lock<T>(mutex: &'static OnceLock<Mutex<T>>) -> MutexGuard<'static, T>
where
    T: Default,
{
    super::lock(mutex.get_or_init(Mutex::default))
}

/// Device `ordinal` (torch's index: both number the devices CUDA_VISIBLE_DEVICES shows).
fn device(ordinal: i32) -> Result<Arc<Device>> {
    static DEVICES: OnceLock<Mutex<HashMap<i32, Arc<Device>>>> = OnceLock::new();
    let mut devices = lock(&DEVICES);
    if let Some(device) = devices.get(&ordinal) {
        return Ok(device.clone());
    }
    ensure_driver()?;
    let mut handle = 0;
    // SAFETY: a valid out-pointer; the driver checks the ordinal.
    check("cuDeviceGet", unsafe {
        cu::cuDeviceGet(&mut handle, ordinal)
    })?;
    let attribute = |attribute| -> Result<u32> {
        let mut value = 0;
        // SAFETY: a valid out-pointer and device handle.
        check("cuDeviceGetAttribute", unsafe {
            cu::cuDeviceGetAttribute(&mut value, attribute, handle)
        })?;
        Ok(value as u32)
    };
    use cu::CUdevice_attribute::*;
    let major = attribute(CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)?;
    let minor = attribute(CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR)?;
    let mut context = std::ptr::null_mut();
    // SAFETY: a valid out-pointer and device handle. The retain is never released: the context
    // is the runtime's (torch's) and lives as long as the process.
    check("cuDevicePrimaryCtxRetain", unsafe {
        cu::cuDevicePrimaryCtxRetain(&mut context, handle)
    })?;
    let device = Arc::new(Device {
        context,
        arch: Arch::for_capability(major, minor),
    });
    devices.insert(ordinal, device.clone());
    Ok(device)
}

/// The architecture natten_rs compiles for on device `ordinal`.
pub fn device_arch(ordinal: i32) -> Result<Arch> {
    Ok(device(ordinal)?.arch)
}

/// Makes a context current on this thread for the guard's lifetime, then restores whatever
/// was current before (torch's state is left as found).
struct Current;

impl Current {
    fn push(context: cu::CUcontext) -> Result<Current> {
        // SAFETY: a retained primary context.
        check("cuCtxPushCurrent", unsafe {
            cu::cuCtxPushCurrent_v2(context)
        })?;
        Ok(Current)
    }
}

impl Drop for Current {
    fn drop(&mut self) {
        let mut popped = std::ptr::null_mut();
        // SAFETY: pops the context pushed by `push` on this thread.
        unsafe { cu::cuCtxPopCurrent_v2(&mut popped) };
    }
}

/// A module loaded into a device's context, with its kernels.
struct Module {
    functions: Vec<(Function, Kernel)>,
}

/// A kernel of a loaded module and the dynamic shared memory each launch of it takes.
#[derive(Clone, Copy)]
struct Kernel {
    handle: cu::CUfunction,
    dynamic_shared_bytes: u32,
}

// SAFETY: module and function handles are opaque tokens valid in their context from any
// thread; they are never unloaded (kernels may be in flight on any stream).
unsafe impl Send for Module {}
// SAFETY: as above; the handles are never mutated.
unsafe impl Sync for Module {}

type Modules = HashMap<(i32, KernelKey), Arc<Module>>;

fn modules() -> MutexGuard<'static, Modules> {
    static MODULES: OnceLock<Mutex<Modules>> = OnceLock::new();
    lock(&MODULES)
}

/// Whether `key` is loaded on device `ordinal` (so a launch needs no compile or load).
pub fn is_loaded(ordinal: i32, key: &KernelKey) -> bool {
    modules().contains_key(&(ordinal, *key))
}

/// Load `key` on device `ordinal`, compiling it if no cache has it. Returns what fetching the
/// program did, or `None` when the module was already loaded. The modules' lock is not held
/// while compiling, so other variants compile (and loaded ones launch) meanwhile.
pub fn load(ordinal: i32, key: KernelKey) -> Result<Option<Report>> {
    if is_loaded(ordinal, &key) {
        return Ok(None);
    }
    let device = device(ordinal)?;
    let (program, report) = programs::fetch(key, device.arch).map_err(|e| match e {
        // The architecture is the device's, not an argument: say which device it is.
        Error::Invalid {
            arg: "arch",
            expected,
            got,
        } => Error::Kernel {
            message: format!("cuda:{ordinal} is {got}, but natten_rs needs {expected}"),
            log: String::new(),
        },
        other => other,
    })?;
    let mut modules = modules();
    if modules.contains_key(&(ordinal, key)) {
        return Ok(Some(report)); // loaded by another thread meanwhile
    }
    let _current = Current::push(device.context)?;
    let mut module = std::ptr::null_mut();
    // SAFETY: a complete CUBIN image, alive for the call; the driver copies it.
    let loaded = unsafe { cu::cuModuleLoadData(&mut module, program.cubin.as_ptr().cast()) };
    check(
        &format!("loading {} for {}", key.name(), device.arch),
        loaded,
    )?;
    let functions = key
        .source
        .functions()
        .iter()
        .map(|&f| Ok((f, function(module, &program.cubin, f)?)))
        .collect::<Result<Vec<_>>>()?;
    modules.insert((ordinal, key), Arc::new(Module { functions }));
    Ok(Some(report))
}

/// Kernel `f` of a loaded module. Reading an attribute makes the driver load the kernel now
/// (with lazy loading it would otherwise load at first launch, which may fall inside a CUDA
/// graph capture).
fn function(module: cu::CUmodule, cubin: &[u8], f: Function) -> Result<Kernel> {
    let name = CString::new(f.symbol()).expect("symbols hold no NUL");
    let mut handle = std::ptr::null_mut();
    // SAFETY: a loaded module and a NUL-terminated name.
    check("cuModuleGetFunction", unsafe {
        cu::cuModuleGetFunction(&mut handle, module, name.as_ptr())
    })?;
    let mut registers = 0;
    // SAFETY: a valid function handle and out-pointer.
    check("cuFuncGetAttribute", unsafe {
        cu::cuFuncGetAttribute(
            &mut registers,
            cu::CUfunction_attribute::CU_FUNC_ATTRIBUTE_NUM_REGS,
            handle,
        )
    })?;
    let dynamic_shared_bytes = dynamic_shared_bytes(module, cubin, f)?;
    if dynamic_shared_bytes > 0 {
        // SAFETY: a valid function handle; the attribute takes a byte count.
        check("cuFuncSetAttribute", unsafe {
            cu::cuFuncSetAttribute(
                handle,
                cu::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                dynamic_shared_bytes as i32,
            )
        })?;
    }
    Ok(Kernel {
        handle,
        dynamic_shared_bytes,
    })
}

/// The dynamic shared memory kernel `f` of `module` takes: the size of its
/// `<symbol>_dynamic_shared` array where the source declares one (NA_DYNAMIC_SHARED in
/// common.cuh), else 0. The driver reports a symbol's size without a copy, which a CUDA graph
/// capture in progress would forbid. The driver is asked only where the CUBIN names the symbol:
/// a lookup that fails is an API error to compute-sanitizer, though handled here.
fn dynamic_shared_bytes(module: cu::CUmodule, cubin: &[u8], f: Function) -> Result<u32> {
    let name = CString::new(format!("{}_dynamic_shared", f.symbol())).expect("no NUL");
    if !names_symbol(cubin, &name) {
        return Ok(0);
    }
    let (mut address, mut bytes) = (0, 0);
    // SAFETY: a loaded module, a NUL-terminated name and two out-pointers.
    let found =
        unsafe { cu::cuModuleGetGlobal_v2(&mut address, &mut bytes, module, name.as_ptr()) };
    if found == CUresult::CUDA_ERROR_NOT_FOUND {
        return Ok(0);
    }
    check("cuModuleGetGlobal", found)?;
    Ok(u32::try_from(bytes).expect("shared memory sizes fit 32 bits"))
}

/// Whether `cubin`'s string tables hold `name` (NUL on both sides, as ELF string tables store
/// their strings). A name found elsewhere by chance only costs the driver lookup.
fn names_symbol(cubin: &[u8], name: &CStr) -> bool {
    let mut needle = vec![0];
    needle.extend_from_slice(name.to_bytes_with_nul());
    cubin.windows(needle.len()).any(|w| w == needle.as_slice())
}

/// Enqueue kernel `function` of `key` (loaded on device `ordinal`) on `stream` with grid
/// `config`, passing `params` by value.
///
/// # Safety
/// `P` must be the `#[repr(C)]` mirror of the kernel's one parameter struct; every address in
/// `params` must be device memory of device `ordinal` holding what the kernel reaches, alive
/// until the kernel has run.
pub unsafe fn enqueue_with<P: Copy>(
    ordinal: i32,
    key: &KernelKey,
    (launched_function, config): (Function, Config),
    params: P,
    stream: Stream,
) -> Result<()> {
    let module = modules()
        .get(&(ordinal, *key))
        .cloned()
        .ok_or_else(|| Error::Kernel {
            message: format!("{} is not loaded on cuda:{ordinal}", key.name()),
            log: String::new(),
        })?;
    let kernel = module
        .functions
        .iter()
        .find(|(f, _)| *f == launched_function)
        .map(|&(_, kernel)| kernel)
        .expect("a module holds every function of its source");
    let device = device(ordinal)?;
    let _current = Current::push(device.context)?;
    let mut params = params;
    let mut arguments = [&mut params as *mut _ as *mut c_void];
    let (grid, (bx, by)) = (config.grid, config.block);
    // SAFETY: the kernel takes one parameter struct by value, which `params` mirrors (by the
    // caller's contract; sizes checked on both sides); the driver copies it before returning.
    let launched = unsafe {
        cu::cuLaunchKernel(
            kernel.handle,
            grid,
            1,
            1,
            bx,
            by,
            1,
            kernel.dynamic_shared_bytes,
            stream.0 as cu::CUstream,
            arguments.as_mut_ptr(),
            std::ptr::null_mut(),
        )
    };
    check(
        &format!("launching {}", launched_function.symbol()),
        launched,
    )
}

/// Encode for the driver the tensor maps of `tma`, planned in the host build's encoding
/// (`tma::MapPlan`): 2-byte elements, no interleave or swizzle, zeros outside the tensor.
/// The driver asks for a current context: the calling thread may have none (autograd runs the
/// backward on a thread of its own), so device `ordinal`'s is pushed for the calls.
pub fn encode_tensor_maps(ordinal: i32, tma: &mut TmaParams) -> Result<()> {
    ensure_driver()?;
    let _current = Current::push(device(ordinal)?.context)?;
    for map in &mut tma.maps {
        let plan = MapPlan::from_host(map);
        let mut encoded = cu::CUtensorMap { opaque: [0; 16] };
        // SAFETY: every array holds `plan.rank` entries (the strides one fewer) and outlives
        // the call; the driver only writes `encoded`, which is aligned as it asks.
        let code = unsafe {
            cu::cuTensorMapEncodeTiled(
                &mut encoded,
                cu::CUtensorMapDataType::CU_TENSOR_MAP_DATA_TYPE_UINT16,
                plan.rank,
                plan.address as *mut c_void,
                plan.dims.as_ptr(),
                plan.strides.as_ptr(),
                plan.boxes.as_ptr(),
                plan.element_strides.as_ptr(),
                cu::CUtensorMapInterleave::CU_TENSOR_MAP_INTERLEAVE_NONE,
                cu::CUtensorMapSwizzle::CU_TENSOR_MAP_SWIZZLE_NONE,
                cu::CUtensorMapL2promotion::CU_TENSOR_MAP_L2_PROMOTION_L2_128B,
                cu::CUtensorMapFloatOOBfill::CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE,
            )
        };
        check("cuTensorMapEncodeTiled", code)?;
        map.words = encoded.opaque;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn without_a_driver_devices_are_an_error_not_a_panic() {
        // SAFETY: only tries to dlopen libcuda.
        if unsafe { cu::is_culib_present() } {
            eprintln!("a CUDA driver is present: skipped");
            return;
        }
        assert!(matches!(device_arch(0), Err(Error::Kernel { .. })));
        assert!(!is_loaded(
            0,
            &super::super::kernels::representative_keys()[0]
        ));
    }

    #[test]
    fn a_symbol_is_named_only_as_a_whole_string() {
        let table = b"\x7fELF\0na_fwd_dynamic_shared\0xna_bwd_dynamic_shared\0";
        let named = |name: &str| names_symbol(table, &CString::new(name).unwrap());
        assert!(named("na_fwd_dynamic_shared"));
        assert!(
            !named("na_bwd_dynamic_shared"),
            "a suffix of another string"
        );
        assert!(!named("na_fwd_dynamic"), "a prefix of another string");
    }
}
