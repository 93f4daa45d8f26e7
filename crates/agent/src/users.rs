//! Users and groups from the image's `/etc/passwd` and `/etc/group`. The agent is static glibc,
//! so NSS (getpwnam and friends) is off limits: these files are parsed directly.

/// Who an exec runs as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub uid: u32,
    pub gid: u32,
    /// Supplementary groups, the primary group included.
    pub groups: Vec<u32>,
    pub home: String,
}

struct PasswdEntry<'a> {
    name: &'a str,
    uid: u32,
    gid: u32,
    home: &'a str,
}

struct GroupEntry<'a> {
    name: &'a str,
    gid: u32,
    members: Vec<&'a str>,
}

fn passwd_entries(text: &str) -> impl Iterator<Item = PasswdEntry<'_>> {
    text.lines().filter_map(|line| {
        let f: Vec<&str> = line.split(':').collect();
        if f.len() < 7 || line.starts_with('#') {
            return None;
        }
        Some(PasswdEntry {
            name: f[0],
            uid: f[2].parse().ok()?,
            gid: f[3].parse().ok()?,
            home: f[5],
        })
    })
}

fn group_entries(text: &str) -> impl Iterator<Item = GroupEntry<'_>> {
    text.lines().filter_map(|line| {
        let f: Vec<&str> = line.split(':').collect();
        if f.len() < 4 || line.starts_with('#') {
            return None;
        }
        Some(GroupEntry {
            name: f[0],
            gid: f[2].parse().ok()?,
            members: f[3].split(',').filter(|m| !m.is_empty()).collect(),
        })
    })
}

/// Resolves `user[:group]` (names or numbers; root when `None`) against the contents of
/// `/etc/passwd` and `/etc/group`. A numeric uid absent from passwd is allowed, as in
/// container runtimes: it gets gid 0 and home `/`. The error is the message for the host.
pub fn resolve(spec: Option<&str>, passwd: &str, group: &str) -> Result<Identity, String> {
    let spec = spec.unwrap_or("0");
    let (user, group_spec) = match spec.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (spec, None),
    };
    let entry = match user.parse::<u32>() {
        Ok(uid) => passwd_entries(passwd).find(|e| e.uid == uid),
        Err(_) => passwd_entries(passwd).find(|e| e.name == user),
    };
    let (uid, mut gid, name, home) = match (&entry, user.parse::<u32>()) {
        (Some(e), _) => (e.uid, e.gid, Some(e.name), e.home),
        (None, Ok(uid)) => (uid, 0, None, "/"),
        (None, Err(_)) => return Err(format!("unknown user {user:?}")),
    };
    if let Some(g) = group_spec {
        gid = match g.parse::<u32>() {
            Ok(gid) => gid,
            Err(_) => group_entries(group)
                .find(|e| e.name == g)
                .map(|e| e.gid)
                .ok_or_else(|| format!("unknown group {g:?}"))?,
        };
    }
    let mut groups = vec![gid];
    if let Some(name) = name {
        for g in group_entries(group) {
            if g.members.contains(&name) && !groups.contains(&g.gid) {
                groups.push(g.gid);
            }
        }
    }
    Ok(Identity {
        uid,
        gid,
        groups,
        home: if home.is_empty() { "/" } else { home }.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const PASSWD: &str = "root:x:0:0:root:/root:/bin/bash\n\
        # comment\n\
        broken line\n\
        alice:x:1000:1000:Alice,,,:/home/alice:/bin/sh\n\
        nohome:x:1001:100::::\n";
    const GROUP: &str = "root:x:0:\nusers:x:100:alice,bob\nalice:x:1000:\nwheel:x:10:alice\n";

    fn id(uid: u32, gid: u32, groups: &[u32], home: &str) -> Identity {
        Identity {
            uid,
            gid,
            groups: groups.to_vec(),
            home: home.into(),
        }
    }

    #[test]
    fn root_by_default() {
        assert_eq!(resolve(None, PASSWD, GROUP), Ok(id(0, 0, &[0], "/root")));
    }

    #[test]
    fn by_name_and_uid_with_supplementary_groups() {
        let alice = id(1000, 1000, &[1000, 100, 10], "/home/alice");
        assert_eq!(resolve(Some("alice"), PASSWD, GROUP), Ok(alice.clone()));
        assert_eq!(resolve(Some("1000"), PASSWD, GROUP), Ok(alice));
    }

    #[test]
    fn explicit_group() {
        assert_eq!(
            resolve(Some("alice:users"), PASSWD, GROUP),
            Ok(id(1000, 100, &[100, 10], "/home/alice"))
        );
        assert_eq!(
            resolve(Some("alice:4242"), PASSWD, GROUP),
            Ok(id(1000, 4242, &[4242, 100, 10], "/home/alice"))
        );
        assert!(resolve(Some("alice:nogroup"), PASSWD, GROUP)
            .unwrap_err()
            .contains("unknown group"));
    }

    #[test]
    fn unknown_numeric_uid_is_allowed_unknown_name_is_not() {
        assert_eq!(
            resolve(Some("5000"), PASSWD, GROUP),
            Ok(id(5000, 0, &[0], "/"))
        );
        assert!(resolve(Some("mallory"), PASSWD, GROUP)
            .unwrap_err()
            .contains("unknown user"));
    }

    #[test]
    fn empty_home_is_root_dir() {
        assert_eq!(
            resolve(Some("nohome"), PASSWD, GROUP),
            Ok(id(1001, 100, &[100], "/"))
        );
    }
}
