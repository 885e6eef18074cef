/* SPDX-License-Identifier: MIT OR Apache-2.0 */
/*
 * The ioctl interface of /dev/moat. The Rust VMM (images/vmm/src/device.rs)
 * mirrors these layouts; both sides use fixed-size 64-bit fields only, so
 * the layout has no padding and no pointer-size dependence.
 */
#ifndef MOAT_UAPI_H
#define MOAT_UAPI_H

#include <linux/ioctl.h>
#include <linux/types.h>

#define MOAT_IOCTL_MAGIC 0xb7

/*
 * VM_CREATE: a protected VM entered at @entry (an IPA) with @flags (VmFlags)
 * and @vcpus vCPUs (0 or 1: one).
 */
struct moat_create {
	__u64 entry;
	__u64 flags;
	__u64 vcpus;
};

/* VM_DONATE of @size bytes (a multiple of 4 KiB) of fresh kernel pages at @ipa. */
struct moat_donate {
	__u64 ipa;
	__u64 size;
};

/* VM_LOAD of @size bytes from the caller's memory at @addr to @ipa. */
struct moat_load {
	__u64 ipa;
	__u64 addr;
	__u64 size;
};

/*
 * VCPU_RUN of vCPU @vcpu: @answer is r0..r3 (the answer to its previous exit), @inject
 * up to two interrupts to make pending in a VmFlags::VGIC VM (0: none);
 * on return @exit holds x1..x7 (the exit reason and its details).
 * After an MMIO exit, @answer[1] = MOAT_MMIO_ABORT says no device is there:
 * the core delivers a synchronous external abort to the guest instead.
 * Threads may run different vCPUs of one VM at once: -EBUSY if @vcpu runs
 * in another thread; -EINTR, with nothing run, if a signal is pending (run
 * again with the same @answer and @inject).
 */
#define MOAT_MMIO_ABORT 1

struct moat_run {
	__u64 vcpu;
	__u64 answer[4];
	__u64 inject[2];
	__u64 exit[7];
};

#define MOAT_CREATE _IOW(MOAT_IOCTL_MAGIC, 0, struct moat_create)
#define MOAT_DONATE _IOW(MOAT_IOCTL_MAGIC, 1, struct moat_donate)
#define MOAT_LOAD _IOW(MOAT_IOCTL_MAGIC, 2, struct moat_load)
#define MOAT_RUN _IOWR(MOAT_IOCTL_MAGIC, 3, struct moat_run)
/* CHECK_CONSISTENCY: 0 if the core's ledger and the host's stage-2 agree. */
#define MOAT_CHECK _IO(MOAT_IOCTL_MAGIC, 4)
/*
 * LEDGER_RESTART: stops the memory ledger and rebuilds it from the core's
 * own records. 0 once it is back; -EAGAIN if a VM is running somewhere: the
 * rebuild then happens at the first host call made with none running, and
 * memory calls meanwhile are retried by the module, then fail with -EAGAIN.
 */
#define MOAT_RESTART_LEDGER _IO(MOAT_IOCTL_MAGIC, 5)

#endif /* MOAT_UAPI_H */
