//! `moat secret set|ls|rm GROUP [NAME]`: a group's secrets on a daemon. The value of `set`
//! is read from stdin (never from the command line, where `ps` and shell history see it);
//! no command ever prints one, because the daemon never returns one.

use std::io::{IsTerminal, Read};

use anyhow::{bail, Context, Result};
use clap::Subcommand;
use reqwest::{Method, StatusCode};
use serde_json::json;

use crate::client::{path_segment, print_json, print_table, s, Client, ClientArgs};

#[derive(Debug, Subcommand)]
pub enum SecretCommand {
    /// Set a secret from stdin (one trailing newline is dropped): `printf %s "$KEY" | moat
    /// secret set GROUP NAME`.
    Set { group: String, name: String },
    /// List a group's secrets: names and times, never values.
    Ls { group: String },
    /// Delete a secret; requests whose transform needs it are refused from then on.
    Rm { group: String, name: String },
}

pub async fn run(args: ClientArgs, cmd: SecretCommand) -> Result<u8> {
    let c = Client::new(&args)?;
    match cmd {
        SecretCommand::Set { group, name } => {
            let value = read_value()?;
            let (status, v) = c
                .call(
                    Method::PUT,
                    &format!(
                        "/v1/sandbox-groups/{}/secrets/{}",
                        path_segment(&group)?,
                        path_segment(&name)?
                    ),
                    Some(&json!({ "value": value })),
                )
                .await?;
            if args.json {
                print_json(&v)?;
            } else {
                let what = if status == StatusCode::CREATED {
                    "created"
                } else {
                    "updated"
                };
                println!("secret {name} of group {group} {what}");
            }
        }
        SecretCommand::Ls { group } => {
            let (_, v) = c
                .call(
                    Method::GET,
                    &format!("/v1/sandbox-groups/{}/secrets", path_segment(&group)?),
                    None,
                )
                .await?;
            if args.json {
                print_json(&v)?;
            } else {
                let rows = v["secrets"]
                    .as_array()
                    .map(|ss| {
                        ss.iter()
                            .map(|x| vec![s(&x["name"]), s(&x["created_at"]), s(&x["updated_at"])])
                            .collect()
                    })
                    .unwrap_or_default();
                print_table(&["NAME", "CREATED", "UPDATED"], rows);
            }
        }
        SecretCommand::Rm { group, name } => {
            c.call(
                Method::DELETE,
                &format!(
                    "/v1/sandbox-groups/{}/secrets/{}",
                    path_segment(&group)?,
                    path_segment(&name)?
                ),
                None,
            )
            .await?;
            if !args.json {
                println!("secret {name} of group {group} deleted");
            }
        }
    }
    Ok(0)
}

fn read_value() -> Result<String> {
    let mut stdin = std::io::stdin();
    if stdin.is_terminal() {
        eprintln!("Enter the value, then Ctrl-D:");
    }
    let mut v = String::new();
    stdin
        .read_to_string(&mut v)
        .context("reading the secret's value from stdin (it must be UTF-8 text)")?;
    let v = v
        .strip_suffix("\r\n")
        .or_else(|| v.strip_suffix('\n'))
        .unwrap_or(&v)
        .to_string();
    if v.is_empty() {
        bail!("no value on stdin: pipe the secret in, e.g. printf %s \"$KEY\" | moat secret set GROUP NAME");
    }
    Ok(v)
}
