//! End-to-end suites: not built yet (issue 7).
