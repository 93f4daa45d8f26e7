//! A suspended template clone stores only the memory it changed. QEMU 7.2 can leave a RAM block
//! out of its migration stream only if the block is mapped shared, and a clone maps its
//! template's RAM privately (copy-on-write), so QEMU writes all of it. [`filter`] rewrites that
//! stream: every page of the guest RAM block that equals the template's page at the same offset
//! is dropped. A resume maps the template's RAM again (as a restore of the template does) and
//! loads the filtered stream into it: QEMU writes only the pages the stream carries, so the
//! others stay the template's shared pages, and the resumed sandbox holds privately only what it
//! had changed.
//!
//! The stream is QEMU's (QEMU runs next to hostile guest code), so it is parsed defensively:
//! only the layout QEMU 7.2 writes for a stopped `microvm` with `x-ignore-shared` is accepted
//! (header, configuration, the `ram` section's setup, parts and end, then device state, which
//! is copied verbatim), every length is bounded, and anything else is an error, on which the
//! caller keeps the full stream. A page sent twice is an error too: dropping one copy could
//! leave the other.

use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Write};
use std::os::unix::fs::FileExt;
use std::path::Path;

use crate::error::IoContext;
use crate::{Error, Result};

const MAGIC: u32 = 0x5145_564d;
const VERSION: u32 = 3;

const SECTION_START: u8 = 0x01;
const SECTION_PART: u8 = 0x02;
const SECTION_END: u8 = 0x03;
const SUBSECTION: u8 = 0x05;
const CONFIGURATION: u8 = 0x07;
const FOOTER: u8 = 0x7e;

const FLAG_ZERO: u64 = 0x02;
const FLAG_MEM_SIZE: u64 = 0x04;
const FLAG_PAGE: u64 = 0x08;
const FLAG_EOS: u64 = 0x10;
const FLAG_CONTINUE: u64 = 0x20;

/// x86's target page.
const PAGE: usize = 4096;
const FLAGS_MASK: u64 = PAGE as u64 - 1;

/// What [`filter`] kept and dropped of the guest RAM block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Filtered {
    pub kept_pages: u64,
    pub dropped_pages: u64,
}

/// Writes to `out` the migration stream `stream` less every page of RAM block `block` that
/// equals the same page of `template` (a guest RAM image, sparse: holes read as zero).
pub fn filter(stream: &Path, template: &Path, block: &str, out: &Path) -> Result<Filtered> {
    let input = File::open(stream).ctx(|| format!("opening {}", stream.display()))?;
    let tpl = File::open(template).ctx(|| format!("opening {}", template.display()))?;
    let tpl_len = tpl
        .metadata()
        .ctx(|| format!("stat {}", template.display()))?
        .len();
    let data = data_pages(&tpl, tpl_len)?;
    let output = File::create(out).ctx(|| format!("creating {}", out.display()))?;
    let mut f = Filter {
        template: tpl,
        r: BufReader::with_capacity(1 << 20, input),
        w: BufWriter::with_capacity(1 << 20, output),
        tpl_len,
        block: block.as_bytes().to_vec(),
        seen: vec![0u64; (tpl_len as usize / PAGE).div_ceil(64)],
        data,
        page: vec![0u8; PAGE],
        theirs: vec![0u8; PAGE],
        ignore_shared: false,
        last_read: None,
        ours: false,
        last_written: None,
        counts: Filtered {
            kept_pages: 0,
            dropped_pages: 0,
        },
    };
    f.run()?;
    let file =
        f.w.into_inner()
            .map_err(|e| Error::io("writing the filtered memory image", e.into_error()))?;
    file.sync_all()
        .ctx(|| format!("syncing {}", out.display()))?;
    Ok(f.counts)
}

static ZERO: [u8; PAGE] = [0; PAGE];

/// One bit per page of `f` (`len` bytes): set for the pages in its data extents.
fn data_pages(f: &File, len: u64) -> Result<Vec<u64>> {
    let mut bits = vec![0u64; (len as usize / PAGE).div_ceil(64)];
    let mut offset = 0;
    while let Some((start, end)) = crate::ram::next_data(f, offset, len)? {
        for i in (start as usize / PAGE)..(end as usize).div_ceil(PAGE) {
            if let Some(w) = bits.get_mut(i / 64) {
                *w |= 1 << (i % 64);
            }
        }
        offset = end;
    }
    Ok(bits)
}

fn bad(what: impl Into<String>) -> Error {
    Error::Snapshot(format!(
        "unexpected migration stream (not filtering it): {}",
        what.into()
    ))
}

struct Filter {
    r: BufReader<File>,
    w: BufWriter<File>,
    template: File,
    tpl_len: u64,
    block: Vec<u8>,
    /// Pages of `block` seen so far, one bit each.
    seen: Vec<u64>,
    /// Pages of the template inside its data extents, one bit each; the others are holes,
    /// which read as zero and need no read.
    data: Vec<u64>,
    /// Buffers for a page of the stream and of the template.
    page: Vec<u8>,
    theirs: Vec<u8>,
    /// The configuration lists `x-ignore-shared`: each RAM block of the setup carries its
    /// address.
    ignore_shared: bool,
    /// The block of the last page record read, and of the last one written (a record with
    /// the CONTINUE flag means "the same block as the record before").
    last_read: Option<Vec<u8>>,
    /// The last block read is `block`.
    ours: bool,
    last_written: Option<Vec<u8>>,
    counts: Filtered,
}

impl Filter {
    fn read(&mut self, buf: &mut [u8]) -> Result<()> {
        self.r
            .read_exact(buf)
            .map_err(|e| bad(format!("truncated: {e}")))
    }

    fn write(&mut self, buf: &[u8]) -> Result<()> {
        self.w
            .write_all(buf)
            .map_err(|e| Error::io("writing the filtered memory image", e))
    }

    fn u8(&mut self) -> Result<u8> {
        let mut b = [0u8; 1];
        self.read(&mut b)?;
        Ok(b[0])
    }

    fn be64(&mut self) -> Result<u64> {
        let mut b = [0u8; 8];
        self.read(&mut b)?;
        Ok(u64::from_be_bytes(b))
    }

    /// The next byte without consuming it; `None` at the end.
    fn peek(&mut self) -> Result<Option<u8>> {
        use std::io::BufRead;
        let buf = self
            .r
            .fill_buf()
            .map_err(|e| Error::io("reading the memory image", e))?;
        Ok(buf.first().copied())
    }

    /// A length byte and that many bytes.
    fn name(&mut self) -> Result<Vec<u8>> {
        let len = self.u8()?;
        let mut name = vec![0u8; usize::from(len)];
        self.read(&mut name)?;
        Ok(name)
    }

    /// Copies `n` bytes through.
    fn copy(&mut self, n: usize) -> Result<Vec<u8>> {
        let mut b = vec![0u8; n];
        self.read(&mut b)?;
        self.write(&b)?;
        Ok(b)
    }

    fn copy_u8(&mut self) -> Result<u8> {
        Ok(self.copy(1)?[0])
    }

    fn copy_be32(&mut self) -> Result<u32> {
        let b = self.copy(4)?;
        Ok(u32::from_be_bytes(b.try_into().expect("4 bytes")))
    }

    fn copy_be64(&mut self) -> Result<u64> {
        let b = self.copy(8)?;
        Ok(u64::from_be_bytes(b.try_into().expect("8 bytes")))
    }

    fn copy_name(&mut self) -> Result<Vec<u8>> {
        let len = self.copy_u8()?;
        self.copy(usize::from(len))
    }

    fn run(&mut self) -> Result<()> {
        if self.copy_be32()? != MAGIC || self.copy_be32()? != VERSION {
            return Err(bad("not a QEMU migration stream of version 3"));
        }
        self.configuration()?;
        let mut ram_section = None;
        loop {
            let kind = self.copy_u8()?;
            match kind {
                SECTION_START if ram_section.is_none() => {
                    let id = self.copy_be32()?;
                    let name = self.copy_name()?;
                    if name != b"ram" {
                        return Err(bad(format!(
                            "an iterative section {:?} besides ram",
                            String::from_utf8_lossy(&name)
                        )));
                    }
                    self.copy(8)?; // instance and version ids
                    self.ram_setup()?;
                    self.records()?;
                    self.footer(id)?;
                    ram_section = Some(id);
                }
                SECTION_PART | SECTION_END if ram_section.is_some() => {
                    let id = self.copy_be32()?;
                    if Some(id) != ram_section {
                        return Err(bad(format!("a part of section {id}, not of ram")));
                    }
                    self.records()?;
                    self.footer(id)?;
                    if kind == SECTION_END {
                        break;
                    }
                }
                other => {
                    return Err(bad(format!(
                        "section type {other:#04x} before the end of the ram section"
                    )))
                }
            }
        }
        // Device state (and QEMU's description of it): through as it is.
        std::io::copy(&mut self.r, &mut self.w)
            .map_err(|e| Error::io("copying the device state", e))?;
        Ok(())
    }

    /// The configuration section: the machine's name and the subsections QEMU 7.2 may add.
    fn configuration(&mut self) -> Result<()> {
        if self.copy_u8()? != CONFIGURATION {
            return Err(bad("no configuration section"));
        }
        let len = self.copy_be32()?;
        if len > 256 {
            return Err(bad("a machine name longer than 256 bytes"));
        }
        self.copy(len as usize)?;
        while self.peek()? == Some(SUBSECTION) {
            self.copy_u8()?;
            let name = self.copy_name()?;
            self.copy_be32()?; // version
            match name.as_slice() {
                b"configuration/capabilities" => {
                    let n = self.copy_be32()?;
                    if n > 64 {
                        return Err(bad("more than 64 capabilities"));
                    }
                    for _ in 0..n {
                        if self.copy_name()? == b"x-ignore-shared" {
                            self.ignore_shared = true;
                        }
                    }
                }
                b"configuration/target-page-bits" => {
                    if self.copy_be32()? != 12 {
                        return Err(bad("a target page that is not 4 KiB"));
                    }
                }
                b"configuration/uuid" => {
                    self.copy(16)?;
                }
                other => {
                    return Err(bad(format!(
                        "configuration subsection {:?}",
                        String::from_utf8_lossy(other)
                    )))
                }
            }
        }
        Ok(())
    }

    /// The ram section's setup: the total size and each block's name and size.
    fn ram_setup(&mut self) -> Result<()> {
        let head = self.copy_be64()?;
        if head & FLAGS_MASK != FLAG_MEM_SIZE {
            return Err(bad("the ram setup does not start with the memory size"));
        }
        let total = head & !FLAGS_MASK;
        let mut sum = 0u64;
        while sum < total {
            self.copy_name()?;
            let used = self.copy_be64()?;
            if used == 0 {
                return Err(bad("an empty RAM block"));
            }
            if self.ignore_shared {
                self.copy_be64()?; // the block's address
            }
            sum = sum.saturating_add(used);
        }
        if sum != total {
            return Err(bad("RAM block sizes that do not add up to the total"));
        }
        Ok(())
    }

    fn footer(&mut self, id: u32) -> Result<()> {
        if self.copy_u8()? != FOOTER || self.copy_be32()? != id {
            return Err(bad(format!("no footer after a part of section {id}")));
        }
        Ok(())
    }

    /// Page records up to the end of this part, filtered. Hot: a 2 GiB guest is 524,288
    /// records, most of them zero pages, so the common case allocates and copies nothing.
    fn records(&mut self) -> Result<()> {
        // Each part names its first block again, whether or not a loader remembers the last
        // one across parts.
        self.last_written = None;
        loop {
            let head = self.be64()?;
            let (flags, addr) = (head & FLAGS_MASK, head & !FLAGS_MASK);
            if flags == FLAG_EOS {
                self.write(&head.to_be_bytes())?;
                return Ok(());
            }
            let kind = flags & !FLAG_CONTINUE;
            if kind != FLAG_ZERO && kind != FLAG_PAGE {
                return Err(bad(format!("a page record with flags {flags:#x}")));
            }
            if flags & FLAG_CONTINUE == 0 {
                let name = self.name()?;
                self.ours = name == self.block;
                self.last_read = Some(name);
            } else if self.last_read.is_none() {
                return Err(bad("a continued page record before any block"));
            }
            let fill = if kind == FLAG_ZERO {
                Some(self.u8()?)
            } else {
                let mut page = std::mem::take(&mut self.page);
                let read = self.read(&mut page);
                self.page = page;
                read?;
                None
            };
            if self.ours {
                if self.same_as_template(addr, fill)? {
                    self.counts.dropped_pages += 1;
                    continue;
                }
                self.counts.kept_pages += 1;
            }
            let continued = self.last_written.is_some() && self.last_written == self.last_read;
            let head = addr | kind | if continued { FLAG_CONTINUE } else { 0 };
            self.write(&head.to_be_bytes())?;
            if !continued {
                let name = self.last_read.clone().unwrap_or_default();
                self.write(&[name.len() as u8])?;
                self.write(&name)?;
                self.last_written = Some(name);
            }
            match fill {
                Some(ch) => self.write(&[ch])?,
                None => {
                    let page = std::mem::take(&mut self.page);
                    let written = self.write(&page);
                    self.page = page;
                    written?;
                }
            }
        }
    }

    /// Whether the guest page at `addr` (all `fill` bytes, or else `self.page`) equals the
    /// template's, and marks it seen.
    fn same_as_template(&mut self, addr: u64, fill: Option<u8>) -> Result<bool> {
        if addr + PAGE as u64 > self.tpl_len {
            return Err(bad(format!(
                "a page at {addr:#x}, past the template's {} bytes",
                self.tpl_len
            )));
        }
        let i = (addr / PAGE as u64) as usize;
        let (word, bit) = (i / 64, 1u64 << (i % 64));
        if self.seen[word] & bit != 0 {
            return Err(bad(format!("the page at {addr:#x} sent twice")));
        }
        self.seen[word] |= bit;
        if self.data[word] & bit == 0 {
            // A hole of the template reads as zeros. Slice comparisons are memcmp.
            return Ok(match fill {
                Some(ch) => ch == 0,
                None => self.page == ZERO.as_slice(),
            });
        }
        let mut theirs = std::mem::take(&mut self.theirs);
        let read = self.template.read_exact_at(&mut theirs, addr);
        let same = match fill {
            Some(ch) => theirs.iter().all(|&b| b == ch),
            None => theirs == self.page,
        };
        self.theirs = theirs;
        read.map_err(|e| Error::io("reading the template's RAM", e))?;
        Ok(same)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A stream as QEMU 7.2 writes it, with the pages given as (block, address, content).
    fn stream(pages: &[(&str, u64, Option<u8>, &[u8])]) -> Vec<u8> {
        let mut s = Vec::new();
        s.extend(MAGIC.to_be_bytes());
        s.extend(VERSION.to_be_bytes());
        s.push(CONFIGURATION);
        s.extend(7u32.to_be_bytes());
        s.extend(b"microvm");
        s.push(SUBSECTION);
        let sub = b"configuration/capabilities";
        s.push(sub.len() as u8);
        s.extend(sub);
        s.extend(1u32.to_be_bytes());
        s.extend(1u32.to_be_bytes());
        s.push(15);
        s.extend(b"x-ignore-shared");
        // ram setup: one 4-page block.
        s.push(SECTION_START);
        s.extend(2u32.to_be_bytes());
        s.push(3);
        s.extend(b"ram");
        s.extend(0u32.to_be_bytes());
        s.extend(4u32.to_be_bytes());
        s.extend(((4 * PAGE as u64) | FLAG_MEM_SIZE).to_be_bytes());
        s.push(11);
        s.extend(b"microvm.ram");
        s.extend((4 * PAGE as u64).to_be_bytes());
        s.extend(0u64.to_be_bytes());
        s.extend(FLAG_EOS.to_be_bytes());
        s.push(FOOTER);
        s.extend(2u32.to_be_bytes());
        // One part with the pages, then an empty end.
        s.push(SECTION_PART);
        s.extend(2u32.to_be_bytes());
        let mut last: Option<&str> = None;
        for (block, addr, fill, data) in pages {
            let cont = last == Some(*block);
            let kind = if fill.is_some() { FLAG_ZERO } else { FLAG_PAGE };
            s.extend((addr | kind | if cont { FLAG_CONTINUE } else { 0 }).to_be_bytes());
            if !cont {
                s.push(block.len() as u8);
                s.extend(block.as_bytes());
            }
            match fill {
                Some(c) => s.push(*c),
                None => s.extend(*data),
            }
            last = Some(block);
        }
        s.extend(FLAG_EOS.to_be_bytes());
        s.push(FOOTER);
        s.extend(2u32.to_be_bytes());
        s.push(SECTION_END);
        s.extend(2u32.to_be_bytes());
        s.extend(FLAG_EOS.to_be_bytes());
        s.push(FOOTER);
        s.extend(2u32.to_be_bytes());
        s.extend(b"\x04device state, copied as it is\x00");
        s
    }

    fn run(stream_bytes: &[u8], template: &[u8]) -> (Result<Filtered>, Vec<u8>) {
        let dir = tempfile::tempdir().unwrap();
        let (s, t, o) = (
            dir.path().join("s"),
            dir.path().join("t"),
            dir.path().join("o"),
        );
        std::fs::write(&s, stream_bytes).unwrap();
        std::fs::write(&t, template).unwrap();
        let r = filter(&s, &t, "microvm.ram", &o);
        (r, std::fs::read(&o).unwrap_or_default())
    }

    #[test]
    fn drops_the_pages_equal_to_the_template_and_keeps_the_rest_exactly() {
        let mut tpl = vec![0u8; 4 * PAGE];
        tpl[PAGE..2 * PAGE].fill(7); // page 1: sevens; pages 0, 2, 3: zero
        let sevens = vec![7u8; PAGE];
        let changed = vec![9u8; PAGE];
        let input = stream(&[
            ("microvm.ram", 0, Some(0), &[]), // zero, as in the template
            ("microvm.ram", PAGE as u64, None, &sevens), // as in the template
            ("microvm.ram", 2 * PAGE as u64, None, &changed), // changed
            ("microvm.ram", 3 * PAGE as u64, Some(0), &[]), // zero, as in the template
        ]);
        let (r, out) = run(&input, &tpl);
        assert_eq!(
            r.unwrap(),
            Filtered {
                kept_pages: 1,
                dropped_pages: 3
            }
        );
        // The same stream with only the changed page: its record now names its block (the
        // record that named it before was dropped).
        let want = stream(&[("microvm.ram", 2 * PAGE as u64, None, &changed)]);
        assert_eq!(out, want);
    }

    #[test]
    fn a_page_zeroed_in_the_clone_is_kept() {
        let tpl = vec![5u8; 4 * PAGE];
        let input = stream(&[("microvm.ram", 0, Some(0), &[])]);
        let (r, out) = run(&input, &tpl);
        assert_eq!(r.unwrap().kept_pages, 1);
        assert_eq!(out, input);
    }

    #[test]
    fn refuses_what_it_does_not_know_rather_than_guess() {
        let tpl = vec![0u8; 4 * PAGE];
        let page = vec![1u8; PAGE];
        // A page sent twice.
        let twice = stream(&[
            ("microvm.ram", 0, None, &page),
            ("microvm.ram", 0, Some(0), &[]),
        ]);
        assert!(run(&twice, &tpl)
            .0
            .unwrap_err()
            .to_string()
            .contains("twice"));
        // A page past the template.
        let past = stream(&[("microvm.ram", 4 * PAGE as u64, None, &page)]);
        assert!(run(&past, &tpl).0.is_err());
        // Truncated anywhere.
        let good = stream(&[("microvm.ram", 0, None, &page)]);
        for cut in [3, 20, 60, 120, good.len() - 40] {
            assert!(run(&good[..cut], &tpl).0.is_err(), "cut at {cut}");
        }
        // Not a stream at all.
        assert!(run(b"hello world, not QEVM", &tpl).0.is_err());
        // A compressed page.
        let mut odd = stream(&[("microvm.ram", 0, None, &page)]);
        let at = odd
            .windows(8)
            .position(|w| w == (FLAG_PAGE).to_be_bytes())
            .unwrap();
        odd[at..at + 8].copy_from_slice(&0x100u64.to_be_bytes());
        assert!(run(&odd, &tpl).0.is_err());
    }
}
