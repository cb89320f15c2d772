// SPDX-License-Identifier: GPL-2.0
/*
 * DRM_IOCTL_MGPU_SUBMIT, in the steps of virtio-gpu's submit path:
 *
 *   validate  copy the user's commands, check flags, count and each command
 *   pin       look up every BO a command names (referenced until the job ends), wait
 *             for the in-syncobj, find the out-syncobj, reserve the sync_file's fd,
 *             lock the BOs' reservations and reserve a fence slot in each
 *   build     the ring commands, BO arguments still pointing at the job's BO list
 *   commit    under ring_lock: wait for ring space, give the job its seqno and fence,
 *             create the sync_file, then (nothing can fail from here) write the
 *             commands and a FENCE to the ring and ring the doorbell
 *   fence     publish the fence: every BO's reservation, the out-syncobj, the fd
 *
 * Every step before the ring is written may fail and undoes only what it did, so a
 * failed submit leaves nothing behind: no job runs without the fences user space asked
 * for.
 */
#include <linux/file.h>
#include <linux/slab.h>
#include <linux/sync_file.h>
#include <linux/uaccess.h>

#include <drm/drm_file.h>
#include <drm/drm_gem.h>
#include <drm/drm_print.h>
#include <drm/drm_syncobj.h>

#include "mgpu_drm_drv.h"

/* The uAPI spells the opcodes out (user space copies the header): they are the device's. */
static_assert(MGPU_CMD_NOP == MGPU_OP_NOP);
static_assert(MGPU_CMD_COPY == MGPU_OP_COPY_RESOURCE);
static_assert(MGPU_CMD_FILL == MGPU_OP_FILL);
static_assert(MGPU_CMD_BLIT == MGPU_OP_BLIT);
static_assert(MGPU_CMD_SAXPY == MGPU_OP_SAXPY);
static_assert(MGPU_CMD_MATMUL == MGPU_OP_MATMUL);

/* Per opcode: which args are resource handles, which guest addresses (generated). */
#define MGPU_OP_ENTRY(name, op, nargs, handles, guest_addrs) \
	[op] = { .valid = true, .handle_mask = (handles), .guest_addr_mask = (guest_addrs) },
static const struct {
	bool valid;
	u8 handle_mask;
	u8 guest_addr_mask;
} mgpu_ops[MGPU_OPCODES] = { MGPU_FOR_EACH_OP(MGPU_OP_ENTRY) };
#undef MGPU_OP_ENTRY

struct mgpu_submit {
	struct mgpu_device *mgpu;
	struct drm_file *file;
	struct drm_mgpu_submit *args;
	struct drm_mgpu_command *cmds;	/* user's; BO arguments become job->bos indices */
	struct mgpu_cmd *ring_cmds;	/* built: what goes into the ring */
	struct mgpu_job *job;
	unsigned int max_bos;
	struct ww_acquire_ctx ctx;
	bool reservations_locked;
	bool fence_initialized;
	struct drm_syncobj *out_sync;
	int out_fd;
	struct sync_file *sync_file;
};

/*
 * User space may submit a command that takes no guest physical address (only the
 * driver may give the device those: use mmap for CPU access).
 */
static bool mgpu_user_op(u32 op)
{
	return op < MGPU_OPCODES && mgpu_ops[op].valid && !mgpu_ops[op].guest_addr_mask;
}

static int mgpu_submit_validate(struct mgpu_submit *s)
{
	struct drm_mgpu_submit *args = s->args;
	unsigned int i;

	if (args->flags & ~MGPU_SUBMIT_FLAGS || args->pad)
		return -EINVAL;
	if (!args->count || args->count > MGPU_MAX_COMMANDS)
		return -EINVAL;
	s->cmds = memdup_array_user(u64_to_user_ptr(args->commands), args->count,
				    sizeof(*s->cmds));
	if (IS_ERR(s->cmds)) {
		int ret = PTR_ERR(s->cmds);

		s->cmds = NULL;
		return ret;
	}
	for (i = 0; i < args->count; i++) {
		if (s->cmds[i].flags || !mgpu_user_op(s->cmds[i].opcode)) {
			drm_dbg(&s->mgpu->drm, "command %u: opcode 0x%x flags 0x%x refused\n", i,
				s->cmds[i].opcode, s->cmds[i].flags);
			return -EINVAL;
		}
	}
	return 0;
}

/* Look up a GEM handle once per job; its index in job->bos. */
static int mgpu_submit_bo(struct mgpu_submit *s, u64 handle, unsigned int *index)
{
	struct mgpu_job *job = s->job;
	struct drm_gem_object *obj;
	unsigned int i;

	if (handle > U32_MAX)
		return -ENOENT;
	obj = drm_gem_object_lookup(s->file, handle);
	if (!obj)
		return -ENOENT;
	for (i = 0; i < job->nbos; i++) {
		if (job->bos[i] == obj) {
			drm_gem_object_put(obj);
			*index = i;
			return 0;
		}
	}
	if (WARN_ON(job->nbos >= s->max_bos)) {
		drm_gem_object_put(obj);
		return -EINVAL;
	}
	*index = job->nbos;
	job->bos[job->nbos++] = obj;
	return 0;
}

static int mgpu_submit_lookup_bos(struct mgpu_submit *s)
{
	unsigned int i, a, index;
	int ret;

	for (i = 0; i < s->args->count; i++) {
		struct drm_mgpu_command *c = &s->cmds[i];

		for (a = 0; a < MGPU_COMMAND_ARGS; a++) {
			if (!(mgpu_ops[c->opcode].handle_mask & BIT(a)))
				continue;
			ret = mgpu_submit_bo(s, c->args[a], &index);
			if (ret) {
				drm_dbg(&s->mgpu->drm, "command %u arg %u: no BO with handle %llu\n",
					i, a, c->args[a]);
				return ret;
			}
			c->args[a] = index;
		}
	}
	return 0;
}

static int mgpu_submit_pin(struct mgpu_submit *s)
{
	struct drm_mgpu_submit *args = s->args;
	struct mgpu_job *job = s->job;
	unsigned int i;
	int ret;

	ret = mgpu_submit_lookup_bos(s);
	if (ret)
		return ret;
	if (args->in_syncobj) {
		struct dma_fence *in;

		ret = drm_syncobj_find_fence(s->file, args->in_syncobj, 0, 0, &in);
		if (ret)
			return ret;
		/* Our ring runs in order; a foreign fence is waited for here. */
		ret = dma_fence_wait(in, true);
		dma_fence_put(in);
		if (ret)
			return ret;
	}
	if (args->out_syncobj) {
		s->out_sync = drm_syncobj_find(s->file, args->out_syncobj);
		if (!s->out_sync)
			return -ENOENT;
	}
	if (args->flags & MGPU_SUBMIT_OUT_SYNC_FILE) {
		s->out_fd = get_unused_fd_flags(O_CLOEXEC);
		if (s->out_fd < 0)
			return s->out_fd;
	}
	ret = drm_gem_lock_reservations(job->bos, job->nbos, &s->ctx);
	if (ret)
		return ret;
	s->reservations_locked = true;
	for (i = 0; i < job->nbos; i++) {
		ret = dma_resv_reserve_fences(job->bos[i]->resv, 1);
		if (ret)
			return ret;
	}
	return 0;
}

/* The ring commands, each followed by nothing: the FENCE is added at commit. */
static int mgpu_submit_build(struct mgpu_submit *s)
{
	unsigned int i, a;

	s->ring_cmds = kvcalloc(s->args->count, sizeof(*s->ring_cmds), GFP_KERNEL);
	if (!s->ring_cmds)
		return -ENOMEM;
	for (i = 0; i < s->args->count; i++) {
		s->ring_cmds[i].opcode = s->cmds[i].opcode;
		for (a = 0; a < MGPU_COMMAND_ARGS; a++)
			s->ring_cmds[i].args[a] = s->cmds[i].args[a];
	}
	return 0;
}

/* Wait until the ring has room for the job (ring_lock held; dropped while waiting). */
static int mgpu_submit_wait_for_space(struct mgpu_device *mgpu, u32 slots)
{
	int ret;

	while (!mgpu->broken && mgpu->used + slots > MGPU_RING_SLOTS - 1) {
		mutex_unlock(&mgpu->ring_lock);
		ret = wait_event_interruptible(mgpu->ring_space,
					       READ_ONCE(mgpu->used) + slots < MGPU_RING_SLOTS ||
					       READ_ONCE(mgpu->broken));
		mutex_lock(&mgpu->ring_lock);
		if (ret)
			return ret;
	}
	return mgpu->broken ? -ENODEV : 0;
}

/* Write the job's commands and its FENCE at the tail (ring_lock held). */
static void mgpu_submit_write_ring(struct mgpu_submit *s)
{
	struct mgpu_device *mgpu = s->mgpu;
	struct mgpu_job *job = s->job;
	u32 slot = mgpu->tail / MGPU_COMMAND_SIZE;
	unsigned int i, a;

	job->start = mgpu->tail;
	for (i = 0; i < s->args->count; i++) {
		struct mgpu_cmd *dst = &mgpu->ring[slot];
		u32 op = s->ring_cmds[i].opcode;

		*dst = s->ring_cmds[i];
		/* Device handles now: recovery (which holds ring_lock) may have changed them. */
		for (a = 0; a < MGPU_COMMAND_ARGS; a++)
			if (mgpu_ops[op].handle_mask & BIT(a))
				dst->args[a] = to_bo(job->bos[dst->args[a]])->handle;
		slot = (slot + 1) % MGPU_RING_SLOTS;
	}
	memset(&mgpu->ring[slot], 0, sizeof(mgpu->ring[slot]));
	mgpu->ring[slot].opcode = MGPU_OP_FENCE;
	mgpu->ring[slot].args[0] = mgpu->ring_bus + MGPU_RING_SIZE;
	mgpu->ring[slot].args[1] = job->fence.seqno;
	slot = (slot + 1) % MGPU_RING_SLOTS;
	job->slots = s->args->count + 1;
	job->end = slot * MGPU_COMMAND_SIZE;
}

static int mgpu_submit_commit(struct mgpu_submit *s)
{
	struct mgpu_device *mgpu = s->mgpu;
	struct mgpu_job *job = s->job;
	unsigned int i;
	int ret, idx;

	if (!mgpu_enter(mgpu, &idx))
		return -ENODEV;
	mutex_lock(&mgpu->ring_lock);
	ret = mgpu_submit_wait_for_space(mgpu, s->args->count + 1);
	for (i = 0; !ret && i < job->nbos; i++)
		if (!to_bo(job->bos[i])->handle)
			ret = -ENODEV;	/* lost in a failed recovery */
	if (ret)
		goto out;
	dma_fence_init(&job->fence, &mgpu_fence_ops, &mgpu->fence_lock,
		       mgpu->fence_context, mgpu->next_seqno + 1);
	s->fence_initialized = true;
	if (s->out_fd >= 0) {
		s->sync_file = sync_file_create(&job->fence);
		if (!s->sync_file) {
			ret = -ENOMEM;	/* the seqno was not taken: nothing was committed */
			goto out;
		}
	}
	/* Committed from here: nothing below fails. */
	mgpu->next_seqno++;
	mgpu_submit_write_ring(s);
	job->deadline = jiffies + msecs_to_jiffies(READ_ONCE(mgpu_timeout_ms));
	dma_fence_get(&job->fence);	/* the job list's reference */
	list_add_tail(&job->node, &mgpu->jobs);
	mgpu->used += job->slots;
	mgpu->tail = job->end;
	mgpu->submitted++;
	s->args->seqno = job->fence.seqno;
	for (i = 0; i < job->nbos; i++)
		dma_resv_add_fence(job->bos[i]->resv, &job->fence, DMA_RESV_USAGE_WRITE);
	/* The commands are in memory before the device is told about them. */
	dma_wmb();
	wr(mgpu, MGPU_REG_CTX0_RING_TAIL, mgpu->tail);
	wr(mgpu, MGPU_REG_CTX0_DOORBELL, 1);
	if (list_is_singular(&mgpu->jobs))
		mgpu_arm_timeout(mgpu);
	/*
	 * Unlock the reservations while job->bos is still ours: once ring_lock is dropped
	 * the job may end at once (an interrupt already waiting for the lock) and
	 * mgpu_reap() empty its BO list, which would leave the reservations locked.
	 */
	drm_gem_unlock_reservations(job->bos, job->nbos, &s->ctx);
	s->reservations_locked = false;
out:
	mutex_unlock(&mgpu->ring_lock);
	mgpu_exit(idx);
	return ret;
}

/* Hand the committed job's fence to user space (cannot fail). */
static void mgpu_submit_fence(struct mgpu_submit *s)
{
	if (s->out_sync)
		drm_syncobj_replace_fence(s->out_sync, &s->job->fence);
	if (s->sync_file) {
		fd_install(s->out_fd, s->sync_file->file);
		s->args->out_fence_fd = s->out_fd;
		s->sync_file = NULL;
		s->out_fd = -1;
	}
}

/* Undo what a failed submit set up, and drop what a committed one no longer needs. */
static void mgpu_submit_cleanup(struct mgpu_submit *s, bool committed)
{
	if (s->reservations_locked)
		drm_gem_unlock_reservations(s->job->bos, s->job->nbos, &s->ctx);
	if (s->sync_file)
		fput(s->sync_file->file);
	if (s->out_fd >= 0)
		put_unused_fd(s->out_fd);
	if (s->out_sync)
		drm_syncobj_put(s->out_sync);
	if (s->job && !committed)
		mgpu_job_put_bos(s->job);
	if (s->fence_initialized)
		dma_fence_put(&s->job->fence);	/* ours; frees an uncommitted job */
	else
		kfree(s->job);
	kvfree(s->ring_cmds);
	kfree(s->cmds);
}

int mgpu_ioctl_submit(struct drm_device *drm, void *data, struct drm_file *file)
{
	struct mgpu_submit s = {
		.mgpu = to_mgpu(drm),
		.file = file,
		.args = data,
		.out_fd = -1,
	};
	int ret;

	s.args->out_fence_fd = -1;
	ret = mgpu_submit_validate(&s);
	if (ret)
		goto out;
	s.max_bos = s.args->count * MGPU_COMMAND_ARGS;
	s.job = kzalloc(sizeof(*s.job), GFP_KERNEL);
	if (s.job)
		s.job->bos = kvcalloc(s.max_bos, sizeof(*s.job->bos), GFP_KERNEL);
	if (!s.job || !s.job->bos) {
		ret = -ENOMEM;
		goto out;
	}
	ret = mgpu_submit_pin(&s);
	if (!ret)
		ret = mgpu_submit_build(&s);
	if (!ret)
		ret = mgpu_submit_commit(&s);
	if (!ret)
		mgpu_submit_fence(&s);
out:
	mgpu_submit_cleanup(&s, !ret);
	return ret;
}
