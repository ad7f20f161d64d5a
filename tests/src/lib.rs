//! meshid-tests is the end-to-end harness. It brings up a mesh (CA, sidecar
//! pods of agent + proxy + app, ztunnel nodes with ambient workloads) on a
//! backend, runs the suites against it through the [`topology::Topology`]
//! trait only, collects every component's spans with an in-process OTLP
//! receiver ([`otlp`]), and reports results as a table, JUnit XML and JSON
//! ([`report`]) with the issuance trace drawn as a waterfall ([`waterfall`]).
//! `cargo xtask e2e` runs its `meshid-e2e` binary.

pub mod otlp;
pub mod report;
pub mod waterfall;
