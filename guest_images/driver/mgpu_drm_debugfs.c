// SPDX-License-Identifier: GPL-2.0
/* debugfs of the mgpu DRM driver: dri/N/{ring,bos,faults,errors}. */
#include <linux/seq_file.h>

#include <drm/drm_debugfs.h>

#include "mgpu_drm_drv.h"

static int mgpu_debugfs_ring(struct seq_file *m, void *unused)
{
	struct drm_debugfs_entry *entry = m->private;
	struct mgpu_device *mgpu = to_mgpu(entry->dev);
	struct mgpu_job *job;
	int idx;

	mutex_lock(&mgpu->ring_lock);
	seq_printf(m, "ring 0: bus 0x%llx size %u\n", (u64)mgpu->ring_bus, MGPU_RING_SIZE);
	if (mgpu_enter(mgpu, &idx)) {
		seq_printf(m, "head 0x%x tail 0x%x (driver tail 0x%x) status %u\n",
			   rd(mgpu, MGPU_REG_CTX0_RING_HEAD), rd(mgpu, MGPU_REG_CTX0_RING_TAIL),
			   mgpu->tail, rd(mgpu, MGPU_REG_CTX0_RING_STATUS));
		seq_printf(m, "fence register %llu, fence word %llu, last seqno %llu\n",
			   rd64(mgpu, MGPU_REG_CTX0_FENCE_LO), READ_ONCE(*mgpu->fence_word),
			   mgpu->next_seqno);
		mgpu_exit(idx);
	} else {
		seq_puts(m, "device unplugged\n");
	}
	seq_printf(m, "slots used %u of %u\n", mgpu->used, (u32)MGPU_RING_SLOTS);
	seq_printf(m, "submitted %llu completed %llu failed %llu timeouts %llu resets %llu\n",
		   mgpu->submitted, mgpu->completed, mgpu->failed, mgpu->timeouts,
		   mgpu->resets);
	seq_printf(m, "timeout_ms %u%s\n", mgpu_timeout_ms, mgpu->broken ? " BROKEN" : "");
	list_for_each_entry(job, &mgpu->jobs, node)
		seq_printf(m, "job %llu: ring [0x%x, 0x%x) %u BOs, due in %d ms\n",
			   job->fence.seqno, job->start, job->end, job->nbos,
			   jiffies_to_msecs(job->deadline - jiffies));
	mutex_unlock(&mgpu->ring_lock);
	return 0;
}

static int mgpu_debugfs_bos(struct seq_file *m, void *unused)
{
	struct drm_debugfs_entry *entry = m->private;
	struct mgpu_device *mgpu = to_mgpu(entry->dev);
	struct mgpu_bo *bo;
	unsigned int n = 0;
	u64 bytes = 0;
	int idx;

	mutex_lock(&mgpu->res_lock);
	if (mgpu_enter(mgpu, &idx)) {
		seq_printf(m, "device: %u resources, %llu bytes free of %llu\n",
			   rd(mgpu, MGPU_REG_RESOURCE_COUNT), rd64(mgpu, MGPU_REG_MEM_FREE_LO),
			   rd64(mgpu, MGPU_REG_MEM_QUOTA_LO));
		mgpu_exit(idx);
	}
	list_for_each_entry(bo, &mgpu->bos, node) {
		seq_printf(m, "resource %u: %zu bytes, %s 0x%llx, %u handles\n", bo->handle,
			   bo->base.size, bo->placed ? "placed at" : "not placed",
			   bo->placed ? bo->aperture_offset : 0, bo->base.handle_count);
		n++;
		bytes += bo->base.size;
	}
	seq_printf(m, "%u BOs, %llu bytes; %llu aperture evictions\n", n, bytes,
		   mgpu->evictions);
	mutex_unlock(&mgpu->res_lock);
	return 0;
}

static int mgpu_debugfs_faults(struct seq_file *m, void *unused)
{
	struct drm_debugfs_entry *entry = m->private;
	struct mgpu_device *mgpu = to_mgpu(entry->dev);
	struct mgpu_fault log[MGPU_FAULT_LOG];
	unsigned int i, first, next;
	u64 faults;

	spin_lock(&mgpu->fault_lock);
	memcpy(log, mgpu->fault_log, sizeof(log));
	next = mgpu->fault_next;
	faults = mgpu->faults;
	spin_unlock(&mgpu->fault_lock);
	seq_printf(m, "faults %llu\n", faults);
	first = next > MGPU_FAULT_LOG ? next - MGPU_FAULT_LOG : 0;
	for (i = first; i < next; i++) {
		struct mgpu_fault *f = &log[i % MGPU_FAULT_LOG];

		seq_printf(m, "%lld.%06lld %s offset 0x%llx count %u\n",
			   ktime_to_us(f->when) / USEC_PER_SEC,
			   ktime_to_us(f->when) % USEC_PER_SEC,
			   f->write ? "write" : "read", f->offset, f->count);
	}
	return 0;
}

static int mgpu_debugfs_errors(struct seq_file *m, void *unused)
{
	struct drm_debugfs_entry *entry = m->private;
	struct mgpu_device *mgpu = to_mgpu(entry->dev);
	unsigned int i;
	int idx;

	mutex_lock(&mgpu->ring_lock);
	if (mgpu_enter(mgpu, &idx)) {
		seq_printf(m, "device ERROR_COUNT %u, ", rd(mgpu, MGPU_REG_ERROR_COUNT));
		mgpu_exit(idx);
	}
	seq_printf(m, "last %s at ring offset 0x%x\n", mgpu_error_name(mgpu->last_error),
		   mgpu->last_error_offset);
	for (i = 1; i < ARRAY_SIZE(mgpu->error_counts); i++)
		if (mgpu->error_counts[i])
			seq_printf(m, "%s %llu\n", mgpu_error_name(i), mgpu->error_counts[i]);
	mutex_unlock(&mgpu->ring_lock);
	return 0;
}

static const struct drm_debugfs_info mgpu_debugfs_files[] = {
	{ "ring", mgpu_debugfs_ring, 0 },
	{ "bos", mgpu_debugfs_bos, 0 },
	{ "faults", mgpu_debugfs_faults, 0 },
	{ "errors", mgpu_debugfs_errors, 0 },
};

void mgpu_debugfs_init(struct mgpu_device *mgpu)
{
	drm_debugfs_add_files(&mgpu->drm, mgpu_debugfs_files, ARRAY_SIZE(mgpu_debugfs_files));
}
