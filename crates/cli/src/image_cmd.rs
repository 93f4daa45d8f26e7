//! `moat image import|ls|rm`.

use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::Result;
use clap::Subcommand;
use moat_image::{ImageStore, ImportOptions, Source};

use crate::home::Home;
use crate::progress::Bars;

#[derive(Debug, Subcommand)]
pub enum ImageCommand {
    /// Import an image: from a registry (`host[:port]/repo:tag` or `…@sha256:…`), an OCI layout
    /// (`oci:DIR`) or a `docker save` archive (`docker-archive:FILE`). Prints the digest.
    Import {
        source: String,
        /// Name to give the image (default: the reference or the archive's tag).
        #[arg(long)]
        name: Option<String>,
        /// Talk plain HTTP to the registry instead of HTTPS.
        #[arg(long)]
        plain_http: bool,
    },
    /// List images.
    Ls {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Remove an image by name or digest, with its templates.
    Rm { image: String },
}

pub async fn run(home: &Home, cmd: ImageCommand) -> Result<u8> {
    let store = ImageStore::open(&home.images())?;
    match cmd {
        ImageCommand::Import {
            source,
            name,
            plain_http,
        } => {
            let source = Source::parse(&source)?;
            let opts = ImportOptions {
                plain_http,
                docker_config: None,
            };
            let bars = Bars::new();
            let image = store.import(&source, name.as_deref(), &opts, &bars).await;
            bars.finish();
            println!("{}", image?.digest);
        }
        ImageCommand::Ls { json } => {
            let images = store.list()?;
            if json {
                let rows: Vec<_> = images
                    .iter()
                    .map(|i| {
                        serde_json::json!({
                            "name": i.name,
                            "digest": i.digest,
                            "size": i.size,
                            "created": unix(i.created),
                        })
                    })
                    .collect();
                println!("{}", serde_json::to_string_pretty(&rows)?);
            } else {
                println!("{:<30} {:<20} {:>10}  CREATED", "NAME", "DIGEST", "SIZE");
                for i in &images {
                    println!(
                        "{:<30} {:<20} {:>10}  {}",
                        i.name.as_deref().unwrap_or("<none>"),
                        short_digest(&i.digest),
                        human_size(i.size),
                        ago(i.created)
                    );
                }
            }
        }
        ImageCommand::Rm { image } => {
            let removed = store.remove(&image)?;
            // Templates of a digest that is no longer cached can never be used again.
            if store.resolve(&removed.digest).is_err() {
                moat_vm::template::remove_for_image(&home.root, &removed.digest)?;
            }
            println!("{}", removed.digest);
        }
    }
    Ok(0)
}

fn unix(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

fn short_digest(d: &str) -> &str {
    let end = d.len().min("sha256:".len() + 12);
    &d[..end]
}

fn human_size(b: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{b} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

fn ago(t: SystemTime) -> String {
    let secs = SystemTime::now()
        .duration_since(t)
        .map_or(0, |d| d.as_secs());
    match secs {
        0..=59 => format!("{secs} seconds ago"),
        60..=3599 => format!("{} minutes ago", secs / 60),
        3600..=86399 => format!("{} hours ago", secs / 3600),
        _ => format!("{} days ago", secs / 86400),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats() {
        assert_eq!(human_size(512), "512 B");
        assert_eq!(human_size(3 * 1024 * 1024), "3.0 MiB");
        assert_eq!(
            short_digest("sha256:0123456789abcdef"),
            "sha256:0123456789ab"
        );
    }
}
