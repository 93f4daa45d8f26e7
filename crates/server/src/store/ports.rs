//! The `sandbox_ports` table: the ports each sandbox exposes through the daemon's proxy
//! (`http/routes/ports.rs`). Rows go with their sandbox (`ON DELETE CASCADE`).

use super::db::{params, Db, OptionalExtension};

use super::{now, Store};
use crate::api::{quote, ExposedPort, MAX_EXPOSED_PORTS};
use crate::error::{Error, Result};

impl Store {
    /// Exposes `port` of `sandbox`: a conflict if it is already, or if the sandbox exposes
    /// the most ports it may.
    pub async fn expose_port(&self, sandbox: &str, port: u16) -> Result<ExposedPort> {
        let sandbox = sandbox.to_string();
        self.call(move |c| {
            let tx = c.transaction()?;
            let count: i64 = tx.query_row(
                "SELECT count(*) FROM sandbox_ports WHERE sandbox = ?1",
                params![sandbox],
                |r| r.get(0),
            )?;
            if get(&tx, &sandbox, port)?.is_some() {
                return Err(Error::Conflict(format!(
                    "port {port} of sandbox {} is already exposed",
                    quote(&sandbox)
                )));
            }
            if count >= MAX_EXPOSED_PORTS as i64 {
                return Err(Error::Conflict(format!(
                    "sandbox {} already exposes {MAX_EXPOSED_PORTS} ports, the most it may; \
                     close one first",
                    quote(&sandbox)
                )));
            }
            let at = now();
            tx.execute(
                "INSERT INTO sandbox_ports (sandbox, port, created_at) VALUES (?1, ?2, ?3)",
                params![sandbox, port, at],
            )?;
            tx.commit()?;
            Ok(ExposedPort {
                port,
                created_at: at,
            })
        })
        .await
    }

    /// The exposed ports of `sandbox`, lowest first.
    pub async fn list_ports(&self, sandbox: &str) -> Result<Vec<ExposedPort>> {
        let sandbox = sandbox.to_string();
        self.call(move |c| {
            let rows = c.query_map(
                "SELECT port, created_at FROM sandbox_ports WHERE sandbox = ?1 ORDER BY port",
                params![sandbox],
                |r| {
                    Ok(ExposedPort {
                        port: r.get(0)?,
                        created_at: r.get(1)?,
                    })
                },
            )?;
            Ok(rows)
        })
        .await
    }

    /// Port `port` of `sandbox`, if it is exposed.
    pub async fn get_port(&self, sandbox: &str, port: u16) -> Result<Option<ExposedPort>> {
        let sandbox = sandbox.to_string();
        self.call(move |c| get(c, &sandbox, port)).await
    }

    /// Closes `port` of `sandbox`; false if it was not exposed.
    pub async fn close_port(&self, sandbox: &str, port: u16) -> Result<bool> {
        let sandbox = sandbox.to_string();
        self.call(move |c| {
            Ok(c.execute(
                "DELETE FROM sandbox_ports WHERE sandbox = ?1 AND port = ?2",
                params![sandbox, port],
            )? > 0)
        })
        .await
    }
}

fn get(c: &Db, sandbox: &str, port: u16) -> Result<Option<ExposedPort>> {
    Ok(c.query_row(
        "SELECT port, created_at FROM sandbox_ports WHERE sandbox = ?1 AND port = ?2",
        params![sandbox, port],
        |r| {
            Ok(ExposedPort {
                port: r.get(0)?,
                created_at: r.get(1)?,
            })
        },
    )
    .optional()?)
}
