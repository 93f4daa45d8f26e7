//! A minimal writer for the `newc` cpio format the Linux kernel unpacks as an initramfs.
//! Written here (instead of shelling out to `cpio`) so that the archive is byte-for-byte
//! reproducible from its inputs: timestamps are 0 and inode numbers are sequential.

use std::io::Write;

use flate2::write::GzEncoder;
use flate2::Compression;

use crate::error::IoContext;
use crate::Result;

const S_IFDIR: u32 = 0o040000;
const S_IFREG: u32 = 0o100000;
const S_IFLNK: u32 = 0o120000;
const S_IFCHR: u32 = 0o020000;

/// An in-memory newc cpio archive under construction.
#[derive(Debug, Default)]
pub struct Cpio {
    buf: Vec<u8>,
    next_ino: u32,
}

impl Cpio {
    /// An empty archive.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a directory. Parents must be added first (the kernel does not create them).
    pub fn dir(&mut self, path: &str, perm: u32) -> &mut Self {
        self.entry(path, S_IFDIR | (perm & 0o7777), 2, (0, 0), &[])
    }

    /// Adds a regular file.
    pub fn file(&mut self, path: &str, perm: u32, data: &[u8]) -> &mut Self {
        self.entry(path, S_IFREG | (perm & 0o7777), 1, (0, 0), data)
    }

    /// Adds a symbolic link pointing at `target`.
    pub fn symlink(&mut self, path: &str, target: &str) -> &mut Self {
        self.entry(path, S_IFLNK | 0o777, 1, (0, 0), target.as_bytes())
    }

    /// Adds a character device node.
    pub fn char_dev(&mut self, path: &str, perm: u32, major: u32, minor: u32) -> &mut Self {
        self.entry(path, S_IFCHR | (perm & 0o7777), 1, (major, minor), &[])
    }

    fn entry(
        &mut self,
        path: &str,
        mode: u32,
        nlink: u32,
        rdev: (u32, u32),
        data: &[u8],
    ) -> &mut Self {
        let name = path.trim_start_matches('/');
        self.next_ino += 1;
        let ino = self.next_ino;
        self.header(ino, mode, nlink, data.len(), rdev, name);
        self.buf.extend_from_slice(data);
        self.pad();
        self
    }

    fn header(
        &mut self,
        ino: u32,
        mode: u32,
        nlink: u32,
        size: usize,
        rdev: (u32, u32),
        name: &str,
    ) {
        let fields: [u32; 13] = [
            ino,
            mode,
            0, // uid
            0, // gid
            nlink,
            0, // mtime
            size as u32,
            0, // devmajor
            0, // devminor
            rdev.0,
            rdev.1,
            name.len() as u32 + 1,
            0, // check (unused by newc)
        ];
        self.buf.extend_from_slice(b"070701");
        for f in fields {
            self.buf.extend_from_slice(format!("{f:08X}").as_bytes());
        }
        self.buf.extend_from_slice(name.as_bytes());
        self.buf.push(0);
        self.pad();
    }

    fn pad(&mut self) {
        while self.buf.len() & 3 != 0 {
            self.buf.push(0);
        }
    }

    /// Appends the trailer and returns the uncompressed archive.
    pub fn finish(mut self) -> Vec<u8> {
        self.header(0, 0, 1, 0, (0, 0), "TRAILER!!!");
        self.buf
    }

    /// Appends the trailer and returns the archive gzip-compressed, as `-initrd` wants it.
    pub fn finish_gz(self) -> Result<Vec<u8>> {
        let raw = self.finish();
        let mut gz = GzEncoder::new(Vec::with_capacity(raw.len() / 2), Compression::default());
        gz.write_all(&raw).ctx(|| "compressing initramfs".into())?;
        gz.finish().ctx(|| "compressing initramfs".into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_is_newc() {
        let mut c = Cpio::new();
        c.dir("/dev", 0o755)
            .char_dev("/dev/console", 0o600, 5, 1)
            .file("/init", 0o755, b"abc");
        let raw = c.finish();
        assert_eq!(&raw[..6], b"070701");
        assert_eq!(raw.len() & 3, 0);
        // header(110) + "dev\0" (4) = 114 -> padded to 116.
        assert_eq!(&raw[110..114], b"dev\0");
        assert_eq!(&raw[116..122], b"070701");
        let s = String::from_utf8_lossy(&raw);
        assert!(s.contains("dev/console") && s.contains("TRAILER!!!"));
        // The file entry: mode 0100755.
        assert!(s.contains("000081ED"));
    }

    /// Cross-check with an independent newc reader (the `cpio` crate): names, types,
    /// permissions, device numbers, link targets and contents all read back as written.
    #[test]
    fn an_independent_reader_reads_it() {
        let mut c = Cpio::new();
        c.dir("/modules", 0o755)
            .file("/modules/00-a.ko", 0o644, b"xyz")
            .symlink("/sh", "busybox")
            .char_dev("/console", 0o600, 5, 1)
            .file("/init", 0o755, b"12345");
        let raw = c.finish();
        let mut rest = &raw[..];
        let mut got = Vec::new();
        loop {
            let mut r = ::cpio::NewcReader::new(rest).unwrap();
            if r.entry().is_trailer() {
                rest = r.finish().unwrap();
                break;
            }
            let e = r.entry();
            let line = format!(
                "{} {:o} {},{}",
                e.name(),
                e.mode(),
                e.rdev_major(),
                e.rdev_minor()
            );
            let mut data = Vec::new();
            std::io::Read::read_to_end(&mut r, &mut data).unwrap();
            got.push(format!("{line} {:?}", String::from_utf8_lossy(&data)));
            rest = r.finish().unwrap();
        }
        assert!(rest.is_empty(), "{} bytes after the trailer", rest.len());
        assert_eq!(
            got,
            [
                r#"modules 40755 0,0 """#,
                r#"modules/00-a.ko 100644 0,0 "xyz""#,
                r#"sh 120777 0,0 "busybox""#,
                r#"console 20600 5,1 """#,
                r#"init 100755 0,0 "12345""#,
            ]
        );
    }
}
