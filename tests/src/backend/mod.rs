//! The backends a mesh runs on, each in its own room: [`process`] (local
//! processes on loopback), [`docker`] (one container per component) and
//! [`kind`] (the kind/ manifests in a kind cluster, through kubectl).
//! Both keep a [`MeshState`] (spec, the harness's cluster, pods, spans),
//! which the [`Topology`](crate::topology::Topology) accessors read, and
//! both build a real Envoy's bootstrap with [`envoy`].

pub mod docker;
pub mod envoy;
pub mod kind;
pub mod process;
mod state;

pub use state::MeshState;
pub(crate) use state::write;
