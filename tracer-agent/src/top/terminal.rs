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
pub struct Screen {
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
    pub fn enter() -> Result<Screen, ScreenError> {
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
            Ok(terminal) => Ok(Screen { terminal }),
            Err(error) => {
                restore();
                Err(error.into())
            }
        }
    }
}

/// Fails early, before any work, when there is no terminal to draw on.
pub fn require_terminal() -> Result<(), ScreenError> {
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
