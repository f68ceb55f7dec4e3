//! Keys to actions. The help screen (`?`) lists the same bindings, from `HELP`.
use ratatui::crossterm::event::{KeyCode, KeyEvent, KeyEventKind, KeyModifiers};

use super::app::Action;

/// The bindings, for the help screen.
pub(super) const HELP: &[(&str, &str)] = &[
    (
        "< >  ← →",
        "sort the focused table by the previous / next column",
    ),
    ("r", "reverse the sort order"),
    ("Tab", "switch between the paths and the flows table"),
    ("↑ ↓  k j", "move the selection (scrolls long tables)"),
    (
        "/",
        "filter: a path name or label, or an address or pod (flows)",
    ),
    ("Enter / Esc", "apply the filter / clear it"),
    ("p  space", "pause (rates resume over the whole pause)"),
    ("?", "this help (Esc closes it)"),
    ("q  Ctrl-C", "quit"),
];

/// The action a key asks for; `editing` while the filter prompt is open.
pub(super) fn action(key: KeyEvent, editing: bool) -> Option<Action> {
    if key.kind == KeyEventKind::Release {
        return None;
    }
    if key.modifiers.contains(KeyModifiers::CONTROL) {
        return (key.code == KeyCode::Char('c')).then_some(Action::Quit);
    }
    if editing {
        return match key.code {
            KeyCode::Enter => Some(Action::ApplyFilter),
            KeyCode::Esc => Some(Action::ClearFilter),
            KeyCode::Backspace => Some(Action::FilterBackspace),
            KeyCode::Char(c) => Some(Action::FilterInput(c)),
            _ => None,
        };
    }
    Some(match key.code {
        KeyCode::Char('q') => Action::Quit,
        KeyCode::Char('?') => Action::ToggleHelp,
        KeyCode::Esc => Action::Dismiss,
        KeyCode::Tab | KeyCode::BackTab => Action::SwitchTable,
        KeyCode::Char('p' | ' ') => Action::TogglePause,
        KeyCode::Char('>') | KeyCode::Right => Action::SortNext,
        KeyCode::Char('<') | KeyCode::Left => Action::SortPrevious,
        KeyCode::Char('r') => Action::ReverseSort,
        KeyCode::Up | KeyCode::Char('k') => Action::SelectUp,
        KeyCode::Down | KeyCode::Char('j') => Action::SelectDown,
        KeyCode::Char('/') => Action::EditFilter,
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(code: KeyCode) -> KeyEvent {
        KeyEvent::new(code, KeyModifiers::NONE)
    }

    #[test]
    fn keys_mean_one_thing_outside_the_prompt_and_text_inside_it() {
        assert_eq!(action(key(KeyCode::Char('q')), false), Some(Action::Quit));
        assert_eq!(
            action(key(KeyCode::Char('q')), true),
            Some(Action::FilterInput('q'))
        );
        assert_eq!(
            action(key(KeyCode::Char('/')), false),
            Some(Action::EditFilter)
        );
        assert_eq!(action(key(KeyCode::Enter), true), Some(Action::ApplyFilter));
        assert_eq!(action(key(KeyCode::Esc), true), Some(Action::ClearFilter));
        assert_eq!(action(key(KeyCode::Esc), false), Some(Action::Dismiss));
        assert_eq!(action(key(KeyCode::Right), false), Some(Action::SortNext));
        assert_eq!(action(key(KeyCode::Char('x')), false), None);
        let ctrl_c = KeyEvent::new(KeyCode::Char('c'), KeyModifiers::CONTROL);
        assert_eq!(action(ctrl_c, false), Some(Action::Quit));
        assert_eq!(
            action(ctrl_c, true),
            Some(Action::Quit),
            "even while typing"
        );
    }
}
