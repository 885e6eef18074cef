//! The seam between the core's logic and the system registers it reads and
//! writes on a trap.
//!
//! The code above the architecture layer names registers through
//! [`SysRegs`]; the EL2 binary implements it with one `mrs`/`msr` per
//! method (`arch/sysreg.rs`), and [`FakeSysRegs`] implements it with plain
//! fields, so the trap path's decisions and the writes that follow them run
//! under `cargo test` on the development machine.

/// The registers the trap path touches.
pub trait SysRegs {
    /// ESR_EL2: the syndrome of the exception being handled.
    fn esr_el2(&self) -> u64;
    /// FAR_EL2: the faulting virtual address of an abort.
    fn far_el2(&self) -> u64;
    /// The faulting intermediate physical address of a stage-2 abort
    /// (HPFAR_EL2's page and FAR_EL2's offset in it).
    fn fault_ipa(&self) -> u64;
    /// The hardware value of the ID-group-3 register `op0=3, op1=0, CRn=0,
    /// CRm=crm, op2=op2`, or `None` for an encoding outside the group.
    fn read_id_register(&self, crm: u8, op2: u8) -> Option<u64>;
    /// VBAR_EL1 of the partition whose EL1 state is loaded.
    fn vbar_el1(&self) -> u64;
    /// SCTLR_EL1 of the partition whose EL1 state is loaded.
    fn sctlr_el1(&self) -> u64;
    /// Writes ESR_EL1, ELR_EL1, SPSR_EL1 and, for an abort, FAR_EL1: the
    /// registers taking a synchronous exception to EL1 sets.
    fn write_el1_exception(&mut self, esr: u64, elr: u64, spsr: u64, far: Option<u64>);
}

/// System registers as plain fields, for tests: reads return the fields,
/// writes land in them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FakeSysRegs {
    pub esr_el2: u64,
    pub far_el2: u64,
    pub fault_ipa: u64,
    /// The ID-group-3 registers, by `(crm, op2)`; any other encoding reads
    /// as `None`.
    pub id_registers: [[u64; 8]; 8],
    pub vbar_el1: u64,
    pub sctlr_el1: u64,
    pub esr_el1: u64,
    pub elr_el1: u64,
    pub spsr_el1: u64,
    /// FAR_EL1; left alone by an exception that does not set it.
    pub far_el1: u64,
    /// How many exceptions were written to EL1.
    pub el1_exceptions: u32,
}

impl SysRegs for FakeSysRegs {
    fn esr_el2(&self) -> u64 {
        self.esr_el2
    }

    fn far_el2(&self) -> u64 {
        self.far_el2
    }

    fn fault_ipa(&self) -> u64 {
        self.fault_ipa
    }

    fn read_id_register(&self, crm: u8, op2: u8) -> Option<u64> {
        self.id_registers
            .get(usize::from(crm))?
            .get(usize::from(op2))
            .copied()
    }

    fn vbar_el1(&self) -> u64 {
        self.vbar_el1
    }

    fn sctlr_el1(&self) -> u64 {
        self.sctlr_el1
    }

    fn write_el1_exception(&mut self, esr: u64, elr: u64, spsr: u64, far: Option<u64>) {
        self.esr_el1 = esr;
        self.elr_el1 = elr;
        self.spsr_el1 = spsr;
        if let Some(far) = far {
            self.far_el1 = far;
        }
        self.el1_exceptions += 1;
    }
}
