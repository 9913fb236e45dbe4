//! `gpupool-shim`: the instance shim alone (`gpupool_agent::shim`), the
//! small binary the agent starts every instance under when it lies beside
//! the agent and is of the same build (`--build-id`); the agent binary runs
//! the same code as `gpupool-agent shim ...` otherwise.

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("--build-id") {
        println!("{}", gpupool_agent::shim::BUILD_ID);
        return;
    }
    gpupool_agent::shim::run_if_shim(&args);
    eprintln!(
        "usage: gpupool-shim shim EXIT_FILE [OPTIONS] -- COMMAND [ARGS...] \
         (gpupool-agent starts it for each instance)"
    );
    std::process::exit(2);
}
