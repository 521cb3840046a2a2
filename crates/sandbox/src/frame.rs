//! Length-prefixed frames between the executor and its launcher.
//!
//! A frame is a JSON header followed by raw binary blobs (file contents,
//! task output, compiled artifacts), so large byte payloads never go through
//! JSON escaping:
//!
//! ```text
//! u32 LE header length | header JSON | u32 LE blob count | (u64 LE length | bytes)*
//! ```

use std::io::{self, Read, Write};

use serde::{Serialize, de::DeserializeOwned};

/// Largest header accepted when reading a frame (the header is metadata only).
const MAX_HEADER: u32 = 16 << 20;
/// Largest single blob accepted when reading a frame.
const MAX_BLOB: u64 = 1 << 32;

/// Writes one frame.
pub(crate) fn write_frame<W: Write, H: Serialize>(
    w: &mut W,
    header: &H,
    blobs: &[&[u8]],
) -> io::Result<()> {
    let json = serde_json::to_vec(header).map_err(io::Error::other)?;
    let mut buf = Vec::with_capacity(json.len() + 16);
    let len = u32::try_from(json.len()).map_err(|_| io::Error::other("frame header too large"))?;
    buf.extend_from_slice(&len.to_le_bytes());
    buf.extend_from_slice(&json);
    let count = u32::try_from(blobs.len()).map_err(|_| io::Error::other("too many blobs"))?;
    buf.extend_from_slice(&count.to_le_bytes());
    w.write_all(&buf)?;
    for blob in blobs {
        w.write_all(&(blob.len() as u64).to_le_bytes())?;
        w.write_all(blob)?;
    }
    w.flush()
}

/// Reads one frame; `Ok(None)` at a clean end of stream before any byte.
pub(crate) fn read_frame<R: Read, H: DeserializeOwned>(
    r: &mut R,
) -> io::Result<Option<(H, Vec<Vec<u8>>)>> {
    let mut len = [0u8; 4];
    match r.read_exact(&mut len) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let len = u32::from_le_bytes(len);
    if len > MAX_HEADER {
        return Err(io::Error::other("frame header too large"));
    }
    let mut json = vec![0u8; len as usize];
    r.read_exact(&mut json)?;
    let header = serde_json::from_slice(&json).map_err(io::Error::other)?;
    let mut count = [0u8; 4];
    r.read_exact(&mut count)?;
    let count = u32::from_le_bytes(count);
    let mut blobs = Vec::with_capacity(count.min(1024) as usize);
    for _ in 0..count {
        let mut blen = [0u8; 8];
        r.read_exact(&mut blen)?;
        let blen = u64::from_le_bytes(blen);
        if blen > MAX_BLOB {
            return Err(io::Error::other("frame blob too large"));
        }
        let mut blob = Vec::new();
        r.by_ref().take(blen).read_to_end(&mut blob)?;
        if blob.len() as u64 != blen {
            return Err(io::Error::from(io::ErrorKind::UnexpectedEof));
        }
        blobs.push(blob);
    }
    Ok(Some((header, blobs)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_with_blobs() {
        let mut buf = Vec::new();
        write_frame(&mut buf, &vec!["a", "b"], &[b"hello", b""]).expect("write");
        write_frame(&mut buf, &42u32, &[]).expect("write");
        let mut r = &buf[..];
        let (h, blobs): (Vec<String>, _) = read_frame(&mut r).expect("read").expect("frame");
        assert_eq!(h, vec!["a", "b"]);
        assert_eq!(blobs, vec![b"hello".to_vec(), Vec::new()]);
        let (h, blobs): (u32, _) = read_frame(&mut r).expect("read").expect("frame");
        assert_eq!((h, blobs.len()), (42, 0));
        assert!(read_frame::<_, u32>(&mut r).expect("eof").is_none());
    }

    #[test]
    fn truncated_frame_is_an_error() {
        let mut buf = Vec::new();
        write_frame(&mut buf, &"x", &[b"0123456789"]).expect("write");
        buf.truncate(buf.len() - 3);
        assert!(read_frame::<_, String>(&mut &buf[..]).is_err());
    }
}
