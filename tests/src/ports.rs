//! Loopback ports for the components the harness starts: the workspace's one
//! reservation scheme ([`meshid_common::testing::ports`], outside the
//! kernel's ephemeral range and locked against other runs), with the
//! harness's error type.

use std::net::SocketAddr;

use crate::Error;

/// A port the component binds next; see [`meshid_common::testing::ports::reserve`].
pub fn reserve() -> Result<SocketAddr, Error> {
    meshid_common::testing::ports::reserve()
        .map_err(|e| Error::Setup(format!("reserving a loopback port: {e}")))
}
