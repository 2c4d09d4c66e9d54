// Run-time choice of instruction set, the worker threads, and the C entry points ctypes calls.
//
// Built without any -m flag, so this file runs on every CPU of its architecture.  The per-ISA
// objects (isa_kernels.cpp compiled with -DBQ_ISA_<NAME>) are announced with -DBQ_HAVE_<NAME> by
// kernels/native.py, which compiles only what the compiler accepts.  The best one the CPU supports
// is chosen at load time; bq_select_isa forces another (the BITQAT_CPU_ISA environment variable).
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <mutex>
#include <thread>
#include <vector>

#include "bitkernels.h"

extern "C" __attribute__((visibility("default"))) void bq_maxpool_bits(const uint64_t* x, const BqMaxPoolArgs* p,
                                                                    uint64_t* out);

#if defined(_OPENMP)
#include <omp.h>
#endif

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define BQ_PAUSE() _mm_pause()
#elif defined(__aarch64__)
#define BQ_PAUSE() __asm__ volatile("yield")
#else
#define BQ_PAUSE() ((void)0)
#endif

#define BQ_DECLARE(isa)                                                                             \
  extern "C" void bq_##isa##_conv(const BqConvArgs*);                                              \
  extern "C" void bq_##isa##_ternary_gemm(const uint64_t*, const uint64_t*, int64_t, const uint64_t*, \
                                          const uint64_t*, int64_t, int64_t, int32_t*);              \
  extern "C" int64_t bq_##isa##_pack_rows(const float*, int64_t, int64_t, int64_t, uint64_t*, int64_t); \
  extern "C" int64_t bq_##isa##_pack_planes(const float*, int64_t, int64_t, int64_t, int64_t, uint64_t*); \
  extern "C" int64_t bq_##isa##_peak_bitmacs(int64_t);                                           \
  extern "C" void bq_##isa##_ternary_i8_gemm(const int8_t*, int64_t, int64_t, int64_t, const uint8_t*, int64_t, \
                                             int64_t, int32_t*);                                      \
  extern "C" int64_t bq_##isa##_quantize_i8(const float*, int64_t, int64_t, int64_t, float, int8_t*, int64_t, \
                                            float*);                                                  \
  extern "C" int64_t bq_##isa##_ternary_i8_linear(const float*, int64_t, int64_t, int64_t, float,     \
                                                  const uint8_t*, int64_t, int64_t, float, const float*, float*); \
  extern "C" int64_t bq_##isa##_float_conv_sign(const BqFloatConvSignArgs*);                       \
  extern "C" void bq_##isa##_ternary_i8_lut_gemm(const int8_t*, int64_t, int64_t, int64_t, const uint16_t*, \
                                                 int64_t, int32_t*);

#define BQ_ENTRY(isa, supported)                                                                   \
  {#isa, supported, bq_##isa##_conv, bq_##isa##_ternary_gemm, bq_##isa##_pack_rows,               \
   bq_##isa##_pack_planes, bq_##isa##_peak_bitmacs, bq_##isa##_ternary_i8_gemm, bq_##isa##_quantize_i8, \
   bq_##isa##_ternary_i8_linear, bq_##isa##_float_conv_sign, bq_##isa##_ternary_i8_lut_gemm}

#ifdef BQ_HAVE_SCALAR
BQ_DECLARE(scalar)
#endif
#ifdef BQ_HAVE_POPCNT
BQ_DECLARE(popcnt)
#endif
#ifdef BQ_HAVE_AVX2
BQ_DECLARE(avx2)
#endif
#ifdef BQ_HAVE_AVX512
BQ_DECLARE(avx512)
#endif
#ifdef BQ_HAVE_NEON
BQ_DECLARE(neon)
#endif

namespace {

struct Isa {
  const char* name;
  bool (*supported)();
  void (*conv)(const BqConvArgs*);
  void (*ternary_gemm)(const uint64_t*, const uint64_t*, int64_t, const uint64_t*, const uint64_t*, int64_t,
                       int64_t, int32_t*);
  int64_t (*pack_rows)(const float*, int64_t, int64_t, int64_t, uint64_t*, int64_t);
  int64_t (*pack_planes)(const float*, int64_t, int64_t, int64_t, int64_t, uint64_t*);
  int64_t (*peak_bitmacs)(int64_t);
  void (*ternary_i8_gemm)(const int8_t*, int64_t, int64_t, int64_t, const uint8_t*, int64_t, int64_t, int32_t*);
  int64_t (*quantize_i8)(const float*, int64_t, int64_t, int64_t, float, int8_t*, int64_t, float*);
  int64_t (*ternary_i8_linear)(const float*, int64_t, int64_t, int64_t, float, const uint8_t*, int64_t, int64_t,
                               float, const float*, float*);
  int64_t (*float_conv_sign)(const BqFloatConvSignArgs*);
  void (*ternary_i8_lut_gemm)(const int8_t*, int64_t, int64_t, int64_t, const uint16_t*, int64_t, int32_t*);
};

bool always() { return true; }
#if defined(__x86_64__) || defined(__i386__)
bool has_popcnt() { __builtin_cpu_init(); return __builtin_cpu_supports("popcnt"); }
bool has_avx2() { __builtin_cpu_init(); return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("popcnt"); }
bool has_avx512() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vpopcntdq") &&
         __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx2");
}
#endif

// Best first: the first supported entry is the default.
const Isa kIsas[] = {
#ifdef BQ_HAVE_AVX512
    BQ_ENTRY(avx512, has_avx512),
#endif
#ifdef BQ_HAVE_AVX2
    BQ_ENTRY(avx2, has_avx2),
#endif
#ifdef BQ_HAVE_NEON
    BQ_ENTRY(neon, always),
#endif
#ifdef BQ_HAVE_POPCNT
    BQ_ENTRY(popcnt, has_popcnt),
#endif
#ifdef BQ_HAVE_SCALAR
    BQ_ENTRY(scalar, always),
#endif
};
constexpr int kIsaCount = sizeof(kIsas) / sizeof(kIsas[0]);

const Isa* g_isa = nullptr;

const Isa* default_isa() {
  for (const Isa& isa : kIsas)
    if (isa.supported()) return &isa;
  return nullptr;
}

// ---------------------------------------------------------------------------------------------
// Worker threads.  The caller works too and never waits for a worker that has not started: tasks
// are claimed from an atomic counter, a worker joins the current job only while it is posted, and
// the caller, once every task is claimed, withdraws the job and waits only for the workers that
// joined (each finishing its last task).  Idle workers spin for 30 microseconds (a short gap
// between two large kernels), then sleep on a condition variable.
// ---------------------------------------------------------------------------------------------
struct Job {
  void (*fn)(void*, int64_t);
  void* ctx;
  int64_t tasks;
  std::atomic<int64_t> next{0};
  std::atomic<int> joined{0};
  void work() {
    for (int64_t t; (t = next.fetch_add(1, std::memory_order_relaxed)) < tasks;) fn(ctx, t);
  }
};

class Pool {
 public:
  explicit Pool(int threads) {
    for (int i = 1; i < threads; ++i) workers_.emplace_back([this] { loop(); });
  }
  ~Pool() {
    {
      std::lock_guard<std::mutex> lock(mu_);
      stop_.store(true);
      generation_.fetch_add(1, std::memory_order_release);
    }
    cv_.notify_all();
    for (auto& t : workers_) t.join();
  }
  int threads() const { return (int)workers_.size() + 1; }

  void run(int64_t tasks, void (*fn)(void*, int64_t), void* ctx) {
    if (workers_.empty() || tasks <= 1) {
      for (int64_t t = 0; t < tasks; ++t) fn(ctx, t);
      return;
    }
    std::lock_guard<std::mutex> serial(run_mu_);
    Job job;
    job.fn = fn;
    job.ctx = ctx;
    job.tasks = tasks;
    {
      std::lock_guard<std::mutex> lock(mu_);
      current_ = &job;
      generation_.fetch_add(1, std::memory_order_release);
    }
    cv_.notify_all();
    job.work();
    {
      std::lock_guard<std::mutex> lock(mu_);
      current_ = nullptr;  // from here on nobody joins
    }
    while (job.joined.load(std::memory_order_acquire) != 0) BQ_PAUSE();
  }

 private:
  void loop() {
    uint64_t seen = 0;  // the generation at construction
    for (;;) {
      auto start = std::chrono::steady_clock::now();
      uint64_t now = seen;
      for (int spin = 0; (now = generation_.load(std::memory_order_acquire)) == seen; ++spin) {
        BQ_PAUSE();
        if ((spin & 63) == 63 && std::chrono::steady_clock::now() - start > std::chrono::microseconds(30)) break;
      }
      Job* job = nullptr;
      {
        std::unique_lock<std::mutex> lock(mu_);
        if (now == seen) {
          cv_.wait(lock, [&] { return generation_.load(std::memory_order_acquire) != seen; });
          now = generation_.load(std::memory_order_acquire);
        }
        seen = now;
        if (stop_.load()) return;
        job = current_;
        if (job) job->joined.fetch_add(1, std::memory_order_relaxed);
      }
      if (job) {
        job->work();
        job->joined.fetch_sub(1, std::memory_order_release);
      }
    }
  }

  std::vector<std::thread> workers_;
  std::mutex mu_, run_mu_;
  std::condition_variable cv_;
  std::atomic<uint64_t> generation_{0};
  Job* current_ = nullptr;
  std::atomic<bool> stop_{false};
};

std::mutex g_pool_mu;
Pool* g_pool = nullptr;
int g_threads = 1;

// OpenMP, when the library is built with it, runs the tasks on the OpenMP runtime torch uses: the
// library asks for libgomp.so.1 by soname, which the loader resolves to the copy torch loaded.  The
// two then share one team, instead of two pools spinning against each other between torch's ops and
// ours (each side's idle threads spin for a while after its work, on the cores the other needs).
// Only `omp parallel` (GOMP_parallel, in every libgomp since GCC 4.9) and the thread number are
// used, so an older libgomp in torch's wheel serves as well; tasks are claimed from an atomic counter.
// Where torch's copy has another soname (a renamed libgomp-<hash>.so.1), the system libgomp is
// loaded beside it: a second team, as the own pool would be, and still correct.
#if defined(_OPENMP)
std::atomic<bool> g_use_openmp{true};
#else
std::atomic<bool> g_use_openmp{false};
#endif

// `kernel(first)` writes `first_words` words, then pools[0..count) run in turn, the last into `out`;
// the stages between live in scratch buffers.  Returns the kernel's result, or -1 when a scratch
// buffer cannot be allocated (nothing is written to `out` then).
template <class Kernel>
int64_t then_pools(Kernel kernel, int64_t first_words, const BqMaxPoolArgs* pools, int64_t count, uint64_t* out) {
  if (count <= 0) return kernel(out);
  uint64_t* src = (uint64_t*)malloc(sizeof(uint64_t) * (size_t)(first_words > 0 ? first_words : 1));
  if (src == nullptr) return -1;
  const int64_t result = kernel(src);
  for (int64_t i = 0; i < count; ++i) {
    const BqMaxPoolArgs& p = pools[i];
    const int64_t words = p.n * p.ho * p.wo * p.words;
    uint64_t* dst = i + 1 == count ? out : (uint64_t*)malloc(sizeof(uint64_t) * (size_t)(words > 0 ? words : 1));
    if (dst == nullptr) {
      free(src);
      return -1;
    }
    bq_maxpool_bits(src, &p, dst);
    free(src);
    src = dst;
  }
  return result;
}

// A forked child has none of the parent's threads: forget the pool (never join it) and start anew.
void forget_pool_in_child() { g_pool = nullptr; }
struct AtFork {
  AtFork() { pthread_atfork(nullptr, nullptr, forget_pool_in_child); }
} g_at_fork;

}  // namespace

extern "C" {

void bq_parallel_for(int64_t tasks, void (*fn)(void*, int64_t), void* ctx) {
#if defined(_OPENMP)
  if (g_use_openmp.load(std::memory_order_relaxed)) {
    int threads;
    {
      std::lock_guard<std::mutex> lock(g_pool_mu);
      threads = g_threads;
    }
    if (threads > tasks) threads = (int)tasks;
    Job job;
    job.fn = fn;
    job.ctx = ctx;
    job.tasks = tasks;
    if (threads <= 1 || omp_in_parallel()) {
      job.work();
      return;
    }
#pragma omp parallel num_threads(threads)
    job.work();
    return;
  }
#endif
  Pool* pool;
  {
    std::lock_guard<std::mutex> lock(g_pool_mu);
    if (g_pool == nullptr || g_pool->threads() != g_threads) {
      delete g_pool;
      g_pool = new Pool(g_threads);
    }
    pool = g_pool;
  }
  pool->run(tasks, fn, ctx);
}

// The threads bq_parallel_for runs on (the kernels size their tasks by it).
int bq_thread_count() {
  std::lock_guard<std::mutex> lock(g_pool_mu);
  return g_threads;
}

__attribute__((visibility("default"))) void bq_set_num_threads(int threads) {
  std::lock_guard<std::mutex> lock(g_pool_mu);
  g_threads = threads < 1 ? 1 : threads;
}

// 1: OpenMP's team (when built with it), 0: the library's own pool.  Returns the setting in force.
__attribute__((visibility("default"))) int bq_use_openmp(int use) {
#if defined(_OPENMP)
  if (use >= 0) g_use_openmp.store(use != 0);
#else
  (void)use;
#endif
  return g_use_openmp.load() ? 1 : 0;
}

__attribute__((visibility("default"))) int bq_openmp_built() {
#if defined(_OPENMP)
  return 1;
#else
  return 0;
#endif
}

__attribute__((visibility("default"))) int bq_isa_count() { return kIsaCount; }
__attribute__((visibility("default"))) const char* bq_isa_name(int i) {
  return i >= 0 && i < kIsaCount ? kIsas[i].name : nullptr;
}
__attribute__((visibility("default"))) int bq_isa_supported(int i) {
  return i >= 0 && i < kIsaCount && kIsas[i].supported();
}

// 0: selected; -1: no such instruction set compiled; -2: this CPU lacks it.  NULL: the default.
__attribute__((visibility("default"))) int bq_select_isa(const char* name) {
  if (name == nullptr) {
    g_isa = default_isa();
    return g_isa ? 0 : -1;
  }
  for (const Isa& isa : kIsas) {
    if (strcmp(isa.name, name) == 0) {
      if (!isa.supported()) return -2;
      g_isa = &isa;
      return 0;
    }
  }
  return -1;
}
__attribute__((visibility("default"))) const char* bq_selected_isa() {
  if (g_isa == nullptr) g_isa = default_isa();
  return g_isa ? g_isa->name : "";
}

__attribute__((visibility("default"))) void bq_conv(const BqConvArgs* args) { g_isa->conv(args); }

__attribute__((visibility("default"))) int64_t bq_float_conv_sign(const BqFloatConvSignArgs* args) {
  return g_isa->float_conv_sign(args);
}

// bq_conv (mode BQ_OUT_SIGN) and then count >= 1 bit max-pools (BqMaxPoolArgs); args->out gets the
// last pool's output.  0, or -1 when out of memory.
__attribute__((visibility("default"))) int64_t bq_conv_pooled(const BqConvArgs* args, const BqMaxPoolArgs* pools,
                                                              int64_t count) {
  BqConvArgs a = *args;
  return then_pools([&](uint64_t* first) { a.out = first; g_isa->conv(&a); return (int64_t)0; },
                    a.n * a.ho * a.wo * a.out_stride, pools, count, (uint64_t*)args->out);
}

// bq_float_conv_sign and then count >= 1 bit max-pools; args->out gets the last pool's output.
// The NaN count of the conv's output, or -1 when out of memory.
__attribute__((visibility("default"))) int64_t bq_float_conv_sign_pooled(const BqFloatConvSignArgs* args,
                                                                         const BqMaxPoolArgs* pools, int64_t count) {
  BqFloatConvSignArgs a = *args;
  return then_pools([&](uint64_t* first) { a.out = first; return g_isa->float_conv_sign(&a); },
                    a.n * a.ho * a.wo * ((a.o + 63) / 64), pools, count, args->out);
}

__attribute__((visibility("default"))) void bq_ternary_gemm(const uint64_t* sa, const uint64_t* ma, int64_t m,
                                                            const uint64_t* sb_panels, const uint64_t* mb_panels,
                                                            int64_t n, int64_t words, int32_t* out) {
  g_isa->ternary_gemm(sa, ma, m, sb_panels, mb_panels, n, words, out);
}

__attribute__((visibility("default"))) int64_t bq_pack_rows(const float* x, int64_t rows, int64_t k, int64_t ld,
                                                            uint64_t* out, int64_t out_ld) {
  return g_isa->pack_rows(x, rows, k, ld, out, out_ld);
}

__attribute__((visibility("default"))) int64_t bq_pack_planes(const float* x, int64_t n, int64_t c, int64_t hw,
                                                              int64_t groups, uint64_t* out) {
  return g_isa->pack_planes(x, n, c, hw, groups, out);
}

// Weight rows [n][words] -> panels [ceil(n/8)][words][8] (rows past n are zero).
__attribute__((visibility("default"))) void bq_prepack_panels(const uint64_t* rows, int64_t n, int64_t words,
                                                              uint64_t* panels) {
  const int64_t count = (n + 7) / 8;
  for (int64_t q = 0; q < count; ++q)
    for (int64_t w = 0; w < words; ++w)
      for (int64_t j = 0; j < 8; ++j) {
        const int64_t r = q * 8 + j;
        panels[(q * words + w) * 8 + j] = r < n ? rows[r * words + w] : 0;
      }
}

// q = t + 1 in {0, 1, 2} of weight e of row r, from ternary planes (kernels/packing.py: sign bit 1 = -1,
// nonzero bit 1 = not 0) [n][words].
static inline unsigned ternary_code(const uint64_t* sign, const uint64_t* nonzero, int64_t words, int64_t r,
                                    int64_t e) {
  const uint64_t bit = (uint64_t)1 << (e & 63);
  const unsigned nz = (nonzero[r * words + (e >> 6)] & bit) != 0, s = (sign[r * words + (e >> 6)] & bit) != 0;
  return 1u + nz - 2u * (nz & s);
}

// Ternary planes [n][words] -> the int8 kernel's 2-bit codes q = t + 1 [n][kp / 4], kp = k rounded up to 128: in each 32-byte block
// b, bits 2i..2i+1 of byte j hold the weight at k = 128 b + 32 i + j (pads q = 1, t = 0).
__attribute__((visibility("default"))) void bq_ternary_i8_prepack(const uint64_t* sign, const uint64_t* nonzero,
                                                                  int64_t n, int64_t k, int64_t words,
                                                                  uint8_t* out) {
  const int64_t kp = (k + 127) / 128 * 128, bytes = kp / 4;
  for (int64_t r = 0; r < n; ++r) {
    uint8_t* dst = out + r * bytes;
    memset(dst, 0x55, (size_t)bytes);  // every code 1
    for (int64_t e = 0; e < k; ++e) {
      const unsigned q = ternary_code(sign, nonzero, words, r, e);
      const int64_t at = (e / 128) * 32 + (e % 32);
      const int shift = (int)(2 * ((e % 128) / 32));
      dst[at] = (uint8_t)((dst[at] & ~(3u << shift)) | (q << shift));
    }
  }
}

// Ternary planes -> the lookup-table kernel's weights (isa_kernels.cpp, "by table lookup"): per panel of
// 32 rows and line of 9 weights, one 16-bit word per row holding three 5-bit group indices
// c0 | c1 << 5 | c2 << 10, c = q0 + 3 q1 + 9 q2 (q = t + 1) of weights 9l + 3g + (0, 1, 2):
// [ceil(n / 32)][ceil(k / 9)][32]; pad rows and weights past k are t = 0 (c = 13).
__attribute__((visibility("default"))) void bq_ternary_i8_lut_prepack(const uint64_t* sign, const uint64_t* nonzero,
                                                                      int64_t n, int64_t k, int64_t words,
                                                                      uint16_t* out) {
  const int64_t lines = (k + 8) / 9, panels = (n + 31) / 32;
  const uint16_t pad = 13 | 13 << 5 | 13 << 10;
  for (int64_t i = 0; i < panels * lines * 32; ++i) out[i] = pad;
  for (int64_t r = 0; r < n; ++r) {
    uint16_t* dst = out + (r / 32) * lines * 32 + r % 32;
    for (int64_t l = 0; l < lines; ++l) {
      unsigned word = 0;
      for (int g = 0; g < 3; ++g) {
        unsigned c = 0;
        for (int i = 2; i >= 0; --i) {
          const int64_t e = 9 * l + 3 * g + i;
          c = 3 * c + (e < k ? ternary_code(sign, nonzero, words, r, e) : 1u);
        }
        word |= c << (5 * g);
      }
      dst[l * 32] = (uint16_t)word;
    }
  }
}

__attribute__((visibility("default"))) void bq_ternary_i8_lut_gemm(const int8_t* x, int64_t m, int64_t k,
                                                                   int64_t ldx, const uint16_t* w, int64_t n,
                                                                   int32_t* out) {
  g_isa->ternary_i8_lut_gemm(x, m, k, ldx, w, n, out);
}

__attribute__((visibility("default"))) void bq_ternary_i8_gemm(const int8_t* x, int64_t m, int64_t k, int64_t ldx,
                                                               const uint8_t* w, int64_t n, int64_t kp,
                                                               int32_t* out) {
  g_isa->ternary_i8_gemm(x, m, k, ldx, w, n, kp, out);
}

__attribute__((visibility("default"))) int64_t bq_quantize_i8(const float* x, int64_t m, int64_t k, int64_t ldx,
                                                              float rms_eps, int8_t* codes, int64_t ldq,
                                                              float* steps) {
  return g_isa->quantize_i8(x, m, k, ldx, rms_eps, codes, ldq, steps);
}

__attribute__((visibility("default"))) int64_t bq_ternary_i8_linear(const float* x, int64_t m, int64_t k,
                                                                    int64_t ldx, float rms_eps, const uint8_t* w,
                                                                    int64_t n, int64_t kp, float weight_scale,
                                                                    const float* bias, float* out) {
  return g_isa->ternary_i8_linear(x, m, k, ldx, rms_eps, w, n, kp, weight_scale, bias, out);
}

__attribute__((visibility("default"))) int64_t bq_ternary_i8_layer(const BqI8Layer* layer, const float* x,
                                                                   int64_t m, float* out) {
  return g_isa->ternary_i8_linear(x, m, layer->k, layer->k, layer->rms_eps, layer->codes, layer->n, layer->kp,
                                  layer->weight_scale, layer->bias, out);
}

// Signs of a per-channel affine map of float32 activations, packed NHWC [n][h][w][ceil(c/64)]:
// bit = (double)x * mul[ch] + add[ch] < 0 (two roundings, as BQ_OUT_SIGN), pad bits 0.  x is read
// through its element strides, so NCHW and channels_last tensors need no copy.  Returns how many
// NaNs it saw (NaN has no sign: the caller refuses them).
__attribute__((visibility("default"))) int64_t bq_affine_sign_pack(const float* x, int64_t n, int64_t c, int64_t h,
                                                                   int64_t w, int64_t stride_n, int64_t stride_c,
                                                                   int64_t stride_h, int64_t stride_w,
                                                                   const double* mul, const double* add,
                                                                   uint64_t* out) {
  const int64_t words = (c + 63) / 64;
  int64_t nans = 0;
  for (int64_t b = 0; b < n; ++b)
    for (int64_t y = 0; y < h; ++y)
      for (int64_t xx = 0; xx < w; ++xx) {
        const float* pixel = x + b * stride_n + y * stride_h + xx * stride_w;
        uint64_t* dst = out + ((b * h + y) * w + xx) * words;
        for (int64_t k = 0; k < words; ++k) {
          const int64_t first = k * 64, count = c - first < 64 ? c - first : 64;
          uint64_t word = 0;
          for (int64_t j = 0; j < count; ++j) {
            const float v = pixel[(first + j) * stride_c];
            const double z = (double)v * mul[first + j] + add[first + j];
            word |= (uint64_t)(z < 0.0) << j;
            nans += v != v;
          }
          dst[k] = word;
        }
      }
  return nans;
}

// Max-pool of signs on packed NHWC words [n][h][w][words]: per bit the AND (where and_mask has a
// 1) or the OR of the window's bits; taps outside the input are skipped (the neutral element).
__attribute__((visibility("default"))) void bq_maxpool_bits(const uint64_t* x, const BqMaxPoolArgs* p, uint64_t* out) {
  const int64_t h = p->h, w = p->w, words = p->words;
  for (int64_t b = 0; b < p->n; ++b)
    for (int64_t oy = 0; oy < p->ho; ++oy)
      for (int64_t ox = 0; ox < p->wo; ++ox)
        for (int64_t k = 0; k < words; ++k) {
          uint64_t all = ~(uint64_t)0, any = 0;
          for (int64_t i = 0; i < p->kh; ++i) {
            const int64_t iy = oy * p->sh - p->ph + i * p->dh;
            if (iy < 0 || iy >= h) continue;
            for (int64_t j = 0; j < p->kw; ++j) {
              const int64_t ix = ox * p->sw - p->pw + j * p->dw;
              if (ix < 0 || ix >= w) continue;
              const uint64_t v = x[((b * h + iy) * w + ix) * words + k];
              all &= v;
              any |= v;
            }
          }
          out[((b * p->ho + oy) * p->wo + ox) * words + k] = (all & p->and_mask[k]) | (any & ~p->and_mask[k]);
        }
}

struct PeakCtx {
  int64_t reps;
  std::atomic<int64_t> bitmacs{0};
};

// Bit-MACs per second of the selected instruction set's microkernel on L1-resident data, on every
// thread at once: the popcount ceiling the kernels are measured against.
__attribute__((visibility("default"))) double bq_peak_bitmacs_per_s(int64_t reps) {
  PeakCtx ctx;
  ctx.reps = reps;
  const int threads = g_threads;
  auto start = std::chrono::steady_clock::now();
  bq_parallel_for(
      threads,
      [](void* p, int64_t) {
        PeakCtx* c = (PeakCtx*)p;
        c->bitmacs.fetch_add(g_isa->peak_bitmacs(c->reps));
      },
      &ctx);
  std::chrono::duration<double> elapsed = std::chrono::steady_clock::now() - start;
  return (double)ctx.bitmacs.load() / elapsed.count();
}

}  // extern "C"
