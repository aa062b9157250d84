//! Ports, scratch directories, signals, log clean-up, and finding a binary
//! of another workspace package.

use std::hash::{BuildHasher, Hasher};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

/// A TCP port on 127.0.0.1 that was free a moment ago. A process started
/// on it may still lose a race for it: the launchers retry on another.
pub fn free_port() -> std::io::Result<u16> {
    TcpListener::bind("127.0.0.1:0")?
        .local_addr()
        .map(|a| a.port())
}

/// A new directory `<temp>/wsc-<tag>-<pid>-<random>`.
pub fn tmpdir(tag: &str) -> std::io::Result<PathBuf> {
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default(),
    );
    let d = std::env::temp_dir().join(format!("wsc-{tag}-{}-{:x}", std::process::id(), h.finish()));
    std::fs::create_dir_all(&d)?;
    Ok(d)
}

/// Send signal `sig` (`libc::SIGSTOP`, …) to process `pid`; false if it
/// could not be sent (no such process).
pub fn signal(pid: i32, sig: i32) -> bool {
    // SAFETY: kill(2) takes plain integers and touches no memory of ours.
    unsafe { libc::kill(pid, sig) == 0 }
}

/// `s` without ANSI escape sequences (colours).
pub fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c2 in chars.by_ref() {
                if c2.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// The binary `bin` of package `package` of the workspace in `workspace`,
/// built by cargo (or found up to date) into the target directory and
/// profile of `beside`, a binary cargo built for the caller (an integration
/// test passes `env!("CARGO_BIN_EXE_wscluster")`: it sees only its own
/// package's binaries, not another member's).
pub fn workspace_bin(workspace: &Path, package: &str, bin: &str, beside: &Path) -> Result<PathBuf> {
    let out_dir = beside
        .parent()
        .with_context(|| format!("no directory for {}", beside.display()))?;
    let target_dir = out_dir
        .parent()
        .with_context(|| format!("no target directory above {}", out_dir.display()))?;
    // The output directory is named after the profile, but `dev`'s is `debug`.
    let profile = match out_dir.file_name().and_then(|n| n.to_str()) {
        Some("debug") => "dev",
        Some(p) => p,
        None => bail!("no profile directory in {}", beside.display()),
    };
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    // Without the variables cargo set for the caller (a test): build
    // scripts that track them (ring's reads CARGO_MANIFEST_DIR) would see
    // them changed and rebuild, here and again in the next plain build.
    for (k, _) in std::env::vars_os() {
        let Some(k) = k.to_str() else { continue };
        if k.starts_with("CARGO_PKG_")
            || k.starts_with("CARGO_BIN_EXE_")
            || [
                "CARGO_MANIFEST_DIR",
                "CARGO_MANIFEST_PATH",
                "CARGO_MANIFEST_LINKS",
                "CARGO_CRATE_NAME",
                "CARGO_BIN_NAME",
                "CARGO_PRIMARY_PACKAGE",
                "CARGO_TARGET_TMPDIR",
                "CARGO_RUSTC_CURRENT_DIR",
            ]
            .contains(&k)
        {
            cmd.env_remove(k);
        }
    }
    let out = cmd
        .current_dir(workspace)
        .args([
            "build",
            "--quiet",
            "--profile",
            profile,
            "-p",
            package,
            "--bin",
            bin,
        ])
        .arg("--target-dir")
        .arg(target_dir)
        .output()
        .context("run cargo")?;
    if !out.status.success() {
        bail!(
            "cargo build -p {package} --bin {bin} failed ({}):\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let path = out_dir.join(format!("{bin}{}", std::env::consts::EXE_SUFFIX));
    if !path.exists() {
        bail!("cargo built {bin}, but {} does not exist", path.display());
    }
    Ok(path)
}
