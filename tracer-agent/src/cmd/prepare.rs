//! `tracer prepare`: the directories a restart without loss needs, made and given to the
//! agent's user. They live in memory (the host's bpffs, `/run`) and are empty after every boot
//! of the node; the agent runs as a non-root user without `CAP_DAC_OVERRIDE` and cannot make
//! them itself, so the chart runs this first, in an init container, as root with `CAP_CHOWN`.
use std::{
    os::unix::fs::{MetadataExt as _, PermissionsExt as _},
    path::Path,
};

use anyhow::Context as _;

use crate::{
    cli::{Owner, PrepareArgs},
    error::AgentError,
};

pub fn run(args: PrepareArgs) -> Result<(), AgentError> {
    for dir in &args.dirs {
        prepare(dir, args.owner).map_err(AgentError::Runtime)?;
        println!(
            "prepared {} for {}:{}",
            dir.display(),
            args.owner.uid,
            args.owner.gid
        );
    }
    Ok(())
}

/// Makes `dir` if missing and gives it, readable and writable by it alone, to `owner`; one
/// already given (an agent restarted without a reboot of the node) is left as it is.
fn prepare(dir: &Path, owner: Owner) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let metadata =
        std::fs::metadata(dir).with_context(|| format!("cannot read {}", dir.display()))?;
    if (metadata.uid(), metadata.gid()) == (owner.uid, owner.gid) {
        return Ok(());
    }
    // The mode first: once given away, the directory is no longer root's to change.
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
        .with_context(|| format!("cannot set the mode of {}", dir.display()))?;
    std::os::unix::fs::chown(dir, Some(owner.uid), Some(owner.gid)).with_context(|| {
        format!(
            "cannot give {} to {}:{} (needs CAP_CHOWN)",
            dir.display(),
            owner.uid,
            owner.gid
        )
    })
}
