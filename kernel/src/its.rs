//! The GICv3 ITS and the redistributors' LPI tables, as the core sees
//! them: register fields, table sizes and the check of every ITS command.
//!
//! The ITS and the redistributors read and write memory by physical
//! address, outside every stage-2: the ITS writes its device and collection
//! tables and each device's interrupt translation table (ITT) and reads its
//! command queue; a redistributor reads the LPI property table and writes
//! the LPI pending table. Whoever programs those addresses can make the
//! hardware write anywhere. The core therefore keeps the registers that
//! hold them (and the command queue) to itself and decides what reaches
//! the hardware; this module is that decision, free of hardware access.
//!
//! Every address comes from the host and is checked with checked
//! arithmetic against the register's own fields: alignment to the table's
//! page size, a size the fields give, no overflow. Ownership is checked by
//! the caller against the core's tables.

/// Bytes in a stage-2 page.
pub const PAGE: u64 = 4096;

/// Bytes in one ITS command.
pub const COMMAND_BYTES: u64 = 32;

/// One past the highest physical address a GIC register can name.
pub const PA_LIMIT: u64 = 1 << 52;

/// `[pa, pa + size)` if it ends inside the physical address space.
fn within_pa(pa: u64, size: u64) -> Result<(u64, u64), Refusal> {
    match pa.checked_add(size) {
        Some(end) if end <= PA_LIMIT => Ok((pa, size)),
        _ => Err(Refusal::Size),
    }
}

/// The first LPI's INTID.
pub const FIRST_LPI: u64 = 8192;

/// Register offsets in the ITS control frame (its first 4 KiB page holds
/// every register below).
pub mod gits {
    pub const CTLR: u64 = 0x0;
    pub const TYPER: u64 = 0x8;
    pub const CBASER: u64 = 0x80;
    pub const CWRITER: u64 = 0x88;
    pub const CREADR: u64 = 0x90;
    pub const BASER0: u64 = 0x100;
    /// GITS_BASER0..7.
    pub const BASERS: u64 = 8;
    /// GITS_CTLR.Enabled.
    pub const CTLR_ENABLED: u32 = 1;
    /// GITS_CTLR.Quiescent.
    pub const CTLR_QUIESCENT: u32 = 1 << 31;
}

/// Register offsets in a redistributor's RD_base frame (all in its first
/// 4 KiB page).
pub mod gicr {
    pub const CTLR: u64 = 0x0;
    pub const TYPER: u64 = 0x8;
    pub const PROPBASER: u64 = 0x70;
    pub const PENDBASER: u64 = 0x78;
    /// GICR_CTLR.EnableLPIs.
    pub const CTLR_ENABLE_LPIS: u32 = 1;
}

/// Why the core refused a register value or a command.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// A reserved or unsupported field value.
    Reserved,
    /// Two-level tables are not offered to the host.
    Indirect,
    /// A table of a kind the core does not hand out (vPE tables).
    TableKind,
    /// An address not aligned as the register requires.
    Unaligned,
    /// Arithmetic on the fields overflowed, or a size is out of bounds.
    Size,
    /// The memory is not the host's to give.
    NotOwned,
    /// An opcode the core does not forward (GICv4 and unknown commands).
    Opcode,
    /// A DeviceID beyond the device table.
    DeviceId,
    /// An EventID beyond the device's ITT.
    EventId,
    /// A collection beyond the collection table.
    Collection,
    /// A target that is not one of this machine's redistributors.
    Target,
    /// A physical INTID that is not an LPI the property table covers.
    Intid,
    /// A command for a device the core has not seen mapped.
    UnmappedDevice,
    /// The core had no memory for the device's ITT.
    NoMemory,
    /// The ITS is enabled (or LPIs are): its tables cannot change now.
    InUse,
}

impl Refusal {
    pub const fn describe(self) -> &'static str {
        match self {
            Refusal::Reserved => "a reserved field value",
            Refusal::Indirect => "two-level tables are not offered",
            Refusal::TableKind => "a table kind the core does not hand out",
            Refusal::Unaligned => "an unaligned address",
            Refusal::Size => "a size out of bounds",
            Refusal::NotOwned => "memory the host does not own",
            Refusal::Opcode => "a command the core does not forward",
            Refusal::DeviceId => "a DeviceID beyond the device table",
            Refusal::EventId => "an EventID beyond the device's table",
            Refusal::Collection => "a collection beyond the collection table",
            Refusal::Target => "a target that is no redistributor",
            Refusal::Intid => "an INTID that is no LPI in range",
            Refusal::UnmappedDevice => "a device not mapped",
            Refusal::NoMemory => "no memory for the device's table",
            Refusal::InUse => "the hardware is using the tables",
        }
    }
}

fn field(v: u64, lo: u32, bits: u32) -> u64 {
    (v >> lo) & ((1u64 << bits) - 1)
}

/// The fields of GITS_TYPER the checks need.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ItsTyper {
    /// Bytes per ITT entry.
    pub ite_bytes: u64,
    /// EventID bits the ITS supports.
    pub event_bits: u32,
    /// DeviceID bits the ITS supports.
    pub device_bits: u32,
    /// Targets are redistributor addresses (PTA) rather than processor numbers.
    pub physical_targets: bool,
}

impl ItsTyper {
    pub const fn decode(v: u64) -> Self {
        Self {
            ite_bytes: ((v >> 4) & 0xf) + 1,
            event_bits: ((v >> 8) & 0x1f) as u32 + 1,
            device_bits: ((v >> 13) & 0x1f) as u32 + 1,
            physical_targets: (v >> 19) & 1 == 1,
        }
    }
}

/// What a GITS_BASERn table holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TableKind {
    Devices,
    Collections,
}

/// A table a GITS_BASERn value describes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Table {
    pub kind: TableKind,
    /// First byte, page-aligned.
    pub pa: u64,
    /// Bytes, a multiple of [`PAGE`].
    pub size: u64,
    pub entry_bytes: u64,
}

impl Table {
    /// Entries the table holds.
    pub const fn entries(&self) -> u64 {
        self.size / self.entry_bytes
    }
}

/// GITS_BASER.Valid and .Indirect.
pub const BASER_VALID: u64 = 1 << 63;
pub const BASER_INDIRECT: u64 = 1 << 62;

/// The table a GITS_BASERn value programs, `None` if not valid. The type
/// and entry size are the hardware's (read-only fields), taken from
/// `value` as the caller merged them.
pub fn decode_baser(value: u64) -> Result<Option<Table>, Refusal> {
    if value & BASER_VALID == 0 {
        return Ok(None);
    }
    if value & BASER_INDIRECT != 0 {
        return Err(Refusal::Indirect);
    }
    let kind = match field(value, 56, 3) {
        1 => TableKind::Devices,
        4 => TableKind::Collections,
        _ => return Err(Refusal::TableKind),
    };
    let entry_bytes = field(value, 48, 5) + 1;
    let page: u64 = match field(value, 8, 2) {
        0 => 4 << 10,
        1 => 16 << 10,
        2 => 64 << 10,
        _ => return Err(Refusal::Reserved),
    };
    let pa = if page == 64 << 10 {
        // Bits [15:12] of the field hold PA[51:48].
        (field(value, 16, 32) << 16) | (field(value, 12, 4) << 48)
    } else {
        field(value, 12, 36) << 12
    };
    if pa % page != 0 {
        return Err(Refusal::Unaligned);
    }
    let size = (field(value, 0, 8) + 1)
        .checked_mul(page)
        .ok_or(Refusal::Size)?;
    within_pa(pa, size)?;
    Ok(Some(Table {
        kind,
        pa,
        size,
        entry_bytes,
    }))
}

/// The command queue a GITS_CBASER value programs: `(pa, bytes)`, `None`
/// if not valid.
pub fn decode_cbaser(value: u64) -> Option<(u64, u64)> {
    if value & (1 << 63) == 0 {
        return None;
    }
    let pa = field(value, 12, 40) << 12;
    let size = (field(value, 0, 8) + 1) * PAGE;
    Some((pa, size))
}

/// The LPI INTID bits a redistributor uses for a GICR_PROPBASER value:
/// its IDbits field, capped at what the distributor implements
/// (`hardware_bits`, GICD_TYPER.IDbits + 1), as the architecture caps it.
/// Fewer than 14 bits leaves no LPI at all.
pub fn lpi_bits(propbaser: u64, hardware_bits: u32) -> Result<u32, Refusal> {
    let bits = (field(propbaser, 0, 5) as u32 + 1).min(hardware_bits);
    if bits < 14 {
        return Err(Refusal::Size);
    }
    Ok(bits)
}

/// The property table a GICR_PROPBASER value names for `bits` INTID bits:
/// one byte per LPI, page-aligned, rounded out to whole pages.
pub fn property_table(propbaser: u64, bits: u32) -> Result<(u64, u64), Refusal> {
    let pa = field(propbaser, 12, 40) << 12;
    let bytes = (1u64 << bits) - FIRST_LPI;
    within_pa(pa, bytes.next_multiple_of(PAGE))
}

/// The pending table a GICR_PENDBASER value names for `bits` INTID bits:
/// one bit per INTID, 64 KiB-aligned, rounded out to whole pages.
pub fn pending_table(pendbaser: u64, bits: u32) -> Result<(u64, u64), Refusal> {
    let pa = field(pendbaser, 16, 36) << 16;
    within_pa(pa, ((1u64 << bits) / 8).next_multiple_of(PAGE))
}

/// The bytes of an ITT for `event_bits` EventID bits of `ite_bytes` each:
/// at least 256, the ITT's alignment.
pub fn itt_bytes(event_bits: u32, ite_bytes: u64) -> Result<u64, Refusal> {
    let entries = 1u64.checked_shl(event_bits).ok_or(Refusal::Size)?;
    Ok(entries
        .checked_mul(ite_bytes)
        .ok_or(Refusal::Size)?
        .max(ITT_ALIGN))
}

/// An ITT's alignment.
pub const ITT_ALIGN: u64 = 256;

/// A decoded ITS command (GICv3 physical commands only).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Command {
    Mapd {
        device: u32,
        event_bits: u32,
        itt: u64,
        valid: bool,
    },
    Mapc {
        collection: u16,
        target: u64,
        valid: bool,
    },
    Mapti {
        device: u32,
        event: u32,
        intid: u32,
        collection: u16,
    },
    Mapi {
        device: u32,
        event: u32,
        collection: u16,
    },
    Movi {
        device: u32,
        event: u32,
        collection: u16,
    },
    /// INT, CLEAR, DISCARD and INV: one event of one device.
    Event {
        opcode: u8,
        device: u32,
        event: u32,
    },
    Sync {
        target: u64,
    },
    Invall {
        collection: u16,
    },
    Movall {
        from: u64,
        to: u64,
    },
}

/// Opcodes.
pub mod opcode {
    pub const MOVI: u8 = 0x01;
    pub const INT: u8 = 0x03;
    pub const CLEAR: u8 = 0x04;
    pub const SYNC: u8 = 0x05;
    pub const MAPD: u8 = 0x08;
    pub const MAPC: u8 = 0x09;
    pub const MAPTI: u8 = 0x0a;
    pub const MAPI: u8 = 0x0b;
    pub const INV: u8 = 0x0c;
    pub const INVALL: u8 = 0x0d;
    pub const MOVALL: u8 = 0x0e;
    pub const DISCARD: u8 = 0x0f;
}

/// An ITT address field (MAPD DW2[51:8]).
const ITT_MASK: u64 = ((1 << 52) - 1) & !0xff;
/// A target field (RDbase, DW2[50:16] or DW3[50:16]).
fn target_of(dw: u64) -> u64 {
    field(dw, 16, 35)
}

impl Command {
    /// Decodes one command's four doublewords.
    pub fn decode(cmd: [u64; 4]) -> Result<Self, Refusal> {
        let device = (cmd[0] >> 32) as u32;
        let event = cmd[1] as u32;
        let collection = cmd[2] as u16;
        Ok(match cmd[0] as u8 {
            opcode::MAPD => Command::Mapd {
                device,
                event_bits: field(cmd[1], 0, 5) as u32 + 1,
                itt: cmd[2] & ITT_MASK,
                valid: cmd[2] >> 63 == 1,
            },
            opcode::MAPC => Command::Mapc {
                collection,
                target: target_of(cmd[2]),
                valid: cmd[2] >> 63 == 1,
            },
            opcode::MAPTI => Command::Mapti {
                device,
                event,
                intid: (cmd[1] >> 32) as u32,
                collection,
            },
            opcode::MAPI => Command::Mapi {
                device,
                event,
                collection,
            },
            opcode::MOVI => Command::Movi {
                device,
                event,
                collection,
            },
            op @ (opcode::INT | opcode::CLEAR | opcode::DISCARD | opcode::INV) => Command::Event {
                opcode: op,
                device,
                event,
            },
            opcode::SYNC => Command::Sync {
                target: target_of(cmd[2]),
            },
            opcode::INVALL => Command::Invall { collection },
            opcode::MOVALL => Command::Movall {
                from: target_of(cmd[2]),
                to: target_of(cmd[3]),
            },
            _ => return Err(Refusal::Opcode),
        })
    }

    /// The command the core puts in the hardware's queue: only the fields
    /// the command defines (reserved bits cleared), and for MAPD the ITT
    /// the core chose.
    pub fn encode(&self, itt: u64) -> [u64; 4] {
        let head = |op: u8, device: u32| u64::from(op) | (u64::from(device) << 32);
        match *self {
            Command::Mapd {
                device,
                event_bits,
                valid,
                ..
            } => [
                head(opcode::MAPD, device),
                u64::from(event_bits - 1) & 0x1f,
                (itt & ITT_MASK) | (u64::from(valid) << 63),
                0,
            ],
            Command::Mapc {
                collection,
                target,
                valid,
            } => [
                u64::from(opcode::MAPC),
                0,
                u64::from(collection) | (target << 16) | (u64::from(valid) << 63),
                0,
            ],
            Command::Mapti {
                device,
                event,
                intid,
                collection,
            } => [
                head(opcode::MAPTI, device),
                u64::from(event) | (u64::from(intid) << 32),
                u64::from(collection),
                0,
            ],
            Command::Mapi {
                device,
                event,
                collection,
            } => [
                head(opcode::MAPI, device),
                u64::from(event),
                u64::from(collection),
                0,
            ],
            Command::Movi {
                device,
                event,
                collection,
            } => [
                head(opcode::MOVI, device),
                u64::from(event),
                u64::from(collection),
                0,
            ],
            Command::Event {
                opcode,
                device,
                event,
            } => [head(opcode, device), u64::from(event), 0, 0],
            Command::Sync { target } => [u64::from(opcode::SYNC), 0, target << 16, 0],
            Command::Invall { collection } => {
                [u64::from(opcode::INVALL), 0, u64::from(collection), 0]
            }
            Command::Movall { from, to } => [u64::from(opcode::MOVALL), 0, from << 16, to << 16],
        }
    }
}

/// What a command is checked against: the tables in use, the machine's
/// redistributors and each device's EventID bits as its MAPD gave them.
pub struct Limits<'a> {
    pub typer: ItsTyper,
    /// Entries in the device table (0: none programmed).
    pub devices: u64,
    /// Entries in the collection table (0: none programmed).
    pub collections: u64,
    /// LPI INTID bits (the distributor's).
    pub lpi_bits: u32,
    /// Whether a target field names one of the machine's redistributors
    /// (a processor number, or an address >> 16 with PTA).
    pub target_ok: &'a dyn Fn(u64) -> bool,
    /// The EventID bits of a mapped device.
    pub event_bits_of: &'a dyn Fn(u32) -> Option<u32>,
}

impl Limits<'_> {
    fn device(&self, device: u32) -> Result<(), Refusal> {
        if u64::from(device) >= self.devices
            || u64::from(device) >> self.typer.device_bits.min(32) != 0
        {
            return Err(Refusal::DeviceId);
        }
        Ok(())
    }

    fn collection(&self, collection: u16) -> Result<(), Refusal> {
        if u64::from(collection) >= self.collections {
            return Err(Refusal::Collection);
        }
        Ok(())
    }

    fn event(&self, device: u32, event: u32) -> Result<(), Refusal> {
        self.device(device)?;
        let bits = (self.event_bits_of)(device).ok_or(Refusal::UnmappedDevice)?;
        if u64::from(event) >> bits != 0 {
            return Err(Refusal::EventId);
        }
        Ok(())
    }

    fn target(&self, target: u64) -> Result<(), Refusal> {
        if (self.target_ok)(target) {
            Ok(())
        } else {
            Err(Refusal::Target)
        }
    }
}

/// Checks a command against `limits`. MAPD's ITT address is the caller's
/// (it must be host memory, and the hardware gets the core's own ITT).
pub fn check(cmd: &Command, limits: &Limits<'_>) -> Result<(), Refusal> {
    match *cmd {
        Command::Mapd {
            device,
            event_bits,
            itt,
            valid,
        } => {
            limits.device(device)?;
            if valid {
                if event_bits > limits.typer.event_bits {
                    return Err(Refusal::EventId);
                }
                if itt % ITT_ALIGN != 0 {
                    return Err(Refusal::Unaligned);
                }
            }
            Ok(())
        }
        Command::Mapc {
            collection,
            target,
            valid,
        } => {
            limits.collection(collection)?;
            if valid {
                limits.target(target)?;
            }
            Ok(())
        }
        Command::Mapti {
            device,
            event,
            intid,
            collection,
        } => {
            limits.event(device, event)?;
            limits.collection(collection)?;
            let intid = u64::from(intid);
            if intid < FIRST_LPI || intid >> limits.lpi_bits != 0 {
                return Err(Refusal::Intid);
            }
            Ok(())
        }
        Command::Mapi {
            device,
            event,
            collection,
        } => {
            limits.event(device, event)?;
            limits.collection(collection)?;
            // The INTID is the EventID, which must then be an LPI too.
            let intid = u64::from(event);
            if intid < FIRST_LPI || intid >> limits.lpi_bits != 0 {
                return Err(Refusal::Intid);
            }
            Ok(())
        }
        Command::Movi {
            device,
            event,
            collection,
        } => {
            limits.event(device, event)?;
            limits.collection(collection)
        }
        Command::Event { device, event, .. } => limits.event(device, event),
        Command::Sync { target } => limits.target(target),
        Command::Invall { collection } => limits.collection(collection),
        Command::Movall { from, to } => {
            limits.target(from)?;
            limits.target(to)
        }
    }
}

/// How a table or queue the GIC hardware uses must be held, for the
/// consistency checker.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Holding {
    /// Written by the hardware (device, collection, pending tables): the
    /// hypervisor's alone, the host's stage-2 without it.
    Donated,
    /// Read by the hardware and written by the host (property table, the
    /// host's command queue): the host's, shared with the hypervisor.
    Pinned,
    /// The core's own (its command queue, every ITT): inside the carve-out.
    Core,
}

/// Checks that `[pa, pa + size)` is held as `holding` says: `extent_of`
/// gives the ledger's extent of a frame, `carve_out` the hypervisor's
/// memory. Returns the first frame that is not, and why.
pub fn check_holding(
    holding: Holding,
    pa: u64,
    size: u64,
    carve_out: &[moat_platform::dt::Range],
    extent_of: impl Fn(u64) -> Option<moat_abi::services::LedgerExtent>,
) -> Result<(), (u64, &'static str)> {
    use moat_abi::services::Party;
    let end = pa.checked_add(size).ok_or((pa, "a range that overflows"))?;
    if holding == Holding::Core {
        return if carve_out.iter().any(|c| c.base <= pa && end <= c.end()) {
            Ok(())
        } else {
            Err((pa, "the core's table lies outside the hypervisor's memory"))
        };
    }
    let mut frame = pa / PAGE;
    while frame < end.div_ceil(PAGE) {
        let e = extent_of(frame).ok_or((frame * PAGE, "a table outside RAM"))?;
        let ok = match holding {
            Holding::Donated => e.owner.kind == Party::HYPERVISOR && e.borrower.kind == Party::NONE,
            _ => e.owner.kind == Party::HOST && e.borrower.kind == Party::HYPERVISOR,
        };
        if !ok {
            return Err((
                frame * PAGE,
                match holding {
                    Holding::Donated => "a table the hardware writes is not the hypervisor's alone",
                    _ => "a table the hardware reads is not shared with the hypervisor",
                },
            ));
        }
        // The rest of this extent is held the same way.
        frame = e.frames.start.saturating_add(e.frames.count).max(frame + 1);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// QEMU's ITS: 16-byte ITEs, 16 EventID bits, 16 DeviceID bits, no PTA.
    const QEMU_TYPER: u64 = (0xf << 4) | (15 << 8) | (15 << 13);

    fn limits<'a>(
        target_ok: &'a dyn Fn(u64) -> bool,
        event_bits_of: &'a dyn Fn(u32) -> Option<u32>,
    ) -> Limits<'a> {
        Limits {
            typer: ItsTyper::decode(QEMU_TYPER),
            devices: 1 << 16,
            collections: 512,
            lpi_bits: 16,
            target_ok,
            event_bits_of,
        }
    }

    #[test]
    fn typer_fields() {
        let t = ItsTyper::decode(QEMU_TYPER);
        assert_eq!(t.ite_bytes, 16);
        assert_eq!(t.event_bits, 16);
        assert_eq!(t.device_bits, 16);
        assert!(!t.physical_targets);
        assert!(ItsTyper::decode(1 << 19).physical_targets);
    }

    #[test]
    fn baser_decodes_a_flat_device_table() {
        // Linux's flat device table: 64 KiB pages, 8 of them, 8-byte entries.
        let v = BASER_VALID | (1 << 56) | (7 << 48) | 0x4123_0000 | (2 << 8) | 7;
        let t = decode_baser(v).unwrap().unwrap();
        assert_eq!(t.kind, TableKind::Devices);
        assert_eq!(t.pa, 0x4123_0000);
        assert_eq!(t.size, 8 << 16);
        assert_eq!(t.entry_bytes, 8);
        assert_eq!(t.entries(), 1 << 16);
        // PA[51:48] in bits [15:12] with 64 KiB pages.
        let high = BASER_VALID | (4 << 56) | (2 << 8) | (0x3 << 12) | 0x1_0000;
        assert_eq!(
            decode_baser(high).unwrap().unwrap().pa,
            (3 << 48) | 0x1_0000
        );
        // 4 KiB pages.
        let small = BASER_VALID | (4 << 56) | (15 << 48) | 0x4000_1000;
        let t = decode_baser(small).unwrap().unwrap();
        assert_eq!(
            (t.pa, t.size, t.kind),
            (0x4000_1000, PAGE, TableKind::Collections)
        );
    }

    #[test]
    fn baser_refusals() {
        assert_eq!(decode_baser(1 << 56 | 0x4000_0000), Ok(None));
        let base = BASER_VALID | (1 << 56) | 0x4000_0000;
        assert_eq!(decode_baser(base | BASER_INDIRECT), Err(Refusal::Indirect));
        // vPE tables, and unknown kinds.
        assert_eq!(
            decode_baser(BASER_VALID | (2 << 56) | 0x4000_0000),
            Err(Refusal::TableKind)
        );
        assert_eq!(decode_baser(BASER_VALID), Err(Refusal::TableKind));
        assert_eq!(decode_baser(base | (3 << 8)), Err(Refusal::Reserved));
        // 16 KiB pages need a 16 KiB-aligned table.
        assert_eq!(
            decode_baser(BASER_VALID | (1 << 56) | (1 << 8) | 0x4000_1000),
            Err(Refusal::Unaligned)
        );
        // The top of the address space: the end is beyond it.
        let top = BASER_VALID | (1 << 56) | (2 << 8) | (0xf << 12) | (0xffff_ffff << 16) | 0xff;
        assert_eq!(decode_baser(top), Err(Refusal::Size));
    }

    #[test]
    fn cbaser_and_lpi_tables() {
        assert_eq!(decode_cbaser(0x4000_0000 | 15), None);
        assert_eq!(
            decode_cbaser((1 << 63) | 0x4000_0000 | 15),
            Some((0x4000_0000, 16 * PAGE))
        );
        // Linux: 16 INTID bits; QEMU implements 16.
        let prop = 0x4100_0000 | 15;
        assert_eq!(lpi_bits(prop, 16), Ok(16));
        assert_eq!(lpi_bits(prop | 31, 16), Ok(16), "capped by the hardware");
        assert_eq!(lpi_bits(0x4100_0000 | 12, 24), Err(Refusal::Size));
        assert_eq!(property_table(prop, 16), Ok((0x4100_0000, 14 * PAGE)));
        assert_eq!(
            pending_table(0x4200_0000 | 0xfff, 16),
            Ok((0x4200_0000, 2 * PAGE))
        );
        assert_eq!(
            pending_table(0x4201_0000, 24),
            Ok((0x4201_0000, 512 * PAGE))
        );
        assert_eq!(itt_bytes(1, 16), Ok(256));
        assert_eq!(itt_bytes(16, 16), Ok(1 << 20));
        assert_eq!(itt_bytes(64, 16), Err(Refusal::Size));
    }

    #[test]
    fn commands_round_trip_without_reserved_bits() {
        let mapd = [
            0x0000_0010_dead_0008,
            0xffff_ffff_0000_0001,
            (1 << 63) | 0x4444_5500 | 0x7f,
            u64::MAX,
        ];
        let c = Command::decode(mapd).unwrap();
        assert_eq!(
            c,
            Command::Mapd {
                device: 0x10,
                event_bits: 2,
                itt: 0x4444_5500,
                valid: true
            }
        );
        // The core's ITT goes in; nothing the host set in reserved bits does.
        assert_eq!(
            c.encode(0x4020_0100),
            [0x10_0000_0008, 1, (1 << 63) | 0x4020_0100, 0]
        );
        let mapti = [0x7_0000_000a, (8200 << 32) | 3, 5, 0];
        let c = Command::decode(mapti).unwrap();
        assert_eq!(c.encode(0), mapti);
        let mapc = [9, 0, (1 << 63) | (1 << 16) | 2, 0];
        assert_eq!(Command::decode(mapc).unwrap().encode(0), mapc);
        // GICv4 and unknown opcodes are not forwarded.
        for op in [0x00, 0x02, 0x06, 0x22, 0x29, 0x2a, 0xff] {
            assert_eq!(Command::decode([op, 0, 0, 0]), Err(Refusal::Opcode));
        }
    }

    #[test]
    fn command_checks() {
        let two_cpus = |t: u64| t < 2;
        let mapped = |d: u32| (d == 7).then_some(2);
        let l = limits(&two_cpus, &mapped);
        let ok = |c| check(&c, &l);
        assert_eq!(
            ok(Command::Mapd {
                device: 7,
                event_bits: 2,
                itt: 0x4000_0100,
                valid: true
            }),
            Ok(())
        );
        assert_eq!(
            ok(Command::Mapd {
                device: 1 << 16,
                event_bits: 2,
                itt: 0x4000_0100,
                valid: true
            }),
            Err(Refusal::DeviceId)
        );
        assert_eq!(
            ok(Command::Mapd {
                device: 7,
                event_bits: 17,
                itt: 0x4000_0100,
                valid: true
            }),
            Err(Refusal::EventId)
        );
        assert_eq!(
            ok(Command::Mapd {
                device: 7,
                event_bits: 2,
                itt: 0x4000_0180,
                valid: true
            }),
            Err(Refusal::Unaligned)
        );
        let mapti = |device, event, intid, collection| Command::Mapti {
            device,
            event,
            intid,
            collection,
        };
        assert_eq!(ok(mapti(7, 3, 8192, 1)), Ok(()));
        assert_eq!(ok(mapti(7, 4, 8192, 1)), Err(Refusal::EventId));
        assert_eq!(ok(mapti(8, 0, 8192, 1)), Err(Refusal::UnmappedDevice));
        assert_eq!(ok(mapti(7, 0, 8191, 1)), Err(Refusal::Intid));
        assert_eq!(ok(mapti(7, 0, 1 << 16, 1)), Err(Refusal::Intid));
        assert_eq!(ok(mapti(7, 0, 8192, 512)), Err(Refusal::Collection));
        let mapc = |target, valid| Command::Mapc {
            collection: 0,
            target,
            valid,
        };
        assert_eq!(ok(mapc(1, true)), Ok(()));
        assert_eq!(ok(mapc(2, true)), Err(Refusal::Target));
        assert_eq!(ok(mapc(2, false)), Ok(()));
        assert_eq!(ok(Command::Sync { target: 5 }), Err(Refusal::Target));
        assert_eq!(ok(Command::Movall { from: 0, to: 9 }), Err(Refusal::Target));
        // Without tables, nothing but targets passes.
        let none = Limits {
            devices: 0,
            collections: 0,
            ..limits(&two_cpus, &mapped)
        };
        assert_eq!(check(&mapti(7, 0, 8192, 0), &none), Err(Refusal::DeviceId));
        assert_eq!(
            check(&Command::Invall { collection: 0 }, &none),
            Err(Refusal::Collection)
        );
    }

    #[test]
    fn tables_are_held_as_the_hardware_needs() {
        use moat_abi::services::{FrameRange, LedgerExtent, Party};
        use moat_platform::dt::Range;
        let party = |kind| Party { kind, id: 0 };
        // Frames 0x40000..0x40010 the hypervisor's, 0x40010..0x40020 the
        // host's shared with it, the rest the host's alone.
        let extent_of = |pfn: u64| {
            let (start, owner, borrower) = match pfn {
                0x40000..0x40010 => (0x40000, Party::HYPERVISOR, Party::NONE),
                0x40010..0x40020 => (0x40010, Party::HOST, Party::HYPERVISOR),
                0x40020..0x80000 => (0x40020, Party::HOST, Party::NONE),
                _ => return None,
            };
            Some(LedgerExtent {
                frames: FrameRange { start, count: 0x10 },
                owner: party(owner),
                borrower: party(borrower),
            })
        };
        let carve = [Range::new(0x4000_0000, 0x1_0000).unwrap()];
        let check = |h, pa, size| check_holding(h, pa, size, &carve, extent_of);
        assert_eq!(check(Holding::Donated, 0x4000_0000, 0x1_0000), Ok(()));
        assert_eq!(check(Holding::Pinned, 0x4001_0000, 0x2000), Ok(()));
        assert_eq!(check(Holding::Core, 0x4000_1000, 0x100), Ok(()));
        assert_eq!(
            check(Holding::Donated, 0x4000_f000, 0x2000).unwrap_err().0,
            0x4001_0000
        );
        assert!(check(Holding::Pinned, 0x4002_0000, 0x1000).is_err());
        assert!(check(Holding::Donated, 0x8000_0000, 0x1000).is_err());
        assert!(check(Holding::Core, 0x4000_f000, 0x2000).is_err());
        assert!(check(Holding::Donated, u64::MAX - 0xfff, 0x2000).is_err());
    }
}
