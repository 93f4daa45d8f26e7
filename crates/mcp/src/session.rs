//! One MCP session: its API key, its default group and the sandboxes it created.
//!
//! A session owns the sandboxes it creates (by `create_sandbox`, `fork_sandbox`, or on first
//! use when it has a default group) and deletes them when it ends, unless they were created
//! with `keep: true`. For `moat mcp` (stdio) the session is the process: it ends when the
//! client closes stdin. Over HTTP it is the MCP session (`Mcp-Session-Id`): it ends when the
//! client sends `DELETE /mcp`, after five minutes without a request, or when the daemon stops.

use std::sync::{Arc, Mutex, OnceLock};

use http::header;
use serde_json::{json, Value};

use crate::daemon::{Daemon, Transport};
use crate::error::{Error, Result};

/// A sandbox this session created.
#[derive(Clone, Debug)]
pub struct Owned {
    pub group: String,
    pub id: String,
    /// Left running when the session ends.
    pub keep: bool,
}

/// A sandbox a tool acts on.
#[derive(Clone, Debug, PartialEq)]
pub struct Target {
    pub group: String,
    pub id: String,
}

impl Target {
    /// Its REST path, `/v1/sandbox-groups/{group}/sandboxes/{id}`.
    pub fn path(&self) -> String {
        format!("/v1/sandbox-groups/{}/sandboxes/{}", self.group, self.id)
    }
}

#[derive(Default)]
struct State {
    owned: Vec<Owned>,
    /// The sandbox tools act on when they name none: the newest one created.
    current: Option<Target>,
    closed: bool,
}

pub struct Session {
    transport: Arc<dyn Transport>,
    /// Known from the start (stdio), or taken from the first HTTP request.
    key: OnceLock<String>,
    /// From `moat mcp --group`, or the first HTTP request's `?group=`.
    default_group: OnceLock<Option<String>>,
    state: Mutex<State>,
    /// Serialises creating the default sandbox, so concurrent first calls make one.
    creating: tokio::sync::Mutex<()>,
    runtime: tokio::runtime::Handle,
}

/// Group, snapshot and process names and sandbox ids go into REST paths: only the
/// characters the daemon ever gives them, so that no argument can change the path.
pub fn check_name(what: &str, s: &str) -> Result<()> {
    let ok = !s.is_empty()
        && s.len() <= 128
        && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        && !s.starts_with('-');
    if ok {
        Ok(())
    } else {
        Err(Error::BadArgument(format!(
            "invalid {what} {s:?}: letters, digits and '-' only (1-128, not starting with '-')"
        )))
    }
}

impl Session {
    /// A session; `key` and `default_group` may be set later by [`Session::authorize`].
    pub fn new(
        transport: Arc<dyn Transport>,
        key: Option<String>,
        default_group: Option<Option<String>>,
    ) -> Arc<Session> {
        let s = Session {
            transport,
            key: OnceLock::new(),
            default_group: OnceLock::new(),
            state: Mutex::default(),
            creating: tokio::sync::Mutex::new(()),
            runtime: tokio::runtime::Handle::current(),
        };
        if let Some(k) = key {
            let _ = s.key.set(k);
        }
        if let Some(g) = default_group {
            let _ = s.default_group.set(g);
        }
        Arc::new(s)
    }

    /// Checks the HTTP request a call came in (none on stdio): the first one fixes the
    /// session's API key and default group; later ones must carry the same key, so that a
    /// session id alone never lends one key's sandboxes to another.
    pub fn authorize(&self, parts: Option<&http::request::Parts>) -> Result<()> {
        let Some(parts) = parts else {
            return match self.key.get() {
                Some(_) => Ok(()),
                None => Err(Error::BadArgument("this session has no API key".into())),
            };
        };
        let key = parts
            .headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim)
            .ok_or_else(|| {
                Error::BadArgument("missing \"Authorization: Bearer <API key>\"".into())
            })?;
        let first = self.key.get_or_init(|| key.to_string());
        if first != key {
            return Err(Error::Api {
                status: 403,
                code: "forbidden".into(),
                message: "this MCP session was opened with another API key".into(),
            });
        }
        self.default_group.get_or_init(|| {
            parts.uri.query().and_then(|q| {
                q.split('&')
                    .find_map(|kv| kv.strip_prefix("group="))
                    .map(str::to_string)
            })
        });
        Ok(())
    }

    pub fn daemon(&self) -> Result<Daemon> {
        let key = self
            .key
            .get()
            .ok_or_else(|| Error::BadArgument("this session has no API key yet".into()))?;
        Ok(Daemon::new(self.transport.clone(), key.clone()))
    }

    pub fn default_group(&self) -> Option<String> {
        self.default_group.get().cloned().flatten()
    }

    pub fn owned(&self) -> Vec<Owned> {
        self.state.lock().unwrap().owned.clone()
    }

    /// Records a sandbox this session created and makes it the current one.
    pub fn adopt(&self, group: &str, id: &str, keep: bool) {
        let mut st = self.state.lock().unwrap();
        st.owned.push(Owned {
            group: group.into(),
            id: id.into(),
            keep,
        });
        st.current = Some(Target {
            group: group.into(),
            id: id.into(),
        });
    }

    /// Forgets a sandbox that was deleted.
    pub fn forget(&self, t: &Target) {
        let mut st = self.state.lock().unwrap();
        st.owned.retain(|o| !(o.group == t.group && o.id == t.id));
        if st.current.as_ref() == Some(t) {
            st.current = st.owned.last().map(|o| Target {
                group: o.group.clone(),
                id: o.id.clone(),
            });
        }
    }

    /// Creates a sandbox owned by this session.
    pub async fn create(&self, group: &str, mut body: Value, keep: bool) -> Result<Value> {
        check_name("group", group)?;
        // Labelled, so that `moat sandbox ls -l created-by=moat-mcp` finds them.
        let labels = body
            .as_object_mut()
            .expect("a JSON object")
            .entry("labels")
            .or_insert_with(|| json!({}));
        if let Some(l) = labels.as_object_mut() {
            l.entry("created-by").or_insert_with(|| json!("moat-mcp"));
        }
        let sb = self
            .daemon()?
            .post(&format!("/v1/sandbox-groups/{group}/sandboxes"), &body)
            .await?;
        let id = sb["id"].as_str().unwrap_or_default();
        self.adopt(group, id, keep);
        Ok(sb)
    }

    /// The sandbox a tool acts on: the one named, else the session's current one, else a new
    /// one in the default group.
    pub async fn target(&self, group: Option<&str>, sandbox: Option<&str>) -> Result<Target> {
        if let Some(g) = group {
            check_name("group", g)?;
        }
        if let Some(id) = sandbox {
            check_name("sandbox id", id)?;
            let owned_group = {
                let st = self.state.lock().unwrap();
                st.owned
                    .iter()
                    .find(|o| o.id == id)
                    .map(|o| o.group.clone())
            };
            let group = group
                .map(str::to_string)
                .or(owned_group)
                .or_else(|| self.current().map(|t| t.group))
                .or_else(|| self.default_group())
                .ok_or_else(|| {
                    Error::BadArgument(format!(
                        "sandbox {id} is not one of this session's: name its group too"
                    ))
                })?;
            return Ok(Target {
                group,
                id: id.into(),
            });
        }
        if let Some(t) = self.current() {
            if group.is_none_or(|g| g == t.group) {
                return Ok(t);
            }
        }
        let _guard = self.creating.lock().await;
        if let Some(t) = self.current() {
            if group.is_none_or(|g| g == t.group) {
                return Ok(t);
            }
        }
        let Some(group) = group.map(str::to_string).or_else(|| self.default_group()) else {
            return Err(Error::BadArgument(
                "this session has no sandbox yet: call create_sandbox with a group first \
                 (or start the server with a default group: `moat mcp --group G`, or /mcp?group=G)"
                    .into(),
            ));
        };
        let sb = self.create(&group, json!({}), false).await?;
        Ok(Target {
            group,
            id: sb["id"].as_str().unwrap_or_default().into(),
        })
    }

    /// The group tools that need only a group use: the current sandbox's, else the default.
    pub fn group(&self) -> Option<String> {
        self.current()
            .map(|t| t.group)
            .or_else(|| self.default_group())
    }

    fn current(&self) -> Option<Target> {
        self.state.lock().unwrap().current.clone()
    }

    fn take_for_deletion(&self) -> Vec<Owned> {
        let mut st = self.state.lock().unwrap();
        st.closed = true;
        st.current = None;
        std::mem::take(&mut st.owned)
            .into_iter()
            .filter(|o| !o.keep)
            .collect()
    }

    /// Ends the session: deletes the sandboxes it created, except those it keeps.
    pub async fn close(&self) {
        let doomed = self.take_for_deletion();
        let Ok(daemon) = self.daemon() else { return };
        delete_all(daemon, doomed).await;
    }
}

async fn delete_all(daemon: Daemon, doomed: Vec<Owned>) {
    for o in doomed {
        let t = Target {
            group: o.group,
            id: o.id,
        };
        match daemon.delete(&t.path()).await {
            Ok(()) => tracing::info!(sandbox = %t.id, "MCP session ended: sandbox deleted"),
            // Already gone (deleted by hand, by a lifecycle timer, or with its group).
            Err(Error::Api { status: 404, .. }) => {}
            Err(e) => {
                tracing::warn!(sandbox = %t.id, "MCP session ended, deleting its sandbox failed: {e}")
            }
        }
    }
}

impl Drop for Session {
    /// An HTTP session ends by being dropped (DELETE, idle timeout, daemon stop): its sandboxes
    /// are deleted in the background.
    fn drop(&mut self) {
        if self.state.get_mut().map(|s| s.closed).unwrap_or(true) {
            return;
        }
        let doomed = self.take_for_deletion();
        if doomed.is_empty() {
            return;
        }
        if let Ok(daemon) = self.daemon() {
            self.runtime.spawn(delete_all(daemon, doomed));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::check_name;

    #[test]
    fn names_that_could_change_a_path_are_refused() {
        assert!(check_name("group", "web-1").is_ok());
        assert!(check_name("sandbox id", "sb-0123456789ab").is_ok());
        for bad in [
            "",
            "..",
            "a/b",
            "sb-1/../../api-keys",
            "-x",
            "a?b",
            "a b",
            "%2e",
        ] {
            assert!(check_name("group", bad).is_err(), "{bad:?} accepted");
        }
    }
}
