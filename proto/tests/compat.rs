//! `gpupool.v1` changes only compatibly: what the previous release sends
//! still decodes, and what it expects is still there.
//!
//! `compat/RELEASE/` holds, frozen when RELEASE was cut (never rewritten):
//! `descriptor.binpb`, the release's `FileDescriptorSet`, and `*.binpb`
//! messages encoded by the release. The checks:
//! - every message, field, enum value, service and method of the release
//!   is still there with the same number, type, label and streaming (a
//!   field may go only if its number is reserved), as `buf breaking`'s
//!   wire rules ask;
//! - each frozen message decodes into the value the release encoded.
//!
//! Cutting a release: `GPUPOOL_FREEZE_PROTO=RELEASE cargo test -p
//! gpupool-proto --test compat` writes `compat/RELEASE/` from this build,
//! then point [`PREVIOUS`] at it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use gpupool_proto::prost::Message;
use gpupool_proto::prost_types::field_descriptor_proto::{Label, Type as FieldType};
use gpupool_proto::prost_types::{
    DescriptorProto, FieldDescriptorProto, FileDescriptorSet, ServiceDescriptorProto,
};
use gpupool_proto::v1 as pb;

/// The release this build must stay compatible with (tests/previous-release).
const PREVIOUS: &str = "0.1.0";

fn compat_dir(release: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("compat")
        .join(release)
}

/// A frozen message, of its type.
#[derive(Debug, PartialEq)]
enum Sample {
    Register(pb::RegisterRequest),
    Agent(pb::AgentMessage),
    Scheduler(pb::SchedulerMessage),
    Spec(pb::JobSpec),
}

impl Sample {
    fn encode(&self) -> Vec<u8> {
        match self {
            Sample::Register(m) => m.encode_to_vec(),
            Sample::Agent(m) => m.encode_to_vec(),
            Sample::Scheduler(m) => m.encode_to_vec(),
            Sample::Spec(m) => m.encode_to_vec(),
        }
    }

    /// `bytes` decoded as the same type as `self`.
    fn decode_like(&self, bytes: &[u8]) -> Sample {
        match self {
            Sample::Register(_) => Sample::Register(Message::decode(bytes).unwrap()),
            Sample::Agent(_) => Sample::Agent(Message::decode(bytes).unwrap()),
            Sample::Scheduler(_) => Sample::Scheduler(Message::decode(bytes).unwrap()),
            Sample::Spec(_) => Sample::Spec(Message::decode(bytes).unwrap()),
        }
    }
}

/// The messages the release filled these ways (the agent's session and
/// registration, the scheduler's orders, a job spec), frozen as it encoded
/// them. Never set a newer release's field here: the frozen bytes lack it.
/// A field removed (its number reserved) goes from here too.
fn samples() -> Vec<(&'static str, Sample)> {
    let gpu = pb::Gpu {
        index: 3,
        uuid: "GPU-0b1c".into(),
        model: "NVIDIA H100 80GB HBM3".into(),
        memory_total_mib: 81_559,
        healthy: false,
        health_reason: "XID 79".into(),
        pci_bus_id: "0000:1b:00.0".into(),
        utilization_pct: 87,
        memory_used_mib: 40_000,
        temperature_c: 61,
        power_mw: 512_000,
        ..Default::default()
    };
    let inventory = pb::Inventory {
        hostname: "gpu-17".into(),
        cpu_cores: 96,
        cpu_model: "EPYC".into(),
        memory_mib: 1_048_576,
        gpus: vec![gpu.clone()],
        os: "Debian 12".into(),
        kernel: "6.1.0".into(),
        az: "AZ2".into(),
        labels: [("rack".to_string(), "r4".to_string())].into(),
        fake_gpus: true,
        address: "10.0.0.17".into(),
    };
    let status = pb::InstanceStatus {
        instance_id: "j-000042-0-1".into(),
        state: pb::InstanceState::Failed as i32,
        exit_code: Some(137),
        signal: Some(9),
        reason: "OOM".into(),
        pid: 4242,
        port: 20_001,
        ready: true,
        idle_ms: Some(90_000),
        image_digest: "sha256:abc".into(),
        pulling: true,
        pull_done_bytes: 10,
        pull_total_bytes: 20,
    };
    let resources = pb::Resources {
        gpus: 2,
        gpu_milli: 0,
        gpu_models: vec!["H100-80GB".into()],
        cpu_milli: 4000,
        memory_mib: 16_384,
    };
    let health = pb::HealthCheck {
        http_path: "/healthz".into(),
        interval_ms: 500,
        timeout_ms: 700,
        ..Default::default()
    };
    let register = pb::RegisterRequest {
        node_id: "gpu-17".into(),
        inventory: Some(inventory.clone()),
        agent_version: "0.1.0".into(),
    };
    let hello = pb::AgentMessage {
        msg: Some(pb::agent_message::Msg::Hello(pb::SessionHello {
            node_id: "gpu-17".into(),
            instances: vec![status.clone()],
        })),
    };
    let heartbeat = pb::AgentMessage {
        msg: Some(pb::agent_message::Msg::Heartbeat(pb::Heartbeat {
            sent_at: Some(gpupool_proto::timestamp_from_unix_ms(1_790_000_000_123)),
            inventory: Some(inventory),
            instances: vec![status],
            gpu_samples: vec![gpu],
        })),
    };
    let start = pb::SchedulerMessage {
        msg: Some(pb::scheduler_message::Msg::Start(pb::StartInstance {
            instance_id: "j-000042-0-1".into(),
            job_id: "j-000042".into(),
            kind: pb::JobKind::OnlineService as i32,
            command: vec!["serve".into(), "--port".into(), "{port}".into()],
            env: [("A".to_string(), "1".to_string())].into(),
            working_dir: "/srv".into(),
            gpu_indexes: vec![0, 3],
            gpu_uuids: vec!["GPU-a".into(), "GPU-b".into()],
            resources: Some(resources.clone()),
            rank: 1,
            world_size: 2,
            metadata: [("GPUPOOL_NETWORK_ID".to_string(), "n1".to_string())].into(),
            needs_port: true,
            port: 8080,
            health_check: Some(health.clone()),
            watch_activity: true,
            image: "registry.local/app:1".into(),
            network: "none".into(),
            attach: None,
        })),
    };
    let stop = pb::SchedulerMessage {
        msg: Some(pb::scheduler_message::Msg::Stop(pb::StopInstance {
            instance_id: "j-000042-0-1".into(),
            grace_ms: 10_000,
            reason: "drained".into(),
        })),
    };
    let spec = pb::JobSpec {
        name: "train".into(),
        kind: pb::JobKind::Training as i32,
        pool: "rp-1".into(),
        resources: Some(resources),
        instances: 2,
        command: vec!["python".into(), "train.py".into()],
        env: [("SEED".to_string(), "7".to_string())].into(),
        working_dir: "/work".into(),
        priority: 5,
        max_runtime_secs: 3600,
        max_retries: 2,
        port: 0,
        completions: 0,
        health_check: Some(health),
        ..Default::default()
    };
    vec![
        ("register_request", Sample::Register(register)),
        ("agent_hello", Sample::Agent(hello)),
        ("agent_heartbeat", Sample::Agent(heartbeat)),
        ("scheduler_start", Sample::Scheduler(start)),
        ("scheduler_stop", Sample::Scheduler(stop)),
        ("job_spec", Sample::Spec(spec)),
    ]
}

fn current() -> FileDescriptorSet {
    FileDescriptorSet::decode(gpupool_proto::FILE_DESCRIPTOR_SET).unwrap()
}

#[test]
fn freeze_when_asked() {
    let Ok(release) = std::env::var("GPUPOOL_FREEZE_PROTO") else {
        return;
    };
    let dir = compat_dir(&release);
    assert!(
        !dir.exists(),
        "{} exists: frozen files are never rewritten",
        dir.display()
    );
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("descriptor.binpb"), current().encode_to_vec()).unwrap();
    for (name, sample) in samples() {
        std::fs::write(dir.join(format!("{name}.binpb")), sample.encode()).unwrap();
    }
}

#[test]
fn the_previous_release_s_messages_decode() {
    let dir = compat_dir(PREVIOUS);
    let samples = samples();
    for (name, sample) in &samples {
        let frozen = std::fs::read(dir.join(format!("{name}.binpb"))).unwrap();
        assert_eq!(
            &sample.decode_like(&frozen),
            sample,
            "{name}: what release {PREVIOUS} sent no longer decodes to what it meant"
        );
    }
    let frozen = std::fs::read_dir(&dir).unwrap().count() - 1;
    assert_eq!(frozen, samples.len(), "frozen samples in {}", dir.display());
}

/// Everything one side of the protocol can name, keyed by full name.
#[derive(Default)]
struct Schema {
    messages: BTreeMap<String, DescriptorProto>,
    enums: BTreeMap<String, Vec<(String, i32)>>,
    services: BTreeMap<String, ServiceDescriptorProto>,
}

impl Schema {
    fn of(set: &FileDescriptorSet) -> Self {
        fn walk(s: &mut Schema, prefix: &str, m: &DescriptorProto) {
            let name = format!("{prefix}.{}", m.name());
            for e in &m.enum_type {
                s.add_enum(&name, e);
            }
            for nested in &m.nested_type {
                walk(s, &name, nested);
            }
            s.messages.insert(name, m.clone());
        }
        let mut s = Schema::default();
        for file in set.file.iter().filter(|f| f.package() == "gpupool.v1") {
            let prefix = format!(".{}", file.package());
            for m in &file.message_type {
                walk(&mut s, &prefix, m);
            }
            for e in &file.enum_type {
                s.add_enum(&prefix, e);
            }
            for svc in &file.service {
                s.services
                    .insert(format!("{prefix}.{}", svc.name()), svc.clone());
            }
        }
        s
    }

    fn add_enum(&mut self, prefix: &str, e: &gpupool_proto::prost_types::EnumDescriptorProto) {
        let values = e
            .value
            .iter()
            .map(|v| (v.name().to_string(), v.number()))
            .collect();
        self.enums.insert(format!("{prefix}.{}", e.name()), values);
    }
}

/// What the previous release relies on that `new` breaks, in words.
fn breaking_changes(old: &Schema, new: &Schema) -> Vec<String> {
    let mut out = Vec::new();
    for (name, m) in &old.messages {
        let Some(n) = new.messages.get(name) else {
            out.push(format!("message {name} is gone"));
            continue;
        };
        let reserved = |num: i32| {
            n.reserved_range
                .iter()
                .any(|r| r.start() <= num && num < r.end())
        };
        for f in &m.field {
            match n.field.iter().find(|g| g.number() == f.number()) {
                None if reserved(f.number()) => {}
                None => out.push(format!(
                    "{name}.{} (field {}) is gone without reserving its number",
                    f.name(),
                    f.number()
                )),
                Some(g) => {
                    if wire_shape(m, f) != wire_shape(n, g) {
                        out.push(format!(
                            "{name} field {} changed from {:?} to {:?}",
                            f.number(),
                            wire_shape(m, f),
                            wire_shape(n, g)
                        ));
                    }
                }
            }
        }
    }
    for (name, values) in &old.enums {
        let Some(n) = new.enums.get(name) else {
            out.push(format!("enum {name} is gone"));
            continue;
        };
        for (value, number) in values {
            if !n.iter().any(|(_, k)| k == number) {
                out.push(format!("enum {name}: {value} = {number} is gone"));
            }
        }
    }
    for (name, svc) in &old.services {
        let Some(n) = new.services.get(name) else {
            out.push(format!("service {name} is gone"));
            continue;
        };
        for rpc in &svc.method {
            let shape = |r: &gpupool_proto::prost_types::MethodDescriptorProto| {
                (
                    r.input_type().to_string(),
                    r.output_type().to_string(),
                    r.client_streaming(),
                    r.server_streaming(),
                )
            };
            match n.method.iter().find(|r| r.name() == rpc.name()) {
                None => out.push(format!("rpc {name}/{} is gone", rpc.name())),
                Some(r) if shape(r) != shape(rpc) => out.push(format!(
                    "rpc {name}/{} changed from {:?} to {:?}",
                    rpc.name(),
                    shape(rpc),
                    shape(r)
                )),
                Some(_) => {}
            }
        }
    }
    out
}

/// What decides how a field of `m` is read: its type, the message or enum
/// it names, its label, whether it is `optional`, and the oneof it belongs
/// to, by name (an `optional` field's synthetic oneof is not one).
fn wire_shape(
    m: &DescriptorProto,
    f: &FieldDescriptorProto,
) -> (FieldType, String, Label, bool, Option<String>) {
    let oneof = f
        .oneof_index
        .filter(|_| !f.proto3_optional())
        .and_then(|i| m.oneof_decl.get(usize::try_from(i).ok()?))
        .map(|o| o.name().to_string());
    (
        f.r#type(),
        f.type_name().to_string(),
        f.label(),
        f.proto3_optional(),
        oneof,
    )
}

#[test]
fn nothing_the_previous_release_relies_on_changed() {
    let frozen = std::fs::read(compat_dir(PREVIOUS).join("descriptor.binpb")).unwrap();
    let old = Schema::of(&FileDescriptorSet::decode(frozen.as_slice()).unwrap());
    assert!(
        old.messages.len() > 50 && old.services.len() > 5,
        "frozen descriptor looks empty"
    );
    let broken = breaking_changes(&old, &Schema::of(&current()));
    assert!(
        broken.is_empty(),
        "gpupool.v1 changed incompatibly with release {PREVIOUS}:\n{}",
        broken.join("\n")
    );
}

/// The checker itself finds what it must: a renumbered field, a removed
/// field, a removed RPC, a changed enum.
#[test]
fn the_check_finds_breaking_changes() {
    let base = current();
    let old = Schema::of(&base);
    let mut edited = base.clone();
    let file = edited
        .file
        .iter_mut()
        .find(|f| f.name().ends_with("agent.proto"))
        .unwrap();
    let reg = file
        .message_type
        .iter_mut()
        .find(|m| m.name() == "RegisterRequest")
        .unwrap();
    reg.field.retain(|f| f.name() != "agent_version");
    reg.field
        .iter_mut()
        .find(|f| f.name() == "node_id")
        .unwrap()
        .set_type(FieldType::Bytes);
    file.service[0].method.retain(|m| m.name() != "Register");
    // Heartbeat.sent_at renumbered 1 -> 20.
    let heartbeat = file
        .message_type
        .iter_mut()
        .find(|m| m.name() == "Heartbeat")
        .unwrap();
    heartbeat.field[0].number = Some(20);
    // InstanceState loses LOST (in common.proto).
    let common = edited
        .file
        .iter_mut()
        .find(|f| f.name().ends_with("common.proto"))
        .unwrap();
    let states = common
        .enum_type
        .iter_mut()
        .find(|e| e.name() == "InstanceState")
        .unwrap();
    states.value.retain(|v| v.name() != "INSTANCE_STATE_LOST");
    let found = breaking_changes(&old, &Schema::of(&edited)).join("\n");
    for says in [
        "RegisterRequest.agent_version (field 3) is gone",
        "RegisterRequest field 1 changed",
        "rpc .gpupool.v1.AgentService/Register is gone",
        "Heartbeat.sent_at (field 1) is gone without reserving its number",
        "enum .gpupool.v1.InstanceState: INSTANCE_STATE_LOST",
    ] {
        assert!(found.contains(says), "missed {says:?} in:\n{found}");
    }
    assert!(breaking_changes(&old, &old).is_empty());

    // Compatible: a new field, a new `optional` one (a synthetic oneof
    // ahead of the real ones' indexes), a removed field whose number is
    // reserved.
    let mut grown = base.clone();
    let agent = grown
        .file
        .iter_mut()
        .find(|f| f.name().ends_with("agent.proto"))
        .unwrap();
    let status = agent
        .message_type
        .iter_mut()
        .find(|m| m.name() == "InstanceStatus")
        .unwrap();
    let mut extra = status.field[0].clone();
    extra.name = Some("added".into());
    extra.number = Some(99);
    status.field.push(extra);
    let message = agent
        .message_type
        .iter_mut()
        .find(|m| m.name() == "AgentMessage")
        .unwrap();
    message.oneof_decl.insert(
        0,
        gpupool_proto::prost_types::OneofDescriptorProto {
            name: Some("_added".into()),
            options: None,
        },
    );
    for f in &mut message.field {
        f.oneof_index = f.oneof_index.map(|i| i + 1);
    }
    let stop = agent
        .message_type
        .iter_mut()
        .find(|m| m.name() == "StopInstance")
        .unwrap();
    stop.field.retain(|f| f.number() != 3);
    stop.reserved_range.push(
        gpupool_proto::prost_types::descriptor_proto::ReservedRange {
            start: Some(3),
            end: Some(4),
        },
    );
    let flagged = breaking_changes(&old, &Schema::of(&grown));
    assert!(
        flagged.is_empty(),
        "compatible changes flagged: {flagged:#?}"
    );
}
