/*
 * mgpu-ring: submit work through a command ring and wait for the fence interrupt,
 * the way a driver does, using the mgpu guest driver (/dev/mgpuN) for interrupts and
 * DMA memory and sysfs for the registers.
 *
 *   mgpu-ring [N [TIMEOUT_MS]]   use /dev/mgpuN (default 0); wait at most TIMEOUT_MS
 *                                for the fence interrupt (default 20000)
 *
 * It uploads a page and two float32 vectors, copies the page resource to resource,
 * runs SAXPY, reads both results back, fences, waits for the FENCE interrupt and
 * checks everything.  Results are "MGPU-RESULT key=value" lines.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "../driver/mgpu_regs.h"
#include "../driver/mgpu_ioctl.h"

#define RING_SIZE 65536
#define FENCE_AT 0x10000
#define SRC_AT 0x20000
#define DST_AT 0x30000
#define X_AT 0x40000
#define Y_AT 0x50000
#define YOUT_AT 0x60000
#define COUNT 1024

static void die(const char *what)
{
    fprintf(stderr, "mgpu-ring: %s: %s\n", what, strerror(errno));
    exit(1);
}

static volatile uint32_t *regs;
static uint32_t rd(uint32_t offset) { return regs[offset / 4]; }
static void wr(uint32_t offset, uint32_t value) { regs[offset / 4] = value; }

static uint32_t create(uint32_t size)
{
    wr(MGPU_REG_RES_SIZE_LO, size);
    wr(MGPU_REG_RES_SIZE_HI, 0);
    wr(MGPU_REG_RES_COMMAND, MGPU_RES_CREATE);
    if (rd(MGPU_REG_RES_STATUS)) {
        fprintf(stderr, "mgpu-ring: CREATE failed with %u\n", rd(MGPU_REG_RES_STATUS));
        exit(1);
    }
    return rd(MGPU_REG_RES_HANDLE);
}

struct command { uint32_t opcode, flags; uint64_t args[7]; };

static double now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1e9 + ts.tv_nsec;
}

int main(int argc, char **argv)
{
    const char *index = argc > 1 ? argv[1] : "0";
    uint32_t timeout_ms = argc > 2 ? (uint32_t)strtoul(argv[2], NULL, 0) : 20000;
    char path[PATH_MAX], link[PATH_MAX];
    struct mgpu_info info;

    snprintf(path, sizeof(path), "/dev/mgpu%s", index);
    int dev = open(path, O_RDWR);
    if (dev < 0 || ioctl(dev, MGPU_INFO, &info) < 0)
        die(path);
    uint8_t *buffer = mmap(NULL, info.size, PROT_READ | PROT_WRITE, MAP_SHARED, dev, 0);
    if (buffer == MAP_FAILED)
        die("mmap of the DMA buffer");
    snprintf(path, sizeof(path), "/sys/class/misc/mgpu%s/device", index);
    ssize_t n = readlink(path, link, sizeof(link) - 1);
    if (n < 0)
        die(path);
    link[n] = 0;
    const char *bdf = strrchr(link, '/') + 1;
    snprintf(path, sizeof(path), "/sys/bus/pci/devices/%s/resource0", bdf);
    int bar0 = open(path, O_RDWR | O_SYNC);
    regs = bar0 < 0 ? MAP_FAILED : mmap(NULL, MGPU_BAR0_SIZE, PROT_READ | PROT_WRITE,
                                        MAP_SHARED, bar0, 0);
    if (regs == MAP_FAILED)
        die(path);
    if (rd(MGPU_REG_ID) != MGPU_ID_VALUE) {
        fprintf(stderr, "mgpu-ring: %s is not an mgpu\n", bdf);
        return 1;
    }

    /* Inputs in DMA memory. */
    float *x = (float *)(buffer + X_AT), *y = (float *)(buffer + Y_AT);
    for (int i = 0; i < 4096; i++)
        buffer[SRC_AT + i] = (uint8_t)(i * 7 + 3);
    for (int i = 0; i < COUNT; i++) {
        x[i] = (float)i * 0.5f;
        y[i] = 100.0f - (float)i;
    }
    memset(buffer + DST_AT, 0, 4096);
    *(volatile uint64_t *)(buffer + FENCE_AT) = 0;

    /* Whatever a previous driver left (mgpu_drm masks everything when it unbinds): the
     * causes we wait for unmasked, stale ones acknowledged. */
    wr(MGPU_REG_INT_ACK, 0xffffffff);
    wr(MGPU_REG_INT_MASK, 0);
    uint32_t a = create(4096), b = create(4096), rx = create(COUNT * 4), ry = create(COUNT * 4);
    wr(MGPU_REG_CTX0_RING_CONTROL, 0);
    wr(MGPU_REG_CTX0_RING_BASE_LO, (uint32_t)info.bus_address);
    wr(MGPU_REG_CTX0_RING_BASE_HI, (uint32_t)(info.bus_address >> 32));
    wr(MGPU_REG_CTX0_RING_SIZE, RING_SIZE);
    wr(MGPU_REG_CTX0_RING_CONTROL, MGPU_RING_CONTROL_ENABLE);
    if (rd(MGPU_REG_CTX0_RING_STATUS) != MGPU_RING_IDLE) {
        fprintf(stderr, "mgpu-ring: ring did not start (error %u)\n", rd(MGPU_REG_ERROR_CODE));
        return 1;
    }

    uint64_t bus = info.bus_address;
    float alpha = 2.0f;
    uint32_t alpha_bits;
    memcpy(&alpha_bits, &alpha, 4);
    struct command commands[] = {
        { MGPU_OP_WRITE_RESOURCE, 0, { bus + SRC_AT, a, 0, 4096 } },
        { MGPU_OP_COPY_RESOURCE, 0, { a, 0, b, 0, 4096 } },
        { MGPU_OP_READ_RESOURCE, 0, { b, 0, bus + DST_AT, 4096 } },
        { MGPU_OP_WRITE_RESOURCE, 0, { bus + X_AT, rx, 0, COUNT * 4 } },
        { MGPU_OP_WRITE_RESOURCE, 0, { bus + Y_AT, ry, 0, COUNT * 4 } },
        { MGPU_OP_SAXPY, 0, { rx, 0, ry, 0, COUNT, alpha_bits } },
        { MGPU_OP_READ_RESOURCE, 0, { ry, 0, bus + YOUT_AT, COUNT * 4 } },
        { MGPU_OP_FENCE, 0, { bus + FENCE_AT, 42 } },
    };
    int ncommands = sizeof(commands) / sizeof(commands[0]);
    memcpy(buffer, commands, sizeof(commands));

    struct mgpu_wait wait = { .vector = 0, .timeout_ms = timeout_ms, .after = 0 };
    /* The count before we start: wait for it to move. */
    struct mgpu_wait probe = { .vector = 0, .timeout_ms = 0, .after = UINT64_MAX };
    ioctl(dev, MGPU_WAIT, &probe);
    wait.after = probe.count;

    double t0 = now_ns();
    wr(MGPU_REG_CTX0_RING_TAIL, ncommands * MGPU_COMMAND_SIZE);
    wr(MGPU_REG_CTX0_DOORBELL, 1);
    if (ioctl(dev, MGPU_WAIT, &wait) < 0) {
        fprintf(stderr, "mgpu-ring: no fence interrupt: %s (ring status %u, error %u)\n",
                strerror(errno), rd(MGPU_REG_CTX0_RING_STATUS), rd(MGPU_REG_ERROR_CODE));
        return 1;
    }
    double elapsed = now_ns() - t0;
    uint64_t fence = *(volatile uint64_t *)(buffer + FENCE_AT);
    wr(MGPU_REG_INT_ACK, MGPU_INT_FENCE);

    int copy_ok = !memcmp(buffer + SRC_AT, buffer + DST_AT, 4096), saxpy_ok = 1;
    float *yout = (float *)(buffer + YOUT_AT);
    for (int i = 0; i < COUNT; i++)
        if (yout[i] != alpha * x[i] + y[i])
            saxpy_ok = 0;
    printf("MGPU-RESULT vectors=%u\n", info.vectors);
    printf("MGPU-RESULT fence=%" PRIu64 "\n", fence);
    printf("MGPU-RESULT fence_register=%u\n", rd(MGPU_REG_CTX0_FENCE_LO));
    printf("MGPU-RESULT interrupts=%llu\n", (unsigned long long)(wait.count - wait.after));
    printf("MGPU-RESULT copy_ok=%d\n", copy_ok);
    printf("MGPU-RESULT saxpy_ok=%d\n", saxpy_ok);
    printf("MGPU-RESULT submit_to_interrupt_us=%.0f\n", elapsed / 1000);
    return fence == 42 && copy_ok && saxpy_ok ? 0 : 1;
}
