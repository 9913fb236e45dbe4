//! An image for the GPU node check (a program, not a test):
//! `gpuimage ROOTFS_DIR REPO:TAG OUT_FILE`.
//!
//! Starts a `docker-registry` on 127.0.0.1 (Debian's, or the binary in
//! `GPUPOOL_DOCKER_REGISTRY`, so one can be carried to a machine without
//! it), pushes ROOTFS_DIR as a one-layer image, writes the image reference
//! to OUT_FILE and serves until its standard input closes.

use std::io::Read;

use gpupool_e2e::registry::{BusyboxConfig, Layer, ManifestFormat, Registry, image_config};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [rootfs, reference, out] = &args[..] else {
        eprintln!("usage: gpuimage ROOTFS_DIR REPO:TAG OUT_FILE");
        std::process::exit(2);
    };
    let (repo, tag) = reference.split_once(':').expect("REPO:TAG");
    let mut tar = tar::Builder::new(Vec::new());
    tar.follow_symlinks(false);
    tar.append_dir_all(".", rootfs)
        .expect("the root file system packs");
    let tar = tar.into_inner().unwrap();
    let layer = Layer::gzip(&tar);
    let config = image_config(
        &BusyboxConfig {
            cmd: vec!["/bin/sh".into()],
            env: vec!["PATH=/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin".into()],
            ..BusyboxConfig::default()
        },
        &[layer.diff_id.clone().unwrap()],
    );
    let registry = Registry::start();
    let digest = registry.push_image(repo, tag, &[layer], &config, ManifestFormat::Oci);
    std::fs::write(out, format!("{}/{repo}:{tag}\n", registry.addr)).unwrap();
    eprintln!("pushed {}/{repo}:{tag} ({digest})", registry.addr);
    let _ = std::io::stdin().read_to_end(&mut Vec::new());
}
