//! The official `openai` Python client against a real server (tests/openai/test_openai.py).
//! CI installs the client and sets DUET_REQUIRE_OPENAI=1; elsewhere the test is skipped when
//! the client is missing.

use std::process::Command;

use super::common::*;

#[test]
fn official_openai_client() {
    let have = Command::new("python3").args(["-c", "import openai, jinja2, tokenizers"]).status().is_ok_and(|s| s.success());
    if !have {
        assert!(std::env::var_os("DUET_REQUIRE_OPENAI").is_none(), "python3 with openai, jinja2 and tokenizers is required");
        eprintln!("skipped: pip install openai jinja2 tokenizers to run the API tests");
        return;
    }
    let model = TempDir::new("openai-model");
    duet_ok(&["tiny", "--out", model.s()]);
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/openai/test_openai.py");
    let out = Command::new("python3")
        .arg("-W")
        .arg("ignore")
        .arg(&script)
        .env("DUET_BIN", env!("CARGO_BIN_EXE_duet"))
        .env("DUET_TEST_MODEL", model.path())
        .output()
        .unwrap();
    let log = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{log}");
}
