//! The last log lines of a process, kept in memory for whoever asks (the
//! workspace daemon serves its own logs from here), with a live feed.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use tokio::sync::broadcast;

/// A bounded ring of log lines; cheap to clone, shared by all clones.
#[derive(Clone, Debug)]
pub struct LogBuffer {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    lines: Mutex<VecDeque<String>>,
    capacity: usize,
    live: broadcast::Sender<String>,
}

impl LogBuffer {
    /// Keeps the last `capacity` lines.
    pub fn new(capacity: usize) -> Self {
        let (live, _) = broadcast::channel(1024);
        Self {
            inner: Arc::new(Inner {
                lines: Mutex::new(VecDeque::with_capacity(capacity.min(4096))),
                capacity: capacity.max(1),
                live,
            }),
        }
    }

    /// Appends one line (without its newline).
    pub fn push(&self, line: String) {
        let mut lines = self.inner.lines.lock().unwrap_or_else(|p| p.into_inner());
        if lines.len() == self.inner.capacity {
            lines.pop_front();
        }
        lines.push_back(line.clone());
        let _ = self.inner.live.send(line);
    }

    /// The last `count` lines and a receiver of the lines after them.
    pub fn tail(&self, count: usize) -> (Vec<String>, broadcast::Receiver<String>) {
        let lines = self.inner.lines.lock().unwrap_or_else(|p| p.into_inner());
        let skip = lines.len().saturating_sub(count);
        // Subscribing under the lock: no line is both in the tail and live.
        (
            lines.iter().skip(skip).cloned().collect(),
            self.inner.live.subscribe(),
        )
    }
}

/// A `MakeWriter` that splits formatted output into lines for the buffer.
pub struct LineWriter {
    buffer: LogBuffer,
    pending: Vec<u8>,
}

impl std::io::Write for LineWriter {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.pending.extend_from_slice(bytes);
        while let Some(end) = self.pending.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = self.pending.drain(..=end).collect();
            self.buffer
                .push(String::from_utf8_lossy(&line[..line.len() - 1]).into_owned());
        }
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for LogBuffer {
    type Writer = LineWriter;

    fn make_writer(&'a self) -> Self::Writer {
        LineWriter {
            buffer: self.clone(),
            pending: Vec::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;

    #[test]
    fn keeps_the_last_lines_and_feeds_new_ones() {
        let buffer = LogBuffer::new(2);
        let mut writer = tracing_subscriber::fmt::MakeWriter::make_writer(&buffer);
        writer.write_all(b"one\ntwo\nthr").unwrap();
        writer.write_all(b"ee\n").unwrap();
        let (tail, mut live) = buffer.tail(10);
        assert_eq!(tail, ["two", "three"]);
        buffer.push("four".into());
        assert_eq!(live.try_recv().unwrap(), "four");
    }
}
