//! The Debian package: a staging tree laid out as the installed files, plus `DEBIAN/` (control,
//! md5sums, maintainer scripts from gateway-user/packaging/deb), turned into a .deb by
//! `dpkg-deb --build --root-owner-group` — every file root:root, modes as staged.
//!
//! dpkg-deb rather than cargo-deb: the package is four files and two short maintainer scripts,
//! dpkg-deb is on every Debian host (the package's only target), and the test that installs the
//! .deb builds it with this same code, without a second cargo build.
//!
//! | file | mode | what |
//! |---|---|---|
//! | /usr/bin/pgward | 0755 | the binary (the eBPF object embedded), its debug information stripped |
//! | /usr/lib/pgward/gateway-ebpf.o | 0644 | the eBPF object, for inspection (bpftool, llvm-objdump) |
//! | /usr/share/pgward/pgward.service | 0644 | the unit `pgward install` writes (a template: not enabled, nothing starts) |
//! | /usr/share/pgward/pgward.toml | 0644 | the configuration `pgward install` writes, for reference |
//! | /usr/share/doc/pgward/copyright | 0644 | licence |
//!
//! Nothing under /etc: `pgward install` writes the host's configuration, keys and unit, and
//! the prerm runs `pgward uninstall` on removal.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

/// Package name, also the binary's.
pub const PACKAGE: &str = "pgward";
/// The packaging sources, relative to the workspace root.
pub const PACKAGING_DIR: &str = "gateway-user/packaging/deb";
/// Where the binary is installed (what `pgward install` recognises as the package's).
pub const BIN_PATH: &str = "usr/bin/pgward";
pub const OBJECT_PATH: &str = "usr/lib/pgward/gateway-ebpf.o";
pub const UNIT_TEMPLATE_PATH: &str = "usr/share/pgward/pgward.service";
pub const CONFIG_PATH: &str = "usr/share/pgward/pgward.toml";
pub const COPYRIGHT_PATH: &str = "usr/share/doc/pgward/copyright";

const EXECUTABLE: u32 = 0o755;
const DATA: u32 = 0o644;
const DIR: u32 = 0o755;

/// What goes into the package.
pub struct Inputs {
    /// The workspace root (for the packaging sources).
    pub workspace: PathBuf,
    /// The pgward binary.
    pub binary: PathBuf,
    /// The eBPF object (target/bpf/gateway-ebpf.o).
    pub object: PathBuf,
    /// Package version (the workspace's).
    pub version: String,
    /// Debian architecture (`dpkg --print-architecture`).
    pub arch: String,
}

/// The architecture dpkg builds for on this host.
pub fn host_arch() -> Result<String> {
    let out = Command::new("dpkg").arg("--print-architecture").output().context("running dpkg --print-architecture")?;
    if !out.status.success() {
        bail!("dpkg --print-architecture failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// Stage the files under `out/staging` and build `out/pgward_<version>_<arch>.deb`; its path.
pub fn build(inputs: &Inputs, out: &Path) -> Result<PathBuf> {
    for (what, p) in [("binary", &inputs.binary), ("eBPF object", &inputs.object)] {
        if !p.is_file() {
            bail!("the {what} {} does not exist", p.display());
        }
    }
    let staging = out.join("staging");
    if staging.exists() {
        fs::remove_dir_all(&staging).with_context(|| format!("removing {}", staging.display()))?;
    }
    let src = inputs.workspace.join(PACKAGING_DIR);
    stage(&staging, BIN_PATH, &inputs.binary, EXECUTABLE)?;
    strip_debug_info(&staging.join(BIN_PATH))?;
    stage(&staging, OBJECT_PATH, &inputs.object, DATA)?;
    stage(&staging, UNIT_TEMPLATE_PATH, &src.join("pgward.service"), DATA)?;
    stage(&staging, CONFIG_PATH, &src.join("pgward.toml"), DATA)?;
    stage(&staging, COPYRIGHT_PATH, &src.join("copyright"), DATA)?;

    let md5sums = md5sums(&staging)?;
    let installed_kib = tree_bytes(&staging)?.div_ceil(1024);
    let control = fs::read_to_string(src.join("control")).context("reading the control template")?;
    let control = control
        .replace("@VERSION@", &inputs.version)
        .replace("@ARCH@", &inputs.arch)
        .replace("@INSTALLED_SIZE@", &installed_kib.to_string());
    if let Some(left) = placeholder(&control) {
        bail!("{PACKAGING_DIR}/control has a placeholder left: {left}");
    }
    write(&staging.join("DEBIAN/control"), control.as_bytes(), DATA)?;
    write(&staging.join("DEBIAN/md5sums"), md5sums.as_bytes(), DATA)?;
    for script in ["postinst", "prerm"] {
        stage(&staging, &format!("DEBIAN/{script}"), &src.join(script), EXECUTABLE)?;
    }

    let deb = out.join(format!("{PACKAGE}_{}_{}.deb", inputs.version, inputs.arch));
    let result = Command::new("dpkg-deb")
        .args(["--root-owner-group", "-Zgzip", "-z6", "--build"])
        .arg(&staging)
        .arg(&deb)
        .output()
        .context("running dpkg-deb (Debian's dpkg package)")?;
    if !result.status.success() {
        bail!("dpkg-deb --build failed: {}", String::from_utf8_lossy(&result.stderr).trim());
    }
    Ok(deb)
}

/// Drop the debug information of the staged binary (`strip --strip-debug`, binutils), as
/// Debian packages ship binaries: the release build keeps line tables for profiling, which
/// would make most of the package.
fn strip_debug_info(binary: &Path) -> Result<()> {
    let result = Command::new("strip")
        .arg("--strip-debug")
        .arg(binary)
        .output()
        .context("running strip (Debian's binutils package)")?;
    if !result.status.success() {
        bail!("strip --strip-debug {} failed: {}", binary.display(), String::from_utf8_lossy(&result.stderr).trim());
    }
    Ok(())
}

/// The first `@NAME@` (capitals and underscores) in `text`.
fn placeholder(text: &str) -> Option<&str> {
    let mut parts = text.split('@');
    parts.next();
    parts.find(|p| !p.is_empty() && p.chars().all(|c| c.is_ascii_uppercase() || c == '_'))
}

/// Copy `from` to `rel` under `staging` with `mode`, making its directories (0755).
fn stage(staging: &Path, rel: &str, from: &Path, mode: u32) -> Result<()> {
    let bytes = fs::read(from).with_context(|| format!("reading {}", from.display()))?;
    write(&staging.join(rel), &bytes, mode)
}

fn write(path: &Path, bytes: &[u8], mode: u32) -> Result<()> {
    let dir = path.parent().context("a staged file has a directory")?;
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    set_dir_modes(dir)?;
    fs::write(path, bytes).with_context(|| format!("writing {}", path.display()))?;
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).with_context(|| format!("chmod {}", path.display()))
}

/// 0755 on `dir` and every parent up to the staging root (a umask may have made them tighter).
fn set_dir_modes(dir: &Path) -> Result<()> {
    let mut d = Some(dir);
    while let Some(p) = d {
        if p.file_name().is_some_and(|n| n == "staging") {
            break;
        }
        fs::set_permissions(p, fs::Permissions::from_mode(DIR)).with_context(|| format!("chmod {}", p.display()))?;
        d = p.parent();
    }
    Ok(())
}

/// `DEBIAN/md5sums`: one line per file below `staging` (DEBIAN/ excluded), as `md5sum` prints.
fn md5sums(staging: &Path) -> Result<String> {
    let mut files = Vec::new();
    walk(staging, &mut files)?;
    files.sort();
    let mut out = String::new();
    for f in files {
        let rel = f.strip_prefix(staging).context("below staging")?;
        if rel.starts_with("DEBIAN") {
            continue;
        }
        let sum = md5_file(&f)?;
        out.push_str(&format!("{sum}  {}\n", rel.display()));
    }
    Ok(out)
}

fn md5_file(path: &Path) -> Result<String> {
    let out = Command::new("md5sum").arg(path).output().context("running md5sum (coreutils)")?;
    if !out.status.success() {
        bail!("md5sum {} failed", path.display());
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let sum = text.split_whitespace().next().unwrap_or_default();
    if sum.len() != 32 {
        bail!("md5sum printed {text:?}");
    }
    Ok(sum.to_string())
}

fn walk(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    for e in fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let p = e?.path();
        if p.is_dir() { walk(&p, out)? } else { out.push(p) }
    }
    Ok(())
}

/// Bytes of every file below `dir` (for Installed-Size).
fn tree_bytes(dir: &Path) -> Result<u64> {
    let mut files = Vec::new();
    walk(dir, &mut files)?;
    files.iter().map(|f| Ok(fs::metadata(f).with_context(|| format!("stat {}", f.display()))?.len())).sum()
}

#[cfg(test)]
mod tests {
    #[test]
    fn placeholders_are_found_but_not_mail_addresses() {
        assert_eq!(super::placeholder("Version: @VERSION@\n"), Some("VERSION"));
        assert_eq!(super::placeholder("Maintainer: x <pgward@localhost>\nVersion: 1\n"), None);
        assert_eq!(super::placeholder("a @INSTALLED_SIZE@"), Some("INSTALLED_SIZE"));
    }
}
