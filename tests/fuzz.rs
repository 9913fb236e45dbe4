//! Bad input over real gRPC: every RPC of the API gets random bytes and
//! random protobuf wire data (known fields with wrong or extreme values,
//! unknown fields, nesting), an oversized message, and a flood past the
//! per-caller rate limit. The scheduler must answer each with a clear
//! status (never UNKNOWN, never a panic) and keep serving.

use std::str::FromStr;
use std::time::Duration;

use bytes::{Buf, BufMut};
use gpupool_e2e::*;
use gpupool_scheduler::api::access::ACCESS;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::codegen::http::uri::PathAndQuery;
use tonic::{Code, Request, Status};

/// Sends and receives raw message bytes.
#[derive(Debug, Clone, Default)]
struct Raw;

impl Codec for Raw {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = Raw;
    type Decoder = Raw;
    fn encoder(&mut self) -> Raw {
        Raw
    }
    fn decoder(&mut self) -> Raw {
        Raw
    }
}

impl Encoder for Raw {
    type Item = Vec<u8>;
    type Error = Status;
    fn encode(&mut self, item: Vec<u8>, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put_slice(&item);
        Ok(())
    }
}

impl Decoder for Raw {
    type Item = Vec<u8>;
    type Error = Status;
    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Vec<u8>>, Status> {
        let mut out = vec![0; src.remaining()];
        src.copy_to_slice(&mut out);
        Ok(Some(out))
    }
}

/// xorshift64*: reproducible from the seed printed on failure.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

fn varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// Random protobuf wire data: fields 1..20 with random wire types and
/// values (extreme integers, random strings, nested messages).
fn wire(rng: &mut Rng, depth: u32) -> Vec<u8> {
    let mut out = Vec::new();
    for _ in 0..rng.below(8) {
        let field = 1 + rng.below(20);
        let kind = rng.below(4);
        let wire_type = [0, 2, 1, 5][kind as usize];
        varint(&mut out, field << 3 | wire_type);
        match wire_type {
            0 => {
                let v = match rng.below(4) {
                    0 => u64::MAX,
                    1 => i64::MIN as u64,
                    2 => rng.below(10),
                    _ => rng.next(),
                };
                varint(&mut out, v);
            }
            2 => {
                let body = if depth < 3 && rng.below(3) == 0 {
                    wire(rng, depth + 1)
                } else {
                    let len = rng.below(40) as usize;
                    (0..len).map(|_| rng.next() as u8).collect()
                };
                varint(&mut out, body.len() as u64);
                out.extend_from_slice(&body);
            }
            1 => out.extend_from_slice(&rng.next().to_le_bytes()),
            _ => out.extend_from_slice(&(rng.next() as u32).to_le_bytes()),
        }
    }
    out
}

fn message(rng: &mut Rng) -> Vec<u8> {
    if rng.below(4) == 0 {
        let len = rng.below(300) as usize;
        (0..len).map(|_| rng.next() as u8).collect()
    } else {
        wire(rng, 0)
    }
}

/// The first message of a response stream, or its error; a stream that
/// goes on (a followed log, a session) is Ok.
async fn first(
    resp: Result<tonic::Response<tonic::codec::Streaming<Vec<u8>>>, Status>,
) -> Result<(), Status> {
    let mut stream = resp?.into_inner();
    match tokio::time::timeout(Duration::from_millis(500), stream.message()).await {
        Ok(Err(status)) => Err(status),
        _ => Ok(()),
    }
}

fn with_token<T>(mut req: Request<T>, token: &str) -> Request<T> {
    req.metadata_mut()
        .insert("authorization", token.parse().unwrap());
    req
}

/// Calls `path` with `body` (as admin; agent calls with the join token);
/// the status (Ok for success).
async fn call(channel: &tonic::transport::Channel, path: &str, body: Vec<u8>) -> Status {
    let mut grpc = tonic::client::Grpc::new(channel.clone());
    grpc.ready().await.unwrap();
    let path = PathAndQuery::from_str(path).unwrap();
    let token = if path.as_str().starts_with("/gpupool.v1.AgentService/") {
        "Bearer test-join-token".to_string()
    } else {
        format!("Bearer {ADMIN_TOKEN}")
    };
    let authed = |body| with_token(Request::new(body), &token);
    let result = if path.as_str().ends_with("/GetJobLogs") {
        first(grpc.server_streaming(authed(body), path, Raw).await).await
    } else if path.as_str().ends_with("/Session") {
        let req = with_token(Request::new(tokio_stream::iter(vec![body])), &token);
        first(grpc.streaming(req, path, Raw).await).await
    } else {
        grpc.unary(authed(body), path, Raw).await.map(|_| ())
    };
    match result {
        Ok(()) => Status::ok(""),
        Err(status) => status,
    }
}

/// A clear answer to bad input: a definite code with a message.
fn clear(status: &Status) -> bool {
    match status.code() {
        Code::Ok => true,
        Code::Internal | Code::Unknown | Code::DataLoss => false,
        _ => !status.message().is_empty(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_rpc_answers_random_and_malformed_messages_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let mut sched = Scheduler::start_with_config(
        dir.path(),
        "[limits]\nrequests_per_second = 0\nmax_request_bytes = 65536\n",
    )
    .await;
    let _agent = Agent::start(dir.path(), &sched, "fz1", "2xH100-80GB");
    wait_ready(&sched, 1).await;
    let seed = std::env::var("FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x9e37_79b9_7f4a_7c15u64);
    let rounds: usize = std::env::var("FUZZ_ROUNDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(60);
    let mut rng = Rng(seed);
    let mut codes = std::collections::BTreeMap::<String, usize>::new();
    let channel = sched.channel().await;
    for (path, _) in ACCESS {
        for round in 0..rounds {
            let body = message(&mut rng);
            let status = call(&channel, path, body.clone()).await;
            assert!(
                clear(&status),
                "{path} round {round} (FUZZ_SEED={seed}): {status:?} for {body:02x?}"
            );
            *codes.entry(format!("{:?}", status.code())).or_default() += 1;
        }
        // Oversized: refused before decoding.
        let status = call(&channel, path, vec![0x0a; 65536 * 4 + 1]).await;
        assert!(
            matches!(status.code(), Code::OutOfRange | Code::ResourceExhausted),
            "{path}: oversized message got {status:?}"
        );
    }
    eprintln!("answers by code: {codes:?}");
    assert!(
        sched.proc.child.try_wait().unwrap().is_none(),
        "scheduler died"
    );
    sched.wait_serving().await;
    let log = sched.proc.log_text();
    assert!(!log.contains("panicked"), "{log}");
    sched.proc.kill();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_caller_past_its_rate_limit_is_told_to_wait_and_others_are_not() {
    let dir = tempfile::tempdir().unwrap();
    let sched =
        Scheduler::start_with_config(dir.path(), "[limits]\nrequests_per_second = 2\nburst = 5\n")
            .await;
    let mut admin = sched.admin().await;
    let token = tenant_with_token(&mut admin, "fast", 0, 0).await;
    let list = |token: String| {
        let s = &sched;
        async move {
            s.clients(Some(&token))
                .await
                .jobs
                .list_jobs(gpupool_proto::v1::ListJobsRequest::default())
                .await
        }
    };
    let mut refused = None;
    for _ in 0..10 {
        if let Err(status) = list(token.clone()).await {
            refused = Some(status);
            break;
        }
    }
    let refused = refused.expect("the 6th quick call is refused");
    assert_eq!(refused.code(), Code::ResourceExhausted);
    assert!(refused.message().contains("rate limit"), "{refused:?}");
    assert!(refused.message().contains("retry in"), "{refused:?}");
    // Another caller still gets through; the first does after waiting.
    assert!(list(ADMIN_TOKEN.to_string()).await.is_ok());
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert!(list(token).await.is_ok());
}
