#!/usr/bin/env bash
# Runs every benchmark against peers and writes docs/benchmarks.md (figures and the
# machine they came from). Needs root for the network namespace of the head-of-line
# runs; installs ethtool and nftables if they are missing. About 10 minutes on 2 cores once built.
#
#   benches/run.sh                  # everything, written to docs/benchmarks.md
#   benches/run.sh --loss 0,2,5     # any `peers report` flag passes through
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v nft >/dev/null || ! command -v ethtool >/dev/null; then
    apt-get update -qq && apt-get install -y -qq nftables ethtool iproute2 >/dev/null
fi

# Three separate builds: ractor_cluster needs ractor's `cluster` feature, which must
# not reach the AgentMesh crates (see the workspace Cargo.toml).
cargo build --release --locked -p agentmesh
cargo build --release --locked -p agentmesh-ractor-peer
cargo build --release --locked -p agentmesh-peers

exec target/release/peers report --bin-dir target/release "$@"
