//! `moat image import|ls|rm`: on the local store, or through the daemon when MOAT_URL or
//! MOAT_API_KEY is set (the import then runs in the daemon as an operation this polls).

use std::io::IsTerminal;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use clap::Subcommand;
use moat_image::{ImageStore, ImportOptions, Source};
use reqwest::Method;
use serde_json::{json, Value};

use crate::client::{path_segment, print_json, s, Client, ClientArgs};
use crate::home::Home;
use crate::progress::Bars;

#[derive(Debug, Subcommand)]
pub enum ImageCommand {
    /// Import an image: from a registry (`host[:port]/repo:tag` or `…@sha256:…`), an OCI layout
    /// (`oci:DIR`) or a `docker save` archive (`docker-archive:FILE`). Prints the digest.
    /// With MOAT_URL or MOAT_API_KEY set, the daemon imports it (an admin key; paths are on the
    /// daemon's host) and this waits for the operation.
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
    /// Remove an image by name or digest, with its templates (by name only through the daemon,
    /// which refuses while a sandbox or a group uses it).
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
            // A disk that a sandbox or snapshot still lies over stays, whoever made them
            // (`moat run` or the daemon): removing it would break them for good.
            let used = {
                let home = home.root.clone();
                tokio::task::spawn_blocking(move || moat_vm::template::DisksInUse::scan(&home))
                    .await??
            };
            let removed = store.remove_unless(&image, |img| Ok(used.why_kept(&img.rootfs)))?;
            // Templates of a digest that is no longer cached can never be used again.
            if store.resolve(&removed.digest).is_err() {
                moat_vm::template::remove_for_image(&home.root, &removed.digest)?;
            }
            println!("{}", removed.digest);
        }
    }
    Ok(0)
}

/// The same verbs against the daemon's image API.
pub async fn remote(args: ClientArgs, cmd: ImageCommand) -> Result<u8> {
    let c = Client::new(&args)?;
    match cmd {
        ImageCommand::Import {
            source,
            name,
            plain_http,
        } => {
            let mut body = json!({"source": daemon_source(&source)?, "plain_http": plain_http});
            if let Some(n) = name {
                body["name"] = json!(n);
            }
            let (_, op) = c.call(Method::POST, "/v1/images", Some(&body)).await?;
            let id = op["id"]
                .as_str()
                .context("the daemon's operation has no id")?;
            let op = poll(&c, id).await?;
            if op["state"] == "succeeded" {
                println!("{}", s(&op["result"]["digest"]));
            } else {
                bail!(
                    "the daemon's import failed: {}",
                    op["error"]["message"].as_str().unwrap_or("no reason given")
                );
            }
        }
        ImageCommand::Ls { json } => {
            let (_, v) = c.call(Method::GET, "/v1/images", None).await?;
            if json {
                print_json(&v)?;
            } else {
                println!("{:<30} {:<20} {:>10}  CREATED", "NAME", "DIGEST", "SIZE");
                for i in v["images"].as_array().into_iter().flatten() {
                    println!(
                        "{:<30} {:<20} {:>10}  {}",
                        s(&i["name"]),
                        short_digest(&s(&i["digest"])),
                        human_size(i["size_bytes"].as_u64().unwrap_or(0)),
                        s(&i["created_at"])
                    );
                }
            }
        }
        ImageCommand::Rm { image } => {
            let path = format!("/v1/images/{}", path_segment(&image)?);
            let (_, img) = c.call(Method::GET, &path, None).await?;
            c.call(Method::DELETE, &path, None).await?;
            println!("{}", s(&img["digest"]));
        }
    }
    Ok(0)
}

/// A local path in an `oci:` or `docker-archive:` source made absolute: the daemon resolves
/// paths on its own host, from its own working directory.
fn daemon_source(source: &str) -> Result<String> {
    for prefix in ["oci:", "docker-archive:"] {
        if let Some(rest) = source.strip_prefix(prefix) {
            if !rest.is_empty() && !rest.starts_with('/') {
                let cwd = std::env::current_dir().context("reading the working directory")?;
                return Ok(format!("{prefix}{}/{rest}", cwd.display()));
            }
        }
    }
    Ok(source.to_string())
}

/// Polls an operation until it ends, showing its phase (and bytes) on stderr when stderr is a
/// terminal.
async fn poll(c: &Client, id: &str) -> Result<Value> {
    let tty = std::io::stderr().is_terminal();
    let path = format!("/v1/operations/{}", path_segment(id)?);
    let mut shown = String::new();
    loop {
        let (_, op) = c.call(Method::GET, &path, None).await?;
        let p = &op["progress"];
        let line = match (p["bytes_done"].as_u64(), p["bytes_total"].as_u64()) {
            (Some(done), Some(total)) if total > 0 => format!(
                "{} {}/{}",
                s(&p["phase"]),
                human_size(done),
                human_size(total)
            ),
            _ => s(&p["phase"]),
        };
        if tty && line != shown {
            eprint!("\r\x1b[2K{line}");
            shown = line;
        }
        if op["state"] != "running" {
            if tty {
                eprint!("\r\x1b[2K");
            }
            return Ok(op);
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
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
    fn daemon_sources_are_absolute() {
        let cwd = std::env::current_dir().unwrap();
        assert_eq!(
            daemon_source("oci:lay:v1").unwrap(),
            format!("oci:{}/lay:v1", cwd.display())
        );
        assert_eq!(daemon_source("oci:/abs").unwrap(), "oci:/abs");
        assert_eq!(daemon_source("host/repo:tag").unwrap(), "host/repo:tag");
    }

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
