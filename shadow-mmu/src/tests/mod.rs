//! Host tests of the whole crate: the reference model, the exhaustive permutation test, fakes of
//! the machine traits, scenario tests of the shadow fault path and property tests.

mod exhaustive;
mod fake;
mod p2m;
mod props;
mod reference;
mod scenarios;
