//! The `agentmesh` command: the node, its operator tools and the built-in demo agents.

fn main() -> std::process::ExitCode {
    agentmesh::Cli::new().run()
}
