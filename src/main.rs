use clap::Parser;

/// mimalloc: the hit path allocates and frees a few dozen small objects per
/// request; glibc's malloc/free were ~14% of a cache hit's CPU in profiles.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    rungen_gateway::cli::run(rungen_gateway::cli::Cli::parse())
}
