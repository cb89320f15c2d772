// SPDX-License-Identifier: GPL-2.0
/*
 * mgpu_drm: the reference DRM driver for the mgpu mediated GPU.
 *
 * The device (docs/registers.md) gives us:
 *   BAR0  trapped registers: resource commands, interrupts, errors, faults, rings
 *   BAR2  the aperture: device memory, a resource appears where PLACE puts it
 *   MSI-X vectors 0..3 for the FENCE, ERROR, DMA and FAULT interrupt causes
 *
 * What the driver builds on that, one file per part (mgpu_drm_drv.h draws them and
 * their locks):
 *   - a render node with GEM objects, each backed by one device resource, placed in
 *     the aperture when the CPU needs it and mmap()ed through our own fault handler
 *     (mgpu_drm_gem.c);
 *   - a submit ioctl whose jobs run on one kernel ring and return dma_fences in
 *     syncobjs, sync_files and the BOs' reservations (mgpu_drm_submit.c);
 *   - errors decoded and jobs failed, denied aperture accesses logged, hung jobs
 *     ending in a device reset and recovery (mgpu_drm_ring.c);
 *   - debugfs (dri/N/): ring, bos, faults, errors (mgpu_drm_debugfs.c).
 * This file binds the PCI device and answers DRM_IOCTL_MGPU_GET_PARAM.
 */
#include <linux/dma-mapping.h>
#include <linux/interrupt.h>
#include <linux/module.h>

#include <drm/drm_file.h>
#include <drm/drm_ioctl.h>
#include <drm/drm_print.h>

#include "mgpu_drm_drv.h"

unsigned int mgpu_timeout_ms = 2000;
module_param_named(timeout_ms, mgpu_timeout_ms, uint, 0644);
MODULE_PARM_DESC(timeout_ms, "Time a job may run before the device is reset (ms, default 2000)");

#define MGPU_NAME_ENTRY(name, code) [code] = #name,
static const char *const mgpu_error_names[MGPU_ERROR_CODES] = {
	MGPU_FOR_EACH_ERROR(MGPU_NAME_ENTRY)
};
#undef MGPU_NAME_ENTRY

#define MGPU_OP_NAME_ENTRY(name, op, nargs, handles, guest_addrs) [op] = #name,
static const char *const mgpu_op_names[MGPU_OPCODES] = {
	MGPU_FOR_EACH_OP(MGPU_OP_NAME_ENTRY)
};
#undef MGPU_OP_NAME_ENTRY

const char *mgpu_error_name(u32 code)
{
	return code < ARRAY_SIZE(mgpu_error_names) && mgpu_error_names[code] ?
	       mgpu_error_names[code] : "UNKNOWN";
}

const char *mgpu_op_name(u32 op)
{
	return op < ARRAY_SIZE(mgpu_op_names) && mgpu_op_names[op] ? mgpu_op_names[op] : "?";
}

/* A 64-bit register pair that changes with resources: read under res_lock. */
static u64 mgpu_read_resource_reg(struct mgpu_device *mgpu, u32 reg)
{
	u64 value;

	mutex_lock(&mgpu->res_lock);
	value = reg == MGPU_REG_RESOURCE_COUNT ? rd(mgpu, reg) : rd64(mgpu, reg);
	mutex_unlock(&mgpu->res_lock);
	return value;
}

static int mgpu_ioctl_get_param(struct drm_device *drm, void *data, struct drm_file *file)
{
	struct mgpu_device *mgpu = to_mgpu(drm);
	struct drm_mgpu_get_param *args = data;
	int ret = 0, idx;

	if (args->pad)
		return -EINVAL;
	if (!mgpu_enter(mgpu, &idx))
		return -ENODEV;
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
		args->value = mgpu_read_resource_reg(mgpu, MGPU_REG_MEM_FREE_LO);
		break;
	case MGPU_PARAM_CONTEXTS:
		args->value = mgpu->contexts;
		break;
	case MGPU_PARAM_RESOURCE_COUNT:
		args->value = mgpu_read_resource_reg(mgpu, MGPU_REG_RESOURCE_COUNT);
		break;
	case MGPU_PARAM_RESET_COUNT:
		args->value = READ_ONCE(mgpu->resets);
		break;
	case MGPU_PARAM_MAX_COMMANDS:
		args->value = MGPU_MAX_COMMANDS;
		break;
	case MGPU_PARAM_APERTURE_EVICTIONS:
		args->value = READ_ONCE(mgpu->evictions);
		break;
	default:
		ret = -EINVAL;
	}
	mgpu_exit(idx);
	return ret;
}

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
	.minor = 1,
};

/* Stop the device from interrupting or running the ring (probe and remove only). */
static void mgpu_hw_fini(struct mgpu_device *mgpu)
{
	wr(mgpu, MGPU_REG_INT_MASK, 0xffffffff);
	wr(mgpu, MGPU_REG_CTX0_RING_CONTROL, 0);
}

static void mgpu_init_state(struct mgpu_device *mgpu)
{
	mutex_init(&mgpu->ring_lock);
	mutex_init(&mgpu->res_lock);
	spin_lock_init(&mgpu->irq_lock);
	spin_lock_init(&mgpu->fault_lock);
	spin_lock_init(&mgpu->fence_lock);
	INIT_LIST_HEAD(&mgpu->bos);
	INIT_LIST_HEAD(&mgpu->placed);
	INIT_LIST_HEAD(&mgpu->jobs);
	INIT_LIST_HEAD(&mgpu->retired);
	init_waitqueue_head(&mgpu->ring_space);
	INIT_DELAYED_WORK(&mgpu->timeout, mgpu_timeout_work);
	mgpu->fence_context = dma_fence_context_alloc(1);
}

/* Map the registers, check the device, reset it; 0 or an errno. */
static int mgpu_hw_init(struct mgpu_device *mgpu)
{
	struct pci_dev *pdev = mgpu->pdev;
	struct drm_device *drm = &mgpu->drm;
	int ret;

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
	return mgpu_reset_device(mgpu);
}

static int mgpu_request_irqs(struct mgpu_device *mgpu)
{
	struct pci_dev *pdev = mgpu->pdev;
	int ret, v;

	mgpu->vectors = pci_alloc_irq_vectors(pdev, 1, MGPU_VECTORS, PCI_IRQ_MSIX | PCI_IRQ_MSI);
	if (mgpu->vectors < 0)
		return mgpu->vectors;
	for (v = 0; v < mgpu->vectors; v++) {
		ret = devm_request_threaded_irq(&pdev->dev, pci_irq_vector(pdev, v), NULL,
						mgpu_irq_thread, IRQF_ONESHOT, "mgpu_drm", mgpu);
		if (ret)
			goto err;
	}
	return 0;
err:
	for (v--; v >= 0; v--)
		devm_free_irq(&pdev->dev, pci_irq_vector(pdev, v), mgpu);
	pci_free_irq_vectors(pdev);
	return ret;
}

static void mgpu_free_irqs(struct mgpu_device *mgpu)
{
	int v;

	for (v = 0; v < mgpu->vectors; v++)
		devm_free_irq(&mgpu->pdev->dev, pci_irq_vector(mgpu->pdev, v), mgpu);
	pci_free_irq_vectors(mgpu->pdev);
}

static int mgpu_pci_probe(struct pci_dev *pdev, const struct pci_device_id *id)
{
	struct mgpu_device *mgpu;
	struct drm_device *drm;
	void *ring;
	int ret;

	mgpu = devm_drm_dev_alloc(&pdev->dev, &mgpu_drm_driver, struct mgpu_device, drm);
	if (IS_ERR(mgpu))
		return PTR_ERR(mgpu);
	drm = &mgpu->drm;
	mgpu->pdev = pdev;
	pci_set_drvdata(pdev, mgpu);
	mgpu_init_state(mgpu);
	ret = mgpu_hw_init(mgpu);
	if (ret)
		return ret;

	ring = dmam_alloc_coherent(&pdev->dev, MGPU_RING_SIZE + PAGE_SIZE, &mgpu->ring_bus,
				   GFP_KERNEL);
	if (!ring)
		return -ENOMEM;
	mgpu->ring = ring;
	mgpu->fence_word = ring + MGPU_RING_SIZE;
	ret = mgpu_request_irqs(mgpu);
	if (ret)
		return ret;

	mutex_lock(&mgpu->ring_lock);
	wr(mgpu, MGPU_REG_INT_ACK, 0xffffffff);
	wr(mgpu, MGPU_REG_INT_MASK, 0);
	mgpu_ring_start(mgpu);
	mutex_unlock(&mgpu->ring_lock);

	mgpu_debugfs_init(mgpu);
	ret = drm_dev_register(drm, 0);
	if (ret)
		goto err_hw;
	drm_info(drm, "mgpu %u.%u at %s: %llu MiB aperture, %u contexts, %d %s vectors; render node /dev/dri/renderD%d\n",
		 rd(mgpu, MGPU_REG_VERSION) >> 16, rd(mgpu, MGPU_REG_VERSION) & 0xffff,
		 pci_name(pdev), mgpu->aperture_size >> 20, mgpu->contexts, mgpu->vectors,
		 pdev->msix_enabled ? "MSI-X" : "MSI", drm->render ? drm->render->index : -1);
	return 0;

err_hw:
	mgpu_hw_fini(mgpu);
	mgpu_free_irqs(mgpu);
	return ret;
}

static void mgpu_pci_remove(struct pci_dev *pdev)
{
	struct mgpu_device *mgpu = pci_get_drvdata(pdev);

	/* From here mgpu_enter() fails: nothing but us touches the registers again. */
	drm_dev_unplug(&mgpu->drm);
	mutex_lock(&mgpu->ring_lock);
	mgpu_hw_fini(mgpu);
	mgpu_fail_jobs(mgpu, -ENODEV);
	WRITE_ONCE(mgpu->broken, true);
	mutex_unlock(&mgpu->ring_lock);
	wake_up_all(&mgpu->ring_space);
	cancel_delayed_work_sync(&mgpu->timeout);
	mgpu_reap(mgpu);
	mgpu_free_irqs(mgpu);
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
