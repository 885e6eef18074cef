//! SMMUv3 encodings: what the core writes to the SMMU and reads back from
//! it, as pure functions the host tests check against the architecture's
//! layouts (Arm IHI 0070). Register access lives in `memory/smmu.rs`.
//!
//! The core gives every stream of the host's devices one stream-table
//! entry: stage 1 bypassed, stage 2 translating through the host's own
//! stage-2 tables with the host's VMID and the same VTCR_EL2 fields
//! ([`host_ste`]). A change to the host's stage-2 therefore changes every
//! device's view at once; what remains is invalidating the SMMU's TLB
//! ([`Command::TlbiS12Vmall`], then [`Command::Sync`]).

/// Register offsets in page 0 (and, for the event queue's indices, page 1).
pub mod reg {
    pub const IDR0: usize = 0x00;
    pub const IDR1: usize = 0x04;
    pub const IDR3: usize = 0x0c;
    pub const IDR5: usize = 0x14;
    pub const CR0: usize = 0x20;
    pub const CR0ACK: usize = 0x24;
    pub const CR1: usize = 0x28;
    pub const CR2: usize = 0x2c;
    pub const GBPA: usize = 0x44;
    pub const IRQ_CTRL: usize = 0x50;
    pub const IRQ_CTRLACK: usize = 0x54;
    pub const GERROR: usize = 0x60;
    pub const GERRORN: usize = 0x64;
    pub const STRTAB_BASE: usize = 0x80;
    pub const STRTAB_BASE_CFG: usize = 0x88;
    pub const CMDQ_BASE: usize = 0x90;
    pub const CMDQ_PROD: usize = 0x98;
    pub const CMDQ_CONS: usize = 0x9c;
    pub const EVENTQ_BASE: usize = 0xa0;
    /// In page 1 (64 KiB above page 0).
    pub const EVENTQ_PROD: usize = 0x1_00a8;
    pub const EVENTQ_CONS: usize = 0x1_00ac;
}

/// CR0 bits.
pub const CR0_SMMUEN: u32 = 1 << 0;
pub const CR0_EVENTQEN: u32 = 1 << 2;
pub const CR0_CMDQEN: u32 = 1 << 3;
/// GBPA: abort incoming transactions while the SMMU is disabled; the
/// update handshake bit.
pub const GBPA_ABORT: u32 = 1 << 20;
pub const GBPA_UPDATE: u32 = 1 << 31;
/// CR2: record C_BAD_STREAMID events for streams without an entry.
pub const CR2_RECINVSID: u32 = 1 << 1;
/// CR1: queues and tables inner-shareable, inner and outer write-back
/// (the attributes the core's own memory has).
pub const CR1_CACHEABLE: u32 = (0b11 << 10) | (0b01 << 8) | (0b01 << 6) // tables
    | (0b11 << 4) | (0b01 << 2) | 0b01; // queues
/// Read-/write-allocate hints in the queue and table base registers.
pub const BASE_RA: u64 = 1 << 62;
pub const BASE_WA: u64 = 1 << 62;
/// CMDQ_CONS.ERR and GERROR.CMDQ_ERR.
pub const CMDQ_CONS_ERR_SHIFT: u32 = 24;
pub const GERROR_CMDQ_ERR: u32 = 1 << 0;
/// EVENTQ_PROD.OVFLG (events were lost), acknowledged by copying it to
/// EVENTQ_CONS.OVACKFLG.
pub const EVENTQ_OVERFLOW: u32 = 1 << 31;

/// Bytes per stream-table entry, command and event.
pub const STE_BYTES: usize = 64;
pub const CMD_BYTES: usize = 16;
pub const EVENT_BYTES: usize = 32;
/// Stream-ID bits a level-2 stream table resolves (Linux's choice too:
/// one level-2 table per PCI bus, 16 KiB).
pub const SPLIT: u32 = 8;

/// What the core needs from the ID registers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Features {
    pub stage2: bool,
    pub aarch64_tables: bool,
    pub coherent: bool,
    pub two_level_table: bool,
    pub vmid16: bool,
    pub granule_4k: bool,
    /// Output address size in bits (IDR5.OAS).
    pub oas_bits: u32,
    /// IDR5.OAS as encoded (the PS encoding).
    pub oas: u8,
    /// Stream-ID bits (IDR1.SIDSIZE).
    pub sid_bits: u32,
    /// log2 of the most commands / events the queues may hold.
    pub cmdq_log2: u32,
    pub eventq_log2: u32,
    /// Stage-2 forced write-back (IDR3.FWB).
    pub fwb: bool,
}

/// The PS/OAS encoding as bits.
pub fn ps_bits(ps: u8) -> u32 {
    match ps {
        0 => 32,
        1 => 36,
        2 => 40,
        3 => 42,
        4 => 44,
        5 => 48,
        _ => 52,
    }
}

impl Features {
    pub fn from_idr(idr0: u32, idr1: u32, idr3: u32, idr5: u32) -> Self {
        let oas = (idr5 & 0b111) as u8;
        Self {
            stage2: idr0 & 1 != 0,
            aarch64_tables: (idr0 >> 2) & 0b11 & 0b10 != 0,
            coherent: idr0 & (1 << 4) != 0,
            two_level_table: (idr0 >> 27) & 0b11 == 1,
            vmid16: idr0 & (1 << 18) != 0,
            granule_4k: idr5 & (1 << 4) != 0,
            oas_bits: ps_bits(oas),
            oas,
            sid_bits: idr1 & 0x3f,
            cmdq_log2: (idr1 >> 21) & 0x1f,
            eventq_log2: (idr1 >> 16) & 0x1f,
            fwb: idr3 & (1 << 8) != 0,
        }
    }

    /// Why this SMMU cannot translate with the host's stage-2 (whose IPAs
    /// have `ipa_bits` bits and whose VMID is `vmid`), if it cannot.
    pub fn unusable_for(&self, ipa_bits: u32, vmid: u16) -> Option<&'static str> {
        if !self.stage2 {
            return Some("it has no stage-2 translation (IDR0.S2P)");
        }
        if !self.aarch64_tables {
            return Some("it cannot walk AArch64 tables (IDR0.TTF)");
        }
        if !self.coherent {
            return Some("its table walks are not coherent with the CPUs' caches (IDR0.COHACC)");
        }
        if !self.granule_4k {
            return Some("it has no 4 KiB granule (IDR5.GRAN4K)");
        }
        if ipa_bits > self.oas_bits {
            return Some("its output address size (IDR5.OAS) is smaller than the host's IPA space");
        }
        if vmid > 0xff && !self.vmid16 {
            return Some("the host's VMID needs 16-bit VMIDs (IDR0.VMID16)");
        }
        None
    }
}

/// The stream-table entry of a host device's stream: valid, stage 1
/// bypassed, stage 2 translating with the host's tables.
///
/// * `vtcr`: the host's VTCR_EL2. Its T0SZ, SL0, IRGN0, ORGN0, SH0, TG0 and
///   PS fields (bits 18:0) have the layout of the entry's S2 fields; PS is
///   capped at the SMMU's output size `oas`.
/// * `s2ttb`: the physical address of the host's stage-2 root table.
///
/// S2AFFD is clear (an entry whose access flag is clear faults, as on the
/// CPU; the core sets it on every entry it writes), S2R is set (faults are
/// recorded in the event queue), S2S is clear (faulting transactions are
/// terminated, never stalled), the tables are little-endian and AArch64.
/// Shareability of incoming transactions is kept (SHCFG = use incoming).
pub fn host_ste(vtcr: u64, s2ttb: u64, vmid: u16, oas: u8) -> [u64; 8] {
    const V: u64 = 1;
    const CONFIG_S1_BYPASS_S2_TRANSLATE: u64 = 0b110 << 1;
    const SHCFG_INCOMING: u64 = 1 << 44;
    const S2AA64: u64 = 1 << 51;
    const S2R: u64 = 1 << 58;
    let ps = ((vtcr >> 16) & 0b111).min(u64::from(oas));
    let s2vtcr = (vtcr & 0xffff) | (ps << 16);
    [
        V | CONFIG_S1_BYPASS_S2_TRANSLATE,
        SHCFG_INCOMING,
        u64::from(vmid) | (s2vtcr << 32) | S2AA64 | S2R,
        s2ttb & 0x000f_ffff_ffff_fff0,
        0,
        0,
        0,
        0,
    ]
}

/// A level-1 stream-table descriptor pointing at a level-2 table of
/// 2^[`SPLIT`] entries (SPAN = SPLIT + 1); 0 is an invalid descriptor
/// (every stream under it is refused).
pub fn l1_descriptor(l2_table: u64) -> u64 {
    (l2_table & 0x000f_ffff_ffff_ffc0) | u64::from(SPLIT + 1)
}

/// STRTAB_BASE_CFG for a two-level table of 2^`log2size` streams.
pub fn strtab_base_cfg_2level(log2size: u32) -> u32 {
    (1 << 16) | (SPLIT << 6) | log2size
}

/// A queue base register: address, log2 of the entries, allocate hint.
pub fn queue_base(addr: u64, log2: u32, hint: u64) -> u64 {
    hint | (addr & 0x000f_ffff_ffff_ffe0) | u64::from(log2)
}

/// The commands the core issues.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Command {
    /// Invalidate every cached configuration (all stream IDs).
    CfgiAll,
    /// Invalidate every TLB entry of a VMID, stage 1 and stage 2.
    TlbiS12Vmall { vmid: u16 },
    /// Invalidate every non-secure non-hypervisor TLB entry.
    TlbiNsnhAll,
    /// Complete every earlier command; nothing signalled (the core polls
    /// CMDQ_CONS).
    Sync,
}

impl Command {
    pub fn encode(self) -> [u64; 2] {
        match self {
            Command::CfgiAll => [0x04, 31],
            Command::TlbiS12Vmall { vmid } => [0x28 | (u64::from(vmid) << 32), 0],
            Command::TlbiNsnhAll => [0x30, 0],
            Command::Sync => [0x46, 0],
        }
    }
}

/// Queue index arithmetic: an index register holds the entry number in
/// its low `log2` bits and a wrap flag in the next one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct QueueIndex {
    pub log2: u32,
}

impl QueueIndex {
    fn mask(self) -> u32 {
        (1 << (self.log2 + 1)) - 1
    }
    /// The entry slot of an index value.
    pub fn slot(self, index: u32) -> usize {
        (index & ((1 << self.log2) - 1)) as usize
    }
    /// The next index value (wrapping, with the wrap flag toggled).
    pub fn next(self, index: u32) -> u32 {
        (index & self.mask()).wrapping_add(1) & self.mask()
    }
    /// Whether producer and consumer name the same position (the queue
    /// is empty when both wrap flags agree).
    pub fn same(self, a: u32, b: u32) -> bool {
        a & self.mask() == b & self.mask()
    }
    /// Whether the queue is full.
    pub fn full(self, prod: u32, cons: u32) -> bool {
        let slots = (1 << self.log2) - 1;
        (prod & slots) == (cons & slots) && (prod ^ cons) & (1 << self.log2) != 0
    }
}

/// An event record, decoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Event {
    pub kind: u8,
    pub stream: u32,
    /// The transaction's input address (for translation faults, the IPA).
    pub address: u64,
    /// Whether the faulting access was a read.
    pub read: bool,
    /// Whether the fault came from stage 2.
    pub stage2: bool,
}

impl Event {
    pub fn decode(words: [u64; 4]) -> Self {
        Self {
            kind: (words[0] & 0xff) as u8,
            stream: (words[0] >> 32) as u32,
            address: words[2],
            read: words[1] & (1 << 35) != 0,
            stage2: words[1] & (1 << 39) != 0,
        }
    }

    /// The architecture's name for the event type.
    pub fn name(&self) -> &'static str {
        match self.kind {
            0x01 => "F_UUT",
            0x02 => "C_BAD_STREAMID",
            0x03 => "F_STE_FETCH",
            0x04 => "C_BAD_STE",
            0x05 => "F_BAD_ATS_TREQ",
            0x06 => "F_STREAM_DISABLED",
            0x07 => "F_TRANSL_FORBIDDEN",
            0x08 => "C_BAD_SUBSTREAMID",
            0x09 => "F_CD_FETCH",
            0x0a => "C_BAD_CD",
            0x0b => "F_WALK_EABT",
            0x10 => "F_TRANSLATION",
            0x11 => "F_ADDR_SIZE",
            0x12 => "F_ACCESS",
            0x13 => "F_PERMISSION",
            0x20 => "F_TLB_CONFLICT",
            0x21 => "F_CFG_CONFLICT",
            0x24 => "E_PAGE_REQUEST",
            _ => "unknown event",
        }
    }
}

/// Whether the `n`th event (counting from 1) is logged: the first 16 and
/// then one in 1024, so a device that faults in a loop cannot flood the
/// console; every event is counted.
pub fn log_event(n: u64) -> bool {
    n <= 16 || n.is_multiple_of(1024)
}

/// The stream-table size for the streams the device tree names: log2 of
/// the stream count, at least one level-2 table's worth, at most what the
/// SMMU implements.
pub fn stream_table_log2(streams_end: u64, sid_bits: u32) -> u32 {
    let needed = u64::BITS - streams_end.saturating_sub(1).leading_zeros();
    needed.max(SPLIT).min(sid_bits)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::el2config::vtcr;

    #[test]
    fn the_host_ste_carries_the_cpus_stage_2_configuration() {
        // A 40-bit IPA space, 48-bit PA CPU: VTCR_EL2 0x8005_3558.
        let (v, _) = vtcr(40, 5);
        let ste = host_ste(v, 0x4123_4000, 0, 4);
        // V, Config = S1 bypass + S2 translate.
        assert_eq!(ste[0] & 0xf, 0b1101);
        // VMID 0; T0SZ 24, SL0 2, IRGN0/ORGN0 WB, SH0 IS, TG 4K, PS capped at OAS 44 (4).
        let s2 = ste[2] >> 32;
        assert_eq!(s2 & 0x3f, 24);
        assert_eq!((s2 >> 6) & 3, 0b10);
        assert_eq!((s2 >> 8) & 0x3f, 0b11_01_01);
        assert_eq!((s2 >> 14) & 3, 0);
        assert_eq!((s2 >> 16) & 7, 4);
        assert_eq!(ste[2] & 0xffff, 0);
        // S2AA64 and S2R set; S2AFFD, S2S, S2ENDI clear.
        assert_eq!((ste[2] >> 51) & 1, 1);
        assert_eq!((ste[2] >> 58) & 1, 1);
        assert_eq!((ste[2] >> 52) & 0b11, 0);
        assert_eq!((ste[2] >> 57) & 1, 0);
        assert_eq!(ste[3], 0x4123_4000);
        assert_eq!(&ste[4..], &[0; 4]);
        // A PS the SMMU can output is kept.
        assert_eq!((host_ste(v, 0, 0, 5)[2] >> 48) & 7, 5);
    }

    #[test]
    fn features_from_qemu_id_registers() {
        // QEMU 10's arm-smmuv3 with stage=2.
        let idr0 =
            1 | (2 << 2) | (1 << 4) | (1 << 12) | (2 << 21) | (1 << 24) | (1 << 26) | (1 << 27);
        let idr1 = 16 | (19 << 16) | (19 << 21);
        let idr5 = 4 | (1 << 4) | (1 << 6);
        let f = Features::from_idr(idr0, idr1, 0, idr5);
        assert!(f.stage2 && f.aarch64_tables && f.coherent && f.two_level_table && f.granule_4k);
        assert_eq!((f.oas_bits, f.sid_bits, f.cmdq_log2), (44, 16, 19));
        assert_eq!(f.unusable_for(40, 0), None);
        assert!(f.unusable_for(48, 0).is_some());
        let stage1_only = Features::from_idr(idr0 & !1, idr1, 0, idr5);
        assert!(stage1_only.unusable_for(40, 0).is_some());
    }

    #[test]
    fn commands_encode_as_the_architecture_lays_them_out() {
        assert_eq!(Command::Sync.encode(), [0x46, 0]);
        assert_eq!(
            Command::TlbiS12Vmall { vmid: 3 }.encode(),
            [0x3_0000_0028, 0]
        );
        assert_eq!(Command::CfgiAll.encode(), [0x04, 31]);
    }

    #[test]
    fn queue_indices_wrap_with_their_flag() {
        let q = QueueIndex { log2: 2 };
        assert_eq!(q.next(3), 4);
        assert_eq!(q.slot(4), 0);
        assert_eq!(q.next(7), 0);
        assert!(q.full(4, 0));
        assert!(!q.full(3, 0));
        assert!(q.same(5, 5 | (1 << 24)));
    }

    #[test]
    fn events_decode() {
        let e = Event::decode([0x0000_0008_0000_0010, 1 << 39, 0x4567_8000, 0]);
        assert_eq!(
            (e.name(), e.stream, e.address, e.read, e.stage2),
            ("F_TRANSLATION", 8, 0x4567_8000, false, true)
        );
    }

    #[test]
    fn table_size_follows_the_streams_and_the_hardware() {
        assert_eq!(stream_table_log2(0x1_0000, 16), 16);
        assert_eq!(stream_table_log2(0x1_0000, 12), 12);
        assert_eq!(stream_table_log2(3, 16), SPLIT);
        assert_eq!(stream_table_log2(0x101, 16), 9);
    }

    #[test]
    fn events_are_logged_sparingly() {
        assert!(log_event(1) && log_event(16) && !log_event(17) && log_event(2048));
    }

    #[test]
    fn level_one_descriptors_name_their_span() {
        assert_eq!(l1_descriptor(0x4000_4000), 0x4000_4000 | 9);
        assert_eq!(strtab_base_cfg_2level(16), 0x1_0210);
    }
}
