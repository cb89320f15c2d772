/*
 * mgpu-probe: look at and poke an mgpu device from guest userspace, through sysfs.
 *
 * Every result is a "MGPU-RESULT key=value" line the host side parses
 * (guest_images.parse_results); errors go to stderr with a non-zero exit.
 * BARs are mapped from /sys/bus/pci/devices/BDF/resourceN and accessed with
 * volatile 32-bit loads and stores, as a driver would.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <limits.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/io.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>
#include <dirent.h>

#include "../driver/mgpu_regs.h"

#define SYSFS "/sys/bus/pci/devices"

static void die(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    fprintf(stderr, "mgpu-probe: ");
    vfprintf(stderr, fmt, ap);
    fprintf(stderr, "\n");
    va_end(ap);
    exit(1);
}

static unsigned long read_hex_file(const char *bdf, const char *name)
{
    char path[256], buf[64];
    snprintf(path, sizeof(path), SYSFS "/%s/%s", bdf, name);
    FILE *f = fopen(path, "r");
    if (!f || !fgets(buf, sizeof(buf), f))
        die("cannot read %s: %s", path, strerror(errno));
    fclose(f);
    return strtoul(buf, NULL, 0);
}

static uint64_t parse(const char *text)
{
    char *end;
    errno = 0;
    uint64_t value = strtoull(text, &end, 0);
    if (errno || *end)
        die("not a number: %s", text);
    return value;
}

struct bar {
    volatile uint8_t *base;
    size_t size;
};

/* Like pci_enable_device(): firmware enables the devices present at boot, but nobody
 * enables memory decoding of a hot-plugged one until a driver asks. */
static void enable_device(const char *bdf)
{
    char path[256];
    snprintf(path, sizeof(path), SYSFS "/%s/enable", bdf);
    int fd = open(path, O_RDWR);
    char state = '0';
    if (fd < 0)
        return;
    if (pread(fd, &state, 1, 0) == 1 && state == '0' && pwrite(fd, "1", 1, 0) != 1)
        fprintf(stderr, "mgpu-probe: cannot enable %s: %s\n", bdf, strerror(errno));
    close(fd);
}

static struct bar map_bar(const char *bdf, int index)
{
    char path[256];
    struct stat st;
    enable_device(bdf);
    snprintf(path, sizeof(path), SYSFS "/%s/resource%d", bdf, index);
    int fd = open(path, O_RDWR | O_SYNC);
    if (fd < 0 || fstat(fd, &st) < 0)
        die("cannot open %s: %s", path, strerror(errno));
    void *base = mmap(NULL, st.st_size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (base == MAP_FAILED)
        die("cannot mmap %s: %s", path, strerror(errno));
    close(fd);
    return (struct bar){ base, st.st_size };
}

static void check_range(struct bar *bar, uint64_t offset, uint64_t length)
{
    if (offset > bar->size || length > bar->size - offset || (offset & 3) || (length & 3))
        die("range 0x%" PRIx64 "+0x%" PRIx64 " is unaligned or outside the BAR (0x%zx)",
            offset, length, bar->size);
}

static inline uint32_t rd32(struct bar *bar, uint64_t offset)
{
    return *(volatile uint32_t *)(bar->base + offset);
}

static inline void wr32(struct bar *bar, uint64_t offset, uint32_t value)
{
    *(volatile uint32_t *)(bar->base + offset) = value;
}

static uint32_t pattern_word(uint32_t seed, uint64_t i)
{
    return seed ^ (uint32_t)(i * 2654435761u);
}

/*
 * The physical slot number of the PCIe port above a device (its Slot Capabilities,
 * bits 31:19: QEMU's pcie-root-port slot=N), or -1.  run_qemu.sh puts gpuN in slot N+1.
 */
static int slot_of(const char *bdf)
{
    char path[300], real[PATH_MAX], *port;
    uint8_t config[256];
    snprintf(path, sizeof(path), SYSFS "/%s", bdf);
    if (!realpath(path, real) || !(port = strrchr(real, '/')))
        return -1;
    *port = 0;  /* the parent directory: the port's own sysfs directory */
    snprintf(path, sizeof(path), "%.280s/config", real);
    int fd = open(path, O_RDONLY);
    ssize_t got = fd < 0 ? -1 : pread(fd, config, sizeof(config), 0);
    if (fd >= 0)
        close(fd);
    if (got < (ssize_t)sizeof(config))
        return -1;
    int guard = 0;
    for (uint8_t ptr = config[0x34] & ~3; ptr && ptr < 0xe8 && guard < 48;
         ptr = config[ptr + 1] & ~3, guard++) {
        if (config[ptr] == 0x10) {  /* PCI Express */
            uint32_t slot_caps;
            memcpy(&slot_caps, config + ptr + 0x14, 4);
            return (int)(slot_caps >> 19);
        }
    }
    return -1;
}

/* One line for people, on stderr: which instance, which driver, which DRM node. */
static void describe(const char *bdf)
{
    char path[300], link[300], node[300] = "";
    const char *driver = "none bound (modprobe mgpu_drm, or mgpu)";
    snprintf(path, sizeof(path), SYSFS "/%s/driver", bdf);
    ssize_t n = readlink(path, link, sizeof(link) - 1);
    if (n > 0) {
        link[n] = 0;
        driver = strrchr(link, '/') + 1;
    }
    snprintf(path, sizeof(path), SYSFS "/%s/drm", bdf);
    DIR *dir = opendir(path);
    struct dirent *entry;
    while (dir && (entry = readdir(dir)))
        if (!strncmp(entry->d_name, "renderD", 7))
            snprintf(node, sizeof(node), ", /dev/dri/%.200s", entry->d_name);
    if (dir)
        closedir(dir);
    int slot = slot_of(bdf);
    fprintf(stderr, "mgpu-probe: %s: mgpu GPU", bdf);
    if (slot > 0)
        fprintf(stderr, " in PCI slot %d (run_qemu.sh's gpu%d)", slot, slot - 1);
    fprintf(stderr, ", driver %s%s\n", driver, node);
}

/* One BDF per line on stdout (mgpu-probe info $(mgpu-probe find) works), details on
 * stderr. */
static int cmd_find(void)
{
    DIR *dir = opendir(SYSFS);
    struct dirent *entry;
    int found = 0;
    if (!dir)
        die("cannot list " SYSFS ": %s", strerror(errno));
    while ((entry = readdir(dir))) {
        if (entry->d_name[0] == '.')
            continue;
        if (read_hex_file(entry->d_name, "vendor") == MGPU_VENDOR_ID &&
            read_hex_file(entry->d_name, "device") == MGPU_DEVICE_ID) {
            printf("%s\n", entry->d_name);
            fflush(stdout);
            describe(entry->d_name);
            found++;
        }
    }
    closedir(dir);
    if (!found)
        fprintf(stderr, "mgpu-probe: no mgpu device found\n");
    return found ? 0 : 1;
}

static int cmd_info(const char *bdf)
{
    char path[256];
    uint8_t config[4096];
    printf("MGPU-RESULT vendor=0x%04lx\n", read_hex_file(bdf, "vendor"));
    printf("MGPU-RESULT device=0x%04lx\n", read_hex_file(bdf, "device"));
    printf("MGPU-RESULT class=0x%06lx\n", read_hex_file(bdf, "class"));

    snprintf(path, sizeof(path), SYSFS "/%s/resource", bdf);
    FILE *f = fopen(path, "r");
    if (!f)
        die("cannot read %s: %s", path, strerror(errno));
    for (int i = 0; i < 7; i++) {
        unsigned long long start, end, flags;
        if (fscanf(f, "%llx %llx %llx", &start, &end, &flags) != 3)
            break;
        unsigned long long size = (start || end) ? end - start + 1 : 0;
        printf("MGPU-RESULT bar%d_size=0x%llx\n", i, size);
        printf("MGPU-RESULT bar%d_flags=0x%llx\n", i, flags);
    }
    fclose(f);

    snprintf(path, sizeof(path), SYSFS "/%s/config", bdf);
    int fd = open(path, O_RDONLY);
    ssize_t got = fd < 0 ? -1 : pread(fd, config, sizeof(config), 0);
    if (got < 256)
        die("cannot read config space %s: %s", path, strerror(errno));
    close(fd);
    printf("MGPU-RESULT config_size=%zd\n", got);
    printf("MGPU-RESULT caps=");
    int guard = 0;
    for (uint8_t ptr = config[0x34] & ~3; ptr && guard < 48; ptr = config[ptr + 1] & ~3, guard++)
        printf("%s%02x", guard ? "," : "", config[ptr]);
    printf("\nMGPU-RESULT ext_caps=");
    guard = 0;
    if (got == 4096) {
        for (unsigned ptr = 0x100; ptr && ptr < 4096 && guard < 64; guard++) {
            uint32_t header = *(uint32_t *)&config[ptr];
            if (!header)
                break;
            printf("%s%04x", guard ? "," : "", header & 0xffff);
            ptr = (header >> 20) & ~3u;
        }
    }
    printf("\n");
    return 0;
}

static double now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1e9 + ts.tv_nsec;
}

static int compare_doubles(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

/* The start, size and flags of BAR ``index`` from sysfs ``resource``. */
static void bar_resource(const char *bdf, int index, unsigned long long *start,
                         unsigned long long *size, unsigned long long *flags)
{
    char path[256];
    unsigned long long end = 0;
    snprintf(path, sizeof(path), SYSFS "/%s/resource", bdf);
    FILE *f = fopen(path, "r");
    if (!f)
        die("cannot read %s: %s", path, strerror(errno));
    for (int i = 0; i <= index; i++)
        if (fscanf(f, "%llx %llx %llx", start, &end, flags) != 3)
            die("no BAR %d in %s", index, path);
    fclose(f);
    *size = (*start || end) ? end - *start + 1 : 0;
}

#define IORESOURCE_IO 0x100

/* Times trapped 32-bit reads: MMIO through the sysfs mapping, or port I/O (inl) for
 * an I/O BAR (libvfio-user's gpio sample has one), each a message to the server. */
static int cmd_latency(const char *bdf, int index, uint64_t offset, long count)
{
    unsigned long long start, size, flags;
    bar_resource(bdf, index, &start, &size, &flags);
    int io = (flags & IORESOURCE_IO) != 0;
    struct bar bar = { NULL, size };
    if (io) {
        enable_device(bdf);
        check_range(&bar, offset, 4);
        if (ioperm(start, size, 1) < 0)
            die("cannot get port access to 0x%llx+0x%llx: %s", start, size, strerror(errno));
    } else {
        bar = map_bar(bdf, index);
        check_range(&bar, offset, 4);
    }
    if (count <= 0 || count > 1000000)
        die("count must be 1..1000000");
    double *samples = calloc(count, sizeof(double)), total = 0;
    for (long i = 0; i < count; i++) {
        double t0 = now_ns();
        if (io)
            (void)inl((unsigned short)(start + offset));
        else
            (void)rd32(&bar, offset);
        samples[i] = now_ns() - t0;
        total += samples[i];
    }
    qsort(samples, count, sizeof(double), compare_doubles);
    printf("MGPU-RESULT count=%ld\n", count);
    printf("MGPU-RESULT io_port=%d\n", io);
    printf("MGPU-RESULT min_ns=%.0f\n", samples[0]);
    printf("MGPU-RESULT median_ns=%.0f\n", samples[count / 2]);
    printf("MGPU-RESULT p99_ns=%.0f\n", samples[(long)(count * 0.99)]);
    printf("MGPU-RESULT mean_ns=%.0f\n", total / count);
    free(samples);
    return 0;
}

static int cmd_pattern(const char *bdf, int index, uint64_t offset, uint64_t length,
                       uint32_t seed, int fill)
{
    struct bar bar = map_bar(bdf, index);
    check_range(&bar, offset, length);
    uint64_t words = length / 4, bad = 0;
    double t0 = now_ns();
    for (uint64_t i = 0; i < words; i++) {
        if (fill)
            wr32(&bar, offset + 4 * i, pattern_word(seed, i));
        else if (rd32(&bar, offset + 4 * i) != pattern_word(seed, i) && bad++ == 0)
            fprintf(stderr, "mgpu-probe: first mismatch at 0x%" PRIx64 "\n", offset + 4 * i);
    }
    double elapsed = now_ns() - t0;
    printf("MGPU-RESULT bytes=%" PRIu64 "\n", length);
    printf("MGPU-RESULT ns_per_word=%.1f\n", words ? elapsed / words : 0.0);
    printf("MGPU-RESULT elapsed_ns=%.0f\n", elapsed);
    if (!fill)
        printf("MGPU-RESULT mismatches=%" PRIu64 "\n", bad);
    return bad ? 1 : 0;
}

/* A page of locked memory and its physical address, for DMA without an IOMMU. */
static void *dma_page(uint64_t *physical)
{
    void *page = mmap(NULL, 4096, PROT_READ | PROT_WRITE,
                      MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE | MAP_LOCKED, -1, 0);
    if (page == MAP_FAILED)
        die("cannot allocate a locked page: %s", strerror(errno));
    memset(page, 0, 4096);
    int fd = open("/proc/self/pagemap", O_RDONLY);
    uint64_t entry;
    if (fd < 0 || pread(fd, &entry, 8, ((uintptr_t)page / 4096) * 8) != 8)
        die("cannot read /proc/self/pagemap: %s", strerror(errno));
    close(fd);
    if (!(entry & (1ull << 63)) || !(entry & ((1ull << 55) - 1)))
        die("page not present or PFN hidden (run as root)");
    *physical = (entry & ((1ull << 55) - 1)) * 4096;
    return page;
}

/* Like pci_set_master(): without bus mastering the device's DMA goes nowhere. */
static void set_bus_master(const char *bdf)
{
    char path[256];
    uint16_t command;
    snprintf(path, sizeof(path), SYSFS "/%s/config", bdf);
    int fd = open(path, O_RDWR);
    if (fd < 0 || pread(fd, &command, 2, 4) != 2)
        die("cannot read the command register of %s: %s", bdf, strerror(errno));
    if (!(command & 0x4)) {
        command |= 0x4;
        if (pwrite(fd, &command, 2, 4) != 2)
            die("cannot enable bus mastering on %s: %s", bdf, strerror(errno));
    }
    close(fd);
}

/* Bring-up DMA: copy a page between guest RAM and the aperture, checked both ways. */
static int cmd_dma(const char *bdf, const char *direction, uint64_t aperture_offset,
                   uint64_t length, uint32_t seed)
{
    struct bar regs = map_bar(bdf, 0), aperture = map_bar(bdf, 2);
    uint64_t physical;
    set_bus_master(bdf);
    uint32_t *page = dma_page(&physical);
    int to_device = !strcmp(direction, "to-aperture");
    if (!to_device && strcmp(direction, "from-aperture"))
        die("direction is to-aperture or from-aperture");
    if (length == 0 || length > 4096 || (length & 3))
        die("length must be 4..4096 and a multiple of 4");
    check_range(&aperture, aperture_offset, length);
    for (uint64_t i = 0; i < length / 4; i++) {
        if (to_device)
            page[i] = pattern_word(seed, i);
        else
            wr32(&aperture, aperture_offset + 4 * i, pattern_word(seed, i));
    }
    wr32(&regs, MGPU_REG_DMA_GUEST_ADDR_LO, (uint32_t)physical);
    wr32(&regs, MGPU_REG_DMA_GUEST_ADDR_HI, (uint32_t)(physical >> 32));
    wr32(&regs, MGPU_REG_DMA_APERTURE_OFFSET, (uint32_t)aperture_offset);
    wr32(&regs, MGPU_REG_DMA_LENGTH, (uint32_t)length);
    double t0 = now_ns();
    wr32(&regs, MGPU_REG_DMA_CONTROL, to_device ? MGPU_DMA_TO_APERTURE : MGPU_DMA_FROM_APERTURE);
    uint32_t status;
    while ((status = rd32(&regs, MGPU_REG_DMA_STATUS)) == MGPU_DMA_STATUS_BUSY)
        if (now_ns() - t0 > 10e9)
            die("DMA did not finish in 10 s");
    printf("MGPU-RESULT guest_physical=0x%" PRIx64 "\n", physical);
    printf("MGPU-RESULT status=%u\n", status);
    printf("MGPU-RESULT error=%u\n", rd32(&regs, MGPU_REG_DMA_ERROR));
    printf("MGPU-RESULT dma_ns=%.0f\n", now_ns() - t0);
    uint64_t bad = 0;
    for (uint64_t i = 0; i < length / 4; i++) {
        uint32_t got = to_device ? rd32(&aperture, aperture_offset + 4 * i) : page[i];
        bad += got != pattern_word(seed, i);
    }
    printf("MGPU-RESULT mismatches=%" PRIu64 "\n", bad);
    return status == MGPU_DMA_STATUS_DONE && !bad ? 0 : 1;
}

/* The lost-write race: for ROUNDS rounds over PAGES aperture pages from OFFSET, the
 * device (bring-up DMA) writes the right half of a page while this CPU keeps writing
 * the left half of the same page until the DMA is done; then both halves must hold
 * their round's values, on every page.  Bytes lost to a stale page written back
 * show as mismatches. */
static int cmd_race(const char *bdf, uint64_t offset, uint64_t pages, uint64_t rounds)
{
    struct bar regs = map_bar(bdf, 0), aperture = map_bar(bdf, 2);
    uint64_t physical;
    set_bus_master(bdf);
    uint32_t *page = dma_page(&physical);
    check_range(&aperture, offset, pages * 4096);
    uint64_t bad = 0, guest_writes = 0;
    double t0 = now_ns();
    for (uint64_t round = 1; round <= rounds; round++) {
        uint32_t device_word = 0xD0000000u | (uint32_t)round;
        uint32_t guest_word = 0x60000000u | (uint32_t)round;
        for (int i = 0; i < 512; i++)
            page[i] = device_word;
        for (uint64_t p = 0; p < pages; p++) {
            uint64_t base = offset + p * 4096;
            wr32(&regs, MGPU_REG_DMA_GUEST_ADDR_LO, (uint32_t)physical);
            wr32(&regs, MGPU_REG_DMA_GUEST_ADDR_HI, (uint32_t)(physical >> 32));
            wr32(&regs, MGPU_REG_DMA_APERTURE_OFFSET, (uint32_t)(base + 2048));
            wr32(&regs, MGPU_REG_DMA_LENGTH, 2048);
            wr32(&regs, MGPU_REG_DMA_CONTROL, MGPU_DMA_TO_APERTURE);
            int i = 0;
            do {  /* write the left half, over and over, while the device writes */
                wr32(&aperture, base + 4 * (i++ % 512), guest_word);
                guest_writes++;
            } while (rd32(&regs, MGPU_REG_DMA_STATUS) == MGPU_DMA_STATUS_BUSY || i < 512);
            if (rd32(&regs, MGPU_REG_DMA_STATUS) != MGPU_DMA_STATUS_DONE)
                die("DMA failed: error %u", rd32(&regs, MGPU_REG_DMA_ERROR));
        }
        for (uint64_t p = 0; p < pages; p++)
            for (int i = 0; i < 1024; i++)
                bad += rd32(&aperture, offset + p * 4096 + 4 * i) != (i < 512 ? guest_word
                                                                            : device_word);
    }
    printf("MGPU-RESULT rounds=%" PRIu64 "\n", rounds);
    printf("MGPU-RESULT guest_writes=%" PRIu64 "\n", guest_writes);
    printf("MGPU-RESULT mismatches=%" PRIu64 "\n", bad);
    printf("MGPU-RESULT ns=%.0f\n", now_ns() - t0);
    return bad ? 1 : 0;
}

/* Resource commands through the RES_* registers. */
static int cmd_res(const char *bdf, const char *what, uint64_t argument)
{
    struct bar regs = map_bar(bdf, 0);
    uint32_t command;
    if (!strcmp(what, "create")) {
        wr32(&regs, MGPU_REG_RES_SIZE_LO, (uint32_t)argument);
        wr32(&regs, MGPU_REG_RES_SIZE_HI, (uint32_t)(argument >> 32));
        command = MGPU_RES_CREATE;
    } else {
        wr32(&regs, MGPU_REG_RES_HANDLE, (uint32_t)argument);
        if (!strcmp(what, "destroy"))
            command = MGPU_RES_DESTROY;
        else if (!strcmp(what, "place"))
            command = MGPU_RES_PLACE;
        else if (!strcmp(what, "remove"))
            command = MGPU_RES_REMOVE;
        else
            die("resource command is create, destroy, place or remove");
    }
    wr32(&regs, MGPU_REG_RES_COMMAND, command);
    uint32_t status = rd32(&regs, MGPU_REG_RES_STATUS);
    printf("MGPU-RESULT status=%u\n", status);
    if (command == MGPU_RES_CREATE)
        printf("MGPU-RESULT handle=%u\n", rd32(&regs, MGPU_REG_RES_HANDLE));
    if (command == MGPU_RES_PLACE)
        printf("MGPU-RESULT offset=0x%x\n", rd32(&regs, MGPU_REG_RES_OFFSET_LO));
    return status ? 1 : 0;
}

static void wr64(struct bar *regs, uint64_t lo, uint64_t value)
{
    wr32(regs, lo, (uint32_t)value);
    wr32(regs, lo + 4, (uint32_t)(value >> 32));
}

/* GPU MMU: map LENGTH bytes of HANDLE from RES_OFFSET at APERTURE_OFFSET ("any": the
 * device chooses), or unmap LENGTH bytes of the aperture. */
static int cmd_map(const char *bdf, uint32_t handle, const char *where, uint64_t res_offset,
                   uint64_t length)
{
    struct bar regs = map_bar(bdf, 0);
    int anywhere = !strcmp(where, "any");
    wr32(&regs, MGPU_REG_RES_HANDLE, handle);
    wr64(&regs, MGPU_REG_RES_APERTURE_LO, anywhere ? 0 : parse(where));
    wr64(&regs, MGPU_REG_RES_RANGE_OFFSET_LO, res_offset);
    wr64(&regs, MGPU_REG_RES_RANGE_LENGTH_LO, length);
    wr32(&regs, MGPU_REG_RES_COMMAND, anywhere ? MGPU_RES_MAP_ANY : MGPU_RES_MAP);
    uint32_t status = rd32(&regs, MGPU_REG_RES_STATUS);
    printf("MGPU-RESULT status=%u\n", status);
    printf("MGPU-RESULT offset=0x%x\n", rd32(&regs, MGPU_REG_RES_OFFSET_LO));
    return status ? 1 : 0;
}

static int cmd_unmap(const char *bdf, uint64_t aperture_offset, uint64_t length)
{
    struct bar regs = map_bar(bdf, 0);
    wr64(&regs, MGPU_REG_RES_APERTURE_LO, aperture_offset);
    wr64(&regs, MGPU_REG_RES_RANGE_LENGTH_LO, length);
    wr32(&regs, MGPU_REG_RES_COMMAND, MGPU_RES_UNMAP);
    uint32_t status = rd32(&regs, MGPU_REG_RES_STATUS);
    printf("MGPU-RESULT status=%u\n", status);
    return status ? 1 : 0;
}

static void usage(void)
{
    fprintf(stderr,
            "usage: mgpu-probe find\n"
            "       mgpu-probe info BDF\n"
            "       mgpu-probe read BDF BAR OFFSET\n"
            "       mgpu-probe write BDF BAR OFFSET VALUE\n"
            "       mgpu-probe latency BDF BAR OFFSET COUNT\n"
            "       mgpu-probe fill|check BDF BAR OFFSET LENGTH SEED\n"
            "       mgpu-probe dma BDF to-aperture|from-aperture APERTURE_OFFSET LENGTH SEED\n"
            "       mgpu-probe res BDF create SIZE | destroy|place|remove HANDLE\n"
            "       mgpu-probe map BDF HANDLE APERTURE_OFFSET|any RES_OFFSET LENGTH\n"
            "       mgpu-probe unmap BDF APERTURE_OFFSET LENGTH\n"
            "       mgpu-probe race BDF APERTURE_OFFSET PAGES ROUNDS\n");
    exit(2);
}

int main(int argc, char **argv)
{
    if (argc < 2)
        usage();
    const char *cmd = argv[1];
    if (!strcmp(cmd, "find") && argc == 2)
        return cmd_find();
    if (!strcmp(cmd, "info") && argc == 3)
        return cmd_info(argv[2]);
    if (!strcmp(cmd, "read") && argc == 5) {
        struct bar bar = map_bar(argv[2], (int)parse(argv[3]));
        uint64_t offset = parse(argv[4]);
        check_range(&bar, offset, 4);
        printf("MGPU-RESULT value=0x%08x\n", rd32(&bar, offset));
        return 0;
    }
    if (!strcmp(cmd, "write") && argc == 6) {
        struct bar bar = map_bar(argv[2], (int)parse(argv[3]));
        uint64_t offset = parse(argv[4]);
        check_range(&bar, offset, 4);
        wr32(&bar, offset, (uint32_t)parse(argv[5]));
        return 0;
    }
    if (!strcmp(cmd, "latency") && argc == 6)
        return cmd_latency(argv[2], (int)parse(argv[3]), parse(argv[4]), (long)parse(argv[5]));
    if ((!strcmp(cmd, "fill") || !strcmp(cmd, "check")) && argc == 7)
        return cmd_pattern(argv[2], (int)parse(argv[3]), parse(argv[4]), parse(argv[5]),
                           (uint32_t)parse(argv[6]), !strcmp(cmd, "fill"));
    if (!strcmp(cmd, "res") && argc == 5)
        return cmd_res(argv[2], argv[3], parse(argv[4]));
    if (!strcmp(cmd, "map") && argc == 7)
        return cmd_map(argv[2], (uint32_t)parse(argv[3]), argv[4], parse(argv[5]), parse(argv[6]));
    if (!strcmp(cmd, "race") && argc == 6)
        return cmd_race(argv[2], parse(argv[3]), parse(argv[4]), parse(argv[5]));
    if (!strcmp(cmd, "unmap") && argc == 5)
        return cmd_unmap(argv[2], parse(argv[3]), parse(argv[4]));
    if (!strcmp(cmd, "dma") && argc == 7)
        return cmd_dma(argv[2], argv[3], parse(argv[4]), parse(argv[5]), (uint32_t)parse(argv[6]));
    usage();
    return 2;
}
