//! A host that plays with its own interrupts and timers against the core.
//!
//! Two promises are tried here. A VM run comes back to the host in bounded
//! time whatever the guest does and whichever timer the host relies on: the
//! guest's virtual timer replaces the host's in the CPU while it runs, so a
//! host on its virtual timer must still get its tick. And a memory
//! transaction completes whatever priorities the host gives its interrupts:
//! an interrupt the host leaves pending at a priority above the core's
//! service mask (pseudo-NMI kernels use 0x20; a hostile one can use 0) must
//! neither fail the transaction nor leave the ledger behind the stage-2.

use super::{
    CONSOLE, Checks, Code, ExitReason, Guest, PAGE, REDISTRIBUTORS, Ram, STOP_SGI, consistent,
    destroy, donate, gic_open, gic_write32, p, read_u64, reclaim, send_stop_sgi, sgi_frame,
    vm_create, write_u64,
};
use core::fmt::Write as _;
use core::sync::atomic::Ordering;
use moat_platform::dt::{Gic, Platform};

/// The EL1 virtual timer's PPI and the EL1 physical timer's.
const VIRTUAL_TIMER_INTID: u64 = 27;
const PHYSICAL_TIMER_INTID: u64 = 30;
/// The priority Linux gives its interrupts.
const HOST_PRIORITY: u8 = 0xa0;

/// The timer a case arms before running the guest.
#[derive(Clone, Copy, PartialEq, Eq)]
enum HostTimer {
    Virtual,
    Physical,
    /// None at all: only the core's backstop ends the run.
    None,
}

fn clock() -> (u64, u64) {
    let (now, freq): (u64, u64);
    // SAFETY: reads the virtual counter (CNTVOFF_EL2 is 0 for the host) and
    // its frequency.
    unsafe {
        core::arch::asm!("isb", "mrs {n}, cntvct_el0", "mrs {f}, cntfrq_el0",
            n = out(reg) now, f = out(reg) freq, options(nomem, nostack));
    }
    (now, freq)
}

/// Arms `timer` for counter value `at` (interrupt unmasked), or disarms it.
fn set_timer(timer: HostTimer, at: Option<u64>) {
    let (ctl, cval) = match at {
        Some(t) => (1u64, t),
        None => (0, 0),
    };
    // SAFETY: the host's own EL1 timers (CNTHCTL_EL2 gives it the physical
    // one); the interrupt only pends while PSTATE.I is masked.
    unsafe {
        match timer {
            HostTimer::Virtual => core::arch::asm!(
                "msr cntv_cval_el0, {v}", "msr cntv_ctl_el0, {c}", "isb",
                v = in(reg) cval, c = in(reg) ctl, options(nostack)),
            HostTimer::Physical => core::arch::asm!(
                "msr cntp_cval_el0, {v}", "msr cntp_ctl_el0, {c}", "isb",
                v = in(reg) cval, c = in(reg) ctl, options(nostack)),
            HostTimer::None => {}
        }
    }
}

/// Acknowledges the highest-priority pending group-1 interrupt and ends it;
/// returns its INTID (1023: nothing pending).
fn acknowledge() -> u64 {
    let intid: u64;
    // SAFETY: acknowledges and, if there was one, ends an interrupt.
    unsafe {
        core::arch::asm!(
            "mrs {i}, icc_iar1_el1", "cmp {i}, #1020", "b.hs 1f",
            "msr icc_eoir1_el1, {i}", "1:", "isb",
            i = out(reg) intid, options(nostack),
        );
    }
    intid & 0xff_ffff
}

/// Disables `intid` again and restores the CPU interface `gic_open` opened.
fn restore_local(intid: u64, saved: (u64, u64)) {
    if let Some(sgi) = sgi_frame() {
        gic_write32(sgi + 0x180, 1 << intid); // ICENABLER0
        gic_write32(sgi + 0x280, 1 << intid); // ICPENDR0
    }
    // SAFETY: puts back what `enable_local` read.
    unsafe {
        core::arch::asm!(
            "msr icc_pmr_el1, {p}", "msr icc_igrpen1_el1, {g}", "isb",
            p = in(reg) saved.0, g = in(reg) saved.1, options(nostack),
        );
    }
}

/// The interrupt and timer cases (GICv3 only: the test host's GIC code
/// speaks system registers).
pub(super) fn hostile_interrupts(c: &mut Checks, ram: &mut Ram, platform: &Platform<'_>) {
    let Gic::V3 { redistributors, .. } = &platform.gic else {
        say!("attack: GICv2: skipping the interrupt and timer cases");
        return;
    };
    if let Some(r) = redistributors.first() {
        REDISTRIBUTORS[0].store(r.base, Ordering::SeqCst);
        REDISTRIBUTORS[1].store(r.end(), Ordering::SeqCst);
    }
    for priority in [0x20, 0x00] {
        transaction_under_interrupt(c, ram, priority);
        consistent(
            c,
            "memory transactions made with a high-priority host interrupt pending",
        );
    }
    for timer in [HostTimer::Virtual, HostTimer::Physical, HostTimer::None] {
        guest_keeps_cpu(c, ram, timer);
        consistent(c, "a spinning guest was stopped by the host's timer");
    }
}

/// A spinning guest under a host that relies on `timer`: VCPU_RUN must come
/// back with an Interrupt exit, and the host then takes its timer's
/// interrupt (with no timer, the core's backstop ends the run and nothing
/// is pending for the host).
fn guest_keeps_cpu(c: &mut Checks, ram: &mut Ram, timer: HostTimer) {
    let (name, intid) = match timer {
        HostTimer::Virtual => (
            "attack guest keeps cpu (host on its virtual timer)",
            VIRTUAL_TIMER_INTID,
        ),
        HostTimer::Physical => (
            "attack guest keeps cpu (host on its physical timer)",
            PHYSICAL_TIMER_INTID,
        ),
        HostTimer::None => ("attack guest keeps cpu (host with no timer armed)", 1023),
    };
    let Some(mut g) = Guest::new(c, ram, name, 0, |_, _| {}) else {
        return;
    };
    if g.start(c, p::MODE_SPIN, 0).is_none() {
        g.end(c, false);
        return;
    }
    let Some(e) = g
        .expect_hvc(c, p::SPINNING, "SPINNING")
        .filter(|a| a[1] == 0)
    else {
        c.check(
            false,
            format_args!("{name}: the guest shared a page to count in"),
        );
        g.end(c, false);
        return;
    };
    let counter = g.pa_of(e[0]);
    let saved = if timer == HostTimer::None {
        None
    } else {
        gic_open(intid, HOST_PRIORITY)
    };
    let (start, freq) = clock();
    // The host's tick, 2 ms away.
    let deadline = start + freq / 500;
    set_timer(timer, Some(deadline));
    let exit = g.run_once(c);
    let (end, _) = clock();
    let taken = saved.map(|_| acknowledge()).unwrap_or(1023);
    set_timer(timer, None);
    if let Some(s) = saved {
        restore_local(intid, s);
    }
    // How far the guest got (on a loaded machine the host's 2 ms can pass
    // before the guest has run at all: it is shown, not required).
    let counted = read_u64(counter);
    let micros = |ticks: u64| ticks.saturating_mul(1_000_000) / freq.max(1);
    let ok = exit.is_some_and(|e| e.reason == ExitReason::Interrupt);
    c.check(
        ok,
        format_args!(
            "{name}: VCPU_RUN of a spinning guest (it counted to {counted}) came back with an Interrupt exit after {} us of guest time",
            micros(end - start)
        ),
    );
    // A bound far above the 10 ms slice: guest time also runs while an
    // emulator is descheduled, and the check is that the run ended at all.
    c.check(
        end - start < freq,
        format_args!("{name}: the run ended within a second of guest time"),
    );
    c.check(
        taken == intid,
        format_args!(
            "{name}: then the host took INTID {taken} (expected {intid}{})",
            if intid == 1023 {
                ": none, the core's backstop ended the run"
            } else {
                ", its own timer"
            }
        ),
    );
    write_u64(counter + 8, p::STOP);
    let off = g.expect_exit(c, ExitReason::Shutdown);
    c.check(
        off.is_some(),
        format_args!("{name}: told to stop, the guest powered off"),
    );
    g.end(c, true);
}

/// Donations, loads and reclaims while an SGI the host gave `priority` is
/// pending on this CPU (its PSTATE.I masked, so it stays pending): every
/// transaction succeeds, and the interrupt is still there for the host
/// afterwards.
fn transaction_under_interrupt(c: &mut Checks, ram: &mut Ram, priority: u8) {
    let name = "attack interrupt during transaction";
    let Some(pa) = ram.take(8, PAGE) else {
        c.check(false, format_args!("{name}: free host RAM"));
        return;
    };
    let Some(saved) = gic_open(STOP_SGI, priority) else {
        c.check(false, format_args!("{name}: this CPU's redistributor"));
        return;
    };
    send_stop_sgi(sysreg!("mpidr_el1"));
    let (created, handle) = vm_create(p::BASE_IPA, 0);
    let mut results: [Code; 5] = [Code(u64::MAX); 5];
    if created.ok() {
        results[0] = donate(handle, pa, 4, p::BASE_IPA);
        results[1] = donate(handle, pa + 4 * PAGE, 4, p::BASE_IPA + 4 * PAGE);
        results[2] = destroy(handle);
        results[3] = reclaim(handle, pa, 4);
        results[4] = reclaim(handle, pa + 4 * PAGE, 4);
    }
    let taken = acknowledge();
    restore_local(STOP_SGI, saved);
    c.check(
        created.ok() && results.iter().all(|r| r.ok()),
        format_args!(
            "{name}: with SGI {STOP_SGI} pending at priority {priority:#x}: VM_CREATE {created}, VM_DONATE {} and {}, VM_DESTROY {}, VM_RECLAIM {} and {}",
            results[0], results[1], results[2], results[3], results[4]
        ),
    );
    c.check(
        taken == STOP_SGI,
        format_args!(
            "{name}: the host's SGI (priority {priority:#x}) was still pending afterwards and taken (INTID {taken})"
        ),
    );
}
