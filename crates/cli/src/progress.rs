//! Progress on the terminal: bars when stderr is a terminal, one log line per phase otherwise.

use std::io::IsTerminal;
use std::sync::Mutex;

use indicatif::{ProgressBar, ProgressStyle};

/// Renders `moat_image::Progress` events.
pub struct Bars {
    tty: bool,
    bar: Mutex<Option<ProgressBar>>,
}

impl Bars {
    pub fn new() -> Bars {
        Bars {
            tty: std::io::stderr().is_terminal(),
            bar: Mutex::new(None),
        }
    }

    /// A spinner with a message, for steps without a byte count.
    pub fn spinner(&self, msg: &str) {
        moat_image::Progress::phase(self, msg, None);
    }

    pub fn finish(&self) {
        if let Some(b) = self.lock().take() {
            b.finish_and_clear();
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<ProgressBar>> {
        self.bar.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl moat_image::Progress for Bars {
    fn phase(&self, name: &str, total_bytes: Option<u64>) {
        let mut slot = self.lock();
        if let Some(b) = slot.take() {
            b.finish_and_clear();
        }
        if !self.tty {
            tracing::info!("{name}");
            return;
        }
        let bar = match total_bytes {
            Some(total) => {
                let b = ProgressBar::new(total);
                b.set_style(
                    ProgressStyle::with_template(
                        "{msg:30} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} {eta}",
                    )
                    .unwrap_or_else(|_| ProgressStyle::default_bar())
                    .progress_chars("=> "),
                );
                b
            }
            None => {
                let b = ProgressBar::new_spinner();
                b.enable_steady_tick(std::time::Duration::from_millis(120));
                b
            }
        };
        bar.set_message(name.to_string());
        *slot = Some(bar);
    }

    fn advance(&self, bytes: u64) {
        if let Some(b) = self.lock().as_ref() {
            b.inc(bytes);
        }
    }
}
