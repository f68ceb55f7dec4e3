//! Figures the tests measure (attach latency, …), kept in `target/test-figures/` so that
//! `cargo xtask test` can print them after the suite, where CI logs show them.
use std::path::PathBuf;

use crate::build::workspace_root;

fn dir() -> PathBuf {
    workspace_root().join("target/test-figures")
}

/// Records `text` as figure `name` (one line or a small table), replacing an older one.
pub fn record(name: &str, text: &str) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir())?;
    std::fs::write(dir().join(format!("{name}.txt")), text)?;
    eprintln!("{text}");
    Ok(())
}

/// Forgets the figures of an earlier run.
pub fn clear() -> anyhow::Result<()> {
    match std::fs::remove_dir_all(dir()) {
        Err(error) if error.kind() != std::io::ErrorKind::NotFound => Err(error.into()),
        _ => Ok(()),
    }
}

/// Every figure recorded since `clear`, sorted by name.
pub fn all() -> anyhow::Result<Vec<(String, String)>> {
    let Ok(entries) = std::fs::read_dir(dir()) else {
        return Ok(Vec::new());
    };
    let mut figures = Vec::new();
    for entry in entries {
        let path = entry?.path();
        let name = path
            .file_stem()
            .unwrap_or_default()
            .to_string_lossy()
            .into_owned();
        figures.push((name, std::fs::read_to_string(&path)?));
    }
    figures.sort();
    Ok(figures)
}
