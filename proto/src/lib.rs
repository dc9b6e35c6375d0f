//! jobplane's wire API: the types and tonic services generated from `jobplane/v1/*.proto`.
//!
//! Generated types stop at the edges: the service converts them into validated domain types in
//! its `api` module, and the SDK into its own types.

/// Generated code of package `jobplane.v1`.
#[allow(clippy::all, clippy::pedantic, missing_docs)]
pub mod pb {
    tonic::include_proto!("jobplane.v1");
}

/// Encoded `FileDescriptorSet` of the API, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/jobplane_descriptor.bin"));
