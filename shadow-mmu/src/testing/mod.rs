//! Test doubles and the property model of the shadow MMU, shared by its unit tests
//! (`src/tests`) and the fuzz targets (`fuzz/`, which build this crate with the feature
//! `testing`): Vec-backed fakes of the machine traits ([`fake`]) and the step model with its
//! invariant checks ([`model`]). Never part of a VMM build.

pub mod fake;
pub mod model;
