"""taskexec fork server for Python handler tasks.

Usage (started by the taskexec launcher inside a sandbox of its own, as root
of a user namespace of its own, whose ids are a block of unprivileged host
uids, with only the capabilities listed in seccomp::FORK_SERVER_CAPS, under
the fork-server seccomp profile, no_new_privs set; those capabilities reach
only the namespaces the server's children create, none of the host's):

    python3 -E -s -B -u python_zygote.py WRAPPER CHILD_FILTERS FINAL_FILTERS [MODULE...]

Descriptor 1 is the control socket (SOCK_SEQPACKET) to the executor. The
server imports the handler wrapper and the MODULEs (the tasks'
`definition.preload`, found on the interpreter's own paths only) once, says
b"R", then serves requests:

  request  (executor -> server): a JSON object {"join": N} with 4 + N
           descriptors: the task channel (a stream socket), stdout, stderr,
           status pipe, then N cgroup v1 "tasks" files the child writes b"0"
           into to move itself into its cgroup (N is 0 on cgroup v2).
  per request the server forks a child; when the child ends it writes
  b"e<code>" or b"s<signal>" to that request's status pipe and closes it.

The child talks to the executor on its task channel only:
  b"h"               hello, once in our cgroup (moved there by ourselves, or
                     by the executor, which reads our pid from the socket's
                     credentials)
  <- spec frame      what taskexec's frame.rs writes: u32 LE header length,
                     JSON header, u32 LE blob count, (u64 LE length, bytes)*
  b"m" + u64 mono ns the isolation is complete and the handler starts, sent
                     with the work dir's descriptor (for the read-back)
  b"E" + message     setup failed (an environment problem, not the task's)

Before it touches the task's input the child enters the task's isolation.
While spare: new mount, network, IPC, UTS and cgroup namespaces (the host
name comes with the UTS namespace); a fresh tmpfs for /task and /tmp;
loopback; the capability bounding set emptied; no_new_privs; the task
seccomp filters but for their mount rule. On hand-over: the tmpfs sized,
the task's files; stdio; a new session; rlimits; no supplementary groups
and the task's own uid/gid (which clears every capability); the mount
rule. See
docs/security.md for what a task shares with the pre-fork image.
"""

import array
import atexit
import ctypes
import fcntl
import gc
import json
import os
import resource
import selectors
import signal
import socket
import struct
import sys
import threading
import time

CLONE_NEWNS = 0x00020000
CLONE_NEWCGROUP = 0x02000000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWNET = 0x40000000
MS_NOSUID = 2
MS_NODEV = 4
MS_BIND = 4096
MS_REMOUNT = 32
MS_REC = 16384
MS_PRIVATE = 1 << 18
PR_CAPBSET_DROP = 24
PR_SET_NO_NEW_PRIVS = 38
PR_SET_SECCOMP = 22
SECCOMP_MODE_FILTER = 2
SIOCSIFFLAGS = 0x8914
IFF_UP = 0x1
IFF_RUNNING = 0x40

WORK = "/task"
# Most cgroup "tasks" files a request carries (one per v1 hierarchy).
MAX_JOIN = 8
_LAST_WORDS = None
SCRATCH = "/tmp"

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
_libc.unshare.argtypes = [ctypes.c_int]
_libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p, ctypes.c_ulong, ctypes.c_ulong]


class SetupError(Exception):
    pass


def _check(rc, what):
    if rc != 0:
        err = ctypes.get_errno()
        raise SetupError("%s: %s" % (what, os.strerror(err)))


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def _load_filters(path):
    """Reads the task filters written by seccomp::to_bytes into buffers
    kept for the whole life of the server (children load them as is)."""
    with open(path, "rb") as f:
        data = f.read()
    (count,) = struct.unpack_from("<I", data, 0)
    pos = 4
    progs = []
    for _ in range(count):
        (n,) = struct.unpack_from("<I", data, pos)
        pos += 4
        buf = ctypes.create_string_buffer(data[pos : pos + 8 * n], 8 * n)
        pos += 8 * n
        progs.append((buf, _SockFprog(n, ctypes.cast(buf, ctypes.c_void_p))))
    return progs


def _recv_fds(sock, maxfds):
    """One request and its descriptors, each close-on-exec as it arrives
    (socket.recv_fds ignores its flags argument on Python 3.11)."""
    fds = array.array("i")
    msg, ancdata, _flags, _addr = sock.recvmsg(
        4096, socket.CMSG_SPACE(maxfds * fds.itemsize), socket.MSG_CMSG_CLOEXEC
    )
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(data[: len(data) - len(data) % fds.itemsize])
    return msg, list(fds)


def _recv_exact(sock, n):
    chunks = []
    while n > 0:
        chunk = sock.recv(min(n, 1 << 20))
        if not chunk:
            raise SetupError("the executor closed the task channel")
        chunks.append(chunk)
        n -= len(chunk)
    return b"".join(chunks)


def _read_frame(sock):
    (hlen,) = struct.unpack("<I", _recv_exact(sock, 4))
    header = json.loads(_recv_exact(sock, hlen))
    (count,) = struct.unpack("<I", _recv_exact(sock, 4))
    blobs = []
    for _ in range(count):
        (blen,) = struct.unpack("<Q", _recv_exact(sock, 8))
        blobs.append(_recv_exact(sock, blen))
    return header, blobs


def _safe_relative(path):
    parts = path.split("/")
    if not path or path.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise SetupError("unsafe path in the spec: %r" % path)
    return parts


def _write_files(files, blobs, uid, gid):
    """Writes the task's files as root (the server has no DAC override),
    then hands every directory to the task's uid."""
    base = WORK
    dirs = [base]
    for meta, content in zip(files, blobs):
        parts = _safe_relative(meta["path"])
        d = base
        for part in parts[:-1]:
            d = d + "/" + part
            try:
                os.mkdir(d, 0o755)
                dirs.append(d)
            except FileExistsError:
                pass
        path = base + "/" + "/".join(parts)
        mode = 0o755 if meta.get("executable") else 0o644
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
        try:
            view = memoryview(content)
            while view:
                view = view[os.write(fd, view) :]
            os.fchown(fd, uid, gid)
        finally:
            os.close(fd)
    for d in reversed(dirs):
        os.chown(d, uid, gid)


def _prepare():
    """The part of the isolation that needs no task, done while the child
    waits as a spare (already in its own cgroup): new namespaces, a fresh
    tmpfs bound at /task and /tmp, loopback up. The host name is the
    server's, copied with the UTS namespace. Returns the work dir's
    descriptor."""
    _check(
        _libc.unshare(CLONE_NEWNS | CLONE_NEWNET | CLONE_NEWIPC | CLONE_NEWUTS | CLONE_NEWCGROUP),
        "unshare",
    )
    _check(_libc.mount(None, b"/", None, MS_REC | MS_PRIVATE, None), "make mounts private")
    _check(
        _libc.mount(b"tmpfs", SCRATCH.encode(), b"tmpfs", MS_NOSUID | MS_NODEV, b"size=1m,nr_inodes=64,mode=0755"),
        "tmpfs",
    )
    os.mkdir(SCRATCH + "/work", 0o755)
    os.mkdir(SCRATCH + "/tmp", 0o755)
    os.chmod(SCRATCH + "/tmp", 0o1777)
    _check(_libc.mount((SCRATCH + "/work").encode(), WORK.encode(), None, MS_BIND, None), "bind /task")
    _check(_libc.mount((SCRATCH + "/tmp").encode(), SCRATCH.encode(), None, MS_BIND, None), "bind /tmp")
    work_fd = os.open(WORK, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    _rehearse()
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        fcntl.ioctl(probe.fileno(), SIOCSIFFLAGS, struct.pack("16sh22x", b"lo", IFF_UP | IFF_RUNNING))
    finally:
        probe.close()
    # An empty bounding set: no capability can come back, not even through
    # an exec. The effective ones the rest of the setup needs stay until
    # the uid change.
    for cap in range(64):
        if _libc.prctl(PR_CAPBSET_DROP, cap, None, 0, 0) != 0:
            break
    # The task filter but for mount (still needed to size the tmpfs): from
    # here on no namespace or mount change but that one is possible.
    _check(_libc.prctl(PR_SET_NO_NEW_PRIVS, 1, None, 0, 0), "no_new_privs")
    for _buf, prog in FILTERS:
        _check(_libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.addressof(prog), 0, 0), "seccomp")
    return work_fd


def _rehearse():
    """Runs, while spare, what every handler task runs (load a module
    from a file, call it, JSON in and out) on a throwaway file of our own:
    the pages of the server's image that path writes to (copy-on-write
    since the fork) are then copied now, not on the task's path. Nothing
    of it stays: the module is in no registry, the file is gone."""
    path = WORK + "/.rehearsal.py"
    with open(path, "w", encoding="utf-8") as f:
        f.write("def main(x):\n    return {'y': [x, 1.5, 'z']}\n")
    try:
        spec = importlib.util.spec_from_file_location("taskexec_rehearsal", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        json.dumps(module.main(json.loads('{"a": [1, 2, 3]}')), ensure_ascii=False)
    finally:
        os.unlink(path)


def _isolate(spec, blobs, uid, gid, out_fd, err_fd):
    """The rest of the isolation, once the task is known: its disk size,
    files, stdio, rlimits, ids, seccomp and environment."""
    data = "size=%d,nr_inodes=%d" % (spec["diskBytes"], spec["diskInodes"])
    _check(_libc.mount(None, WORK.encode(), None, MS_REMOUNT | MS_NOSUID | MS_NODEV, data.encode()), "size the tmpfs")
    _write_files(spec["workFiles"], blobs, uid, gid)

    stdin = spec.get("stdinPath")
    in_fd = os.open(stdin, os.O_RDONLY | os.O_NOFOLLOW) if stdin else os.open("/dev/null", os.O_RDONLY)
    os.dup2(in_fd, 0)
    os.close(in_fd)
    os.dup2(out_fd, 1)
    os.dup2(err_fd, 2)
    os.close(out_fd)
    os.close(err_fd)
    os.setsid()

    lim = spec["rlimits"]
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    resource.setrlimit(resource.RLIMIT_NOFILE, (lim["nofile"], lim["nofile"]))
    resource.setrlimit(resource.RLIMIT_FSIZE, (lim["fsize"], lim["fsize"]))
    resource.setrlimit(resource.RLIMIT_STACK, (lim["stack"], lim["stack"]))
    if lim.get("cpu_seconds") is not None:
        resource.setrlimit(resource.RLIMIT_CPU, (lim["cpu_seconds"], lim["cpu_seconds"] + 1))

    os.setgroups([])
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)
    os.chdir(WORK)
    os.umask(0o022)
    # no_new_privs is set already (in _prepare, before the first filter).
    for _buf, prog in FINAL_FILTERS:
        _check(_libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.addressof(prog), 0, 0), "seccomp")

    os.environ.clear()
    os.environ.update({k: v for k, v in spec["env"]})


def _child(fds, join_fds):
    """Runs in the forked child; returns the exit code of the task."""
    task_fd, out_fd, err_fd = fds
    task = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM, fileno=task_fd)
    try:
        # Into our cgroup first: "0" moves the calling thread, which is the
        # whole of this single-threaded child, without the global lock a
        # move by pid takes.
        for fd in join_fds:
            try:
                os.write(fd, b"0")
            finally:
                os.close(fd)
        task.sendall(b"h")
        # "p": we are in our own cgroup; build what needs no task.
        if _recv_exact(task, 1) != b"p":
            raise SetupError("expected the executor's prepare")
        work_fd = _prepare()
        spec, blobs = _read_frame(task)
        uid, gid = spec["uid"], spec["gid"]
        if uid == 0 or gid == 0:
            raise SetupError("tasks never run as root")
        argv = spec["argv"]
        if WRAPPER not in argv:
            raise SetupError("the fork server runs %s only" % WRAPPER)
        sys.argv = argv[argv.index(WRAPPER) :]
        _isolate(spec, blobs, uid, gid, out_fd, err_fd)
        del spec, blobs
        socket.send_fds(task, [b"m" + struct.pack("<Q", time.monotonic_ns())], [work_fd])
        os.close(work_fd)
        # Kept (close-on-exec) for the last words, "x<code>", in _exit_fast.
        # The task's code can write on it too; the executor then understands
        # nothing but a well-formed "x<code>", which is no more than the task
        # could say by exiting.
        global _LAST_WORDS
        _LAST_WORDS = task
    except BaseException as e:  # noqa: BLE001 - any failure here is ours
        try:
            import traceback

            where = traceback.extract_tb(e.__traceback__)[-1]
            text = "%s: %s (at %s line %d)" % (type(e).__name__, e, where.name, where.lineno)
            task.sendall(b"E" + text.encode("utf-8", "replace"))
        finally:
            os._exit(125)
    try:
        HANDLER._run()
        code = 0
    except SystemExit as e:
        code = e.code
        if code is None:
            code = 0
        elif not isinstance(code, int):
            sys.stderr.write("%s\n" % code)
            code = 1
    return code


def _exit_fast(code):
    """Ends a child the way the interpreter would, without tearing down the
    server's whole module state: run the atexit handlers, flush, _exit.
    With threads of the task still running, the interpreter's own shutdown
    (which waits for them) is used instead."""


    if threading.active_count() > 1:
        sys.exit(code)


    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # noqa: BLE001 - a closed stream is the task's business
            pass
    if _LAST_WORDS is not None:
        try:
            _LAST_WORDS.send(b"x%d" % (code & 0xFF))
        except OSError:
            pass
    os._exit(code & 0xFF)


def _serve(control):
    """The server loop; returns only in a forked child, with its exit code."""
    wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    children = {}  # pid -> status pipe
    sel = selectors.DefaultSelector()
    sel.register(control, selectors.EVENT_READ)
    sel.register(wake_r, selectors.EVENT_READ)
    control.send(b"R")
    while True:
        for key, _ in sel.select():
            if key.fileobj is control:
                try:
                    # Close-on-exec from the start: nothing of ours reaches
                    # a program the task runs (the task channel is kept for
                    # the last words; stdout and stderr are dup2'ed).
                    msg, fds = _recv_fds(control, 4 + MAX_JOIN)
                except InterruptedError:
                    continue
                if not msg:
                    os._exit(0)  # the executor is gone; init kills the rest
                try:
                    join = int(json.loads(msg).get("join", 0))
                except (ValueError, AttributeError):
                    join = -1
                if not 0 <= join <= MAX_JOIN or len(fds) != 4 + join:
                    for fd in fds:
                        os.close(fd)
                    continue
                pid = os.fork()
                if pid == 0:
                    signal.set_wakeup_fd(-1)
                    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
                    sel.close()
                    control.close()
                    os.close(wake_r)
                    os.close(wake_w)
                    for fd in children.values():
                        os.close(fd)
                    os.close(fds[3])
                    return _child(fds[:3], fds[4:])
                for fd in fds[:3] + fds[4:]:
                    os.close(fd)
                children[pid] = fds[3]
            else:
                try:
                    while os.read(wake_r, 256):
                        pass
                except BlockingIOError:
                    pass
                while children:
                    try:
                        pid, status = os.waitpid(-1, os.WNOHANG)
                    except ChildProcessError:
                        break
                    if pid == 0:
                        break
                    fd = children.pop(pid, None)
                    if fd is None:
                        continue
                    if os.WIFSIGNALED(status):
                        word = b"s%d" % os.WTERMSIG(status)
                    else:
                        word = b"e%d" % os.waitstatus_to_exitcode(status)
                    try:
                        os.write(fd, word)
                    except OSError:
                        pass
                    os.close(fd)


if __name__ == "__main__":
    WRAPPER = sys.argv[1]
    FILTERS = _load_filters(sys.argv[2])
    FINAL_FILTERS = _load_filters(sys.argv[3])
    sys.path.insert(0, os.path.dirname(WRAPPER))
    import importlib.util

    _spec = importlib.util.spec_from_file_location("taskexec_handler", WRAPPER)
    HANDLER = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(HANDLER)
    del sys.path[0]
    # The modules the tasks of this server preload, from the interpreter's
    # own paths (sys.path[0] is our support dir, with nothing but our own
    # files). One that fails to import fails the server: its tasks then run
    # cold, where the wrapper reports the same error as the task's.
    for _name in sys.argv[4:]:
        importlib.import_module(_name)
    # The control socket arrives as stdout; stray output goes to the log.
    _control = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET, fileno=os.dup(1))
    os.set_inheritable(_control.fileno(), False)
    os.dup2(2, 1)
    # Everything imported so far goes to the permanent generation: the
    # collector of a child then never walks (and so never copies) the
    # server's objects.
    gc.collect()
    gc.freeze()
    _exit_fast(_serve(_control))
