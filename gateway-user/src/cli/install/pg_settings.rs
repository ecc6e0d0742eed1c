//! postgresql.conf as Postgres reads it: `name = value` lines, includes (include,
//! include_if_exists, include_dir) and postgresql.auto.conf, giving the settings it will use.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};

use super::tree::Root;

#[derive(Debug, Clone, PartialEq)]
pub struct PgSetting {
    pub value: String,
    /// The file that set it last (a system path).
    pub file: PathBuf,
}

/// `name = value` lines of a postgresql.conf-style file (names lowercased, values unquoted).
pub fn parse_pg_conf(text: &str) -> Vec<(String, String)> {
    text.lines().filter_map(parse_pg_line).collect()
}

pub(super) fn parse_pg_line(line: &str) -> Option<(String, String)> {
    let s = line.trim_start();
    if s.is_empty() || s.starts_with('#') {
        return None;
    }
    let end = s.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == '.')).unwrap_or(s.len());
    if end == 0 {
        return None;
    }
    let name = s[..end].to_ascii_lowercase();
    let mut rest = s[end..].trim_start();
    if let Some(r) = rest.strip_prefix('=') {
        rest = r.trim_start();
    }
    let value = if let Some(r) = rest.strip_prefix('\'') {
        let mut v = String::new();
        let mut chars = r.chars().peekable();
        while let Some(c) = chars.next() {
            match c {
                '\'' if chars.peek() == Some(&'\'') => {
                    chars.next();
                    v.push('\'');
                }
                '\'' => break,
                '\\' => {
                    if let Some(n) = chars.next() {
                        v.push(n);
                    }
                }
                c => v.push(c),
            }
        }
        v
    } else {
        rest.split(|c: char| c.is_whitespace() || c == '#').next().unwrap_or("").to_string()
    };
    Some((name, value))
}

pub(super) fn resolve_pg_path(including_file: &Path, value: &str) -> PathBuf {
    let p = Path::new(value);
    if p.is_absolute() { p.to_owned() } else { including_file.parent().unwrap_or(Path::new("/")).join(p) }
}

/// The settings Postgres will use: postgresql.conf with its includes (include, include_if_exists,
/// include_dir), then postgresql.auto.conf in the data directory. Paths are system paths.
pub fn pg_settings(
    root_dir: &Path,
    conf: &Path,
    data_dir: Option<&Path>,
) -> anyhow::Result<BTreeMap<String, PgSetting>> {
    let root = Root { dir: root_dir.to_owned() };
    pg_settings_in(&root, conf, data_dir)
}

pub(super) fn pg_settings_in(root: &Root, conf: &Path, data_dir: Option<&Path>) -> anyhow::Result<BTreeMap<String, PgSetting>> {
    fn read(
        root: &Root,
        sys: &Path,
        depth: u32,
        must: bool,
        out: &mut BTreeMap<String, PgSetting>,
    ) -> anyhow::Result<()> {
        if depth > 10 {
            bail!("{}: includes nested too deeply", sys.display());
        }
        let text = match std::fs::read_to_string(root.p(sys)) {
            Ok(t) => t,
            Err(e) if !must && e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(e).with_context(|| format!("reading {}", root.p(sys).display())),
        };
        for (name, value) in parse_pg_conf(&text) {
            match name.as_str() {
                "include" | "include_if_exists" => {
                    read(root, &resolve_pg_path(sys, &value), depth + 1, name == "include", out)?;
                }
                "include_dir" => {
                    let dir = resolve_pg_path(sys, &value);
                    let mut files: Vec<String> = std::fs::read_dir(root.p(&dir))
                        .with_context(|| format!("include_dir {}", root.p(&dir).display()))?
                        .flatten()
                        .map(|e| e.file_name().to_string_lossy().into_owned())
                        .filter(|n| n.ends_with(".conf") && !n.starts_with('.'))
                        .collect();
                    files.sort();
                    for f in files {
                        read(root, &dir.join(f), depth + 1, true, out)?;
                    }
                }
                _ => {
                    out.insert(name, PgSetting { value, file: sys.to_owned() });
                }
            }
        }
        Ok(())
    }
    let mut out = BTreeMap::new();
    read(root, conf, 0, true, &mut out)?;
    let data = match (data_dir, out.get("data_directory")) {
        (Some(d), _) => d.to_owned(),
        (None, Some(s)) => PathBuf::from(&s.value),
        (None, None) => conf.parent().unwrap_or(Path::new("/")).to_owned(),
    };
    read(root, &data.join("postgresql.auto.conf"), 0, false, &mut out)?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pg_conf_lines() {
        let p = |l: &str| parse_pg_line(l);
        assert_eq!(p("port = 5433"), Some(("port".into(), "5433".into())));
        assert_eq!(p("  Port 5433 # comment"), Some(("port".into(), "5433".into())));
        assert_eq!(p("listen_addresses='localhost'  # what IP"), Some(("listen_addresses".into(), "localhost".into())));
        assert_eq!(p("a = 'it''s \\'x\\''"), Some(("a".into(), "it's 'x'".into())));
        assert_eq!(p("#port = 1"), None);
        assert_eq!(p("   "), None);
        assert_eq!(p("include_dir = 'conf.d'"), Some(("include_dir".into(), "conf.d".into())));
    }

    #[test]
    fn effective_settings_follow_includes_and_auto_conf() {
        let tmp = tempfile::tempdir().unwrap();
        let root = Root { dir: tmp.path().to_owned() };
        let etc = root.p("/etc/postgresql/15/main");
        std::fs::create_dir_all(etc.join("conf.d")).unwrap();
        let data = root.p("/var/lib/postgresql/15/main");
        std::fs::create_dir_all(&data).unwrap();
        std::fs::write(
            etc.join("postgresql.conf"),
            "data_directory = '/var/lib/postgresql/15/main'\nport = 5432\nlisten_addresses = '*'\n\
             include_dir = 'conf.d'\ninclude_if_exists = 'missing.conf'\n",
        )
        .unwrap();
        std::fs::write(etc.join("conf.d/10-port.conf"), "port = 5433\n").unwrap();
        std::fs::write(etc.join("conf.d/.hidden.conf"), "port = 1\n").unwrap();
        let conf = Path::new("/etc/postgresql/15/main/postgresql.conf");
        let s = pg_settings_in(&root, conf, None).unwrap();
        assert_eq!(s["port"].value, "5433");
        assert_eq!(s["port"].file, Path::new("/etc/postgresql/15/main/conf.d/10-port.conf"));
        assert_eq!(s["listen_addresses"].value, "*");
        std::fs::write(data.join("postgresql.auto.conf"), "listen_addresses = '10.0.0.1'\n").unwrap();
        let s = pg_settings_in(&root, conf, None).unwrap();
        assert_eq!(s["listen_addresses"].value, "10.0.0.1");
        assert_eq!(s["listen_addresses"].file, Path::new("/var/lib/postgresql/15/main/postgresql.auto.conf"));
    }
}
