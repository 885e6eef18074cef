//! The architecture layer: the exception vectors and the world switch
//! (`entry.S`, `vectors.S`), the system registers, the core's own stage-1
//! translation. The only place for assembly; every layer above reaches the
//! hardware through here.

pub mod mmu;
pub mod sysreg;

core::arch::global_asm!(include_str!("entry.S"));
core::arch::global_asm!(include_str!("vectors.S"));
