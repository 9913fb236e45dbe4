//! Small real servers the end-to-end tests run as job commands, standing
//! in for JupyterLab, an inference service and a distributed trainer.
//!
//! * `standin notebook`: HTTP on `$PORT`. `/` answers 200 with the right
//!   `?token=` (`$GPUPOOL_NOTEBOOK_TOKEN`), else 403; `/api/status` and
//!   `/api/kernels` answer like the Jupyter server API (token in an
//!   `Authorization: token ...` header) with a `last_activity` that never
//!   moves: the notebook is idle.
//! * `standin service`: HTTP on `$PORT`. `/healthz` answers 503 for
//!   `$READY_AFTER_MS` after the start, then 200; `/` answers the instance
//!   id; `/crash` makes the process exit with code 3.
//! * `standin rendezvous`: rank 0 listens on `$MASTER_PORT` and waits for
//!   every other rank to connect and say hello; other ranks connect to
//!   `$MASTER_ADDR:$MASTER_PORT`. Exit 0 once done.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::{Duration, Instant};

fn env(name: &str) -> String {
    std::env::var(name).unwrap_or_default()
}

fn main() {
    let mode = std::env::args().nth(1).unwrap_or_default();
    match mode.as_str() {
        "notebook" => serve(notebook),
        "service" => serve(service),
        "rendezvous" => rendezvous(),
        _ => {
            eprintln!("usage: standin notebook|service|rendezvous");
            std::process::exit(2);
        }
    }
}

/// (status, body) for a request line and its headers.
type Handler = fn(&str, &[String], Instant) -> (u16, String);

fn serve(handler: Handler) {
    let port: u16 = env("PORT").parse().expect("PORT is set");
    let listener = TcpListener::bind(("0.0.0.0", port)).expect("bind $PORT");
    eprintln!("standin listening on {port}");
    let started = Instant::now();
    for conn in listener.incoming() {
        let Ok(mut conn) = conn else { continue };
        let mut reader = BufReader::new(conn.try_clone().expect("clone stream"));
        let mut request = String::new();
        if reader.read_line(&mut request).is_err() {
            continue;
        }
        let mut headers = Vec::new();
        loop {
            let mut line = String::new();
            if reader.read_line(&mut line).unwrap_or(0) == 0 || line.trim().is_empty() {
                break;
            }
            headers.push(line.trim().to_string());
        }
        let (status, body) = handler(&request, &headers, started);
        let reply = format!(
            "HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        let _ = conn.write_all(reply.as_bytes());
        let _ = conn.flush();
        if request.starts_with("GET /crash ") {
            eprintln!("crashing on request");
            std::process::exit(3);
        }
    }
}

fn path(request: &str) -> &str {
    request.split_whitespace().nth(1).unwrap_or("/")
}

fn notebook(request: &str, headers: &[String], _: Instant) -> (u16, String) {
    let token = env("GPUPOOL_NOTEBOOK_TOKEN");
    let path = path(request);
    let api = path.split('?').next().unwrap_or("");
    let header_ok = headers
        .iter()
        .any(|h| h.eq_ignore_ascii_case(&format!("authorization: token {token}")));
    if path.starts_with("/api/") {
        if !header_ok {
            return (403, "{}".into());
        }
        return match api {
            "/api/status" => (
                200,
                r#"{"connections": 0, "kernels": 0, "last_activity": "2026-11-27T00:00:00.000000Z", "started": "2026-11-27T00:00:00.000000Z"}"#.into(),
            ),
            "/api/kernels" => (200, "[]".into()),
            _ => (404, "{}".into()),
        };
    }
    if path == format!("/?token={token}") {
        (200, r#"{"notebook": "ok"}"#.into())
    } else {
        (403, r#"{"error": "bad token"}"#.into())
    }
}

fn service(request: &str, _: &[String], started: Instant) -> (u16, String) {
    let ready_after = Duration::from_millis(env("READY_AFTER_MS").parse().unwrap_or(0));
    match path(request) {
        "/healthz" if started.elapsed() >= ready_after => (200, "ok".into()),
        "/healthz" => (503, "starting".into()),
        _ => (200, env("GPUPOOL_INSTANCE_ID")),
    }
}

fn rendezvous() {
    let rank: u32 = env("RANK").parse().expect("RANK");
    let world: u32 = env("WORLD_SIZE").parse().expect("WORLD_SIZE");
    let port: u16 = env("MASTER_PORT").parse().expect("MASTER_PORT");
    let addr = env("MASTER_ADDR");
    if rank == 0 {
        let listener = TcpListener::bind(("0.0.0.0", port)).expect("bind MASTER_PORT");
        for _ in 1..world {
            let (mut s, peer) = listener.accept().expect("accept");
            let mut hello = String::new();
            BufReader::new(s.try_clone().unwrap())
                .read_line(&mut hello)
                .unwrap();
            println!("master got {:?} from {peer}", hello.trim());
            s.write_all(b"welcome\n").unwrap();
        }
        println!("rendezvous complete: {world} ranks");
        return;
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match TcpStream::connect((addr.as_str(), port)) {
            Ok(mut s) => {
                s.write_all(format!("hello from rank {rank}\n").as_bytes())
                    .unwrap();
                let mut reply = String::new();
                s.read_to_string(&mut reply).unwrap();
                println!("rank {rank} reached {addr}:{port}: {}", reply.trim());
                return;
            }
            Err(e) if Instant::now() < deadline => {
                eprintln!("waiting for the master: {e}");
                std::thread::sleep(Duration::from_millis(100));
            }
            Err(e) => {
                eprintln!("master never answered: {e}");
                std::process::exit(1);
            }
        }
    }
}
