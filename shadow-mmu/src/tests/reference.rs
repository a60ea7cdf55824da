//! A deliberately plain reference model of 4-level paging access rights (SDM vol. 3 §4.5-§4.8),
//! written as the manual's sentences rather than as a walk, to check the walker against.

/// What the reference expects from one access.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Expected {
    /// `Ok(guest-physical address)` or `Err(page-fault error code)`.
    pub outcome: Result<u64, u32>,
    /// The path's entries after the access (A/D updated on success).
    pub entries_after: Vec<u64>,
}

use std::vec::Vec;

fn bit(v: u64, n: u32) -> bool {
    (v >> n) & 1 == 1
}

/// `path` holds the entries the processor reads, PML4E first, up to and including the one that
/// maps the page or stops the walk. `write`/`fetch` pick the access kind, `user` is CPL 3.
#[allow(clippy::too_many_arguments, clippy::fn_params_excessive_bools)]
pub fn reference(
    path: &[u64],
    gva: u64,
    write: bool,
    fetch: bool,
    user: bool,
    wp: bool,
    nxe: bool,
    maxphyaddr: u32,
) -> Expected {
    let mut error: u32 = 0;
    if write {
        error |= 2;
    }
    if user {
        error |= 4;
    }
    if fetch && nxe {
        error |= 16;
    }
    let unchanged = path.to_vec();
    let mut leaf_index = None;
    for (i, &e) in path.iter().enumerate() {
        let level = 4 - i as u32;
        // "If the P flag is 0 ... a page-fault exception" (§4.7: P = 0 in the error code).
        if !bit(e, 0) {
            return Expected {
                outcome: Err(error),
                entries_after: unchanged,
            };
        }
        // Reserved bits (§4.5 tables 4-14..4-20).
        let mut reserved = false;
        for b in maxphyaddr..52 {
            if bit(e, b) {
                reserved = true;
            }
        }
        if bit(e, 63) && !nxe {
            reserved = true;
        }
        if level == 4 && bit(e, 7) {
            reserved = true;
        }
        if level == 3 && bit(e, 7) {
            for b in 13..30 {
                if bit(e, b) {
                    reserved = true;
                }
            }
        }
        if level == 2 && bit(e, 7) {
            for b in 13..21 {
                if bit(e, b) {
                    reserved = true;
                }
            }
        }
        if reserved {
            return Expected {
                outcome: Err(error | 1 | 8),
                entries_after: unchanged,
            };
        }
        let maps_page = level == 1 || (level != 4 && bit(e, 7));
        if maps_page {
            leaf_index = Some(i);
            break;
        }
    }
    let Some(leaf) = leaf_index else {
        panic!("reference: path ends before a page is mapped");
    };
    let used = &path[..=leaf];
    // §4.6: "a linear address is a user-mode address if U/S = 1 in every paging-structure entry
    // controlling its translation"; otherwise a supervisor-mode address.
    let user_mode_address = used.iter().all(|&e| bit(e, 2));
    let read_only = used.iter().any(|&e| !bit(e, 1));
    let not_executable = nxe && used.iter().any(|&e| bit(e, 63));
    let allowed = if user {
        // User-mode access: only user-mode addresses; writes need R/W everywhere; fetches need no XD.
        if !user_mode_address {
            false
        } else if write {
            !read_only
        } else if fetch {
            !not_executable
        } else {
            true
        }
    } else if write {
        // Supervisor write: with CR0.WP = 0 anything; with CR0.WP = 1 only if R/W everywhere.
        !wp || !read_only
    } else if fetch {
        !not_executable
    } else {
        true
    };
    if !allowed {
        return Expected {
            outcome: Err(error | 1),
            entries_after: unchanged,
        };
    }
    let mut after = path.to_vec();
    for e in after.iter_mut().take(leaf + 1) {
        *e |= 1 << 5;
    }
    if write {
        after[leaf] |= 1 << 6;
    }
    let level = 4 - leaf as u32;
    let page_bits = 12 + 9 * (level - 1);
    let frame = path[leaf] & ((1u64 << 52) - 1) & !((1u64 << page_bits) - 1);
    let gpa = frame | (gva & ((1u64 << page_bits) - 1));
    Expected {
        outcome: Ok(gpa),
        entries_after: after,
    }
}
