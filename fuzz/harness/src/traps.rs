//! What a partition's trap hands the core: the syndrome (ESR_EL2) of any
//! instruction it chose to run, the function id and arguments of its
//! hypercalls and PSCI calls, and the results the VMM reads back. Every
//! bit is the partition's choice.

use arbitrary::Unstructured;
use moat_abi::Error;
use moat_abi::hypercall::{self, SERVICE_RANGE_END, SERVICE_RANGE_START};
use moat_abi::ipc::{HOST_REQUEST_BYTES, decode_request};
use moat_abi::services::{LedgerRequest, VmMteRequest};
use moat_abi::trap::TrapClass;
use moat_abi::vm::{Exit, MmioAccess as VmmAccess};
use moat_kernel::esr::{self, Trap};
use moat_kernel::psci::{self, PowerStateFormat, PsciCall};
use moat_kernel::ranges::{self, PAGE};
use moat_kernel::routing::{RouteSpec, RoutingTable};
use zerocopy::IntoBytes;

/// `trap_decode`: a syndrome, a call's registers, and a routing table with
/// a function id to route.
pub fn decode(data: &[u8]) {
    let mut u = Unstructured::new(data);
    let esr: u64 = u.arbitrary().unwrap_or(0);
    syndrome(esr, u.arbitrary().unwrap_or(0));
    let regs: [u64; 7] = u.arbitrary().unwrap_or([0; 7]);
    call(regs);
    routing(&mut u);
}

fn syndrome(esr: u64, raw: u64) {
    let ec = esr::exception_class(esr);
    assert_eq!(u64::from(ec), (esr >> 26) & 0x3f);
    match Trap::decode(esr) {
        Trap::Hvc { imm } | Trap::Smc { imm } => assert_eq!(u64::from(imm), esr & 0xffff),
        Trap::SysReg(access) => {
            let (op0, op1, crn, crm, op2) = access.encoding();
            assert!(op0 <= 3 && op1 <= 7 && crn <= 15 && crm <= 15 && op2 <= 7);
            assert!(access.rt <= 31);
            assert_eq!(access.is_read, esr & 1 == 1);
        }
        Trap::StageTwo(abort) => {
            assert_eq!(abort.is_instruction, ec == esr::ec::IABT_LOW);
            if abort.is_instruction {
                assert!(!abort.is_write && abort.access.is_none());
            }
            assert_eq!(abort.access.is_some(), abort.syndrome_valid);
            if let Some(access) = abort.access {
                assert!(access.size_log2 <= 3 && access.rt <= 31);
                // A load leaves no more bits than the access read, unless it
                // sign-extends them, and never more than the register holds.
                let v = access.loaded_value(raw);
                let bits = 8u32 << access.size_log2;
                if !access.sign_extend && bits < 64 {
                    assert!(v >> bits == 0, "{access:?} of {raw:#x} gave {v:#x}");
                }
                if !access.sixty_four {
                    assert!(v <= u64::from(u32::MAX));
                }
            }
        }
        Trap::Wfx { is_wfe } => assert_eq!(is_wfe, esr & 1 == 1),
        Trap::Other { ec: other } => assert_eq!(other, ec),
    }
}

fn call(regs: [u64; 7]) {
    let function = regs[0] as u32;
    // PSCI: 32-bit calls see only the low words of their arguments.
    let decoded = psci::decode(function, regs[1], regs[2], regs[3]);
    let is32 = function & (1 << 30) == 0;
    match decoded {
        PsciCall::CpuOn {
            target_mpidr: a,
            entry: b,
            context: c,
        }
        | PsciCall::CpuSuspend {
            power_state: a,
            entry: b,
            context: c,
        } => {
            assert!(psci::is_psci(function));
            if is32 {
                assert!(a >> 32 == 0 && b >> 32 == 0 && c >> 32 == 0);
            }
        }
        PsciCall::Forward { function: f, .. } => {
            assert_eq!(f, function);
            assert!(psci::relay_supports(f));
        }
        PsciCall::CpuOff | PsciCall::Features { .. } => assert!(psci::is_psci(function)),
        PsciCall::NotSupported => {}
    }
    for format in [PowerStateFormat::Original, PowerStateFormat::Extended] {
        let _ = psci::is_powerdown_state(regs[1], format);
    }
    let _ = PowerStateFormat::from_features(regs[2]);
    assert_eq!(psci::mpidr_affinity(regs[1]) & !0xff_00ff_ffff, 0);

    // A hypercall's address and length: the pages they span, or a refusal.
    let (addr, len) = (regs[1], regs[2]);
    match ranges::page_span(addr, len) {
        Some((start, end)) => {
            assert!(start.is_multiple_of(PAGE) && end.is_multiple_of(PAGE));
            assert!(start <= addr && addr - start < PAGE);
            assert!(end - addr >= len && end - (addr + len) < PAGE);
        }
        None => assert!(
            len == 0
                || addr
                    .checked_add(len)
                    .and_then(|e| e.checked_next_multiple_of(PAGE))
                    .is_none()
        ),
    }
    let level = (regs[3] % 5) as usize;
    let (lo, hi) = (regs[4].min(regs[5]), regs[4].max(regs[5]));
    if let Some(tables) = ranges::worst_case_tables(level, lo, hi) {
        assert!(level <= 3);
        if lo == hi || level == 3 {
            assert_eq!(tables, 0);
        }
    } else {
        assert!(level > 3);
    }

    // A service request carried in x1..x6: its type, then zeros.
    let mut body = [0u8; HOST_REQUEST_BYTES];
    for (chunk, reg) in body.chunks_exact_mut(8).zip(&regs[1..]) {
        chunk.copy_from_slice(&reg.to_le_bytes());
    }
    if let Ok(request) = decode_request::<LedgerRequest>(&body) {
        let n = request.as_bytes().len();
        assert_eq!(request.as_bytes(), &body[..n]);
        assert!(body[n..].iter().all(|b| *b == 0));
    }
    if let Ok(request) = decode_request::<VmMteRequest>(&body) {
        let n = request.as_bytes().len();
        assert_eq!(request.as_bytes(), &body[..n]);
        assert!(body[n..].iter().all(|b| *b == 0));
    }

    // What the VMM reads back: an exit, and the status in x0.
    if let Some(exit) = Exit::from_regs(regs) {
        assert_eq!(exit.to_regs(), regs);
    }
    let access = VmmAccess(regs[1]);
    assert!(access.size() <= 8 && access.register() <= 31);
    match Error::from_x0(regs[0]) {
        Some(Ok(())) => assert_eq!(regs[0], 0),
        Some(Err(e)) => assert_eq!(e.to_x0(), regs[0]),
        None => assert!(regs[0] != 0 && Error::ALL.iter().all(|e| e.to_x0() != regs[0])),
    }
}

/// The routing table the manifest's service records make, and where it
/// sends a host's function id.
fn routing(u: &mut Unstructured<'_>) {
    let mut specs = Vec::new();
    for _ in 0..u.int_in_range(0..=9u8).unwrap_or(0) {
        let first = if u.ratio(3, 4).unwrap_or(true) {
            SERVICE_RANGE_START + u.int_in_range(0..=64u16).unwrap_or(0)
        } else {
            u.arbitrary().unwrap_or(0)
        };
        specs.push(RouteSpec {
            first,
            count: u.int_in_range(0..=32u16).unwrap_or(0),
            observes: u.int_in_range(0..=(1u32 << TrapClass::COUNT)).unwrap_or(0),
            handles: u.arbitrary::<u8>().map_or(0, |b| u32::from(b & 0x7f)),
        });
    }
    let Ok(table) = RoutingTable::build(&specs) else {
        return;
    };
    for n in [
        u.arbitrary::<u16>().unwrap_or(0),
        SERVICE_RANGE_START,
        SERVICE_RANGE_END - 1,
    ] {
        let function = hypercall::id(n) ^ (u32::from(u.arbitrary::<bool>().unwrap_or(false)) << 31);
        match table.hypercall(function) {
            Some((i, op)) => {
                let s = specs[i];
                assert_eq!(function, hypercall::id(n));
                assert!((SERVICE_RANGE_START..SERVICE_RANGE_END).contains(&n));
                assert!(n >= s.first && u32::from(n) < u32::from(s.first) + u32::from(s.count));
                assert_eq!(op, n - s.first + 1);
                // No other service claims the same function.
                for (j, t) in specs.iter().enumerate() {
                    if j != i {
                        assert!(
                            t.count == 0
                                || n < t.first
                                || u32::from(n) >= u32::from(t.first) + u32::from(t.count)
                        );
                    }
                }
            }
            None => assert!(specs.iter().all(|s| function != hypercall::id(n)
                || s.count == 0
                || n < s.first
                || u32::from(n) >= u32::from(s.first) + u32::from(s.count))),
        }
    }
    for class in TrapClass::ALL {
        let handlers: Vec<usize> = (0..specs.len())
            .filter(|&i| specs[i].handles & class.bit() != 0)
            .collect();
        assert!(handlers.len() <= 1);
        assert_eq!(table.handler(class), handlers.first().copied());
        assert_eq!(
            table.is_observed(class),
            specs.iter().any(|s| s.observes & class.bit() != 0)
        );
        assert!(
            table
                .observers(class)
                .all(|i| specs[i].observes & class.bit() != 0)
        );
    }
}
