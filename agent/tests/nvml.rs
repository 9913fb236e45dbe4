//! The NVML probe against the shared conformance checks. Needs an NVIDIA
//! GPU and driver, so it is ignored by default (it shows as "ignored" in
//! every run, never as passed); on a GPU node run
//! `cargo test -p gpupool-agent --test nvml -- --ignored`, or use
//! `gpupool-agent probe --check`, which runs the same checks.

use gpupool_agent::probe::{GpuProbe, NvmlProbe, check_probe};

#[test]
#[ignore = "needs an NVIDIA GPU and driver"]
fn nvml_probe_conforms_on_a_gpu_node() {
    let probe = NvmlProbe::init().expect("NVML must initialise on a GPU node");
    let gpus = probe.gpus();
    assert!(!gpus.is_empty(), "NVML sees no GPU");
    assert_eq!(check_probe(&probe), Vec::<String>::new());
    for g in &gpus {
        assert!(g.memory_total_mib > 0, "{g:?}");
        assert!(!g.pci_bus_id.is_empty(), "{g:?}");
        assert!(g.sm_clock_mhz > 0, "{g:?}");
        assert!(g.temperature_c > 0, "{g:?}");
    }
}
