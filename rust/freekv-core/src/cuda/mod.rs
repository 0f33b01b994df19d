//! The only code that calls the CUDA runtime.
//!
//! `libcudart` is loaded with `libloading` on first use, so the crate builds, links and runs
//! on a host without CUDA: with no runtime (or no device), [`runtime`] / [`device_runtime`]
//! return `None` and callers skip pinning. Search order: the path in `FREEKV_CUDART` (the
//! Python package sets it to the runtime of the installed torch, so both share one runtime),
//! then `libcudart.so`, `libcudart.so.13`, `libcudart.so.12` from the loader's search path.
//!
//! Three runtime calls do the work: `cudaHostRegister` / `cudaHostUnregister` (by
//! `pinned.rs`, which owns every registered region) and `cudaEventSynchronize` (by the
//! conversion workers, which wait for a device-to-host copy before reading its staging
//! buffer). The loaded library is kept for the life of the process (a `static`), so the
//! function pointers below never dangle.
//!
//! Device: each of those three calls takes the ordinal of the device it belongs to (the
//! pool's device) and runs with that device current on the calling thread: `cudaGetDevice`
//! reads the thread's current device, `cudaSetDevice(device)` is called before the work, and
//! the previous device is made current again afterwards when it differs. A CUDA thread's
//! current device is per thread, so a worker thread sets it before every event wait, and an
//! engine thread that registers a pool for device 1 while device 0 is current keeps device 0
//! current. Without this the runtime would use device 0 and create a context there.
//! `cudaGetDeviceCount` / `cudaGetErrorString` need no device, nor does
//! `cudaDeviceGetPCIBusId` (it names its device), which [`crate::numa`] uses to find a
//! device's NUMA node before `pinned.rs` maps an arena for it.

use std::ffi::{c_char, c_int, c_uint, c_void, CStr};
use std::sync::OnceLock;

use crate::error::{FreeKvError, Result};

/// `cudaHostRegisterPortable | cudaHostRegisterMapped`: pinned for every context, and mapped
/// into the device address space (the device-driven recall path reads it directly).
const HOST_REGISTER_FLAGS: c_uint = 0x01 | 0x02;

type HostRegisterFn = unsafe extern "C" fn(*mut c_void, usize, c_uint) -> c_int;
type HostUnregisterFn = unsafe extern "C" fn(*mut c_void) -> c_int;
type EventSynchronizeFn = unsafe extern "C" fn(*mut c_void) -> c_int;
type GetDeviceCountFn = unsafe extern "C" fn(*mut c_int) -> c_int;
type GetDeviceFn = unsafe extern "C" fn(*mut c_int) -> c_int;
type SetDeviceFn = unsafe extern "C" fn(c_int) -> c_int;
type GetErrorStringFn = unsafe extern "C" fn(c_int) -> *const c_char;
type DeviceGetPciBusIdFn = unsafe extern "C" fn(*mut c_char, c_int, c_int) -> c_int;

/// Bytes for a PCI bus id string: CUDA writes at most 13 characters plus NUL
/// (`dddd:bb:dd.f`); room for an 8-digit domain and more.
const PCI_BUS_ID_LEN: usize = 64;

/// Function table of a loaded CUDA runtime.
pub struct CudaRuntime {
    path: String,
    host_register: HostRegisterFn,
    host_unregister: HostUnregisterFn,
    event_synchronize: EventSynchronizeFn,
    get_device_count: GetDeviceCountFn,
    get_device: GetDeviceFn,
    set_device: SetDeviceFn,
    get_error_string: GetErrorStringFn,
    device_get_pci_bus_id: DeviceGetPciBusIdFn,
    // Keeps the symbols above valid; never dropped (lives in a static).
    _lib: libloading::Library,
}

impl std::fmt::Debug for CudaRuntime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CudaRuntime")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

static RUNTIME: OnceLock<std::result::Result<CudaRuntime, String>> = OnceLock::new();

fn candidates() -> Vec<String> {
    let mut v = Vec::new();
    if let Ok(p) = std::env::var("FREEKV_CUDART") {
        if !p.is_empty() {
            v.push(p);
        }
    }
    v.extend(["libcudart.so", "libcudart.so.13", "libcudart.so.12"].map(str::to_owned));
    v
}

fn load(path: &str) -> std::result::Result<CudaRuntime, String> {
    // SAFETY: [1] loading libcudart runs its ELF initialisers, which have no preconditions;
    // [2] the library stays loaded for the process lifetime (stored in a static).
    let lib = unsafe { libloading::Library::new(path) }.map_err(|e| e.to_string())?;
    macro_rules! sym {
        ($name:literal, $ty:ty) => {
            // SAFETY: [1] the symbol is the CUDA runtime API function of that name, whose C
            // signature is `$ty` (CUDA runtime API reference); [2] the fn pointer is copied
            // out, and stays valid because `lib` is stored next to it and never unloaded.
            *unsafe { lib.get::<$ty>($name) }.map_err(|e| e.to_string())?
        };
    }
    Ok(CudaRuntime {
        path: path.to_owned(),
        host_register: sym!(b"cudaHostRegister\0", HostRegisterFn),
        host_unregister: sym!(b"cudaHostUnregister\0", HostUnregisterFn),
        event_synchronize: sym!(b"cudaEventSynchronize\0", EventSynchronizeFn),
        get_device_count: sym!(b"cudaGetDeviceCount\0", GetDeviceCountFn),
        get_device: sym!(b"cudaGetDevice\0", GetDeviceFn),
        set_device: sym!(b"cudaSetDevice\0", SetDeviceFn),
        get_error_string: sym!(b"cudaGetErrorString\0", GetErrorStringFn),
        device_get_pci_bus_id: sym!(b"cudaDeviceGetPCIBusId\0", DeviceGetPciBusIdFn),
        _lib: lib,
    })
}

/// The process-wide CUDA runtime, loaded on first call; `None` when no candidate loads.
pub fn runtime() -> Option<&'static CudaRuntime> {
    RUNTIME
        .get_or_init(|| {
            let mut why = Vec::new();
            for path in candidates() {
                match load(&path) {
                    Ok(rt) => return Ok(rt),
                    Err(e) => why.push(format!("{path}: {e}")),
                }
            }
            Err(why.join("; "))
        })
        .as_ref()
        .ok()
}

/// The runtime, only when it reports at least one device (the condition for pinning).
pub fn device_runtime() -> Option<&'static CudaRuntime> {
    runtime().filter(|rt| rt.device_count().is_ok_and(|n| n > 0))
}

/// A human-readable line on what was loaded, or why nothing was.
pub fn describe() -> String {
    match (runtime(), RUNTIME.get()) {
        (Some(rt), _) => match rt.device_count() {
            Ok(n) => format!("{} ({n} device(s))", rt.path),
            Err(e) => format!("{} (no usable device: {e})", rt.path),
        },
        (None, Some(Err(why))) => format!("no CUDA runtime: {why}"),
        (None, _) => "no CUDA runtime".to_owned(),
    }
}

/// Error for a CUDA-dependent request when no runtime is loaded.
pub(crate) fn missing(op: &str) -> FreeKvError {
    FreeKvError::Cuda {
        op: op.to_owned(),
        code: -1,
        message: describe(),
    }
}

impl CudaRuntime {
    /// The file the runtime was loaded from.
    #[must_use]
    pub fn path(&self) -> &str {
        &self.path
    }

    fn check(&self, op: &str, code: c_int) -> Result<()> {
        if code == 0 {
            return Ok(());
        }
        // SAFETY: [1] cudaGetErrorString accepts any int and returns a pointer to a static,
        // NUL-terminated string (or null for codes it does not know, handled below).
        let ptr = unsafe { (self.get_error_string)(code) };
        let message = if ptr.is_null() {
            "unknown error".to_owned()
        } else {
            // SAFETY: [1] non-null; [2] points to a static NUL-terminated string owned by the
            // runtime, which stays loaded.
            unsafe { CStr::from_ptr(ptr) }
                .to_string_lossy()
                .into_owned()
        };
        Err(FreeKvError::Cuda {
            op: op.to_owned(),
            code,
            message,
        })
    }

    /// Number of visible devices.
    ///
    /// # Errors
    /// [`FreeKvError::Cuda`] when the runtime reports no driver or no device.
    pub fn device_count(&self) -> Result<i32> {
        let mut n: c_int = 0;
        // SAFETY: [1] `n` is a valid, writable c_int for the duration of the call.
        let code = unsafe { (self.get_device_count)(&mut n) };
        self.check("cudaGetDeviceCount", code)?;
        Ok(n)
    }

    /// The PCI bus id of `device` as the runtime prints it (`"0000:3B:00.0"`), from
    /// `cudaDeviceGetPCIBusId`; the calling thread's current device is not changed.
    ///
    /// # Errors
    /// [`FreeKvError::Cuda`] with the runtime's code (an invalid ordinal is 101).
    pub fn pci_bus_id(&self, device: i32) -> Result<String> {
        let mut buf = [0 as c_char; PCI_BUS_ID_LEN];
        // SAFETY: [1] `buf` is writable for `PCI_BUS_ID_LEN` bytes, the length passed, for
        // the duration of the call; [2] the runtime writes at most that many bytes.
        let code = unsafe {
            (self.device_get_pci_bus_id)(buf.as_mut_ptr(), PCI_BUS_ID_LEN as c_int, device)
        };
        self.check("cudaDeviceGetPCIBusId", code)?;
        // Not trusting the runtime to terminate a full buffer: the last byte is always NUL.
        buf[PCI_BUS_ID_LEN - 1] = 0;
        // SAFETY: [1] `buf` is NUL-terminated within its length (set just above); [2] it
        // lives until the string is copied out below.
        let id = unsafe { CStr::from_ptr(buf.as_ptr()) };
        Ok(id.to_string_lossy().into_owned())
    }

    /// Makes `device` current on the calling thread until [`DeviceGuard::restore`].
    fn make_current(&self, device: i32) -> Result<DeviceGuard<'_>> {
        let mut previous: c_int = 0;
        // SAFETY: [1] `previous` is a valid, writable c_int for the duration of the call.
        let code = unsafe { (self.get_device)(&mut previous) };
        self.check("cudaGetDevice", code)?;
        // SAFETY: [1] cudaSetDevice takes any int (an invalid ordinal is an error code) and
        // touches no caller memory.
        let code = unsafe { (self.set_device)(device) };
        self.check("cudaSetDevice", code)?;
        Ok(DeviceGuard {
            rt: self,
            previous,
            device,
        })
    }

    /// The device current on the calling thread (`cudaGetDevice`).
    ///
    /// # Errors
    /// [`FreeKvError::Cuda`] with the runtime's code.
    pub fn current_device(&self) -> Result<i32> {
        let mut d: c_int = 0;
        // SAFETY: [1] `d` is a valid, writable c_int for the duration of the call.
        let code = unsafe { (self.get_device)(&mut d) };
        self.check("cudaGetDevice", code)?;
        Ok(d)
    }

    /// Page-locks and maps `len` bytes at `ptr` for every device context, with `device`
    /// current on the calling thread (the previous device is current again on return).
    /// On error nothing stays registered.
    ///
    /// # Safety
    /// 1. `ptr..ptr+len` is one live mapping owned by the caller, not registered yet.
    /// 2. The caller calls [`CudaRuntime::host_unregister`] on `ptr` before unmapping it.
    ///
    /// # Errors
    /// [`FreeKvError::Cuda`] with the runtime's code and the failing call (`cudaGetDevice`,
    /// `cudaSetDevice` or `cudaHostRegister`).
    pub unsafe fn host_register(&self, device: i32, ptr: *mut u8, len: usize) -> Result<()> {
        let guard = self.make_current(device)?;
        // SAFETY: [1] caller's contract 1: a live, unregistered mapping of `len` bytes;
        // [2] the flags are valid cudaHostRegister flags.
        let code = unsafe { (self.host_register)(ptr.cast(), len, HOST_REGISTER_FLAGS) };
        let registered = self.check("cudaHostRegister", code);
        let restored = guard.restore();
        if let (Ok(()), Err(e)) = (&registered, &restored) {
            // The caller sees an error, so it will not unregister: undo here, while `device`
            // is still current (the restore failed).
            // SAFETY: [1] `ptr` was registered just above and is still mapped (contract 1);
            // [2] nothing has used the registration yet.
            let _ = unsafe { (self.host_unregister)(ptr.cast()) };
            return Err(e.clone());
        }
        registered.and(restored)
    }

    /// Unpins a region registered with [`CudaRuntime::host_register`], with `device` current
    /// on the calling thread (the previous device is current again on return).
    ///
    /// # Safety
    /// 1. `ptr` was registered by `host_register` and is still mapped.
    /// 2. No device work reading or writing the region is in flight.
    ///
    /// # Errors
    /// [`FreeKvError::Cuda`] with the runtime's code and the failing call.
    pub unsafe fn host_unregister(&self, device: i32, ptr: *mut u8) -> Result<()> {
        let guard = self.make_current(device)?;
        // SAFETY: [1] caller's contract: `ptr` is the base of a registered, live region.
        let code = unsafe { (self.host_unregister)(ptr.cast()) };
        let unregistered = self.check("cudaHostUnregister", code);
        let restored = guard.restore();
        unregistered.and(restored)
    }

    /// Blocks the calling thread until `event` has completed, with `device` (the event's)
    /// current on the calling thread (the previous device is current again on return).
    ///
    /// # Safety
    /// 1. `event` is a `cudaEvent_t` created by this process's CUDA runtime (for example
    ///    `torch.cuda.Event.cuda_event`) and not destroyed until this call returns.
    ///
    /// # Errors
    /// [`FreeKvError::Cuda`] with the runtime's code and the failing call.
    pub unsafe fn event_synchronize(&self, device: i32, event: *mut c_void) -> Result<()> {
        let guard = self.make_current(device)?;
        // SAFETY: [1] caller's contract: a live event handle of this process.
        let code = unsafe { (self.event_synchronize)(event) };
        let synced = self.check("cudaEventSynchronize", code);
        let restored = guard.restore();
        synced.and(restored)
    }
}

/// The device made current by [`CudaRuntime::make_current`] and the one it replaced.
#[must_use = "restore() puts the previous device back"]
struct DeviceGuard<'a> {
    rt: &'a CudaRuntime,
    previous: c_int,
    device: c_int,
}

impl DeviceGuard<'_> {
    /// Makes the previous device current again (no call when it is the same device).
    fn restore(self) -> Result<()> {
        if self.previous == self.device {
            return Ok(());
        }
        // SAFETY: [1] cudaSetDevice takes any int and touches no caller memory.
        let code = unsafe { (self.rt.set_device)(self.previous) };
        self.rt.check("cudaSetDevice", code)
    }
}

#[cfg(test)]
mod tests {
    #[test]
    #[cfg_attr(miri, ignore = "dlopen is not supported by Miri")]
    fn loading_never_fails_hard() {
        // With or without CUDA this must return and describe what it found.
        let _ = super::runtime();
        let _ = super::device_runtime();
        assert!(!super::describe().is_empty());
    }
}
