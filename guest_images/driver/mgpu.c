// SPDX-License-Identifier: GPL-2.0
/*
 * mgpu: a minimal guest kernel driver for the mgpu device, so guest programs get
 * what userspace alone cannot: interrupts, and DMA memory with a known bus address.
 *
 * For each device it enables MSI-X (or MSI) and bus mastering, counts interrupts per
 * vector, allocates a coherent DMA buffer, and exposes /dev/mgpuN:
 *   mmap(offset 0)      the DMA buffer (ring, fences, data)
 *   ioctl MGPU_INFO     its bus address and size, and the vector count
 *   ioctl MGPU_WAIT     sleep until a vector's interrupt count passes a value
 * Registers and the aperture stay in sysfs resourceN files, as for any PCI device.
 */
#include <linux/fs.h>
#include <linux/interrupt.h>
#include <linux/miscdevice.h>
#include <linux/module.h>
#include <linux/pci.h>
#include <linux/slab.h>
#include <linux/uaccess.h>
#include <linux/wait.h>

#include "mgpu_ioctl.h"
#include "mgpu_regs.h"

#define MGPU_VECTORS 4
#define MGPU_BUFFER_SIZE (4u << 20)

struct mgpu {
	struct pci_dev *pdev;
	struct miscdevice misc;
	char name[32];
	void *buffer;
	dma_addr_t bus;
	int vectors;
	atomic64_t count[MGPU_VECTORS];
	wait_queue_head_t wait;
};

static irqreturn_t mgpu_irq(int irq, void *data)
{
	struct mgpu *mgpu = data;
	int v;

	for (v = 0; v < mgpu->vectors; v++)
		if (pci_irq_vector(mgpu->pdev, v) == irq)
			atomic64_inc(&mgpu->count[v]);
	wake_up_interruptible(&mgpu->wait);
	return IRQ_HANDLED;
}

static struct mgpu *to_mgpu(struct file *file)
{
	return container_of(file->private_data, struct mgpu, misc);
}

static int mgpu_mmap(struct file *file, struct vm_area_struct *vma)
{
	struct mgpu *mgpu = to_mgpu(file);

	if (vma->vm_pgoff || vma->vm_end - vma->vm_start > MGPU_BUFFER_SIZE)
		return -EINVAL;
	return dma_mmap_coherent(&mgpu->pdev->dev, vma, mgpu->buffer, mgpu->bus,
				 vma->vm_end - vma->vm_start);
}

static long mgpu_ioctl(struct file *file, unsigned int cmd, unsigned long arg)
{
	struct mgpu *mgpu = to_mgpu(file);
	struct mgpu_info info;
	struct mgpu_wait wait;
	long left;

	switch (cmd) {
	case MGPU_INFO:
		info.bus_address = mgpu->bus;
		info.size = MGPU_BUFFER_SIZE;
		info.vectors = mgpu->vectors;
		info.reserved = 0;
		return copy_to_user((void __user *)arg, &info, sizeof(info)) ? -EFAULT : 0;
	case MGPU_WAIT:
		if (copy_from_user(&wait, (void __user *)arg, sizeof(wait)))
			return -EFAULT;
		if (wait.vector >= mgpu->vectors)
			return -EINVAL;
		left = wait_event_interruptible_timeout(mgpu->wait,
			atomic64_read(&mgpu->count[wait.vector]) > wait.after,
			msecs_to_jiffies(wait.timeout_ms));
		if (left < 0)
			return left;
		wait.count = atomic64_read(&mgpu->count[wait.vector]);
		if (copy_to_user((void __user *)arg, &wait, sizeof(wait)))
			return -EFAULT;
		return wait.count > wait.after ? 0 : -ETIMEDOUT;
	}
	return -ENOTTY;
}

static const struct file_operations mgpu_fops = {
	.owner = THIS_MODULE,
	.mmap = mgpu_mmap,
	.unlocked_ioctl = mgpu_ioctl,
};

static int mgpu_probe(struct pci_dev *pdev, const struct pci_device_id *id)
{
	static atomic_t instances = ATOMIC_INIT(0);
	struct mgpu *mgpu;
	int err, v;

	mgpu = devm_kzalloc(&pdev->dev, sizeof(*mgpu), GFP_KERNEL);
	if (!mgpu)
		return -ENOMEM;
	mgpu->pdev = pdev;
	init_waitqueue_head(&mgpu->wait);
	pci_set_drvdata(pdev, mgpu);

	err = pcim_enable_device(pdev);
	if (err)
		return err;
	pci_set_master(pdev);
	err = dma_set_mask_and_coherent(&pdev->dev, DMA_BIT_MASK(64));
	if (err)
		return err;
	mgpu->buffer = dmam_alloc_coherent(&pdev->dev, MGPU_BUFFER_SIZE, &mgpu->bus, GFP_KERNEL);
	if (!mgpu->buffer)
		return -ENOMEM;

	mgpu->vectors = pci_alloc_irq_vectors(pdev, 1, MGPU_VECTORS, PCI_IRQ_MSIX | PCI_IRQ_MSI);
	if (mgpu->vectors < 0)
		return mgpu->vectors;
	for (v = 0; v < mgpu->vectors; v++) {
		err = devm_request_irq(&pdev->dev, pci_irq_vector(pdev, v), mgpu_irq, 0,
				       "mgpu", mgpu);
		if (err)
			goto free_vectors;
	}

	snprintf(mgpu->name, sizeof(mgpu->name), "mgpu%d", atomic_inc_return(&instances) - 1);
	mgpu->misc.minor = MISC_DYNAMIC_MINOR;
	mgpu->misc.name = mgpu->name;
	mgpu->misc.fops = &mgpu_fops;
	mgpu->misc.parent = &pdev->dev;
	err = misc_register(&mgpu->misc);
	if (err)
		goto free_vectors;
	dev_info(&pdev->dev, "%s: %d %s vectors, DMA buffer at %pad\n", mgpu->name,
		 mgpu->vectors, pdev->msix_enabled ? "MSI-X" : "MSI", &mgpu->bus);
	return 0;

free_vectors:
	for (v--; v >= 0; v--)
		devm_free_irq(&pdev->dev, pci_irq_vector(pdev, v), mgpu);
	pci_free_irq_vectors(pdev);
	return err;
}

static void mgpu_remove(struct pci_dev *pdev)
{
	struct mgpu *mgpu = pci_get_drvdata(pdev);
	int v;

	misc_deregister(&mgpu->misc);
	for (v = 0; v < mgpu->vectors; v++)
		devm_free_irq(&pdev->dev, pci_irq_vector(pdev, v), mgpu);
	pci_free_irq_vectors(pdev);
}

static const struct pci_device_id mgpu_ids[] = {
	{ PCI_DEVICE(MGPU_VENDOR_ID, MGPU_DEVICE_ID) },
	{ }
};
MODULE_DEVICE_TABLE(pci, mgpu_ids);

static struct pci_driver mgpu_driver = {
	.name = "mgpu",
	.id_table = mgpu_ids,
	.probe = mgpu_probe,
	.remove = mgpu_remove,
};
module_pci_driver(mgpu_driver);

MODULE_DESCRIPTION("Minimal driver for the mgpu emulated GPU: interrupts and DMA memory");
MODULE_LICENSE("GPL");
