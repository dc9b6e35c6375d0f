//! Compiles `jobplane/v1/*.proto` with protox (no system protoc) and generates the tonic code
//! plus a file descriptor set for server reflection.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = [
        "jobplane/v1/job.proto",
        "jobplane/v1/job_service.proto",
        "jobplane/v1/worker_service.proto",
        "jobplane/v1/admin_service.proto",
    ];
    for f in files {
        println!("cargo:rerun-if-changed={f}");
    }
    let fds = protox::compile(files, ["."])?;
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(
        out.join("jobplane_descriptor.bin"),
        prost::Message::encode_to_vec(&fds),
    )?;
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        // `WorkerService.Connect` would clash with the generated `connect` constructor; clients
        // are built with `new(channel)` instead.
        .build_transport(false)
        .bytes(".")
        .compile_fds(fds)?;
    Ok(())
}
