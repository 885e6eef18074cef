//! What every layer of the core leans on: the console, the fatal path, the
//! allocator and the lock-order check. Imports nothing above `arch`.

pub mod console;
pub mod heap;
pub mod lockcheck;
pub mod panic;
