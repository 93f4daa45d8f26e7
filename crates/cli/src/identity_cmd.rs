//! `moat identity …`: workload identity on a daemon. `token` mints one for a sandbox (owner and
//! admin keys; for debugging a federation setup), `keys` and `rotate` manage the signing keys
//! (admin), and `publish` writes the issuer's two documents for static hosting, for operators
//! whose relying parties must fetch them from somewhere public (docs/IDENTITY.md).

use std::io::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::Subcommand;
use reqwest::Method;
use serde_json::{json, Value};

use crate::client::{path_segment, print_json, print_table, s, Client, ClientArgs};

#[derive(Debug, Subcommand)]
pub enum IdentityCommand {
    /// Mint a token for a running sandbox and print it (with --json: and its claims' values).
    Token {
        group: String,
        id: String,
        /// The audience: one of the group's identity audiences.
        #[arg(long = "aud", value_name = "AUD")]
        audience: String,
        /// Lifetime in seconds (at most the group's identity.ttl_s).
        #[arg(long, value_name = "SECS")]
        ttl: Option<u64>,
    },
    /// List the signing keys and their states (admin).
    Keys,
    /// Rotate: the pending key (published since the last rotation) signs, the active one
    /// retires but stays published until its tokens expired, a new pending key is published
    /// (admin).
    Rotate,
    /// Write DIR/.well-known/openid-configuration and DIR/.well-known/jwks.json as the daemon
    /// serves them, for hosting at the issuer URL (`moat serve --issuer-url`). Run it again
    /// after every rotation.
    Publish { dir: PathBuf },
}

pub async fn run(args: ClientArgs, cmd: IdentityCommand) -> Result<u8> {
    let c = Client::new(&args)?;
    match cmd {
        IdentityCommand::Token {
            group,
            id,
            audience,
            ttl,
        } => {
            let mut body = json!({ "audience": audience });
            if let Some(t) = ttl {
                body["ttl_s"] = json!(t);
            }
            let path = format!(
                "/v1/sandbox-groups/{}/sandboxes/{}/identity/token",
                path_segment(&group)?,
                path_segment(&id)?
            );
            let (_, t) = c.call(Method::POST, &path, Some(&body)).await?;
            if args.json {
                print_json(&t)?;
            } else {
                println!("{}", s(&t["token"]));
            }
        }
        IdentityCommand::Keys | IdentityCommand::Rotate => {
            let (method, path) = match cmd {
                IdentityCommand::Rotate => (Method::POST, "/v1/identity/keys/rotate"),
                _ => (Method::GET, "/v1/identity/keys"),
            };
            let (_, v) = c.call(method, path, None).await?;
            if args.json {
                print_json(&v)?;
            } else {
                println!("issuer: {}", s(&v["issuer"]));
                let opt = |k: &Value| if k.is_null() { "-".into() } else { s(k) };
                let rows = v["keys"]
                    .as_array()
                    .map(|ks| {
                        ks.iter()
                            .map(|k| {
                                vec![
                                    s(&k["kid"]),
                                    s(&k["state"]),
                                    s(&k["created_at"]),
                                    opt(&k["activated_at"]),
                                    opt(&k["removed_after"]),
                                ]
                            })
                            .collect()
                    })
                    .unwrap_or_default();
                print_table(
                    &["KID", "STATE", "CREATED", "ACTIVATED", "UNPUBLISHED AFTER"],
                    rows,
                );
            }
        }
        IdentityCommand::Publish { dir } => {
            let well_known = dir.join(".well-known");
            std::fs::create_dir_all(&well_known)
                .with_context(|| format!("creating {}", well_known.display()))?;
            for name in ["openid-configuration", "jwks.json"] {
                let (_, v) = c
                    .call(Method::GET, &format!("/.well-known/{name}"), None)
                    .await?;
                let path = well_known.join(name);
                write_atomic(&path, &serde_json::to_vec_pretty(&v)?)?;
                if !args.json {
                    println!("wrote {}", path.display());
                }
            }
        }
    }
    Ok(0)
}

/// Replaces `path` whole or not at all: a web server never serves half a JWKS.
fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_extension("tmp");
    let mut f =
        std::fs::File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    f.write_all(bytes)
        .and_then(|()| f.sync_all())
        .with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("renaming {}", tmp.display()))
}
