//! The ledger service behind its wire interface: raw IPC messages and
//! well-formed requests in any order, as a hostile host can provoke them
//! (every host memory hypercall becomes a ledger request) and as a broken
//! core could send them.

use arbitrary::Unstructured;
use moat_abi::ipc::{MESSAGE_SIZE, Message};
use moat_abi::services::{
    FrameRange, LEDGER_BOOT_RANGES, LedgerBoot, LedgerExtent, LedgerRequest, LedgerTransaction,
    ledger as iface,
};
use moat_kernel::txcheck;
use moat_ledger::{Extent, LedgerServer, PfnRange, VmRecord};
use moat_platform::dt::Range;
use zerocopy::FromBytes;

/// The machine of the fixed boot layout, in frames: two RAM banks with a
/// gap between them, and the hypervisor's carve-out inside the first.
const RAM: [(u64, u64); 2] = [(0x40000, 0x400), (0x48000, 0x100)];
const HYPERVISOR: [(u64, u64); 1] = [(0x40100, 0x20)];

/// What a refused request must leave as it was.
#[derive(Debug, PartialEq, Eq)]
struct Snapshot {
    extents: Vec<Extent>,
    vms: Vec<VmRecord>,
    generation: u64,
}

fn snapshot(server: &LedgerServer<'_>) -> Option<Snapshot> {
    server.ledger().map(|l| Snapshot {
        extents: l.extents().to_vec(),
        vms: l.vms().collect(),
        generation: l.generation(),
    })
}

/// `ledger_wire`: a boot (the fixed layout, or one from the input), then
/// calls until the input runs out.
pub fn wire(data: &[u8]) {
    let mut u = Unstructured::new(data);
    // A small extent buffer, so that running out of it is reached too.
    let capacity = u.int_in_range(4..=48usize).unwrap_or(16);
    let mut storage = vec![Extent::EMPTY; capacity];
    let mut server = LedgerServer::new(Some(&mut storage[..]));
    let fixed = !u.ratio(1, 8).unwrap_or(false);
    let boot = if fixed {
        fixed_boot()
    } else {
        let bytes: [u8; size_of::<LedgerBoot>()] = u.arbitrary().unwrap_or([0; _]);
        LedgerBoot::read_from_bytes(&bytes).unwrap_or_default()
    };
    call(&mut server, &iface::client::boot::request(0, &boot));
    if let Some(l) = server.ledger() {
        l.check_invariants()
            .expect("a booted ledger keeps its invariants");
    }
    // The core's view of the machine, for checking the ledger's answers
    // as the core does: only for the layout a core would describe.
    let (ram, carve_out) = (bytes_of(&RAM), bytes_of(&HYPERVISOR));
    let mut sequence = 1;
    while !u.is_empty() {
        sequence += 1;
        match u.int_in_range(0..=5u8).unwrap_or(0) {
            0 => {
                // Any message at all.
                let mut raw = [0u8; MESSAGE_SIZE];
                let n = u.len().min(MESSAGE_SIZE);
                raw[..n].copy_from_slice(u.bytes(n).unwrap_or(&[]));
                let message = Message::read_from_bytes(&raw).expect("a whole message");
                call(&mut server, &message);
            }
            1 | 2 => {
                let request = request(&mut u);
                let call_msg = iface::client::prepare::request(sequence, &request);
                let reply = call(&mut server, &call_msg);
                let Ok(tx) = iface::client::prepare::reply(&reply, &call_msg.header) else {
                    continue;
                };
                assert_eq!(tx.request, request, "a transaction for another request");
                if fixed {
                    core_accepts(&request, &tx, &ram, &carve_out);
                }
                if u.arbitrary().unwrap_or(true) {
                    let commit = iface::client::commit::request(sequence, &tx.generation);
                    let reply = call(&mut server, &commit);
                    let generation = iface::client::commit::reply(&reply, &commit.header);
                    assert_eq!(
                        generation,
                        Ok(tx.generation + 1),
                        "the transaction just prepared must commit"
                    );
                }
            }
            3 => {
                let generation: u64 = u.arbitrary().unwrap_or(0);
                call(
                    &mut server,
                    &iface::client::commit::request(sequence, &generation),
                );
            }
            4 => {
                let pfn: u64 = u.arbitrary().unwrap_or(0);
                let reply = call(&mut server, &iface::client::lookup::request(sequence, &pfn));
                let found: Result<LedgerExtent, _> = iface::client::lookup::reply(
                    &reply,
                    &iface::client::lookup::request(sequence, &pfn).header,
                );
                if let Ok(e) = found {
                    let end = e.frames.start + e.frames.count;
                    assert!(
                        e.frames.start <= pfn && pfn < end,
                        "{e:?} does not hold {pfn:#x}"
                    );
                }
            }
            _ => {
                let index: u64 = u.int_in_range(0..=64).unwrap_or(0);
                call(
                    &mut server,
                    &iface::client::extent::request(sequence, &index),
                );
            }
        }
    }
}

/// Dispatches `message` and checks what must hold of every call: the reply
/// is one the core accepts for it, a refused call (and any `prepare`)
/// changes nothing, and the ledger keeps its invariants.
fn call(server: &mut LedgerServer<'_>, message: &Message) -> Message {
    let before = snapshot(server);
    let reply = iface::dispatch(server, message);
    let verdict = reply.check_reply(&message.header);
    let after = snapshot(server);
    match verdict {
        Ok(Ok(_)) => {}
        Ok(Err(_)) => assert_eq!(before, after, "a refused call changed the ledger"),
        Err(e) => panic!("a reply the core refuses: {e:?} for {:?}", message.header),
    }
    if message.header.operation == iface::Operation::prepare as u16 {
        assert_eq!(before, after, "prepare changed the ledger");
    }
    if let Some(l) = server.ledger() {
        l.check_invariants()
            .expect("the ledger keeps its invariants");
    }
    reply
}

/// A request of a known kind about frames near the fixed layout's RAM, or
/// any request at all.
fn request(u: &mut Unstructured<'_>) -> LedgerRequest {
    if u.ratio(1, 16).unwrap_or(false) {
        return LedgerRequest {
            op: u.arbitrary().unwrap_or(0),
            party: u.arbitrary().unwrap_or(0),
            frames: FrameRange {
                start: u.arbitrary().unwrap_or(0),
                count: u.arbitrary().unwrap_or(0),
            },
        };
    }
    let op = u.int_in_range(1..=10u32).unwrap_or(1);
    let party = u.int_in_range(0..=3u32).unwrap_or(1);
    let bank = RAM[usize::from(u.arbitrary::<bool>().unwrap_or(false))];
    let start = bank.0 + u64::from(u.int_in_range(0..=0x40u16).unwrap_or(0)) * 16
        - u64::from(u.int_in_range(0..=1u8).unwrap_or(0));
    let count = match op {
        LedgerRequest::CREATE_VM | LedgerRequest::DESTROY_VM => 0,
        _ if u.ratio(1, 32).unwrap_or(false) => 0,
        _ => u64::from(u.int_in_range(1..=0x40u8).unwrap_or(1)),
    };
    LedgerRequest {
        op,
        party,
        frames: FrameRange { start, count },
    }
}

fn fixed_boot() -> LedgerBoot {
    let mut boot = LedgerBoot {
        ram_count: RAM.len() as u32,
        hypervisor_count: HYPERVISOR.len() as u32,
        ..Default::default()
    };
    for (slot, &(start, count)) in boot.ram.iter_mut().zip(&RAM) {
        *slot = FrameRange { start, count };
    }
    for (slot, &(start, count)) in boot.hypervisor.iter_mut().zip(&HYPERVISOR) {
        *slot = FrameRange { start, count };
    }
    debug_assert!(RAM.len() <= LEDGER_BOOT_RANGES);
    boot
}

fn bytes_of(frames: &[(u64, u64)]) -> Vec<Range> {
    frames
        .iter()
        .map(|&(start, count)| {
            let r = PfnRange::new(start, count);
            Range::new(r.start * 4096, r.count * 4096).expect("the fixed layout fits")
        })
        .collect()
}

/// The honest ledger's answer passes the core's own check of it.
fn core_accepts(request: &LedgerRequest, tx: &LedgerTransaction, ram: &[Range], carve: &[Range]) {
    let vm = match request.op {
        LedgerRequest::HOST_SHARE_HYP
        | LedgerRequest::HOST_UNSHARE_HYP
        | LedgerRequest::HOST_DONATE_HYP
        | LedgerRequest::HYP_RETURN_HOST => None,
        _ => Some(u16::try_from(request.party).expect("the ledger took it as a VM handle")),
    };
    if let Err(why) = txcheck::check(request, tx, vm, ram, carve) {
        panic!("the core refuses the ledger's answer to {request:?}: {why}\n{tx:?}");
    }
}
