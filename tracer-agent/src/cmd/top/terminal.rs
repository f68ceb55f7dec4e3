//! The full-screen terminal, and giving it back as it was on every way out: a normal return
//! or an error (the guard's drop) and a panic (the panic hook, before the message prints).
use std::{
    io::{self, IsTerminal as _, Stdout},
    sync::{
        Once,
        atomic::{AtomicBool, Ordering},
    },
};

use ratatui::{
    Terminal,
    backend::CrosstermBackend,
    crossterm::{
        cursor::Show,
        execute,
        terminal::{EnterAlternateScreen, LeaveAlternateScreen, disable_raw_mode, enable_raw_mode},
    },
};

/// Whether the terminal is in raw mode on the alternate screen (restore once, not twice: a
/// second "leave the alternate screen" would move the cursor on the normal one).
static ACTIVE: AtomicBool = AtomicBool::new(false);
static PANIC_HOOK: Once = Once::new();

/// The terminal in raw mode on the alternate screen; dropping it restores the terminal.
pub(super) struct Screen {
    pub terminal: Terminal<CrosstermBackend<Stdout>>,
}

#[derive(Debug, thiserror::Error)]
pub enum ScreenError {
    #[error("standard output is not a terminal: run tracer top in one, or use --once --json")]
    NotATerminal,
    #[error("setting up the terminal: {0}")]
    Setup(#[from] io::Error),
}

impl Screen {
    pub(super) fn enter() -> Result<Self, ScreenError> {
        require_terminal()?;
        PANIC_HOOK.call_once(|| {
            let previous = std::panic::take_hook();
            std::panic::set_hook(Box::new(move |info| {
                restore();
                previous(info);
            }));
        });
        ACTIVE.store(true, Ordering::SeqCst);
        // On an error, the half-entered terminal is restored as `screen` is never built.
        let setup = || -> io::Result<Terminal<CrosstermBackend<Stdout>>> {
            enable_raw_mode()?;
            execute!(io::stdout(), EnterAlternateScreen)?;
            Terminal::new(CrosstermBackend::new(io::stdout()))
        };
        match setup() {
            Ok(terminal) => Ok(Self { terminal }),
            Err(error) => {
                restore();
                Err(error.into())
            }
        }
    }
}

/// Fails early, before any work, when there is no terminal to draw on.
pub(super) fn require_terminal() -> Result<(), ScreenError> {
    if io::stdout().is_terminal() {
        Ok(())
    } else {
        Err(ScreenError::NotATerminal)
    }
}

impl Drop for Screen {
    fn drop(&mut self) {
        restore();
    }
}

/// Cooked mode, the normal screen, a visible cursor; once.
fn restore() {
    if ACTIVE.swap(false, Ordering::SeqCst) {
        let _ = disable_raw_mode();
        let _ = execute!(io::stdout(), LeaveAlternateScreen, Show);
    }
}

#[cfg(test)]
mod tests {
    use std::{
        process::Command,
        time::{Duration, Instant},
    };

    use super::*;

    const PANIC_MESSAGE: &str = "deliberate panic with the screen entered";

    /// Run by `a_panic_gives_the_terminal_back`, inside a terminal.
    #[test]
    #[ignore = "needs a terminal: a_panic_gives_the_terminal_back runs it in one"]
    fn panic_on_the_screen() {
        let _screen = Screen::enter().expect("a terminal");
        panic!("{PANIC_MESSAGE}");
    }

    /// A panic with the screen entered, in a real terminal (tmux): afterwards the panic's
    /// message shows on the normal screen (the hook restored the terminal before it printed),
    /// and the terminal is in cooked mode with echo.
    #[test]
    fn a_panic_gives_the_terminal_back() {
        let socket = format!("tracer-panic-{}", std::process::id());
        let tmux = |args: &[&str]| -> String {
            let output = Command::new("tmux")
                .args(["-L", &socket, "-f", "/dev/null"])
                .args(args)
                .output()
                .expect("tmux runs (Debian package tmux; `cargo xtask setup` installs it)");
            String::from_utf8_lossy(&output.stdout).into_owned()
        };
        let test_binary = std::env::current_exe().expect("the test binary");
        // The test's path inside the crate, wherever the module moves.
        let (_crate, module) = module_path!().split_once("::").expect("a module path");
        let script = format!(
            "RUST_BACKTRACE=0 {} --exact {module}::panic_on_the_screen --ignored --nocapture --test-threads=1; \
             stty -a | tr ' ;' '\\n\\n' | grep -x -e -icanon -e icanon -e -echo -e echo | tr '\\n' ' '; \
             echo finished; sleep 60",
            test_binary.display()
        );
        tmux(&[
            "new-session",
            "-d",
            "-x",
            "100",
            "-y",
            "30",
            "sh",
            "-c",
            &script,
        ]);
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut screen = String::new();
        while Instant::now() < deadline && !screen.contains("finished") {
            std::thread::sleep(Duration::from_millis(200));
            screen = tmux(&["capture-pane", "-p"]);
        }
        let alternate = tmux(&["display-message", "-p", "#{alternate_on}"]);
        tmux(&["kill-server"]);
        assert!(
            screen.contains("finished"),
            "the child did not finish:\n{screen}"
        );
        assert_eq!(
            alternate.trim(),
            "0",
            "left on the alternate screen:\n{screen}"
        );
        assert!(
            screen.contains(PANIC_MESSAGE),
            "the panic message was lost (printed on the alternate screen?):\n{screen}"
        );
        assert!(
            screen.contains("icanon echo") && !screen.contains("-icanon"),
            "the terminal was left in raw mode:\n{screen}"
        );
    }
}
