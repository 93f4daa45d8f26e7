//! Test fixtures for moat: a real OCI registry on loopback (Debian's `docker-registry`), layer
//! and image builders (OCI layouts and `docker save` archives). Missing host tools make the
//! fixtures panic with the package to install: nothing is skipped silently.

pub mod fuzz;
pub mod openapi;
pub mod postgres;

use std::io::Write;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use moat_image::spec::ConfigFile;
use moat_image::{Compression, ImageConfig};
use sha2::{Digest, Sha256};

fn require(tool: &str, package: &str) {
    let ok = Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .stdout(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    assert!(
        ok,
        "`{tool}` is not installed: run `apt-get install {package}`"
    );
}

/// A `docker-registry serve` process on 127.0.0.1, killed and cleaned up on drop.
pub struct Registry {
    child: Child,
    addr: SocketAddr,
    _dir: tempfile::TempDir,
}

impl Registry {
    /// Starts a registry; with `auth`, it requires HTTP Basic auth with that user/password.
    pub fn start(auth: Option<(&str, &str)>) -> Registry {
        require("docker-registry", "docker-registry");
        let dir = tempfile::tempdir().expect("temp dir");
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("free port")
            .port();
        let addr: SocketAddr = ([127, 0, 0, 1], port).into();
        let mut cfg = format!(
            "version: 0.1\nlog:\n  level: error\n  accesslog:\n    disabled: true\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: {addr}\n",
            dir.path().join("data").display()
        );
        if let Some((user, pass)) = auth {
            require("htpasswd", "apache2-utils");
            let out = Command::new("htpasswd")
                .args(["-Bbn", user, pass])
                .output()
                .expect("run htpasswd");
            assert!(
                out.status.success(),
                "htpasswd failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            let hp = dir.path().join("htpasswd");
            std::fs::write(&hp, &out.stdout).expect("write htpasswd");
            cfg.push_str(&format!(
                "auth:\n  htpasswd:\n    realm: moat-test\n    path: {}\n",
                hp.display()
            ));
        }
        let cfg_path = dir.path().join("config.yml");
        std::fs::write(&cfg_path, cfg).expect("write registry config");
        let log = std::fs::File::create(dir.path().join("registry.log")).expect("log file");
        let child = Command::new("docker-registry")
            .arg("serve")
            .arg(&cfg_path)
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("spawn docker-registry");
        let mut reg = Registry {
            child,
            addr,
            _dir: dir,
        };
        reg.wait_ready();
        reg
    }

    fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                let log = std::fs::read_to_string(self._dir.path().join("registry.log"))
                    .unwrap_or_default();
                panic!("docker-registry exited ({status}) before it was ready:\n{log}");
            }
            // GET /v2/ answers 200, or 401 with auth: either way the registry is serving.
            if let Ok(mut s) =
                std::net::TcpStream::connect_timeout(&self.addr, Duration::from_millis(200))
            {
                let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
                let req = format!("GET /v2/ HTTP/1.0\r\nHost: {}\r\n\r\n", self.addr);
                if s.write_all(req.as_bytes()).is_ok() {
                    let mut buf = [0u8; 32];
                    let n = std::io::Read::read(&mut s, &mut buf).unwrap_or(0);
                    let head = String::from_utf8_lossy(&buf[..n]);
                    if head.contains(" 200") || head.contains(" 401") {
                        return;
                    }
                }
            }
            assert!(
                Instant::now() < deadline,
                "docker-registry did not become ready on {}",
                self.addr
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// `127.0.0.1:PORT`.
    pub fn addr(&self) -> String {
        self.addr.to_string()
    }

    /// Pushes the OCI layout at `layout` as `repo:tag` (plain HTTP, no credentials: a registry
    /// started without auth); returns the full reference and the manifest digest.
    pub async fn push(&self, layout: &Path, repo_tag: &str) -> (String, String) {
        let reference = format!("{}/{repo_tag}", self.addr);
        let digest = moat_image::push_layout(
            layout,
            &moat_image::Reference::parse(&reference).expect("a valid reference"),
            &moat_image::ImportOptions {
                plain_http: true,
                docker_config: None,
            },
        )
        .await
        .expect("push to the test registry");
        (reference, digest)
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Builds an uncompressed layer tar. Paths are written verbatim (hostile ones included).
pub struct LayerBuilder {
    b: tar::Builder<Vec<u8>>,
}

impl Default for LayerBuilder {
    fn default() -> Self {
        Self::new()
    }
}

impl LayerBuilder {
    pub fn new() -> LayerBuilder {
        LayerBuilder {
            b: tar::Builder::new(Vec::new()),
        }
    }

    fn append(
        &mut self,
        path: &str,
        kind: tar::EntryType,
        mode: u32,
        link: Option<&str>,
        data: &[u8],
    ) -> &mut Self {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(kind);
        h.set_mode(mode);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(1_700_000_000);
        h.set_size(data.len() as u64);
        // Raw name bytes: tar's set_path() refuses "..", and tests need hostile paths.
        let name = &mut h.as_old_mut().name;
        assert!(path.len() < name.len(), "test path too long");
        name.fill(0);
        name[..path.len()].copy_from_slice(path.as_bytes());
        if let Some(l) = link {
            let ln = &mut h.as_old_mut().linkname;
            ln.fill(0);
            ln[..l.len()].copy_from_slice(l.as_bytes());
        }
        h.set_cksum();
        self.b.append(&h, data).expect("append to in-memory tar");
        self
    }

    pub fn file(&mut self, path: &str, data: &[u8], mode: u32) -> &mut Self {
        self.append(path, tar::EntryType::Regular, mode, None, data)
    }
    pub fn dir(&mut self, path: &str, mode: u32) -> &mut Self {
        self.append(path, tar::EntryType::Directory, mode, None, b"")
    }
    pub fn symlink(&mut self, path: &str, target: &str) -> &mut Self {
        self.append(path, tar::EntryType::Symlink, 0o777, Some(target), b"")
    }
    pub fn hardlink(&mut self, path: &str, target: &str) -> &mut Self {
        self.append(path, tar::EntryType::Link, 0o644, Some(target), b"")
    }
    pub fn fifo(&mut self, path: &str) -> &mut Self {
        self.append(path, tar::EntryType::Fifo, 0o644, None, b"")
    }
    /// `.wh.NAME` next to `path`: deletes `path` of lower layers.
    pub fn whiteout(&mut self, path: &str) -> &mut Self {
        let (dir, name) = path.rsplit_once('/').unwrap_or(("", path));
        let wh = if dir.is_empty() {
            format!(".wh.{name}")
        } else {
            format!("{dir}/.wh.{name}")
        };
        self.file(&wh, b"", 0o644)
    }
    /// `.wh..wh..opq` in `dir`: hides everything lower layers put there.
    pub fn opaque(&mut self, dir: &str) -> &mut Self {
        self.file(
            &format!("{}/.wh..wh..opq", dir.trim_end_matches('/')),
            b"",
            0o644,
        )
    }
    /// The uncompressed tar bytes.
    pub fn finish(&mut self) -> Vec<u8> {
        let b = std::mem::replace(&mut self.b, tar::Builder::new(Vec::new()));
        b.into_inner().expect("finish tar")
    }
}

/// The applets linked to busybox in the test image.
pub const APPLETS: &[&str] = &[
    "sh", "ls", "cat", "echo", "sleep", "true", "false", "env", "id", "mkdir", "rm", "cp", "mv",
    "ps", "kill", "head", "tail", "wc", "grep", "sed", "printf", "test", "touch", "chmod", "stat",
    "dd", "uname", "hostname", "date", "pwd",
];

/// A layer with the host's static `/bin/busybox` and its applet symlinks in `/bin`, `/etc/passwd`
/// and `/etc/group` with root and `app` (1000, home `/home/app`), and `/tmp` mode 1777.
pub fn busybox_layer() -> Vec<u8> {
    require("busybox", "busybox-static");
    let bb =
        std::fs::read("/bin/busybox").expect("read /bin/busybox (apt-get install busybox-static)");
    let mut l = LayerBuilder::new();
    l.dir("bin/", 0o755).file("bin/busybox", &bb, 0o755);
    for a in APPLETS {
        l.symlink(&format!("bin/{a}"), "busybox");
    }
    l.dir("etc/", 0o755)
        .file(
            "etc/passwd",
            b"root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000:app:/home/app:/bin/sh\n",
            0o644,
        )
        .file("etc/group", b"root:x:0:\napp:x:1000:\n", 0o644)
        .dir("root/", 0o700)
        .dir("home/", 0o755)
        .dir("home/app/", 0o755)
        .dir("tmp/", 0o1777);
    let mut tar = l.finish();
    chown_entry(&mut tar, "home/app/", 1000, 1000);
    tar
}

/// Rewrites the owner of one entry in an uncompressed tar (the builder writes uid/gid 0).
pub fn chown_entry(tar: &mut [u8], path: &str, uid: u64, gid: u64) {
    let mut off = 0usize;
    while off + 512 <= tar.len() {
        let mut h = tar::Header::new_old();
        h.as_mut_bytes().copy_from_slice(&tar[off..off + 512]);
        if h.as_bytes().iter().all(|b| *b == 0) {
            return;
        }
        let size = h.entry_size().unwrap_or(0) as usize;
        if h.path_bytes().as_ref() == path.as_bytes() {
            h.set_uid(uid);
            h.set_gid(gid);
            h.set_cksum();
            tar[off..off + 512].copy_from_slice(h.as_bytes());
            return;
        }
        off += 512 + size.div_ceil(512) * 512;
    }
    panic!("entry {path} not in tar");
}

/// The default config of test images: `sh`, PATH set.
pub fn test_config() -> ImageConfig {
    ImageConfig {
        env: vec!["PATH=/bin".into()],
        working_dir: Some("/".into()),
        user: None,
        entrypoint: vec![],
        cmd: vec!["/bin/sh".into()],
    }
}

/// Writes an OCI layout at `dir` from uncompressed layers (compressed as asked) and returns the
/// manifest digest. `ref_name` becomes `org.opencontainers.image.ref.name`.
pub fn write_oci_layout(
    dir: &Path,
    layers: &[Vec<u8>],
    comp: Compression,
    config: &ImageConfig,
    ref_name: Option<&str>,
) -> String {
    let mut w = moat_image::layout::LayoutWriter::create(dir).expect("create layout");
    for l in layers {
        w.add_layer(l, comp).expect("add layer");
    }
    w.finish(config, ref_name).expect("finish layout").digest
}

/// Where a `docker save` archive keeps layers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ArchiveForm {
    /// `<n>/layer.tar`, `<hex>.json` (Docker < 25).
    Legacy,
    /// `blobs/sha256/<hex>` (Docker ≥ 25).
    Blobs,
}

fn sha(b: &[u8]) -> String {
    hex::encode(Sha256::digest(b))
}

/// Writes a `docker save`-style archive with uncompressed layers.
pub fn write_docker_archive(
    path: &Path,
    layers: &[Vec<u8>],
    config: &ImageConfig,
    repo_tag: &str,
    form: ArchiveForm,
) {
    let diff_ids = layers
        .iter()
        .map(|l| format!("sha256:{}", sha(l)))
        .collect();
    let cfg = ConfigFile::new(config, diff_ids, "linux", "amd64");
    let cfg_bytes = serde_json::to_vec(&cfg).expect("config json");
    let mut files: Vec<(String, Vec<u8>)> = Vec::new();
    let cfg_name = match form {
        ArchiveForm::Legacy => format!("{}.json", sha(&cfg_bytes)),
        ArchiveForm::Blobs => format!("blobs/sha256/{}", sha(&cfg_bytes)),
    };
    files.push((cfg_name.clone(), cfg_bytes));
    let mut layer_names = Vec::new();
    for (i, l) in layers.iter().enumerate() {
        let n = match form {
            ArchiveForm::Legacy => format!("{i:064x}/layer.tar"),
            ArchiveForm::Blobs => format!("blobs/sha256/{}", sha(l)),
        };
        layer_names.push(n.clone());
        files.push((n, l.clone()));
    }
    let manifest =
        serde_json::json!([{ "Config": cfg_name, "RepoTags": [repo_tag], "Layers": layer_names }]);
    files.push((
        "manifest.json".into(),
        serde_json::to_vec(&manifest).expect("json"),
    ));
    let mut b = tar::Builder::new(std::fs::File::create(path).expect("create archive"));
    for (name, data) in files {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_cksum();
        b.append_data(&mut h, name, data.as_slice())
            .expect("append");
    }
    b.finish().expect("finish archive");
}

/// A path inside a temp dir that lives as long as the returned guard.
pub fn temp_path(name: &str) -> (tempfile::TempDir, PathBuf) {
    let d = tempfile::tempdir().expect("temp dir");
    let p = d.path().join(name);
    (d, p)
}
