//! Progress bars on standard error (drawn only on a terminal).

use indicatif::{ProgressBar, ProgressStyle};

/// A byte-count progress bar with rate and ETA.
pub(crate) fn bytes(label: &str, total: u64) -> ProgressBar {
    let bar = ProgressBar::new(total);
    bar.set_style(
        ProgressStyle::with_template(
            "{prefix:>12} [{bar:30}] {bytes}/{total_bytes} {binary_bytes_per_sec} ETA {eta}",
        )
        .expect("valid template")
        .progress_chars("=> "),
    );
    bar.set_prefix(label.to_owned());
    bar
}
