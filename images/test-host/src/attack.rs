//! Attacks on the core's memory paths, each run alone in its own boot
//! (`moat.attack=NAME` on the host's command line) so that one that brings
//! the core down cannot hide another.
//!
//! - `boundary_arguments`: every host hypercall with the boundary values of
//!   each address and length argument; each must answer with a typed error
//!   or succeed where the call is legal, never fault at EL2.
//! - `table_exhaustion`: donations that each straddle a 1 GiB IPA boundary
//!   (each needing fresh stage-2 tables) until the core runs out of table
//!   memory; it must answer `NoMemory` with nothing changed, and give all of
//!   it back when the VMs are gone.

use super::{
    Checks, Code, PAGE, Ram, consistent, destroy, donate, p, reclaim, share_hyp, try_read,
    try_write, unshare_hyp, vm_create,
};
use core::fmt;
use core::sync::atomic::{AtomicU64, Ordering};
use moat_abi::vm::{self as abi, MAX_VMS};
use moat_abi::{Error, hypercall};
use moat_platform::dt::Platform;

/// Runs the attack `name`; false if there is none by that name.
pub(super) fn run(c: &mut Checks, platform: &Platform<'_>, dtb: &[u8], name: &str) -> bool {
    match name {
        "boundary_arguments" => boundary_arguments(c, &mut Ram::new(platform, dtb)),
        "table_exhaustion" => table_exhaustion(c, &mut Ram::new(platform, dtb)),
        "dma_smmu" => super::dma::through_smmu(c, platform, dtb),
        "dma_withheld" => super::dma::withheld(c, dtb),
        // The GICv3 ITS and LPI tables aimed at memory the host does not own.
        _ => return super::its_attacks::run(c, platform, dtb, name),
    }
    true
}

/// The boundary values of an address or length argument.
const BOUNDARY: [u64; 6] = [0, 1, PAGE - 1, 1 << 48, 0u64.wrapping_sub(PAGE), u64::MAX];

/// One row of the table: a call, its arguments x1..x6 with one of them
/// (`vary`) replaced by each boundary value in turn.
struct Row {
    call: &'static str,
    function: u32,
    /// What the varied argument is.
    argument: &'static str,
    vary: usize,
    args: [u64; 6],
}

/// The answers one row got, for the log.
struct Answers([u64; BOUNDARY.len()]);

impl fmt::Display for Answers {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, a) in self.0.iter().enumerate() {
            if i > 0 {
                write!(f, ", ")?;
            }
            match Error::from_x0(*a) {
                Some(Ok(())) => write!(f, "0")?,
                Some(Err(e)) => write!(f, "{e:?}")?,
                None => write!(f, "{a:#x}")?,
            }
        }
        Ok(())
    }
}

/// Every host hypercall with the boundary values of each address and
/// length argument; the core stays up, nothing changes beyond what a legal
/// call does (and that is undone), and the ledger agrees with the tables.
fn boundary_arguments(c: &mut Checks, ram: &mut Ram) {
    // The fixture: a VM with a page at the guest's base (VM_LOAD's
    // destination), a host page shared with the hypervisor (its source),
    // and a destroyed VM holding pages (VM_RECLAIM's).
    const DYING_PAGES: u64 = 8;
    let (Some(vm_page), Some(src), Some(dying_pa)) = (
        ram.take(1, PAGE),
        ram.take(1, PAGE),
        ram.take(DYING_PAGES, PAGE),
    ) else {
        c.check(false, format_args!("boundary: free host RAM"));
        return;
    };
    let (r, vm) = vm_create(p::BASE_IPA, 0);
    let d = donate(vm, vm_page, 1, p::BASE_IPA);
    let s = share_hyp(src, 1);
    let (r2, dying) = vm_create(p::BASE_IPA, 0);
    let d2 = donate(dying, dying_pa, DYING_PAGES, p::BASE_IPA);
    let x2 = destroy(dying);
    c.check(
        r.ok() && d.ok() && s.ok() && r2.ok() && d2.ok() && x2.ok(),
        format_args!(
            "boundary: the fixture: a VM with a page ({r}, {d}), a page shared with the hypervisor ({s}), a destroyed VM holding {DYING_PAGES} pages ({r2}, {d2}, {x2})"
        ),
    );
    // A handle that names no VM, for the calls whose only argument is one.
    let no_vm = 0;
    let rows = [
        Row {
            call: "HOST_SHARE_HYP",
            function: abi::HOST_SHARE_HYP,
            argument: "PA",
            vary: 0,
            args: [0, 1, 0, 0, 0, 0],
        },
        Row {
            call: "HOST_SHARE_HYP",
            function: abi::HOST_SHARE_HYP,
            argument: "pages",
            vary: 1,
            args: [0, 1, 0, 0, 0, 0],
        },
        Row {
            call: "HOST_UNSHARE_HYP",
            function: abi::HOST_UNSHARE_HYP,
            argument: "PA",
            vary: 0,
            args: [src, 1, 0, 0, 0, 0],
        },
        Row {
            call: "HOST_UNSHARE_HYP",
            function: abi::HOST_UNSHARE_HYP,
            argument: "pages",
            vary: 1,
            args: [src, 1, 0, 0, 0, 0],
        },
        Row {
            call: "VM_CREATE",
            function: abi::VM_CREATE,
            argument: "entry IPA",
            vary: 0,
            args: [p::BASE_IPA, 0, 0, 0, 0, 0],
        },
        Row {
            call: "VM_DONATE",
            function: abi::VM_DONATE,
            argument: "PA",
            vary: 1,
            args: [vm, 0, 1, p::BASE_IPA + PAGE, 0, 0],
        },
        Row {
            call: "VM_DONATE",
            function: abi::VM_DONATE,
            argument: "pages",
            vary: 2,
            args: [vm, 0, 1, p::BASE_IPA + PAGE, 0, 0],
        },
        Row {
            call: "VM_DONATE",
            function: abi::VM_DONATE,
            argument: "IPA",
            vary: 3,
            args: [vm, 0, 1, p::BASE_IPA + PAGE, 0, 0],
        },
        Row {
            call: "VM_LOAD",
            function: abi::VM_LOAD,
            argument: "destination IPA",
            vary: 1,
            args: [vm, p::BASE_IPA, src, 64, 0, 0],
        },
        Row {
            call: "VM_LOAD",
            function: abi::VM_LOAD,
            argument: "source PA",
            vary: 2,
            args: [vm, p::BASE_IPA, src, 64, 0, 0],
        },
        Row {
            call: "VM_LOAD",
            function: abi::VM_LOAD,
            argument: "bytes",
            vary: 3,
            args: [vm, p::BASE_IPA, src, 64, 0, 0],
        },
        Row {
            call: "VM_LOAD",
            function: abi::VM_LOAD,
            argument: "source PA (0x800 bytes)",
            vary: 2,
            args: [vm, p::BASE_IPA, src, 0x800, 0, 0],
        },
        Row {
            call: "VM_RECLAIM",
            function: abi::VM_RECLAIM,
            argument: "PA",
            vary: 1,
            args: [dying, dying_pa, 1, 0, 0, 0],
        },
        Row {
            call: "VM_RECLAIM",
            function: abi::VM_RECLAIM,
            argument: "pages",
            vary: 2,
            args: [dying, dying_pa, 1, 0, 0, 0],
        },
        // No address or length: the answers to the previous exit, on a
        // handle that names no VM (nothing may look at them first).
        Row {
            call: "VCPU_RUN",
            function: abi::VCPU_RUN,
            argument: "r0",
            vary: 1,
            args: [no_vm, 0, 0, 0, 0, 0],
        },
        Row {
            call: "VM_DESTROY",
            function: abi::VM_DESTROY,
            argument: "unused x2",
            vary: 1,
            args: [no_vm, 0, 0, 0, 0, 0],
        },
        // The guest's calls, made by the host.
        Row {
            call: "GUEST_SHARE_HOST",
            function: abi::GUEST_SHARE_HOST,
            argument: "IPA",
            vary: 0,
            args: [p::BASE_IPA, 1, 0, 0, 0, 0],
        },
        Row {
            call: "GUEST_SHARE_HOST",
            function: abi::GUEST_SHARE_HOST,
            argument: "pages",
            vary: 1,
            args: [p::BASE_IPA, 1, 0, 0, 0, 0],
        },
        Row {
            call: "GUEST_UNSHARE_HOST",
            function: abi::GUEST_UNSHARE_HOST,
            argument: "IPA",
            vary: 0,
            args: [p::BASE_IPA, 1, 0, 0, 0, 0],
        },
        Row {
            call: "GUEST_UNSHARE_HOST",
            function: abi::GUEST_UNSHARE_HOST,
            argument: "pages",
            vary: 1,
            args: [p::BASE_IPA, 1, 0, 0, 0, 0],
        },
        // The core's own calls, and a service's, made by the host.
        Row {
            call: "NULL",
            function: hypercall::NULL,
            argument: "x1",
            vary: 0,
            args: [0; 6],
        },
        Row {
            call: "ABI_VERSION",
            function: hypercall::ABI_VERSION,
            argument: "x1",
            vary: 0,
            args: [0; 6],
        },
        Row {
            call: "CHECK_CONSISTENCY",
            function: hypercall::CHECK_CONSISTENCY,
            argument: "x1",
            vary: 0,
            args: [0; 6],
        },
        Row {
            call: "SVC_REPLY_WAIT",
            function: hypercall::SVC_REPLY_WAIT,
            argument: "x1",
            vary: 0,
            args: [0; 6],
        },
        Row {
            call: "SVC_LOG",
            function: hypercall::SVC_LOG,
            argument: "length",
            vary: 0,
            args: [0; 6],
        },
        Row {
            call: "SVC_FAULT",
            function: hypercall::SVC_FAULT,
            argument: "FAR",
            vary: 2,
            args: [0; 6],
        },
    ];
    let mut calls = 0;
    let mut undone = true;
    let mut donated: heapless::Vec<(u64, u64), 12> = heapless::Vec::new();
    let mut reclaimed_in_rows = 0;
    for row in &rows {
        let mut answers = Answers([0; BOUNDARY.len()]);
        for (i, value) in BOUNDARY.into_iter().enumerate() {
            let mut args = row.args;
            // Donations and shares take a fresh page each: one that
            // succeeds must not turn the rest into refusals of a page
            // already given.
            if row.function == abi::VM_DONATE {
                args[1] = ram.take(1, PAGE).unwrap_or(0);
            }
            if row.function == abi::HOST_SHARE_HYP {
                args[0] = ram.take(1, PAGE).unwrap_or(0);
            }
            args[row.vary] = value;
            let r = super::call(row.function, args);
            answers.0[i] = r[0];
            calls += 1;
            if r[0] != 0 {
                continue;
            }
            // A call that succeeded is a legal one: what it gave is taken
            // back (a donation once the VM is destroyed, below).
            undone &= match row.function {
                abi::HOST_SHARE_HYP => unshare_hyp(args[0], args[1]).ok(),
                abi::HOST_UNSHARE_HYP => share_hyp(args[0], args[1]).ok(),
                abi::VM_CREATE => destroy(r[1]).ok(),
                abi::VM_DONATE => donated.push((args[1], args[2])).is_ok(),
                abi::VM_RECLAIM => {
                    reclaimed_in_rows += args[2];
                    true
                }
                _ => true,
            };
        }
        let all_typed = answers.0.iter().all(|a| Error::from_x0(*a).is_some());
        // What the row must answer beyond a typed status.
        let invalid = Error::InvalidParameters.to_x0();
        let expected = match row.function {
            // The end of the source rounds past 2^64.
            abi::VM_LOAD if row.vary == 2 => answers.0[4] == invalid && answers.0[5] == invalid,
            // No range that wraps or ends past 2^64 is accepted.
            abi::VM_LOAD | abi::VM_DONATE | abi::VM_RECLAIM | abi::HOST_SHARE_HYP => {
                answers.0[4] != 0 && answers.0[5] != 0
            }
            hypercall::NULL | hypercall::ABI_VERSION | hypercall::CHECK_CONSISTENCY => {
                answers.0.iter().all(|a| *a == 0)
            }
            _ => true,
        };
        c.check(
            all_typed && expected,
            format_args!(
                "boundary: {} with {} = 0, 1, page-1, 2^48, 2^64-page, u64::MAX: {answers}",
                row.call, row.argument
            ),
        );
    }
    let alive = super::call(hypercall::NULL, [0; 6])[0];
    c.check(
        alive == 0 && undone,
        format_args!(
            "boundary: {calls} calls, the core still answers (NULL = {}), every legal call undone",
            Code(alive)
        ),
    );
    consistent(c, "every hypercall with boundary arguments");
    // The fixture and the legal donations back to the host.
    let x = destroy(vm);
    let mut failures = u64::from(!reclaim(vm, vm_page, 1).ok());
    for &(pa, pages) in &donated {
        failures += u64::from(!reclaim(vm, pa, pages).ok());
    }
    failures += u64::from(!unshare_hyp(src, 1).ok());
    let mut back = reclaimed_in_rows;
    for i in 0..DYING_PAGES {
        back += u64::from(reclaim(dying, dying_pa + i * PAGE, 1).ok());
    }
    c.check(
        x.ok() && failures == 0 && back == DYING_PAGES,
        format_args!(
            "boundary: the fixture taken back (destroy {x}, {failures} failed reclaims or unshares, {back} of {DYING_PAGES} pages of the destroyed VM reclaimed)"
        ),
    );
    consistent(c, "the boundary fixture was taken back");
}

/// The donations `table_exhaustion` made (too many for the stack).
static DONATIONS: [AtomicU64; MAX_VMS * PER_VM as usize + DRAIN as usize] =
    [const { AtomicU64::new(0) }; MAX_VMS * PER_VM as usize + DRAIN as usize];
/// Most one-table donations that finish off the heap.
const DRAIN: u64 = 8;

/// Bytes in 1 GiB.
const GIB: u64 = 1 << 30;
/// Bytes a last-level table maps.
const BLOCK: u64 = 2 << 20;
/// Donations one VM takes before the next VM is used: below the core's
/// limit on a VM's separate donations.
const PER_VM: u64 = 240;

/// Donations of two pages that each straddle a 1 GiB IPA boundary, each
/// needing fresh level-2 and level-3 tables, to as many VMs as it takes
/// until the core answers `NoMemory` (or runs out of VMs or IPA space).
fn table_exhaustion(c: &mut Checks, ram: &mut Ram) {
    let mut vms: heapless::Vec<u64, MAX_VMS> = heapless::Vec::new();
    let mut n = 0;
    // First a whole 2 MiB of the host's, which frees the host's table for
    // it: taking it back must not depend on the heap the VMs exhaust.
    let chunk = ram.take(BLOCK / PAGE, BLOCK);
    let mut refusal = None;
    'vms: while vms.len() < MAX_VMS {
        let (r, handle) = vm_create(p::BASE_IPA, 0);
        if !r.ok() {
            refusal = Some(("VM_CREATE", r, 0));
            break;
        }
        let _ = vms.push(handle);
        if let (Some(pa), 1) = (chunk, vms.len()) {
            let r = donate(handle, pa, BLOCK / PAGE, 2 * GIB + BLOCK);
            c.check(
                r.ok(),
                format_args!("tables: donate a whole 2 MiB at {pa:#x} = {r}"),
            );
        }
        for k in 1..=PER_VM {
            let Some(pa) = ram.take(2, PAGE) else {
                break 'vms;
            };
            let r = donate(handle, pa, 2, k * GIB - PAGE);
            if r.ok() {
                // The page address, with the handle in its low bits.
                DONATIONS[n].store(pa | handle, Ordering::Relaxed);
                n += 1;
                continue;
            }
            if r.is(Error::InvalidParameters) {
                // Past the VM's IPA space: the next VM.
                continue 'vms;
            }
            refusal = Some(("VM_DONATE", r, pa));
            break 'vms;
        }
    }
    // The straddle refused needed four table pages: up to three may be
    // left. Donations that need one table each take them, so that the
    // heap has no page left at all.
    if let (Some(("VM_DONATE", _, _)), Some(&handle)) = (refusal, vms.last()) {
        for j in 1..=DRAIN {
            let Some(pa) = ram.take(2, PAGE) else {
                break;
            };
            let r = donate(handle, pa, 2, GIB + j * BLOCK);
            if !r.ok() {
                refusal = Some(("VM_DONATE", r, pa));
                break;
            }
            DONATIONS[n].store(pa | handle, Ordering::Relaxed);
            n += 1;
        }
    }
    let Some((call, code, pa)) = refusal else {
        c.check(
            false,
            format_args!(
                "tables: {n} donations straddling 1 GiB IPA boundaries to {} VMs and no NoMemory",
                vms.len()
            ),
        );
        return;
    };
    // The refused donation changed nothing: its pages are still the host's.
    let host_still_owns = pa == 0
        || (0..2 * PAGE / 8).all(|i| {
            let at = pa + i * 8;
            try_read(at).is_some() && try_write(at, i)
        });
    c.check(
        code.is(Error::NoMemory) && host_still_owns,
        format_args!(
            "tables: after {n} donations straddling 1 GiB IPA boundaries, {call} = {code} (expected NoMemory); the refused pages are still the host's: {host_still_owns}"
        ),
    );
    let alive = super::call(hypercall::NULL, [0; 6])[0];
    c.check(
        alive == 0,
        format_args!("tables: the core still answers (NULL = {})", Code(alive)),
    );
    // Everything back: the 2 MiB first, while the heap is still out.
    let mut failures = 0;
    for &h in &vms {
        failures += u32::from(!destroy(h).ok());
    }
    if let (Some(pa), Some(&first)) = (chunk, vms.first()) {
        let r = reclaim(first, pa, BLOCK / PAGE);
        c.check(
            r.ok(),
            format_args!("tables: with the heap out, the host takes its whole 2 MiB back: {r}"),
        );
    }
    for d in &DONATIONS[..n] {
        let v = d.load(Ordering::Relaxed);
        failures += u32::from(!reclaim(v & (PAGE - 1), v & !(PAGE - 1), 2).ok());
    }
    c.check(
        failures == 0,
        format_args!(
            "tables: {} VMs destroyed and their {n} donations reclaimed ({failures} failures)",
            vms.len()
        ),
    );
    consistent(c, "the stage-2 table memory ran out and was given back");
    // The memory is back for the next VM.
    let (r, h) = vm_create(p::BASE_IPA, 0);
    let again = ram.take(2, PAGE).unwrap_or(0);
    let d = donate(h, again, 2, GIB - PAGE);
    let x = destroy(h);
    let b = reclaim(h, again, 2);
    c.check(
        r.ok() && d.ok() && x.ok() && b.ok(),
        format_args!(
            "tables: a new VM gets a straddling donation again (create {r}, donate {d}, destroy {x}, reclaim {b})"
        ),
    );
}
