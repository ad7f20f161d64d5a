//! What the docker backend ([`crate::docker_backend`]) stands on: images
//! built locally from our binaries ([`image`]), the pod sandbox's
//! port-forwarder ([`forward`]), and a few `docker` CLI calls ([`cli`]) for
//! what testcontainers does not cover (image builds, networks, inspection).

pub mod cli;
pub mod forward;
pub mod image;

use crate::Error;

/// An [`Error::Docker`] for `action`.
pub(crate) fn error(action: impl Into<String>, message: impl std::fmt::Display) -> Error {
    Error::Docker {
        action: action.into(),
        message: message.to_string(),
    }
}
