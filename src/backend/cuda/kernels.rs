//! The CUDA kernels: `kernels/*.cu`, embedded in the binary and compiled at start-up with NVRTC
//! for `sm_90a` into cubins, cached on disk by a hash of the source, options and NVRTC version.
//! No build step needs nvcc or a GPU; CI compiles every kernel through the same path.

use std::ffi::{CStr, CString};
use std::path::PathBuf;

use anyhow::{anyhow, bail, Context, Result};
use cudarc::nvrtc::{result as nvrtc, sys as nvrtc_sys};

/// Prepended to every source (no `#include` needed).
const COMMON: &str = include_str!("../../../kernels/common.cuh");

/// (module name, source). Each becomes one NVRTC program and one CUDA module.
pub const SOURCES: &[(&str, &str)] = &[
    ("linear", include_str!("../../../kernels/linear.cu")),
    ("linear_mma", include_str!("../../../kernels/linear_mma.cu")),
    ("elementwise", include_str!("../../../kernels/elementwise.cu")),
    ("attention", include_str!("../../../kernels/attention.cu")),
];

/// Built for Hopper with its arch-specific instructions (sm_90a; the device check in
/// `CudaBackend::new` names it too).
const OPTIONS: &[&str] = &["--std=c++17", "--gpu-architecture=sm_90a", "-lineinfo"];

/// Whether launches allow programmatic dependent launch (`DUET_PDL`, on unless 0).
pub fn pdl() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| env_switch("DUET_PDL", true))
}

/// An on/off variable: `0` is off, any other value on, unset `default`.
pub fn env_switch(name: &str, default: bool) -> bool {
    std::env::var(name).map_or(default, |v| v != "0")
}

/// A tuning variable's value when set and valid; a set but invalid value is ignored with a
/// warning that names it and what it expects.
pub fn env_usize(name: &str, expects: &str, ok: impl Fn(usize) -> bool) -> Option<usize> {
    let raw = std::env::var(name).ok()?;
    match raw.trim().parse() {
        Ok(v) if ok(v) => Some(v),
        _ => {
            tracing::warn!("{name}={raw} ignored: expects {expects}");
            None
        }
    }
}

/// The run-time settings that change which kernels run or how they are built, for benchmark
/// headers: programmatic dependent launch, extra defines, forced warps.
pub fn settings() -> String {
    let mut parts = vec![format!("pdl {}", if pdl() { "on" } else { "off" })];
    for var in ["DUET_KERNEL_DEFINES", "DUET_MMA_WARPS", "DUET_SIDE_SHARE", "DUET_ROUTE_TOKENS", "DUET_ROUTE_WARP", "DUET_NORM_ROUTER", "DUET_NORM_ROUTER_WAVES", "DUET_MOE_WAVES", "DUET_WAVE_NOWAIT", "DUET_DIAG_SKIP", "DUET_MLA_SPLIT_KEYS", "DUET_MLA_TC", "DUET_CUDA_GRAPHS", "DUET_GRAPH_KEEP_BUFFERS"] {
        if let Ok(v) = std::env::var(var) {
            parts.push(format!("{var}={v}"));
        }
    }
    parts.join(", ")
}

/// The compile options: OPTIONS, then any `-D` defines in
/// `DUET_KERNEL_DEFINES` (space separated), which override the kernels' tuning constants
/// (chunks in flight, register caps) for sweeps on the device without a rebuild. GEMV_ROWS,
/// which the host sizes a grid by too, goes as `gemv_rows` read it.
fn options() -> Vec<String> {
    let mut opts: Vec<String> = OPTIONS.iter().map(|s| s.to_string()).collect();
    opts.extend(extra_defines().iter().filter(|d| define_in(d, "GEMV_ROWS").is_none()).cloned());
    if gemv_rows() != 4 {
        opts.push(format!("-DGEMV_ROWS={}", gemv_rows()));
    }
    opts
}

/// Weight rows a block of the one-token CUDA-core GEMV takes (GEMV_ROWS in kernels/linear.cu,
/// default 4; `-DGEMV_ROWS=N` in DUET_KERNEL_DEFINES, 1 to 16), as the host sizes its grid and
/// the kernels are built. (H200: 4 beat 2, 8 and 16 on bf16 6144->2048, the one GEMV it moves
/// near 80%; performance.md, nineteenth session.)
pub fn gemv_rows() -> usize {
    static ROWS: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *ROWS.get_or_init(|| match define_value("GEMV_ROWS") {
        Some(n @ 1..=16) => n as usize,
        Some(n) => {
            tracing::warn!("DUET_KERNEL_DEFINES: GEMV_ROWS={n} is not 1 to 16; 4 taken");
            4
        }
        None => 4,
    })
}

/// The value of `-DNAME` (1) or `-DNAME=V` in DUET_KERNEL_DEFINES, if it is there and a number.
pub fn define_value(name: &str) -> Option<i64> {
    define_in(&extra_defines().join(" "), name)
}

/// The value of `-DNAME` (1) or `-DNAME=V` among the space-separated `defs` (DUET_KERNEL_DEFINES'
/// form), if it is there and a number, as the kernels' `#if NAME` reads it.
fn define_in(defs: &str, name: &str) -> Option<i64> {
    defs.split_whitespace().find_map(|d| {
        let v = d.strip_prefix("-D")?.strip_prefix(name)?;
        if v.is_empty() {
            return Some(1);
        }
        v.strip_prefix('=')?.trim().parse().ok()
    })
}

/// The `-D` defines of `DUET_KERNEL_DEFINES` (read once; anything else in it is ignored with a
/// warning).
fn extra_defines() -> &'static [String] {
    static DEFS: std::sync::OnceLock<Vec<String>> = std::sync::OnceLock::new();
    DEFS.get_or_init(|| {
        let Ok(defs) = std::env::var("DUET_KERNEL_DEFINES") else { return vec![] };
        let (keep, drop): (Vec<&str>, Vec<&str>) = defs.split_whitespace().partition(|d| d.starts_with("-D"));
        if !drop.is_empty() {
            tracing::warn!("DUET_KERNEL_DEFINES: {} ignored (only -DNAME=VALUE defines are passed on)", drop.join(" "));
        }
        keep.into_iter().map(str::to_string).collect()
    })
}

/// Whether libnvrtc can be opened.
pub fn nvrtc_available() -> bool {
    unsafe { nvrtc_sys::is_culib_present() }
}

fn nvrtc_version() -> (i32, i32) {
    let (mut major, mut minor) = (0, 0);
    unsafe { nvrtc_sys::nvrtcVersion(&mut major, &mut minor) };
    (major, minor)
}

/// FNV-1a: a stable hash for cache keys (no dependency, same on every platform).
fn fnv1a(parts: &[&[u8]]) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    for p in parts {
        for b in *p {
            h ^= *b as u64;
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
        h ^= 0xff;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// Full source of one module as NVRTC sees it.
pub fn full_source(name: &str, src: &str) -> String {
    format!("{COMMON}\n#line 1 \"{name}.cu\"\n{src}")
}

/// Compiles one module to a cubin (warnings are logged).
pub fn compile(name: &str, src: &str) -> Result<Vec<u8>> {
    let (cubin, log) = compile_logged(name, src, &[])?;
    if !log.is_empty() {
        tracing::warn!("kernel {name}.cu compiles with warnings: {log}");
    }
    Ok(cubin)
}

/// Compiles one module to a cubin, with NVRTC's log (its warnings; empty when clean); `extra`
/// options follow the usual ones.
fn compile_logged(name: &str, src: &str, extra: &[&str]) -> Result<(Vec<u8>, String)> {
    let full = CString::new(full_source(name, src)).context("kernel source contains a NUL byte")?;
    let fname = CString::new(format!("{name}.cu")).unwrap();
    let prog = nvrtc::create_program(&full, Some(&fname)).map_err(|e| anyhow!("nvrtc cannot create {name}.cu: {e:?}"))?;
    let mut opts = options();
    opts.extend(extra.iter().map(|o| o.to_string()));
    let compiled = unsafe { nvrtc::compile_program(prog, &opts) };
    let log = unsafe { nvrtc::get_program_log(prog) }.unwrap_or_default();
    let log = unsafe { CStr::from_ptr(log.as_ptr()) }.to_string_lossy().trim().to_string();
    let result = match compiled {
        Err(e) => Err(anyhow!("kernel {name}.cu does not compile ({e:?}): {log}")),
        Ok(()) => unsafe {
            let mut size = 0usize;
            nvrtc_sys::nvrtcGetCUBINSize(prog, &mut size).result().map_err(|e| anyhow!("nvrtcGetCUBINSize: {e:?}"))?;
            let mut cubin = vec![0u8; size];
            nvrtc_sys::nvrtcGetCUBIN(prog, cubin.as_mut_ptr() as *mut _).result().map_err(|e| anyhow!("nvrtcGetCUBIN: {e:?}"))?;
            Ok((cubin, log))
        },
    };
    unsafe { nvrtc::destroy_program(prog) }.ok();
    result
}

fn cache_path(name: &str, src: &str) -> PathBuf {
    let (major, minor) = nvrtc_version();
    let key = fnv1a(&[COMMON.as_bytes(), src.as_bytes(), options().join(" ").as_bytes(), format!("{major}.{minor}").as_bytes()]);
    crate::tiny::cache_dir().join("kernels").join(format!("{name}-{key:016x}.cubin"))
}

/// The cubin of one module, from the disk cache or freshly compiled (and then cached).
pub fn cubin(name: &str, src: &str) -> Result<Vec<u8>> {
    let path = cache_path(name, src);
    if let Ok(bytes) = std::fs::read(&path) {
        return Ok(bytes);
    }
    let bytes = compile(name, src)?;
    if let Some(dir) = path.parent() {
        // A cache that cannot be written only costs a recompile next time.
        if std::fs::create_dir_all(dir).is_ok() {
            let tmp = path.with_extension(format!("tmp{}", std::process::id()));
            if std::fs::write(&tmp, &bytes).is_ok() {
                let _ = std::fs::rename(&tmp, &path);
            }
        }
    }
    Ok(bytes)
}

/// Compiles every embedded module (no cache), and the variants that switches build (`VARIANTS`):
/// the CI check that kernels build, and build without warnings.
pub fn compile_all() -> Result<Vec<(String, usize)>> {
    if !nvrtc_available() {
        bail!("libnvrtc is not available (install nvidia-cuda-nvrtc and put its lib folder on LD_LIBRARY_PATH)");
    }
    let plain = SOURCES.iter().map(|&(name, src)| (name, src, None));
    let variants = VARIANTS.iter().filter_map(|&(name, define)| SOURCES.iter().find(|(n, _)| *n == name).map(|&(_, src)| (name, src, Some(define))));
    plain
        .chain(variants)
        .map(|(name, src, define)| {
            let (cubin, log) = compile_logged(name, src, define.as_slice())?;
            let label = define.map_or(name.to_string(), |d| format!("{name} {d}"));
            if !log.is_empty() {
                bail!("kernel {label} compiles with warnings: {log}");
            }
            Ok((label, cubin.len()))
        })
        .collect()
}

/// Kernel variants that a run-time switch builds, compiled by `compile_all` beside the plain
/// modules so that they keep compiling while off: (module, define).
const VARIANTS: [(&str, &str); 1] = [("linear", "-DGEMV_ROWS=8")];

#[cfg(test)]
mod tests {
    use super::define_in;

    #[test]
    fn defines_read_as_the_kernels_read_them() {
        for (defs, want) in [("-DTIMELINE", Some(1)), ("-DTIMELINE=1", Some(1)), ("-DINT4_REGS=96 -DTIMELINE=2", Some(2)), ("-DTIMELINE=0", Some(0))] {
            assert_eq!(define_in(defs, "TIMELINE"), want, "{defs}");
        }
        for defs in ["", "-DTIMELINES=1", "-DINT4_REGS=96", "-DTILE=1", "TIMELINE=1"] {
            assert_eq!(define_in(defs, "TIMELINE"), None, "{defs}");
        }
        assert_eq!(define_in("-DINT4_REGS=96 -DGEMV_ROWS=8", "GEMV_ROWS"), Some(8));
    }

    /// CI sets DUET_REQUIRE_NVRTC=1 with the nvidia-cuda-nvrtc wheel on LD_LIBRARY_PATH, so a
    /// kernel that does not compile fails CI without a GPU.
    #[test]
    fn every_kernel_compiles() {
        if !super::nvrtc_available() && std::env::var_os("DUET_REQUIRE_NVRTC").is_none() {
            eprintln!("skipped: libnvrtc not found (set DUET_REQUIRE_NVRTC=1 to require it)");
            return;
        }
        for (name, size) in super::compile_all().unwrap() {
            assert!(size > 0, "{name}: empty cubin");
        }
    }
}
