//! meshid-agent integration tests: one binary, a module per concern.

mod admin;
mod binary;
mod ca_wire;
mod envoy;
mod grpcio;
mod hygiene;
mod jwt_svid;
mod real_ca;
mod sds;
mod support;
mod trace;
mod workload_api;
