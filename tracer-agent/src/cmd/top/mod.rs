//! `tracer top`: the live terminal view of one node's paths and top flows.
//!
//! Data flows one way: a source (the local agent's JSON API, or the agent's pipeline run
//! in-process) yields a reading every interval; the terminal thread, a thread of its own, folds
//! readings and keys into the app state (`app`, pure) and draws it (`render`).
mod app;
mod client;
mod columns;
mod input;
mod rates;
mod render;
mod source;
mod terminal;

pub use client::AgentUrl;

use std::{
    sync::mpsc,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use anyhow::anyhow;
use ratatui::crossterm::event::{self, Event};
use serde::Serialize;
use tokio::signal::unix::{SignalKind, signal};

use crate::{
    cli::TopArgs,
    error::AgentError,
    serve::api::{FlowsResponse, PathsResponse},
};
use app::App;
use client::FetchError;
use source::Source;
use terminal::{Screen, ScreenError};

/// One reading of the source: the two bodies of the JSON API. Also what `--once --json`
/// prints.
#[derive(Clone, Debug, Serialize)]
pub struct Reading {
    pub paths: PathsResponse,
    pub flows: FlowsResponse,
}

/// No terminal is a usage error (2); anything else a runtime failure (1).
impl From<ScreenError> for AgentError {
    fn from(error: ScreenError) -> Self {
        match error {
            ScreenError::NotATerminal => Self::Config(error.into()),
            ScreenError::Setup(_) => Self::Runtime(error.into()),
        }
    }
}

/// Reading the agent failed: a runtime failure (1).
impl From<FetchError> for AgentError {
    fn from(error: FetchError) -> Self {
        Self::Runtime(error.into())
    }
}

pub async fn run(args: TopArgs) -> Result<(), AgentError> {
    if !args.once {
        terminal::require_terminal()?;
    }
    let interval = args.pipeline.poll_interval;
    let (mut source, first) = Source::open(&args).await?;
    if args.once {
        let reading = source.settled(first, interval).await?;
        let json = serde_json::to_string_pretty(&reading)
            .map_err(|error| AgentError::Runtime(anyhow!("writing the reading: {error}")))?;
        println!("{json}");
        return Ok(());
    }
    let mut app = App::new(source.describe());
    app.apply(first);
    show(app, source, interval).await
}

/// What the source tells the terminal thread.
enum Update {
    /// Boxed: a reading is ten times the size of the other variants.
    Reading(Box<Reading>),
    Failed(String),
    /// SIGTERM or SIGINT: restore the terminal and leave.
    Stop,
}

/// Runs the terminal view on a thread of its own until `q`, Ctrl-C or a signal, while this
/// task reads the source every `interval`; then drops the source (standalone: detaches).
async fn show(app: App, mut source: Source, interval: Duration) -> Result<(), AgentError> {
    let signals = signal(SignalKind::terminate()).and_then(|terminate| {
        signal(SignalKind::interrupt()).map(|interrupt| (terminate, interrupt))
    });
    let (mut terminate, mut interrupt) =
        signals.map_err(|error| AgentError::Runtime(anyhow!("signal handlers: {error}")))?;
    let (updates, received) = mpsc::channel();
    let mut ui = tokio::task::spawn_blocking(move || -> Result<(), AgentError> {
        // A log line would land in the middle of the screen; what goes wrong shows in the
        // header (the source's problems) and the status line instead. Dropped after the
        // screen: the logs come back once the terminal is restored.
        let _silence = crate::logging::silence();
        let mut screen = Screen::enter()?;
        ui_loop(&mut screen, app, &received)
            .map_err(|error| AgentError::Runtime(anyhow!("drawing the terminal: {error}")))
    });
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // The first tick is immediate: the app already has the first reading.
    ticker.tick().await;
    let ended = loop {
        // A send fails only once the terminal thread is gone, which the next turn sees.
        tokio::select! {
            ended = &mut ui => break ended,
            _ = ticker.tick() => {
                let update = match source.read().await {
                    Ok(reading) => Update::Reading(Box::new(reading)),
                    Err(error) => Update::Failed(error.to_string()),
                };
                let _ = updates.send(update);
            }
            _ = terminate.recv() => { let _ = updates.send(Update::Stop); }
            _ = interrupt.recv() => { let _ = updates.send(Update::Stop); }
        }
    };
    drop(source);
    ended.unwrap_or_else(|_| Err(AgentError::Runtime(anyhow!("the terminal view crashed"))))
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
                Update::Reading(reading) => app.apply(*reading),
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
