//! Generated protobuf messages and gRPC stubs for every k8shell API.
//!
//! Sources live in the repository's top-level `proto/` directory. This crate
//! holds no logic, so every service and client can depend on it.

/// Provisioner API (`k8shell.provisioner.v1`).
pub mod provisioner {
    /// Version 1.
    #[allow(clippy::all, missing_docs)]
    pub mod v1 {
        tonic::include_proto!("k8shell.provisioner.v1");
    }
}

/// Workspace daemon API (`k8shell.k8shelld.v1`).
pub mod k8shelld {
    /// Version 1.
    #[allow(clippy::all, missing_docs)]
    pub mod v1 {
        tonic::include_proto!("k8shell.k8shelld.v1");
    }
}

/// Identity API (`k8shell.identity.v1`).
pub mod identity {
    /// Version 1.
    #[allow(clippy::all, missing_docs)]
    pub mod v1 {
        tonic::include_proto!("k8shell.identity.v1");
    }
}

/// Authz API (`k8shell.authz.v1`).
pub mod authz {
    /// Version 1.
    #[allow(clippy::all, missing_docs)]
    pub mod v1 {
        tonic::include_proto!("k8shell.authz.v1");
    }
}

/// Encoded `FileDescriptorSet` of every k8shell proto, for gRPC reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("k8shell_descriptor");
