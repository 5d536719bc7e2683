/* The CPU's float32 FMA peak, a witness for the Gram's fraction of peak (issue 17, goal 1).

   `benchmark_aggregators.py` measures its "peak" as the faster of a 4,096² float32 matmul in jax
   and in NumPy: what a library reaches, not what the cores can do. This loop measures the
   latter: each OpenMP thread runs 12 independent chains of 8-lane fused multiply-adds (AVX2,
   enough to cover the FMA latency on two pipes; distinct starts, so that the compiler cannot merge
   them: check `objdump -d` for 12 `vfmadd` in the loop), so it reports 2 FLOP per lane per FMA
   at the cores' sustained clock.

     gcc -O2 -mavx2 -mfma -fopenmp experiments/fma_peak.c -o /tmp/fma_peak
     OMP_NUM_THREADS=2 /tmp/fma_peak; OMP_NUM_THREADS=1 /tmp/fma_peak

   Needs an x86-64 CPU with AVX2 and FMA (an AVX-512 CPU's peak is up to twice what it prints).
   `benchmark_aggregators.py` builds and runs it (`--fma_peak`, `_process.fma_peak_gflops`) and
   prints each Gram product's fraction of it; BENCHMARKS.md quotes its figures. */
#include <immintrin.h>
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>

#define CHAINS 12

int main(int argc, char **argv) {
  long iters = argc > 1 ? atol(argv[1]) : 300000000L;
  float sink = 0.0f;
  double start = omp_get_wtime();
#pragma omp parallel reduction(+ : sink)
  {
    __m256 acc[CHAINS];
    const __m256 m = _mm256_set1_ps(0.999999f), c = _mm256_set1_ps(1e-7f);
    // Distinct starts: identical chains may be merged into one by the compiler.
    for (int k = 0; k < CHAINS; k++) acc[k] = _mm256_set1_ps(1.0f + 0.001f * k);
    for (long i = 0; i < iters; i++) {
#pragma GCC unroll 12
      for (int k = 0; k < CHAINS; k++) acc[k] = _mm256_fmadd_ps(acc[k], m, c);
    }
    float out[8];
    __m256 total = acc[0];
    for (int k = 1; k < CHAINS; k++) total = _mm256_add_ps(total, acc[k]);
    _mm256_storeu_ps(out, total);
    sink += out[0];
  }
  double seconds = omp_get_wtime() - start;
  int threads = omp_get_max_threads();
  printf("%d thread(s): %.1f GFLOP/s float32 FMA (checksum %g)\n", threads,
         2.0 * 8 * CHAINS * (double)iters * threads / seconds / 1e9, sink);
  return 0;
}
