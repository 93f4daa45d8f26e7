//! The operator's hosts file (`moat serve --egress-hosts FILE`, hosts(5) format): names it
//! lists are answered from it instead of upstream DNS, and the addresses it gives them are let
//! past the floor for those names only. This is how tests and private services are reached on
//! purpose; the group policy must still allow the name.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};
use std::path::Path;

use crate::policy::normalize_name;
use crate::{Error, Result};

#[derive(Debug, Clone, Default, PartialEq)]
pub struct HostsFile {
    names: BTreeMap<String, Vec<Ipv4Addr>>,
}

impl HostsFile {
    pub fn load(path: &Path) -> Result<HostsFile> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::Io {
            context: format!("reading the egress hosts file {}", path.display()),
            source: e,
        })?;
        HostsFile::parse(&text).map_err(|(line, message)| Error::HostsFile {
            path: path.display().to_string(),
            line,
            message,
        })
    }

    /// Parses hosts(5) text: an address, then one or more names, `#` to the end of a line is a
    /// comment. IPv6 lines are skipped (sandboxes have no IPv6). Errors carry the line number.
    pub fn parse(text: &str) -> std::result::Result<HostsFile, (usize, String)> {
        let mut names: BTreeMap<String, Vec<Ipv4Addr>> = BTreeMap::new();
        for (i, raw) in text.lines().enumerate() {
            let line = raw.split('#').next().unwrap_or("");
            let mut words = line.split_whitespace();
            let Some(addr) = words.next() else { continue };
            let ip: IpAddr = addr
                .parse()
                .map_err(|_| (i + 1, format!("{addr:?} is not an IP address")))?;
            let hosts: Vec<&str> = words.collect();
            if hosts.is_empty() {
                return Err((i + 1, format!("{addr} has no names after it")));
            }
            let IpAddr::V4(v4) = ip else { continue };
            for h in hosts {
                let n = normalize_name(h)
                    .ok_or_else(|| (i + 1, format!("{h:?} is not a host name")))?;
                let list = names.entry(n).or_default();
                if !list.contains(&v4) {
                    list.push(v4);
                }
            }
        }
        Ok(HostsFile { names })
    }

    /// The addresses the file gives `name` (normalised), if it lists it.
    pub fn lookup(&self, name: &str) -> Option<&[Ipv4Addr]> {
        self.names.get(name).map(Vec::as_slice)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_hosts_format() {
        let h = HostsFile::parse(
            "# test servers\n127.0.0.1\tapi.test API2.test.  # two names\n\n::1 api.test\n10.0.0.5 db.test\n127.0.0.2 api.test\n",
        )
        .unwrap();
        let a: Vec<Ipv4Addr> = vec!["127.0.0.1".parse().unwrap(), "127.0.0.2".parse().unwrap()];
        assert_eq!(h.lookup("api.test"), Some(&a[..]));
        assert_eq!(h.lookup("api2.test"), Some(&a[..1]));
        assert_eq!(
            h.lookup("db.test").unwrap(),
            &["10.0.0.5".parse::<Ipv4Addr>().unwrap()]
        );
        assert_eq!(h.lookup("other.test"), None);
    }

    #[test]
    fn bad_lines_name_their_number() {
        assert_eq!(
            HostsFile::parse("127.0.0.1 a.test\nnot-an-ip a.test\n")
                .unwrap_err()
                .0,
            2
        );
        assert_eq!(HostsFile::parse("127.0.0.1\n").unwrap_err().0, 1);
        assert!(HostsFile::parse("127.0.0.1 a..b\n")
            .unwrap_err()
            .1
            .contains("a..b"));
    }

    #[test]
    fn load_reports_the_path() {
        let e = HostsFile::load(Path::new("/nonexistent/hosts"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("/nonexistent/hosts"), "{e}");
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("hosts");
        std::fs::write(&p, "127.0.0.1 a.test\nbad\n").unwrap();
        let e = HostsFile::load(&p).unwrap_err().to_string();
        assert!(e.contains(":2:"), "{e}");
    }
}
