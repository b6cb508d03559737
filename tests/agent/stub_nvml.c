/* A stand-in libnvidia-ml.so.1 for tests: two GPUs, built by tests/agent/conftest.py with gcc.
 * bench/agent_cpu.py --stub builds it too and asks for more GPUs with STUB_NVML_GPUS (at most 16).
 *
 * Only the symbols the agent calls exist. Deliberately:
 *   - nvmlDeviceGetTotalEccErrors answers NVML_ERROR_NOT_SUPPORTED (ECC off, like consumer cards);
 *   - nvmlDeviceGetPcieReplayCounter is missing, so pynvml raises NVMLError_FunctionNotFound;
 *   - the first nvmlEventSetWait_v2 delivers XID 79 on GPU 0, later ones time out;
 *   - GPU 0 runs one compute process, pid STUB_PID (4242 unless -DSTUB_PID=...), using 1 GiB.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#ifndef STUB_PID
#define STUB_PID 4242
#endif

typedef int nvmlReturn_t;
enum {
    NVML_SUCCESS = 0, NVML_ERROR_INVALID_ARGUMENT = 2, NVML_ERROR_NOT_SUPPORTED = 3,
    NVML_ERROR_INSUFFICIENT_SIZE = 7, NVML_ERROR_TIMEOUT = 10
};

typedef struct { int index; } device_t;
typedef device_t *nvmlDevice_t;
typedef struct { int used; } event_set_t;
typedef event_set_t *nvmlEventSet_t;

#define MAX_GPUS 16
static device_t devices[MAX_GPUS];
static event_set_t the_set;
static int xid_sent = 0;

typedef struct { unsigned int gpu, memory; } nvmlUtilization_t;
typedef struct { unsigned long long total, free, used; } nvmlMemory_t;
typedef struct {
    unsigned int pid; unsigned long long usedGpuMemory; unsigned int gpuInstanceId, computeInstanceId;
} nvmlProcessInfo_t;
typedef struct {
    nvmlDevice_t device; unsigned long long eventType, eventData; unsigned int gpuInstanceId, computeInstanceId;
} nvmlEventData_t;

static int idx(nvmlDevice_t d) { return d->index; }
static unsigned int gpu_count(void) {
    const char *env = getenv("STUB_NVML_GPUS");
    int n = env ? atoi(env) : 2;
    return n < 1 ? 1 : n > MAX_GPUS ? MAX_GPUS : (unsigned int)n;
}
static nvmlReturn_t copy(char *dst, unsigned int n, const char *src) {
    if (strlen(src) + 1 > n) return NVML_ERROR_INSUFFICIENT_SIZE;
    strcpy(dst, src);
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlInitWithFlags(unsigned int flags) {
    (void)flags;
    for (int i = 0; i < MAX_GPUS; i++) devices[i].index = i;
    return NVML_SUCCESS;
}
nvmlReturn_t nvmlShutdown(void) { return NVML_SUCCESS; }
const char *nvmlErrorString(nvmlReturn_t r) { (void)r; return "stub error"; }
nvmlReturn_t nvmlSystemGetDriverVersion(char *v, unsigned int n) { return copy(v, n, "550.54.15"); }
nvmlReturn_t nvmlSystemGetCudaDriverVersion(int *v) { *v = 12040; return NVML_SUCCESS; }
nvmlReturn_t nvmlDeviceGetCount_v2(unsigned int *c) { *c = gpu_count(); return NVML_SUCCESS; }
nvmlReturn_t nvmlDeviceGetHandleByIndex_v2(unsigned int i, nvmlDevice_t *d) {
    if (i >= gpu_count()) return NVML_ERROR_INVALID_ARGUMENT;
    *d = &devices[i];
    return NVML_SUCCESS;
}
nvmlReturn_t nvmlDeviceGetName(nvmlDevice_t d, char *n, unsigned int len) {
    char name[32];
    snprintf(name, sizeof name, "Stub GPU %c", 'A' + idx(d));
    return copy(n, len, name);
}
nvmlReturn_t nvmlDeviceGetUUID(nvmlDevice_t d, char *u, unsigned int len) {
    char uuid[48];
    snprintf(uuid, sizeof uuid, "GPU-00000000-0000-0000-0000-%012d", idx(d));
    return copy(u, len, uuid);
}
nvmlReturn_t nvmlDeviceGetMigMode(nvmlDevice_t d, unsigned int *cur, unsigned int *pend) {
    (void)d; *cur = 0; *pend = 0; return NVML_SUCCESS;
}
nvmlReturn_t nvmlDeviceGetUtilizationRates(nvmlDevice_t d, nvmlUtilization_t *u) {
    u->gpu = idx(d) ? 10 : 75; u->memory = idx(d) ? 5 : 40; return NVML_SUCCESS;
}
nvmlReturn_t nvmlDeviceGetMemoryInfo(nvmlDevice_t d, nvmlMemory_t *m) {
    (void)d; m->total = 16ULL << 30; m->used = 4ULL << 30; m->free = 12ULL << 30; return NVML_SUCCESS;
}
nvmlReturn_t nvmlDeviceGetPowerUsage(nvmlDevice_t d, unsigned int *mw) { *mw = idx(d) ? 50000 : 250500; return NVML_SUCCESS; }
nvmlReturn_t nvmlDeviceGetTotalEnergyConsumption(nvmlDevice_t d, unsigned long long *mj) {
    (void)d; *mj = 123456789ULL; return NVML_SUCCESS;
}
nvmlReturn_t nvmlDeviceGetTemperature(nvmlDevice_t d, int sensor, unsigned int *t) {
    (void)sensor; *t = idx(d) ? 40 : 65; return NVML_SUCCESS;
}
nvmlReturn_t nvmlDeviceGetClockInfo(nvmlDevice_t d, int type, unsigned int *mhz) {
    (void)d; *mhz = type == 1 ? 1410 : 1215; return NVML_SUCCESS;
}
nvmlReturn_t nvmlDeviceGetCurrentClocksEventReasons(nvmlDevice_t d, unsigned long long *r) {
    *r = idx(d) ? 0x1ULL : 0x4ULL; return NVML_SUCCESS;  /* GPU 0: sw power cap; GPU 1: idle */
}
nvmlReturn_t nvmlDeviceGetPcieThroughput(nvmlDevice_t d, int counter, unsigned int *kib) {
    (void)d; *kib = counter == 0 ? 1000 : 2000; return NVML_SUCCESS;
}
nvmlReturn_t nvmlDeviceGetRemappedRows(nvmlDevice_t d, unsigned int *c, unsigned int *u, unsigned int *p, unsigned int *f) {
    (void)d; *c = 2; *u = 0; *p = 0; *f = 0; return NVML_SUCCESS;
}
nvmlReturn_t nvmlDeviceGetTotalEccErrors(nvmlDevice_t d, int type, int counter, unsigned long long *n) {
    (void)d; (void)type; (void)counter; (void)n; return NVML_ERROR_NOT_SUPPORTED;
}
nvmlReturn_t nvmlDeviceGetComputeRunningProcesses_v3(nvmlDevice_t d, unsigned int *count, nvmlProcessInfo_t *infos) {
    if (idx(d) != 0) { *count = 0; return NVML_SUCCESS; }
    if (infos == NULL || *count < 1) { *count = 1; return NVML_ERROR_INSUFFICIENT_SIZE; }
    *count = 1;
    infos[0].pid = STUB_PID; infos[0].usedGpuMemory = 1ULL << 30;
    infos[0].gpuInstanceId = 0xFFFFFFFF; infos[0].computeInstanceId = 0xFFFFFFFF;
    return NVML_SUCCESS;
}
nvmlReturn_t nvmlEventSetCreate(nvmlEventSet_t *set) { *set = &the_set; return NVML_SUCCESS; }
nvmlReturn_t nvmlEventSetFree(nvmlEventSet_t set) { (void)set; return NVML_SUCCESS; }
nvmlReturn_t nvmlDeviceRegisterEvents(nvmlDevice_t d, unsigned long long types, nvmlEventSet_t set) {
    (void)d; (void)types; (void)set; return NVML_SUCCESS;
}
nvmlReturn_t nvmlEventSetWait_v2(nvmlEventSet_t set, nvmlEventData_t *data, unsigned int timeout_ms) {
    (void)set;
    if (!xid_sent) {
        xid_sent = 1;
        memset(data, 0, sizeof *data);
        data->device = &devices[0]; data->eventType = 0x8; data->eventData = 79;
        data->gpuInstanceId = 0xFFFFFFFF; data->computeInstanceId = 0xFFFFFFFF;
        return NVML_SUCCESS;
    }
    struct timespec ts = {timeout_ms / 1000, (long)(timeout_ms % 1000) * 1000000L};
    nanosleep(&ts, NULL);
    return NVML_ERROR_TIMEOUT;
}
