//! Files in the guest: stat, list, mkdir, remove, and streamed reads and writes, behind the
//! daemon's files routes and `moat cp`. The guest side is `crates/agent/src/files.rs`.

use moat_protocol::{channel, DirEntry, Event, FileStat, Message, Request, Stream};
use tokio::io::AsyncReadExt;

use super::{guest_result, next_msg, unexpected, with_deadline, AgentConn, OP_TIMEOUT};
use crate::Error;

/// Listings larger than this are refused rather than buffered.
const MAX_LIST_ENTRIES: usize = 1_000_000;

impl AgentConn {
    pub async fn stat(&self, path: &str) -> Result<FileStat, Error> {
        match self.simple(Request::Stat { path: path.into() }).await? {
            Message::Stat(st) => possible(path, &st).map(|()| st),
            other => Err(unexpected("stat", &other)),
        }
    }

    pub async fn list(&self, path: &str) -> Result<Vec<DirEntry>, Error> {
        let mut stream = self.open(&Request::List { path: path.into() }).await?;
        let mut entries = Vec::new();
        loop {
            match guest_result(with_deadline("list", OP_TIMEOUT, next_msg(&mut stream)).await?)? {
                Message::Entries { entries: mut more } => {
                    if entries.len() + more.len() > MAX_LIST_ENTRIES {
                        return Err(Error::Agent(format!(
                            "directory listing of {path} exceeds {MAX_LIST_ENTRIES} entries"
                        )));
                    }
                    for e in &more {
                        possible(&e.name, &e.stat)?;
                    }
                    entries.append(&mut more);
                }
                Message::Done => break,
                other => return Err(unexpected("list", &other)),
            }
        }
        stream.close();
        Ok(entries)
    }

    pub async fn mkdir(&self, path: &str, parents: bool, mode: Option<u32>) -> Result<(), Error> {
        self.expect_done(Request::Mkdir {
            path: path.into(),
            parents,
            mode,
        })
        .await
    }

    pub async fn remove(&self, path: &str, recursive: bool) -> Result<(), Error> {
        self.expect_done(Request::Remove {
            path: path.into(),
            recursive,
        })
        .await
    }

    /// Streams a file out of the guest.
    pub async fn read_file(&self, path: &str) -> Result<FileReader, Error> {
        let mut stream = self.open(&Request::ReadFile { path: path.into() }).await?;
        match guest_result(with_deadline("read", OP_TIMEOUT, next_msg(&mut stream)).await?)? {
            Message::Stat(stat) => Ok(FileReader {
                stat: possible(path, &stat).map(|()| stat)?,
                stream: Some(stream),
                eof: false,
            }),
            other => Err(unexpected("read", &other)),
        }
    }

    /// Streams `data` into a file in the guest, which replaces the file atomically once all of
    /// it arrived.
    pub async fn write_file<R: tokio::io::AsyncRead + Unpin>(
        &self,
        path: &str,
        mode: Option<u32>,
        make_parents: bool,
        mut data: R,
    ) -> Result<u64, Error> {
        let mut stream = self
            .open(&Request::WriteFile {
                path: path.into(),
                mode,
                make_parents,
            })
            .await?;
        let tx = stream.sender();
        let mut buf = vec![0u8; moat_protocol::frame::MAX_DATA_CHUNK];
        let send = async {
            let mut total = 0u64;
            loop {
                let n = data
                    .read(&mut buf)
                    .await
                    .map_err(|e| Error::io("reading the data to write", e))?;
                if n == 0 {
                    break;
                }
                tx.data(channel::STDIN, &buf[..n]).await?;
                total += n as u64;
            }
            tx.eof(channel::STDIN).await?;
            Ok::<_, Error>(total)
        };
        // The guest may fail early (say, a missing directory): watch for its answer while
        // sending, so that the real error wins over "stream reset".
        tokio::pin!(send);
        // `send` finishes in the very poll that queues the end-of-file, so a real agent's
        // answer to it can only be seen after: a "done" while sending is a lie.
        let (reply, total) = tokio::select! {
            r = &mut send => {
                let total = r?;
                (with_deadline("write", OP_TIMEOUT, next_msg(&mut stream)).await?, Some(total))
            }
            m = next_msg(&mut stream) => (m?, None),
        };
        stream.close();
        match (guest_result(reply)?, total) {
            (Message::Done, Some(total)) => Ok(total),
            (Message::Done, None) => Err(Error::Agent(format!(
                "the guest acknowledged the write of {path} before it had all the data"
            ))),
            (other, _) => Err(unexpected("write", &other)),
        }
    }
}

/// The guest's stat, if a file could have it. Sizes are never trusted for a transfer (a read
/// delivers the bytes that come), but one above `i64::MAX` no Linux file can have (`off_t` is
/// signed): passed on, it would break the API's documented range and any client that believes
/// it. Such an agent is lying, and its answer is refused.
fn possible(path: &str, stat: &FileStat) -> Result<(), Error> {
    if i64::try_from(stat.size).is_err() {
        return Err(Error::Agent(format!(
            "the guest reported {} bytes for {}, a size no file can have",
            stat.size,
            super::sanitize(path)
        )));
    }
    Ok(())
}

/// A file being read from the guest.
#[derive(Debug)]
pub struct FileReader {
    stat: FileStat,
    stream: Option<Stream>,
    /// The guest ended the data: the next thing may only be its "done".
    eof: bool,
}

impl FileReader {
    /// The file's metadata as the guest reported it when it opened it (not trusted for sizes).
    pub fn stat(&self) -> &FileStat {
        &self.stat
    }

    /// The next chunk, or `None` at the end of the file.
    pub async fn chunk(&mut self) -> Result<Option<Vec<u8>>, Error> {
        let Some(stream) = self.stream.as_mut() else {
            return Ok(None);
        };
        loop {
            match with_deadline("read", OP_TIMEOUT, async { Ok(stream.recv().await) }).await? {
                Some(Event::Data {
                    channel: channel::STDOUT,
                    ..
                }) if self.eof => {
                    return Err(Error::Agent(
                        "the guest sent data after the end of the file".into(),
                    ))
                }
                Some(Event::Data {
                    channel: channel::STDOUT,
                    data,
                }) => return Ok(Some(data)),
                Some(Event::Eof {
                    channel: channel::STDOUT,
                }) => self.eof = true,
                Some(Event::Msg(m)) => {
                    let m = guest_result(m)?;
                    if m != Message::Done {
                        return Err(unexpected("read", &m));
                    }
                    // Without the end-of-file, "done" would pass a cut file off as whole.
                    if !self.eof {
                        return Err(Error::Agent(
                            "the guest ended the read before the end of the file".into(),
                        ));
                    }
                    if let Some(s) = self.stream.take() {
                        s.close();
                    }
                    return Ok(None);
                }
                Some(Event::Reset(why)) => {
                    return Err(Error::Agent(format!("the guest reset the read: {why}")))
                }
                Some(_) => return Err(Error::Agent("guest sent data on a wrong channel".into())),
                None => return Err(Error::AgentGone),
            }
        }
    }
}
