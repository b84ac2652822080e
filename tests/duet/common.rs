//! Helpers: running the real binary, temporary folders, reading fixtures.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use duet::checkpoint::safetensors::SafetensorsFile;

pub fn duet(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_duet")).args(args).env("DUET_LOG", "error").output().expect("run duet")
}

/// Runs duet and expects success; returns stdout.
pub fn duet_ok(args: &[&str]) -> String {
    let out = duet(args);
    assert!(out.status.success(), "duet {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

/// Runs duet and expects a one-line error that mentions every `needles`.
pub fn duet_err(args: &[&str], needles: &[&str]) {
    let out = duet(args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "duet {args:?} should fail");
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "expected one error line, got: {stderr}");
    assert!(lines[0].starts_with("error: "), "{stderr}");
    for n in needles {
        assert!(lines[0].contains(n), "error should name '{n}': {stderr}");
    }
}

pub fn fixture(variant: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(variant)
}

/// A folder removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        use std::sync::atomic::{AtomicUsize, Ordering};
        static N: AtomicUsize = AtomicUsize::new(0);
        let p = std::env::temp_dir().join(format!("duet-test-{tag}-{}-{}", std::process::id(), N.fetch_add(1, Ordering::SeqCst)));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }

    pub fn join(&self, p: &str) -> PathBuf {
        self.0.join(p)
    }

    pub fn s(&self) -> &str {
        self.0.to_str().unwrap()
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Copies a checkpoint folder.
pub fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

/// A tensor of a safetensors file as f32 values with its shape.
pub fn read_f32(path: &Path, name: &str) -> (Vec<usize>, Vec<f32>) {
    let f = SafetensorsFile::open(path).unwrap();
    let t = f.view(name).unwrap_or_else(|| panic!("{name} missing in {}", path.display()));
    (t.shape.clone(), t.to_f32().unwrap())
}

pub fn read_i64(path: &Path, name: &str) -> Vec<i64> {
    let f = SafetensorsFile::open(path).unwrap();
    f.view(name).unwrap().to_i64().unwrap()
}

pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

pub fn join_ids(ids: &[i64]) -> String {
    ids.iter().map(|i| i.to_string()).collect::<Vec<_>>().join(",")
}

/// The JSON summary `duet generate --json` prints as its last line.
pub fn last_json(stdout: &str) -> serde_json::Value {
    serde_json::from_str(stdout.trim_end().lines().last().expect("output")).expect("last line is JSON")
}
