/*
 * A stand-in libcudart for tests on hosts without CUDA.
 *
 * Implements the runtime calls freekv-core loads (cudaGetDeviceCount, cudaGetDevice,
 * cudaSetDevice, cudaHostRegister, cudaHostUnregister, cudaEventSynchronize,
 * cudaDeviceGetPCIBusId, cudaGetErrorString) and records every call, one line each, in an
 * in-memory log:
 *
 *     <name> tid=<thread> dev=<current device of the thread> arg=<hex> len=<n> rc=<code>
 *
 * `dev` is the calling thread's current device *at the call* (per thread, like CUDA);
 * `arg` is the pointer, event or requested device; `len` the registered length, or the
 * buffer length of cudaDeviceGetPCIBusId (else 0).
 *
 * Control functions (for the tests, through dlsym / ctypes):
 *   fake_cudart_reset()                    clears the log, injected failures and the
 *                                          current device of the calling thread;
 *   fake_cudart_fail(name, skip, code)     the call `name` fails once with `code`
 *                                          after `skip` further calls succeed;
 *   fake_cudart_log(buf, cap)              copies the log (NUL-terminated, truncated to
 *                                          cap) and returns its full length;
 *   fake_cudart_registered()               ranges registered and not unregistered yet.
 *
 * Devices: FAKE_CUDART_DEVICES (default 4) devices exist; cudaSetDevice of another ordinal
 * fails with cudaErrorInvalidDevice (101). Registering a registered pointer fails with 712,
 * unregistering an unknown pointer with 713, as the real runtime does.
 *
 * PCI bus ids: device d is "0000:E<d>:1F.7" in CUDA's format (upper-case hex, 4-digit
 * domain), a bus no host has in sysfs (bus 0xE0 + d, device 0x1f, function 7), so the
 * device has no NUMA affinity; FAKE_CUDART_PCI_BUS_ID, when set, is every device's id.
 */
#define _GNU_SOURCE
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

#define MAX_FAILS 16
#define MAX_RANGES 4096

static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static __thread int current_device = 0;

static char *log_buf = NULL;
static size_t log_len = 0;
static size_t log_cap = 0;

struct fail {
    char name[64];
    int skip;
    int code;
    int armed;
};
static struct fail fails[MAX_FAILS];
static void *ranges[MAX_RANGES];

static int device_count(void) {
    const char *env = getenv("FAKE_CUDART_DEVICES");
    return env ? atoi(env) : 4;
}

static void append(const char *fmt, ...) {
    char line[256];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(line, sizeof line, fmt, ap);
    va_end(ap);
    if (n < 0) return;
    if ((size_t)n >= sizeof line) n = sizeof line - 1;
    if (log_len + (size_t)n + 1 > log_cap) {
        size_t cap = log_cap ? log_cap * 2 : 4096;
        while (cap < log_len + (size_t)n + 1) cap *= 2;
        char *p = realloc(log_buf, cap);
        if (!p) return;
        log_buf = p;
        log_cap = cap;
    }
    memcpy(log_buf + log_len, line, (size_t)n);
    log_len += (size_t)n;
    log_buf[log_len] = '\0';
}

/* Called with `lock` held. Returns the injected code for this call of `name`, or 0. */
static int injected(const char *name) {
    for (int i = 0; i < MAX_FAILS; i++) {
        if (!fails[i].armed || strcmp(fails[i].name, name) != 0) continue;
        if (fails[i].skip > 0) {
            fails[i].skip--;
            continue;
        }
        fails[i].armed = 0;
        return fails[i].code;
    }
    return 0;
}

static void record(const char *name, const void *arg, size_t len, int rc) {
    append("%s tid=%ld dev=%d arg=%p len=%zu rc=%d\n", name, (long)syscall(SYS_gettid),
           current_device, arg, len, rc);
}

int cudaGetDeviceCount(int *count) {
    pthread_mutex_lock(&lock);
    int rc = injected("cudaGetDeviceCount");
    if (rc == 0) *count = device_count();
    pthread_mutex_unlock(&lock);
    return rc;
}

int cudaGetDevice(int *device) {
    pthread_mutex_lock(&lock);
    int rc = injected("cudaGetDevice");
    record("cudaGetDevice", NULL, 0, rc);
    if (rc == 0) *device = current_device;
    pthread_mutex_unlock(&lock);
    return rc;
}

int cudaSetDevice(int device) {
    pthread_mutex_lock(&lock);
    int rc = injected("cudaSetDevice");
    if (rc == 0 && (device < 0 || device >= device_count())) rc = 101;
    record("cudaSetDevice", (const void *)(long)device, 0, rc);
    if (rc == 0) current_device = device;
    pthread_mutex_unlock(&lock);
    return rc;
}

int cudaHostRegister(void *ptr, size_t len, unsigned int flags) {
    (void)flags;
    pthread_mutex_lock(&lock);
    int rc = injected("cudaHostRegister");
    int free_slot = -1;
    for (int i = 0; rc == 0 && i < MAX_RANGES; i++) {
        if (ranges[i] == ptr) rc = 712;
        if (!ranges[i] && free_slot < 0) free_slot = i;
    }
    if (rc == 0 && free_slot < 0) rc = 2;
    if (rc == 0) ranges[free_slot] = ptr;
    record("cudaHostRegister", ptr, len, rc);
    pthread_mutex_unlock(&lock);
    return rc;
}

int cudaHostUnregister(void *ptr) {
    pthread_mutex_lock(&lock);
    int rc = injected("cudaHostUnregister");
    if (rc == 0) {
        rc = 713;
        for (int i = 0; i < MAX_RANGES; i++) {
            if (ranges[i] == ptr) {
                ranges[i] = NULL;
                rc = 0;
                break;
            }
        }
    }
    record("cudaHostUnregister", ptr, 0, rc);
    pthread_mutex_unlock(&lock);
    return rc;
}

int cudaDeviceGetPCIBusId(char *bus_id, int len, int device) {
    pthread_mutex_lock(&lock);
    int rc = injected("cudaDeviceGetPCIBusId");
    if (rc == 0 && (device < 0 || device >= device_count())) rc = 101;
    if (rc == 0 && len < 13) rc = 1; /* cudaErrorInvalidValue: CUDA needs 13 bytes */
    if (rc == 0) {
        const char *fixed = getenv("FAKE_CUDART_PCI_BUS_ID");
        if (fixed)
            snprintf(bus_id, (size_t)len, "%s", fixed);
        else
            snprintf(bus_id, (size_t)len, "0000:%02X:1F.7", 0xE0 + device);
    }
    record("cudaDeviceGetPCIBusId", (const void *)(long)device, (size_t)(len > 0 ? len : 0), rc);
    pthread_mutex_unlock(&lock);
    return rc;
}

int cudaEventSynchronize(void *event) {
    pthread_mutex_lock(&lock);
    int rc = injected("cudaEventSynchronize");
    record("cudaEventSynchronize", event, 0, rc);
    pthread_mutex_unlock(&lock);
    return rc;
}

const char *cudaGetErrorString(int code) {
    switch (code) {
    case 0: return "no error";
    case 1: return "invalid argument";
    case 2: return "out of memory";
    case 101: return "invalid device ordinal";
    case 712: return "part or all of the requested memory range is already mapped";
    case 713: return "pointer does not correspond to a registered memory region";
    default: return "injected failure";
    }
}

void fake_cudart_reset(void) {
    pthread_mutex_lock(&lock);
    log_len = 0;
    if (log_buf) log_buf[0] = '\0';
    memset(fails, 0, sizeof fails);
    current_device = 0;
    pthread_mutex_unlock(&lock);
}

void fake_cudart_fail(const char *name, int skip, int code) {
    pthread_mutex_lock(&lock);
    for (int i = 0; i < MAX_FAILS; i++) {
        if (fails[i].armed) continue;
        snprintf(fails[i].name, sizeof fails[i].name, "%s", name);
        fails[i].skip = skip;
        fails[i].code = code;
        fails[i].armed = 1;
        break;
    }
    pthread_mutex_unlock(&lock);
}

size_t fake_cudart_log(char *buf, size_t cap) {
    pthread_mutex_lock(&lock);
    if (cap > 0) {
        size_t n = log_len < cap - 1 ? log_len : cap - 1;
        if (n) memcpy(buf, log_buf, n);
        buf[n] = '\0';
    }
    size_t total = log_len;
    pthread_mutex_unlock(&lock);
    return total;
}

int fake_cudart_registered(void) {
    pthread_mutex_lock(&lock);
    int n = 0;
    for (int i = 0; i < MAX_RANGES; i++) n += ranges[i] != NULL;
    pthread_mutex_unlock(&lock);
    return n;
}
