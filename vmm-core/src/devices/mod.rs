//! Virtual devices behind a port bus: 8259A pair, 8254, 16550, isa-debug-exit.
