//! Runs tests/qmp.py: qomvm's QMP server driven by QEMU's own Python client (`qemu.qmp`
//! from PyPI; `.ci/run` installs it). Skips, saying why, without python3 or the package.

use std::process::Command;

#[test]
fn qemus_python_qmp_client_negotiates_and_drives_qomvm() {
    let python = match Command::new("python3")
        .args(["-c", "import qemu.qmp"])
        .output()
    {
        Err(e) => {
            test_support::skip::skip(format!("python3 not runnable: {e}"));
            return;
        }
        Ok(o) if !o.status.success() => {
            test_support::skip::skip(format!(
                "the qemu.qmp package is missing (python3 -m pip install qemu.qmp): {}",
                String::from_utf8_lossy(&o.stderr).trim()
            ));
            return;
        }
        Ok(_) => "python3",
    };
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/qmp.py");
    let out = Command::new(python)
        .arg(script)
        .arg(env!("CARGO_BIN_EXE_qomvm"))
        .output()
        .expect("python3 runs");
    assert!(
        out.status.success(),
        "tests/qmp.py failed ({}):\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
