/* SPDX-License-Identifier: GPL-2.0 */
/*
 * mgpu_drm_drv.h: what the parts of the mgpu DRM driver share.
 *
 * The module is one driver in several files, one concern each (a display joins as
 * mgpu_drm_kms.c, listed in Kbuild, with its own init/fini called from probe/remove):
 *
 *   mgpu_drm_drv.c      PCI probe and remove, the drm_driver, ioctl table, GET_PARAM
 *   mgpu_drm_gem.c      BOs: device resources, placement in the aperture (with
 *                       eviction when it is full), the CPU fault handler
 *   mgpu_drm_submit.c   DRM_IOCTL_MGPU_SUBMIT in steps: validate, pin, build,
 *                       commit, fence
 *   mgpu_drm_ring.c     the kernel ring, job fences, interrupts, hang timeout and
 *                       device reset (recovery)
 *   mgpu_drm_debugfs.c  dri/N/{ring,bos,faults,errors}
 *
 * Register access.  Every path that touches a register runs inside drm_dev_enter()
 * (mgpu_enter()), except probe and remove, which own the device: after unplug
 * (unbind, hot-unplug) the BARs are unmapped while files, mappings and BOs may live
 * on, and their last release must not reach the hardware.
 *
 * Locks, in the order they nest (an outer one may be held when taking an inner one):
 *   1. ring_lock (mutex)   the ring, its registers, the job list, seqnos, the error
 *                          counters; recovery holds it throughout
 *   2. res_lock (mutex)    the RES_* register sequence, every BO's resource handle and
 *                          placement, the BO and placement (LRU) lists
 *   3. irq_lock (spinlock) reading and acknowledging INT_STATUS, so that each cause
 *                          is handled by one interrupt thread
 *      fault_lock (spinlock) the fault log
 *      fence_lock (spinlock) dma_fence state (the dma_fence core takes it)
 * The CPU fault handler and BO ioctls take only res_lock; the interrupt threads take
 * ring_lock for fences and errors and fault_lock for faults; nothing polls the device
 * for long under a lock (a reset waits at most MGPU_RESET_WAIT_MS).
 */
#ifndef MGPU_DRM_DRV_H
#define MGPU_DRM_DRV_H

#include <linux/dma-fence.h>
#include <linux/io.h>
#include <linux/list.h>
#include <linux/mutex.h>
#include <linux/pci.h>
#include <linux/spinlock.h>
#include <linux/wait.h>
#include <linux/workqueue.h>

#include <drm/drm_device.h>
#include <drm/drm_drv.h>
#include <drm/drm_gem.h>

#include "mgpu_drm.h"
#include "mgpu_regs.h"

#define MGPU_RING_SIZE		SZ_64K
#define MGPU_RING_SLOTS		(MGPU_RING_SIZE / MGPU_COMMAND_SIZE)
#define MGPU_MAX_COMMANDS	64	/* per job; one more slot for its FENCE */
#define MGPU_VECTORS		4	/* FENCE, ERROR, DMA, FAULT */
#define MGPU_FAULT_LOG		32
#define MGPU_RESET_WAIT_MS	1000	/* a device reset takes milliseconds */
#define MGPU_RESET_MAGIC	0x52535421	/* in SCRATCH; the reset clears it */

extern unsigned int mgpu_timeout_ms;

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

	/* ring_lock: the ring, the jobs, recovery. */
	struct mutex ring_lock;
	struct mgpu_cmd *ring;		/* slots in coherent memory, the fence word after */
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
	bool broken;			/* recovery failed or the device is gone */
	u64 submitted, completed, failed, timeouts, resets;
	u64 error_counts[MGPU_ERROR_CODES];
	u32 last_error, last_error_offset;

	/* res_lock: device memory as the driver sees it. */
	struct mutex res_lock;
	struct list_head bos;		/* every live BO */
	struct list_head placed;	/* placed BOs, least recently used first */
	u64 evictions;

	spinlock_t irq_lock;

	spinlock_t fault_lock;
	u64 faults;
	struct mgpu_fault fault_log[MGPU_FAULT_LOG];
	unsigned int fault_next;
};

struct mgpu_cmd {
	u32 opcode;
	u32 flags;
	u64 args[MGPU_COMMAND_ARGS];
};
static_assert(sizeof(struct mgpu_cmd) == MGPU_COMMAND_SIZE);
static_assert(sizeof(struct drm_mgpu_command) == MGPU_COMMAND_SIZE);

struct mgpu_bo {
	struct drm_gem_object base;
	struct list_head node;		/* in mgpu->bos */
	struct list_head lru;		/* in mgpu->placed while placed */
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

/* Register access: only between mgpu_enter() and mgpu_exit() (or in probe/remove). */
static inline bool mgpu_enter(struct mgpu_device *mgpu, int *idx)
{
	return drm_dev_enter(&mgpu->drm, idx);
}

static inline void mgpu_exit(int idx)
{
	drm_dev_exit(idx);
}

static inline u32 rd(struct mgpu_device *mgpu, u32 reg)
{
	return readl(mgpu->regs + reg);
}

static inline void wr(struct mgpu_device *mgpu, u32 reg, u32 value)
{
	writel(value, mgpu->regs + reg);
}

static inline u64 rd64(struct mgpu_device *mgpu, u32 lo)
{
	return rd(mgpu, lo) | (u64)rd(mgpu, lo + 4) << 32;
}

const char *mgpu_error_name(u32 code);
const char *mgpu_op_name(u32 op);

/* mgpu_drm_gem.c */
extern const struct vm_operations_struct mgpu_bo_vm_ops;
int mgpu_bo_alloc_resource(struct mgpu_device *mgpu, struct mgpu_bo *bo);
int mgpu_bo_place(struct mgpu_device *mgpu, struct mgpu_bo *bo);
void mgpu_bo_forget_placement(struct mgpu_device *mgpu, struct mgpu_bo *bo);
void mgpu_bo_zap(struct mgpu_bo *bo);
int mgpu_ioctl_bo_create(struct drm_device *drm, void *data, struct drm_file *file);
int mgpu_ioctl_bo_mmap(struct drm_device *drm, void *data, struct drm_file *file);
int mgpu_ioctl_bo_wait(struct drm_device *drm, void *data, struct drm_file *file);

/* mgpu_drm_submit.c */
int mgpu_ioctl_submit(struct drm_device *drm, void *data, struct drm_file *file);

/* mgpu_drm_ring.c */
extern const struct dma_fence_ops mgpu_fence_ops;
int mgpu_reset_device(struct mgpu_device *mgpu);
void mgpu_ring_start(struct mgpu_device *mgpu);
void mgpu_arm_timeout(struct mgpu_device *mgpu);
void mgpu_fail_jobs(struct mgpu_device *mgpu, int first);
void mgpu_reap(struct mgpu_device *mgpu);
void mgpu_job_put_bos(struct mgpu_job *job);
irqreturn_t mgpu_irq_thread(int irq, void *data);
void mgpu_timeout_work(struct work_struct *work);

/* mgpu_drm_debugfs.c */
void mgpu_debugfs_init(struct mgpu_device *mgpu);

#endif /* MGPU_DRM_DRV_H */
