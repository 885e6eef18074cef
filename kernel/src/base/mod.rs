//! What every layer above leans on: the machine as boot found it, the
//! per-CPU slots and vCPU frames, the console, the fatal path, exception
//! injection, the allocator and the lock-order check. Imports only `arch`.

pub mod console;
pub mod cpu;
pub mod heap;
pub mod inject;
pub mod lockcheck;
pub mod panic;
pub mod state;
