//! Builds `fake_cudart.c` with the system C compiler (`$CC`, default `cc`), points
//! `FREEKV_CUDART` at it before the crate loads a runtime, and reads its call log back.

use std::ffi::{c_char, c_int};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Mutex, MutexGuard, OnceLock, PoisonError};

/// One recorded runtime call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Call {
    pub name: String,
    pub tid: i64,
    /// The calling thread's current device when the call was made.
    pub dev: i32,
    /// Pointer, event handle, or the requested device of `cudaSetDevice`.
    pub arg: usize,
    pub len: usize,
    pub rc: i32,
}

pub struct Stub {
    lib: libloading::Library,
}

static STUB: OnceLock<Stub> = OnceLock::new();
static SERIAL: Mutex<()> = Mutex::new(());

fn build() -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("fake_cudart");
    std::fs::create_dir_all(&dir).expect("creating the stub's build directory");
    let out = dir.join(format!("libfake_cudart-{}.so", std::process::id()));
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fake_cudart/fake_cudart.c");
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".to_owned());
    let status = Command::new(&cc)
        .args(["-shared", "-fPIC", "-O1", "-Wall", "-Werror", "-o"])
        .arg(&out)
        .arg(&src)
        .arg("-lpthread")
        .status()
        .unwrap_or_else(|e| panic!("running {cc}: {e}"));
    assert!(status.success(), "{cc} failed to build {}", src.display());
    out
}

/// Exclusive use of the stub for one test: waits for the other tests of this binary, then
/// clears the log, the injected failures and this thread's current device.
pub fn stub() -> (MutexGuard<'static, ()>, &'static Stub) {
    let guard = SERIAL.lock().unwrap_or_else(PoisonError::into_inner);
    let stub = STUB.get_or_init(|| {
        let path = build();
        // Only this binary's tests run in this process, and each of them calls `stub()`
        // first, so no thread reads the environment concurrently.
        std::env::set_var("FREEKV_CUDART", &path);
        let rt = freekv_core::cuda::runtime().expect("the stub loads");
        assert_eq!(Path::new(rt.path()), path);
        // SAFETY: [1] the library is the one the crate already loaded (dlopen returns the
        // same handle), whose initialisers have run; [2] it stays loaded in `STUB`.
        let lib = unsafe { libloading::Library::new(&path) }.expect("reopening the stub");
        // Both handles are open: the file is no longer needed.
        let _ = std::fs::remove_file(&path);
        Stub { lib }
    });
    stub.reset();
    (guard, stub)
}

impl Stub {
    fn reset(&self) {
        // SAFETY: [1] `fake_cudart_reset` has this C signature (fake_cudart.c); [2] the
        // library outlives the call.
        unsafe {
            let f = self
                .lib
                .get::<unsafe extern "C" fn()>(b"fake_cudart_reset\0")
                .expect("symbol");
            f();
        }
    }

    /// The call `name` fails once with `code`, after `skip` further calls succeed.
    pub fn fail(&self, name: &str, skip: i32, code: i32) {
        let name = std::ffi::CString::new(name).expect("no NUL");
        type Fail = unsafe extern "C" fn(*const c_char, c_int, c_int);
        // SAFETY: [1] `fake_cudart_fail` has this C signature and copies the name before
        // returning; [2] `name` is a NUL-terminated string alive for the call.
        unsafe {
            let f = self.lib.get::<Fail>(b"fake_cudart_fail\0").expect("symbol");
            f(name.as_ptr(), skip, code);
        }
    }

    /// Ranges registered and not unregistered.
    pub fn registered(&self) -> i32 {
        // SAFETY: [1] `fake_cudart_registered` has this C signature and no preconditions.
        unsafe {
            let f = self
                .lib
                .get::<unsafe extern "C" fn() -> c_int>(b"fake_cudart_registered\0")
                .expect("symbol");
            f()
        }
    }

    /// Makes `device` current on the calling thread, as other code (torch) would.
    pub fn set_device(&self, device: i32) {
        // SAFETY: [1] `cudaSetDevice` has this C signature and touches no caller memory.
        let rc = unsafe {
            let f = self
                .lib
                .get::<unsafe extern "C" fn(c_int) -> c_int>(b"cudaSetDevice\0")
                .expect("symbol");
            f(device)
        };
        assert_eq!(rc, 0);
    }

    /// Every call recorded since the last reset, in order.
    pub fn calls(&self) -> Vec<Call> {
        type Log = unsafe extern "C" fn(*mut c_char, usize) -> usize;
        // SAFETY: [1] `fake_cudart_log` has this C signature; [2] it writes at most `cap`
        // bytes into the buffer, which is `cap` bytes long.
        let text = unsafe {
            let f = self.lib.get::<Log>(b"fake_cudart_log\0").expect("symbol");
            let mut buf = vec![0u8; 1 << 16];
            loop {
                let n = f(buf.as_mut_ptr().cast(), buf.len());
                if n < buf.len() {
                    buf.truncate(n);
                    break;
                }
                buf.resize(2 * n, 0);
            }
            String::from_utf8(buf).expect("ASCII log")
        };
        text.lines().map(parse).collect()
    }
}

fn parse(line: &str) -> Call {
    let mut words = line.split(' ');
    let name = words.next().expect("name").to_owned();
    let mut field = |key: &str| {
        let w = words.next().expect("field");
        w.strip_prefix(key)
            .and_then(|w| w.strip_prefix('='))
            .unwrap_or_else(|| panic!("{key} in {line}"))
            .to_owned()
    };
    let (tid, dev, arg, len, rc) = (
        field("tid"),
        field("dev"),
        field("arg"),
        field("len"),
        field("rc"),
    );
    let arg = match arg.strip_prefix("0x") {
        Some(hex) => usize::from_str_radix(hex, 16).expect("hex"),
        None => 0, // glibc prints a null pointer as "(nil)"
    };
    Call {
        name,
        tid: tid.parse().expect("tid"),
        dev: dev.parse().expect("dev"),
        arg,
        len: len.parse().expect("len"),
        rc: rc.parse().expect("rc"),
    }
}

/// Calls named `name`.
pub fn named<'a>(calls: &'a [Call], name: &str) -> Vec<&'a Call> {
    calls.iter().filter(|c| c.name == name).collect()
}

/// Every successful registration is undone by exactly one successful unregistration of the
/// same pointer after it, and nothing else is unregistered.
pub fn assert_paired(calls: &[Call]) {
    let mut live: Vec<usize> = Vec::new();
    for c in calls.iter().filter(|c| c.rc == 0) {
        match c.name.as_str() {
            "cudaHostRegister" => {
                assert!(!live.contains(&c.arg), "registered twice: {c:?}");
                live.push(c.arg);
            }
            "cudaHostUnregister" => {
                let i = live.iter().position(|&p| p == c.arg);
                let i = i.unwrap_or_else(|| panic!("unregistered, not registered: {c:?}"));
                live.swap_remove(i);
            }
            _ => {}
        }
    }
    assert!(live.is_empty(), "left registered: {live:x?}");
}

/// The thread id the stub records for the calling thread.
pub fn this_tid() -> i64 {
    // SAFETY: [1] gettid has no preconditions.
    i64::from(unsafe { libc::gettid() })
}
