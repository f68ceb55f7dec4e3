//! `tracer top`: the live terminal view of one node's paths and top flows.
//!
//! Data flows one way: a source (the local agent's JSON API, or the datapath run in-process)
//! yields a snapshot every interval on a task of its own; the terminal thread folds snapshots
//! and keys into the app state (`app`, pure) and draws it (`render`).
mod app;
mod columns;
mod input;
mod rates;
mod render;
pub mod source;
mod terminal;
mod wire;

use std::{
    sync::mpsc,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use ratatui::crossterm::event::{self, Event};
use serde::{Deserialize, Serialize};
use tokio::signal::unix::{SignalKind, signal};

use anyhow::anyhow;

use crate::{
    agent::AgentError,
    cli::TopArgs,
    privileges::{self, Capability},
};
use app::App;
use source::{AgentClient, FetchError};
use terminal::{Screen, ScreenError};
use wire::{FlowsResponse, PathsResponse};

/// One reading of the source: the two bodies of the JSON API. Also what `--once --json`
/// prints.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Snapshot {
    pub paths: PathsResponse,
    pub flows: FlowsResponse,
}

/// No terminal is a usage error (2); anything else a runtime failure (1).
impl From<ScreenError> for AgentError {
    fn from(error: ScreenError) -> AgentError {
        match error {
            ScreenError::NotATerminal => AgentError::Config(error.into()),
            ScreenError::Setup(_) => AgentError::Runtime(error.into()),
        }
    }
}

/// Where the snapshots come from.
enum Source {
    Agent(AgentClient),
}

impl Source {
    fn describe(&self) -> String {
        match self {
            Source::Agent(client) => format!("agent at {}", client.url()),
        }
    }

    async fn snapshot(&mut self) -> Result<Snapshot, FetchError> {
        match self {
            Source::Agent(client) => client.snapshot().await,
        }
    }
}

pub async fn run(args: TopArgs) -> Result<(), AgentError> {
    if !args.once {
        terminal::require_terminal()?;
    }
    let client = AgentClient::new(args.agent.clone(), args.limit);
    let (source, first) = match client.snapshot().await {
        Ok(snapshot) => (Source::Agent(client), snapshot),
        Err(error @ FetchError::Unreachable { .. }) => {
            let missing = privileges::acquire()
                .map_err(AgentError::Runtime)?
                .missing();
            if !missing.is_empty() {
                return Err(AgentError::Runtime(lacking_privileges(&error, &missing)));
            }
            return Err(AgentError::Runtime(error.into()));
        }
        Err(error) => return Err(AgentError::Runtime(error.into())),
    };
    if args.once {
        let json = serde_json::to_string_pretty(&first)
            .map_err(|error| AgentError::Runtime(anyhow!("writing the snapshot: {error}")))?;
        println!("{json}");
        return Ok(());
    }
    let mut app = App::new(source.describe());
    app.apply(first);
    show(app, source, args.interval).await
}

/// No agent, and not allowed to run the datapath here: what is needed, and the ways out.
fn lacking_privileges(unreachable: &FetchError, missing: &[Capability]) -> anyhow::Error {
    let names = |caps: &[Capability]| -> String {
        caps.iter()
            .map(|cap| cap.name)
            .collect::<Vec<_>>()
            .join(", ")
    };
    anyhow!(
        "{unreachable}; running the datapath here instead needs root or {} (this process lacks {}): \
         start `tracer agent`, point --agent at one, or run tracer top as root",
        names(&privileges::REQUIRED),
        names(missing)
    )
}

/// What the source task tells the terminal thread.
enum Update {
    Snapshot(Snapshot),
    Failed(String),
    /// SIGTERM or SIGINT: restore the terminal and leave.
    Stop,
}

/// Runs the terminal view until `q`, Ctrl-C or a signal; the source polls on its own task.
async fn show(app: App, mut source: Source, interval: Duration) -> Result<(), AgentError> {
    let signals = signal(SignalKind::terminate()).and_then(|terminate| {
        signal(SignalKind::interrupt()).map(|interrupt| (terminate, interrupt))
    });
    let (mut terminate, mut interrupt) =
        signals.map_err(|error| AgentError::Runtime(anyhow!("signal handlers: {error}")))?;
    let (updates, received) = mpsc::channel();
    let poller = tokio::spawn(async move {
        let mut ticker = tokio::time::interval(interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // The first tick is immediate: the app already has the first snapshot.
        ticker.tick().await;
        loop {
            let update = tokio::select! {
                _ = ticker.tick() => match source.snapshot().await {
                    Ok(snapshot) => Update::Snapshot(snapshot),
                    Err(error) => Update::Failed(error.to_string()),
                },
                _ = terminate.recv() => Update::Stop,
                _ = interrupt.recv() => Update::Stop,
            };
            let stop = matches!(update, Update::Stop);
            if updates.send(update).is_err() || stop {
                return;
            }
        }
    });
    let ui = tokio::task::spawn_blocking(move || -> Result<(), AgentError> {
        // A log line would land in the middle of the screen; what goes wrong shows in the
        // header (the source's problems) and the status line instead.
        log::set_max_level(log::LevelFilter::Off);
        let mut screen = Screen::enter()?;
        ui_loop(&mut screen, app, &received)
            .map_err(|error| AgentError::Runtime(anyhow!("drawing the terminal: {error}")))
    });
    let result = ui.await;
    // Ends the source (standalone: detaches the datapath).
    poller.abort();
    let _ = poller.await;
    result.unwrap_or_else(|_| Err(AgentError::Runtime(anyhow!("the terminal view crashed"))))
}

/// How long the terminal thread waits for a key before it looks at the source again.
const TICK: Duration = Duration::from_millis(100);

fn ui_loop(
    screen: &mut Screen,
    mut app: App,
    updates: &mpsc::Receiver<Update>,
) -> std::io::Result<()> {
    let mut redraw = true;
    let mut last_draw = std::time::Instant::now();
    while !app.quit {
        // Redrawn at least every second: the data age in the header moves.
        if redraw || last_draw.elapsed() >= Duration::from_secs(1) {
            screen
                .terminal
                .draw(|frame| render::draw(frame, &app, now_unix_ms()))?;
            last_draw = std::time::Instant::now();
            redraw = false;
        }
        if event::poll(TICK)? {
            match event::read()? {
                Event::Key(key) => {
                    if let Some(action) = input::action(key, app.editing.is_some()) {
                        app.act(action);
                    }
                }
                Event::Resize(..) => screen.terminal.autoresize()?,
                _ => {}
            }
            redraw = true;
        }
        while let Ok(update) = updates.try_recv() {
            match update {
                Update::Snapshot(snapshot) => app.apply(snapshot),
                Update::Failed(error) => app.error = Some(error),
                Update::Stop => app.quit = true,
            }
            redraw = true;
        }
    }
    Ok(())
}

fn now_unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |since| since.as_millis() as u64)
}
