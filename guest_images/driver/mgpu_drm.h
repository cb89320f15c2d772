/* SPDX-License-Identifier: MIT */
/*
 * mgpu_drm.h: the user-space API of the mgpu DRM driver (driver/mgpu_drm_drv.c and its parts).
 *
 * The device (docs/registers.md) has device memory split into *resources*, a BAR2
 * aperture through which placed resources are reached by the CPU, and command rings
 * the engine executes.  The driver exposes it as a render node (/dev/dri/renderD*):
 *
 *   GEM buffer objects   DRM_IOCTL_MGPU_BO_CREATE makes a BO backed by one device
 *                        resource (its contents start zeroed).  DRM_IOCTL_GEM_CLOSE
 *                        (core DRM) drops the handle; the resource is destroyed when
 *                        the last reference (handle, mmap, running job) goes.
 *   CPU access           DRM_IOCTL_MGPU_BO_MMAP places the BO in the aperture and
 *                        returns a fake offset for mmap(2) on the DRM fd.  Pages
 *                        are inserted by the driver's fault handler, write-combined,
 *                        straight onto the aperture (BAR2): no copy, no shadow.  When
 *                        the aperture is full (it may be smaller than the device
 *                        memory), the least recently used BOs are taken out of it
 *                        (their mappings are zapped, their contents kept) and placed
 *                        again at their next touch.
 *   Submission           DRM_IOCTL_MGPU_SUBMIT copies an array of engine commands
 *                        (struct drm_mgpu_command), translates the GEM handles they
 *                        name into device handles, writes them to the ring followed by
 *                        a FENCE, and returns the job's dma_fence in a syncobj and/or a
 *                        sync_file.  The fence signals from the FENCE interrupt.
 *                        Every BO a job names gets the fence in its reservation object
 *                        (implicit sync) and is held until the job ends.
 *   Waiting              DRM_IOCTL_MGPU_BO_WAIT waits for a BO to be idle; core DRM's
 *                        DRM_IOCTL_SYNCOBJ_WAIT and poll(2) on the sync_file also work.
 *
 * Errors a job meets are reported in its fence (dma_fence error, visible as a negative
 * sync_file status; see SYNC_IOC_FILE_INFO):
 *   -EIO        a command failed on the device (bad bounds, bad argument...); the
 *               driver logs the decoded error, restarts the ring, and later jobs run.
 *   -ETIMEDOUT  the job did not finish within the mgpu_drm.timeout_ms module parameter;
 *               the driver resets the device.  A reset destroys all device memory:
 *               every BO is re-created (same size, zeroed, placed again) and
 *               MGPU_PARAM_RESET_COUNT increments, so a client can tell its BO
 *               contents were lost (like amdgpu's VRAM-lost counter).
 *   -ECANCELED  a job queued behind a failed or timed-out one; it did not run.
 *
 * All structures are 64-bit aligned, padded explicitly; reserved/pad fields must be 0.
 */
#ifndef MGPU_DRM_H
#define MGPU_DRM_H

#include "drm.h"

#if defined(__cplusplus)
extern "C" {
#endif

#define DRM_MGPU_GET_PARAM	0x00
#define DRM_MGPU_BO_CREATE	0x01
#define DRM_MGPU_BO_MMAP	0x02
#define DRM_MGPU_SUBMIT		0x03
#define DRM_MGPU_BO_WAIT	0x04

/* Parameters of DRM_IOCTL_MGPU_GET_PARAM. */
enum drm_mgpu_param {
	MGPU_PARAM_DEVICE_VERSION = 0,	/* VERSION register: major << 16 | minor */
	MGPU_PARAM_APERTURE_SIZE = 1,	/* bytes of BAR2 */
	MGPU_PARAM_MEM_QUOTA = 2,	/* bytes of device memory this instance may use */
	MGPU_PARAM_MEM_FREE = 3,	/* bytes of that quota not used by resources */
	MGPU_PARAM_CONTEXTS = 4,	/* hardware contexts (the driver uses context 0) */
	MGPU_PARAM_RESOURCE_COUNT = 5,	/* live device resources */
	MGPU_PARAM_RESET_COUNT = 6,	/* device resets the driver did (BO contents lost) */
	MGPU_PARAM_MAX_COMMANDS = 7,	/* most commands one DRM_IOCTL_MGPU_SUBMIT takes */
	MGPU_PARAM_APERTURE_EVICTIONS = 8,	/* BOs taken out of a full aperture (1.1) */
};

/**
 * struct drm_mgpu_get_param - read a device or driver parameter
 * @param: in, an enum drm_mgpu_param (-EINVAL if unknown)
 * @pad: must be 0
 * @value: out
 */
struct drm_mgpu_get_param {
	__u32 param;
	__u32 pad;
	__u64 value;
};

/**
 * struct drm_mgpu_bo_create - make a BO backed by a device resource
 * @size: in, bytes (> 0); rounded up to a page.  -EINVAL if 0, -ENOSPC if the
 *	instance's memory quota (or the physical GPU's memory) cannot hold it
 * @flags: must be 0
 * @handle: out, the GEM handle
 */
struct drm_mgpu_bo_create {
	__u64 size;
	__u32 flags;
	__u32 handle;
};

/**
 * struct drm_mgpu_bo_mmap - make a BO CPU-visible
 * @handle: in, a GEM handle (-ENOENT if unknown)
 * @pad: must be 0
 * @offset: out, the fake offset to pass to mmap(2) on the DRM fd
 * @aperture_offset: out, where the BO lives in BAR2 now (for debugging and tests:
 *	the offset may change after an eviction or a device reset)
 */
struct drm_mgpu_bo_mmap {
	__u32 handle;
	__u32 pad;
	__u64 offset;
	__u64 aperture_offset;
};

/*
 * Engine commands a job may contain (the device's opcodes; docs/registers.md gives
 * the arguments).  Arguments naming a resource carry a GEM handle of this file; the
 * driver puts the device handle in its place.  WRITE_RESOURCE, READ_RESOURCE and FENCE
 * are refused (-EINVAL): they take guest physical addresses, which only the driver may
 * give the device; use mmap for CPU access.
 */
#define MGPU_CMD_NOP		0x00
#define MGPU_CMD_COPY		0x03	/* src_bo, src_offset, dst_bo, dst_offset, length */
#define MGPU_CMD_FILL		0x04	/* bo, offset, length, value (u32) */
#define MGPU_CMD_BLIT		0x05	/* src_bo, src_off, src_pitch, dst_bo, dst_off,
					 * dst_pitch, width | height << 32 */
#define MGPU_CMD_SAXPY		0x06	/* x_bo, x_offset, y_bo, y_offset, count, alpha */
#define MGPU_CMD_MATMUL		0x07	/* a_bo, b_bo, c_bo, m, n, k (float32) */

/**
 * struct drm_mgpu_command - one engine command, the ring's 64-byte format
 * @opcode: an MGPU_CMD_* value
 * @flags: must be 0
 * @args: the command's arguments, GEM handles where it names a resource
 */
struct drm_mgpu_command {
	__u32 opcode;
	__u32 flags;
	__u64 args[7];
};

/* Flags of struct drm_mgpu_submit. */
#define MGPU_SUBMIT_OUT_SYNC_FILE	(1 << 0)	/* return a sync_file fd */
#define MGPU_SUBMIT_FLAGS		MGPU_SUBMIT_OUT_SYNC_FILE

/**
 * struct drm_mgpu_submit - run a job: commands, then a fence
 * @commands: in, user pointer to @count struct drm_mgpu_command
 * @count: in, 1..MGPU_PARAM_MAX_COMMANDS (-EINVAL otherwise)
 * @flags: in, MGPU_SUBMIT_* flags
 * @in_syncobj: in, a syncobj whose fence must signal before the job is queued, or 0
 * @out_syncobj: in, a syncobj that receives the job's fence, or 0
 * @out_fence_fd: out, a sync_file fd for the job's fence with
 *	MGPU_SUBMIT_OUT_SYNC_FILE, else -1
 * @pad: must be 0
 * @seqno: out, the job's fence sequence number (debugfs shows it)
 *
 * Returns -ENOENT for an unknown GEM handle or syncobj, -EINVAL for a bad opcode,
 * flags or count, -ENODEV while the device is being reset and could not recover.
 */
struct drm_mgpu_submit {
	__u64 commands;
	__u32 count;
	__u32 flags;
	__u32 in_syncobj;
	__u32 out_syncobj;
	__s32 out_fence_fd;
	__u32 pad;
	__u64 seqno;
};

/**
 * struct drm_mgpu_bo_wait - wait until no job uses a BO
 * @handle: in, a GEM handle (-ENOENT if unknown)
 * @pad: must be 0
 * @timeout_ns: in, relative timeout; 0 only polls.  -ETIME if the BO is still busy
 */
struct drm_mgpu_bo_wait {
	__u32 handle;
	__u32 pad;
	__s64 timeout_ns;
};

#define DRM_IOCTL_MGPU_GET_PARAM	DRM_IOWR(DRM_COMMAND_BASE + DRM_MGPU_GET_PARAM, \
						 struct drm_mgpu_get_param)
#define DRM_IOCTL_MGPU_BO_CREATE	DRM_IOWR(DRM_COMMAND_BASE + DRM_MGPU_BO_CREATE, \
						 struct drm_mgpu_bo_create)
#define DRM_IOCTL_MGPU_BO_MMAP		DRM_IOWR(DRM_COMMAND_BASE + DRM_MGPU_BO_MMAP, \
						 struct drm_mgpu_bo_mmap)
#define DRM_IOCTL_MGPU_SUBMIT		DRM_IOWR(DRM_COMMAND_BASE + DRM_MGPU_SUBMIT, \
						 struct drm_mgpu_submit)
#define DRM_IOCTL_MGPU_BO_WAIT		DRM_IOW(DRM_COMMAND_BASE + DRM_MGPU_BO_WAIT, \
						struct drm_mgpu_bo_wait)

#if defined(__cplusplus)
}
#endif

#endif /* MGPU_DRM_H */
