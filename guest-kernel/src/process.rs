//! Processes and the scheduler: a fixed table, one kernel stack per process, preemptive
//! round-robin from the timer.
//!
//! The kernel is not preemptible: it runs with interrupts off except where kinit (the first
//! kernel thread: the self-test, bench or probe driver) or the idle loop enables them. A timer
//! interrupt that arrives in user mode switches to the next runnable process when there is one
//! (a time slice is one tick). Every switch loads the next process's CR3, TSS.RSP0,
//! IA32_SYSENTER_ESP, the SYSCALL kernel stack and its FS base.

use crate::abi;
use crate::memory::{self, PteFlags, PAGE, USER_HEAP_START, USER_STACK_TOP, USER_TLS_VA};
use crate::sync::{self, IrqLock};
use crate::trap::{self, TrapFrame};
use crate::{arch, gdt, println, syscall, user};
use core::cell::UnsafeCell;
use core::mem::size_of;
use core::sync::atomic::{AtomicU64, Ordering};

/// Slots in the process table (slot 0 is kinit).
pub const NPROC: usize = 16;
const KSTACK_SIZE: usize = 16 * 1024;
/// kinit's pid; orphans are given to it.
pub const KINIT_PID: u64 = 1;

/// A process's state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    Free,
    /// Being built by spawn.
    Embryo,
    Runnable,
    Running,
    /// Waiting for a tick at or after `until`, or an earlier wakeup (child exit).
    Blocked {
        until: u64,
    },
    Zombie {
        status: u64,
    },
}

#[derive(Clone, Copy, Debug)]
struct Process {
    state: State,
    pid: u64,
    parent: u64,
    name: &'static str,
    pml4: u64,
    saved_rsp: u64,
    brk: u64,
    fs_base: u64,
    preemptions: u64,
    /// Ended by the kernel (a fault or its deadline), not by exit.
    killed: bool,
    /// The exception that killed it, if one did.
    fault: Option<Fault>,
}

/// The exception that killed a process: what the CPU reported, so that a parent (the
/// self-test) can check the hardware's (or a VMM's) account of the fault, not just its vector.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Fault {
    /// The vector.
    pub vector: u64,
    /// The error code the CPU pushed (0 for vectors without one).
    pub error: u64,
    /// CR2 for a page fault, else 0.
    pub addr: u64,
}

const EMPTY: Process = Process {
    state: State::Free,
    pid: 0,
    parent: 0,
    name: "",
    pml4: 0,
    saved_rsp: 0,
    brk: 0,
    fs_base: 0,
    preemptions: 0,
    killed: false,
    fault: None,
};

struct Table {
    procs: [Process; NPROC],
    current: usize,
    next_pid: u64,
    preemptions: u64,
    switches: u64,
}

static TABLE: IrqLock<Table> = IrqLock::new(Table {
    procs: [EMPTY; NPROC],
    current: 0,
    next_pid: KINIT_PID + 1,
    preemptions: 0,
    switches: 0,
});

static TICKS: AtomicU64 = AtomicU64::new(0);

#[repr(C, align(16))]
struct KernelStacks(UnsafeCell<[[u8; KSTACK_SIZE]; NPROC]>);
// SAFETY: stack `i` is used only by the process in slot `i` (and written by spawn before that
// process first runs).
unsafe impl Sync for KernelStacks {}
static KERNEL_STACKS: KernelStacks = KernelStacks(UnsafeCell::new([[0; KSTACK_SIZE]; NPROC]));

fn kernel_stack_top(slot: usize) -> u64 {
    KERNEL_STACKS.0.get() as u64 + ((slot + 1) * KSTACK_SIZE) as u64
}

extern "C" {
    fn switch_context(save: *mut u64, next_rsp: u64);
    fn guest_trap_return();
}

/// Timer ticks since the timer started.
pub fn ticks() -> u64 {
    TICKS.load(Ordering::Relaxed)
}

/// Makes the running boot thread process 1, "kinit", on the kernel's address space.
pub fn init() {
    TABLE.with(|t| {
        t.procs[0] = Process {
            state: State::Running,
            pid: KINIT_PID,
            parent: 0,
            name: "kinit",
            pml4: memory::kernel_pml4(),
            ..EMPTY
        };
        t.current = 0;
    });
    gdt::set_rsp0(kernel_stack_top(0));
    syscall::set_kernel_stack(kernel_stack_top(0));
}

/// The running process's pid.
pub fn current_pid() -> u64 {
    if TABLE.is_held() {
        return 0; // only from the fault printer, while the table itself is being changed
    }
    TABLE.with(|t| t.procs[t.current].pid)
}

/// What the page-fault handler needs to know about the running process.
#[derive(Clone, Copy, Debug)]
pub struct Regions {
    /// Its PML4.
    pub pml4: u64,
    /// First heap address.
    pub heap_start: u64,
    /// The break (heap end, exclusive).
    pub brk: u64,
}

/// The running process's demand-zero regions, or None for kinit (no user half).
pub fn current_regions() -> Option<Regions> {
    TABLE.with(|t| {
        let p = &t.procs[t.current];
        (t.current != 0).then_some(Regions {
            pml4: p.pml4,
            heap_start: USER_HEAP_START,
            brk: p.brk,
        })
    })
}

/// Timer-driven preemptions so far (switches away from a process interrupted in user mode).
pub fn preemptions() -> u64 {
    TABLE.with(|t| t.preemptions)
}

/// Context switches so far.
pub fn switches() -> u64 {
    TABLE.with(|t| t.switches)
}

impl Table {
    fn wake(&mut self, now: u64) {
        for p in self.procs.iter_mut() {
            if let State::Blocked { until } = p.state {
                if until <= now {
                    p.state = State::Runnable;
                }
            }
        }
    }

    fn other_runnable(&self) -> bool {
        self.procs
            .iter()
            .enumerate()
            .any(|(i, p)| i != self.current && p.state == State::Runnable)
    }

    fn slot_of(&self, pid: u64) -> Option<usize> {
        self.procs
            .iter()
            .position(|p| p.pid == pid && p.state != State::Free)
    }
}

/// The IRQ 0 handler's work (after EOI): count the tick, wake sleepers, and when the tick
/// interrupted user mode and someone else can run, preempt.
pub fn timer_tick(from_user: bool) {
    let now = TICKS.fetch_add(1, Ordering::Relaxed) + 1;
    let preempt = TABLE.with(|t| {
        t.wake(now);
        let preempt = from_user && t.other_runnable();
        if preempt {
            t.preemptions += 1;
            let cur = t.current;
            t.procs[cur].preemptions += 1;
        }
        preempt
    });
    if preempt {
        schedule();
    }
}

/// Gives the CPU to the next runnable process in round-robin order (the caller stays runnable
/// if it was running; a blocked or dead caller is not picked). With nothing to run it idles with
/// `sti; hlt` until an interrupt makes something runnable. Returns when the caller is picked
/// again.
pub fn schedule() {
    let saved = sync::save_and_cli();
    loop {
        let now = ticks();
        let next = TABLE.with(|t| {
            t.wake(now);
            let cur = t.current;
            if t.procs[cur].state == State::Running {
                t.procs[cur].state = State::Runnable;
            }
            let next = (1..=NPROC)
                .map(|k| (cur + k) % NPROC)
                .find(|&i| t.procs[i].state == State::Runnable)?;
            t.procs[next].state = State::Running;
            if next == cur {
                return Some(None);
            }
            t.current = next;
            t.switches += 1;
            let to = t.procs[next];
            Some(Some((
                &raw mut t.procs[cur].saved_rsp,
                to.saved_rsp,
                to.pml4,
                to.fs_base,
                kernel_stack_top(next),
            )))
        });
        match next {
            None => {
                // Idle: the STI shadow makes `sti; hlt` atomic, so a wakeup is never lost.
                arch::sti_hlt();
                arch::cli();
            }
            Some(None) => break,
            Some(Some((save, rsp, pml4, fs_base, stack_top))) => {
                gdt::set_rsp0(stack_top);
                syscall::set_kernel_stack(stack_top);
                // SAFETY: FS base is only used by user code (its TLS page), never by the kernel.
                unsafe { arch::wrmsr(arch::msr::FS_BASE, fs_base) };
                // SAFETY: `pml4` maps the kernel half (slot 0) like every address space, so
                // the kernel's code, stacks and data stay mapped across the switch.
                unsafe { arch::set_cr3(pml4) };
                // SAFETY: `save` points into the static process table and `rsp` is where the
                // next process last switched away (or its first frame), on its kernel stack.
                unsafe { switch_context(save, rsp) };
                break;
            }
        }
    }
    sync::restore(saved);
}

/// Why spawn failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SpawnError {
    /// No such program.
    NoProgram,
    /// The process table is full.
    TableFull,
    /// Out of frames.
    OutOfMemory,
}

impl SpawnError {
    /// The `-errno` a system call returns for it.
    pub fn errno(self) -> i64 {
        match self {
            Self::NoProgram => -abi::EINVAL,
            Self::TableFull => -abi::EAGAIN,
            Self::OutOfMemory => -abi::ENOMEM,
        }
    }
}

/// TPR while an address space is built: no device interrupt may come in between
/// (priority class 15 masks every vector; SDM vol. 3 "Task Priority in IA-32e Mode").
const TPR_MASK_ALL: u64 = 15;

/// Starts built-in program `program` with `arg` as a child of the running process.
pub fn spawn(program: u64, arg: u64) -> Result<u64, SpawnError> {
    let prog = user::program(program).ok_or(SpawnError::NoProgram)?;
    let (slot, pid, parent) = TABLE
        .with(|t| {
            let slot = t.procs.iter().position(|p| p.state == State::Free)?;
            let pid = t.next_pid;
            t.next_pid += 1;
            let parent = t.procs[t.current].pid;
            t.procs[slot] = Process {
                state: State::Embryo,
                pid,
                parent,
                ..EMPTY
            };
            Some((slot, pid, parent))
        })
        .ok_or(SpawnError::TableFull)?;

    let old_tpr = arch::cr8();
    arch::set_cr8(TPR_MASK_ALL);
    let built = build_address_space(pid, parent);
    arch::set_cr8(old_tpr);
    let pml4 = match built {
        Ok(pml4) => pml4,
        Err(e) => {
            TABLE.with(|t| t.procs[slot] = EMPTY);
            return Err(e);
        }
    };

    // The first kernel stack: a TrapFrame that `guest_trap_return` turns into an `iretq` to the
    // program's entry at CPL 3 (RDI = arg), below it the return address into guest_trap_return and
    // the six callee-saved registers switch_context pops.
    let top = kernel_stack_top(slot);
    let frame_at = top - size_of::<TrapFrame>() as u64;
    let layout = gdt::layout();
    let frame = TrapFrame {
        rip: prog.entry,
        cs: layout.user_code as u64,
        rflags: arch::RFLAGS_IF | 0x2,
        rsp: USER_STACK_TOP - 8,
        ss: layout.user_data as u64,
        rdi: arg,
        ..TrapFrame::default()
    };
    let saved_rsp = frame_at - 8 - 6 * 8;
    // The stack of a slot in Embryo state belongs to this function; the three writes below stay
    // inside it, 8-byte aligned (the stack top is aligned and TrapFrame is all u64s).
    // SAFETY: the TrapFrame occupies [frame_at, top), the top of that stack.
    unsafe { (frame_at as *mut TrapFrame).write(frame) };
    // SAFETY: the word just below the frame, still inside the stack.
    unsafe { ((frame_at - 8) as *mut u64).write(guest_trap_return as *const () as u64) };
    // SAFETY: the six words below that, [saved_rsp, frame_at - 8), still inside the stack.
    unsafe { core::ptr::write_bytes(saved_rsp as *mut u64, 0, 6) };
    TABLE.with(|t| {
        t.procs[slot] = Process {
            state: State::Runnable,
            pid,
            parent,
            name: prog.name,
            pml4,
            saved_rsp,
            brk: USER_HEAP_START,
            fs_base: USER_TLS_VA,
            preemptions: 0,
            killed: false,
            fault: None,
        };
    });
    Ok(pid)
}

/// A new address space with the user programs and the TLS page (pid, parent pid).
fn build_address_space(pid: u64, parent: u64) -> Result<u64, SpawnError> {
    let pml4 = memory::new_address_space().map_err(|_| SpawnError::OutOfMemory)?;
    let tls = memory::alloc_frame();
    let ok = tls.is_some_and(|tls| {
        // SAFETY: a fresh zeroed frame, identity-mapped.
        unsafe { (tls as *mut [u64; 2]).write([pid, parent]) };
        let flags = PteFlags::PRESENT | PteFlags::USER | PteFlags::NO_EXECUTE | PteFlags::OWNED;
        if memory::map(pml4, USER_TLS_VA, tls, flags).is_err() {
            memory::free_frame(tls);
            return false;
        }
        memory::map_user_image(pml4).is_ok()
    });
    if !ok {
        memory::free_user_half(pml4);
        memory::free_frame(pml4);
        return Err(SpawnError::OutOfMemory);
    }
    Ok(pml4)
}

/// Ends the running process with `status`: its user memory is freed now, the rest when its
/// parent collects the status; its children go to kinit.
pub fn exit_current(status: u64) -> ! {
    let pml4 = TABLE.with(|t| {
        let cur = t.current;
        assert!(cur != 0, "kinit called exit");
        let pid = t.procs[cur].pid;
        let parent = t.procs[cur].parent;
        t.procs[cur].state = State::Zombie { status };
        for p in t.procs.iter_mut().filter(|p| p.parent == pid) {
            p.parent = KINIT_PID;
        }
        if let Some(ps) = t.slot_of(parent) {
            if let State::Blocked { .. } = t.procs[ps].state {
                t.procs[ps].state = State::Runnable;
            }
        }
        t.procs[cur].pml4
    });
    memory::free_user_half(pml4);
    schedule();
    panic!("a zombie was scheduled");
}

/// Kills the running (user) process after a fault, saying why.
pub fn kill_current(frame: &TrapFrame, what: &str) -> ! {
    let (pid, name) = TABLE.with(|t| (t.procs[t.current].pid, t.procs[t.current].name));
    let addr = if frame.vector == 14 { arch::cr2() } else { 0 };
    if frame.vector == 14 {
        println!(
            "pid {pid} ({name}) killed: {what} at {addr:#x} (error {:#x})",
            frame.error
        );
    } else {
        println!(
            "pid {pid} ({name}) killed: {what} (vector {}, error {:#x})",
            frame.vector, frame.error
        );
    }
    TABLE.with(|t| {
        let cur = t.current;
        t.procs[cur].killed = true;
        t.procs[cur].fault = Some(Fault {
            vector: frame.vector,
            error: frame.error,
            addr,
        });
    });
    exit_current(abi::KILLED_BY_EXCEPTION + frame.vector)
}

/// What a parent learns about a child that ended.
#[derive(Clone, Copy, Debug)]
pub struct Reaped {
    /// Its pid.
    pub pid: u64,
    /// Its exit status (or `abi::KILLED_*`).
    pub status: u64,
    /// How often the timer preempted it.
    pub preemptions: u64,
    /// The kernel ended it (fault or deadline); `status` says why.
    pub killed: bool,
    /// The exception that killed it, if one did.
    pub fault: Option<Fault>,
}

enum WaitStep {
    Found(usize, Reaped),
    NoChild,
    Block,
}

fn wait_step(t: &mut Table, pid: u64, until: u64) -> WaitStep {
    let me = t.procs[t.current].pid;
    let mut any = false;
    for (i, p) in t.procs.iter().enumerate() {
        if p.state == State::Free || p.parent != me || (pid != 0 && p.pid != pid) {
            continue;
        }
        any = true;
        if let State::Zombie { status } = p.state {
            let reaped = Reaped {
                pid: p.pid,
                status,
                preemptions: p.preemptions,
                killed: p.killed,
                fault: p.fault,
            };
            return WaitStep::Found(i, reaped);
        }
    }
    if !any {
        return WaitStep::NoChild;
    }
    let cur = t.current;
    t.procs[cur].state = State::Blocked { until };
    WaitStep::Block
}

fn reap(slot: usize) {
    let pml4 = TABLE.with(|t| {
        let pml4 = t.procs[slot].pml4;
        t.procs[slot] = EMPTY;
        pml4
    });
    memory::free_frame(pml4);
}

/// Waits for child `pid` (0 = any) of the running process. With `deadline` (a tick count), a
/// child still running then is killed with its descendants and reported with
/// `abi::KILLED_TIMEOUT`. None when there is no such child.
pub fn wait(pid: u64, deadline: Option<u64>) -> Option<Reaped> {
    loop {
        let until = deadline.unwrap_or(u64::MAX);
        match TABLE.with(|t| wait_step(t, pid, until)) {
            WaitStep::Found(slot, reaped) => {
                reap(slot);
                return Some(reaped);
            }
            WaitStep::NoChild => return None,
            WaitStep::Block => {
                if deadline.is_some_and(|d| ticks() >= d) && pid != 0 {
                    TABLE.with(|t| {
                        let cur = t.current;
                        t.procs[cur].state = State::Running;
                    });
                    kill_tree(pid);
                    continue;
                }
                schedule();
            }
        }
    }
}

/// Stops process `pid` (not the running one) and all its descendants with `KILLED_TIMEOUT`.
fn kill_tree(pid: u64) {
    let mut victims = [0u64; NPROC];
    victims[0] = pid;
    let mut n = 1;
    let mut i = 0;
    while i < n {
        let victim = victims[i];
        let pml4 = TABLE.with(|t| {
            let slot = t.slot_of(victim)?;
            if matches!(t.procs[slot].state, State::Zombie { .. }) || slot == t.current {
                return None;
            }
            t.procs[slot].state = State::Zombie {
                status: abi::KILLED_TIMEOUT,
            };
            t.procs[slot].killed = true;
            for p in t.procs.iter().filter(|p| p.parent == victim) {
                if n < NPROC {
                    victims[n] = p.pid;
                    n += 1;
                }
            }
            Some(t.procs[slot].pml4)
        });
        if let Some(pml4) = pml4 {
            println!("pid {victim} killed: past its deadline");
            memory::free_user_half(pml4);
        }
        i += 1;
    }
    // The victims' own children (now zombies) belong to kinit from here on.
    TABLE.with(|t| {
        for p in t.procs.iter_mut() {
            if victims[..n].contains(&p.parent) && p.pid != pid {
                p.parent = KINIT_PID;
            }
        }
    });
}

/// Collects zombies that were given to kinit (orphans); returns how many.
pub fn reap_orphans() -> usize {
    let mut n = 0;
    while let Some(slot) = TABLE.with(|t| {
        t.procs
            .iter()
            .position(|p| p.parent == KINIT_PID && matches!(p.state, State::Zombie { .. }))
    }) {
        reap(slot);
        n += 1;
    }
    n
}

/// Blocks the running process for at least `n` ticks.
pub fn sleep(n: u64) {
    let until = ticks().saturating_add(n);
    while ticks() < until {
        TABLE.with(|t| {
            let cur = t.current;
            t.procs[cur].state = State::Blocked { until };
        });
        schedule();
    }
}

/// Moves the running process's break; returns the break now in force (unchanged on failure).
/// Shrinking unmaps the pages above the new break (and `invlpg`s them).
pub fn brk(new_brk: u64) -> u64 {
    let (old, pml4) = TABLE.with(|t| (t.procs[t.current].brk, t.procs[t.current].pml4));
    if new_brk == 0
        || !(USER_HEAP_START..=USER_HEAP_START + memory::USER_HEAP_MAX).contains(&new_brk)
    {
        return old;
    }
    let first_gone = new_brk.div_ceil(PAGE) * PAGE;
    let mut va = first_gone;
    while va < old {
        if let Some(pte) = memory::unmap(pml4, va) {
            if pte.flags().contains(PteFlags::OWNED) {
                memory::free_frame(pte.frame());
            }
        }
        va += PAGE;
    }
    TABLE.with(|t| {
        let cur = t.current;
        t.procs[cur].brk = new_brk;
    });
    new_brk
}

/// Processes in the table that are not free (kinit included).
pub fn live_processes() -> usize {
    TABLE.with(|t| t.procs.iter().filter(|p| p.state != State::Free).count())
}

/// The PML4 of process `pid`, if it exists and has not exited.
pub fn pml4_of(pid: u64) -> Option<u64> {
    TABLE.with(|t| {
        let slot = t.slot_of(pid)?;
        (!matches!(t.procs[slot].state, State::Zombie { .. })).then_some(t.procs[slot].pml4)
    })
}

/// Raises an exception name for a status, for messages ("killed by #PF ...").
pub fn describe_status(status: u64) -> &'static str {
    if status == abi::KILLED_TIMEOUT {
        "killed: deadline"
    } else if (abi::KILLED_BY_EXCEPTION..abi::KILLED_BY_EXCEPTION + 32).contains(&status) {
        trap::exception_name(status - abi::KILLED_BY_EXCEPTION)
    } else {
        "exited"
    }
}
