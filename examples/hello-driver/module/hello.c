// SPDX-License-Identifier: GPL-2.0
/*
 * hello: the smallest out-of-tree module for the mgpu guest.  It binds nothing: on
 * load it counts the mgpu GPUs (PCI 1234:4d47) on the bus and says so in the kernel
 * log; on unload it says goodbye.
 */
#include <linux/module.h>
#include <linux/pci.h>

#define MGPU_VENDOR 0x1234
#define MGPU_DEVICE 0x4d47

static int __init hello_init(void)
{
	struct pci_dev *pdev = NULL;
	int gpus = 0;

	while ((pdev = pci_get_device(MGPU_VENDOR, MGPU_DEVICE, pdev)))
		gpus++;
	pr_info("hello: loaded, %d mgpu GPU(s)\n", gpus);
	return 0;
}

static void __exit hello_exit(void)
{
	pr_info("hello: goodbye\n");
}

module_init(hello_init);
module_exit(hello_exit);
MODULE_DESCRIPTION("mgpu example: an out-of-tree module loaded through run_qemu.sh --share");
MODULE_LICENSE("GPL");
