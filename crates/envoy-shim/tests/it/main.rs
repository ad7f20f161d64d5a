//! Integration tests of meshid-envoy-shim, run in-process on 127.0.0.1:
//! one test binary, one module per concern.

mod agent;
mod agent_sds;
mod envoy;
mod inbound;
mod openssl;
mod outbound;
mod scripted_sds;
mod sds;
mod support;
