//! The virtual CPU: state, decode and emulation, system-call forwarding, event delivery and
//! injection — the CPU half of trap-and-emulate.
//!
//! | module | article challenge / SDM |
//! |---|---|
//! | [`state`] | 特权级压缩 (ring compression): virtual CPL, RFLAGS.IF/IOPL, CRs, descriptor tables |
//! | [`emulate`] | 敏感指令的陷入和模拟: each trapping instruction redone at the virtual CPL |
//! | [`segments`] | segment loads, far transfers, IRET against the guest's own GDT (Vol. 3 §5) |
//! | [`shadow_gdt`] | 资源控制: the real GDT built from the guest's, only its CS/SS loadable (Vol. 3 §3.4) |
//! | [`syscall`] | 系统调用: SYSCALL/SYSENTER forwarded, SYSRET/SYSEXIT emulated (Vol. 3 §5.8.7–8) |
//! | [`coalesce`] | 频繁访问特权资源: SYSCALL+SWAPGS and SWAPGS+SYSRETQ in one trap |
//! | [`exception`] | the exception table: mnemonic, name, error code, kind, class (Vol. 3 Table 6-1) |
//! | [`deliver`] | 中断和异常的虚拟化: delivery through the guest IDT, #DF, triple fault (Vol. 3 §6) |
//! | [`inject`] | virtual interrupts: IF, the STI/MOV SS shadow, HLT (Vol. 3 §6.8) |
//! | [`msr`] | the virtual MSR file (Vol. 4) |
//! | [`cpuid`] | what the guest is told it runs on |
//!
//! Typical use by the kernel's trap dispatcher: copy the trap frame into [`VCpu`] (merging
//! the real arithmetic flags), call [`handle_instruction`] for #GP/#UD, [`deliver`] to reflect
//! an exception, [`syscall::syscall`]/[`syscall::sysenter`] for the real fast-system-call entries,
//! then [`inject`] on the way out; apply [`VCpu::take_effects`] to the shadow MMU and the
//! real FS/GS bases; copy the vCPU back into the frame with [`VCpu::real_rflags`].

pub mod coalesce;
pub mod cpuid;
pub mod deliver;
pub mod descriptor;
pub mod emulate;
pub mod event;
pub mod exception;
pub mod inject;
pub mod memory;
pub mod msr;
pub mod segments;
pub mod shadow_gdt;
pub mod state;
pub mod syscall;

#[cfg(test)]
mod tests;

pub use cpuid::HostCpu;
pub use deliver::deliver;
pub use emulate::{handle_instruction, Cause, Handled, Outcome};
pub use event::{CpuStop, Event, EventKind};
pub use inject::{inject, Injection};
pub use memory::{Fault, GuestMemory};
pub use state::{Effects, Gpr, SegReg, Segment, TableRegister, VCpu};
