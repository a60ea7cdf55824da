//! `bench`: placeholder filled in the next step.
use crate::config::Config;
/// Runs the benchmarks.
pub fn run(_config: &Config) -> bool {
    true
}
