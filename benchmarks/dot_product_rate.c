/* Peak multiply-accumulate rate of one core, per instruction kind, as one JSON line.
 *
 * Why: oneDNN's bfloat16 kernels without AMX are built on AVX512-BF16's VDPBF16PS, INT8 ones
 * on AVX512-VNNI's VPDPBUSD, float32 ones on VFMADD231PS. Whether bfloat16 can beat float32 on
 * a CPU is decided by how many of each the core retires per cycle, which a CPU flag does not
 * say (BENCHMARKS.md, "Why bfloat16 is slow on the Emerald Rapids Xeon without AMX").
 *
 * Each kind runs 24 independent accumulators in registers (no memory traffic, no dependency
 * chains to wait on), so the rate is the instruction's throughput. A chain of dependent
 * IMULs (3 cycles each on every x86 core of this decade) estimates the clock.
 *
 * Build and run (gcc 10 or newer; kinds the CPU lacks are reported as null):
 *   gcc -O2 -mavx512f -mavx512bf16 -mavx512vnni -o /tmp/dot_product_rate \
 *       benchmarks/dot_product_rate.c && /tmp/dot_product_rate
 */
#include <stdio.h>
#include <time.h>

#define N 25000000L
#define R4(op, r0, r1, r2, r3) op " %%zmm30,%%zmm31,%%zmm" #r0 "\n" op " %%zmm30,%%zmm31,%%zmm" #r1 \
    "\n" op " %%zmm30,%%zmm31,%%zmm" #r2 "\n" op " %%zmm30,%%zmm31,%%zmm" #r3 "\n"
#define R24(op) R4(op, 0, 1, 2, 3) R4(op, 4, 5, 6, 7) R4(op, 8, 9, 10, 11) \
    R4(op, 12, 13, 14, 15) R4(op, 16, 17, 18, 19) R4(op, 20, 21, 22, 23)
#define CLOBBERS "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6", "xmm7", "xmm8", "xmm9", \
    "xmm10", "xmm11", "xmm12", "xmm13", "xmm14", "xmm15", "xmm16", "xmm17", "xmm18", "xmm19", \
    "xmm20", "xmm21", "xmm22", "xmm23"

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

/* Instructions per second of each kind. */
static double fma_rate(void) {
    double t = now();
    for (long i = 0; i < N; i++) __asm__ volatile(R24("vfmadd231ps") ::: CLOBBERS);
    return 24.0 * N / (now() - t);
}
static double dpbf16_rate(void) {
    double t = now();
    for (long i = 0; i < N; i++) __asm__ volatile(R24("vdpbf16ps") ::: CLOBBERS);
    return 24.0 * N / (now() - t);
}
static double dpbusd_rate(void) {
    double t = now();
    for (long i = 0; i < N; i++) __asm__ volatile(R24("vpdpbusd") ::: CLOBBERS);
    return 24.0 * N / (now() - t);
}
static double clock_hz(void) {
    long x = 3;
    double t = now();
    for (long i = 0; i < N; i++)
        __asm__ volatile("imul %0,%0\n imul %0,%0\n imul %0,%0\n imul %0,%0\n" : "+r"(x));
    return 4 * 3.0 * N / (now() - t);
}

static void field(const char *name, double value, const char *sep) {
    if (value > 0) printf("\"%s\": %.2f%s", name, value, sep);
    else printf("\"%s\": null%s", name, sep);
}

int main(void) {
    __builtin_cpu_init();
    if (!__builtin_cpu_supports("avx512f")) {
        printf("{\"error\": \"no AVX-512 on this CPU: nothing to measure\"}\n");
        return 1;
    }
    __asm__ volatile("vpxord %%zmm30,%%zmm30,%%zmm30\n vpxord %%zmm31,%%zmm31,%%zmm31" ::: "xmm30", "xmm31");
    double hz = clock_hz();
    double fma = fma_rate();
    double bf16 = __builtin_cpu_supports("avx512bf16") ? dpbf16_rate() : 0;
    double vnni = __builtin_cpu_supports("avx512vnni") ? dpbusd_rate() : 0;
    /* MACs per instruction on 512 bits: 16 float32, 32 bfloat16 pairs, 64 int8 quadruples. */
    printf("{\"what\": \"dot_product_rate\", \"clock_ghz\": %.2f, ", hz / 1e9);
    field("fp32_mac_per_cycle", 16 * fma / hz, ", ");
    field("bf16_mac_per_cycle", 32 * bf16 / hz, ", ");
    field("int8_mac_per_cycle", 64 * vnni / hz, ", ");
    field("bf16_vs_fp32", bf16 > 0 ? 2 * bf16 / fma : 0, ", ");
    field("int8_vs_fp32", vnni > 0 ? 4 * vnni / fma : 0, "}\n");
    return 0;
}
