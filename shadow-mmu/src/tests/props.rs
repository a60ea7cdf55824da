//! Property tests of the shadow MMU: random guest page tables and random steps, played through
//! the model in `crate::testing::model` (which says what is checked after every step), in both
//! policies, with and without unsync, sharing and prefetch. Each test starts in one policy and
//! switches at random points (`set_policy` at run time), and draws CR4.PGE. The fuzz target
//! `shadow_mmu` (`fuzz/`) runs the same model on inputs a coverage-guided engine chooses.

use proptest::prelude::*;
use std::vec::Vec;

use crate::shadow::{Policy, MIN_SHADOW_QUOTA};
use crate::testing::model::{run, run_with, Step, Switches, ADDRS};

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        8 => (any::<bool>(), 0..ADDRS, 0..3u8).prop_map(|(view, addr, kind)| Step::Access { view, addr, kind }),
        3 => (any::<bool>(), 0..ADDRS).prop_map(|(view, addr)| Step::ReadThenWrite { view, addr }),
        3 => (0..18usize, any::<u8>(), any::<u8>(), any::<u8>(), any::<bool>())
            .prop_map(|(slot, kind, target, flags, invalidate)| Step::PteWrite { slot, kind, target, flags, invalidate }),
        1 => (0..ADDRS).prop_map(|addr| Step::Invlpg { addr }),
        2 => (0..2usize).prop_map(|which| Step::LoadCr3 { which }),
        1 => Just(Step::FlushAll),
        1 => Just(Step::ToggleWp),
        1 => Just(Step::SwitchPolicy),
    ]
}

fn initial() -> impl Strategy<Value = Vec<(u8, u8, u8)>> {
    proptest::collection::vec((any::<u8>(), any::<u8>(), any::<u8>()), 18)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 160, ..ProptestConfig::default() })]

    #[test]
    fn flush_policy_shadow_never_exceeds_guest(
        quota in MIN_SHADOW_QUOTA..40usize,
        init in initial(),
        steps in proptest::collection::vec(step(), 1..100),
        pge in any::<bool>(),
    ) {
        run(Policy::Flush, pge, quota, init, steps);
    }

    #[test]
    fn cached_policy_with_unsynced_leaf_tables_shadow_never_exceeds_guest(
        quota in MIN_SHADOW_QUOTA..40usize,
        init in initial(),
        steps in proptest::collection::vec(step(), 1..100),
        pge in any::<bool>(),
    ) {
        let switches = Switches { unsync: true, pge, ..Switches::default() };
        run_with(Policy::Cached, switches, quota, init, steps);
    }

    #[test]
    fn cached_policy_with_shared_shadow_tables_shadow_never_exceeds_guest(
        quota in MIN_SHADOW_QUOTA..40usize,
        init in initial(),
        steps in proptest::collection::vec(step(), 1..100),
        pge in any::<bool>(),
        unsync in any::<bool>(),
    ) {
        let switches = Switches { unsync, sharing: true, pge, ..Switches::default() };
        run_with(Policy::Cached, switches, quota, init, steps);
    }

    #[test]
    fn with_prefetch_on_fill_shadow_never_exceeds_guest(
        quota in MIN_SHADOW_QUOTA..40usize,
        init in initial(),
        steps in proptest::collection::vec(step(), 1..100),
        pge in any::<bool>(),
        cached in any::<bool>(),
        unsync in any::<bool>(),
        sharing in any::<bool>(),
    ) {
        let policy = if cached { Policy::Cached } else { Policy::Flush };
        run_with(policy, Switches { unsync, sharing, prefetch: true, pge }, quota, init, steps);
    }

    #[test]
    fn cached_policy_shadow_never_exceeds_guest(
        quota in MIN_SHADOW_QUOTA..40usize,
        init in initial(),
        steps in proptest::collection::vec(step(), 1..100),
        pge in any::<bool>(),
    ) {
        run(Policy::Cached, pge, quota, init, steps);
    }
}
