//! The files the Debian package ships next to the binary (gateway-user/packaging/deb, built into
//! a .deb by `cargo xtask package`) agree with what `pgward install` writes: the unit template
//! is install's unit for the package's binary path, the default configuration loads.

use std::path::{Path, PathBuf};

use super::tree::PACKAGE_BIN_DIR;
use super::unit::{UnitParams, unit_text};

fn packaging_file(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("packaging/deb").join(name)
}

/// The unit `pgward install` writes with its defaults on a Debian host, for the package's binary.
fn default_unit() -> String {
    unit_text(&UnitParams {
        exec: Path::new(PACKAGE_BIN_DIR).join("pgward"),
        user: "pgward".into(),
        supplementary_group: Some("postgres".into()),
        socket_dir: "/run/postgresql".into(),
        pg_service: "postgresql.service".into(),
    })
}

/// `PGWARD_BLESS=1` rewrites the template from install's unit (after a change to unit.rs).
#[test]
fn the_packaged_unit_template_is_installs_unit() {
    let path = packaging_file("pgward.service");
    let want = default_unit();
    if std::env::var_os("PGWARD_BLESS").is_some() {
        std::fs::write(&path, &want).unwrap();
    }
    let have = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(have == want, "{} differs from install's unit; rerun with PGWARD_BLESS=1", path.display());
}

#[test]
fn the_packaged_default_config_loads() {
    let path = packaging_file("pgward.toml");
    let cfg = crate::config::Config::load(&path).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(cfg.audit.dir, Path::new(super::AUDIT_DIR));
    assert_eq!(cfg.access.state_dir, Path::new(super::ACCESS_DIR));
    assert_eq!(cfg.intercept.state_file, Path::new(super::STATE_FILE));
    assert!(cfg.intercept.enabled);
}
