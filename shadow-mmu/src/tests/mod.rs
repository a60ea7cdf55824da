//! Host tests of the whole crate: the reference model, the exhaustive permutation test, scenario
//! tests of the shadow fault path and property tests (the fakes and the property model are in
//! `crate::testing`).

mod exhaustive;
mod p2m;
mod props;
mod reference;
mod scenarios;
