//! `pgward status`: the pinned programs, what `serve` recorded, whether it is serving, and
//! the live counters.

use std::collections::BTreeSet;
use std::fs;
use std::path::PathBuf;

use anyhow::Context;
use aya::maps::{Map, MapData, PerCpuArray};
use gateway_common as common;
use serde::Serialize;

use super::pins;
use super::programs::expected_programs;
use super::state::State;
use crate::config::Config;
use crate::host::process;

#[derive(Debug, Serialize)]
pub struct Status {
    pub enabled: bool,
    /// A `serve` process is serving with these programs (it wrote the state file, is alive,
    /// and has not stopped).
    pub running: bool,
    /// Where the programs are pinned, and whether anything is.
    pub pin_dir: PathBuf,
    pub pinned: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub state: Option<State>,
    pub programs: Vec<ProgramStatus>,
    pub counters: Vec<CounterStatus>,
}

#[derive(Debug, Serialize)]
pub struct ProgramStatus {
    pub name: String,
    pub attach: String,
    pub target: PathBuf,
    pub id: u32,
    pub loaded: bool,
    pub attached: bool,
    /// Its link is pinned (it stays attached when pgward exits).
    pub pinned: bool,
}

#[derive(Debug, Serialize)]
pub struct CounterStatus {
    pub program: String,
    pub counter: String,
    pub value: u64,
}

/// The pinned programs (from bpffs), what `serve` recorded (its state file), whether it is
/// serving, and the live counters.
pub fn status(cfg: &Config) -> anyhow::Result<Status> {
    let pin_dir = pins::pin_dir(cfg);
    let pinned = pins::pinned_links(&pin_dir);
    let mut st = Status {
        enabled: cfg.intercept.enabled,
        running: false,
        pin_dir: pin_dir.clone(),
        pinned: !pinned.is_empty(),
        state: None,
        programs: vec![],
        counters: vec![],
    };
    let path = cfg.resolve(&cfg.intercept.state_file);
    let state: Option<State> = match fs::read(&path) {
        Ok(b) => Some(serde_json::from_slice(&b).with_context(|| format!("{} is not a pgward state file", path.display()))?),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    st.running = state.as_ref().is_some_and(|s| s.stopped.is_none() && is_pgward_process(s.pid));
    let loaded: std::collections::HashMap<u32, aya::programs::ProgramInfo> = aya::programs::loaded_programs()
        .filter_map(Result::ok)
        .map(|p| (p.id(), p))
        .collect();
    let linked: BTreeSet<u32> = aya::programs::loaded_links().filter_map(Result::ok).map(|l| l.program_id()).collect();
    let recorded = |name: &str| state.as_ref().and_then(|s| s.programs.iter().find(|p| p.name == name));
    let mut names: Vec<(String, String)> = expected_programs(true).into_iter().map(|(n, h)| (n.into(), h.into())).collect();
    names.retain(|(n, _)| pinned.iter().any(|p| p.name == *n) || recorded(n).is_some());
    for (name, hook) in names {
        let pin = pinned.iter().find(|p| p.name == name);
        let rec = recorded(&name);
        let id = pin.and_then(|p| p.program_id).or(rec.map(|r| r.id)).unwrap_or(0);
        let info = loaded.get(&id).filter(|i| i.name_as_str().is_some_and(|n| name.starts_with(n)));
        st.programs.push(ProgramStatus {
            name: name.clone(),
            attach: rec.map(|r| r.attach.clone()).unwrap_or(hook),
            target: rec.map(|r| r.target.clone()).unwrap_or_default(),
            id,
            loaded: info.is_some(),
            attached: info.is_some() && linked.contains(&id),
            pinned: pin.is_some(),
        });
    }
    if st.pinned
        && let Ok(data) = pins::open_map(&pin_dir, common::MAP_COUNTERS)
    {
        let arr: PerCpuArray<MapData, u64> = Map::PerCpuArray(data).try_into()?;
        for (i, (program, counter)) in common::COUNTER_NAMES.iter().enumerate() {
            let value = arr.get(&(i as u32), 0).map(|v| v.iter().sum()).unwrap_or(0);
            st.counters.push(CounterStatus { program: program.to_string(), counter: counter.to_string(), value });
        }
    }
    st.state = state;
    Ok(st)
}

/// `pid` is alive and is a pgward (not a process that reused the pid of one that died).
fn is_pgward_process(pid: u32) -> bool {
    process::comm(pid).is_some_and(|c| c == PROCESS_NAME)
}
const PROCESS_NAME: &str = "pgward";
