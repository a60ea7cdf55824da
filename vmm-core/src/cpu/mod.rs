//! The virtual CPU: state, decode and emulation, event delivery and injection.
