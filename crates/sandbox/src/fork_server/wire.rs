//! The wire format between the executor and a fork server's children:
//! the spec frame, the child's messages (hello, `m` with the work dir and
//! start stamp, `E` with a setup error, its last words `x<code>`), the
//! status its server reports, and the receiving of them.

use std::io::IoSliceMut;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use nix::sys::socket::{ControlMessageOwned, MsgFlags, recvmsg};
use serde::Serialize;

use crate::closer::dispose;
use crate::spawn::{SandboxError, nix_io, poll_tags};
use crate::spec::{ExitStatus, RlimitSpec};

/// What the child needs of the request (the `spec frame` of the server's
/// protocol).
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct ChildSpec<'a> {
    pub(super) uid: u32,
    pub(super) gid: u32,
    pub(super) argv: &'a [String],
    pub(super) env: &'a [(String, String)],
    pub(super) work_files: Vec<crate::spec::FileMeta>,
    pub(super) disk_bytes: u64,
    pub(super) disk_inodes: u64,
    pub(super) stdin_path: Option<&'a str>,
    pub(super) rlimits: RlimitSpec,
}

/// For each of `fds`, whether it is readable within `timeout`.
pub(super) fn wait_readable(
    fds: &[std::os::fd::BorrowedFd<'_>],
    timeout: Duration,
) -> Result<Vec<bool>, SandboxError> {
    let watched: Vec<(i32, bool, std::os::fd::BorrowedFd<'_>)> =
        (0i32..).zip(fds).map(|(i, fd)| (i, true, *fd)).collect();
    let ready = poll_tags(&watched, None, timeout)?;
    Ok((0i32..)
        .take(fds.len())
        .map(|i| ready.contains(&i))
        .collect())
}

/// The child's last words: `x` and its exit code in decimal, exactly.
pub(super) fn parse_last_words(bytes: &[u8]) -> Option<ExitStatus> {
    let digits = bytes.strip_prefix(b"x")?;
    if digits.is_empty() || digits.len() > 3 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let code: i32 = std::str::from_utf8(digits).ok()?.parse().ok()?;
    (code <= 255).then_some(ExitStatus::Code(code))
}

/// The child's `m`: the isolation is complete and the handler starts.
/// Returns its monotonic stamp and the bytes that followed it in the same
/// read (the start of its last words, for a task that ended at once).
pub(super) fn parse_started(bytes: &[u8]) -> Option<(u64, &[u8])> {
    let (stamp, rest) = bytes.strip_prefix(b"m")?.split_first_chunk::<8>()?;
    Some((u64::from_le_bytes(*stamp), rest))
}

/// The exit status the server writes on the child's status pipe: `e<code>`
/// or `s<signal>`.
pub(super) fn parse_status(bytes: &[u8]) -> Option<ExitStatus> {
    let text = std::str::from_utf8(bytes).ok()?;
    let (kind, num) = text.split_at_checked(1)?;
    let n: i32 = num.parse().ok()?;
    match kind {
        "e" => Some(ExitStatus::Code(n)),
        "s" => Some(ExitStatus::Signal(n)),
        _ => None,
    }
}

/// Receives one message with its credentials, waiting at most `timeout`
/// (and giving up early when the status pipe says the child has ended).
pub(super) fn recv_with_creds(
    task: &UnixStream,
    status_r: &OwnedFd,
    timeout: Duration,
) -> Result<(Vec<u8>, Option<i32>), SandboxError> {
    let ready = wait_readable(&[task.as_fd(), status_r.as_fd()], timeout)?;
    if !ready[0] {
        return Err(SandboxError::Protocol(if ready[1] {
            "the fork-server child ended before its hello".into()
        } else {
            "no hello from the fork-server child in time".into()
        }));
    }
    let (bytes, pid, _fds) = receive(task, MsgFlags::empty()).map_err(nix_io("recvmsg"))?;
    Ok((bytes, pid))
}

/// One message of the task socket: its bytes, the sender's pid (with
/// `SO_PASSCRED`) and the descriptors it carried.
pub(super) fn receive(
    task: &UnixStream,
    flags: MsgFlags,
) -> nix::Result<(Vec<u8>, Option<i32>, Vec<OwnedFd>)> {
    let mut buf = vec![0u8; 65536];
    let mut iov = [IoSliceMut::new(&mut buf)];
    // Room for the most descriptors one message can carry (`SCM_MAX_FD`):
    // the kernel never drops (and so closes, on this thread) any of them
    // for lack of room, and each arrives close-on-exec.
    let mut space = nix::cmsg_space!(libc::ucred, [RawFd; 253]);
    let msg = recvmsg::<()>(
        task.as_raw_fd(),
        &mut iov,
        Some(&mut space),
        MsgFlags::MSG_CMSG_CLOEXEC | flags,
    )?;
    let mut pid = None;
    let mut fds = Vec::new();
    for c in msg.cmsgs()? {
        match c {
            ControlMessageOwned::ScmCredentials(cred) => pid = Some(cred.pid()),
            ControlMessageOwned::ScmRights(raw_fds) => {
                for raw in raw_fds {
                    // SAFETY: the kernel just installed `raw` in our table
                    // for this message; nothing else owns it.
                    fds.push(unsafe { OwnedFd::from_raw_fd(raw) });
                }
            }
            _ => {}
        }
    }
    let n = msg.bytes;
    Ok((buf[..n].to_vec(), pid, fds))
}

/// One nonblocking receive: `Ok(None)` at end of stream; of the
/// descriptors a message carried, the first is kept (the others go to the
/// closer thread). Only while our own code holds the child's end.
pub(super) fn recv_message(task: &UnixStream) -> nix::Result<Option<(Vec<u8>, Option<OwnedFd>)>> {
    let (bytes, _pid, fds) = receive(task, MsgFlags::MSG_DONTWAIT)?;
    if bytes.is_empty() && fds.is_empty() {
        return Ok(None);
    }
    let mut fds = fds.into_iter();
    let first = fds.next();
    let rest: Vec<OwnedFd> = fds.collect();
    if !rest.is_empty() {
        dispose(rest);
    }
    Ok(Some((bytes, first)))
}

/// What the head of a started task's channel holds.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Peeked {
    /// Well-formed last words (after `before`, the bytes read with `m`).
    Words(ExitStatus),
    /// Nothing yet.
    Nothing,
    /// Anything else, or the end of the stream.
    Other,
}

/// Looks at the head of the channel once the task's code holds its other
/// end, without taking anything off it: a peek with no room for control
/// messages installs no descriptor in our table and closes none (the
/// queue keeps its own references), so nothing the task queued is ever
/// closed, or waited for, on the thread that enforces its limits. The
/// queue goes with the socket, on the closer thread.
pub(super) fn peek_last_words(task: &UnixStream, before: &[u8]) -> Peeked {
    let mut buf = [0u8; 33];
    let n = loop {
        match nix::sys::socket::recv(
            task.as_raw_fd(),
            &mut buf,
            MsgFlags::MSG_PEEK | MsgFlags::MSG_DONTWAIT,
        ) {
            Ok(n) => break n,
            Err(nix::errno::Errno::EINTR) => continue,
            Err(nix::errno::Errno::EAGAIN) => return Peeked::Nothing,
            Err(_) => return Peeked::Other,
        }
    };
    if n == 0 {
        return Peeked::Other;
    }
    let words: Vec<u8> = before.iter().chain(&buf[..n]).copied().collect();
    match parse_last_words(&words) {
        Some(status) => Peeked::Words(status),
        None => Peeked::Other,
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;

    #[test]
    fn last_words_are_x_and_an_exit_code_exactly() {
        assert_eq!(parse_last_words(b"x0"), Some(ExitStatus::Code(0)));
        assert_eq!(parse_last_words(b"x255"), Some(ExitStatus::Code(255)));
        for junk in [
            &b"x"[..],
            b"x256",
            b"x0000",
            b"x-1",
            b"x 1",
            b"y1",
            b"",
            b"x1\n",
        ] {
            assert_eq!(parse_last_words(junk), None, "{junk:?}");
        }
    }

    #[test]
    fn statuses_are_a_code_or_a_signal() {
        assert_eq!(parse_status(b"e3"), Some(ExitStatus::Code(3)));
        assert_eq!(parse_status(b"s9"), Some(ExitStatus::Signal(9)));
        for junk in [&b""[..], b"e", b"q1", b"e1x", b"\xffe1"] {
            assert_eq!(parse_status(junk), None, "{junk:?}");
        }
    }

    #[test]
    fn started_carries_its_stamp_and_what_followed() {
        let mut msg = b"m".to_vec();
        msg.extend_from_slice(&42u64.to_le_bytes());
        assert_eq!(parse_started(&msg), Some((42, &b""[..])));
        msg.extend_from_slice(b"x7");
        assert_eq!(parse_started(&msg), Some((42, &b"x7"[..])));
        assert_eq!(parse_started(&msg[..8]), None);
        assert_eq!(parse_started(b"E failed"), None);
    }

    #[test]
    fn the_child_spec_has_the_keys_the_server_reads() {
        let argv = vec!["python3".to_string()];
        let env = vec![("PATH".to_string(), "/bin".to_string())];
        let spec = ChildSpec {
            uid: 62000,
            gid: 62000,
            argv: &argv,
            env: &env,
            work_files: Vec::new(),
            disk_bytes: 1 << 20,
            disk_inodes: 1024,
            stdin_path: Some("/task/in"),
            rlimits: RlimitSpec {
                nofile: 64,
                fsize: 1 << 20,
                cpu_seconds: None,
                stack: 8 << 20,
            },
        };
        let json = serde_json::to_value(&spec).expect("serializes");
        for key in [
            "uid",
            "gid",
            "argv",
            "env",
            "workFiles",
            "diskBytes",
            "diskInodes",
            "stdinPath",
            "rlimits",
        ] {
            assert!(json.get(key).is_some(), "{key} missing in {json}");
        }
        assert_eq!(json["env"][0][0], "PATH");
    }

    #[test]
    fn a_peek_reads_last_words_without_taking_them() {
        let (ours, mut theirs) = UnixStream::pair().expect("socketpair");
        assert_eq!(peek_last_words(&ours, b""), Peeked::Nothing);
        theirs.write_all(b"x1").expect("write");
        assert_eq!(
            peek_last_words(&ours, b""),
            Peeked::Words(ExitStatus::Code(1))
        );
        // Still there: a peek takes nothing off the stream.
        assert_eq!(
            peek_last_words(&ours, b""),
            Peeked::Words(ExitStatus::Code(1))
        );
    }

    #[test]
    fn last_words_split_across_reads_are_joined() {
        let (ours, mut theirs) = UnixStream::pair().expect("socketpair");
        theirs.write_all(b"2").expect("write");
        assert_eq!(
            peek_last_words(&ours, b"x4"),
            Peeked::Words(ExitStatus::Code(42))
        );
    }

    #[test]
    fn junk_or_the_end_of_the_channel_is_other() {
        let (ours, mut theirs) = UnixStream::pair().expect("socketpair");
        theirs.write_all(b"hello").expect("write");
        assert_eq!(peek_last_words(&ours, b""), Peeked::Other);
        let (ours, theirs) = UnixStream::pair().expect("socketpair");
        drop(theirs);
        assert_eq!(peek_last_words(&ours, b""), Peeked::Other);
    }

    #[test]
    fn a_message_keeps_its_first_descriptor() {
        use nix::sys::socket::{ControlMessage, sendmsg};
        let (ours, theirs) = UnixStream::pair().expect("socketpair");
        ours.set_nonblocking(true).expect("nonblocking");
        assert!(matches!(
            recv_message(&ours),
            Err(nix::errno::Errno::EAGAIN)
        ));
        let (r, w) = nix::unistd::pipe().expect("pipe");
        let fds = [r.as_raw_fd(), w.as_raw_fd()];
        sendmsg::<()>(
            theirs.as_raw_fd(),
            &[std::io::IoSlice::new(b"mstamp")],
            &[ControlMessage::ScmRights(&fds)],
            MsgFlags::empty(),
            None,
        )
        .expect("sendmsg");
        let (bytes, fd) = recv_message(&ours).expect("recv").expect("a message");
        assert_eq!(bytes, b"mstamp");
        assert!(fd.is_some());
        drop(theirs);
        assert!(matches!(recv_message(&ours), Ok(None)));
    }

    #[test]
    fn hello_carries_the_senders_pid() {
        use nix::sys::socket::{setsockopt, sockopt};
        let (ours, mut theirs) = UnixStream::pair().expect("socketpair");
        setsockopt(&ours, sockopt::PassCred, &true).expect("SO_PASSCRED");
        let (status_r, status_w) = nix::unistd::pipe().expect("pipe");
        theirs.write_all(b"h").expect("write");
        let (msg, pid) = recv_with_creds(&ours, &status_r, Duration::from_secs(5)).expect("hello");
        assert_eq!(msg, b"h");
        assert_eq!(pid, i32::try_from(std::process::id()).ok());
        drop(status_w);
    }

    #[test]
    fn no_hello_from_a_child_that_ended() {
        let (ours, _theirs) = UnixStream::pair().expect("socketpair");
        let (status_r, status_w) = nix::unistd::pipe().expect("pipe");
        drop(status_w);
        let err = recv_with_creds(&ours, &status_r, Duration::from_secs(5)).expect_err("no hello");
        assert!(err.to_string().contains("ended before its hello"), "{err}");
    }
}
