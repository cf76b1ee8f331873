use clap::Parser;

fn main() -> std::process::ExitCode {
    rungen_gateway::cli::run(rungen_gateway::cli::Cli::parse())
}
