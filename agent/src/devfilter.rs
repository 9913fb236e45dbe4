//! Device access for cgroup v2: an eBPF `BPF_PROG_TYPE_CGROUP_DEVICE`
//! program attached to the instance's cgroup, the way runc and systemd do it
//! (cgroup v2 has no `devices.allow` file).
//!
//! The program is an allowlist of character devices; everything else (block
//! devices included) is refused with EPERM at open/mknod. It is generated as
//! raw eBPF instructions, loaded with `bpf(BPF_PROG_LOAD)` and attached with
//! `bpf(BPF_PROG_ATTACH, BPF_F_ALLOW_MULTI)`, so programs of the agent's own
//! cgroup (systemd's `DevicePolicy=`) still apply on top. The cgroup holds
//! the program until it is removed; no file descriptor has to stay open.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;

/// One allowed character device (read, write, mknod): a major and one minor
/// or every minor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceRule {
    pub major: u32,
    pub minor: Option<u32>,
}

impl DeviceRule {
    /// The cgroup v1 `devices.allow` line.
    pub fn v1_line(&self) -> String {
        match self.minor {
            Some(m) => format!("c {}:{m} rwm", self.major),
            None => format!("c {}:* rwm", self.major),
        }
    }
}

/// One eBPF instruction (`struct bpf_insn`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Insn {
    code: u8,
    dst: u8,
    src: u8,
    off: i16,
    imm: i32,
}

const BPF_LDX_MEM_W: u8 = 0x61; // BPF_LDX | BPF_MEM | BPF_W
const BPF_ALU64_AND_K: u8 = 0x57; // BPF_ALU64 | BPF_AND | BPF_K
const BPF_ALU64_MOV_K: u8 = 0xb7; // BPF_ALU64 | BPF_MOV | BPF_K
const BPF_JMP_JNE_K: u8 = 0x55; // BPF_JMP | BPF_JNE | BPF_K
const BPF_JMP_EXIT: u8 = 0x95; // BPF_JMP | BPF_EXIT
const BPF_DEVCG_DEV_CHAR: i32 = 2;

const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_PROG_ATTACH: libc::c_long = 8;
const BPF_PROG_TYPE_CGROUP_DEVICE: u32 = 15;
const BPF_CGROUP_DEVICE: u32 = 6;
const BPF_F_ALLOW_MULTI: u32 = 2;

fn insn(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> Insn {
    Insn {
        code,
        dst,
        src,
        off,
        imm,
    }
}

/// The program for `rules`. Context (`struct bpf_cgroup_dev_ctx`):
/// `access_type` (type in the low 16 bits) at 0, `major` at 4, `minor` at 8.
/// Returns 1 to allow, 0 to refuse.
fn program(rules: &[DeviceRule]) -> Vec<Insn> {
    let rule_len = |r: &DeviceRule| if r.minor.is_some() { 4 } else { 3 };
    let rules_len: usize = rules.iter().map(rule_len).sum();
    let mut p = vec![
        insn(BPF_LDX_MEM_W, 2, 1, 0, 0),        // r2 = ctx->access_type
        insn(BPF_ALU64_AND_K, 2, 0, 0, 0xffff), // r2 &= 0xffff (device type)
        insn(BPF_LDX_MEM_W, 3, 1, 4, 0),        // r3 = ctx->major
        insn(BPF_LDX_MEM_W, 4, 1, 8, 0),        // r4 = ctx->minor
        // Not a character device: refuse.
        insn(BPF_JMP_JNE_K, 2, 0, rules_len as i16, BPF_DEVCG_DEV_CHAR),
    ];
    for r in rules {
        let skip = rule_len(r) as i16 - 1;
        p.push(insn(BPF_JMP_JNE_K, 3, 0, skip, r.major as i32));
        if let Some(minor) = r.minor {
            p.push(insn(BPF_JMP_JNE_K, 4, 0, skip - 1, minor as i32));
        }
        p.push(insn(BPF_ALU64_MOV_K, 0, 0, 0, 1));
        p.push(insn(BPF_JMP_EXIT, 0, 0, 0, 0));
    }
    p.push(insn(BPF_ALU64_MOV_K, 0, 0, 0, 0));
    p.push(insn(BPF_JMP_EXIT, 0, 0, 0, 0));
    p
}

fn encode(program: &[Insn]) -> Vec<u64> {
    program
        .iter()
        .map(|i| {
            let mut b = [0u8; 8];
            b[0] = i.code;
            b[1] = (i.src << 4) | (i.dst & 0x0f);
            b[2..4].copy_from_slice(&i.off.to_le_bytes());
            b[4..8].copy_from_slice(&i.imm.to_le_bytes());
            u64::from_ne_bytes(b)
        })
        .collect()
}

/// `union bpf_attr` for BPF_PROG_LOAD, up to `expected_attach_type`.
#[repr(C)]
#[derive(Default)]
struct ProgLoadAttr {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
    kern_version: u32,
    prog_flags: u32,
    prog_name: [u8; 16],
    prog_ifindex: u32,
    expected_attach_type: u32,
}

/// `union bpf_attr` for BPF_PROG_ATTACH.
#[repr(C)]
struct AttachAttr {
    target_fd: u32,
    attach_bpf_fd: u32,
    attach_type: u32,
    attach_flags: u32,
    replace_bpf_fd: u32,
}

fn bpf<T>(cmd: libc::c_long, attr: &mut T) -> std::io::Result<i64> {
    // SAFETY: attr is a live, initialised `union bpf_attr` prefix of the
    // size passed; the kernel reads (and for PROG_LOAD's log, writes to the
    // buffer the attr points at) only within it.
    let r = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr as *mut T as *mut libc::c_void,
            std::mem::size_of::<T>() as libc::c_uint,
        )
    };
    if r < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

/// Loads the allowlist program for `rules` and attaches it to the cgroup v2
/// directory `cgroup_dir`.
pub fn attach(cgroup_dir: &Path, rules: &[DeviceRule]) -> std::io::Result<()> {
    let insns = encode(&program(rules));
    let license = c"Apache-2.0";
    let mut log = vec![0u8; 16 * 1024];
    let mut name = [0u8; 16];
    name[..14].copy_from_slice(b"gpupool_devcg\0");
    let mut load = ProgLoadAttr {
        prog_type: BPF_PROG_TYPE_CGROUP_DEVICE,
        insn_cnt: insns.len() as u32,
        insns: insns.as_ptr() as u64,
        license: license.as_ptr() as u64,
        log_level: 1,
        log_size: log.len() as u32,
        log_buf: log.as_mut_ptr() as u64,
        prog_name: name,
        ..Default::default()
    };
    let prog = bpf(BPF_PROG_LOAD, &mut load).map_err(|e| {
        let verifier = String::from_utf8_lossy(&log);
        let verifier = verifier.trim_end_matches('\0').trim();
        std::io::Error::new(
            e.kind(),
            format!("loading the cgroup device program: {e}; verifier: {verifier}"),
        )
    })?;
    // SAFETY: the kernel just returned this fd to us and nothing else owns it.
    let prog = unsafe { OwnedFd::from_raw_fd(prog as i32) };
    let dir = std::fs::File::open(cgroup_dir)?;
    let mut at = AttachAttr {
        target_fd: dir.as_raw_fd() as u32,
        attach_bpf_fd: prog.as_raw_fd() as u32,
        attach_type: BPF_CGROUP_DEVICE,
        attach_flags: BPF_F_ALLOW_MULTI,
        replace_bpf_fd: 0,
    };
    bpf(BPF_PROG_ATTACH, &mut at).map_err(|e| {
        std::io::Error::new(
            e.kind(),
            format!(
                "attaching the device program to {}: {e}",
                cgroup_dir.display()
            ),
        )
    })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs the generated program on a context, as the kernel would.
    fn eval(p: &[Insn], dev_type: u32, major: u32, minor: u32) -> u64 {
        let ctx = [dev_type | (6 << 16), major, minor];
        let mut r = [0u64; 11];
        let mut pc = 0usize;
        loop {
            let i = p[pc];
            pc += 1;
            match i.code {
                BPF_LDX_MEM_W => r[i.dst as usize] = u64::from(ctx[i.off as usize / 4]),
                BPF_ALU64_AND_K => r[i.dst as usize] &= i.imm as u64,
                BPF_ALU64_MOV_K => r[i.dst as usize] = i.imm as u64,
                BPF_JMP_JNE_K => {
                    if r[i.dst as usize] != i.imm as u64 {
                        pc = (pc as i64 + i64::from(i.off)) as usize;
                    }
                }
                BPF_JMP_EXIT => return r[0],
                other => panic!("unexpected opcode {other:#x}"),
            }
        }
    }

    #[test]
    fn allowlist_program_allows_exactly_its_rules() {
        let rules = [
            DeviceRule {
                major: 1,
                minor: Some(3),
            },
            DeviceRule {
                major: 136,
                minor: None,
            },
            DeviceRule {
                major: 195,
                minor: Some(2),
            },
        ];
        let p = program(&rules);
        assert_eq!(eval(&p, 2, 1, 3), 1, "/dev/null");
        assert_eq!(eval(&p, 2, 136, 7), 1, "any pts");
        assert_eq!(eval(&p, 2, 195, 2), 1, "its GPU");
        assert_eq!(eval(&p, 2, 195, 0), 0, "another GPU");
        assert_eq!(eval(&p, 2, 1, 11), 0, "kmsg");
        assert_eq!(eval(&p, 1, 1, 3), 0, "a block device with null's numbers");
        assert_eq!(eval(&program(&[]), 2, 1, 3), 0, "empty allowlist");
    }

    #[test]
    fn instructions_encode_little_endian_with_registers_packed() {
        let e = encode(&[insn(BPF_LDX_MEM_W, 3, 1, 4, 0)]);
        assert_eq!(e[0].to_ne_bytes(), [0x61, 0x13, 4, 0, 0, 0, 0, 0]);
    }
}
