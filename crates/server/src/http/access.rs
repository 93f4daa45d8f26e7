//! Who may see and do what: a key sees only its groups (anything else is a 404, the same as
//! for what does not exist), and its role decides what it may change.

use crate::api::{self, Group, Role, Sandbox, Snapshot};
use crate::error::{Error, Result};
use crate::sandboxes::Running;
use crate::store::Principal;

use super::state::AppState;

/// The same answer for "does not exist" and "exists but is not yours", so that a key learns
/// nothing about groups outside its scope.
pub(crate) fn no_group(name: &str) -> Error {
    Error::NotFound(format!("no sandbox group {}", api::quote(name)))
}

pub(crate) fn require_visible(p: &Principal, name: &str) -> Result<()> {
    if p.sees(name) {
        Ok(())
    } else {
        Err(no_group(name))
    }
}

pub(crate) fn require_manage(p: &Principal) -> Result<()> {
    if p.role >= Role::Owner {
        Ok(())
    } else {
        Err(Error::Forbidden(format!(
            "a {} key may not change sandbox groups; an owner or admin key may",
            p.role.as_str()
        )))
    }
}

pub(crate) fn require_use(p: &Principal) -> Result<()> {
    if p.role >= Role::User {
        Ok(())
    } else {
        Err(Error::Forbidden(format!(
            "a {} key may only read sandboxes; a user, owner or admin key may create, use and \
             delete them",
            p.role.as_str()
        )))
    }
}

pub(crate) fn require_admin(p: &Principal) -> Result<()> {
    if p.role == Role::Admin {
        Ok(())
    } else {
        Err(Error::Forbidden(format!(
            "only an admin key may manage API keys (this one is {})",
            p.role.as_str()
        )))
    }
}

/// The group, if the key may see it (else the same 404 as for a missing group).
pub(crate) async fn visible_group(state: &AppState, p: &Principal, name: &str) -> Result<Group> {
    api::validate_name("group name", name)?;
    require_visible(p, name)?;
    state
        .store
        .get_group(name)
        .await?
        .ok_or_else(|| no_group(name))
}

/// The row of sandbox `id` of `group`: 404 for one of another group, as for a missing one.
pub(crate) async fn visible_sandbox(
    state: &AppState,
    p: &Principal,
    group: &str,
    id: &str,
) -> Result<Sandbox> {
    api::validate_name("group name", group)?;
    require_visible(p, group)?;
    let no_sandbox = || {
        Error::NotFound(format!(
            "no sandbox {} in group {}",
            api::quote(id),
            api::quote(group)
        ))
    };
    if id.len() > 64 {
        return Err(no_sandbox());
    }
    match state.store.get_sandbox(id).await? {
        Some(sb) if sb.group == group => Ok(sb),
        _ => Err(no_sandbox()),
    }
}

/// The row of sandbox `id` of `group` (as [`visible_sandbox`]) for a route that acts on it:
/// only the node that runs it may. Requests for another node's sandboxes are forwarded to it
/// before they get here (http/forward.rs), so this sees one only when the request was already
/// forwarded once (or the store changed under it): a 421 naming that node and where it is
/// reached, never a second forward. A `lost` sandbox may be deleted through any node.
pub(crate) async fn local_sandbox(
    state: &AppState,
    p: &Principal,
    group: &str,
    id: &str,
) -> Result<Sandbox> {
    let sb = visible_sandbox(state, p, group, id).await?;
    let me = state.store.node_name();
    if sb.node.is_none() || sb.node == me || sb.state == crate::api::SandboxState::Lost {
        return Ok(sb);
    }
    let node = sb.node.clone().unwrap_or_default();
    let url = match state.store.get_node(&node).await? {
        Some(n) => n.advertise_url,
        None => "(unknown)".to_string(),
    };
    Err(Error::OtherNode(format!(
        "sandbox {} runs on node {} ({url}), not on this one ({}), and a request another \
         node forwarded is not forwarded again: send it to node {} or any node",
        sb.id,
        api::quote(&node),
        me.as_deref().unwrap_or("?"),
        api::quote(&node)
    )))
}

/// A hold on sandbox `id` of `group` for a data-plane route (files, processes): visibility
/// first, then the role (`use_`: the route changes something, so readers are refused), then
/// the manager's `running`, which resumes a suspended sandbox.
pub(crate) async fn running_sandbox(
    state: &AppState,
    p: &Principal,
    group: &str,
    id: &str,
    use_: bool,
) -> Result<Running> {
    let row = local_sandbox(state, p, group, id).await?;
    if use_ {
        require_use(p)?;
    }
    state.manager()?.running(&row).await
}

/// A sandbox as `p` may see it: `env` often carries credentials, so a reader gets the
/// variables' names only.
/// A sandbox as `p` may see it, with its agent's health if it is running.
pub(crate) fn shown_to(state: &AppState, p: &Principal, mut sb: Sandbox) -> Sandbox {
    if sb.state == crate::api::SandboxState::Running {
        sb.health = state.manager().ok().and_then(|m| m.health_of(&sb.id));
    }
    if p.role == Role::Reader {
        for v in sb.env.values_mut() {
            *v = "<redacted>".to_string();
        }
    }
    sb
}

pub(crate) fn no_snapshot(group: &str, name: &str) -> Error {
    Error::NotFound(format!(
        "no snapshot {} in group {}",
        api::quote(name),
        api::quote(group)
    ))
}

/// The ready snapshot `name` of `group`, if the key may see the group.
pub(crate) async fn visible_snapshot(
    state: &AppState,
    p: &Principal,
    group: &str,
    name: &str,
) -> Result<Snapshot> {
    visible_group(state, p, group).await?;
    api::validate_name("snapshot name", name)?;
    state
        .store
        .get_snapshot(group, name)
        .await?
        .ok_or_else(|| no_snapshot(group, name))
}

/// Images are shared by every group: only an admin key may change them.
pub(crate) fn require_image_admin(p: &Principal, what: &str) -> Result<()> {
    if p.role == Role::Admin {
        Ok(())
    } else {
        Err(Error::Forbidden(format!(
            "only an admin key may {what} (images are shared by every group); this one is {}",
            p.role.as_str()
        )))
    }
}

/// The policy gate for a request that starts something in sandbox `row`, or uploads code to it
/// (`route`: `exec`, `process`, `shell` or `upload`): checked, recorded, and refused with 403 `policy_denied` when the
/// group's policy enforces a finding. Call it after the role checks and the request's own
/// validation, and before anything reaches the sandbox.
pub(crate) async fn require_policy(
    state: &AppState,
    p: &Principal,
    row: &Sandbox,
    route: &'static str,
    request: moat_policy::CheckRequest,
) -> Result<()> {
    let asked = crate::policy::Asked {
        group: &row.group,
        sandbox: &row.id,
        route,
        key: &p.key_id,
    };
    state
        .policy
        .enforce(&state.store, &state.metrics, asked, request)
        .await
}
