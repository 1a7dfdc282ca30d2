/* oneDNN's matmul at the model's linear shapes, f32 and bf16 (bf16 source and weights, f32
 * bias and output; the source's f32 -> bf16 reorder timed with it, as the op must do it), to
 * compare with `cargo run --release -p fleet-kernels --example gemm_rate`. Not built by cargo:
 *
 *   apt-get install libdnnl-dev
 *   cc -O2 -o /tmp/onednn_matmul kernels/benches/onednn_matmul.c -ldnnl
 *   OMP_NUM_THREADS=$(nproc) /tmp/onednn_matmul 2048
 */
#include <oneapi/dnnl/dnnl.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

#define CHECK(x) do { dnnl_status_t s_ = (x); if (s_ != dnnl_success) { \
    fprintf(stderr, "%s: status %d\n", #x, (int)s_); exit(1); } } while (0)

static double now(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec + t.tv_nsec * 1e-9;
}

static dnnl_memory_t mem(dnnl_engine_t eng, dnnl_dims_t dims, int nd, dnnl_data_type_t dt,
                         dnnl_format_tag_t tag) {
  dnnl_memory_desc_t md;
  dnnl_memory_t m;
  CHECK(dnnl_memory_desc_init_by_tag(&md, nd, dims, dt, tag));
  CHECK(dnnl_memory_create(&m, &md, eng, DNNL_MEMORY_ALLOCATE));
  return m;
}

static void fill(dnnl_memory_t m, size_t n, float scale) {
  float *p;
  CHECK(dnnl_memory_get_data_handle(m, (void **)&p));
  for (size_t i = 0; i < n; i++) p[i] = scale * ((float)rand() / RAND_MAX - 0.5f);
}

/* Best seconds per call over 5 rounds of >= 0.2 s. */
static double best(dnnl_stream_t st, dnnl_primitive_t pre, int npre, dnnl_exec_arg_t *apre,
                   dnnl_primitive_t p, int nargs, dnnl_exec_arg_t *args) {
  double b = 1e9;
  for (int round = 0; round < 6; round++) {
    double t0 = now();
    int n = 0;
    do {
      if (pre) CHECK(dnnl_primitive_execute(pre, st, npre, apre));
      CHECK(dnnl_primitive_execute(p, st, nargs, args));
      CHECK(dnnl_stream_wait(st));
      n++;
    } while (now() - t0 < 0.2);
    if (round > 0 && (now() - t0) / n < b) b = (now() - t0) / n;
  }
  return b;
}

static double run(dnnl_engine_t eng, dnnl_stream_t st, long m, long k, long n, int bf16) {
  dnnl_dims_t sd = {m, k}, wd = {k, n}, bd = {1, n}, dd = {m, n};
  dnnl_data_type_t lo = bf16 ? dnnl_bf16 : dnnl_f32;
  dnnl_memory_t src32 = mem(eng, sd, 2, dnnl_f32, dnnl_ab);
  fill(src32, m * k, 2.0f);
  dnnl_memory_t bias = mem(eng, bd, 2, dnnl_f32, dnnl_ab);
  fill(bias, n, 0.2f);
  dnnl_memory_t dst = mem(eng, dd, 2, dnnl_f32, dnnl_ab);
  /* Weights [k, n] read from PyTorch's [n, k] (format ba), reordered once into the layout
   * the primitive picks (format any), as a load-time packing would. */
  dnnl_memory_t w32 = mem(eng, wd, 2, dnnl_f32, dnnl_ba);
  fill(w32, n * k, 0.1f);

  dnnl_memory_desc_t smd, wmd, bmd, dmd, wany;
  CHECK(dnnl_memory_desc_init_by_tag(&smd, 2, sd, lo, dnnl_ab));
  CHECK(dnnl_memory_desc_init_by_tag(&wany, 2, wd, lo, dnnl_format_tag_any));
  CHECK(dnnl_memory_desc_init_by_tag(&bmd, 2, bd, dnnl_f32, dnnl_ab));
  CHECK(dnnl_memory_desc_init_by_tag(&dmd, 2, dd, dnnl_f32, dnnl_ab));
  dnnl_matmul_desc_t mmd;
  CHECK(dnnl_matmul_desc_init(&mmd, &smd, &wany, &bmd, &dmd));
  dnnl_primitive_desc_t pd;
  CHECK(dnnl_primitive_desc_create(&pd, &mmd, NULL, eng, NULL));
  const char *impl;
  CHECK(dnnl_primitive_desc_query(pd, dnnl_query_impl_info_str, 0, &impl));
  wmd = *dnnl_primitive_desc_query_md(pd, dnnl_query_weights_md, 0);
  dnnl_memory_t wp;
  CHECK(dnnl_memory_create(&wp, &wmd, eng, DNNL_MEMORY_ALLOCATE));
  dnnl_primitive_desc_t rpd;
  dnnl_primitive_t r;
  const dnnl_memory_desc_t *w32md;
  CHECK(dnnl_memory_get_memory_desc(w32, &w32md));
  CHECK(dnnl_reorder_primitive_desc_create(&rpd, w32md, eng, &wmd, eng, NULL));
  CHECK(dnnl_primitive_create(&r, rpd));
  dnnl_exec_arg_t ra[2] = {{DNNL_ARG_FROM, w32}, {DNNL_ARG_TO, wp}};
  CHECK(dnnl_primitive_execute(r, st, 2, ra));
  CHECK(dnnl_stream_wait(st));

  dnnl_memory_t src = src32;
  dnnl_primitive_t sr = NULL;
  dnnl_exec_arg_t sa[2];
  if (bf16) {
    src = mem(eng, sd, 2, dnnl_bf16, dnnl_ab);
    dnnl_primitive_desc_t spd;
    dnnl_memory_desc_t s32md;
    CHECK(dnnl_memory_desc_init_by_tag(&s32md, 2, sd, dnnl_f32, dnnl_ab));
    CHECK(dnnl_reorder_primitive_desc_create(&spd, &s32md, eng, &smd, eng, NULL));
    CHECK(dnnl_primitive_create(&sr, spd));
    sa[0] = (dnnl_exec_arg_t){DNNL_ARG_FROM, src32};
    sa[1] = (dnnl_exec_arg_t){DNNL_ARG_TO, src};
  }
  dnnl_primitive_t p;
  CHECK(dnnl_primitive_create(&p, pd));
  dnnl_exec_arg_t args[4] = {{DNNL_ARG_SRC, src}, {DNNL_ARG_WEIGHTS, wp},
                             {DNNL_ARG_BIAS, bias}, {DNNL_ARG_DST, dst}};
  double s = best(st, sr, 2, sa, p, 4, args);
  printf("rows %5ld [%4ld -> %4ld] %s: %6.1f GFLOP/s (%s)\n", m, k, n, bf16 ? "bf16" : "f32 ",
         2.0 * m * n * k / s / 1e9, impl);
  return s;
}

int main(int argc, char **argv) {
  long m = argc > 1 ? atol(argv[1]) : 2048;
  dnnl_engine_t eng;
  dnnl_stream_t st;
  CHECK(dnnl_engine_create(&eng, dnnl_cpu, 0));
  CHECK(dnnl_stream_create(&st, eng, dnnl_stream_default_flags));
  long shapes[4][2] = {{384, 1152}, {384, 384}, {384, 1536}, {1536, 384}};
  for (int i = 0; i < 4; i++)
    for (int bf = 0; bf < 2; bf++) run(eng, st, m, shapes[i][0], shapes[i][1], bf);
  return 0;
}
