//! `gpupool`: command-line client of the gpupool scheduler (see `gpupool --help`).

fn main() -> std::process::ExitCode {
    gpupool_proto::install_tls_provider();
    gpupool_cli::main()
}
