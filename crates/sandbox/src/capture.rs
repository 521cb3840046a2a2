//! Bounded capture of a task's stdout and stderr. A stream that stays within
//! its cap is kept whole. One that goes past it is over: the watch loop stops
//! the task at once, and what is kept is the first bytes, a marker saying
//! how many bytes were left out, and the last bytes before the stop (where a
//! task's errors are), all within the cap. The executor's memory stays
//! bounded, and so does the work it does for a task that prints forever.

use std::collections::VecDeque;
use std::os::fd::OwnedFd;

/// The most bytes kept from the end of a stream that went past its cap.
pub(crate) const TAIL_BYTES: usize = 64 << 10;

/// Which of the task's output streams.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutputStream {
    /// Standard output.
    Stdout,
    /// Standard error.
    Stderr,
}

impl OutputStream {
    /// "stdout" or "stderr".
    pub fn as_str(self) -> &'static str {
        match self {
            OutputStream::Stdout => "stdout",
            OutputStream::Stderr => "stderr",
        }
    }
}

/// A capped capture of one stream.
#[derive(Debug, Default)]
pub(crate) struct Capped {
    /// The first `cap` bytes.
    head: Vec<u8>,
    cap: usize,
    /// The last bytes past the head, at most `tail_len`.
    past: VecDeque<u8>,
    tail_len: usize,
    /// Every byte seen.
    total: u64,
}

impl Capped {
    pub(crate) fn new(cap: u64) -> Self {
        let cap = usize::try_from(cap).unwrap_or(usize::MAX);
        Self {
            head: Vec::new(),
            cap,
            past: VecDeque::new(),
            tail_len: TAIL_BYTES.min(cap / 2),
            total: 0,
        }
    }

    /// Appends `data`: to the head while it has room, the rest to the tail.
    pub(crate) fn push(&mut self, data: &[u8]) {
        self.total += data.len() as u64;
        let room = self.cap.saturating_sub(self.head.len());
        let take = room.min(data.len());
        self.head.extend_from_slice(&data[..take]);
        let rest = &data[take..];
        let keep = &rest[rest.len().saturating_sub(self.tail_len)..];
        let excess = (self.past.len() + keep.len()).saturating_sub(self.tail_len);
        self.past.drain(..excess);
        self.past.extend(keep);
    }

    /// More bytes than the cap were seen.
    pub(crate) fn is_over(&self) -> bool {
        self.total > self.cap as u64
    }

    /// The kept bytes and whether the stream went past its cap. Past it:
    /// the first bytes, a marker with the count of bytes left out, and the
    /// last [`TAIL_BYTES`] (at most half the cap), together within the cap.
    pub(crate) fn finish(self) -> (Vec<u8>, bool) {
        if !self.is_over() {
            return (self.head, false);
        }
        // The marker's length with the largest count it can show.
        let longest = marker(self.total).len();
        let Some(head_len) = self
            .cap
            .checked_sub(self.tail_len + longest)
            .filter(|&h| h > 0 && self.tail_len > 0)
        else {
            // A cap too small for a marker: the first bytes only.
            return (self.head, true);
        };
        let omitted = self.total - (head_len + self.tail_len) as u64;
        // The last `tail_len` bytes of the stream: the end of the head,
        // then every byte past it. Set aside, then the head is cut in
        // place (no copy of the head, which can be the whole cap).
        let from_head = self.tail_len - self.past.len().min(self.tail_len);
        let mut tail = Vec::with_capacity(self.tail_len);
        tail.extend_from_slice(&self.head[self.head.len() - from_head..]);
        tail.extend(
            self.past
                .iter()
                .skip(self.past.len() - (self.tail_len - from_head)),
        );
        let mut kept = self.head;
        kept.truncate(head_len);
        kept.extend_from_slice(marker(omitted).as_bytes());
        kept.extend_from_slice(&tail);
        (kept, true)
    }
}

/// What stands for the bytes left out of a stream that went past its cap.
fn marker(omitted: u64) -> String {
    format!("\n[... {omitted} bytes omitted ...]\n")
}

/// Reads what is available from a nonblocking stream into `capped`; false
/// at EOF. Stops early when the stream goes past its cap (the task is to be
/// stopped before it writes more); once it is past, reads until the pipe is
/// empty, into the tail.
pub(crate) fn drain_capped(fd: &OwnedFd, capped: &mut Capped) -> bool {
    let was_over = capped.is_over();
    crate::spawn::drain_while(fd, |d| {
        capped.push(d);
        was_over || !capped.is_over()
    })
}

/// The first of the two streams that went past its cap.
pub(crate) fn over_cap(stdout: &Capped, stderr: &Capped) -> Option<OutputStream> {
    if stdout.is_over() {
        Some(OutputStream::Stdout)
    } else if stderr.is_over() {
        Some(OutputStream::Stderr)
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn capture(cap: u64, chunks: &[&[u8]]) -> (Vec<u8>, bool) {
        let mut c = Capped::new(cap);
        for d in chunks {
            c.push(d);
        }
        c.finish()
    }

    /// The head's length and the omitted count for a stream of `total`
    /// bytes past `cap`, with a tail of `tail` bytes.
    fn expected(cap: usize, tail: usize, total: u64) -> (usize, u64) {
        let head = cap - tail - marker(total).len();
        (head, total - (head + tail) as u64)
    }

    fn data(n: u32) -> Vec<u8> {
        (0..n).map(|i| (i % 251) as u8).collect()
    }

    #[test]
    fn keeps_a_stream_within_its_cap_whole() {
        assert_eq!(capture(5, &[b"abc", b"de"]), (b"abcde".to_vec(), false));
        assert_eq!(capture(5, &[]), (Vec::new(), false));
    }

    #[test]
    fn keeps_head_marker_and_tail_within_the_cap() {
        let data = data(300);
        let (kept, over) = capture(200, &[&data[..150], &data[150..]]);
        assert!(over);
        let (head, omitted) = expected(200, 100, 300);
        let mut want = data[..head].to_vec();
        want.extend_from_slice(marker(omitted).as_bytes());
        want.extend_from_slice(&data[200..]);
        assert_eq!(kept, want);
        assert!(kept.len() <= 200, "{}", kept.len());
    }

    #[test]
    fn the_tail_comes_from_the_head_when_the_stream_just_went_past() {
        let data = data(201);
        let (kept, over) = capture(200, &[&data]);
        assert!(over);
        let (head, omitted) = expected(200, 100, 201);
        let mut want = data[..head].to_vec();
        want.extend_from_slice(marker(omitted).as_bytes());
        want.extend_from_slice(&data[101..]);
        assert_eq!(kept, want);
    }

    #[test]
    fn keeps_the_last_64_kib_of_a_long_stream() {
        let cap = 1 << 20;
        let mut c = Capped::new(cap as u64);
        for i in 0..40u8 {
            c.push(&[i; 65536]);
        }
        let (kept, over) = c.finish();
        assert!(over);
        let (head, omitted) = expected(cap, TAIL_BYTES, 40 * 65536);
        assert_eq!(kept.len(), head + marker(omitted).len() + TAIL_BYTES);
        assert!(kept.len() <= cap);
        assert!(kept.starts_with(&[0; 65536]));
        assert!(kept.ends_with(&[39; TAIL_BYTES]));
        assert_eq!(
            &kept[head..head + marker(omitted).len()],
            marker(omitted).as_bytes()
        );
    }

    #[test]
    fn a_cap_too_small_for_a_marker_keeps_the_first_bytes() {
        assert_eq!(capture(5, &[b"abcdefgh"]), (b"abcde".to_vec(), true));
    }
}
