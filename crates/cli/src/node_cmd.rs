//! `moat node ls|show|drain|undrain`: the nodes sharing a daemon's store (docs/FLEET.md);
//! `moat sealing-key new|rotate`: the one secret they share.

use anyhow::Result;
use clap::Subcommand;
use reqwest::Method;
use serde_json::Value;

use crate::client::{path_segment, print_json, print_table, s, Client, ClientArgs};

#[derive(Debug, Subcommand)]
pub enum NodeCommand {
    /// List the nodes: state, lease, capacity and use.
    Ls,
    /// One node, all of it.
    Show { node: String },
    /// Stop placing new sandboxes on a node (admin); those it runs stay.
    Drain { node: String },
    /// Let a drained node take new sandboxes again (admin).
    Undrain { node: String },
}

fn row(n: &Value) -> Vec<String> {
    vec![
        s(&n["name"]),
        s(&n["state"]),
        n["epoch"].to_string(),
        s(&n["lease_expires_at"]),
        s(&n["accelerator"]),
        format!(
            "{}/{} MiB",
            n["used"]["memory_mib"], n["capacity"]["memory_mib"]
        ),
        format!("{}/{}", n["used"]["vcpus"], n["capacity"]["vcpus"]),
        n["used"]["sandboxes"].to_string(),
        s(&n["advertise_url"]),
        match (
            n["sealing_key_id"].as_str(),
            n["next_sealing_key_id"].as_str(),
        ) {
            (Some(k), Some(next)) => format!("{k}, next {next}"),
            (Some(k), None) => k.to_string(),
            (None, _) => "-".to_string(),
        },
    ]
}

const HEADER: [&str; 10] = [
    "NAME",
    "STATE",
    "EPOCH",
    "LEASE ENDS",
    "ACCEL",
    "MEMORY",
    "VCPUS",
    "VMS",
    "URL",
    "SEALING KEY",
];

pub async fn run(args: ClientArgs, cmd: NodeCommand) -> Result<u8> {
    let c = Client::new(&args)?;
    let (method, path) = match &cmd {
        NodeCommand::Ls => (Method::GET, "/v1/nodes".to_string()),
        NodeCommand::Show { node } => (Method::GET, format!("/v1/nodes/{}", path_segment(node)?)),
        NodeCommand::Drain { node } => (
            Method::POST,
            format!("/v1/nodes/{}/drain", path_segment(node)?),
        ),
        NodeCommand::Undrain { node } => (
            Method::POST,
            format!("/v1/nodes/{}/undrain", path_segment(node)?),
        ),
    };
    let (_, v) = c.call(method, &path, None).await?;
    if args.json {
        print_json(&v)?;
        return Ok(0);
    }
    match cmd {
        NodeCommand::Ls => {
            let rows = v["nodes"]
                .as_array()
                .map(|ns| ns.iter().map(row).collect())
                .unwrap_or_default();
            print_table(&HEADER, rows);
        }
        NodeCommand::Show { .. } => print_json(&v)?,
        NodeCommand::Drain { node } => println!("node {node} is {}", s(&v["state"])),
        NodeCommand::Undrain { node } => println!("node {node} is {}", s(&v["state"])),
    }
    Ok(0)
}

#[derive(Debug, Subcommand)]
pub enum SealingKeyCommand {
    /// Make a new sealing key as MOAT_HOME/secrets.key.next (0600) and print its id; copy
    /// that file to the same place on every node, then `rotate`.
    New,
    /// Re-seal every secret and signing key of the store with the next key (admin): refused
    /// until every node that is not lost shows that key in `moat node ls`.
    Rotate {
        #[command(flatten)]
        client: ClientArgs,
    },
}

/// `moat sealing-key new`, in this machine's MOAT_HOME.
pub fn new_key(home: &std::path::Path) -> Result<u8> {
    let id = moat_server::store::create_next_sealing_key(home)?;
    println!(
        "made {} (key id {id}).\nCopy it (mode 0600) to MOAT_HOME/secrets.key.next on every \
         node of the fleet; each shows the id as its next key in `moat node ls` within a lease \
         renewal. Then run `moat sealing-key rotate`.",
        home.join("secrets.key.next").display()
    );
    Ok(0)
}

/// `moat sealing-key rotate`.
pub async fn rotate(args: ClientArgs) -> Result<u8> {
    let c = Client::new(&args)?;
    let (_, v) = c.call(Method::POST, "/v1/sealing-key/rotate", None).await?;
    if args.json {
        print_json(&v)?;
    } else {
        println!(
            "the store is sealed with key {} now (was {}): {} secrets and {} signing keys \
             re-sealed. Every node switches to it at its next lease renewal; the old key opens \
             nothing any more.",
            s(&v["key_id"]),
            s(&v["previous_key_id"]),
            v["secrets"],
            v["signing_keys"]
        );
    }
    Ok(0)
}
