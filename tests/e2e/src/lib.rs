//! End-to-end tests of k8shell through its public interfaces only; the
//! tests live in `tests/`.
