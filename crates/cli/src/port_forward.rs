//! `moat sandbox port-forward GROUP ID PORT [--local ADDR]`: a local TCP listener whose every
//! connection becomes one TCP connection to the sandbox's PORT, carried by the daemon
//! (`…/port-forward/{port}`, an HTTP upgrade to `moat-tcp`) and the sandbox's network stack.
//! Any guest port can be reached this way; it need not be exposed. Runs until interrupted.

use std::net::SocketAddr;

use anyhow::{bail, Context, Result};
use clap::Args;
use reqwest::Method;

use crate::client::Client;
use crate::sandbox_cmd::sandbox_path;

#[derive(Debug, Args)]
pub struct PortForwardArgs {
    group: String,
    id: String,
    /// The guest's TCP port, 1-65535.
    port: String,
    /// Where to listen locally: ADDR:PORT, or a port on 127.0.0.1 (default: 127.0.0.1 and the
    /// guest's port; port 0 picks a free one, printed at start).
    #[arg(long, value_name = "ADDR")]
    local: Option<String>,
}

fn guest_port(s: &str) -> Result<u16> {
    match s.parse::<u16>() {
        Ok(p) if p > 0 => Ok(p),
        _ => bail!("invalid PORT {s:?}: a guest TCP port is a number from 1 to 65535"),
    }
}

fn local_addr(s: Option<&str>, port: u16) -> Result<SocketAddr> {
    let Some(s) = s else {
        return Ok(SocketAddr::from(([127, 0, 0, 1], port)));
    };
    if let Ok(p) = s.parse::<u16>() {
        return Ok(SocketAddr::from(([127, 0, 0, 1], p)));
    }
    s.parse().with_context(|| {
        format!("invalid --local {s:?}: expected ADDR:PORT (127.0.0.1:8080, [::1]:8080) or a port")
    })
}

pub async fn port_forward(c: &Client, a: &PortForwardArgs) -> Result<u8> {
    let port = guest_port(&a.port)?;
    let local = local_addr(a.local.as_deref(), port)?;
    let sandbox = sandbox_path(&a.group, &a.id)?;
    // An unknown sandbox or a bad key fails here, before anything listens.
    c.call(Method::GET, &sandbox, None).await?;
    let listener = tokio::net::TcpListener::bind(local)
        .await
        .with_context(|| format!("listening on {local}"))?;
    let bound = listener.local_addr().context("the local address")?;
    println!(
        "forwarding {bound} to port {port} of sandbox {}/{}",
        a.group, a.id
    );
    let path = format!("{sandbox}/port-forward/{port}");
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("installing the SIGTERM handler")?;
    loop {
        let (mut tcp, peer) = tokio::select! {
            r = listener.accept() => r.context("accepting a local connection")?,
            _ = tokio::signal::ctrl_c() => return Ok(0),
            _ = term.recv() => return Ok(0),
        };
        let (c, path) = (c.clone(), path.clone());
        tokio::spawn(async move {
            let result = async {
                let mut up = c.upgrade(c.request(Method::GET, &path), "moat-tcp").await?;
                tokio::io::copy_bidirectional(&mut tcp, &mut up).await?;
                anyhow::Ok(())
            }
            .await;
            // One connection failing (nothing listens in the guest yet) ends only that one.
            if let Err(e) = result {
                eprintln!("moat: connection from {peer}: {e:#}");
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_and_local_addresses() {
        assert_eq!(guest_port("8080").unwrap(), 8080);
        for bad in ["0", "65536", "http", "-1"] {
            assert!(guest_port(bad)
                .unwrap_err()
                .to_string()
                .contains("1 to 65535"));
        }
        assert_eq!(
            local_addr(None, 8080).unwrap(),
            "127.0.0.1:8080".parse().unwrap()
        );
        assert_eq!(
            local_addr(Some("9000"), 8080).unwrap(),
            "127.0.0.1:9000".parse().unwrap()
        );
        assert_eq!(
            local_addr(Some("[::1]:0"), 8080).unwrap(),
            "[::1]:0".parse().unwrap()
        );
        assert!(local_addr(Some("localhost:80"), 1)
            .unwrap_err()
            .to_string()
            .contains("ADDR:PORT"));
    }
}
