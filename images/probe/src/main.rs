//! The feature probe: reads the hardware capabilities Linux advertises
//! (AT_HWCAP, AT_HWCAP2) and executes one instruction of each feature it
//! knows, reporting each as `ok` (advertised, and the instruction ran),
//! `missing` (not advertised; nothing executed) or `faulted` (advertised,
//! but the instruction raised SIGILL).
//!
//! A feature the kernel advertises but the hypervisor leaves disabled
//! (MOPS with HCRX_EL2.MSCEn clear, SVE with CPTR_EL2.TZ set) shows up as
//! `faulted`; the same program on bare QEMU is the reference.
//!
//! `moat-probe counter` prints the virtual counter instead (the boot
//! benchmark's clock).
//!
//! The instructions are written as `.inst` words so that no assembler
//! extension flags are needed; each is one instruction (three for MOPS),
//! and the SIGILL handler steps over the faulting one.

use core::sync::atomic::{AtomicBool, Ordering};

static FAULTED: AtomicBool = AtomicBool::new(false);

/// SIGILL: note it and resume after the faulting instruction.
extern "C" fn on_sigill(_: libc::c_int, _: *mut libc::siginfo_t, context: *mut libc::c_void) {
    FAULTED.store(true, Ordering::SeqCst);
    let uc = context.cast::<libc::ucontext_t>();
    // SAFETY: the kernel passes the interrupted context of this thread;
    // every probed instruction is 4 bytes, so the next one is at pc + 4.
    unsafe { (*uc).uc_mcontext.pc += 4 };
}

/// 64 bytes the memory instructions work on.
#[repr(C, align(64))]
struct Buffer([u8; 64]);

/// Emits one probe: the instruction words in `$inst`, with `x0` (and `x5`,
/// `x6`) pointing into the buffer, and every register they may touch
/// declared clobbered.
macro_rules! probe {
    ($buf:expr, $($inst:literal),+) => {{
        let p = $buf.0.as_mut_ptr();
        // SAFETY: the instructions read and write at most 16 bytes at x0,
        // x5 or x6, all inside the buffer, and the registers below; if one
        // is UNDEFINED the SIGILL handler steps over it.
        unsafe {
            core::arch::asm!(
                $(concat!(".inst ", $inst)),+,
                inout("x0") p => _,
                inout("x5") p => _,
                inout("x6") p.wrapping_add(32) => _,
                inout("x7") 16u64 => _,
                out("x1") _, out("x2") _,
                out("v0") _, out("v1") _, out("v2") _, out("v3") _,
                options(nostack),
            );
        }
    }};
}

type Run = fn(&mut Buffer);

/// A feature: its name as `/proc/cpuinfo` spells it, its AT_HWCAP (1) or
/// AT_HWCAP2 (2) bit, and one of its instructions.
struct Feature {
    name: &'static str,
    word: u8,
    bit: u32,
    run: Run,
}

const FEATURES: &[Feature] = &[
    // AESE v0.16b, v1.16b
    Feature {
        name: "aes",
        word: 1,
        bit: 3,
        run: |b| probe!(b, "0x4e284820"),
    },
    // CRC32B w0, w0, w0
    Feature {
        name: "crc32",
        word: 1,
        bit: 7,
        run: |b| probe!(b, "0x1ac04000"),
    },
    // LDADD w1, w2, [x0]
    Feature {
        name: "atomics",
        word: 1,
        bit: 8,
        run: |b| probe!(b, "0xb8210002"),
    },
    // FADD h0, h0, h0
    Feature {
        name: "fphp",
        word: 1,
        bit: 9,
        run: |b| probe!(b, "0x1ee02800"),
    },
    // LDAPR w0, [x1]... with x1 = x0: MOV x1, x0; LDAPR w2, [x1]
    Feature {
        name: "lrcpc",
        word: 1,
        bit: 15,
        run: |b| probe!(b, "0xaa0003e1", "0xb8bfc022"),
    },
    // DC CVAP, x0
    Feature {
        name: "dcpop",
        word: 1,
        bit: 16,
        run: |b| probe!(b, "0xd50b7c20"),
    },
    // EOR3 v0.16b, v1.16b, v2.16b, v3.16b
    Feature {
        name: "sha3",
        word: 1,
        bit: 17,
        run: |b| probe!(b, "0xce020c20"),
    },
    // SDOT v0.4s, v1.16b, v2.16b
    Feature {
        name: "asimddp",
        word: 1,
        bit: 20,
        run: |b| probe!(b, "0x4e829420"),
    },
    // RDVL x1, #1
    Feature {
        name: "sve",
        word: 1,
        bit: 22,
        run: |b| probe!(b, "0x04bf5021"),
    },
    // CFINV
    Feature {
        name: "flagm",
        word: 1,
        bit: 27,
        run: |b| probe!(b, "0xd500401f"),
    },
    // SB
    Feature {
        name: "sb",
        word: 1,
        bit: 29,
        run: |b| probe!(b, "0xd50330ff"),
    },
    // PACIA x1, x2
    Feature {
        name: "paca",
        word: 1,
        bit: 30,
        run: |b| probe!(b, "0xdac10041"),
    },
    // PACGA x1, x2, x0
    Feature {
        name: "pacg",
        word: 1,
        bit: 31,
        run: |b| probe!(b, "0x9ac03041"),
    },
    // SMMLA v0.4s, v1.16b, v2.16b
    Feature {
        name: "i8mm",
        word: 2,
        bit: 13,
        run: |b| probe!(b, "0x4e82a420"),
    },
    // BFCVT h0, s0
    Feature {
        name: "bf16",
        word: 2,
        bit: 14,
        run: |b| probe!(b, "0x1e634000"),
    },
    // MRS x1, RNDR
    Feature {
        name: "rng",
        word: 2,
        bit: 16,
        run: |b| probe!(b, "0xd53b2401"),
    },
    // BTI c
    Feature {
        name: "bti",
        word: 2,
        bit: 17,
        run: |b| probe!(b, "0xd503245f"),
    },
    // IRG x1, x0
    Feature {
        name: "mte",
        word: 2,
        bit: 18,
        run: |b| probe!(b, "0x9adf1001"),
    },
    // RDSVL x1, #1
    Feature {
        name: "sme",
        word: 2,
        bit: 23,
        run: |b| probe!(b, "0x04bf5821"),
    },
    // SETP/SETM/SETE [x5]!, x7!, xzr (memset), then CPYFP/CPYFM/CPYFE
    // [x5]!, [x6]!, x7! (memcpy), 16 bytes each.
    Feature {
        name: "mops",
        word: 2,
        bit: 43,
        run: |b| {
            probe!(b, "0x19df04e5", "0x19df44e5", "0x19df84e5");
            probe!(b, "0x190604e5", "0x194604e5", "0x198604e5");
        },
    },
];

/// Reads the virtual counter. Under `-icount shift=0` QEMU's 1 GHz
/// counter advances by one per instruction executed, so the value is the
/// number of instructions the machine has run since reset.
fn virtual_counter() -> u64 {
    let value: u64;
    // SAFETY: CNTVCT_EL0 is readable at EL0 under Linux (CNTKCTL_EL1.EL0VCTEN
    // is set for the vDSO); the ISB orders the read after what came before.
    unsafe {
        core::arch::asm!("isb", "mrs {}, cntvct_el0", out(reg) value, options(nostack));
    }
    value
}

fn main() {
    // `moat-probe counter`: print the virtual counter and stop. The boot
    // benchmark runs it as the initramfs's first command.
    if std::env::args().nth(1).as_deref() == Some("counter") {
        println!("probe: counter={}", virtual_counter());
        return;
    }
    // SAFETY: getauxval only reads the auxiliary vector.
    let (hwcap, hwcap2) = unsafe {
        (
            libc::getauxval(libc::AT_HWCAP),
            libc::getauxval(libc::AT_HWCAP2),
        )
    };
    // SAFETY: a zeroed sigaction is a valid starting value; the handler
    // has the SA_SIGINFO signature and only touches an atomic and the
    // context it is given.
    unsafe {
        let mut action: libc::sigaction = core::mem::zeroed();
        let handler: extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void) =
            on_sigill;
        action.sa_sigaction = handler as libc::sighandler_t;
        action.sa_flags = libc::SA_SIGINFO;
        libc::sigemptyset(&mut action.sa_mask);
        if libc::sigaction(libc::SIGILL, &action, core::ptr::null_mut()) != 0 {
            println!("probe: cannot catch SIGILL");
            std::process::exit(1);
        }
    }
    println!("probe: hwcap {hwcap:#x} hwcap2 {hwcap2:#x}");
    let mut buffer = Buffer([0; 64]);
    let mut faulted = 0;
    for f in FEATURES {
        let word = if f.word == 1 { hwcap } else { hwcap2 };
        let verdict = if word & (1 << f.bit) == 0 {
            "missing"
        } else {
            FAULTED.store(false, Ordering::SeqCst);
            (f.run)(&mut buffer);
            if FAULTED.load(Ordering::SeqCst) {
                faulted += 1;
                "faulted"
            } else {
                "ok"
            }
        };
        println!("probe: {} {verdict}", f.name);
    }
    println!("probe: faults in advertised features: {faulted}");
    std::process::exit(i32::from(faulted != 0));
}
