//! Runs tests/qmp.py: qomvm's QMP server driven by QEMU's own Python client (`qemu.qmp`
//! from PyPI; `.ci/run` installs it in a virtual environment and names its interpreter in
//! `QOMVM_PYTHON`). Skips, saying why, without python3 or the package.

use std::process::Command;

#[test]
fn qemus_python_qmp_client_negotiates_and_drives_qomvm() {
    // Debian 12's system Python refuses `pip install` (PEP 668): the package lives in a
    // virtual environment, whose interpreter QOMVM_PYTHON names.
    let python = std::env::var("QOMVM_PYTHON").unwrap_or_else(|_| "python3".into());
    let python = match Command::new(&python)
        .args(["-c", "import qemu.qmp"])
        .output()
    {
        Err(e) => {
            test_support::skip::skip(format!("{python} not runnable: {e}"));
            return;
        }
        Ok(o) if !o.status.success() => {
            test_support::skip::skip(format!(
                "{python} lacks the qemu.qmp package (python3 -m venv DIR; DIR/bin/pip install qemu.qmp; QOMVM_PYTHON=DIR/bin/python3): {}",
                String::from_utf8_lossy(&o.stderr).trim()
            ));
            return;
        }
        Ok(_) => python,
    };
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/qmp.py");
    let out = Command::new(python)
        .arg(script)
        .arg(env!("CARGO_BIN_EXE_qomvm"))
        .output()
        .expect("python runs");
    assert!(
        out.status.success(),
        "tests/qmp.py failed ({}):\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
