// SPDX-License-Identifier: GPL-2.0
/*
 * The kernel ring of the mgpu DRM driver, its jobs' fences, interrupts and recovery.
 *
 * One ring (context 0) in coherent DMA memory.  A job is a run of ring slots ending in
 * a FENCE whose value is the job's seqno, written to the fence word after the ring;
 * the FENCE interrupt signals every job up to that seqno.  An ERROR interrupt for a
 * ring command fails the job holding it (-EIO) and cancels the ones behind it
 * (-ECANCELED), then restarts the ring.  A job not done within timeout_ms makes the
 * driver reset the device (DEVICE_RESET): the pending jobs fail (-ETIMEDOUT, then
 * -ECANCELED), every BO's mappings are zapped and it gets a new, zeroed resource
 * (placed again at its next CPU touch).  A reset that does not complete within
 * MGPU_RESET_WAIT_MS, or a device that reads all ones (gone), leaves the driver
 * "broken": new work gets -ENODEV.
 */
#include <linux/iopoll.h>
#include <linux/slab.h>

#include <drm/drm_print.h>

#include "mgpu_drm_drv.h"

static const char *mgpu_fence_driver_name(struct dma_fence *fence)
{
	return "mgpu_drm";
}

static const char *mgpu_fence_timeline_name(struct dma_fence *fence)
{
	return "mgpu-ring0";
}

const struct dma_fence_ops mgpu_fence_ops = {
	.get_driver_name = mgpu_fence_driver_name,
	.get_timeline_name = mgpu_fence_timeline_name,
};

void mgpu_job_put_bos(struct mgpu_job *job)
{
	unsigned int i;

	for (i = 0; i < job->nbos; i++)
		drm_gem_object_put(job->bos[i]);
	kvfree(job->bos);
	job->bos = NULL;
	job->nbos = 0;
}

/* End a job (ring_lock held): signal its fence with @error (0: success), retire it. */
static void mgpu_job_end(struct mgpu_device *mgpu, struct mgpu_job *job, int error)
{
	lockdep_assert_held(&mgpu->ring_lock);
	if (error) {
		dma_fence_set_error(&job->fence, error);
		mgpu->failed++;
	} else {
		mgpu->completed++;
	}
	dma_fence_signal(&job->fence);
	/* Dropping a BO may free it, which takes res_lock: see mgpu_reap(). */
	list_move_tail(&job->node, &mgpu->retired);
	mgpu->used -= job->slots;
	mgpu->retired_seqno = job->fence.seqno;
	wake_up_all(&mgpu->ring_space);
}

/* Release what ended jobs held (no lock held). */
void mgpu_reap(struct mgpu_device *mgpu)
{
	struct mgpu_job *job, *next;
	LIST_HEAD(done);

	mutex_lock(&mgpu->ring_lock);
	list_splice_init(&mgpu->retired, &done);
	mutex_unlock(&mgpu->ring_lock);
	list_for_each_entry_safe(job, next, &done, node) {
		list_del(&job->node);
		mgpu_job_put_bos(job);
		dma_fence_put(&job->fence);	/* the list's reference */
	}
}

/* (Re)arm the hang check for the oldest job in flight (ring_lock held). */
void mgpu_arm_timeout(struct mgpu_device *mgpu)
{
	struct mgpu_job *job = list_first_entry_or_null(&mgpu->jobs, struct mgpu_job, node);

	if (!job) {
		cancel_delayed_work(&mgpu->timeout);
		return;
	}
	mod_delayed_work(system_long_wq, &mgpu->timeout,
			 time_after(job->deadline, jiffies) ? job->deadline - jiffies : 0);
}

/* Signal every job whose FENCE the device wrote (ring_lock held). */
static void mgpu_retire(struct mgpu_device *mgpu)
{
	u64 done = READ_ONCE(*mgpu->fence_word);
	struct mgpu_job *job, *next;

	list_for_each_entry_safe(job, next, &mgpu->jobs, node) {
		if (job->fence.seqno > done)
			break;
		mgpu_job_end(mgpu, job, 0);
	}
	mgpu_arm_timeout(mgpu);
}

/* (Re)start the ring empty (ring_lock held, inside mgpu_enter or in probe). */
void mgpu_ring_start(struct mgpu_device *mgpu)
{
	wr(mgpu, MGPU_REG_CTX0_RING_CONTROL, 0);
	wr(mgpu, MGPU_REG_CTX0_RING_BASE_LO, lower_32_bits(mgpu->ring_bus));
	wr(mgpu, MGPU_REG_CTX0_RING_BASE_HI, upper_32_bits(mgpu->ring_bus));
	wr(mgpu, MGPU_REG_CTX0_RING_SIZE, MGPU_RING_SIZE);
	wr(mgpu, MGPU_REG_CTX0_RING_CONTROL, MGPU_RING_CONTROL_ENABLE);
	mgpu->tail = 0;
	if (rd(mgpu, MGPU_REG_CTX0_RING_STATUS) != MGPU_RING_IDLE)
		drm_err(&mgpu->drm, "ring 0 did not start: status %u, error %s\n",
			rd(mgpu, MGPU_REG_CTX0_RING_STATUS),
			mgpu_error_name(rd(mgpu, MGPU_REG_ERROR_CODE)));
}

/* Fail every job in flight (ring_lock held): the first with @first, the rest cancelled. */
void mgpu_fail_jobs(struct mgpu_device *mgpu, int first)
{
	struct mgpu_job *job, *next;
	int error = first;

	list_for_each_entry_safe(job, next, &mgpu->jobs, node) {
		mgpu_job_end(mgpu, job, error);
		error = -ECANCELED;
	}
}

/*
 * Reset the device and wait for it (inside mgpu_enter or in probe): 0, -ETIMEDOUT, or
 * -ENODEV if it reads all ones (gone).  Waits at most MGPU_RESET_WAIT_MS.
 */
int mgpu_reset_device(struct mgpu_device *mgpu)
{
	u32 scratch;
	int ret;

	wr(mgpu, MGPU_REG_SCRATCH, MGPU_RESET_MAGIC);	/* the reset clears it */
	wr(mgpu, MGPU_REG_DEVICE_RESET, 1);
	ret = readl_poll_timeout(mgpu->regs + MGPU_REG_SCRATCH, scratch,
				 scratch != MGPU_RESET_MAGIC, 1000, MGPU_RESET_WAIT_MS * 1000);
	if (ret) {
		drm_err(&mgpu->drm, "device reset did not complete in %u ms\n",
			MGPU_RESET_WAIT_MS);
		return ret;
	}
	if (scratch == U32_MAX) {
		drm_err(&mgpu->drm, "device not responding (registers read all ones): gone?\n");
		return -ENODEV;
	}
	return 0;
}

static void mgpu_handle_error(struct mgpu_device *mgpu)
{
	u32 code = rd(mgpu, MGPU_REG_ERROR_CODE);
	u32 context = rd(mgpu, MGPU_REG_ERROR_CONTEXT);
	u32 offset = rd(mgpu, MGPU_REG_ERROR_RING_OFFSET);
	u32 count = rd(mgpu, MGPU_REG_ERROR_COUNT);
	struct mgpu_job *job, *bad = NULL;
	u32 op;

	lockdep_assert_held(&mgpu->ring_lock);
	if (code == MGPU_ERROR_NONE)
		return;	/* a reset cleared it while we waited for the lock */
	mgpu->error_counts[code < MGPU_ERROR_CODES ? code : 0]++;
	mgpu->last_error = code;
	mgpu->last_error_offset = offset;
	if (context == MGPU_NO_CONTEXT) {
		/* A resource command or bring-up DMA: the caller saw RES_STATUS. */
		drm_dbg(&mgpu->drm, "device error %s (%u) outside the rings, %u errors\n",
			mgpu_error_name(code), code, count);
		return;
	}
	if (context != 0 || offset >= MGPU_RING_SIZE) {
		drm_err(&mgpu->drm, "error %s on context %u we do not use\n",
			mgpu_error_name(code), context);
		return;
	}
	if (rd(mgpu, MGPU_REG_CTX0_RING_STATUS) != MGPU_RING_ERROR)
		return;	/* already handled: the ring was restarted since */
	/* The jobs before the failed command completed: their fences were written. */
	mgpu_retire(mgpu);
	op = mgpu->ring[offset / MGPU_COMMAND_SIZE].opcode;
	list_for_each_entry(job, &mgpu->jobs, node) {
		bool inside = job->start <= job->end ?
			      offset >= job->start && offset < job->end :
			      offset >= job->start || offset < job->end;
		if (inside) {
			bad = job;
			break;
		}
	}
	drm_err_ratelimited(&mgpu->drm,
			    "ring 0: %s command at ring offset 0x%x failed: %s (%u); job %llu fails with -EIO, %u device errors so far\n",
			    mgpu_op_name(op), offset, mgpu_error_name(code), code,
			    bad ? bad->fence.seqno : 0, count);
	/* The ring halted at the failed command: restart it without the rest. */
	mgpu_fail_jobs(mgpu, -EIO);
	mgpu_ring_start(mgpu);
	mgpu_arm_timeout(mgpu);
}

static void mgpu_handle_fault(struct mgpu_device *mgpu)
{
	struct mgpu_fault fault = {
		.when = ktime_get(),
		.offset = rd64(mgpu, MGPU_REG_FAULT_OFFSET_LO),
		.count = rd(mgpu, MGPU_REG_FAULT_COUNT),
		.write = rd(mgpu, MGPU_REG_FAULT_FLAGS) & MGPU_FAULT_FLAG_WRITE,
	};

	spin_lock(&mgpu->fault_lock);
	mgpu->fault_log[mgpu->fault_next++ % MGPU_FAULT_LOG] = fault;
	mgpu->faults++;
	spin_unlock(&mgpu->fault_lock);
	dev_warn_ratelimited(mgpu->drm.dev,
			     "aperture fault: %s at BAR2 offset 0x%llx, which backs no placed resource (%u faults reported by the device)\n",
			     fault.write ? "write" : "read", fault.offset, fault.count);
}

irqreturn_t mgpu_irq_thread(int irq, void *data)
{
	struct mgpu_device *mgpu = data;
	u32 status;
	int idx;

	if (!mgpu_enter(mgpu, &idx))
		return IRQ_NONE;
	/* Each cause goes to one thread: read and acknowledged together. */
	spin_lock(&mgpu->irq_lock);
	status = rd(mgpu, MGPU_REG_INT_STATUS);
	if (status == U32_MAX)
		status = 0;	/* the device is gone */
	if (status)
		wr(mgpu, MGPU_REG_INT_ACK, status);
	spin_unlock(&mgpu->irq_lock);
	/* Acked first: a cause that comes again from here raises its vector again. */
	if (status & (MGPU_INT_FENCE | MGPU_INT_ERROR)) {
		mutex_lock(&mgpu->ring_lock);
		if (status & MGPU_INT_FENCE)
			mgpu_retire(mgpu);
		if (status & MGPU_INT_ERROR)
			mgpu_handle_error(mgpu);
		mutex_unlock(&mgpu->ring_lock);
	}
	if (status & MGPU_INT_FAULT)
		mgpu_handle_fault(mgpu);
	mgpu_exit(idx);
	mgpu_reap(mgpu);
	return status ? IRQ_HANDLED : IRQ_NONE;
}

/*
 * Reset the device and bring it back to where the driver needs it (ring_lock held,
 * inside mgpu_enter).  BO ioctls and CPU faults wait on res_lock meanwhile, for at most
 * the reset wait and one CREATE per BO.
 */
static int mgpu_recover(struct mgpu_device *mgpu, int error)
{
	struct mgpu_bo *bo;
	int ret;

	lockdep_assert_held(&mgpu->ring_lock);
	mutex_lock(&mgpu->res_lock);
	/* Nobody may touch pages that are about to belong to nobody, or someone else. */
	list_for_each_entry(bo, &mgpu->bos, node) {
		mgpu_bo_zap(bo);
		mgpu_bo_forget_placement(mgpu, bo);
		bo->handle = 0;
	}
	ret = mgpu_reset_device(mgpu);
	mgpu->resets++;
	if (ret) {
		WRITE_ONCE(mgpu->broken, true);
	} else {
		wr(mgpu, MGPU_REG_INT_MASK, 0);
		/* The reset destroyed every resource: give each BO a new one, zeroed. */
		list_for_each_entry(bo, &mgpu->bos, node) {
			if (mgpu_bo_alloc_resource(mgpu, bo)) {
				drm_err(&mgpu->drm, "BO of %zu bytes lost in the reset\n",
					bo->base.size);
				ret = -ENOSPC;
			}
		}
	}
	mutex_unlock(&mgpu->res_lock);
	/* The jobs end once the device is back: their waiters see its new state. */
	mgpu_fail_jobs(mgpu, error);
	WRITE_ONCE(*mgpu->fence_word, mgpu->retired_seqno);
	if (!READ_ONCE(mgpu->broken))
		mgpu_ring_start(mgpu);
	wake_up_all(&mgpu->ring_space);
	return ret;
}

void mgpu_timeout_work(struct work_struct *work)
{
	struct mgpu_device *mgpu = container_of(to_delayed_work(work), struct mgpu_device,
						timeout);
	struct mgpu_job *job;
	int ret, idx;

	if (!mgpu_enter(mgpu, &idx))
		return;
	mutex_lock(&mgpu->ring_lock);
	mgpu_retire(mgpu);	/* a fence interrupt may be on its way */
	job = list_first_entry_or_null(&mgpu->jobs, struct mgpu_job, node);
	if (!job || time_before(jiffies, job->deadline))
		goto out;
	mgpu->timeouts++;
	drm_err(&mgpu->drm,
		"job %llu timed out after %u ms (ring 0: head 0x%x tail 0x%x status %u, fence %llu); resetting the device\n",
		job->fence.seqno, mgpu_timeout_ms, rd(mgpu, MGPU_REG_CTX0_RING_HEAD),
		rd(mgpu, MGPU_REG_CTX0_RING_TAIL), rd(mgpu, MGPU_REG_CTX0_RING_STATUS),
		READ_ONCE(*mgpu->fence_word));
	ret = mgpu_recover(mgpu, -ETIMEDOUT);
	if (ret)
		drm_err(&mgpu->drm, "recovery failed (%d): new work gets -ENODEV\n", ret);
	else
		drm_info(&mgpu->drm, "device reset done, %llu resets; BO contents were lost\n",
			 mgpu->resets);
out:
	mutex_unlock(&mgpu->ring_lock);
	mgpu_exit(idx);
	mgpu_reap(mgpu);
}
