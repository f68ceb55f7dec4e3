//! A real terminal for tests of `tracer top`: a tmux server of our own (its own socket, no
//! user configuration) running a plain `sh`, driven with `send-keys` and read with
//! `capture-pane`, as a person at a terminal would.
use std::{
    process::{Command, Output},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

/// The prompt of the shell in the pane: seeing it again means the program gave the terminal
/// back.
pub const PROMPT: &str = "tmux-test$ ";

/// How long a screen must stay the same to count as drawn, not caught mid-redraw.
const SETTLE: Duration = Duration::from_millis(50);

pub struct Tmux {
    socket: String,
}

impl Tmux {
    /// A `width`×`height` terminal with `sh` in it, on a tmux server named `name` (unique per
    /// test run: the server is killed when this handle goes).
    pub fn start(name: &str, width: u16, height: u16) -> anyhow::Result<Self> {
        let tmux = Self {
            socket: format!("tracer-{name}-{}", std::process::id()),
        };
        // sh (dash) leaves the terminal modes as it finds them: what `stty` shows after a
        // program exits is what that program left.
        tmux.run(&[
            "-f",
            "/dev/null",
            "new-session",
            "-d",
            "-x",
            &width.to_string(),
            "-y",
            &height.to_string(),
            &format!("env PS1='{PROMPT}' sh"),
        ])?;
        // capture-pane drops trailing blanks.
        tmux.wait_for("the shell prompt", Duration::from_secs(5), |screen| {
            screen.contains(PROMPT.trim_end())
        })?;
        Ok(tmux)
    }

    fn run(&self, args: &[&str]) -> anyhow::Result<Output> {
        let output = Command::new("tmux")
            .args(["-L", &self.socket])
            .args(args)
            .output()
            .context("running tmux (Debian package tmux; `cargo xtask setup` installs it)")?;
        if !output.status.success() {
            bail!(
                "tmux {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&output.stderr).trim()
            );
        }
        Ok(output)
    }

    /// Types `line` and Enter.
    pub fn type_line(&self, line: &str) -> anyhow::Result<()> {
        self.run(&["send-keys", "-l", line])?;
        self.run(&["send-keys", "Enter"])?;
        Ok(())
    }

    /// Presses keys one at a time (tmux key names: `Tab`, `Escape`, `Enter`, `q`, `C-c`),
    /// apart enough that the program reads each alone (an Escape followed at once by another
    /// key would read as Alt+key).
    pub fn press(&self, keys: &[&str]) -> anyhow::Result<()> {
        for key in keys {
            self.run(&["send-keys", key])?;
            std::thread::sleep(Duration::from_millis(150));
        }
        Ok(())
    }

    /// Types text literally (each character a key), then waits a moment.
    pub fn type_text(&self, text: &str) -> anyhow::Result<()> {
        self.run(&["send-keys", "-l", text])?;
        std::thread::sleep(Duration::from_millis(150));
        Ok(())
    }

    /// Resizes the terminal, as a person dragging the window's corner.
    pub fn resize(&self, width: u16, height: u16) -> anyhow::Result<()> {
        self.run(&[
            "resize-window",
            "-x",
            &width.to_string(),
            "-y",
            &height.to_string(),
        ])?;
        Ok(())
    }

    /// What the terminal shows now, line by line.
    pub fn screen(&self) -> anyhow::Result<String> {
        let output = self.run(&["capture-pane", "-p"])?;
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    }

    /// Polls the screen until `ready` holds on a settled screen; fails with the last screen
    /// after `timeout`.
    pub fn wait_for(
        &self,
        what: &str,
        timeout: Duration,
        ready: impl Fn(&str) -> bool,
    ) -> anyhow::Result<String> {
        let deadline = Instant::now() + timeout;
        loop {
            let screen = self.screen()?;
            // A capture taken while the program redraws mixes two frames: only a screen that
            // is still the same a moment later counts.
            if ready(&screen) && {
                std::thread::sleep(SETTLE);
                self.screen()? == screen
            } {
                return Ok(screen);
            }
            if Instant::now() > deadline {
                bail!("no {what} on the terminal after {timeout:?}; it shows:\n{screen}");
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn format(&self, variable: &str) -> anyhow::Result<String> {
        let output = self.run(&["display-message", "-p", &format!("#{{{variable}}}")])?;
        Ok(String::from_utf8_lossy(&output.stdout).trim().to_owned())
    }

    /// Whether the pane is on the alternate screen (where full-screen programs draw).
    pub fn alternate_screen(&self) -> anyhow::Result<bool> {
        Ok(self.format("alternate_on")? == "1")
    }

    pub fn cursor_visible(&self) -> anyhow::Result<bool> {
        Ok(self.format("cursor_flag")? == "1")
    }

    /// The process id of the program running in the foreground of the shell, if any.
    pub fn foreground_pid(&self) -> anyhow::Result<Option<u32>> {
        let shell = self.format("pane_pid")?;
        let children = std::fs::read_to_string(format!("/proc/{shell}/task/{shell}/children"))
            .with_context(|| format!("reading the children of the pane's shell {shell}"))?;
        Ok(children
            .split_whitespace()
            .next()
            .and_then(|pid| pid.parse().ok()))
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = Command::new("tmux")
            .args(["-L", &self.socket, "kill-server"])
            .output();
    }
}
