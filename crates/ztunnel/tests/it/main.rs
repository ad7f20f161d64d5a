//! meshid-ztunnel integration tests: one binary, a module per concern (fewer
//! binaries to link and store: each was a full copy of the ztunnel and its deps).

mod ca;
mod capture;
mod hbone;
mod rotation;
mod support;
mod trace;
