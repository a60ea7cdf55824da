//! Trap accounting: counts and costs per trap kind, and the exit table.
