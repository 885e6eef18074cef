//! Partitions: the host, the services and the protected VMs, their per-CPU
//! contexts and their lifecycles.

pub mod power;
pub mod service;
pub mod vm;
