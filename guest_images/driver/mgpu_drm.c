// SPDX-License-Identifier: GPL-2.0
/*
 * mgpu_drm: the reference DRM driver for the mgpu mediated GPU.
 *
 * The device (docs/registers.md) gives us:
 *   BAR0  trapped registers: resource commands, interrupts, errors, faults, rings
 *   BAR2  the aperture: device memory, a resource appears where PLACE puts it
 *   MSI-X vectors 0..3 for the FENCE, ERROR, DMA and FAULT interrupt causes
 *
 * What the driver builds on that:
 *   - a render node with GEM objects, each backed by one device resource; a BO is
 *     placed in the aperture when first made CPU-visible and mmap()ed through our own
 *     fault handler, which inserts the BAR2 pages (vmf_insert_pfn, write-combined);
 *   - one kernel ring (context 0) in coherent DMA memory; a job is the user's
 *     commands, their GEM handles translated to device handles, then a FENCE whose
 *     value is the job's seqno, written to a fence word in DMA memory; the FENCE
 *     interrupt signals every job up to that seqno.  Each job's dma_fence goes to a
 *     syncobj, a sync_file and every BO's reservation object;
 *   - errors: an ERROR interrupt for a ring command is decoded (opcode, error name,
 *     ring offset, job), the job's fence gets -EIO, jobs queued behind it -ECANCELED,
 *     and the ring is restarted; a FAULT interrupt (denied aperture access) is logged
 *     with its offset and direction and kept in a fault log;
 *   - hangs: a job not done within timeout_ms makes the driver reset the device
 *     (DEVICE_RESET), fail the pending jobs (-ETIMEDOUT/-ECANCELED), and recover: the
 *     ring is set up again and every BO gets a new (zeroed) resource, placed again,
 *     its CPU mappings zapped first so the next touch faults onto the new pages;
 *   - debugfs (dri/N/): ring, bos, faults, errors.
 *
 * Locking: mgpu->lock (a mutex) serialises every register sequence, the ring, the
 * job list, the BO list and recovery.  Interrupts are handled in threads, so they
 * take it too.  The fence spinlock only protects dma_fence state.
 */
#include <linux/delay.h>
#include <linux/dma-fence.h>
#include <linux/dma-mapping.h>
#include <linux/dma-resv.h>
#include <linux/file.h>
#include <linux/interrupt.h>
#include <linux/io.h>
#include <linux/module.h>
#include <linux/pci.h>
#include <linux/seq_file.h>
#include <linux/slab.h>
#include <linux/sync_file.h>
#include <linux/uaccess.h>
#include <linux/workqueue.h>

#include <drm/drm_debugfs.h>
#include <drm/drm_drv.h>
#include <drm/drm_file.h>
#include <drm/drm_gem.h>
#include <drm/drm_ioctl.h>
#include <drm/drm_print.h>
#include <drm/drm_syncobj.h>
#include <drm/drm_vma_manager.h>

#include "mgpu_drm.h"
#include "mgpu_regs.h"

#define MGPU_RING_SIZE		SZ_64K
#define MGPU_RING_SLOTS		(MGPU_RING_SIZE / MGPU_COMMAND_SIZE)
#define MGPU_MAX_COMMANDS	64	/* per job; one more slot for its FENCE */
#define MGPU_VECTORS		4	/* FENCE, ERROR, DMA, FAULT */
#define MGPU_FAULT_LOG		32
#define MGPU_NO_CONTEXT		0xffffffffu
#define MGPU_RESET_WAIT_MS	10000

static unsigned int timeout_ms = 2000;
module_param(timeout_ms, uint, 0644);
MODULE_PARM_DESC(timeout_ms, "Time a job may run before the device is reset (ms, default 2000)");

struct mgpu_fault {
	ktime_t when;
	u64 offset;
	u32 count;	/* FAULT_COUNT when it was read */
	bool write;
};

struct mgpu_device {
	struct drm_device drm;
	struct pci_dev *pdev;
	void __iomem *regs;
	resource_size_t aperture_base;
	u64 aperture_size;
	u32 contexts;
	int vectors;

	struct mutex lock;		/* everything below but the fence state */
	struct list_head bos;		/* every live BO, for recovery and debugfs */

	/* The ring: slots in coherent memory, the fence word after them. */
	struct mgpu_cmd *ring;
	u64 *fence_word;
	dma_addr_t ring_bus;
	u32 tail;			/* byte offset of the next slot we write */
	u32 used;			/* slots written and not yet retired */
	wait_queue_head_t ring_space;

	spinlock_t fence_lock;
	u64 fence_context;
	u64 next_seqno;
	u64 retired_seqno;
	struct list_head jobs;		/* in flight, oldest first */
	struct list_head retired;	/* signalled, their BOs to release unlocked */
	struct delayed_work timeout;
	bool broken;			/* recovery failed: refuse new work */

	/* Counters and logs (debugfs). */
	u64 submitted, completed, failed, timeouts, resets, faults;
	u64 error_counts[16];
	u32 last_error, last_error_offset;
	struct mgpu_fault fault_log[MGPU_FAULT_LOG];
	unsigned int fault_next;
};

struct mgpu_cmd {
	u32 opcode;
	u32 flags;
	u64 args[7];
};
static_assert(sizeof(struct mgpu_cmd) == MGPU_COMMAND_SIZE);
static_assert(sizeof(struct drm_mgpu_command) == MGPU_COMMAND_SIZE);

struct mgpu_bo {
	struct drm_gem_object base;
	struct list_head node;		/* in mgpu->bos */
	u32 handle;			/* device resource handle, 0 if none */
	bool placed;
	u64 aperture_offset;
};

struct mgpu_job {
	struct dma_fence fence;		/* first: dma_fence_free() frees the job */
	struct list_head node;		/* in mgpu->jobs */
	u32 start, end;			/* ring byte offsets [start, end) */
	u32 slots;
	unsigned long deadline;		/* jiffies */
	unsigned int nbos;
	struct drm_gem_object **bos;	/* referenced until the job ends */
};

static inline struct mgpu_device *to_mgpu(struct drm_device *drm)
{
	return container_of(drm, struct mgpu_device, drm);
}

static inline struct mgpu_bo *to_bo(struct drm_gem_object *obj)
{
	return container_of(obj, struct mgpu_bo, base);
}

static inline struct mgpu_job *to_job(struct dma_fence *fence)
{
	return container_of(fence, struct mgpu_job, fence);
}

static u32 rd(struct mgpu_device *mgpu, u32 reg)
{
	return readl(mgpu->regs + reg);
}

static void wr(struct mgpu_device *mgpu, u32 reg, u32 value)
{
	writel(value, mgpu->regs + reg);
}

static u64 rd64(struct mgpu_device *mgpu, u32 lo)
{
	return rd(mgpu, lo) | (u64)rd(mgpu, lo + 4) << 32;
}

static const char *const mgpu_error_names[] = {
	[0] = "NONE",
	[1] = "INVALID_COMMAND",
	[2] = "INVALID_HANDLE",
	[3] = "OUT_OF_BOUNDS",
	[4] = "DMA_FAULT",
	[5] = "NO_MEMORY",
	[6] = "QUOTA_EXCEEDED",
	[7] = "INVALID_ARGUMENT",
	[8] = "ENGINE_FAULT",
	[9] = "APERTURE_BUSY",
	[10] = "ALREADY_MAPPED",
	[11] = "NO_APERTURE_SPACE",
};

static const char *const mgpu_op_names[] = {
	[MGPU_OP_NOP] = "NOP",
	[MGPU_OP_WRITE_RESOURCE] = "WRITE_RESOURCE",
	[MGPU_OP_READ_RESOURCE] = "READ_RESOURCE",
	[MGPU_OP_COPY_RESOURCE] = "COPY",
	[MGPU_OP_FILL] = "FILL",
	[MGPU_OP_BLIT] = "BLIT",
	[MGPU_OP_SAXPY] = "SAXPY",
	[MGPU_OP_MATMUL] = "MATMUL",
	[MGPU_OP_FENCE] = "FENCE",
};

static const char *error_name(u32 code)
{
	return code < ARRAY_SIZE(mgpu_error_names) && mgpu_error_names[code] ?
	       mgpu_error_names[code] : "UNKNOWN";
}

static const char *op_name(u32 op)
{
	return op < ARRAY_SIZE(mgpu_op_names) && mgpu_op_names[op] ? mgpu_op_names[op] : "?";
}

/* ------------------------------------------------------------ resource commands */

/* Run one resource command (lock held); returns the device's status code. */
static u32 mgpu_res_command(struct mgpu_device *mgpu, u32 command, u32 handle, u64 size)
{
	lockdep_assert_held(&mgpu->lock);
	if (command == MGPU_RES_CREATE) {
		wr(mgpu, MGPU_REG_RES_SIZE_LO, lower_32_bits(size));
		wr(mgpu, MGPU_REG_RES_SIZE_HI, upper_32_bits(size));
	} else {
		wr(mgpu, MGPU_REG_RES_HANDLE, handle);
	}
	wr(mgpu, MGPU_REG_RES_COMMAND, command);
	return rd(mgpu, MGPU_REG_RES_STATUS);
}

static int mgpu_status_errno(u32 status)
{
	switch (status) {
	case 0:
		return 0;
	case 5: /* NO_MEMORY */
	case 6: /* QUOTA_EXCEEDED */
	case 11: /* NO_APERTURE_SPACE */
		return -ENOSPC;
	case 2: /* INVALID_HANDLE */
		return -ENOENT;
	case 7: /* INVALID_ARGUMENT */
		return -EINVAL;
	default:
		return -EIO;
	}
}

/* Give a BO a fresh device resource (lock held). */
static int mgpu_bo_alloc_resource(struct mgpu_device *mgpu, struct mgpu_bo *bo)
{
	u32 status = mgpu_res_command(mgpu, MGPU_RES_CREATE, 0, bo->base.size);

	if (status) {
		drm_dbg(&mgpu->drm, "CREATE of %zu bytes failed: %s\n", bo->base.size,
			error_name(status));
		return mgpu_status_errno(status);
	}
	bo->handle = rd(mgpu, MGPU_REG_RES_HANDLE);
	bo->placed = false;
	return 0;
}

static int mgpu_bo_place(struct mgpu_device *mgpu, struct mgpu_bo *bo)
{
	u32 status;

	lockdep_assert_held(&mgpu->lock);
	if (bo->placed)
		return 0;
	if (!bo->handle)
		return -ENODEV;
	status = mgpu_res_command(mgpu, MGPU_RES_PLACE, bo->handle, 0);
	if (status) {
		drm_err(&mgpu->drm, "PLACE of resource %u failed: %s\n", bo->handle,
			error_name(status));
		return mgpu_status_errno(status);
	}
	bo->aperture_offset = rd64(mgpu, MGPU_REG_RES_OFFSET_LO);
	bo->placed = true;
	return 0;
}

/* Zap every CPU mapping of a BO: the next touch goes through our fault handler. */
static void mgpu_bo_zap(struct mgpu_bo *bo)
{
	drm_vma_node_unmap(&bo->base.vma_node, bo->base.dev->anon_inode->i_mapping);
}

/* ------------------------------------------------------------ GEM objects */

static void mgpu_bo_free(struct drm_gem_object *obj)
{
	struct mgpu_device *mgpu = to_mgpu(obj->dev);
	struct mgpu_bo *bo = to_bo(obj);
	u32 status;

	mutex_lock(&mgpu->lock);
	list_del(&bo->node);
	if (bo->handle) {
		/* No mapping is left (each held a reference); DESTROY also unmaps. */
		status = mgpu_res_command(mgpu, MGPU_RES_DESTROY, bo->handle, 0);
		if (status)
			drm_warn(&mgpu->drm, "DESTROY of resource %u failed: %s\n",
				 bo->handle, error_name(status));
	}
	mutex_unlock(&mgpu->lock);
	drm_gem_object_release(obj);
	kfree(bo);
}

static vm_fault_t mgpu_bo_fault(struct vm_fault *vmf)
{
	struct vm_area_struct *vma = vmf->vma;
	struct mgpu_bo *bo = to_bo(vma->vm_private_data);
	struct mgpu_device *mgpu = to_mgpu(bo->base.dev);
	unsigned long page = (vmf->address - vma->vm_start) >> PAGE_SHIFT;
	vm_fault_t ret;
	int idx;

	if (page >= bo->base.size >> PAGE_SHIFT)
		return VM_FAULT_SIGBUS;
	if (!drm_dev_enter(&mgpu->drm, &idx))
		return VM_FAULT_SIGBUS;
	/* The lock orders us against recovery, which moves BOs and zaps mappings. */
	mutex_lock(&mgpu->lock);
	if (mgpu_bo_place(mgpu, bo)) {
		ret = VM_FAULT_SIGBUS;
	} else {
		ret = vmf_insert_pfn(vma, vmf->address,
				     ((mgpu->aperture_base + bo->aperture_offset) >> PAGE_SHIFT)
				     + page);
	}
	mutex_unlock(&mgpu->lock);
	drm_dev_exit(idx);
	return ret;
}

static const struct vm_operations_struct mgpu_bo_vm_ops = {
	.fault = mgpu_bo_fault,
	.open = drm_gem_vm_open,
	.close = drm_gem_vm_close,
};

static int mgpu_bo_mmap(struct drm_gem_object *obj, struct vm_area_struct *vma)
{
	/* Aperture pages, no struct page behind them: PFN map, write-combined. */
	vm_flags_set(vma, VM_PFNMAP | VM_IO | VM_DONTEXPAND | VM_DONTDUMP);
	vma->vm_page_prot = pgprot_writecombine(vm_get_page_prot(vma->vm_flags));
	vma->vm_ops = &mgpu_bo_vm_ops;
	return 0;
}

static void mgpu_bo_print_info(struct drm_printer *p, unsigned int indent,
			       const struct drm_gem_object *obj)
{
	const struct mgpu_bo *bo = container_of(obj, struct mgpu_bo, base);

	drm_printf_indent(p, indent, "resource=%u placed=%d aperture_offset=0x%llx\n",
			  bo->handle, bo->placed, bo->aperture_offset);
}

static const struct drm_gem_object_funcs mgpu_bo_funcs = {
	.free = mgpu_bo_free,
	.mmap = mgpu_bo_mmap,
	.print_info = mgpu_bo_print_info,
	.vm_ops = &mgpu_bo_vm_ops,
};

static int mgpu_ioctl_bo_create(struct drm_device *drm, void *data, struct drm_file *file)
{
	struct mgpu_device *mgpu = to_mgpu(drm);
	struct drm_mgpu_bo_create *args = data;
	struct mgpu_bo *bo;
	u64 size;
	int ret;

	if (args->flags || !args->size)
		return -EINVAL;
	size = PAGE_ALIGN(args->size);
	if (size < args->size || size > mgpu->aperture_size)
		return -ENOSPC;
	bo = kzalloc(sizeof(*bo), GFP_KERNEL);
	if (!bo)
		return -ENOMEM;
	bo->base.funcs = &mgpu_bo_funcs;
	drm_gem_private_object_init(drm, &bo->base, size);
	INIT_LIST_HEAD(&bo->node);

	mutex_lock(&mgpu->lock);
	ret = mgpu->broken ? -ENODEV : mgpu_bo_alloc_resource(mgpu, bo);
	if (!ret)
		list_add_tail(&bo->node, &mgpu->bos);
	mutex_unlock(&mgpu->lock);
	if (!ret)
		ret = drm_gem_create_mmap_offset(&bo->base);
	if (!ret)
		ret = drm_gem_handle_create(file, &bo->base, &args->handle);
	/* The handle holds the object now; on failure this frees it. */
	drm_gem_object_put(&bo->base);
	return ret;
}

static int mgpu_ioctl_bo_mmap(struct drm_device *drm, void *data, struct drm_file *file)
{
	struct mgpu_device *mgpu = to_mgpu(drm);
	struct drm_mgpu_bo_mmap *args = data;
	struct drm_gem_object *obj;
	int ret;

	if (args->pad)
		return -EINVAL;
	obj = drm_gem_object_lookup(file, args->handle);
	if (!obj)
		return -ENOENT;
	mutex_lock(&mgpu->lock);
	ret = mgpu_bo_place(mgpu, to_bo(obj));
	args->aperture_offset = to_bo(obj)->aperture_offset;
	mutex_unlock(&mgpu->lock);
	args->offset = drm_vma_node_offset_addr(&obj->vma_node);
	drm_gem_object_put(obj);
	return ret;
}

static int mgpu_ioctl_bo_wait(struct drm_device *drm, void *data, struct drm_file *file)
{
	struct drm_mgpu_bo_wait *args = data;
	struct drm_gem_object *obj;
	unsigned long timeout;
	long ret;

	if (args->pad || args->timeout_ns < 0)
		return -EINVAL;
	obj = drm_gem_object_lookup(file, args->handle);
	if (!obj)
		return -ENOENT;
	timeout = nsecs_to_jiffies(args->timeout_ns);
	ret = dma_resv_wait_timeout(obj->resv, DMA_RESV_USAGE_READ, true, timeout);
	drm_gem_object_put(obj);
	if (ret == 0)
		return -ETIME;
	return ret < 0 ? ret : 0;
}

static int mgpu_ioctl_get_param(struct drm_device *drm, void *data, struct drm_file *file)
{
	struct mgpu_device *mgpu = to_mgpu(drm);
	struct drm_mgpu_get_param *args = data;
	int ret = 0;

	if (args->pad)
		return -EINVAL;
	mutex_lock(&mgpu->lock);
	switch (args->param) {
	case MGPU_PARAM_DEVICE_VERSION:
		args->value = rd(mgpu, MGPU_REG_VERSION);
		break;
	case MGPU_PARAM_APERTURE_SIZE:
		args->value = mgpu->aperture_size;
		break;
	case MGPU_PARAM_MEM_QUOTA:
		args->value = rd64(mgpu, MGPU_REG_MEM_QUOTA_LO);
		break;
	case MGPU_PARAM_MEM_FREE:
		args->value = rd64(mgpu, MGPU_REG_MEM_FREE_LO);
		break;
	case MGPU_PARAM_CONTEXTS:
		args->value = mgpu->contexts;
		break;
	case MGPU_PARAM_RESOURCE_COUNT:
		args->value = rd(mgpu, MGPU_REG_RESOURCE_COUNT);
		break;
	case MGPU_PARAM_RESET_COUNT:
		args->value = mgpu->resets;
		break;
	case MGPU_PARAM_MAX_COMMANDS:
		args->value = MGPU_MAX_COMMANDS;
		break;
	default:
		ret = -EINVAL;
	}
	mutex_unlock(&mgpu->lock);
	return ret;
}

/* ------------------------------------------------------------ fences and jobs */

static const char *mgpu_fence_driver_name(struct dma_fence *fence)
{
	return "mgpu_drm";
}

static const char *mgpu_fence_timeline_name(struct dma_fence *fence)
{
	return "mgpu-ring0";
}

static const struct dma_fence_ops mgpu_fence_ops = {
	.get_driver_name = mgpu_fence_driver_name,
	.get_timeline_name = mgpu_fence_timeline_name,
};

static void mgpu_job_put_bos(struct mgpu_job *job)
{
	unsigned int i;

	for (i = 0; i < job->nbos; i++)
		drm_gem_object_put(job->bos[i]);
	kvfree(job->bos);
	job->bos = NULL;
	job->nbos = 0;
}

/* End a job (lock held): signal its fence with @error (0 for success), retire it. */
static void mgpu_job_end(struct mgpu_device *mgpu, struct mgpu_job *job, int error)
{
	lockdep_assert_held(&mgpu->lock);
	if (error) {
		dma_fence_set_error(&job->fence, error);
		mgpu->failed++;
	} else {
		mgpu->completed++;
	}
	dma_fence_signal(&job->fence);
	/* Dropping a BO may free it, which takes the lock: see mgpu_reap(). */
	list_move_tail(&job->node, &mgpu->retired);
	mgpu->used -= job->slots;
	mgpu->retired_seqno = job->fence.seqno;
	wake_up_all(&mgpu->ring_space);
}

/* Release what ended jobs held (lock not held). */
static void mgpu_reap(struct mgpu_device *mgpu)
{
	struct mgpu_job *job, *next;
	LIST_HEAD(done);

	mutex_lock(&mgpu->lock);
	list_splice_init(&mgpu->retired, &done);
	mutex_unlock(&mgpu->lock);
	list_for_each_entry_safe(job, next, &done, node) {
		list_del(&job->node);
		mgpu_job_put_bos(job);
		dma_fence_put(&job->fence);	/* the list's reference */
	}
}

/* (Re)arm the hang check for the oldest job in flight (lock held). */
static void mgpu_arm_timeout(struct mgpu_device *mgpu)
{
	struct mgpu_job *job = list_first_entry_or_null(&mgpu->jobs, struct mgpu_job, node);

	if (!job) {
		cancel_delayed_work(&mgpu->timeout);
		return;
	}
	mod_delayed_work(system_long_wq, &mgpu->timeout,
			 time_after(job->deadline, jiffies) ? job->deadline - jiffies : 0);
}

/* Signal every job whose FENCE the device wrote (lock held). */
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

static void mgpu_ring_start(struct mgpu_device *mgpu)
{
	lockdep_assert_held(&mgpu->lock);
	wr(mgpu, MGPU_REG_CTX0_RING_CONTROL, 0);
	wr(mgpu, MGPU_REG_CTX0_RING_BASE_LO, lower_32_bits(mgpu->ring_bus));
	wr(mgpu, MGPU_REG_CTX0_RING_BASE_HI, upper_32_bits(mgpu->ring_bus));
	wr(mgpu, MGPU_REG_CTX0_RING_SIZE, MGPU_RING_SIZE);
	wr(mgpu, MGPU_REG_CTX0_RING_CONTROL, MGPU_RING_CONTROL_ENABLE);
	mgpu->tail = 0;
	if (rd(mgpu, MGPU_REG_CTX0_RING_STATUS) != MGPU_RING_IDLE)
		drm_err(&mgpu->drm, "ring 0 did not start: status %u, error %s\n",
			rd(mgpu, MGPU_REG_CTX0_RING_STATUS),
			error_name(rd(mgpu, MGPU_REG_ERROR_CODE)));
}

/* Fail every job still in flight (lock held): the first with @first, the rest cancelled. */
static void mgpu_fail_jobs(struct mgpu_device *mgpu, int first)
{
	struct mgpu_job *job, *next;
	int error = first;

	list_for_each_entry_safe(job, next, &mgpu->jobs, node) {
		mgpu_job_end(mgpu, job, error);
		error = -ECANCELED;
	}
}

/*
 * Handle/argument layout of the commands user space may submit: bit i set means
 * args[i] is a GEM handle.  Opcodes missing here are refused.
 */
static const u8 mgpu_cmd_handles[] = {
	[MGPU_CMD_NOP] = 0,
	[MGPU_CMD_COPY] = BIT(0) | BIT(2),
	[MGPU_CMD_FILL] = BIT(0),
	[MGPU_CMD_BLIT] = BIT(0) | BIT(3),
	[MGPU_CMD_SAXPY] = BIT(0) | BIT(2),
	[MGPU_CMD_MATMUL] = BIT(0) | BIT(1) | BIT(2),
};

static bool mgpu_cmd_allowed(u32 op)
{
	return op == MGPU_CMD_NOP || op == MGPU_CMD_COPY || op == MGPU_CMD_FILL ||
	       op == MGPU_CMD_BLIT || op == MGPU_CMD_SAXPY || op == MGPU_CMD_MATMUL;
}

/* Look up a GEM handle of a command, adding it to the job's BO list once. */
static int mgpu_job_bo(struct drm_file *file, struct mgpu_job *job, u64 handle,
		       unsigned int max, struct drm_gem_object **out)
{
	struct drm_gem_object *obj;
	unsigned int i;

	if (handle > U32_MAX)
		return -ENOENT;
	obj = drm_gem_object_lookup(file, handle);
	if (!obj)
		return -ENOENT;
	for (i = 0; i < job->nbos; i++) {
		if (job->bos[i] == obj) {
			drm_gem_object_put(obj);
			*out = job->bos[i];
			return 0;
		}
	}
	if (WARN_ON(job->nbos >= max)) {
		drm_gem_object_put(obj);
		return -EINVAL;
	}
	job->bos[job->nbos++] = obj;
	*out = obj;
	return 0;
}

static int mgpu_ioctl_submit(struct drm_device *drm, void *data, struct drm_file *file)
{
	struct mgpu_device *mgpu = to_mgpu(drm);
	struct drm_mgpu_submit *args = data;
	struct drm_mgpu_command *cmds;
	struct drm_syncobj *out_sync = NULL;
	struct sync_file *sync_file = NULL;
	struct ww_acquire_ctx ctx;
	struct mgpu_job *job;
	unsigned int i, a, maxbos;
	int fd = -1, ret;
	u32 slot;

	args->out_fence_fd = -1;
	if (args->flags & ~MGPU_SUBMIT_FLAGS || args->pad)
		return -EINVAL;
	if (!args->count || args->count > MGPU_MAX_COMMANDS)
		return -EINVAL;

	cmds = memdup_array_user(u64_to_user_ptr(args->commands), args->count, sizeof(*cmds));
	if (IS_ERR(cmds))
		return PTR_ERR(cmds);
	job = kzalloc(sizeof(*job), GFP_KERNEL);
	maxbos = args->count * 3;
	if (job)
		job->bos = kvcalloc(maxbos, sizeof(*job->bos), GFP_KERNEL);
	if (!job || !job->bos) {
		kfree(job);
		kfree(cmds);
		return -ENOMEM;
	}

	/* Check every command, translate GEM handles to device handles below. */
	for (i = 0; i < args->count; i++) {
		struct drm_mgpu_command *c = &cmds[i];

		if (c->flags || !mgpu_cmd_allowed(c->opcode)) {
			drm_dbg(drm, "command %u: opcode 0x%x flags 0x%x refused\n", i,
				c->opcode, c->flags);
			ret = -EINVAL;
			goto err_bos;
		}
		for (a = 0; a < 7; a++) {
			struct drm_gem_object *obj = NULL;

			if (!(mgpu_cmd_handles[c->opcode] & BIT(a)))
				continue;
			ret = mgpu_job_bo(file, job, c->args[a], maxbos, &obj);
			if (ret) {
				drm_dbg(drm, "command %u arg %u: no BO with handle %llu\n", i, a,
					c->args[a]);
				goto err_bos;
			}
			c->args[a] = (uintptr_t)obj;	/* device handle filled in under lock */
		}
	}

	if (args->in_syncobj) {
		struct dma_fence *in;

		ret = drm_syncobj_find_fence(file, args->in_syncobj, 0, 0, &in);
		if (ret)
			goto err_bos;
		/* Our ring runs in order; a foreign fence is waited for here. */
		ret = dma_fence_wait(in, true);
		dma_fence_put(in);
		if (ret)
			goto err_bos;
	}
	if (args->out_syncobj) {
		out_sync = drm_syncobj_find(file, args->out_syncobj);
		if (!out_sync) {
			ret = -ENOENT;
			goto err_bos;
		}
	}

	ret = drm_gem_lock_reservations(job->bos, job->nbos, &ctx);
	if (ret)
		goto err_sync;
	for (i = 0; i < job->nbos; i++) {
		ret = dma_resv_reserve_fences(job->bos[i]->resv, 1);
		if (ret)
			goto err_unlock;
	}

	mutex_lock(&mgpu->lock);
	while (!mgpu->broken && mgpu->used + args->count + 1 > MGPU_RING_SLOTS - 1) {
		mutex_unlock(&mgpu->lock);
		ret = wait_event_interruptible(mgpu->ring_space,
					       READ_ONCE(mgpu->used) + args->count + 1 <
					       MGPU_RING_SLOTS || READ_ONCE(mgpu->broken));
		mutex_lock(&mgpu->lock);
		if (ret)
			goto err_locked;
	}
	if (mgpu->broken) {
		ret = -ENODEV;
		goto err_locked;
	}
	for (i = 0; i < job->nbos; i++) {
		if (!to_bo(job->bos[i])->handle) {
			ret = -ENODEV;
			goto err_locked;
		}
	}

	dma_fence_init(&job->fence, &mgpu_fence_ops, &mgpu->fence_lock,
		       mgpu->fence_context, ++mgpu->next_seqno);
	job->start = mgpu->tail;
	slot = mgpu->tail / MGPU_COMMAND_SIZE;
	for (i = 0; i < args->count; i++) {
		struct mgpu_cmd *dst = &mgpu->ring[slot];

		dst->opcode = cmds[i].opcode;
		dst->flags = 0;
		for (a = 0; a < 7; a++) {
			u64 v = cmds[i].args[a];

			if (mgpu_cmd_handles[cmds[i].opcode] & BIT(a))
				v = to_bo((struct drm_gem_object *)(uintptr_t)v)->handle;
			dst->args[a] = v;
		}
		slot = (slot + 1) % MGPU_RING_SLOTS;
	}
	memset(&mgpu->ring[slot], 0, sizeof(mgpu->ring[slot]));
	mgpu->ring[slot].opcode = MGPU_OP_FENCE;
	mgpu->ring[slot].args[0] = mgpu->ring_bus + MGPU_RING_SIZE;
	mgpu->ring[slot].args[1] = job->fence.seqno;
	slot = (slot + 1) % MGPU_RING_SLOTS;
	job->slots = args->count + 1;
	job->end = slot * MGPU_COMMAND_SIZE;
	job->deadline = jiffies + msecs_to_jiffies(READ_ONCE(timeout_ms));

	dma_fence_get(&job->fence);	/* the list's reference */
	list_add_tail(&job->node, &mgpu->jobs);
	mgpu->used += job->slots;
	mgpu->tail = job->end;
	mgpu->submitted++;
	args->seqno = job->fence.seqno;
	for (i = 0; i < job->nbos; i++)
		dma_resv_add_fence(job->bos[i]->resv, &job->fence, DMA_RESV_USAGE_WRITE);
	/* The commands are in memory before the device is told about them. */
	dma_wmb();
	wr(mgpu, MGPU_REG_CTX0_RING_TAIL, mgpu->tail);
	wr(mgpu, MGPU_REG_CTX0_DOORBELL, 1);
	if (list_is_singular(&mgpu->jobs))
		mgpu_arm_timeout(mgpu);
	/*
	 * Unlock the reservations while job->bos is still ours: once mgpu->lock is
	 * dropped the job may end at once (a FENCE or ERROR interrupt already waiting
	 * for the lock) and mgpu_reap() empty its BO list, which would leave the
	 * reservations locked for good and the next submit on them waiting forever.
	 */
	drm_gem_unlock_reservations(job->bos, job->nbos, &ctx);
	mutex_unlock(&mgpu->lock);

	if (out_sync) {
		drm_syncobj_replace_fence(out_sync, &job->fence);
		drm_syncobj_put(out_sync);
	}
	if (args->flags & MGPU_SUBMIT_OUT_SYNC_FILE) {
		fd = get_unused_fd_flags(O_CLOEXEC);
		sync_file = fd < 0 ? NULL : sync_file_create(&job->fence);
		if (!sync_file) {
			if (fd >= 0)
				put_unused_fd(fd);
			/* The job runs anyway; only its sync_file is missing. */
			dma_fence_put(&job->fence);
			kfree(cmds);
			return fd < 0 ? fd : -ENOMEM;
		}
		fd_install(fd, sync_file->file);
		args->out_fence_fd = fd;
	}
	dma_fence_put(&job->fence);	/* ours; the list and the consumers hold theirs */
	kfree(cmds);
	return 0;

err_locked:
	mutex_unlock(&mgpu->lock);
err_unlock:
	drm_gem_unlock_reservations(job->bos, job->nbos, &ctx);
err_sync:
	if (out_sync)
		drm_syncobj_put(out_sync);
err_bos:
	mgpu_job_put_bos(job);
	kfree(job);
	kfree(cmds);
	return ret;
}

/* ------------------------------------------------------------ interrupts, recovery */

static void mgpu_handle_error(struct mgpu_device *mgpu)
{
	u32 code = rd(mgpu, MGPU_REG_ERROR_CODE);
	u32 context = rd(mgpu, MGPU_REG_ERROR_CONTEXT);
	u32 offset = rd(mgpu, MGPU_REG_ERROR_RING_OFFSET);
	u32 count = rd(mgpu, MGPU_REG_ERROR_COUNT);
	struct mgpu_job *job, *bad = NULL;
	u32 op;

	mgpu->error_counts[code < ARRAY_SIZE(mgpu->error_counts) ? code : 0]++;
	mgpu->last_error = code;
	mgpu->last_error_offset = offset;
	if (context == MGPU_NO_CONTEXT) {
		/* A resource command or bring-up DMA: the caller saw RES_STATUS. */
		drm_dbg(&mgpu->drm, "device error %s (%u) outside the rings, %u errors\n",
			error_name(code), code, count);
		return;
	}
	if (context != 0 || offset >= MGPU_RING_SIZE) {
		drm_err(&mgpu->drm, "error %s on context %u we do not use\n",
			error_name(code), context);
		return;
	}
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
			    op_name(op), offset, error_name(code), code,
			    bad ? bad->fence.seqno : 0, count);
	/* The ring halted at the failed command: restart it without the rest. */
	mgpu_fail_jobs(mgpu, -EIO);
	mgpu_ring_start(mgpu);
	mgpu_arm_timeout(mgpu);
}

static void mgpu_handle_fault(struct mgpu_device *mgpu)
{
	struct mgpu_fault *f = &mgpu->fault_log[mgpu->fault_next++ % MGPU_FAULT_LOG];

	f->when = ktime_get();
	f->offset = rd64(mgpu, MGPU_REG_FAULT_OFFSET_LO);
	f->count = rd(mgpu, MGPU_REG_FAULT_COUNT);
	f->write = rd(mgpu, MGPU_REG_FAULT_FLAGS) & 1;
	mgpu->faults++;
	dev_warn_ratelimited(mgpu->drm.dev,
			     "aperture fault: %s at BAR2 offset 0x%llx, which backs no placed resource (%u faults reported by the device)\n",
			     f->write ? "write" : "read", f->offset, f->count);
}

static irqreturn_t mgpu_irq_thread(int irq, void *data)
{
	struct mgpu_device *mgpu = data;
	u32 status;

	mutex_lock(&mgpu->lock);
	status = rd(mgpu, MGPU_REG_INT_STATUS);
	if (status)
		wr(mgpu, MGPU_REG_INT_ACK, status);
	/* Acked first: a cause that comes again from here raises its vector again. */
	if (status & MGPU_INT_FENCE)
		mgpu_retire(mgpu);
	if (status & MGPU_INT_ERROR)
		mgpu_handle_error(mgpu);
	if (status & MGPU_INT_FAULT)
		mgpu_handle_fault(mgpu);
	mutex_unlock(&mgpu->lock);
	mgpu_reap(mgpu);
	return status ? IRQ_HANDLED : IRQ_NONE;
}

/* Reset the device and bring it back to where the driver needs it (lock held). */
static int mgpu_recover(struct mgpu_device *mgpu, int error)
{
	struct mgpu_bo *bo;
	unsigned long end;
	int ret = 0;

	lockdep_assert_held(&mgpu->lock);
	/* Nobody may touch pages that are about to belong to nobody, or someone else. */
	list_for_each_entry(bo, &mgpu->bos, node)
		mgpu_bo_zap(bo);
	wr(mgpu, MGPU_REG_SCRATCH, 0x52535421);	/* reset clears it: our "done" flag */
	wr(mgpu, MGPU_REG_DEVICE_RESET, 1);
	end = jiffies + msecs_to_jiffies(MGPU_RESET_WAIT_MS);
	while (rd(mgpu, MGPU_REG_SCRATCH)) {
		if (time_after(jiffies, end)) {
			drm_err(&mgpu->drm, "device reset did not complete in %u ms\n",
				MGPU_RESET_WAIT_MS);
			mgpu->broken = true;
			ret = -ETIMEDOUT;
			break;
		}
		usleep_range(1000, 2000);
	}
	mgpu->resets++;
	mgpu_fail_jobs(mgpu, error);
	WRITE_ONCE(*mgpu->fence_word, mgpu->retired_seqno);
	if (ret)
		goto out;
	wr(mgpu, MGPU_REG_INT_MASK, 0);
	mgpu_ring_start(mgpu);
	/* The reset destroyed every resource: give each BO a new one, zeroed. */
	list_for_each_entry(bo, &mgpu->bos, node) {
		bool was_placed = bo->placed;

		bo->handle = 0;
		bo->placed = false;
		if (mgpu_bo_alloc_resource(mgpu, bo) ||
		    (was_placed && mgpu_bo_place(mgpu, bo))) {
			drm_err(&mgpu->drm, "BO of %zu bytes lost in the reset\n", bo->base.size);
			ret = -ENOSPC;
		}
	}
out:
	wake_up_all(&mgpu->ring_space);
	return ret;
}

static void mgpu_timeout_work(struct work_struct *work)
{
	struct mgpu_device *mgpu = container_of(to_delayed_work(work), struct mgpu_device,
						timeout);
	struct mgpu_job *job;
	int ret;

	mutex_lock(&mgpu->lock);
	mgpu_retire(mgpu);	/* a fence interrupt may be on its way */
	job = list_first_entry_or_null(&mgpu->jobs, struct mgpu_job, node);
	if (!job || time_before(jiffies, job->deadline)) {
		mutex_unlock(&mgpu->lock);
		mgpu_reap(mgpu);
		return;
	}
	mgpu->timeouts++;
	drm_err(&mgpu->drm,
		"job %llu timed out after %u ms (ring 0: head 0x%x tail 0x%x status %u, fence %llu); resetting the device\n",
		job->fence.seqno, timeout_ms, rd(mgpu, MGPU_REG_CTX0_RING_HEAD),
		rd(mgpu, MGPU_REG_CTX0_RING_TAIL), rd(mgpu, MGPU_REG_CTX0_RING_STATUS),
		READ_ONCE(*mgpu->fence_word));
	ret = mgpu_recover(mgpu, -ETIMEDOUT);
	if (ret)
		drm_err(&mgpu->drm, "recovery failed (%d)\n", ret);
	else
		drm_info(&mgpu->drm, "device reset done, %llu resets; BO contents were lost\n",
			 mgpu->resets);
	mutex_unlock(&mgpu->lock);
	mgpu_reap(mgpu);
}

/* ------------------------------------------------------------ debugfs */

static int mgpu_debugfs_ring(struct seq_file *m, void *unused)
{
	struct drm_debugfs_entry *entry = m->private;
	struct mgpu_device *mgpu = to_mgpu(entry->dev);
	struct mgpu_job *job;

	mutex_lock(&mgpu->lock);
	seq_printf(m, "ring 0: bus 0x%llx size %u\n", (u64)mgpu->ring_bus, MGPU_RING_SIZE);
	seq_printf(m, "head 0x%x tail 0x%x (driver tail 0x%x) status %u\n",
		   rd(mgpu, MGPU_REG_CTX0_RING_HEAD), rd(mgpu, MGPU_REG_CTX0_RING_TAIL),
		   mgpu->tail, rd(mgpu, MGPU_REG_CTX0_RING_STATUS));
	seq_printf(m, "fence register %llu, fence word %llu, last seqno %llu\n",
		   rd64(mgpu, MGPU_REG_CTX0_FENCE_LO), READ_ONCE(*mgpu->fence_word),
		   mgpu->next_seqno);
	seq_printf(m, "slots used %u of %u\n", mgpu->used, (u32)MGPU_RING_SLOTS);
	seq_printf(m, "submitted %llu completed %llu failed %llu timeouts %llu resets %llu\n",
		   mgpu->submitted, mgpu->completed, mgpu->failed, mgpu->timeouts,
		   mgpu->resets);
	seq_printf(m, "timeout_ms %u%s\n", timeout_ms, mgpu->broken ? " BROKEN" : "");
	list_for_each_entry(job, &mgpu->jobs, node)
		seq_printf(m, "job %llu: ring [0x%x, 0x%x) %u BOs, due in %d ms\n",
			   job->fence.seqno, job->start, job->end, job->nbos,
			   jiffies_to_msecs(job->deadline - jiffies));
	mutex_unlock(&mgpu->lock);
	return 0;
}

static int mgpu_debugfs_bos(struct seq_file *m, void *unused)
{
	struct drm_debugfs_entry *entry = m->private;
	struct mgpu_device *mgpu = to_mgpu(entry->dev);
	struct mgpu_bo *bo;
	unsigned int n = 0;
	u64 bytes = 0;

	mutex_lock(&mgpu->lock);
	seq_printf(m, "device: %u resources, %llu bytes free of %llu\n",
		   rd(mgpu, MGPU_REG_RESOURCE_COUNT), rd64(mgpu, MGPU_REG_MEM_FREE_LO),
		   rd64(mgpu, MGPU_REG_MEM_QUOTA_LO));
	list_for_each_entry(bo, &mgpu->bos, node) {
		seq_printf(m, "resource %u: %zu bytes, %s 0x%llx, %u handles\n", bo->handle,
			   bo->base.size, bo->placed ? "placed at" : "not placed",
			   bo->placed ? bo->aperture_offset : 0, bo->base.handle_count);
		n++;
		bytes += bo->base.size;
	}
	seq_printf(m, "%u BOs, %llu bytes\n", n, bytes);
	mutex_unlock(&mgpu->lock);
	return 0;
}

static int mgpu_debugfs_faults(struct seq_file *m, void *unused)
{
	struct drm_debugfs_entry *entry = m->private;
	struct mgpu_device *mgpu = to_mgpu(entry->dev);
	unsigned int i, first;

	mutex_lock(&mgpu->lock);
	seq_printf(m, "faults %llu (device FAULT_COUNT %u)\n", mgpu->faults,
		   rd(mgpu, MGPU_REG_FAULT_COUNT));
	first = mgpu->fault_next > MGPU_FAULT_LOG ? mgpu->fault_next - MGPU_FAULT_LOG : 0;
	for (i = first; i < mgpu->fault_next; i++) {
		struct mgpu_fault *f = &mgpu->fault_log[i % MGPU_FAULT_LOG];

		seq_printf(m, "%lld.%06lld %s offset 0x%llx count %u\n",
			   ktime_to_us(f->when) / USEC_PER_SEC,
			   ktime_to_us(f->when) % USEC_PER_SEC,
			   f->write ? "write" : "read", f->offset, f->count);
	}
	mutex_unlock(&mgpu->lock);
	return 0;
}

static int mgpu_debugfs_errors(struct seq_file *m, void *unused)
{
	struct drm_debugfs_entry *entry = m->private;
	struct mgpu_device *mgpu = to_mgpu(entry->dev);
	unsigned int i;

	mutex_lock(&mgpu->lock);
	seq_printf(m, "device ERROR_COUNT %u, last %s at ring offset 0x%x\n",
		   rd(mgpu, MGPU_REG_ERROR_COUNT), error_name(mgpu->last_error),
		   mgpu->last_error_offset);
	for (i = 1; i < ARRAY_SIZE(mgpu->error_counts); i++)
		if (mgpu->error_counts[i])
			seq_printf(m, "%s %llu\n", error_name(i), mgpu->error_counts[i]);
	mutex_unlock(&mgpu->lock);
	return 0;
}

static const struct drm_debugfs_info mgpu_debugfs_files[] = {
	{ "ring", mgpu_debugfs_ring, 0 },
	{ "bos", mgpu_debugfs_bos, 0 },
	{ "faults", mgpu_debugfs_faults, 0 },
	{ "errors", mgpu_debugfs_errors, 0 },
};

/* ------------------------------------------------------------ driver */

static const struct drm_ioctl_desc mgpu_ioctls[] = {
	DRM_IOCTL_DEF_DRV(MGPU_GET_PARAM, mgpu_ioctl_get_param, DRM_RENDER_ALLOW),
	DRM_IOCTL_DEF_DRV(MGPU_BO_CREATE, mgpu_ioctl_bo_create, DRM_RENDER_ALLOW),
	DRM_IOCTL_DEF_DRV(MGPU_BO_MMAP, mgpu_ioctl_bo_mmap, DRM_RENDER_ALLOW),
	DRM_IOCTL_DEF_DRV(MGPU_SUBMIT, mgpu_ioctl_submit, DRM_RENDER_ALLOW),
	DRM_IOCTL_DEF_DRV(MGPU_BO_WAIT, mgpu_ioctl_bo_wait, DRM_RENDER_ALLOW),
};

DEFINE_DRM_GEM_FOPS(mgpu_fops);

static const struct drm_driver mgpu_drm_driver = {
	.driver_features = DRIVER_GEM | DRIVER_RENDER | DRIVER_SYNCOBJ,
	.ioctls = mgpu_ioctls,
	.num_ioctls = ARRAY_SIZE(mgpu_ioctls),
	.fops = &mgpu_fops,
	.name = "mgpu",
	.desc = "mgpu mediated GPU",
	.major = 1,
	.minor = 0,
};

static void mgpu_hw_fini(struct mgpu_device *mgpu)
{
	wr(mgpu, MGPU_REG_INT_MASK, 0xffffffff);
	wr(mgpu, MGPU_REG_CTX0_RING_CONTROL, 0);
}

static int mgpu_pci_probe(struct pci_dev *pdev, const struct pci_device_id *id)
{
	struct mgpu_device *mgpu;
	struct drm_device *drm;
	void *ring;
	int ret, v;

	mgpu = devm_drm_dev_alloc(&pdev->dev, &mgpu_drm_driver, struct mgpu_device, drm);
	if (IS_ERR(mgpu))
		return PTR_ERR(mgpu);
	drm = &mgpu->drm;
	mgpu->pdev = pdev;
	pci_set_drvdata(pdev, mgpu);
	mutex_init(&mgpu->lock);
	INIT_LIST_HEAD(&mgpu->bos);
	INIT_LIST_HEAD(&mgpu->jobs);
	INIT_LIST_HEAD(&mgpu->retired);
	spin_lock_init(&mgpu->fence_lock);
	init_waitqueue_head(&mgpu->ring_space);
	INIT_DELAYED_WORK(&mgpu->timeout, mgpu_timeout_work);
	mgpu->fence_context = dma_fence_context_alloc(1);

	ret = pcim_enable_device(pdev);
	if (ret)
		return ret;
	pci_set_master(pdev);
	ret = dma_set_mask_and_coherent(&pdev->dev, DMA_BIT_MASK(64));
	if (ret)
		return ret;
	mgpu->regs = pcim_iomap_region(pdev, 0, "mgpu_drm");
	if (IS_ERR(mgpu->regs))
		return PTR_ERR(mgpu->regs);
	if (rd(mgpu, MGPU_REG_ID) != MGPU_ID_VALUE) {
		drm_err(drm, "ID register reads 0x%08x: not an mgpu\n", rd(mgpu, MGPU_REG_ID));
		return -ENODEV;
	}
	/*
	 * BAR2 is not claimed: raw tools (mgpu-probe, the test program's stray-access
	 * subtest) may still reach the aperture through sysfs while we are bound, which
	 * is how the device's fault reporting is exercised.  We never ioremap it.
	 */
	mgpu->aperture_base = pci_resource_start(pdev, 2);
	mgpu->aperture_size = rd64(mgpu, MGPU_REG_APERTURE_SIZE_LO);
	if (mgpu->aperture_size > pci_resource_len(pdev, 2)) {
		drm_err(drm, "aperture of %llu bytes in a BAR of %llu\n", mgpu->aperture_size,
			(u64)pci_resource_len(pdev, 2));
		return -ENODEV;
	}
	mgpu->contexts = rd(mgpu, MGPU_REG_CONTEXT_QUOTA);

	/* A fresh device: nothing left over from a previous driver or a crashed guest. */
	wr(mgpu, MGPU_REG_SCRATCH, 0x52535421);
	wr(mgpu, MGPU_REG_DEVICE_RESET, 1);
	for (v = 0; rd(mgpu, MGPU_REG_SCRATCH) && v < MGPU_RESET_WAIT_MS; v++)
		usleep_range(1000, 2000);

	ring = dmam_alloc_coherent(&pdev->dev, MGPU_RING_SIZE + PAGE_SIZE, &mgpu->ring_bus,
				   GFP_KERNEL);
	if (!ring)
		return -ENOMEM;
	mgpu->ring = ring;
	mgpu->fence_word = ring + MGPU_RING_SIZE;

	mgpu->vectors = pci_alloc_irq_vectors(pdev, 1, MGPU_VECTORS, PCI_IRQ_MSIX | PCI_IRQ_MSI);
	if (mgpu->vectors < 0)
		return mgpu->vectors;
	for (v = 0; v < mgpu->vectors; v++) {
		ret = devm_request_threaded_irq(&pdev->dev, pci_irq_vector(pdev, v), NULL,
						mgpu_irq_thread, IRQF_ONESHOT, "mgpu_drm", mgpu);
		if (ret)
			goto err_vectors;
	}

	mutex_lock(&mgpu->lock);
	wr(mgpu, MGPU_REG_INT_ACK, 0xffffffff);
	wr(mgpu, MGPU_REG_INT_MASK, 0);
	mgpu_ring_start(mgpu);
	mutex_unlock(&mgpu->lock);

	drm_debugfs_add_files(drm, mgpu_debugfs_files, ARRAY_SIZE(mgpu_debugfs_files));
	ret = drm_dev_register(drm, 0);
	if (ret)
		goto err_hw;
	drm_info(drm, "mgpu %u.%u: %llu MiB aperture, %u contexts, %d %s vectors, ring at %pad\n",
		 rd(mgpu, MGPU_REG_VERSION) >> 16, rd(mgpu, MGPU_REG_VERSION) & 0xffff,
		 mgpu->aperture_size >> 20, mgpu->contexts, mgpu->vectors,
		 pdev->msix_enabled ? "MSI-X" : "MSI", &mgpu->ring_bus);
	return 0;

err_hw:
	mgpu_hw_fini(mgpu);
err_vectors:
	for (v--; v >= 0; v--)
		devm_free_irq(&pdev->dev, pci_irq_vector(pdev, v), mgpu);
	pci_free_irq_vectors(pdev);
	return ret;
}

static void mgpu_pci_remove(struct pci_dev *pdev)
{
	struct mgpu_device *mgpu = pci_get_drvdata(pdev);
	int v;

	drm_dev_unplug(&mgpu->drm);
	mutex_lock(&mgpu->lock);
	mgpu_hw_fini(mgpu);
	mgpu_fail_jobs(mgpu, -ENODEV);
	mgpu->broken = true;
	mutex_unlock(&mgpu->lock);
	cancel_delayed_work_sync(&mgpu->timeout);
	mgpu_reap(mgpu);
	for (v = 0; v < mgpu->vectors; v++)
		devm_free_irq(&pdev->dev, pci_irq_vector(pdev, v), mgpu);
	pci_free_irq_vectors(pdev);
}

static const struct pci_device_id mgpu_pci_ids[] = {
	{ PCI_DEVICE(MGPU_VENDOR_ID, MGPU_DEVICE_ID) },
	{ }
};
MODULE_DEVICE_TABLE(pci, mgpu_pci_ids);

static struct pci_driver mgpu_pci_driver = {
	.name = "mgpu_drm",
	.id_table = mgpu_pci_ids,
	.probe = mgpu_pci_probe,
	.remove = mgpu_pci_remove,
};
module_pci_driver(mgpu_pci_driver);

MODULE_DESCRIPTION("DRM driver for the mgpu mediated GPU");
MODULE_LICENSE("GPL");
