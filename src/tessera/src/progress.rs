//! Progress of long CLI operations: a bar when the output is a terminal, plain lines
//! otherwise (logs, pipes, CI): one when an item starts, at every 10% step or at most every
//! 10 s while it moves, and when it ends.

use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

/// Progress of several items (one per volume, say), each `done` of `total` units.
pub struct Progress {
    bars: Option<MultiProgress>,
    lines: Box<dyn Write>,
    items: Vec<Item>,
}

struct Item {
    name: String,
    bar: Option<ProgressBar>,
    last_pct: Option<u64>,
    last_line: Instant,
    finished: bool,
}

impl Progress {
    /// Bars if standard error is a terminal, lines on standard output otherwise.
    pub fn new() -> Self {
        Self::with_bars(std::io::stderr().is_terminal())
    }

    /// Bars (`true`, on standard error) or plain lines.
    pub fn with_bars(bars: bool) -> Self {
        Self {
            bars: bars.then(|| MultiProgress::with_draw_target(ProgressDrawTarget::stderr())),
            lines: Box::new(std::io::stdout()),
            items: Vec::new(),
        }
    }

    /// Plain lines to `w`.
    pub fn lines_to(w: impl Write + 'static) -> Self {
        Self {
            bars: None,
            lines: Box::new(w),
            items: Vec::new(),
        }
    }

    fn item(&mut self, name: &str) -> usize {
        if let Some(i) = self.items.iter().position(|i| i.name == name) {
            return i;
        }
        let bar = self.bars.as_ref().map(|m| {
            let b = m.add(ProgressBar::new(0));
            b.set_style(
                ProgressStyle::with_template(
                    "{prefix:>12} [{bar:30}] {percent:>3}% {msg} ({elapsed}, ETA {eta})",
                )
                .expect("a valid template")
                .progress_chars("=> "),
            );
            b.set_prefix(name.to_string());
            b
        });
        self.items.push(Item {
            name: name.to_string(),
            bar,
            last_pct: None,
            last_line: Instant::now(),
            finished: false,
        });
        self.items.len() - 1
    }

    /// `name` has done `done` of `total`; `msg` says more (rate, bytes).
    pub fn update(&mut self, name: &str, done: u64, total: u64, msg: &str) {
        let i = self.item(name);
        let it = &mut self.items[i];
        if it.finished {
            return;
        }
        let pct = (done.min(total) * 100).checked_div(total).unwrap_or(100);
        match &it.bar {
            Some(b) => {
                b.set_length(total);
                b.set_position(done);
                b.set_message(msg.to_string());
            }
            None => {
                let step = it.last_pct.is_none_or(|p| pct / 10 > p / 10);
                let moved = it.last_pct != Some(pct);
                if step || (moved && it.last_line.elapsed() >= Duration::from_secs(10)) {
                    let _ = writeln!(self.lines, "{name}: {pct}% ({done}/{total}) {msg}");
                    it.last_pct = Some(pct);
                    it.last_line = Instant::now();
                }
            }
        }
    }

    /// `name` is done; `msg` says how it ended.
    pub fn finish(&mut self, name: &str, msg: &str) {
        let i = self.item(name);
        let it = &mut self.items[i];
        if it.finished {
            return;
        }
        it.finished = true;
        match &it.bar {
            Some(b) => b.finish_with_message(msg.to_string()),
            None => {
                let _ = writeln!(self.lines, "{name}: {msg}");
            }
        }
    }
}

impl Default for Progress {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<u8>>>);

    impl Write for Sink {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn plain_lines_at_each_tenth_and_once_at_the_end() {
        let sink = Sink::default();
        let mut p = Progress::lines_to(sink.clone());
        for done in 0..=1000 {
            p.update("v map 2", done, 1000, "stripes");
        }
        p.finish("v map 2", "done");
        p.finish("v map 2", "done");
        p.update("v map 2", 5, 10, "after the end");
        let text = String::from_utf8(sink.0.lock().unwrap().clone()).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 12, "{text}");
        assert_eq!(lines[0], "v map 2: 0% (0/1000) stripes");
        assert_eq!(lines[5], "v map 2: 50% (500/1000) stripes");
        assert_eq!(lines[10], "v map 2: 100% (1000/1000) stripes");
        assert_eq!(lines[11], "v map 2: done");
    }
}
