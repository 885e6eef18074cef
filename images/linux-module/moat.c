// SPDX-License-Identifier: MIT OR Apache-2.0
/*
 * /dev/moat: protected VMs for Linux processes running as Moat's host.
 *
 * The module only translates: each ioctl becomes one or a few of Moat's
 * hypercalls, and every decision (which memory a VM may get, what it may
 * load, when it may run) is the core's. What the module adds is ownership on
 * the Linux side: the memory a VM is given comes from the kernel's page
 * allocator, and every VM belongs to the open file that created it, so that
 * closing the file (or the death of its process) destroys the VM and gives
 * its pages back to the kernel.
 *
 * One open file holds at most one VM. Calls on one file are serialised by a
 * mutex, except runs: the vCPUs of one VM run on several CPUs at once, one
 * thread each (the core refuses a second run of a vCPU that runs, and calls
 * that need the VM idle while any vCPU runs).
 */

#define pr_fmt(fmt) KBUILD_MODNAME ": " fmt

#include <linux/arm-smccc.h>
#include <linux/fs.h>
#include <linux/gfp.h>
#include <linux/irqflags.h>
#include <linux/miscdevice.h>
#include <linux/mm.h>
#include <linux/module.h>
#include <linux/mutex.h>
#include <linux/overflow.h>
#include <linux/sched/signal.h>
#include <linux/slab.h>
#include <linux/uaccess.h>

#include "moat_uapi.h"

/*
 * The hypercall layer: Moat's function ids (abi/src/vm.rs and abi/src/lib.rs)
 * and the one function that issues them.
 */
#define MOAT_CHECK_CONSISTENCY	0xc6000002
#define MOAT_LEDGER_RESTART	0xc6000003
#define MOAT_HOST_SHARE_HYP	0xc6000010
#define MOAT_HOST_UNSHARE_HYP	0xc6000011
#define MOAT_VM_CREATE		0xc6000012
#define MOAT_VM_DONATE		0xc6000013
#define MOAT_VM_LOAD		0xc6000014
#define MOAT_VCPU_RUN		0xc6000015
#define MOAT_VM_DESTROY		0xc6000016
#define MOAT_VM_RECLAIM		0xc6000017

/* abi::Error, as x0 carries it. */
#define MOAT_NOT_SUPPORTED	-1
#define MOAT_INVALID_PARAMETERS	-2
#define MOAT_DENIED		-3
#define MOAT_NO_MEMORY		-4
#define MOAT_BUSY		-5
#define MOAT_SERVICE_FAILED	-6
#define MOAT_VERSION_MISMATCH	-7
#define MOAT_INTERRUPTED	-8
#define MOAT_RETRY		-9

/* Calls answered Retry issued again before the caller sees -EAGAIN. */
#define MOAT_RETRY_LIMIT	100000

/* The largest block donated at once: 2 MiB, one stage-2 block. */
#define MOAT_DONATE_MAX_ORDER	9
/* The bounce buffer VM_LOAD copies from: 64 KiB. */
#define MOAT_LOAD_ORDER		4

static long moat_errno(long code)
{
	switch (code) {
	case 0:
		return 0;
	case MOAT_NOT_SUPPORTED:
		return -EOPNOTSUPP;
	case MOAT_INVALID_PARAMETERS:
		return -EINVAL;
	case MOAT_DENIED:
		return -EPERM;
	case MOAT_NO_MEMORY:
		return -ENOMEM;
	case MOAT_BUSY:
		return -EBUSY;
	case MOAT_VERSION_MISMATCH:
		return -EPROTO;
	case MOAT_INTERRUPTED:
		return -EINTR;
	case MOAT_RETRY:
		/* The ledger is being rebuilt: nothing was done, try again. */
		return -EAGAIN;
	case MOAT_SERVICE_FAILED:
	default:
		return -EIO;
	}
}

/*
 * Issues @fn with x1..x7 from @args; x1..x7 of the answer go to @out if
 * given. Returns the core's x0 as an errno. A call the core reports as
 * interrupted (an interrupt for this CPU arrived during a service call) is
 * issued again until it completes, unless the task is being killed; one the
 * core answers with Retry (the memory ledger is being rebuilt, nothing was
 * done) is issued again up to MOAT_RETRY_LIMIT times, then is -EAGAIN.
 *
 * With @stop_on_signal (a vCPU run) any pending signal ends the call with
 * -EINTR before the core is entered. The check and the entry are made with
 * interrupts masked, so that the kick of a signal sent in between stays
 * pending and ends the run at once.
 */
static long moat_hvc(u32 fn, const u64 args[7], u64 out[7],
		     bool stop_on_signal)
{
	struct arm_smccc_1_2_regs in = {
		.a0 = fn, .a1 = args[0], .a2 = args[1], .a3 = args[2],
		.a4 = args[3], .a5 = args[4], .a6 = args[5], .a7 = args[6],
	};
	struct arm_smccc_1_2_regs res;
	unsigned int retries = 0;
	unsigned long flags;

	for (;;) {
		if (stop_on_signal) {
			local_irq_save(flags);
			if (signal_pending(current)) {
				local_irq_restore(flags);
				return -EINTR;
			}
			arm_smccc_1_2_hvc(&in, &res);
			local_irq_restore(flags);
		} else {
			arm_smccc_1_2_hvc(&in, &res);
		}
		if ((long)res.a0 == MOAT_RETRY && retries < MOAT_RETRY_LIMIT)
			retries++;
		else if ((long)res.a0 != MOAT_INTERRUPTED)
			break;
		if (fatal_signal_pending(current))
			return -EINTR;
		cond_resched();
	}
	if (out) {
		out[0] = res.a1;
		out[1] = res.a2;
		out[2] = res.a3;
		out[3] = res.a4;
		out[4] = res.a5;
		out[5] = res.a6;
		out[6] = res.a7;
	}
	return moat_errno((long)res.a0);
}

static long moat_call(u32 fn, const u64 args[7], u64 out[7])
{
	return moat_hvc(fn, args, out, false);
}

static long moat_call2(u32 fn, u64 a1, u64 a2, u64 a3, u64 a4)
{
	const u64 args[7] = { a1, a2, a3, a4, 0, 0, 0 };

	return moat_call(fn, args, NULL);
}

/* A block of kernel pages donated to a VM. */
struct moat_block {
	struct page *page;
	unsigned int order;
};

/* What one open file of /dev/moat holds. */
struct moat_file {
	/* Serialises this file's ioctls: one VM, one caller at a time. */
	struct mutex lock;
	bool has_vm;
	u64 handle;
	struct moat_block *blocks;
	size_t nr_blocks;
	size_t cap_blocks;
};

static int moat_open(struct inode *inode, struct file *file)
{
	struct moat_file *mf = kzalloc(sizeof(*mf), GFP_KERNEL);

	if (!mf)
		return -ENOMEM;
	mutex_init(&mf->lock);
	file->private_data = mf;
	return 0;
}

static long moat_create(struct moat_file *mf, void __user *uarg)
{
	struct moat_create req;
	u64 args[7] = { 0 };
	u64 out[7];
	long ret;

	if (copy_from_user(&req, uarg, sizeof(req)))
		return -EFAULT;
	if (mf->has_vm)
		return -EEXIST;
	args[0] = req.entry;
	args[1] = req.flags;
	args[2] = req.vcpus;
	ret = moat_call(MOAT_VM_CREATE, args, out);
	if (ret)
		return ret;
	mf->handle = out[0];
	mf->has_vm = true;
	return 0;
}

static int moat_track(struct moat_file *mf, struct page *page, unsigned int order)
{
	if (mf->nr_blocks == mf->cap_blocks) {
		size_t cap = mf->cap_blocks ? mf->cap_blocks * 2 : 16;
		struct moat_block *b;

		b = krealloc_array(mf->blocks, cap, sizeof(*b), GFP_KERNEL);
		if (!b)
			return -ENOMEM;
		mf->blocks = b;
		mf->cap_blocks = cap;
	}
	mf->blocks[mf->nr_blocks].page = page;
	mf->blocks[mf->nr_blocks].order = order;
	mf->nr_blocks++;
	return 0;
}

/*
 * Donates @size bytes of fresh kernel pages at @ipa, in blocks of up to
 * 2 MiB. A failure part way leaves the blocks already donated with the VM:
 * they come back when it is destroyed.
 */
static long moat_donate(struct moat_file *mf, void __user *uarg)
{
	struct moat_donate req;
	u64 ipa, end, left;

	if (copy_from_user(&req, uarg, sizeof(req)))
		return -EFAULT;
	if (!mf->has_vm)
		return -ENOENT;
	if (!req.size || !PAGE_ALIGNED(req.size) || !PAGE_ALIGNED(req.ipa) ||
	    check_add_overflow(req.ipa, req.size, &end))
		return -EINVAL;
	/*
	 * Not a limit on VMs, which is the core's to set: the page allocator
	 * would otherwise be driven into the OOM killer before refusing.
	 */
	if ((req.size >> PAGE_SHIFT) > (u64)max(si_mem_available(), 0L))
		return -ENOMEM;
	ipa = req.ipa;
	left = req.size >> PAGE_SHIFT;
	while (left) {
		unsigned int order = min_t(unsigned int, ilog2(left), MOAT_DONATE_MAX_ORDER);
		struct page *page = NULL;
		long ret;

		if (fatal_signal_pending(current))
			return -EINTR;
		cond_resched();

		/* The IPA must be aligned to the block for a block mapping. */
		while (order && !IS_ALIGNED(ipa, PAGE_SIZE << order))
			order--;
		for (;; order--) {
			page = alloc_pages(GFP_KERNEL_ACCOUNT | __GFP_NOWARN |
					   (order ? __GFP_NORETRY : 0), order);
			if (page || !order)
				break;
		}
		if (!page)
			return -ENOMEM;
		if (moat_track(mf, page, order)) {
			__free_pages(page, order);
			return -ENOMEM;
		}
		ret = moat_call2(MOAT_VM_DONATE, mf->handle, page_to_phys(page),
				 1UL << order, ipa);
		if (ret) {
			/* A refused donation changed nothing: the pages are ours. */
			mf->nr_blocks--;
			__free_pages(page, order);
			return ret;
		}
		ipa += PAGE_SIZE << order;
		left -= 1UL << order;
	}
	return 0;
}

/*
 * Copies @size bytes from the caller into the VM at @ipa, through kernel
 * pages shared with the hypervisor for the copy only.
 */
static long moat_load(struct moat_file *mf, void __user *uarg)
{
	const size_t chunk = PAGE_SIZE << MOAT_LOAD_ORDER;
	struct moat_load req;
	struct page *buf;
	u64 done = 0, end;
	long ret = 0;

	if (copy_from_user(&req, uarg, sizeof(req)))
		return -EFAULT;
	if (!mf->has_vm)
		return -ENOENT;
	if (!req.size || check_add_overflow(req.ipa, req.size, &end) ||
	    check_add_overflow(req.addr, req.size, &end))
		return -EINVAL;
	buf = alloc_pages(GFP_KERNEL_ACCOUNT, MOAT_LOAD_ORDER);
	if (!buf)
		return -ENOMEM;
	while (done < req.size) {
		u64 n = min_t(u64, req.size - done, chunk);
		u64 pages = DIV_ROUND_UP(n, PAGE_SIZE);
		phys_addr_t pa = page_to_phys(buf);
		long unshared;

		if (fatal_signal_pending(current)) {
			ret = -EINTR;
			break;
		}
		cond_resched();

		if (copy_from_user(page_address(buf),
				   u64_to_user_ptr(req.addr + done), n)) {
			ret = -EFAULT;
			break;
		}
		ret = moat_call2(MOAT_HOST_SHARE_HYP, pa, pages, 0, 0);
		if (ret)
			break;
		ret = moat_call2(MOAT_VM_LOAD, mf->handle, req.ipa + done, pa, n);
		unshared = moat_call2(MOAT_HOST_UNSHARE_HYP, pa, pages, 0, 0);
		if (unshared) {
			/* Still shared with the hypervisor: never reuse it. */
			pr_err("HOST_UNSHARE_HYP of the load buffer failed (%ld); leaking it\n",
			       unshared);
			return ret ? ret : unshared;
		}
		if (ret)
			break;
		done += n;
	}
	__free_pages(buf, MOAT_LOAD_ORDER);
	return ret;
}

/*
 * VCPU_RUN until the vCPU's next exit. A signal for the calling thread (the
 * VMM kicking it to take an interrupt it queued) ends the call with -EINTR
 * before the vCPU is entered: the thread returns to user space and runs again
 * with its injections. A signal that arrives during the run ends it through
 * the interrupt that delivers it (an Interrupt exit). The check and the entry
 * are made with interrupts masked, so that the kick of a signal sent in
 * between stays pending and ends the run at once.
 */
static long moat_run_call(const u64 args[7], u64 out[7])
{
	return moat_hvc(MOAT_VCPU_RUN, args, out, true);
}

/* Without the file's mutex: every vCPU thread runs at once. */
static long moat_run(struct moat_file *mf, void __user *uarg)
{
	struct moat_run req;
	u64 args[7];
	u64 handle;
	bool has_vm;
	long ret;

	if (copy_from_user(&req, uarg, sizeof(req)))
		return -EFAULT;
	if (req.vcpu > 0xffff)
		return -EINVAL;
	/* The handle, once set, stays until the file is released. */
	if (mutex_lock_interruptible(&mf->lock))
		return -EINTR;
	has_vm = mf->has_vm;
	handle = mf->handle;
	mutex_unlock(&mf->lock);
	if (!has_vm)
		return -ENOENT;
	args[0] = handle | (req.vcpu << 16);
	memcpy(&args[1], req.answer, sizeof(req.answer));
	memcpy(&args[5], req.inject, sizeof(req.inject));
	ret = moat_run_call(args, req.exit);
	if (ret)
		return ret;
	if (copy_to_user(uarg, &req, sizeof(req)))
		return -EFAULT;
	return 0;
}

static long moat_ioctl(struct file *file, unsigned int cmd, unsigned long arg)
{
	struct moat_file *mf = file->private_data;
	void __user *uarg = (void __user *)arg;
	long ret;

	if (cmd == MOAT_CHECK)
		return moat_call2(MOAT_CHECK_CONSISTENCY, 0, 0, 0, 0);
	if (cmd == MOAT_RESTART_LEDGER)
		return moat_call2(MOAT_LEDGER_RESTART, 0, 0, 0, 0);
	if (cmd == MOAT_RUN)
		return moat_run(mf, uarg);
	if (mutex_lock_interruptible(&mf->lock))
		return -EINTR;
	switch (cmd) {
	case MOAT_CREATE:
		ret = moat_create(mf, uarg);
		break;
	case MOAT_DONATE:
		ret = moat_donate(mf, uarg);
		break;
	case MOAT_LOAD:
		ret = moat_load(mf, uarg);
		break;
	default:
		ret = -ENOTTY;
	}
	mutex_unlock(&mf->lock);
	return ret;
}

/*
 * The last reference to the file is gone: destroy its VM and take every
 * block back. A block the core does not give back stays allocated forever:
 * freeing it would hand a page Linux cannot touch to the allocator.
 */
static int moat_release(struct inode *inode, struct file *file)
{
	struct moat_file *mf = file->private_data;
	size_t i, leaked = 0;
	long ret;

	if (mf->has_vm) {
		ret = moat_call2(MOAT_VM_DESTROY, mf->handle, 0, 0, 0);
		if (ret) {
			pr_err("VM_DESTROY of VM %llu failed (%ld); its memory is lost\n",
			       mf->handle, ret);
			leaked = mf->nr_blocks;
			mf->nr_blocks = 0;
		}
	}
	for (i = 0; i < mf->nr_blocks; i++) {
		struct moat_block *b = &mf->blocks[i];

		ret = moat_call2(MOAT_VM_RECLAIM, mf->handle, page_to_phys(b->page),
				 1UL << b->order, 0);
		if (ret) {
			pr_err("VM_RECLAIM from VM %llu failed (%ld); block lost\n",
			       mf->handle, ret);
			leaked++;
			continue;
		}
		__free_pages(b->page, b->order);
	}
	if (leaked)
		pr_err("%zu blocks stay with VM %llu\n", leaked, mf->handle);
	kfree(mf->blocks);
	kfree(mf);
	return 0;
}

#ifdef MOAT_TEST_HOOKS
/*
 * Tests only (built with MOAT_TEST_HOOKS=y, never into the module the
 * xtask ships): maps the file's first donated block into the caller, as a
 * rogue module could. The core has unmapped it from the host's stage-2, so
 * the first access takes a synchronous external abort: SIGBUS.
 */
static int moat_mmap_donated(struct file *file, struct vm_area_struct *vma)
{
	struct moat_file *mf = file->private_data;
	unsigned long size = vma->vm_end - vma->vm_start;
	int ret = -ENOENT;

	mutex_lock(&mf->lock);
	if (mf->nr_blocks && vma->vm_pgoff == 0 &&
	    size <= (PAGE_SIZE << mf->blocks[0].order))
		ret = remap_pfn_range(vma, vma->vm_start,
				      page_to_pfn(mf->blocks[0].page), size,
				      vma->vm_page_prot);
	mutex_unlock(&mf->lock);
	return ret;
}
#endif

static const struct file_operations moat_fops = {
	.owner = THIS_MODULE,
	.open = moat_open,
	.release = moat_release,
	.unlocked_ioctl = moat_ioctl,
	.compat_ioctl = compat_ptr_ioctl,
	.llseek = noop_llseek,
#ifdef MOAT_TEST_HOOKS
	.mmap = moat_mmap_donated,
#endif
};

static struct miscdevice moat_dev = {
	.minor = MISC_DYNAMIC_MINOR,
	.name = "moat",
	.fops = &moat_fops,
	.mode = 0600,
};

module_misc_device(moat_dev);

MODULE_DESCRIPTION("Protected VMs under the Moat hypervisor");
MODULE_LICENSE("Dual MIT/GPL");
