//! A progress bar on stderr, drawn only when stderr is a terminal (the CLI
//! has no progress crate; `submit --wait` draws its spinner the same way).
//! Thread-safe: concurrent measurements advance it together.

use std::io::{IsTerminal, Write};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Redraws at most this often.
const REDRAW: Duration = Duration::from_millis(100);
/// Width of the bar in cells.
const WIDTH: usize = 28;

/// The bar: `[#####.....] 123/456 27% 0:42 python script c=4 warm`.
#[derive(Debug)]
pub struct Progress {
    enabled: bool,
    started: Instant,
    state: Mutex<State>,
}

#[derive(Debug)]
struct State {
    done: u64,
    total: u64,
    label: String,
    drawn: Option<Instant>,
}

impl Progress {
    /// A bar over `total` units; silent unless stderr is a terminal.
    pub fn new(total: u64) -> Self {
        Self::with(total, std::io::stderr().is_terminal())
    }

    fn with(total: u64, enabled: bool) -> Self {
        Self {
            enabled,
            started: Instant::now(),
            state: Mutex::new(State {
                done: 0,
                total: total.max(1),
                label: String::new(),
                drawn: None,
            }),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Names what is being measured now.
    pub fn label(&self, label: impl Into<String>) {
        let mut s = self.state();
        s.label = label.into();
        self.draw(&mut s, true);
    }

    /// Advances by `n` units.
    pub fn inc(&self, n: u64) {
        let mut s = self.state();
        s.done += n;
        self.draw(&mut s, false);
    }

    /// Sets the units done within the current part: `base + n` (for a part
    /// whose progress is polled, like the drain).
    pub fn set(&self, done: u64) {
        let mut s = self.state();
        s.done = done;
        self.draw(&mut s, false);
    }

    /// Units done so far.
    pub fn done(&self) -> u64 {
        self.state().done
    }

    /// Erases the bar.
    pub fn finish(&self) {
        if self.enabled {
            eprint!("\r\x1b[2K");
            let _ = std::io::stderr().flush();
        }
    }

    fn draw(&self, s: &mut State, force: bool) {
        if !self.enabled {
            return;
        }
        let now = Instant::now();
        if !force && s.drawn.is_some_and(|t| now.duration_since(t) < REDRAW) {
            return;
        }
        s.drawn = Some(now);
        eprint!("\r\x1b[2K{}", self.line(s));
        let _ = std::io::stderr().flush();
    }

    fn line(&self, s: &State) -> String {
        let frac = (s.done as f64 / s.total as f64).clamp(0.0, 1.0);
        #[allow(
            clippy::cast_possible_truncation,
            clippy::cast_sign_loss,
            reason = "frac is in 0..=1: at most WIDTH"
        )]
        let filled = (frac * WIDTH as f64).round() as usize;
        let secs = self.started.elapsed().as_secs();
        format!(
            "[{}{}] {}/{} {:>3}% {}:{:02} {}",
            "#".repeat(filled),
            ".".repeat(WIDTH - filled),
            s.done.min(s.total),
            s.total,
            (frac * 100.0).round(),
            secs / 60,
            secs % 60,
            s.label
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_line_shows_the_fraction_and_label() {
        let p = Progress::with(4, false);
        p.inc(1);
        p.label("python script c=1");
        let line = p.line(&p.state());
        assert!(line.starts_with("[#######....."), "{line}");
        assert!(line.contains("1/4  25%"), "{line}");
        assert!(line.ends_with("python script c=1"), "{line}");
        p.set(9);
        assert!(p.line(&p.state()).contains("4/4 100%"));
    }
}
