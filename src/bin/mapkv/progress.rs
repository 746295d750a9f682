//! The progress indicator on stderr of the long commands (`bench`, its sweeps and
//! kill rounds): a bar on a terminal; one plain line per step where stderr is a pipe or
//! a file (a CI log, a script), where a redrawn bar would print nothing at all.

use std::io::{IsTerminal, Write};
use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle, TermLike};

/// A progress bar of `len` steps on stderr.
pub fn bar(len: u64) -> ProgressBar {
    if std::io::stderr().is_terminal() {
        let pb = ProgressBar::new(len);
        pb.set_style(
            ProgressStyle::with_template(
                "{spinner} [{elapsed_precise}] {bar:30} {pos}/{len} {msg}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        pb.enable_steady_tick(Duration::from_millis(120));
        pb
    } else {
        let pb = ProgressBar::with_draw_target(
            Some(len),
            ProgressDrawTarget::term_like(Box::new(Lines::default())),
        );
        pb.set_style(
            ProgressStyle::with_template("mapkv: [{elapsed_precise}] {pos}/{len} {msg}")
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        pb
    }
}

/// A "terminal" that prints each state of the bar once, as a line of its own: it
/// ignores cursor movements and skips a line equal to the one before (a redraw).
#[derive(Debug, Default)]
struct Lines {
    /// The line being drawn, and the last one printed.
    state: parking_lot::Mutex<(String, String)>,
}

impl Lines {
    fn emit(&self) -> std::io::Result<()> {
        let mut st = self.state.lock();
        let (current, last) = &mut *st;
        let line = std::mem::take(current);
        let line = line.trim_end();
        if line.is_empty() || line == last.as_str() {
            return Ok(());
        }
        *last = line.to_owned();
        writeln!(std::io::stderr().lock(), "{line}")
    }
}

impl TermLike for Lines {
    fn width(&self) -> u16 {
        120
    }
    fn move_cursor_up(&self, _: usize) -> std::io::Result<()> {
        Ok(())
    }
    fn move_cursor_down(&self, _: usize) -> std::io::Result<()> {
        Ok(())
    }
    fn move_cursor_right(&self, _: usize) -> std::io::Result<()> {
        Ok(())
    }
    fn move_cursor_left(&self, _: usize) -> std::io::Result<()> {
        Ok(())
    }
    fn write_line(&self, s: &str) -> std::io::Result<()> {
        self.state.lock().0.push_str(s);
        self.emit()
    }
    fn write_str(&self, s: &str) -> std::io::Result<()> {
        self.state.lock().0.push_str(s);
        Ok(())
    }
    fn clear_line(&self) -> std::io::Result<()> {
        self.state.lock().0.clear();
        Ok(())
    }
    fn flush(&self) -> std::io::Result<()> {
        self.emit()
    }
}
