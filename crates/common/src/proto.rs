//! Generated wire types and gRPC stubs, compiled from `proto/` at build time.
//! Modules nest by proto package because generated code refers across
//! packages with relative paths; the short aliases below are what callers use.

#![allow(clippy::all, missing_debug_implementations, missing_docs)]

pub mod istio {
    pub mod v1 {
        pub mod auth {
            tonic::include_proto!("istio.v1.auth");
        }
    }
}

pub mod google {
    pub mod rpc {
        tonic::include_proto!("google.rpc");
    }
}

pub mod envoy {
    pub mod config {
        pub mod core {
            pub mod v3 {
                tonic::include_proto!("envoy.config.core.v3");
            }
        }
    }
    pub mod service {
        pub mod discovery {
            pub mod v3 {
                tonic::include_proto!("envoy.service.discovery.v3");
            }
        }
        pub mod secret {
            pub mod v3 {
                tonic::include_proto!("envoy.service.secret.v3");
            }
        }
    }
    pub mod extensions {
        pub mod transport_sockets {
            pub mod tls {
                pub mod v3 {
                    tonic::include_proto!("envoy.extensions.transport_sockets.tls.v3");
                }
            }
        }
    }
}

pub mod meshid {
    pub mod v1 {
        tonic::include_proto!("meshid.v1");
    }
}

/// The SPIFFE Workload API (no proto package).
pub mod workload {
    tonic::include_proto!("_");
}

/// Envoy's core types used by SDS (`Node`, `DataSource`).
pub use envoy::config::core::v3 as envoy_core;
/// SDS secret types.
pub use envoy::extensions::transport_sockets::tls::v3 as tls;
/// State-of-the-world discovery requests and responses.
pub use envoy::service::discovery::v3 as discovery;
/// The SecretDiscoveryService.
pub use envoy::service::secret::v3 as sds;
/// `istio.v1.auth`: the Istio certificate service.
pub use istio::v1::auth as istio_ca;
/// `meshid.v1`: the CA's JWT-SVID service.
pub use meshid::v1 as jwt_svid;
