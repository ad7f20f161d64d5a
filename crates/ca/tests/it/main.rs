//! meshid-ca integration tests: one binary, a module per concern (fewer
//! binaries to link and store: each was a full copy of the CA and its deps).

mod grpc;
mod jwt_svid;
mod kube;
mod support;
mod trace;
mod vault;
