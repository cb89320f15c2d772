// SPDX-License-Identifier: GPL-2.0
/*
 * BOs of the mgpu DRM driver: each GEM object is backed by one device resource.
 *
 * A BO is placed in the BAR2 aperture (RES_PLACE) when the CPU first needs it: at
 * DRM_IOCTL_MGPU_BO_MMAP or at the first touch of a mapping.  The aperture may be
 * smaller than the device memory (a 64 MiB window over 256 MiB), so when PLACE finds
 * no room the least recently used placed BOs are evicted from the aperture until it
 * fits: their CPU mappings are zapped first, then RES_REMOVE unmaps them on the device
 * (their contents stay in device memory) and their next touch places them again.
 * The fault handler inserts aperture pages (write-combined PFNs), one per touch.
 */
#include <linux/dma-resv.h>
#include <linux/mm.h>
#include <linux/slab.h>

#include <drm/drm_file.h>
#include <drm/drm_print.h>
#include <drm/drm_vma_manager.h>

#include "mgpu_drm_drv.h"

/* Run one resource command (res_lock held, inside mgpu_enter); its status code. */
static u32 mgpu_res_command(struct mgpu_device *mgpu, u32 command, u32 handle, u64 size)
{
	lockdep_assert_held(&mgpu->res_lock);
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
	case MGPU_ERROR_NONE:
		return 0;
	case MGPU_ERROR_NO_MEMORY:
	case MGPU_ERROR_QUOTA_EXCEEDED:
	case MGPU_ERROR_NO_APERTURE_SPACE:
		return -ENOSPC;
	case MGPU_ERROR_INVALID_HANDLE:
		return -ENOENT;
	case MGPU_ERROR_INVALID_ARGUMENT:
		return -EINVAL;
	default:
		return -EIO;
	}
}

/* Give a BO a fresh device resource (res_lock held, inside mgpu_enter). */
int mgpu_bo_alloc_resource(struct mgpu_device *mgpu, struct mgpu_bo *bo)
{
	u32 status = mgpu_res_command(mgpu, MGPU_RES_CREATE, 0, bo->base.size);

	if (status) {
		drm_dbg(&mgpu->drm, "CREATE of %zu bytes failed: %s\n", bo->base.size,
			mgpu_error_name(status));
		return mgpu_status_errno(status);
	}
	bo->handle = rd(mgpu, MGPU_REG_RES_HANDLE);
	return 0;
}

/* Zap every CPU mapping of a BO: the next touch goes through our fault handler. */
void mgpu_bo_zap(struct mgpu_bo *bo)
{
	drm_vma_node_unmap(&bo->base.vma_node, bo->base.dev->anon_inode->i_mapping);
}

/* The BO is no longer placed (res_lock held): after a reset or an eviction. */
void mgpu_bo_forget_placement(struct mgpu_device *mgpu, struct mgpu_bo *bo)
{
	lockdep_assert_held(&mgpu->res_lock);
	if (bo->placed)
		list_del_init(&bo->lru);
	bo->placed = false;
}

/* Take a BO out of the aperture to make room (res_lock held, inside mgpu_enter). */
static void mgpu_bo_evict(struct mgpu_device *mgpu, struct mgpu_bo *bo)
{
	u32 status;

	mgpu_bo_zap(bo);	/* no CPU may touch pages about to map something else */
	status = mgpu_res_command(mgpu, MGPU_RES_REMOVE, bo->handle, 0);
	if (status)
		drm_warn(&mgpu->drm, "REMOVE of resource %u failed: %s\n", bo->handle,
			 mgpu_error_name(status));
	mgpu_bo_forget_placement(mgpu, bo);
	mgpu->evictions++;
	drm_dbg(&mgpu->drm, "resource %u evicted from the aperture\n", bo->handle);
}

/*
 * Place a BO in the aperture (res_lock held, inside mgpu_enter), evicting the least
 * recently used placed BOs while the aperture has no room for it.
 */
int mgpu_bo_place(struct mgpu_device *mgpu, struct mgpu_bo *bo)
{
	struct mgpu_bo *victim;
	u32 status;

	lockdep_assert_held(&mgpu->res_lock);
	if (bo->placed) {
		list_move_tail(&bo->lru, &mgpu->placed);
		return 0;
	}
	if (!bo->handle)
		return -ENODEV;
	for (;;) {
		status = mgpu_res_command(mgpu, MGPU_RES_PLACE, bo->handle, 0);
		if (status != MGPU_ERROR_NO_APERTURE_SPACE)
			break;
		victim = list_first_entry_or_null(&mgpu->placed, struct mgpu_bo, lru);
		if (!victim)
			break;
		mgpu_bo_evict(mgpu, victim);
	}
	if (status) {
		drm_err_ratelimited(&mgpu->drm, "PLACE of resource %u (%zu bytes) failed: %s\n",
				    bo->handle, bo->base.size, mgpu_error_name(status));
		return mgpu_status_errno(status);
	}
	bo->aperture_offset = rd64(mgpu, MGPU_REG_RES_OFFSET_LO);
	bo->placed = true;
	list_add_tail(&bo->lru, &mgpu->placed);
	return 0;
}

static void mgpu_bo_free(struct drm_gem_object *obj)
{
	struct mgpu_device *mgpu = to_mgpu(obj->dev);
	struct mgpu_bo *bo = to_bo(obj);
	u32 status;
	int idx;

	mutex_lock(&mgpu->res_lock);
	list_del(&bo->node);
	mgpu_bo_forget_placement(mgpu, bo);
	/* After unplug the registers are gone: the resource went with the device. */
	if (bo->handle && mgpu_enter(mgpu, &idx)) {
		/* No mapping is left (each held a reference); DESTROY also unmaps. */
		status = mgpu_res_command(mgpu, MGPU_RES_DESTROY, bo->handle, 0);
		if (status)
			drm_warn(&mgpu->drm, "DESTROY of resource %u failed: %s\n",
				 bo->handle, mgpu_error_name(status));
		mgpu_exit(idx);
	}
	mutex_unlock(&mgpu->res_lock);
	drm_gem_object_release(obj);
	kfree(bo);
}

static vm_fault_t mgpu_bo_fault(struct vm_fault *vmf)
{
	struct vm_area_struct *vma = vmf->vma;
	struct mgpu_bo *bo = to_bo(vma->vm_private_data);
	struct mgpu_device *mgpu = to_mgpu(bo->base.dev);
	unsigned long page = (vmf->address - vma->vm_start) >> PAGE_SHIFT;
	vm_fault_t ret = VM_FAULT_SIGBUS;
	int idx;

	if (page >= bo->base.size >> PAGE_SHIFT)
		return VM_FAULT_SIGBUS;
	if (!mgpu_enter(mgpu, &idx))
		return VM_FAULT_SIGBUS;
	/* res_lock orders us against evictions and recovery, which zap mappings. */
	mutex_lock(&mgpu->res_lock);
	if (!mgpu_bo_place(mgpu, bo))
		ret = vmf_insert_pfn(vma, vmf->address,
				     ((mgpu->aperture_base + bo->aperture_offset) >> PAGE_SHIFT)
				     + page);
	mutex_unlock(&mgpu->res_lock);
	mgpu_exit(idx);
	return ret;
}

const struct vm_operations_struct mgpu_bo_vm_ops = {
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

int mgpu_ioctl_bo_create(struct drm_device *drm, void *data, struct drm_file *file)
{
	struct mgpu_device *mgpu = to_mgpu(drm);
	struct drm_mgpu_bo_create *args = data;
	struct mgpu_bo *bo;
	u64 size;
	int ret, idx;

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
	INIT_LIST_HEAD(&bo->lru);

	ret = -ENODEV;
	if (mgpu_enter(mgpu, &idx)) {
		mutex_lock(&mgpu->res_lock);
		ret = READ_ONCE(mgpu->broken) ? -ENODEV : mgpu_bo_alloc_resource(mgpu, bo);
		if (!ret)
			list_add_tail(&bo->node, &mgpu->bos);
		mutex_unlock(&mgpu->res_lock);
		mgpu_exit(idx);
	}
	if (!ret)
		ret = drm_gem_create_mmap_offset(&bo->base);
	if (!ret)
		ret = drm_gem_handle_create(file, &bo->base, &args->handle);
	/* The handle holds the object now; on failure this frees it. */
	drm_gem_object_put(&bo->base);
	return ret;
}

int mgpu_ioctl_bo_mmap(struct drm_device *drm, void *data, struct drm_file *file)
{
	struct mgpu_device *mgpu = to_mgpu(drm);
	struct drm_mgpu_bo_mmap *args = data;
	struct drm_gem_object *obj;
	int ret = -ENODEV, idx;

	if (args->pad)
		return -EINVAL;
	obj = drm_gem_object_lookup(file, args->handle);
	if (!obj)
		return -ENOENT;
	if (mgpu_enter(mgpu, &idx)) {
		mutex_lock(&mgpu->res_lock);
		ret = mgpu_bo_place(mgpu, to_bo(obj));
		args->aperture_offset = to_bo(obj)->aperture_offset;
		mutex_unlock(&mgpu->res_lock);
		mgpu_exit(idx);
	}
	args->offset = drm_vma_node_offset_addr(&obj->vma_node);
	drm_gem_object_put(obj);
	return ret;
}

int mgpu_ioctl_bo_wait(struct drm_device *drm, void *data, struct drm_file *file)
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
