//! The fuzz target of shadow-mmu: guest page tables and a sequence of steps (accesses through
//! either view, page-table stores of well-formed entries or of any value, INVLPG, CR3 loads,
//! flushes, CR0.WP toggles, policy switches; CR4.PGE on or off) played through the same model as the crate's
//! property tests (`shadow_mmu::testing::model`), with its checks after every step: the audit
//! (VMM slot intact in every root, every shadow leaf on a frame the P2M gave this guest, the
//! quota, no writable mapping of a write-protected table), and the current shadows allowing
//! nothing the guest's own tables deny at the view's privilege, to the same frame (so no guest
//! supervisor page in the user view), no live root freed, no frame leaked.

use arbitrary::{Result, Unstructured};
use shadow_mmu::testing::model::{
    run_with, slots, Step, Switches, ADDRS, FRAMES, PDPTS, PDS, PML4S, PTS,
};
use shadow_mmu::{Policy, MIN_SHADOW_QUOTA};

/// Most steps one input plays.
const MAX_STEPS: usize = 200;

/// Runs one input. Never fails on a short or malformed input.
pub fn run(data: &[u8]) {
    let mut u = Unstructured::new(data);
    let Ok((config, initial, steps)) = decode(&mut u) else {
        return;
    };
    let policy = if config.cached {
        Policy::Cached
    } else {
        Policy::Flush
    };
    let switches = Switches {
        unsync: config.unsync,
        sharing: config.sharing,
        prefetch: config.prefetch,
        pge: config.pge,
    };
    run_with(policy, switches, config.quota, initial, steps);
}

/// The MMU's switches.
struct Config {
    cached: bool,
    unsync: bool,
    sharing: bool,
    prefetch: bool,
    quota: usize,
    /// CR4.PGE: global pages (the flush policy keeps their shadows across a CR3 load).
    pge: bool,
}

type Initial = Vec<(u8, u8, u8)>;

fn decode(u: &mut Unstructured) -> Result<(Config, Initial, Vec<Step>)> {
    let config = Config {
        cached: u.arbitrary()?,
        unsync: u.arbitrary()?,
        sharing: u.arbitrary()?,
        prefetch: u.arbitrary()?,
        quota: u.int_in_range(MIN_SHADOW_QUOTA..=40)?,
        pge: u.arbitrary()?,
    };
    let initial = (0..slots().len())
        .map(|_| u.arbitrary())
        .collect::<Result<Initial>>()?;
    let mut steps = Vec::new();
    while !u.is_empty() && steps.len() < MAX_STEPS {
        steps.push(step(u)?);
    }
    Ok((config, initial, steps))
}

fn step(u: &mut Unstructured) -> Result<Step> {
    let slot_count = slots().len();
    Ok(match u.int_in_range(0..=19u8)? {
        0..=7 => Step::Access {
            view: u.arbitrary()?,
            addr: u.int_in_range(0..=ADDRS - 1)?,
            kind: u.int_in_range(0..=2)?,
        },
        8..=10 => Step::ReadThenWrite {
            view: u.arbitrary()?,
            addr: u.int_in_range(0..=ADDRS - 1)?,
        },
        11..=12 => Step::PteWrite {
            slot: u.int_in_range(0..=slot_count - 1)?,
            kind: u.arbitrary()?,
            target: u.arbitrary()?,
            flags: u.arbitrary()?,
            invalidate: u.arbitrary()?,
        },
        13 => Step::RawPteWrite {
            slot: u.int_in_range(0..=slot_count - 1)?,
            value: raw_entry(u)?,
            invalidate: u.arbitrary()?,
        },
        14 => Step::Invlpg {
            addr: u.int_in_range(0..=ADDRS - 1)?,
        },
        15..=16 => Step::LoadCr3 {
            which: u.int_in_range(0..=1)?,
        },
        17 => Step::FlushAll,
        18 => Step::ToggleWp,
        _ => Step::SwitchPolicy,
    })
}

/// A paging-structure entry with any flags (PS, G, PAT, the ignored bits, reserved bits, XD)
/// over one of the test's tables or frames, a 2 MiB or 1 GiB frame, the last frame of RAM,
/// or any address.
fn raw_entry(u: &mut Unstructured) -> Result<u64> {
    let tables = [PML4S, PDPTS, PDS, PTS].concat();
    let target = match u.int_in_range(0..=3u8)? {
        0 => *u.choose(&tables)?,
        1 => *u.choose(&FRAMES)?,
        2 => *u.choose(&[0x20_0000, 0x4000_0000, (16 << 20) - 0x1000])?,
        _ => u.arbitrary::<u64>()? & 0x000F_FFFF_FFFF_F000,
    };
    let flags = u64::from(u.arbitrary::<u16>()?) & 0xFFF;
    let high = if u.arbitrary()? {
        u64::from(u.arbitrary::<u16>()?) << 48
    } else {
        0
    };
    Ok(target | flags | high)
}

/// The MMU configuration, initial entries and steps `data` stands for, as text: what a crash
/// input means (`cargo test -p fuzz-targets` prints it for a failing corpus input).
pub fn describe(data: &[u8]) -> String {
    let mut u = Unstructured::new(data);
    let Ok((config, initial, steps)) = decode(&mut u) else {
        return "(no complete configuration)".into();
    };
    let mut text = format!(
        "cached={} unsync={} sharing={} prefetch={} quota={} pge={}\n",
        config.cached, config.unsync, config.sharing, config.prefetch, config.quota, config.pge
    );
    for ((level, at), (kind, target, flags)) in slots().into_iter().zip(initial) {
        let value = shadow_mmu::testing::model::entry(level, kind, target, flags);
        text += &format!("  level {level} entry at {at:#x} = {value:#x}\n");
    }
    for (i, step) in steps.iter().enumerate() {
        text += &format!("{i}: {step:?}\n");
    }
    text
}
