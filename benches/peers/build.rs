//! Generates the tonic client and server for the benchmark service from Rust, with
//! prost messages defined in `src/grpc.rs` (no .proto file, so no protoc needed).

fn main() {
    let method = |name: &str, route: &str, input: &str, output: &str| {
        tonic_build::manual::Method::builder()
            .name(name)
            .route_name(route)
            .input_type(format!("crate::grpc::{input}"))
            .output_type(format!("crate::grpc::{output}"))
            .codec_path("tonic_prost::ProstCodec")
    };
    let service = tonic_build::manual::Service::builder()
        .name("Bench")
        .package("agentmesh.bench")
        .method(
            method("stream", "Stream", "Blob", "Ack")
                .client_streaming()
                .server_streaming()
                .build(),
        )
        .method(method("echo", "Echo", "Blob", "Blob").build())
        .method(
            method("bulk", "Bulk", "Blob", "Ack")
                .client_streaming()
                .build(),
        )
        .build();
    tonic_build::manual::Builder::new().compile(&[service]);
}
