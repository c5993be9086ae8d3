//! Part of the `wasmcache` binary (not the library): shows a prefetch's progress, as indicatif
//! bars on a terminal and as plain lines otherwise (logs, CI, `kubectl exec` without a TTY).

use std::collections::HashMap;
use std::io::IsTerminal;
use std::path::Path;
use std::time::Duration;

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use wasmcache::api::proto::prefetch_progress::Stage;
use wasmcache::api::proto::PrefetchProgress;
use wasmcache::client;

/// Runs a prefetch through the daemon, showing each event; returns how many failed.
pub async fn prefetch(
    socket: &Path,
    references: Vec<String>,
    pin: bool,
) -> Result<usize, client::Error> {
    let mut stream = client::prefetch(socket, references, pin).await?;
    let mut display = if std::io::stderr().is_terminal() {
        Display::Bars(Bars::default())
    } else {
        Display::Lines
    };
    let mut failed = 0;
    while let Some(event) = stream.message().await? {
        if event.stage() == Stage::Failed {
            failed += 1;
        }
        display.show(&event);
        if event.stage() == Stage::Summary {
            break;
        }
    }
    Ok(failed)
}

enum Display {
    Bars(Bars),
    Lines,
}

#[derive(Default)]
struct Bars {
    multi: MultiProgress,
    bars: HashMap<String, ProgressBar>,
}

impl Display {
    fn show(&mut self, event: &PrefetchProgress) {
        match self {
            Display::Lines => show_line(event),
            Display::Bars(bars) => bars.show(event),
        }
    }
}

fn show_line(event: &PrefetchProgress) {
    let reference = &event.reference;
    match event.stage() {
        Stage::Queued => println!("queued      {reference}"),
        Stage::Resolving => println!("resolving   {reference}"),
        Stage::Downloading => println!(
            "downloading {reference} {}/{} bytes",
            event.bytes_done, event.bytes_total
        ),
        Stage::Done => {
            let result = event.result.clone().unwrap_or_default();
            let how = if result.cache_hit {
                "cached"
            } else {
                "downloaded"
            };
            println!(
                "done        {reference} {} {} bytes ({how})",
                result.digest, result.size
            );
        }
        Stage::Failed => println!(
            "failed      {reference} {}: {}",
            event.error_code, event.message
        ),
        Stage::Summary => println!(
            "summary     {} succeeded, {} failed",
            event.succeeded, event.failed
        ),
        Stage::Unspecified => {}
    }
}

impl Bars {
    fn bar(&mut self, reference: &str) -> &ProgressBar {
        let multi = &self.multi;
        self.bars.entry(reference.to_owned()).or_insert_with(|| {
            let bar = multi.add(ProgressBar::new_spinner());
            bar.set_style(
                ProgressStyle::with_template(
                    "{spinner} {prefix:40!} {msg} {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
                )
                .expect("valid template"),
            );
            bar.set_prefix(reference.to_owned());
            bar.enable_steady_tick(Duration::from_millis(120));
            bar
        })
    }

    fn show(&mut self, event: &PrefetchProgress) {
        let reference = event.reference.clone();
        match event.stage() {
            Stage::Queued => self.bar(&reference).set_message("queued"),
            Stage::Resolving => self.bar(&reference).set_message("resolving"),
            Stage::Downloading => {
                let bar = self.bar(&reference);
                bar.set_length(event.bytes_total);
                bar.set_position(event.bytes_done);
                bar.set_message("downloading");
            }
            Stage::Done => {
                let result = event.result.clone().unwrap_or_default();
                let bar = self.bar(&reference);
                bar.set_length(result.size);
                bar.set_position(result.size);
                bar.finish_with_message(format!("done {}", result.digest));
            }
            Stage::Failed => self
                .bar(&reference)
                .abandon_with_message(format!("failed {}: {}", event.error_code, event.message)),
            Stage::Summary => {
                let _ = self.multi.println(format!(
                    "{} succeeded, {} failed",
                    event.succeeded, event.failed
                ));
                self.multi.set_draw_target(ProgressDrawTarget::hidden());
            }
            Stage::Unspecified => {}
        }
    }
}
