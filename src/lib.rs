//! Host-side helpers for the QEMU integration tests.
