//! Bounded capture of a task's stdout and stderr: keep the first `cap` bytes,
//! count and drop the rest, so the executor's memory stays bounded however
//! much a task prints.

/// A capped byte buffer.
#[derive(Debug, Default)]
pub(crate) struct Capped {
    buf: Vec<u8>,
    cap: usize,
    dropped: u64,
}

impl Capped {
    pub(crate) fn new(cap: u64) -> Self {
        Self {
            buf: Vec::new(),
            cap: usize::try_from(cap).unwrap_or(usize::MAX),
            dropped: 0,
        }
    }

    /// Appends what fits and drops the rest.
    pub(crate) fn push(&mut self, data: &[u8]) {
        let room = self.cap.saturating_sub(self.buf.len());
        let take = room.min(data.len());
        self.buf.extend_from_slice(&data[..take]);
        self.dropped += (data.len() - take) as u64;
    }

    /// The kept bytes and whether anything was dropped.
    pub(crate) fn finish(self) -> (Vec<u8>, bool) {
        (self.buf, self.dropped > 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_the_first_bytes_and_flags_the_rest() {
        let mut c = Capped::new(5);
        c.push(b"abc");
        c.push(b"defgh");
        c.push(b"ij");
        assert_eq!(c.finish(), (b"abcde".to_vec(), true));
        let mut c = Capped::new(5);
        c.push(b"abcde");
        assert_eq!(c.finish(), (b"abcde".to_vec(), false));
    }
}
