//! Dispatch: a partition's exception, from the syndrome to a typed trap, its
//! route and the verdict applied. The top of the trap path the vectors enter.

pub mod hvc;
pub mod trap;
