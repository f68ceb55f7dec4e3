//! A bpffs of the lab's own, for agents started with `--pin-path`: the host's `/sys/fs/bpf`
//! is never touched, and whatever an agent left pinned goes with the unmount.
use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};

use super::Lab;

/// Mounted in a temporary directory named after the lab; unmounted and removed when dropped,
/// even when a test fails.
pub struct Bpffs {
    mount_point: PathBuf,
}

impl Bpffs {
    pub fn mount(lab: &Lab) -> anyhow::Result<Self> {
        let mount_point = std::env::temp_dir().join(format!("trc-{}-bpffs", lab.id()));
        std::fs::create_dir_all(&mount_point)
            .with_context(|| format!("creating {}", mount_point.display()))?;
        let status = Command::new("mount")
            .args(["-t", "bpf", "bpf"])
            .arg(&mount_point)
            .status()
            .context("running mount")?;
        if !status.success() {
            let _ = std::fs::remove_dir(&mount_point);
            bail!(
                "mount -t bpf on {} failed: root and a kernel with CONFIG_BPF_SYSCALL are needed",
                mount_point.display()
            );
        }
        Ok(Self { mount_point })
    }

    /// The directory an agent is given as `--pin-path` (it creates it).
    pub fn pin_path(&self) -> PathBuf {
        self.mount_point.join("tracer")
    }

    pub fn mount_point(&self) -> &Path {
        &self.mount_point
    }
}

impl Drop for Bpffs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.mount_point).status();
        let _ = std::fs::remove_dir(&self.mount_point);
    }
}
