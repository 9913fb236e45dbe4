//! Instances that serve on a port (notebooks, TensorBoards, online
//! services): port allocation, the readiness check of a service replica,
//! and the user-activity watch of a notebook or TensorBoard.
//!
//! Checks talk to the instance on `127.0.0.1:<port>` (or, in a network, at
//! its address from inside its namespace) with a minimal HTTP/1.1 client
//! (GET, `Connection: close`), enough for health endpoints and the Jupyter
//! server API.

use std::collections::HashSet;
use std::net::{Ipv4Addr, TcpListener};
use std::path::Path;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Readiness check of a replica (see `HealthCheck` in the protocol).
#[derive(Debug, Clone, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub struct HealthSpec {
    /// HTTP GET path; None = TCP connect.
    pub http_path: Option<String>,
    pub interval_ms: u32,
    pub timeout_ms: u32,
    pub failure_threshold: u32,
    pub initial_delay_ms: u32,
}

/// Largest response body read from an instance.
const MAX_BODY: u64 = 1 << 20;

/// Picks a free TCP port in `range` that no instance of this agent holds:
/// the first after `cursor` that can be bound on all interfaces.
pub fn allocate_port(range: (u16, u16), held: &HashSet<u16>, cursor: u16) -> Option<u16> {
    let (lo, hi) = range;
    if lo == 0 || lo > hi {
        return None;
    }
    let span = u32::from(hi - lo) + 1;
    let start = u32::from(cursor.clamp(lo, hi) - lo);
    (0..span)
        .map(|k| lo + ((start + k) % span) as u16)
        .find(|p| !held.contains(p) && port_free(*p))
}

/// True when nothing listens on `port` (it can be bound on 0.0.0.0).
pub fn port_free(port: u16) -> bool {
    TcpListener::bind((Ipv4Addr::UNSPECIFIED, port)).is_ok()
}

/// Replaces `{port}`, `{token}` and `{log_dir}` in a command's arguments.
pub fn expand(command: &[String], port: Option<u16>, token: &str, log_dir: &str) -> Vec<String> {
    command
        .iter()
        .map(|arg| {
            let mut a = arg.replace("{token}", token).replace("{log_dir}", log_dir);
            if let Some(p) = port {
                a = a.replace("{port}", &p.to_string());
            }
            a
        })
        .collect()
}

/// An HTTP answer: status code and body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    pub status: u16,
    pub body: Vec<u8>,
}

/// A TCP connection to `ip:port`, made in network namespace `netns` (a
/// file under /run/netns) when given: an instance network's address is
/// then reached from inside, whatever the node's routes and the instance's
/// security groups (its own address is its loopback there). The socket is
/// made on a thread of its own that enters the namespace and ends.
pub async fn connect(
    ip: Ipv4Addr,
    port: u16,
    netns: Option<&Path>,
) -> std::io::Result<tokio::net::TcpStream> {
    let Some(netns) = netns else {
        return tokio::net::TcpStream::connect((ip, port)).await;
    };
    let netns = netns.to_path_buf();
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::spawn(move || {
        let made = (|| {
            use std::os::fd::AsRawFd;
            let ns = std::fs::File::open(&netns)?;
            // SAFETY: setns on a namespace file this thread opened; it
            // changes this thread's network namespace only.
            if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(std::io::Error::last_os_error());
            }
            let s =
                std::net::TcpStream::connect_timeout(&(ip, port).into(), Duration::from_secs(10))?;
            s.set_nonblocking(true)?;
            Ok(s)
        })();
        let _ = tx.send(made);
    });
    let s = rx
        .await
        .map_err(|_| std::io::Error::other("connect thread ended"))??;
    tokio::net::TcpStream::from_std(s)
}

/// GET `http://IP:<port><path>` (in `netns` when given) with extra header
/// lines, within `timeout`.
pub async fn http_get(
    ip: Ipv4Addr,
    netns: Option<&Path>,
    port: u16,
    path: &str,
    headers: &[(&str, &str)],
    timeout: Duration,
) -> std::io::Result<Answer> {
    tokio::time::timeout(timeout, async {
        let mut stream = connect(ip, port, netns).await?;
        let mut request = format!(
            "GET {path} HTTP/1.1\r\nHost: {ip}:{port}\r\nUser-Agent: gpupool-agent\r\nAccept: */*\r\nConnection: close\r\n"
        );
        for (name, value) in headers {
            request.push_str(&format!("{name}: {value}\r\n"));
        }
        request.push_str("\r\n");
        stream.write_all(request.as_bytes()).await?;
        let mut raw = Vec::new();
        stream.take(MAX_BODY).read_to_end(&mut raw).await?;
        parse_response(&raw)
    })
    .await
    .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "timed out"))?
}

fn parse_response(raw: &[u8]) -> std::io::Result<Answer> {
    let bad = |what: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, what.to_string());
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| bad("no end of headers"))?;
    let head = String::from_utf8_lossy(&raw[..split]);
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|c| c.parse::<u16>().ok())
        .ok_or_else(|| bad("no status line"))?;
    let chunked = lines.any(|l| {
        let l = l.to_ascii_lowercase();
        l.starts_with("transfer-encoding:") && l.contains("chunked")
    });
    let mut body = raw[split + 4..].to_vec();
    if chunked {
        body = dechunk(&body);
    }
    Ok(Answer { status, body })
}

/// Decodes a chunked body (as far as it is complete).
fn dechunk(mut data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let Some(eol) = data.windows(2).position(|w| w == b"\r\n") else {
            return out;
        };
        let size_text = String::from_utf8_lossy(&data[..eol]);
        let size_text = size_text.split(';').next().unwrap_or("").trim();
        let Ok(size) = usize::from_str_radix(size_text, 16) else {
            return out;
        };
        data = &data[eol + 2..];
        if size == 0 || data.len() < size {
            out.extend_from_slice(&data[..size.min(data.len())]);
            return out;
        }
        out.extend_from_slice(&data[..size]);
        data = data.get(size + 2..).unwrap_or_default();
    }
}

/// One readiness probe: an HTTP GET answered 2xx/3xx, or a TCP connect.
pub async fn probe_ready(
    ip: Ipv4Addr,
    netns: Option<&Path>,
    port: u16,
    check: &HealthSpec,
) -> bool {
    let timeout = Duration::from_millis(u64::from(check.timeout_ms.max(1)));
    match &check.http_path {
        Some(path) => http_get(ip, netns, port, path, &[], timeout)
            .await
            .is_ok_and(|a| (200..400).contains(&a.status)),
        None => tokio::time::timeout(timeout, connect(ip, port, netns))
            .await
            .is_ok_and(|r| r.is_ok()),
    }
}

/// Readiness from consecutive probe results: ready on a success, unready
/// after `threshold` failures in a row.
#[derive(Debug, Default)]
pub struct Readiness {
    pub ready: bool,
    failures: u32,
}

impl Readiness {
    /// Records one probe; returns true when readiness changed.
    pub fn observe(&mut self, ok: bool, threshold: u32) -> bool {
        let before = self.ready;
        if ok {
            self.failures = 0;
            self.ready = true;
        } else {
            self.failures += 1;
            if self.failures >= threshold.max(1) {
                self.ready = false;
            }
        }
        before != self.ready
    }
}

/// What the Jupyter server API says about activity.
#[derive(Debug, Default)]
pub struct ActivityWatch {
    last_seen: Option<String>,
}

impl ActivityWatch {
    /// One look at the instance: true when a user was active since the
    /// previous look. A server with the Jupyter API (`/api/status`) counts
    /// by its `last_activity` and busy kernels (a browser tab left open is
    /// not activity); anything else by established connections to its port.
    /// `ip` (in `netns` when given): where it answers; `net`: its network
    /// namespace's `/proc/.../net`.
    pub async fn active(
        &mut self,
        (ip, netns): (Ipv4Addr, Option<&Path>),
        net: &Path,
        port: u16,
        token: &str,
    ) -> bool {
        let auth = format!("token {token}");
        let headers: &[(&str, &str)] = if token.is_empty() {
            &[]
        } else {
            &[("Authorization", auth.as_str())]
        };
        let timeout = Duration::from_secs(2);
        // Connections first: our own API requests below are then closed
        // (TIME_WAIT), not counted.
        let connections = established_connections(net, port);
        // `no_track_activity`: our own requests must not count as activity.
        let status = http_get(
            ip,
            netns,
            port,
            "/api/status?no_track_activity=1",
            headers,
            timeout,
        )
        .await;
        let last = status
            .ok()
            .filter(|a| a.status == 200)
            .and_then(|a| serde_json::from_slice::<serde_json::Value>(&a.body).ok())
            .and_then(|v| v.get("last_activity")?.as_str().map(String::from));
        let Some(last) = last else {
            return connections > 0;
        };
        let changed = self.last_seen.as_ref().is_some_and(|seen| *seen != last);
        self.last_seen = Some(last);
        let busy = http_get(
            ip,
            netns,
            port,
            "/api/kernels?no_track_activity=1",
            headers,
            timeout,
        )
        .await
        .ok()
        .filter(|a| a.status == 200)
        .and_then(|a| serde_json::from_slice::<serde_json::Value>(&a.body).ok())
        .and_then(|v| {
            v.as_array().map(|ks| {
                ks.iter()
                    .any(|k| k.get("execution_state").and_then(|s| s.as_str()) == Some("busy"))
            })
        })
        .unwrap_or(false);
        changed || busy
    }
}

/// Established TCP connections whose local port is `port` (IPv4 and IPv6),
/// in the network namespace whose `/proc/.../net` is `net`.
pub fn established_connections(net: &Path, port: u16) -> usize {
    ["tcp", "tcp6"]
        .iter()
        .filter_map(|f| std::fs::read_to_string(net.join(f)).ok())
        .map(|text| count_established(&text, port))
        .sum()
}

/// Rows of a `/proc/net/tcp` table in state 01 (ESTABLISHED) on local
/// `port`.
fn count_established(table: &str, port: u16) -> usize {
    let want = format!("{port:04X}");
    table
        .lines()
        .skip(1)
        .filter(|line| {
            let mut cols = line.split_whitespace();
            let local = cols.nth(1).unwrap_or("");
            let state = cols.nth(1).unwrap_or("");
            state == "01" && local.rsplit(':').next() == Some(want.as_str())
        })
        .count()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_are_taken_from_the_range_skipping_held_and_bound_ones() {
        let taken = TcpListener::bind((Ipv4Addr::UNSPECIFIED, 0)).unwrap();
        let busy = taken.local_addr().unwrap().port();
        let mut held = HashSet::new();
        assert_eq!(allocate_port((busy, busy), &held, 0), None);
        let next = busy.checked_add(1).filter(|p| port_free(*p));
        if let Some(next) = next {
            assert_eq!(allocate_port((busy, next), &held, busy), Some(next));
            held.insert(next);
            assert_eq!(allocate_port((busy, next), &held, busy), None);
        }
        assert_eq!(allocate_port((10, 5), &held, 0), None);
    }

    #[test]
    fn placeholders_are_expanded() {
        let cmd: Vec<String> = [
            "lab",
            "--port={port}",
            "--token={token}",
            "--logdir={log_dir}",
        ]
        .map(String::from)
        .to_vec();
        assert_eq!(
            expand(&cmd, Some(8888), "t0k", "/logs"),
            ["lab", "--port=8888", "--token=t0k", "--logdir=/logs"]
        );
    }

    #[test]
    fn responses_parse_plain_and_chunked() {
        let plain = b"HTTP/1.1 204 No Content\r\nContent-Length: 0\r\n\r\n";
        assert_eq!(parse_response(plain).unwrap().status, 204);
        let chunked =
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nWiki\r\n5\r\npedia\r\n0\r\n\r\n";
        let a = parse_response(chunked).unwrap();
        assert_eq!((a.status, a.body.as_slice()), (200, &b"Wikipedia"[..]));
        assert!(parse_response(b"garbage").is_err());
    }

    #[test]
    fn readiness_needs_threshold_failures_to_drop() {
        let mut r = Readiness::default();
        assert!(r.observe(true, 3));
        assert!(!r.observe(false, 3));
        assert!(!r.observe(false, 3));
        assert!(r.observe(false, 3));
        assert!(!r.ready);
    }

    #[test]
    fn established_rows_are_counted_by_local_port() {
        let table = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n\
   0: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1\n\
   1: 0100007F:1F90 0100007F:D2F0 01 00000000:00000000 00:00000000 00000000     0        0 2\n\
   2: 0100007F:D2F0 0100007F:1F90 01 00000000:00000000 00:00000000 00000000     0        0 3\n\
   3: 0100007F:1F90 0100007F:D2F1 06 00000000:00000000 00:00000000 00000000     0        0 4\n";
        assert_eq!(count_established(table, 8080), 1);
        assert_eq!(count_established(table, 8081), 0);
    }

    #[tokio::test]
    async fn http_and_tcp_probes_answer_from_a_real_listener() {
        let listener = tokio::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .await
            .unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            loop {
                let (mut s, _) = listener.accept().await.unwrap();
                let mut buf = [0u8; 1024];
                let n = s.read(&mut buf).await.unwrap_or(0);
                let req = String::from_utf8_lossy(&buf[..n]).to_string();
                let reply = if req.starts_with("GET /healthz ") {
                    "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
                } else {
                    "HTTP/1.1 503 Unavailable\r\nContent-Length: 0\r\n\r\n"
                };
                let _ = s.write_all(reply.as_bytes()).await;
            }
        });
        let check = |path: Option<&str>| HealthSpec {
            http_path: path.map(String::from),
            interval_ms: 100,
            timeout_ms: 1000,
            failure_threshold: 1,
            initial_delay_ms: 0,
        };
        assert!(probe_ready(Ipv4Addr::LOCALHOST, None, port, &check(Some("/healthz"))).await);
        assert!(!probe_ready(Ipv4Addr::LOCALHOST, None, port, &check(Some("/other"))).await);
        assert!(probe_ready(Ipv4Addr::LOCALHOST, None, port, &check(None)).await);
        let closed = {
            let l = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
            l.local_addr().unwrap().port()
        };
        assert!(!probe_ready(Ipv4Addr::LOCALHOST, None, closed, &check(None)).await);
    }
}
