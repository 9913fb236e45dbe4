//! The instance shim: `<agent binary> shim EXIT_FILE [OPTIONS] -- COMMAND ARGS...`.
//!
//! The agent starts every instance through this shim so that the exit
//! status survives an agent restart: the shim leads the instance's process
//! group, runs the command as its child, and when it ends writes `code N` or
//! `signal N` to EXIT_FILE (atomically) before exiting the same way. A
//! restarted agent finds the file, or the shim still running, and reattaches.
//! The file is the shim's real wait status, in a directory only the agent's
//! user may write: nothing the job does can change it.
//!
//! The shim itself ignores SIGTERM/SIGINT/SIGHUP (with a handler, which
//! `exec` resets, so the command keeps the default dispositions): a stop
//! signals the whole group, and the shim must outlive the command to record
//! how it ended. SIGKILL ends both.
//!
//! Host processes (`--isolate`, a root agent): the command gets its own PID,
//! mount and IPC namespaces. The shim forks an init (PID 1 of the new
//! namespace, which reaps orphans and ends the namespace with the command),
//! which mounts a fresh `/proc` (only the instance's processes), a private
//! `/tmp`, covers the `--hide` paths (the agent's state and config) with
//! empty read-only tmpfs, puts the `--keep` paths (the tenant's directory)
//! back, creates the working directory as the instance's user and runs the
//! command as that user.
//!
//! Images (`--container`): the shim mounts the instance's overlay root file
//! system in a mount namespace of its own (it goes away with the shim, so no
//! mount outlives the instance), runs `RUNTIME run` in the foreground on the
//! bundle the agent wrote, and records the container's exit (a runtime exit
//! code of 128+N is signal N, as `docker` reports it), then deletes the
//! container's runtime state.

use std::ffi::CString;
use std::os::unix::process::ExitStatusExt;
use std::path::Path;

extern "C" fn ignore(_: libc::c_int) {}

/// The exit of a command as recorded in an exit file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    Code(i32),
    Signal(i32),
}

impl Exit {
    fn text(self) -> String {
        match self {
            Exit::Code(c) => format!("code {c}"),
            Exit::Signal(s) => format!("signal {s}"),
        }
    }

    fn parse(text: &str) -> Option<Self> {
        let (kind, value) = text.trim().split_once(' ')?;
        let value = value.parse().ok()?;
        match kind {
            "code" => Some(Exit::Code(value)),
            "signal" => Some(Exit::Signal(value)),
            _ => None,
        }
    }

    fn of(status: std::process::ExitStatus) -> Self {
        match (status.code(), status.signal()) {
            (Some(code), _) => Exit::Code(code),
            (None, Some(sig)) => Exit::Signal(sig),
            _ => Exit::Code(1),
        }
    }
}

/// Reads an exit file written by the shim.
pub fn read_exit(path: &Path) -> Option<Exit> {
    Exit::parse(&std::fs::read_to_string(path).ok()?)
}

/// Runs the shim if `args` (without the program name) start with `shim`;
/// never returns then. Returns otherwise.
pub fn run_if_shim(args: &[String]) {
    if args.first().map(String::as_str) != Some("shim") {
        return;
    }
    std::process::exit(shim(&args[1..]));
}

/// A container to run with an OCI runtime.
#[derive(Debug, Default, PartialEq, Eq)]
struct Container<'a> {
    runtime: &'a str,
    root: &'a str,
    bundle: &'a str,
    id: &'a str,
    /// lowerdir, upperdir, workdir, target of the root file system.
    overlay: [&'a str; 4],
}

/// What the shim is asked to do.
#[derive(Debug, Default, PartialEq, Eq)]
struct Args<'a> {
    exit_file: &'a str,
    /// `cgroup.procs` files the shim writes itself into before anything
    /// else (the instance's cgroup, one file per v1 controller).
    join: Vec<&'a str>,
    /// The user the command runs as (None: the shim's).
    user: Option<(u32, u32)>,
    /// The command's environment (None: the shim's own).
    env_file: Option<&'a str>,
    /// Working directory, created as the user if missing.
    cwd: Option<&'a str>,
    /// Own PID, mount and IPC namespaces, private /tmp.
    isolate: bool,
    hide: Vec<&'a str>,
    keep: Vec<&'a str>,
    /// Containers: (directory inside the `--keep` root, mount point) pairs
    /// bound before the runtime starts.
    stage: Vec<(&'a str, &'a str)>,
    /// Containers: the staged directories are given to this (host) uid and
    /// gid, the image's user when it is not root.
    owner: Option<(u32, u32)>,
    container: Option<Container<'a>>,
    /// The instance's network namespace (`/run/netns/NAME`), joined first:
    /// the command (or the container runtime, and so the container) runs
    /// in it.
    netns: Option<&'a str>,
    /// Host processes (`--isolate`): bound read-only over `/etc/hosts`.
    hosts: Option<&'a str>,
    command: &'a [String],
}

const USAGE: &str = "usage: shim EXIT_FILE [--join CGROUP_PROCS]... [--as UID:GID] [--env-file FILE] [--cwd DIR] \
[--netns NETNS] [--isolate [--hosts FILE] [--hide PATH]... [--keep PATH]...] -- COMMAND ARGS...\n   \
or: shim EXIT_FILE --container RUNTIME ROOT BUNDLE ID LOWER:UPPER:WORK:TARGET";

fn parse(args: &[String]) -> Option<Args<'_>> {
    let mut a = Args {
        exit_file: args.first()?,
        ..Args::default()
    };
    let mut rest = &args[1..];
    loop {
        let value = |n: usize| rest.get(n).map(String::as_str);
        match value(0) {
            Some("--as") => {
                let (uid, gid) = value(1)?.split_once(':')?;
                a.user = Some((uid.parse().ok()?, gid.parse().ok()?));
                rest = &rest[2..];
            }
            Some("--join") => {
                a.join.push(value(1)?);
                rest = &rest[2..];
            }
            Some("--env-file") => {
                a.env_file = Some(value(1)?);
                rest = &rest[2..];
            }
            Some("--cwd") => {
                a.cwd = Some(value(1)?);
                rest = &rest[2..];
            }
            Some("--netns") => {
                a.netns = Some(value(1)?);
                rest = &rest[2..];
            }
            Some("--hosts") => {
                a.hosts = Some(value(1)?);
                rest = &rest[2..];
            }
            Some("--isolate") => {
                a.isolate = true;
                rest = &rest[1..];
            }
            Some("--hide") => {
                a.hide.push(value(1)?);
                rest = &rest[2..];
            }
            Some("--keep") => {
                a.keep.push(value(1)?);
                rest = &rest[2..];
            }
            Some("--stage") => {
                a.stage.push((value(1)?, value(2)?));
                rest = &rest[3..];
            }
            Some("--owner") => {
                let (uid, gid) = value(1)?.split_once(':')?;
                a.owner = Some((uid.parse().ok()?, gid.parse().ok()?));
                rest = &rest[2..];
            }
            Some("--container") if rest.len() == 6 => {
                let mut layers = value(5)?.split(':');
                let overlay = [
                    layers.next()?,
                    layers.next()?,
                    layers.next()?,
                    layers.next()?,
                ];
                if layers.next().is_some() {
                    return None;
                }
                a.container = Some(Container {
                    runtime: value(1)?,
                    root: value(2)?,
                    bundle: value(3)?,
                    id: value(4)?,
                    overlay,
                });
                return Some(a);
            }
            Some("--") if rest.len() > 1 => {
                a.command = &rest[1..];
                return Some(a);
            }
            _ => return None,
        }
    }
}

/// Reads the command's environment: `KEY=VALUE` entries, each ended by a
/// NUL. From a file, which is then removed, or with `-` from stdin, where
/// the agent writes their length and a newline first; stdin is then
/// `/dev/null`, and an environment cut short is an error.
fn take_env(path: &str) -> std::io::Result<Vec<(String, String)>> {
    let bytes = if path == "-" {
        let bytes = read_framed(&mut std::io::stdin().lock())?;
        let null = std::fs::File::open("/dev/null")?;
        // SAFETY: dup2 onto our own fd 0.
        if unsafe { libc::dup2(std::os::fd::AsRawFd::as_raw_fd(&null), 0) } < 0 {
            return Err(std::io::Error::last_os_error());
        }
        bytes
    } else {
        let bytes = std::fs::read(path)?;
        let _ = std::fs::remove_file(path);
        bytes
    };
    Ok(bytes
        .split(|b| *b == 0)
        .filter(|e| !e.is_empty())
        .filter_map(|e| {
            let e = String::from_utf8_lossy(e);
            let (k, v) = e.split_once('=')?;
            Some((k.to_string(), v.to_string()))
        })
        .collect())
}

/// `LEN\n` then exactly LEN bytes.
fn read_framed(r: &mut impl std::io::BufRead) -> std::io::Result<Vec<u8>> {
    use std::io::{BufRead, Read};
    let bad = |what: String| std::io::Error::new(std::io::ErrorKind::InvalidData, what);
    let mut head = Vec::new();
    r.by_ref().take(24).read_until(b'\n', &mut head)?;
    let len: usize = std::str::from_utf8(head.strip_suffix(b"\n").unwrap_or(&[]))
        .ok()
        .and_then(|t| t.parse().ok())
        .ok_or_else(|| bad("no length before the environment".into()))?;
    let mut body = Vec::with_capacity(len.min(1 << 20));
    r.by_ref().take(len as u64).read_to_end(&mut body)?;
    if body.len() != len {
        return Err(bad(format!(
            "the environment was cut short ({} of {len} bytes)",
            body.len()
        )));
    }
    Ok(body)
}

fn shim(args: &[String]) -> i32 {
    let Some(args) = parse(args) else {
        eprintln!("{USAGE}");
        return 2;
    };
    for sig in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP] {
        // SAFETY: installing a handler that does nothing.
        unsafe {
            libc::signal(sig, ignore as *const () as libc::sighandler_t);
        }
    }
    // Whatever the agent was started with (a service manager's sockets, a
    // build's jobserver pipes) stays out of the instance: every descriptor
    // but 0-2 closes at exec.
    mark_cloexec_above_stderr();
    let exit = if let Err(err) = args.netns.map_or(Ok(()), join_netns) {
        // Nothing runs on the node's network that should not.
        eprintln!("shim: {err}");
        Exit::Code(127)
    } else if let Err(err) = join_cgroups(&args.join) {
        // Nothing runs outside the instance's cgroup.
        eprintln!("shim: {err}");
        Exit::Code(127)
    } else if let Some(c) = &args.container {
        // The directories mounted at /work and /logs, made as the
        // container's root.
        let made = args
            .cwd
            .into_iter()
            .chain(args.stage.iter().map(|(src, _)| *src))
            .try_for_each(|d| make_dir_as(Path::new(d), args.user));
        match made {
            Err(err) => {
                eprintln!("cannot create the working directory: {err}");
                Exit::Code(127)
            }
            Ok(()) => run_container(c, &args),
        }
    } else if args.isolate {
        run_isolated(&args)
    } else {
        run_plain(&args)
    };
    write_exit(args.exit_file, &exit.text());
    match exit {
        Exit::Code(code) => code,
        Exit::Signal(sig) => {
            // Die the same way, so a waiting parent sees the signal.
            // SAFETY: restoring the default action and signalling ourselves.
            unsafe {
                libc::signal(sig, libc::SIG_DFL);
                libc::kill(libc::getpid(), sig);
            }
            128 + sig
        }
    }
}

/// Sets FD_CLOEXEC on every descriptor above 2: `close_range` (Linux 5.11),
/// else one by one from /proc/self/fd.
fn mark_cloexec_above_stderr() {
    // SAFETY: close_range(2) with CLOSE_RANGE_CLOEXEC closes nothing now.
    let done = unsafe {
        libc::syscall(
            libc::SYS_close_range,
            3u32,
            u32::MAX,
            libc::CLOSE_RANGE_CLOEXEC,
        )
    } == 0;
    if done {
        return;
    }
    let fds: Vec<i32> = std::fs::read_dir("/proc/self/fd")
        .map(|d| {
            d.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
                .filter(|fd| *fd > 2)
                .collect()
        })
        .unwrap_or_default();
    for fd in fds {
        // SAFETY: fcntl(2) on a descriptor number; one that is gone (the
        // directory's own) fails harmlessly.
        unsafe {
            let flags = libc::fcntl(fd, libc::F_GETFD);
            if flags >= 0 {
                libc::fcntl(fd, libc::F_SETFD, flags | libc::FD_CLOEXEC);
            }
        }
    }
}

/// Moves the shim (and so everything it starts) into the instance's
/// cgroup: "0" written to a `cgroup.procs` file is the writer.
fn join_cgroups(files: &[&str]) -> Result<(), String> {
    for f in files {
        std::fs::write(f, b"0")
            .map_err(|e| format!("cannot join the instance's cgroup {f}: {e}"))?;
    }
    Ok(())
}

/// The command, with its environment, user and working directory.
fn command(args: &Args) -> Result<std::process::Command, Exit> {
    let (program, rest) = args.command.split_first().ok_or(Exit::Code(127))?;
    let mut cmd = std::process::Command::new(program);
    cmd.args(rest);
    if let Some(path) = args.env_file {
        match take_env(path) {
            Ok(env) => {
                cmd.env_clear().envs(env);
            }
            Err(err) => {
                eprintln!("shim: cannot read the environment {path}: {err}");
                return Err(Exit::Code(127));
            }
        }
    }
    if let Some(dir) = args.cwd {
        if let Err(err) = make_dir_as(Path::new(dir), args.user) {
            eprintln!("cannot create the working directory {dir}: {err}");
            return Err(Exit::Code(127));
        }
        cmd.current_dir(dir);
    }
    if let Some((uid, gid)) = args.user {
        // Supplementary groups go too (std clears them when root sets a uid).
        use std::os::unix::process::CommandExt;
        cmd.uid(uid).gid(gid);
    }
    Ok(cmd)
}

/// Creates `dir` (and missing parents) with the rights of `user`, so a
/// path another user prepared (a link, a directory it owns) gets no more
/// than that user could do.
fn make_dir_as(dir: &Path, user: Option<(u32, u32)>) -> std::io::Result<()> {
    let Some((uid, gid)) = user else {
        return std::fs::create_dir_all(dir);
    };
    // SAFETY: the shim is single-threaded; set*id change only our own
    // credentials and are undone below (root's supplementary groups go for
    // good: the shim needs none).
    unsafe {
        if libc::setgroups(0, std::ptr::null()) != 0
            || libc::setegid(gid) != 0
            || libc::seteuid(uid) != 0
        {
            return Err(std::io::Error::last_os_error());
        }
    }
    let made = {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
    };
    // SAFETY: as above, back to root.
    unsafe {
        if libc::seteuid(0) != 0 || libc::setegid(0) != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    made
}

fn spawn_failed(args: &Args, err: &std::io::Error) -> Exit {
    let who = args
        .user
        .map(|(u, _)| format!(" as uid {u}"))
        .unwrap_or_default();
    eprintln!(
        "failed to start {}{who}: {err}",
        args.command.first().map_or("", String::as_str)
    );
    Exit::Code(127)
}

fn run_plain(args: &Args) -> Exit {
    let mut cmd = match command(args) {
        Ok(c) => c,
        Err(exit) => return exit,
    };
    match cmd.status() {
        Ok(s) => Exit::of(s),
        Err(err) => spawn_failed(args, &err),
    }
}

fn c_path(p: &str) -> CString {
    CString::new(p).unwrap_or_default()
}

/// mount(2), with the path in the error.
fn mount(
    source: &str,
    target: &str,
    fstype: &str,
    flags: libc::c_ulong,
    data: &str,
) -> std::io::Result<()> {
    let (s, t, f, d) = (c_path(source), c_path(target), c_path(fstype), c_path(data));
    // SAFETY: NUL-terminated strings that outlive the call.
    let rc = unsafe {
        libc::mount(
            if source.is_empty() {
                std::ptr::null()
            } else {
                s.as_ptr()
            },
            t.as_ptr(),
            if fstype.is_empty() {
                std::ptr::null()
            } else {
                f.as_ptr()
            },
            flags,
            if data.is_empty() {
                std::ptr::null()
            } else {
                d.as_ptr().cast()
            },
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        let err = std::io::Error::last_os_error();
        Err(std::io::Error::new(
            err.kind(),
            format!("mount {fstype} {source} on {target}: {err}"),
        ))
    }
}

/// Moves the shim into the network namespace at `path`.
fn join_netns(path: &str) -> std::io::Result<()> {
    let p = c_path(path);
    // SAFETY: open(2) of a NUL-terminated path.
    let fd = unsafe { libc::open(p.as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC) };
    if fd < 0 {
        let err = std::io::Error::last_os_error();
        return Err(std::io::Error::new(
            err.kind(),
            format!("open {path}: {err}"),
        ));
    }
    // SAFETY: setns(2) on a descriptor we opened, then closing it.
    let joined = unsafe { libc::setns(fd, libc::CLONE_NEWNET) };
    let err = std::io::Error::last_os_error();
    // SAFETY: closing a descriptor we opened.
    unsafe { libc::close(fd) };
    if joined != 0 {
        return Err(std::io::Error::new(
            err.kind(),
            format!("cannot join the network namespace {path}: {err}"),
        ));
    }
    Ok(())
}

/// A private mount namespace whose changes never reach the host's.
fn private_mounts() -> std::io::Result<()> {
    // SAFETY: unshare(2) on our own process.
    if unsafe { libc::unshare(libc::CLONE_NEWNS) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    mount("", "/", "", libc::MS_REC | libc::MS_PRIVATE, "")
}

/// The instance's view of the host: its own /proc and /tmp, the agent's
/// paths covered, the tenant's kept.
fn sandbox_mounts(args: &Args) -> std::io::Result<()> {
    private_mounts()?;
    // Opened (in the new namespace: a bind source must be one of its
    // mounts) before anything is covered; bound back from these.
    let mut kept = Vec::new();
    for k in &args.keep {
        let p = c_path(k);
        // SAFETY: open(2) of a NUL-terminated path.
        let fd = unsafe {
            libc::open(
                p.as_ptr(),
                libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC,
            )
        };
        if fd < 0 {
            let err = std::io::Error::last_os_error();
            return Err(std::io::Error::new(err.kind(), format!("open {k}: {err}")));
        }
        kept.push((*k, fd));
    }
    // The hosts file is in the agent's state, covered below: opened first.
    let hosts = match args.hosts {
        None => None,
        Some(h) => {
            let p = c_path(h);
            // SAFETY: open(2) of a NUL-terminated path.
            let fd = unsafe { libc::open(p.as_ptr(), libc::O_PATH | libc::O_CLOEXEC) };
            if fd < 0 {
                let err = std::io::Error::last_os_error();
                return Err(std::io::Error::new(err.kind(), format!("open {h}: {err}")));
            }
            Some(fd)
        }
    };
    let hidden = libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;
    mount("proc", "/proc", "proc", hidden, "")?;
    // Private scratch: /tmp, /var/tmp, /run/lock and POSIX shared memory
    // (/dev/shm, which the IPC namespace does not cover) are the
    // instance's own.
    for dir in ["/tmp", "/var/tmp", "/dev/shm", "/run/lock"] {
        if Path::new(dir).is_dir() {
            mount(
                "tmpfs",
                dir,
                "tmpfs",
                libc::MS_NOSUID | libc::MS_NODEV,
                "mode=1777",
            )?;
        }
    }
    // Paths under /tmp are gone already; the others are covered, outermost
    // first (a path inside a covered one is gone with it).
    let mut hide: Vec<&str> = args.hide.clone();
    hide.sort_by_key(|h| Path::new(h).components().count());
    let mut covered: Vec<&str> = Vec::new();
    for h in hide {
        if covered.iter().any(|c| Path::new(h).starts_with(c)) {
            continue;
        }
        let Ok(meta) = std::fs::metadata(h) else {
            continue;
        };
        if meta.is_dir() {
            mount("tmpfs", h, "tmpfs", hidden, "mode=0711,size=64k")?;
            covered.push(h);
        } else {
            mount("/dev/null", h, "", libc::MS_BIND, "")?;
        }
    }
    // The tenant's directory, where it was (its parents made anew, and
    // searchable, where a cover or the new /tmp removed them).
    for (k, fd) in &kept {
        {
            use std::os::unix::fs::DirBuilderExt;
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o711)
                .create(k)?;
        }
        mount(
            &format!("/proc/self/fd/{fd}"),
            k,
            "",
            libc::MS_BIND | libc::MS_REC,
            "",
        )?;
        // SAFETY: closing a descriptor we opened.
        unsafe { libc::close(*fd) };
    }
    for h in covered {
        mount("", h, "", libc::MS_REMOUNT | libc::MS_RDONLY | hidden, "")?;
    }
    if let Some(fd) = hosts {
        let source = format!("/proc/self/fd/{fd}");
        mount(&source, "/etc/hosts", "", libc::MS_BIND, "")?;
        mount(
            "",
            "/etc/hosts",
            "",
            libc::MS_REMOUNT | libc::MS_BIND | libc::MS_RDONLY | hidden,
            "",
        )?;
        // SAFETY: closing a descriptor we opened.
        unsafe { libc::close(fd) };
    }
    Ok(())
}

/// Writes the whole of `text` to `fd`.
fn write_fd(fd: i32, text: &[u8]) {
    // SAFETY: writing our own buffer to our own descriptor.
    unsafe { libc::write(fd, text.as_ptr().cast(), text.len()) };
}

fn run_isolated(args: &Args) -> Exit {
    // The environment is read here, before the fork: the shim's stdin (the
    // agent's pipe) is then /dev/null for the init and the command, and the
    // agent's write ends as soon as the bytes are read.
    let env = match args.env_file.map(take_env).transpose() {
        Ok(env) => env,
        Err(err) => {
            eprintln!("shim: cannot read the environment: {err}");
            return Exit::Code(127);
        }
    };
    let mut pipe = [0i32; 2];
    // SAFETY: unshare(2) of our own process (the PID namespace applies to
    // children) and pipe(2) into a local array.
    unsafe {
        if libc::unshare(libc::CLONE_NEWPID | libc::CLONE_NEWIPC) != 0 {
            eprintln!(
                "shim: cannot make namespaces: {}",
                std::io::Error::last_os_error()
            );
            return Exit::Code(127);
        }
        if libc::pipe2(pipe.as_mut_ptr(), libc::O_CLOEXEC) != 0 {
            return Exit::Code(127);
        }
    }
    // SAFETY: the shim is single-threaded, so the child may run Rust code.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Exit::Code(127);
    }
    if pid == 0 {
        // PID 1 of the instance's namespace.
        // SAFETY: closing the read end in the child.
        unsafe { libc::close(pipe[0]) };
        let exit = init(args, env);
        write_fd(pipe[1], exit.text().as_bytes());
        // SAFETY: leaving the child without running the parent's exit code.
        unsafe { libc::_exit(0) };
    }
    // SAFETY: closing the write end in the parent.
    unsafe { libc::close(pipe[1]) };
    let mut status = 0;
    // SAFETY: waiting for our own child.
    while unsafe { libc::waitpid(pid, &mut status, 0) } < 0
        && std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted
    {}
    let mut buf = [0u8; 64];
    // SAFETY: reading into a local buffer.
    let n = unsafe { libc::read(pipe[0], buf.as_mut_ptr().cast(), buf.len()) };
    let reported = (n > 0)
        .then(|| Exit::parse(&String::from_utf8_lossy(&buf[..n as usize])))
        .flatten();
    reported.unwrap_or(if libc::WIFSIGNALED(status) {
        Exit::Signal(libc::WTERMSIG(status))
    } else {
        Exit::Code(libc::WEXITSTATUS(status))
    })
}

/// The namespace's init: sets up the mounts, runs the command with `env`
/// (None: the shim's own), reaps everything until the command ends.
fn init(args: &Args, env: Option<Vec<(String, String)>>) -> Exit {
    if let Err(err) = sandbox_mounts(args) {
        eprintln!("shim: cannot set up the instance's mounts: {err}");
        return Exit::Code(127);
    }
    // No setuid binary gives the instance more than its own identity.
    // SAFETY: prctl(2) on our own process.
    if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
        eprintln!(
            "shim: cannot set no_new_privs: {}",
            std::io::Error::last_os_error()
        );
        return Exit::Code(127);
    }
    let without_file = Args {
        env_file: None,
        join: Vec::new(),
        hide: Vec::new(),
        keep: Vec::new(),
        stage: Vec::new(),
        owner: None,
        container: None,
        ..*args
    };
    let mut cmd = match command(&without_file) {
        Ok(c) => c,
        Err(exit) => return exit,
    };
    if let Some(env) = env {
        cmd.env_clear().envs(env);
    }
    let child = match cmd.spawn() {
        Ok(c) => c,
        Err(err) => return spawn_failed(args, &err),
    };
    let main = child.id() as i32;
    loop {
        let mut status = 0;
        // SAFETY: reaping any child of ours.
        let pid = unsafe { libc::waitpid(-1, &mut status, 0) };
        if pid < 0 {
            if std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Exit::Code(1);
        }
        if pid == main {
            return if libc::WIFSIGNALED(status) {
                Exit::Signal(libc::WTERMSIG(status))
            } else {
                Exit::Code(libc::WEXITSTATUS(status))
            };
        }
    }
}

/// Opens `dir`, which must lie inside `root`, without following any
/// symlink on the way below `root` (a tenant's directory is the tenant's to
/// fill with links to anywhere).
fn open_beneath(root: &str, dir: &str) -> std::io::Result<i32> {
    let rel = Path::new(dir)
        .strip_prefix(root)
        .map_err(|_| std::io::Error::other(format!("{dir} is not inside {root}")))?;
    let rel = if rel.as_os_str().is_empty() {
        ".".to_string()
    } else {
        rel.to_string_lossy().into_owned()
    };
    let root_c = c_path(root);
    // SAFETY: open(2) of a NUL-terminated path.
    let root_fd = unsafe {
        libc::open(
            root_c.as_ptr(),
            libc::O_PATH | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC,
        )
    };
    if root_fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    /// `struct open_how` of openat2(2) (libc's is non-exhaustive).
    #[repr(C)]
    struct OpenHow {
        flags: u64,
        mode: u64,
        resolve: u64,
    }
    let how = OpenHow {
        flags: (libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC) as u64,
        mode: 0,
        resolve: libc::RESOLVE_BENEATH | libc::RESOLVE_NO_SYMLINKS | libc::RESOLVE_NO_MAGICLINKS,
    };
    let rel_c = c_path(&rel);
    // SAFETY: openat2(2) with a valid dirfd, path and open_how of the size
    // given.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_openat2,
            root_fd,
            rel_c.as_ptr(),
            &how as *const OpenHow,
            std::mem::size_of::<OpenHow>(),
        )
    };
    let err = std::io::Error::last_os_error();
    // SAFETY: closing a descriptor we opened.
    unsafe { libc::close(root_fd) };
    if fd < 0 {
        return Err(std::io::Error::new(
            err.kind(),
            format!("{dir}: {err} (links are not followed in the tenant's directory)"),
        ));
    }
    Ok(fd as i32)
}

fn run_container(c: &Container, args: &Args) -> Exit {
    let [lower, upper, work, target] = c.overlay;
    let staged = private_mounts().and_then(|()| {
        let root = args
            .keep
            .first()
            .ok_or_else(|| std::io::Error::other("--stage needs --keep"))?;
        for (src, dst) in &args.stage {
            let fd = open_beneath(root, src)?;
            if let Some((uid, gid)) = args.owner {
                // Through the descriptor: never a path the tenant could
                // have pointed elsewhere.
                // SAFETY: fchownat(2) on our descriptor with an empty path.
                let rc = unsafe { libc::fchownat(fd, c"".as_ptr(), uid, gid, libc::AT_EMPTY_PATH) };
                if rc != 0 {
                    let err = std::io::Error::last_os_error();
                    // SAFETY: closing a descriptor we opened.
                    unsafe { libc::close(fd) };
                    return Err(std::io::Error::new(
                        err.kind(),
                        format!("chown {src}: {err}"),
                    ));
                }
            }
            let bound = mount(
                &format!("/proc/self/fd/{fd}"),
                dst,
                "",
                libc::MS_BIND | libc::MS_REC,
                "",
            );
            // SAFETY: closing a descriptor we opened.
            unsafe { libc::close(fd) };
            bound?;
        }
        Ok(())
    });
    if let Err(err) = staged {
        eprintln!("shim: cannot mount the container's directories: {err}");
        return Exit::Code(127);
    }
    let mounted = mount(
        "overlay",
        target,
        "overlay",
        libc::MS_NODEV,
        &format!("lowerdir={lower},upperdir={upper},workdir={work}"),
    );
    if let Err(err) = mounted {
        eprintln!("shim: cannot mount the container's root file system: {err}");
        return Exit::Code(127);
    }
    let status = std::process::Command::new(c.runtime)
        .args(["--root", c.root, "run", "--bundle", c.bundle, c.id])
        .stdin(std::process::Stdio::null())
        .status();
    let exit = match status {
        // The runtime exits 128+N when the container's process was killed
        // by signal N.
        Ok(s) => match Exit::of(s) {
            Exit::Code(code) if (129..=128 + 64).contains(&code) => Exit::Signal(code - 128),
            other => other,
        },
        Err(err) => {
            eprintln!("shim: cannot run {}: {err}", c.runtime);
            Exit::Code(127)
        }
    };
    let _ = std::process::Command::new(c.runtime)
        .args(["--root", c.root, "delete", "--force", c.id])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status();
    exit
}

fn write_exit(path: &str, text: &str) {
    let tmp = format!("{path}.tmp");
    if std::fs::write(&tmp, text).is_ok() && std::fs::rename(&tmp, path).is_ok() {
        return;
    }
    let _ = std::fs::write(path, text);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arguments_parse() {
        let args = |s: &str| s.split(' ').map(String::from).collect::<Vec<_>>();
        let a = args("/x.exit -- id -u");
        let p = parse(&a).unwrap();
        assert_eq!((p.exit_file, p.user, p.env_file), ("/x.exit", None, None));
        assert_eq!(p.command, &a[2..]);
        let a = args(
            "/x.exit --as 65534:65534 --env-file /x.env --cwd /w --isolate --hide /s --keep /s/t -- id",
        );
        let p = parse(&a).unwrap();
        assert_eq!(p.user, Some((65534, 65534)));
        assert_eq!(p.env_file, Some("/x.env"));
        assert_eq!(p.cwd, Some("/w"));
        assert!(p.isolate);
        assert_eq!((p.hide, p.keep), (vec!["/s"], vec!["/s/t"]));
        assert_eq!(p.command, &a[13..]);
        let a = args("/x.exit --join /a/cgroup.procs --join /b/cgroup.procs -- id");
        let p = parse(&a).unwrap();
        assert_eq!(p.join, vec!["/a/cgroup.procs", "/b/cgroup.procs"]);
        assert_eq!(p.command, &a[6..]);
        let a = args("/x.exit --container /usr/bin/runc /r /b id1 /l:/u:/w:/t");
        let c = parse(&a).unwrap().container.unwrap();
        assert_eq!(
            (c.runtime, c.root, c.bundle, c.id),
            ("/usr/bin/runc", "/r", "/b", "id1")
        );
        assert_eq!(c.overlay, ["/l", "/u", "/w", "/t"]);
        for bad in [
            "/x.exit",
            "/x.exit --",
            "/x.exit --as 1 -- id",
            "/x.exit id",
            "/x.exit --env-file",
            "/x.exit --join",
            "/x.exit --container /runc /r /b id /l:/u:/w",
            "/x.exit --container /runc /r /b id /l:/u:/w:/t:/x",
        ] {
            assert!(parse(&args(bad)).is_none(), "{bad}");
        }
    }

    #[test]
    fn a_cgroup_that_cannot_be_joined_runs_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let exit = dir.path().join("x.exit");
        let marker = dir.path().join("ran");
        let a: Vec<String> = [
            exit.to_str().unwrap(),
            "--join",
            dir.path()
                .join("no-such-cgroup/cgroup.procs")
                .to_str()
                .unwrap(),
            "--",
            "touch",
            marker.to_str().unwrap(),
        ]
        .map(String::from)
        .to_vec();
        assert_eq!(shim(&a), 127);
        assert_eq!(read_exit(&exit), Some(Exit::Code(127)));
        assert!(!marker.exists(), "the command ran outside its cgroup");
    }

    #[test]
    fn environment_files_are_read_once() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("x.env");
        std::fs::write(&f, b"A=1\0B=two\nlines\0C=x=y\0").unwrap();
        let env = take_env(f.to_str().unwrap()).unwrap();
        assert_eq!(
            env,
            [("A", "1"), ("B", "two\nlines"), ("C", "x=y")]
                .map(|(k, v)| (k.to_string(), v.to_string()))
        );
        assert!(!f.exists(), "removed once read");
    }

    #[test]
    fn environments_on_stdin_are_framed() {
        let read = |b: &[u8]| read_framed(&mut std::io::Cursor::new(b.to_vec()));
        assert_eq!(read(b"7\nA=1\0B=\0rest").unwrap(), b"A=1\0B=\0");
        assert_eq!(read(b"0\n").unwrap(), b"");
        for bad in [
            &b""[..],
            b"6",
            b"x\nA=1\0",
            b"8\nA=1\0B=\0",
            b"99999999999999999999999999\n",
        ] {
            assert!(read(bad).is_err(), "{:?}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn exit_files_parse() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("x.exit");
        write_exit(f.to_str().unwrap(), "code 3");
        assert_eq!(read_exit(&f), Some(Exit::Code(3)));
        write_exit(f.to_str().unwrap(), "signal 9");
        assert_eq!(read_exit(&f), Some(Exit::Signal(9)));
        std::fs::write(&f, "garbage").unwrap();
        assert_eq!(read_exit(&f), None);
        assert_eq!(read_exit(&dir.path().join("missing")), None);
    }
}
