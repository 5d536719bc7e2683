/* The CPU's float32 FMA peak, a witness for the Gram's fraction of peak (issue 17, goal 1).

   `benchmark_aggregators.py` measures its "peak" as the faster of a 4,096² float32 matmul in jax
   and in NumPy: what a library reaches, not what the cores can do. This loop measures the
   latter: each OpenMP thread runs 12 independent chains of fused multiply-adds on the widest
   vectors it is built for (16 lanes with AVX-512, else 8 with AVX2; 12 chains cover the FMA
   latency on two pipes; distinct starts, so that the compiler cannot merge them: check
   `objdump -d` for 12 `vfmadd` in the loop), so it reports 2 FLOP per lane per FMA at the cores'
   sustained clock.

     gcc -O2 -mavx2 -mfma -fopenmp experiments/fma_peak.c -o /tmp/fma_peak          # AVX2
     gcc -O2 -mavx512f -mfma -fopenmp experiments/fma_peak.c -o /tmp/fma_peak       # AVX-512
     OMP_NUM_THREADS=2 /tmp/fma_peak; OMP_NUM_THREADS=1 /tmp/fma_peak

   Build it for the widest vectors the CPU has: on a Zen 5 VM the AVX2 build reported half the
   AVX-512 build's peak (216-218 against 436-438 GFLOP/s on two cores; BENCHMARKS.md); a CPU
   whose FMA units are 256 bits wide (Zen 4) should report about the same with both, not
   measured. `benchmark_aggregators.py` builds and runs it this way
   (`--fma_peak`, `_process.fma_peak_gflops`) and prints each Gram product's fraction of it;
   BENCHMARKS.md quotes its figures. */
#include <immintrin.h>
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>

#define CHAINS 12

#ifdef __AVX512F__
#define LANES 16
typedef __m512 vec;
#define set1 _mm512_set1_ps
#define fmadd _mm512_fmadd_ps
#define add _mm512_add_ps
#define storeu _mm512_storeu_ps
#else
#define LANES 8
typedef __m256 vec;
#define set1 _mm256_set1_ps
#define fmadd _mm256_fmadd_ps
#define add _mm256_add_ps
#define storeu _mm256_storeu_ps
#endif

int main(int argc, char **argv) {
  long iters = argc > 1 ? atol(argv[1]) : 300000000L;
  float sink = 0.0f;
  double start = omp_get_wtime();
#pragma omp parallel reduction(+ : sink)
  {
    vec acc[CHAINS];
    const vec m = set1(0.999999f), c = set1(1e-7f);
    // Distinct starts: identical chains may be merged into one by the compiler.
    for (int k = 0; k < CHAINS; k++) acc[k] = set1(1.0f + 0.001f * k);
    for (long i = 0; i < iters; i++) {
#pragma GCC unroll 12
      for (int k = 0; k < CHAINS; k++) acc[k] = fmadd(acc[k], m, c);
    }
    float out[LANES];
    vec total = acc[0];
    for (int k = 1; k < CHAINS; k++) total = add(total, acc[k]);
    storeu(out, total);
    sink += out[0];
  }
  double seconds = omp_get_wtime() - start;
  int threads = omp_get_max_threads();
  printf("%d thread(s), %d lanes: %.1f GFLOP/s float32 FMA (checksum %g)\n", threads, LANES,
         2.0 * LANES * CHAINS * (double)iters * threads / seconds / 1e9, sink);
  return 0;
}
