/*
 * mgpu-drm-test: IGT-style tests of the mgpu DRM driver (driver/mgpu_drm_*.c) through
 * its render node and its uAPI (driver/mgpu_drm.h), failure cases included.
 *
 *   mgpu-drm-test [SUBTEST...]   run the named subtests (default: all, in order)
 *   mgpu-drm-test --list         list the subtests
 *
 * Each subtest prints "MGPU-RESULT subtest_<name>=pass|fail", dashes in the name
 * written as underscores (failures also say
 * which check failed on stderr); a few figures and facts follow as MGPU-RESULT lines.
 * The exit status is 0 only if every subtest passed.
 *
 * The hang subtest needs a job that honestly runs longer than the driver's timeout:
 * it sets /sys/module/mgpu_drm/parameters/timeout_ms to HANG_TIMEOUT_MS and submits
 * HANG_MATMULS 2048x2048x2048 float32 MATMULs in one job (about 0.1 s each on the
 * host), expects the job's fence to fail with -ETIMEDOUT, the device to be reset
 * (MGPU_PARAM_RESET_COUNT + 1), its BOs to come back zeroed and usable, and restores
 * the timeout.
 *
 * The stray-aperture-access subtest touches the aperture outside every BO on purpose:
 * under the instance's "sigbus" denied-access policy that kills the VM, so it is
 * skipped when the kernel command line says mgpu.denied=sigbus (run_qemu.sh passes
 * the policy it serves with; its default, "report", lets the device report it).
 * The unbind-with-open-bo subtest unbinds the driver from the device while a BO and its
 * mapping are still open, closes them, and binds the driver again.
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <time.h>
#include <unistd.h>

#include <linux/sync_file.h>

#include "../driver/mgpu_drm.h"
#include "../driver/mgpu_regs.h"

#define HANG_TIMEOUT_MS 100
#define HANG_MATMULS 16
#define TIMEOUT_PARAM "/sys/module/mgpu_drm/parameters/timeout_ms"

static int fd = -1;
static int failed_checks;

#define CHECK(cond)                                                                  \
    do {                                                                             \
        if (!(cond)) {                                                               \
            fprintf(stderr, "mgpu-drm-test: %s:%d: check failed: %s (errno %d: %s)\n", \
                    __func__, __LINE__, #cond, errno, strerror(errno));              \
            failed_checks++;                                                         \
            return;                                                                  \
        }                                                                            \
    } while (0)

/* An ioctl that must fail with a given errno. */
#define CHECK_ERR(request, arg, err) CHECK(ioctl(fd, request, arg) == -1 && errno == (err))

/* Progress in the kernel log (the serial console): where a stalled run stopped. */
static int kmsg = -1;

static void step(const char *where, const char *what)
{
    char line[160];
    int n = snprintf(line, sizeof(line), "<5>mgpu-drm-test: %s: %s\n", where, what);
    if (kmsg >= 0 && n > 0)
        (void)!write(kmsg, line, (size_t)n < sizeof(line) ? (size_t)n : sizeof(line) - 1);
}
#define STEP(what) step(__func__, what)

static double now_us(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1e6 + ts.tv_nsec / 1e3;
}

static uint64_t param(uint32_t which)
{
    struct drm_mgpu_get_param p = { .param = which };
    if (ioctl(fd, DRM_IOCTL_MGPU_GET_PARAM, &p)) {
        fprintf(stderr, "mgpu-drm-test: GET_PARAM %u: %s\n", which, strerror(errno));
        exit(1);
    }
    return p.value;
}

static uint32_t bo_create(uint64_t size)
{
    struct drm_mgpu_bo_create c = { .size = size };
    if (ioctl(fd, DRM_IOCTL_MGPU_BO_CREATE, &c)) {
        fprintf(stderr, "mgpu-drm-test: BO_CREATE %" PRIu64 ": %s\n", size, strerror(errno));
        exit(1);
    }
    return c.handle;
}

static int gem_close(uint32_t handle)
{
    struct drm_gem_close c = { .handle = handle };
    return ioctl(fd, DRM_IOCTL_GEM_CLOSE, &c);
}

static void *bo_map(uint32_t handle, size_t size)
{
    struct drm_mgpu_bo_mmap m = { .handle = handle };
    if (ioctl(fd, DRM_IOCTL_MGPU_BO_MMAP, &m))
        return MAP_FAILED;
    return mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, m.offset);
}

static uint32_t syncobj_create(void)
{
    struct drm_syncobj_create c = { 0 };
    if (ioctl(fd, DRM_IOCTL_SYNCOBJ_CREATE, &c)) {
        perror("mgpu-drm-test: SYNCOBJ_CREATE");
        exit(1);
    }
    return c.handle;
}

static void syncobj_destroy(uint32_t handle)
{
    struct drm_syncobj_destroy d = { .handle = handle };
    ioctl(fd, DRM_IOCTL_SYNCOBJ_DESTROY, &d);
}

static int syncobj_wait(uint32_t handle, int64_t timeout_ms)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    struct drm_syncobj_wait w = {
        .handles = (uintptr_t)&handle,
        .count_handles = 1,
        .timeout_nsec = ts.tv_sec * 1000000000ll + ts.tv_nsec + timeout_ms * 1000000ll,
    };
    return ioctl(fd, DRM_IOCTL_SYNCOBJ_WAIT, &w);
}

/* Submit; returns 0 or -errno.  out: the sync_file fd when asked for. */
static int submit(struct drm_mgpu_command *cmds, uint32_t count, uint32_t flags,
                  uint32_t in_sync, uint32_t out_sync, int *out_fd)
{
    struct drm_mgpu_submit s = {
        .commands = (uintptr_t)cmds, .count = count, .flags = flags,
        .in_syncobj = in_sync, .out_syncobj = out_sync,
    };
    if (ioctl(fd, DRM_IOCTL_MGPU_SUBMIT, &s))
        return -errno;
    if (out_fd)
        *out_fd = s.out_fence_fd;
    return 0;
}

/* Wait for a sync_file and return its status: 1 signalled, <0 the fence's error. */
static int sync_file_status(int sf, int timeout_ms)
{
    struct pollfd p = { .fd = sf, .events = POLLIN };
    struct sync_file_info info = { 0 };
    if (poll(&p, 1, timeout_ms) != 1)
        return 0;
    if (ioctl(sf, SYNC_IOC_FILE_INFO, &info))
        return -1000;
    return info.status;
}

static int bo_wait(uint32_t handle, int64_t timeout_ns)
{
    struct drm_mgpu_bo_wait w = { .handle = handle, .timeout_ns = timeout_ns };
    return ioctl(fd, DRM_IOCTL_MGPU_BO_WAIT, &w) ? -errno : 0;
}

static struct drm_mgpu_command cmd(uint32_t op, uint64_t a0, uint64_t a1, uint64_t a2,
                                   uint64_t a3, uint64_t a4, uint64_t a5, uint64_t a6)
{
    struct drm_mgpu_command c = { .opcode = op, .args = { a0, a1, a2, a3, a4, a5, a6 } };
    return c;
}

static uint32_t float_bits(float f)
{
    uint32_t bits;
    memcpy(&bits, &f, 4);
    return bits;
}

/* ------------------------------------------------------------------ subtests */

static void subtest_get_params(void)
{
    struct drm_mgpu_get_param p = { .param = 0x1000 };
    CHECK(param(MGPU_PARAM_DEVICE_VERSION) != 0);
    CHECK(param(MGPU_PARAM_APERTURE_SIZE) >= 64ull << 20);
    CHECK(param(MGPU_PARAM_MEM_QUOTA) >= param(MGPU_PARAM_MEM_FREE));
    CHECK(param(MGPU_PARAM_CONTEXTS) >= 1);
    CHECK(param(MGPU_PARAM_MAX_COMMANDS) >= 16);
    CHECK_ERR(DRM_IOCTL_MGPU_GET_PARAM, &p, EINVAL);
    p.param = MGPU_PARAM_CONTEXTS;
    p.pad = 1;
    CHECK_ERR(DRM_IOCTL_MGPU_GET_PARAM, &p, EINVAL);
    printf("MGPU-RESULT aperture_size=%" PRIu64 "\n", param(MGPU_PARAM_APERTURE_SIZE));
}

static void subtest_bo_create_destroy(void)
{
    uint64_t count = param(MGPU_PARAM_RESOURCE_COUNT), free0 = param(MGPU_PARAM_MEM_FREE);
    struct drm_mgpu_bo_create c = { .size = 0 };
    uint32_t bo = bo_create(100000); /* rounded up to 25 pages */

    CHECK(param(MGPU_PARAM_RESOURCE_COUNT) == count + 1);
    CHECK(param(MGPU_PARAM_MEM_FREE) == free0 - 25 * 4096);
    CHECK(gem_close(bo) == 0);
    CHECK(param(MGPU_PARAM_RESOURCE_COUNT) == count);
    CHECK(param(MGPU_PARAM_MEM_FREE) == free0);
    CHECK_ERR(DRM_IOCTL_MGPU_BO_CREATE, &c, EINVAL); /* size 0 */
    c.size = 4096;
    c.flags = 1;
    CHECK_ERR(DRM_IOCTL_MGPU_BO_CREATE, &c, EINVAL); /* unknown flag */
    c.flags = 0;
    c.size = param(MGPU_PARAM_MEM_QUOTA) + 4096;
    CHECK_ERR(DRM_IOCTL_MGPU_BO_CREATE, &c, ENOSPC); /* beyond the quota */
    c.size = UINT64_MAX;
    CHECK_ERR(DRM_IOCTL_MGPU_BO_CREATE, &c, ENOSPC); /* overflows when rounded */
    CHECK(param(MGPU_PARAM_RESOURCE_COUNT) == count);
}

static void subtest_gem_close_bad_handle(void)
{
    CHECK(gem_close(0xdead) == -1 && errno == EINVAL);
    uint32_t bo = bo_create(4096);
    CHECK(gem_close(bo) == 0);
    CHECK(gem_close(bo) == -1 && errno == EINVAL); /* twice */
}

static void subtest_bo_mmap(void)
{
    const size_t size = 256 * 1024;
    struct drm_mgpu_bo_mmap m = { .handle = 0xdead };
    uint32_t bo = bo_create(size);
    uint32_t *p = bo_map(bo, size);

    CHECK(p != MAP_FAILED);
    for (size_t i = 0; i < size / 4; i++)
        p[i] = (uint32_t)(i * 2654435761u);
    for (size_t i = 0; i < size / 4; i++)
        CHECK(p[i] == (uint32_t)(i * 2654435761u));
    /* A second mapping of the same BO sees the same aperture pages. */
    uint32_t *q = bo_map(bo, size);
    CHECK(q != MAP_FAILED && q[1000] == p[1000]);
    munmap(q, size);
    CHECK_ERR(DRM_IOCTL_MGPU_BO_MMAP, &m, ENOENT);
    m.handle = bo;
    m.pad = 1;
    CHECK_ERR(DRM_IOCTL_MGPU_BO_MMAP, &m, EINVAL);
    m.pad = 0;
    CHECK(ioctl(fd, DRM_IOCTL_MGPU_BO_MMAP, &m) == 0);
    /* Larger than the BO: refused by the core. */
    CHECK(mmap(NULL, size * 2, PROT_READ, MAP_SHARED, fd, m.offset) == MAP_FAILED);
    munmap(p, size);
    CHECK(gem_close(bo) == 0);
}

static void subtest_submit_fill_syncobj(void)
{
    const size_t size = 64 * 1024;
    uint32_t bo = bo_create(size), sync = syncobj_create();
    uint32_t *p = bo_map(bo, size);
    CHECK(p != MAP_FAILED);
    struct drm_mgpu_command c[] = {
        cmd(MGPU_CMD_FILL, bo, 0, size, 0xa5a5f00d, 0, 0, 0),
        cmd(MGPU_CMD_NOP, 0, 0, 0, 0, 0, 0, 0),
        cmd(MGPU_CMD_FILL, bo, 4096, 4096, 0x12345678, 0, 0, 0),
    };
    double t0 = now_us();
    CHECK(submit(c, 3, 0, 0, sync, NULL) == 0);
    CHECK(syncobj_wait(sync, 10000) == 0);
    printf("MGPU-RESULT submit_to_syncobj_us=%.0f\n", now_us() - t0);
    CHECK(p[0] == 0xa5a5f00d && p[size / 4 - 1] == 0xa5a5f00d);
    CHECK(p[1024] == 0x12345678 && p[2047] == 0x12345678 && p[2048] == 0xa5a5f00d);
    munmap(p, size);
    syncobj_destroy(sync);
    CHECK(gem_close(bo) == 0);
}

static void subtest_submit_copy_blit(void)
{
    const size_t size = 64 * 1024;
    uint32_t a = bo_create(size), b = bo_create(size), sync = syncobj_create();
    uint8_t *pa = bo_map(a, size), *pb = bo_map(b, size);
    CHECK(pa != MAP_FAILED && pb != MAP_FAILED);
    for (size_t i = 0; i < size; i++)
        pa[i] = (uint8_t)(i * 7 + 3);
    memset(pb, 0, size);
    /* Copy the first 16 KiB, then blit a 100x20 rectangle (pitch 256) to 32 KiB. */
    struct drm_mgpu_command c[] = {
        cmd(MGPU_CMD_COPY, a, 0, b, 0, 16384, 0, 0),
        cmd(MGPU_CMD_BLIT, a, 1000, 256, b, 32768, 256, 100 | (20ull << 32)),
    };
    CHECK(submit(c, 2, 0, 0, sync, NULL) == 0);
    CHECK(syncobj_wait(sync, 10000) == 0);
    CHECK(memcmp(pa, pb, 16384) == 0);
    for (int row = 0; row < 20; row++) {
        CHECK(memcmp(pb + 32768 + row * 256, pa + 1000 + row * 256, 100) == 0);
        CHECK(pb[32768 + row * 256 + 100] == 0);
    }
    munmap(pa, size);
    munmap(pb, size);
    syncobj_destroy(sync);
    CHECK(gem_close(a) == 0 && gem_close(b) == 0);
}

static void subtest_submit_compute(void)
{
    const int n = 1024, m = 32;
    uint32_t x = bo_create(n * 4), y = bo_create(n * 4);
    uint32_t ma = bo_create(m * m * 4), mb = bo_create(m * m * 4), mc = bo_create(m * m * 4);
    float *px = bo_map(x, n * 4), *py = bo_map(y, n * 4);
    float *pa = bo_map(ma, m * m * 4), *pb = bo_map(mb, m * m * 4), *pc = bo_map(mc, m * m * 4);
    CHECK(px != MAP_FAILED && py != MAP_FAILED && pa != MAP_FAILED && pb != MAP_FAILED &&
          pc != MAP_FAILED);
    for (int i = 0; i < n; i++) {
        px[i] = i * 0.5f;
        py[i] = 100.0f - i;
    }
    for (int i = 0; i < m * m; i++) {
        pa[i] = (float)(i % 7);
        pb[i] = (i / m == i % m) ? 2.0f : 0.0f; /* 2 * identity */
    }
    struct drm_mgpu_command c[] = {
        cmd(MGPU_CMD_SAXPY, x, 0, y, 0, n, float_bits(2.0f), 0),
        cmd(MGPU_CMD_MATMUL, ma, mb, mc, m, m, m, 0),
    };
    int sf = -1;
    CHECK(submit(c, 2, MGPU_SUBMIT_OUT_SYNC_FILE, 0, 0, &sf) == 0 && sf >= 0);
    CHECK(sync_file_status(sf, 10000) == 1);
    close(sf);
    for (int i = 0; i < n; i++)
        CHECK(py[i] == 2.0f * (i * 0.5f) + (100.0f - i));
    for (int i = 0; i < m * m; i++)
        CHECK(pc[i] == 2.0f * pa[i]);
    munmap(px, n * 4);
    munmap(py, n * 4);
    munmap(pa, m * m * 4);
    munmap(pb, m * m * 4);
    munmap(pc, m * m * 4);
    CHECK(!gem_close(x) && !gem_close(y) && !gem_close(ma) && !gem_close(mb) && !gem_close(mc));
}

static void subtest_sync_file_and_in_syncobj(void)
{
    const size_t size = 4 << 20;
    uint32_t bo = bo_create(size), first = syncobj_create(), second = syncobj_create();
    uint32_t *p = bo_map(bo, size);
    int sf = -1;
    CHECK(p != MAP_FAILED);
    struct drm_mgpu_command fill1 = cmd(MGPU_CMD_FILL, bo, 0, size, 1, 0, 0, 0);
    struct drm_mgpu_command fill2 = cmd(MGPU_CMD_FILL, bo, 0, 4096, 2, 0, 0, 0);
    CHECK(submit(&fill1, 1, 0, 0, first, NULL) == 0);
    /* The second job waits for the first's syncobj; its sync_file signals last. */
    CHECK(submit(&fill2, 1, MGPU_SUBMIT_OUT_SYNC_FILE, first, second, &sf) == 0);
    CHECK(sf >= 0 && sync_file_status(sf, 10000) == 1);
    CHECK(syncobj_wait(first, 0) == 0 && syncobj_wait(second, 0) == 0);
    CHECK(p[0] == 2 && p[1023] == 2 && p[1024] == 1 && p[size / 4 - 1] == 1);
    close(sf);
    syncobj_destroy(first);
    syncobj_destroy(second);
    munmap(p, size);
    CHECK(gem_close(bo) == 0);
}

static void subtest_bo_wait(void)
{
    const size_t size = 16 << 20;
    uint32_t bo = bo_create(size), idle = bo_create(4096);
    struct drm_mgpu_bo_wait w = { .handle = 0xdead, .timeout_ns = 0 };
    struct drm_mgpu_command c[4];
    for (int i = 0; i < 4; i++)
        c[i] = cmd(MGPU_CMD_FILL, bo, 0, size, i, 0, 0, 0);
    CHECK(bo_wait(idle, 0) == 0); /* never used: idle */
    CHECK(submit(c, 4, 0, 0, 0, NULL) == 0);
    int busy = bo_wait(bo, 0);
    CHECK(busy == 0 || busy == -ETIME);
    printf("MGPU-RESULT bo_busy_after_submit=%d\n", busy == -ETIME);
    CHECK(bo_wait(bo, 10000000000ll) == 0);
    CHECK(bo_wait(bo, 0) == 0);
    CHECK_ERR(DRM_IOCTL_MGPU_BO_WAIT, &w, ENOENT);
    w.handle = bo;
    w.timeout_ns = -1;
    CHECK_ERR(DRM_IOCTL_MGPU_BO_WAIT, &w, EINVAL);
    /* Closing a BO a job still uses is fine: the job holds it. */
    CHECK(submit(c, 4, 0, 0, 0, NULL) == 0);
    CHECK(gem_close(bo) == 0 && gem_close(idle) == 0);
}

static void subtest_submit_invalid(void)
{
    uint32_t bo = bo_create(4096);
    uint64_t max = param(MGPU_PARAM_MAX_COMMANDS);
    struct drm_mgpu_command many[256];
    struct drm_mgpu_command c = cmd(MGPU_CMD_FILL, bo, 0, 4096, 1, 0, 0, 0);
    struct drm_mgpu_submit s = { .commands = (uintptr_t)&c, .count = 1, .pad = 1 };

    memset(many, 0, sizeof(many));
    CHECK(max < 256);
    CHECK(submit(&c, 0, 0, 0, 0, NULL) == -EINVAL);                /* no commands */
    CHECK(submit(many, max + 1, 0, 0, 0, NULL) == -EINVAL);        /* too many */
    CHECK(submit(many, max, 0, 0, 0, NULL) == 0);                  /* as many NOPs as allowed */
    CHECK(submit(&c, 1, 0x80, 0, 0, NULL) == -EINVAL);             /* unknown flag */
    CHECK_ERR(DRM_IOCTL_MGPU_SUBMIT, &s, EINVAL);                  /* pad */
    CHECK(submit((void *)16, 1, 0, 0, 0, NULL) == -EFAULT);        /* bad pointer */
    c.flags = 1;
    CHECK(submit(&c, 1, 0, 0, 0, NULL) == -EINVAL);                /* command flags */
    c.flags = 0;
    c.opcode = 0x42;
    CHECK(submit(&c, 1, 0, 0, 0, NULL) == -EINVAL);                /* unknown opcode */
    /* They take guest physical addresses, which only the driver may give the device. */
    uint32_t forbidden[] = { MGPU_OP_WRITE_RESOURCE, MGPU_OP_READ_RESOURCE, MGPU_OP_FENCE };
    for (int i = 0; i < 3; i++) {
        c.opcode = forbidden[i];
        CHECK(submit(&c, 1, 0, 0, 0, NULL) == -EINVAL);
    }
    c = cmd(MGPU_CMD_FILL, 0xdead, 0, 4096, 1, 0, 0, 0);
    CHECK(submit(&c, 1, 0, 0, 0, NULL) == -ENOENT);                /* bad BO handle */
    c = cmd(MGPU_CMD_COPY, bo, 0, 1ull << 40, 0, 4096, 0, 0);
    CHECK(submit(&c, 1, 0, 0, 0, NULL) == -ENOENT);                /* handle > u32 */
    c = cmd(MGPU_CMD_FILL, bo, 0, 4096, 1, 0, 0, 0);
    CHECK(submit(&c, 1, 0, 0, 0xdead, NULL) == -ENOENT);           /* bad out syncobj */
    CHECK(submit(&c, 1, 0, 0xdead, 0, NULL) == -ENOENT);           /* bad in syncobj */
    CHECK(gem_close(bo) == 0);
}

/* A command the device refuses: the fence carries -EIO, the ring recovers. */
static void subtest_faulting_command(void)
{
    uint32_t bo = bo_create(4096), sync = syncobj_create();
    uint32_t *p = bo_map(bo, 4096);
    int sf = -1, sf2 = -1;
    CHECK(p != MAP_FAILED);
    struct drm_mgpu_command bad = cmd(MGPU_CMD_FILL, bo, 4096, 4096, 7, 0, 0, 0);
    STEP("submitting the bad FILL");
    CHECK(submit(&bad, 1, MGPU_SUBMIT_OUT_SYNC_FILE, 0, sync, &sf) == 0);
    STEP("waiting for its sync_file");
    int status = sync_file_status(sf, 10000);
    STEP("its sync_file signalled");
    printf("MGPU-RESULT fault_fence_status=%d\n", status);
    CHECK(status == -EIO);
    CHECK(syncobj_wait(sync, 0) == 0); /* signalled, with an error */
    close(sf);
    struct drm_mgpu_command good = cmd(MGPU_CMD_FILL, bo, 0, 4096, 9, 0, 0, 0);
    STEP("submitting the good FILL");
    CHECK(submit(&good, 1, MGPU_SUBMIT_OUT_SYNC_FILE, 0, 0, &sf2) == 0);
    STEP("waiting for its sync_file");
    CHECK(sync_file_status(sf2, 10000) == 1);
    STEP("reading the BO through the aperture");
    CHECK(p[0] == 9 && p[1023] == 9);
    STEP("done");
    close(sf2);
    munmap(p, 4096);
    syncobj_destroy(sync);
    CHECK(gem_close(bo) == 0);
}

static int write_file(const char *path, const char *text)
{
    int f = open(path, O_WRONLY);
    if (f < 0)
        return -1;
    ssize_t n = write(f, text, strlen(text));
    close(f);
    return n == (ssize_t)strlen(text) ? 0 : -1;
}

/* A job that runs past the timeout: reset, -ETIMEDOUT, BOs back zeroed and usable. */
static void subtest_hang_reset(void)
{
    const uint64_t dim = 2048, msize = dim * dim * 4;
    char old[32] = "2000";
    int f = open(TIMEOUT_PARAM, O_RDONLY);
    CHECK(f >= 0);
    ssize_t n = read(f, old, sizeof(old) - 1);
    close(f);
    CHECK(n > 0);
    old[n] = 0;

    STEP("creating BOs");
    uint32_t a = bo_create(msize), b = bo_create(msize), c = bo_create(msize);
    uint32_t keep = bo_create(8192);
    uint32_t *pk = bo_map(keep, 8192);
    CHECK(pk != MAP_FAILED);
    pk[0] = 0xfeedface;
    uint64_t resets = param(MGPU_PARAM_RESET_COUNT);
    struct drm_mgpu_command work[HANG_MATMULS];
    for (int i = 0; i < HANG_MATMULS; i++)
        work[i] = cmd(MGPU_CMD_MATMUL, a, b, c, dim, dim, dim, 0);

    char text[32];
    snprintf(text, sizeof(text), "%d", HANG_TIMEOUT_MS);
    CHECK(write_file(TIMEOUT_PARAM, text) == 0);
    int sf = -1;
    STEP("submitting the long job");
    double t0 = now_us();
    int ret = submit(work, HANG_MATMULS, MGPU_SUBMIT_OUT_SYNC_FILE, 0, 0, &sf);
    int status = ret ? ret : sync_file_status(sf, 30000);
    double waited = now_us() - t0;
    STEP("the long job ended");
    write_file(TIMEOUT_PARAM, old);
    printf("MGPU-RESULT hang_fence_status=%d\n", status);
    printf("MGPU-RESULT hang_to_reset_ms=%.0f\n", waited / 1000);
    CHECK(ret == 0 && status == -ETIMEDOUT);
    close(sf);
    CHECK(param(MGPU_PARAM_RESET_COUNT) == resets + 1);
    /* The reset lost every BO's contents; each has a new, zeroed resource. */
    CHECK(pk[0] == 0);
    struct drm_mgpu_command fill = cmd(MGPU_CMD_FILL, keep, 0, 8192, 0x600d, 0, 0, 0);
    int sf2 = -1;
    CHECK(submit(&fill, 1, MGPU_SUBMIT_OUT_SYNC_FILE, 0, 0, &sf2) == 0);
    CHECK(sync_file_status(sf2, 10000) == 1);
    CHECK(pk[0] == 0x600d && pk[2047] == 0x600d);
    close(sf2);
    munmap(pk, 8192);
    CHECK(!gem_close(a) && !gem_close(b) && !gem_close(c) && !gem_close(keep));
}

/* A stray access to the aperture outside every BO, through the raw BAR: the device
 * reports it (report policy) and the driver logs it; reads give all ones. */
/* The denied-access policy the kernel command line names (mgpu.denied=), or "". */
static const char *cmdline_policy(void)
{
    static char policy[32];
    char line[4096] = "";
    FILE *f = fopen("/proc/cmdline", "r");
    if (f) {
        if (!fgets(line, sizeof(line), f))
            line[0] = 0;
        fclose(f);
    }
    const char *at = strstr(line, "mgpu.denied=");
    policy[0] = 0;
    if (at)
        sscanf(at + strlen("mgpu.denied="), "%31[a-z]", policy);
    return policy;
}

static void subtest_stray_aperture_access(void)
{
    char path[300], link[256];
    if (!strcmp(cmdline_policy(), "sigbus")) {
        fprintf(stderr, "mgpu-drm-test: stray-aperture-access skipped: the GPU's denied-access "
                "policy is sigbus, so the stray access would kill the VM (run_qemu.sh "
                "--denied report lets the device report it)\n");
        printf("MGPU-RESULT stray_read=skipped\n");
        return;
    }
    snprintf(path, sizeof(path), "/proc/self/fd/%d", fd);
    ssize_t n = readlink(path, link, sizeof(link) - 1);
    CHECK(n > 0);
    link[n] = 0;
    const char *minor = strrchr(link, '/') + 1;
    snprintf(path, sizeof(path), "/sys/class/drm/%s/device/resource2", minor);
    int bar = open(path, O_RDWR | O_SYNC);
    CHECK(bar >= 0);
    uint64_t size = param(MGPU_PARAM_APERTURE_SIZE);
    volatile uint32_t *last = mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_SHARED, bar,
                                   size - 4096);
    CHECK(last != MAP_FAILED);
    printf("MGPU-RESULT stray_read=0x%08x\n", last[0]);
    munmap((void *)last, 4096);
    close(bar);
}

/* The aperture is full: BOs not touched lately make room, and come back when touched. */
static void subtest_aperture_pressure(void)
{
    const uint64_t quarter = param(MGPU_PARAM_APERTURE_SIZE) / 4;
    const size_t words = quarter / 4;
    uint64_t evictions = param(MGPU_PARAM_APERTURE_EVICTIONS);
    uint32_t bo[4], *p[4];

    CHECK(param(MGPU_PARAM_MEM_FREE) >= 4 * quarter);
    STEP("filling the aperture with four BOs");
    for (int i = 0; i < 4; i++) {
        bo[i] = bo_create(quarter);
        p[i] = bo_map(bo[i], quarter);
        CHECK(p[i] != MAP_FAILED);
        p[i][0] = 0xa0 + i;
        p[i][words - 1] = 0xb0 + i;
    }
    /* Two holes of a quarter each, and a BO of half the aperture: no run fits it. */
    munmap(p[1], quarter);
    munmap(p[3], quarter);
    CHECK(gem_close(bo[1]) == 0 && gem_close(bo[3]) == 0);
    STEP("mapping a BO of half the aperture");
    uint32_t half = bo_create(2 * quarter);
    uint32_t *ph = bo_map(half, 2 * quarter);
    CHECK(ph != MAP_FAILED);
    ph[0] = 1;
    ph[2 * words - 1] = 2;
    printf("MGPU-RESULT aperture_evictions=%" PRIu64 "\n",
           param(MGPU_PARAM_APERTURE_EVICTIONS) - evictions);
    CHECK(param(MGPU_PARAM_APERTURE_EVICTIONS) > evictions);
    STEP("touching the evicted BO again");
    CHECK(p[0][0] == 0xa0 && p[0][words - 1] == 0xb0); /* kept in device memory */
    CHECK(p[2][0] == 0xa2 && p[2][words - 1] == 0xb2);
    CHECK(ph[0] == 1 && ph[2 * words - 1] == 2);
    munmap(p[0], quarter);
    munmap(p[2], quarter);
    munmap(ph, 2 * quarter);
    CHECK(!gem_close(bo[0]) && !gem_close(bo[2]) && !gem_close(half));
}

/* A submit that cannot give its sync_file runs nothing (it fails before the ring). */
static void subtest_submit_without_fd(void)
{
    uint32_t bo = bo_create(4096), sync = syncobj_create();
    uint32_t *p = bo_map(bo, 4096);
    struct rlimit old, none;
    CHECK(p != MAP_FAILED);
    p[0] = 0;
    struct drm_mgpu_command fill = cmd(MGPU_CMD_FILL, bo, 0, 4096, 0x5a5a5a5a, 0, 0, 0);
    struct drm_mgpu_command nop = cmd(MGPU_CMD_NOP, 0, 0, 0, 0, 0, 0, 0);
    /* Every fd number below the limit in use: the sync_file gets no fd. */
    int lowest = dup(0);
    CHECK(lowest >= 0);
    close(lowest);
    CHECK(getrlimit(RLIMIT_NOFILE, &old) == 0);
    none = old;
    none.rlim_cur = lowest;
    CHECK(setrlimit(RLIMIT_NOFILE, &none) == 0);
    int ret = submit(&fill, 1, MGPU_SUBMIT_OUT_SYNC_FILE, 0, 0, NULL);
    CHECK(setrlimit(RLIMIT_NOFILE, &old) == 0);
    printf("MGPU-RESULT submit_without_fd=%d\n", ret);
    CHECK(ret == -EMFILE);
    /* A later job's fence says the ring ran everything before it: the FILL never ran. */
    CHECK(submit(&nop, 1, 0, 0, sync, NULL) == 0);
    CHECK(syncobj_wait(sync, 10000) == 0);
    CHECK(p[0] == 0);
    munmap(p, 4096);
    syncobj_destroy(sync);
    CHECK(gem_close(bo) == 0);
}

static int open_render_node(void);

/* The sysfs name (BDF) of the device behind the DRM fd. */
static int device_bdf(char *bdf, size_t size)
{
    char path[300], link[256], target[300];
    snprintf(path, sizeof(path), "/proc/self/fd/%d", fd);
    ssize_t n = readlink(path, link, sizeof(link) - 1);
    if (n <= 0)
        return -1;
    link[n] = 0;
    snprintf(path, sizeof(path), "/sys/class/drm/%s/device", strrchr(link, '/') + 1);
    n = readlink(path, target, sizeof(target) - 1);
    if (n <= 0)
        return -1;
    target[n] = 0;
    snprintf(bdf, size, "%s", strrchr(target, '/') + 1);
    return 0;
}

/* Unbind the driver under an open file, BO and mapping; close them; bind it again. */
static void subtest_unbind_with_open_bo(void)
{
    char bdf[64];
    struct drm_mgpu_get_param p = { .param = MGPU_PARAM_DEVICE_VERSION };
    CHECK(device_bdf(bdf, sizeof(bdf)) == 0);
    uint32_t bo = bo_create(8192);
    uint32_t *map = bo_map(bo, 8192);
    CHECK(map != MAP_FAILED);
    map[0] = 1;
    STEP("unbinding the driver");
    CHECK(write_file("/sys/bus/pci/drivers/mgpu_drm/unbind", bdf) == 0);
    CHECK_ERR(DRM_IOCTL_MGPU_GET_PARAM, &p, ENODEV); /* the device is gone for this file */
    STEP("closing the BO's mapping and file after the unbind");
    munmap(map, 8192);
    close(fd); /* frees the BO: its resource went with the device */
    fd = -1;
    STEP("binding the driver again");
    CHECK(write_file("/sys/bus/pci/drivers/mgpu_drm/bind", bdf) == 0);
    fd = open_render_node();
    CHECK(fd >= 0);
    CHECK(gem_close(bo_create(4096)) == 0);
}

static void subtest_close_frees_everything(void)
{
    /* Everything a DRM file made goes when it closes. */
    uint64_t count = param(MGPU_PARAM_RESOURCE_COUNT);
    char path[300], link[256];
    snprintf(path, sizeof(path), "/proc/self/fd/%d", fd);
    ssize_t n = readlink(path, link, sizeof(link) - 1);
    CHECK(n > 0);
    link[n] = 0;
    int second = open(link, O_RDWR);
    CHECK(second >= 0);
    int saved = fd;
    fd = second;
    bo_create(4096);
    bo_create(8192);
    fd = saved;
    CHECK(param(MGPU_PARAM_RESOURCE_COUNT) == count + 2);
    close(second);
    CHECK(param(MGPU_PARAM_RESOURCE_COUNT) == count);
}

static const struct {
    const char *name;
    void (*run)(void);
} subtests[] = {
    { "get-params", subtest_get_params },
    { "bo-create-destroy", subtest_bo_create_destroy },
    { "gem-close-bad-handle", subtest_gem_close_bad_handle },
    { "bo-mmap", subtest_bo_mmap },
    { "submit-fill-syncobj", subtest_submit_fill_syncobj },
    { "submit-copy-blit", subtest_submit_copy_blit },
    { "submit-compute", subtest_submit_compute },
    { "sync-file-in-syncobj", subtest_sync_file_and_in_syncobj },
    { "bo-wait", subtest_bo_wait },
    { "submit-invalid", subtest_submit_invalid },
    { "faulting-command", subtest_faulting_command },
    { "hang-reset", subtest_hang_reset },
    { "aperture-pressure", subtest_aperture_pressure },
    { "submit-without-fd", subtest_submit_without_fd },
    { "stray-aperture-access", subtest_stray_aperture_access },
    { "close-frees-everything", subtest_close_frees_everything },
    { "unbind-with-open-bo", subtest_unbind_with_open_bo },
};
#define NSUBTESTS (int)(sizeof(subtests) / sizeof(subtests[0]))

static int open_render_node(void)
{
    DIR *dir = opendir("/dev/dri");
    struct dirent *entry;
    char path[300], name[32];

    while (dir && (entry = readdir(dir))) {
        if (strncmp(entry->d_name, "renderD", 7))
            continue;
        snprintf(path, sizeof(path), "/dev/dri/%s", entry->d_name);
        int f = open(path, O_RDWR | O_CLOEXEC);
        struct drm_version v = { .name = name, .name_len = sizeof(name) - 1 };
        memset(name, 0, sizeof(name));
        if (f >= 0 && ioctl(f, DRM_IOCTL_VERSION, &v) == 0 && !strcmp(name, "mgpu")) {
            printf("MGPU-RESULT node=%s\n", path);
            printf("MGPU-RESULT driver_version=%d.%d\n", v.version_major, v.version_minor);
            closedir(dir);
            return f;
        }
        if (f >= 0)
            close(f);
    }
    if (dir)
        closedir(dir);
    return -1;
}

int main(int argc, char **argv)
{
    int passed = 0, failed = 0;

    if (argc > 1 && !strcmp(argv[1], "--list")) {
        for (int i = 0; i < NSUBTESTS; i++)
            puts(subtests[i].name);
        return 0;
    }
    kmsg = open("/dev/kmsg", O_WRONLY | O_CLOEXEC);
    fd = open_render_node();
    if (fd < 0) {
        fprintf(stderr, "mgpu-drm-test: no mgpu render node in /dev/dri\n");
        return 1;
    }
    for (int i = 0; i < NSUBTESTS; i++) {
        int wanted = argc == 1;
        for (int j = 1; j < argc; j++)
            wanted |= !strcmp(argv[j], subtests[i].name);
        if (!wanted)
            continue;
        int before = failed_checks;
        double t0 = now_us();
        step(subtests[i].name, "start");
        subtests[i].run();
        step(subtests[i].name, failed_checks == before ? "pass" : "FAIL");
        int ok = failed_checks == before;
        char key[64];
        snprintf(key, sizeof(key), "%s", subtests[i].name);
        for (char *k = key; *k; k++)
            if (*k == '-')
                *k = '_';
        printf("MGPU-RESULT subtest_%s=%s\n", key, ok ? "pass" : "fail");
        fprintf(stderr, "mgpu-drm-test: %s %s (%.0f ms)\n", subtests[i].name,
                ok ? "pass" : "FAIL", (now_us() - t0) / 1000);
        fflush(stdout);
        ok ? passed++ : failed++;
    }
    printf("MGPU-RESULT passed=%d\nMGPU-RESULT failed=%d\n", passed, failed);
    return failed ? 1 : 0;
}
