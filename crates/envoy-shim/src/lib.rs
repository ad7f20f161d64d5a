//! meshid-envoy-shim: not built yet (see its issue); the crate exists so the workspace layout is final.
