/* SPDX-License-Identifier: GPL-2.0 */
/* The /dev/mgpuN interface of the mgpu guest driver (driver/mgpu.c). */
#ifndef MGPU_IOCTL_H
#define MGPU_IOCTL_H

#include <linux/ioctl.h>
#include <linux/types.h>

struct mgpu_info {
	__u64 bus_address; /* of the DMA buffer mmap(offset 0) maps */
	__u64 size;
	__u32 vectors;     /* interrupt vectors enabled (MSI-X or MSI) */
	__u32 reserved;
};

struct mgpu_wait {
	__u32 vector;      /* in */
	__u32 timeout_ms;  /* in */
	__u64 after;       /* in: wait until the vector's count exceeds this */
	__u64 count;       /* out: the count when the wait ended */
};

#define MGPU_INFO _IOR('M', 1, struct mgpu_info)
#define MGPU_WAIT _IOWR('M', 2, struct mgpu_wait)

#endif
