//! sha256 digests: validation and hashing readers used to verify blobs while they stream.

use std::io::{self, Read};

use sha2::{Digest as _, Sha256};

use crate::error::{Error, Result};

/// Checks a digest is `sha256:<64 lowercase hex>` (the only algorithm moat accepts, so a
/// digest string is also safe to use as a path component).
pub fn validate(d: &str) -> Result<()> {
    match d.strip_prefix("sha256:") {
        Some(h) if is_hex64(h) => Ok(()),
        _ => Err(Error::InvalidImage(format!(
            "bad digest {d:?} (allowed: \"sha256:\" followed by 64 lowercase hex digits)"
        ))),
    }
}

pub(crate) fn is_hex64(h: &str) -> bool {
    h.len() == 64
        && h.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// The hex part of a validated digest.
pub(crate) fn hex_of(d: &str) -> &str {
    d.strip_prefix("sha256:").unwrap_or(d)
}

/// `sha256:<hex>` of some bytes.
pub fn sha256(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

/// Compares a computed digest with the expected one.
pub(crate) fn check(what: impl FnOnce() -> String, expected: &str, actual: &str) -> Result<()> {
    if expected == actual {
        Ok(())
    } else {
        Err(Error::DigestMismatch {
            what: what(),
            expected: expected.into(),
            actual: actual.into(),
        })
    }
}

/// A reader that hashes and counts everything read through it.
pub struct HashingReader<R> {
    inner: R,
    hasher: Sha256,
    count: u64,
}

impl<R: Read> HashingReader<R> {
    pub fn new(inner: R) -> Self {
        HashingReader {
            inner,
            hasher: Sha256::new(),
            count: 0,
        }
    }

    /// Reads to the end (so trailing padding counts too) and returns `(digest, bytes)`.
    pub fn finish(mut self) -> io::Result<(String, u64)> {
        io::copy(&mut self, &mut io::sink())?;
        Ok((
            format!("sha256:{}", hex::encode(self.hasher.finalize())),
            self.count,
        ))
    }
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        self.count += n as u64;
        Ok(n)
    }
}

/// Incremental sha256 for async streams.
#[derive(Default)]
pub struct Hasher(Sha256);

impl Hasher {
    pub fn update(&mut self, b: &[u8]) {
        self.0.update(b);
    }
    pub fn finish(self) -> String {
        format!("sha256:{}", hex::encode(self.0.finalize()))
    }
}

/// Running hash and byte count, kept outside the reader chain so it can be read after the
/// decompressor that owns the reader is dropped.
#[derive(Default)]
pub struct HashState {
    hasher: Sha256,
    pub count: u64,
}

impl HashState {
    pub fn digest(&self) -> String {
        format!("sha256:{}", hex::encode(self.hasher.clone().finalize()))
    }
}

/// A reader that feeds everything it reads into a borrowed [`HashState`].
pub struct HashRef<'a, R> {
    pub inner: R,
    pub state: &'a mut HashState,
}

impl<R: Read> Read for HashRef<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.state.hasher.update(&buf[..n]);
        self.state.count += n as u64;
        Ok(n)
    }
}
