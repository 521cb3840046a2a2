//! Symlink-proof reading of files the task controls.
//!
//! Every path is resolved with `openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS
//! | RESOLVE_NO_MAGICLINKS | RESOLVE_NO_XDEV)` from a directory descriptor, opened
//! `O_NOFOLLOW | O_NONBLOCK` (a FIFO cannot block us), checked to be a regular
//! file with `fstat`, and read up to a cap. A symlink planted by the task to a
//! file outside its work dir is refused, never followed: the escape behind
//! CVE-2024-28185 cannot happen here.

use std::fs::File;
use std::io::Read;
use std::os::fd::{AsFd, OwnedFd};

use nix::fcntl::{OFlag, OpenHow, ResolveFlag, openat2};
use nix::sys::stat::{Mode, SFlag, fstat};

/// Why a file was not read.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ReadError {
    /// Nothing at that path.
    #[error("missing")]
    Missing,
    /// The path is a symlink, crosses one, or leaves the directory.
    #[error("refused: the path is or crosses a symbolic link, or leaves its directory")]
    Symlink,
    /// Not a regular file.
    #[error("refused: not a regular file")]
    NotRegular,
    /// Another error.
    #[error("{0}")]
    Other(String),
}

fn resolve_flags() -> ResolveFlag {
    ResolveFlag::RESOLVE_BENEATH
        | ResolveFlag::RESOLVE_NO_SYMLINKS
        | ResolveFlag::RESOLVE_NO_MAGICLINKS
        | ResolveFlag::RESOLVE_NO_XDEV
}

/// Opens `rel` beneath `dir` without following any symlink.
pub(crate) fn open_beneath<D: AsFd>(dir: D, rel: &str, flags: OFlag) -> Result<OwnedFd, ReadError> {
    let how = OpenHow::new()
        .flags(flags | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC | OFlag::O_NOCTTY | OFlag::O_NONBLOCK)
        .mode(Mode::empty())
        .resolve(resolve_flags());
    match openat2(dir, rel, how) {
        Ok(fd) => Ok(fd),
        Err(nix::errno::Errno::ENOENT) => Err(ReadError::Missing),
        Err(nix::errno::Errno::ELOOP | nix::errno::Errno::EXDEV) => Err(ReadError::Symlink),
        Err(e) => Err(ReadError::Other(e.to_string())),
    }
}

/// Reads the regular file `rel` beneath `dir`, at most `cap` bytes.
/// Returns the bytes and whether the file was longer than `cap`.
pub fn read_capped<D: AsFd>(dir: D, rel: &str, cap: u64) -> Result<(Vec<u8>, bool), ReadError> {
    let fd = open_beneath(dir, rel, OFlag::O_RDONLY)?;
    let st = fstat(&fd).map_err(|e| ReadError::Other(e.to_string()))?;
    if SFlag::from_bits_truncate(st.st_mode & SFlag::S_IFMT.bits()) != SFlag::S_IFREG {
        return Err(ReadError::NotRegular);
    }
    let mut file = File::from(fd);
    let size = u64::try_from(st.st_size).unwrap_or(0).min(cap);
    let mut buf = Vec::with_capacity(usize::try_from(size).unwrap_or(0));
    (&mut file)
        .take(cap + 1)
        .read_to_end(&mut buf)
        .map_err(|e| ReadError::Other(e.to_string()))?;
    let truncated = buf.len() as u64 > cap;
    buf.truncate(usize::try_from(cap).unwrap_or(usize::MAX));
    Ok((buf, truncated))
}

/// Collects the regular files beneath directory `rel` (recursively), without
/// following symlinks; stops with an error past `cap` total bytes or 10,000
/// entries. Returns (relative path, contents) pairs.
pub(crate) fn collect_dir<D: AsFd>(
    dir: D,
    rel: &str,
    cap: u64,
) -> Result<Vec<(String, Vec<u8>)>, ReadError> {
    let root = open_beneath(dir, rel, OFlag::O_RDONLY | OFlag::O_DIRECTORY)?;
    let mut out = Vec::new();
    let mut total = 0u64;
    let mut stack = vec![(root, String::new())];
    while let Some((dfd, prefix)) = stack.pop() {
        let dup = dfd
            .try_clone()
            .map_err(|e| ReadError::Other(e.to_string()))?;
        let mut d = nix::dir::Dir::from_fd(dup).map_err(|e| ReadError::Other(e.to_string()))?;
        let mut names = Vec::new();
        for entry in d.iter() {
            let entry = entry.map_err(|e| ReadError::Other(e.to_string()))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if name != "." && name != ".." {
                names.push(name);
            }
        }
        for name in names {
            if out.len() + stack.len() > 10_000 {
                return Err(ReadError::Other("too many entries".into()));
            }
            let path = if prefix.is_empty() {
                name.clone()
            } else {
                format!("{prefix}/{name}")
            };
            match read_capped(&dfd, &name, cap - total) {
                Ok((data, false)) => {
                    total += data.len() as u64;
                    out.push((path, data));
                }
                Ok((_, true)) => {
                    return Err(ReadError::Other(format!("{path}: over the size cap")));
                }
                Err(ReadError::NotRegular) => {
                    let sub = open_beneath(&dfd, &name, OFlag::O_RDONLY | OFlag::O_DIRECTORY)?;
                    stack.push((sub, path));
                }
                Err(e) => return Err(e),
            }
        }
    }
    Ok(out)
}

/// Opens a directory (trusted path, ours) for use as the base of the reads.
pub(crate) fn open_dir(path: &str) -> Result<OwnedFd, ReadError> {
    let fd = nix::fcntl::open(
        path,
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| ReadError::Other(format!("{path}: {e}")))?;
    Ok(fd)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    fn dir() -> (tempfile::TempDir, OwnedFd) {
        let d = tempfile::tempdir().expect("tempdir");
        let fd = open_dir(d.path().to_str().expect("utf8")).expect("open");
        (d, fd)
    }

    #[test]
    fn reads_a_regular_file_with_cap() {
        let (d, fd) = dir();
        std::fs::write(d.path().join("out.json"), b"0123456789").expect("write");
        assert_eq!(
            read_capped(&fd, "out.json", 100).expect("read"),
            (b"0123456789".to_vec(), false)
        );
        assert_eq!(
            read_capped(&fd, "out.json", 4).expect("read"),
            (b"0123".to_vec(), true)
        );
        assert_eq!(read_capped(&fd, "nope", 4), Err(ReadError::Missing));
    }

    #[test]
    fn refuses_symlinks_to_host_files() {
        let (d, fd) = dir();
        let secret = tempfile::NamedTempFile::new().expect("tmp");
        std::fs::write(secret.path(), b"host secret").expect("write");
        symlink(secret.path(), d.path().join("out.json")).expect("symlink");
        assert_eq!(read_capped(&fd, "out.json", 100), Err(ReadError::Symlink));
        std::fs::create_dir(d.path().join("sub")).expect("mkdir");
        symlink("/etc", d.path().join("sub/link")).expect("symlink");
        assert_eq!(
            read_capped(&fd, "sub/link/hostname", 100),
            Err(ReadError::Symlink)
        );
        assert_eq!(read_capped(&fd, "../x", 100), Err(ReadError::Symlink));
    }

    #[test]
    fn refuses_fifos_without_blocking() {
        let (d, fd) = dir();
        nix::unistd::mkfifo(&d.path().join("out.json"), Mode::from_bits_truncate(0o644))
            .expect("fifo");
        assert_eq!(
            read_capped(&fd, "out.json", 100),
            Err(ReadError::NotRegular)
        );
    }

    #[test]
    fn collects_nested_files_but_not_symlinks() {
        let (d, fd) = dir();
        std::fs::create_dir_all(d.path().join("classes/pkg")).expect("mkdir");
        std::fs::write(d.path().join("classes/Main.class"), b"A").expect("write");
        std::fs::write(d.path().join("classes/pkg/B.class"), b"BB").expect("write");
        let mut got = collect_dir(&fd, "classes", 1000).expect("collect");
        got.sort();
        assert_eq!(
            got,
            vec![
                ("Main.class".into(), b"A".to_vec()),
                ("pkg/B.class".into(), b"BB".to_vec())
            ]
        );
        symlink("/etc/passwd", d.path().join("classes/evil")).expect("symlink");
        assert_eq!(collect_dir(&fd, "classes", 1000), Err(ReadError::Symlink));
    }
}
