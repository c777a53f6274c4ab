#include "blocks.h"

/* ---- D-Adaptation and Prodigy --------------------------------------------------------------
   Every kernel takes the tensors of one bucket as ``ptrs``, stream-major: ptrs[j * nt + k] is
   stream j (x, g, then the pass's state tensors) of tensor k; ``ns[k]`` its number of elements;
   ``sc`` the pass's float coefficients (fp64, read from tensor memory, rounded to T here as the
   torch path rounds them to the tensors' dtype); ``flags``: 1 maximize, 2 coupled weight decay,
   4 averaged (AdaGrad's momentum). The elementwise expressions follow the per-element torch
   functions operation by operation (no contraction into fma: ISO C mode), so the two paths
   differ only where torch's vectorised sqrt rounds differently.

   All tensors are split into blocks of BLOCK elements, shared among the threads in one parallel
   loop. A statistics kernel writes each block's sums (accumulated in double) to its own slot and
   adds the slots in block order afterwards: the sums do not depend on the thread count. An update
   kernel returns before writing anything when *ok is 0. Each block runs a loop specialised for
   its flags (DA_DISPATCH: constant flags leave no branch in the loop, which then vectorises). */

typedef void (*da_stats_fn)(void* const*, int64_t, int64_t, int64_t, int64_t, const double*,
                            int, double*);
typedef void (*da_update_fn)(void* const*, int64_t, int64_t, int64_t, int64_t, const double*,
                             int);

static void da_run_stats(int64_t nt, void* const* ptrs, const int64_t* ns, const double* sc,
                         int flags, double* out, int nsums, int nthreads, da_stats_fn fn) {
    for (int j = 0; j < nsums; ++j) out[j] = 0.0;
    if (nt <= 0) return;
    int64_t total = 0;
    int64_t* first = block_starts(nt, ns, &total);
    const int64_t nblocks = first ? first[nt] : 0;
    double* partial = first ? (double*)malloc((size_t)(nblocks > 0 ? nblocks : 1) * nsums
                                              * sizeof(double)) : NULL;
    if (!partial) {                    /* out of memory: NaN sums make the step a skipped one */
        for (int j = 0; j < nsums; ++j) out[j] = NAN;
        free(first);
        return;
    }
    _Pragma("omp parallel for schedule(static) num_threads(nthreads) if(total > 4 * BLOCK)")
    for (int64_t b = 0; b < nblocks; ++b) {
        const int64_t k = block_owner(first, nt, b);
        const int64_t lo = (b - first[k]) * BLOCK;
        const int64_t hi = lo + BLOCK < ns[k] ? lo + BLOCK : ns[k];
        fn(ptrs, nt, k, lo, hi, sc, flags, partial + b * nsums);
    }
    for (int64_t b = 0; b < nblocks; ++b)
        for (int j = 0; j < nsums; ++j) out[j] += partial[b * nsums + j];
    free(partial);
    free(first);
}

static void da_run_update(int64_t nt, void* const* ptrs, const int64_t* ns, const double* sc,
                          int flags, const uint8_t* ok, int nthreads, da_update_fn fn) {
    if (!*ok || nt <= 0) return;
    int64_t total = 0;
    int64_t* first = block_starts(nt, ns, &total);
    if (!first) return;                /* (cannot happen in practice: nt + 1 integers) */
    const int64_t nblocks = first[nt];
    _Pragma("omp parallel for schedule(static) num_threads(nthreads) if(total > 4 * BLOCK)")
    for (int64_t b = 0; b < nblocks; ++b) {
        const int64_t k = block_owner(first, nt, b);
        const int64_t lo = (b - first[k]) * BLOCK;
        const int64_t hi = lo + BLOCK < ns[k] ? lo + BLOCK : ns[k];
        fn(ptrs, nt, k, lo, hi, sc, flags);
    }
    free(first);
}

#define DA_INLINE static inline __attribute__((always_inline))
#define DA_STREAM(T, j) ((T*)p[(j) * nt + k])
/* effective_grad: g' = -g if maximize; g' + cwd * x if coupled (x read only then) */
#define DA_GRAD(T, gi, graw, xval)                                                              \
    T gi = maximize ? -(graw) : (graw);                                                         \
    if (coupled) gi = gi + cwd * (xval);
/* BODY(..., maximize, coupled) with both flags as constants */
#define DA_DISPATCH(BODY, ...)                                                                  \
    switch (flags & 3) {                                                                        \
    case 0: BODY(__VA_ARGS__, 0, 0); break;                                                     \
    case 1: BODY(__VA_ARGS__, 1, 0); break;                                                     \
    case 2: BODY(__VA_ARGS__, 0, 1); break;                                                     \
    default: BODY(__VA_ARGS__, 1, 1); break;                                                    \
    }
#define DA_STATS_ARGS void* const* p, int64_t nt, int64_t k, int64_t lo, int64_t hi,            \
                      const double* sc, int flags, double* acc, const int maximize,             \
                      const int coupled
#define DA_UPDATE_ARGS void* const* p, int64_t nt, int64_t k, int64_t lo, int64_t hi,           \
                       const double* sc, int flags, const int maximize, const int coupled
#define DA_KERNELS(NAME, NSUMS)                                                                 \
static void NAME##_block(void* const* p, int64_t nt, int64_t k, int64_t lo, int64_t hi,         \
                         const double* sc, int flags, double* acc) {                            \
    DA_DISPATCH(NAME##_body, p, nt, k, lo, hi, sc, flags, acc)                                  \
}                                                                                               \
void NAME(int64_t nt, void* const* ptrs, const int64_t* ns, const double* sc, int flags,        \
          double* out, int nthreads) {                                                          \
    da_run_stats(nt, ptrs, ns, sc, flags, out, NSUMS, nthreads, NAME##_block);                  \
}
/* a fused kernel: the statistics of the state before the step and the update in one sweep;
   nothing written and zero sums when !*ok */
#define DA_FUSED_KERNEL(NAME, NSUMS)                                                            \
static void NAME##_block(void* const* p, int64_t nt, int64_t k, int64_t lo, int64_t hi,         \
                         const double* sc, int flags, double* acc) {                            \
    DA_DISPATCH(NAME##_body, p, nt, k, lo, hi, sc, flags, acc)                                  \
}                                                                                               \
void NAME(int64_t nt, void* const* ptrs, const int64_t* ns, const double* sc, int flags,        \
          const uint8_t* ok, double* out, int nthreads) {                                       \
    if (!*ok) {                                                                                 \
        for (int j = 0; j < NSUMS; ++j) out[j] = 0.0;                                           \
        return;                                                                                 \
    }                                                                                           \
    da_run_stats(nt, ptrs, ns, sc, flags, out, NSUMS, nthreads, NAME##_block);                  \
}
#define DA_UPDATE_KERNEL(NAME)                                                                  \
static void NAME##_block(void* const* p, int64_t nt, int64_t k, int64_t lo, int64_t hi,         \
                         const double* sc, int flags) {                                         \
    DA_DISPATCH(NAME##_body, p, nt, k, lo, hi, sc, flags)                                       \
}                                                                                               \
void NAME(int64_t nt, void* const* ptrs, const int64_t* ns, const double* sc, int flags,        \
          const uint8_t* ok, int nthreads) {                                                    \
    da_run_update(nt, ptrs, ns, sc, flags, ok, nthreads, NAME##_block);                         \
}

/* Optional streams: a kernel whose stream j may hold NULL pointers (listed per kernel in
   _native.DADAPT_OPTIONAL) is written as NAME##_loop(..., has_j, ...) with a constant per
   optional stream, and NAME##_body picks the variant for tensor k: one branch per tensor, no
   branch in the loop (the constant folds away). */
#define DA_HAS(j) (p[(j) * nt + k] != NULL)
#define DA_HAS1_STATS(NAME, j)                                                                  \
DA_INLINE void NAME##_body(DA_STATS_ARGS) {                                                     \
    if (DA_HAS(j)) NAME##_loop(p, nt, k, lo, hi, sc, flags, acc, maximize, coupled, 1);         \
    else NAME##_loop(p, nt, k, lo, hi, sc, flags, acc, maximize, coupled, 0);                   \
}
#define DA_HAS2_STATS(NAME, j1, j2)                                                             \
DA_INLINE void NAME##_body(DA_STATS_ARGS) {                                                     \
    const int h1 = DA_HAS(j1), h2 = DA_HAS(j2);                                                 \
    if (h1 && h2) NAME##_loop(p, nt, k, lo, hi, sc, flags, acc, maximize, coupled, 1, 1);       \
    else if (h1) NAME##_loop(p, nt, k, lo, hi, sc, flags, acc, maximize, coupled, 1, 0);        \
    else if (h2) NAME##_loop(p, nt, k, lo, hi, sc, flags, acc, maximize, coupled, 0, 1);        \
    else NAME##_loop(p, nt, k, lo, hi, sc, flags, acc, maximize, coupled, 0, 0);                \
}
#define DA_HAS1_UPDATE(NAME, j)                                                                 \
DA_INLINE void NAME##_body(DA_UPDATE_ARGS) {                                                    \
    if (DA_HAS(j)) NAME##_loop(p, nt, k, lo, hi, sc, flags, maximize, coupled, 1);              \
    else NAME##_loop(p, nt, k, lo, hi, sc, flags, maximize, coupled, 0);                        \
}
#define DA_HAS2(NAME, j1, j2)                                                                   \
DA_INLINE void NAME##_body(DA_UPDATE_ARGS) {                                                    \
    const int h1 = DA_HAS(j1), h2 = DA_HAS(j2);                                                 \
    if (h1 && h2) NAME##_loop(p, nt, k, lo, hi, sc, flags, maximize, coupled, 1, 1);            \
    else if (h1) NAME##_loop(p, nt, k, lo, hi, sc, flags, maximize, coupled, 1, 0);             \
    else if (h2) NAME##_loop(p, nt, k, lo, hi, sc, flags, maximize, coupled, 0, 1);             \
    else NAME##_loop(p, nt, k, lo, hi, sc, flags, maximize, coupled, 0, 0);                     \
}

/* DAdaptAdam statistics (dadapt_adam_statistics); streams x, g, v, s; sc: cwd, eps, dlr, c_s.
   sums: ||g||^2, <g', s / (sqrt(v) + eps)>, ||s + c_s (dlr g' - s)||_1 */
#define DA_ADAM_STATS(NAME, T, SQRT, ABS)                                                       \
DA_INLINE void NAME##_body(DA_STATS_ARGS) {                                                     \
    const T* restrict x = DA_STREAM(T, 0); const T* restrict g = DA_STREAM(T, 1);               \
    const T* restrict v = DA_STREAM(T, 2); const T* restrict s = DA_STREAM(T, 3);               \
    const T cwd = (T)sc[0], eps = (T)sc[1], dlr = (T)sc[2], cs = (T)sc[3];                      \
    double a0 = 0.0, a1 = 0.0, a2 = 0.0;                                                        \
    _Pragma("omp simd reduction(+:a0,a1,a2)")                                                   \
    for (int64_t i = lo; i < hi; ++i) {                                                         \
        const T gr = g[i];                                                                      \
        DA_GRAD(T, gi, gr, x[i])                                                                \
        const T si = s[i];                                                                      \
        const T sn = si + cs * (dlr * gi - si);                                                 \
        a0 += (double)(gr * gr);                                                                \
        a1 += (double)(gi * si / (SQRT(v[i]) + eps));                                           \
        a2 += (double)ABS(sn);                                                                  \
    }                                                                                           \
    acc[0] = a0; acc[1] = a1; acc[2] = a2;                                                      \
}                                                                                               \
DA_KERNELS(NAME, 3)

/* DAdaptAdam update (dadapt_adam_tensor_update); streams x, g, m, v, s;
   sc: dlr, cwd, decay, c_m, c_v, c_s, on (1 when ok; unused), eps. A NULL m (beta1 = 0: no
   first-moment buffer) makes m_{k+1} = dlr g'; a NULL s (slice_p > 1: s is updated on the
   torch side) leaves s out. Both are per-tensor branches (DA_HAS2), not per element. */
#define DA_ADAM_UPDATE(NAME, T, SQRT)                                                           \
DA_INLINE void NAME##_loop(DA_UPDATE_ARGS, const int has_m, const int has_s) {                  \
    T* restrict x = DA_STREAM(T, 0); const T* restrict g = DA_STREAM(T, 1);                     \
    T* restrict m = DA_STREAM(T, 2); T* restrict v = DA_STREAM(T, 3);                           \
    T* restrict s = DA_STREAM(T, 4);                                                            \
    const T dlr = (T)sc[0], cwd = (T)sc[1], decay = (T)sc[2], cm = (T)sc[3], cv = (T)sc[4];     \
    const T cs = (T)sc[5], eps = (T)sc[7];                                                      \
    _Pragma("omp simd")                                                                         \
    for (int64_t i = lo; i < hi; ++i) {                                                         \
        const T xi = x[i];                                                                      \
        DA_GRAD(T, gi, g[i], xi)                                                                \
        const T dg = dlr * gi;                                                                  \
        T vi = v[i];                                                                            \
        const T mi = has_m ? m[i] + cm * (dg - m[i]) : dg;                                      \
        vi = vi + cv * (gi * gi - vi);                                                          \
        if (has_s) s[i] = s[i] + cs * (dg - s[i]);                                              \
        x[i] = xi - decay * xi - mi / (SQRT(vi) + eps);                                         \
        if (has_m) m[i] = mi;                                                                   \
        v[i] = vi;                                                                              \
    }                                                                                           \
}                                                                                               \
DA_HAS2(NAME, 2, 4)                                                                             \
DA_UPDATE_KERNEL(NAME)

/* Prodigy statistics (prodigy_statistics); streams x, g, s, x0; sc: cwd, s_weight, c_s.
   sums: ||g||^2, <g', x0 - x>, ||s + c_s s + s_weight g'||_1. A NULL x0 (a tensor that was
   all zero at its first step: implicit_zero_x0) reads 0 - x, the same numbers as a stored zero. */
#define DA_PRODIGY_STATS(NAME, T, ABS)                                                          \
DA_INLINE void NAME##_loop(DA_STATS_ARGS, const int has_x0) {                                   \
    const T* restrict x = DA_STREAM(T, 0); const T* restrict g = DA_STREAM(T, 1);               \
    const T* restrict s = DA_STREAM(T, 2); const T* restrict x0 = DA_STREAM(T, 3);              \
    const T cwd = (T)sc[0], sw = (T)sc[1], cs = (T)sc[2];                                       \
    double a0 = 0.0, a1 = 0.0, a2 = 0.0;                                                        \
    _Pragma("omp simd reduction(+:a0,a1,a2)")                                                   \
    for (int64_t i = lo; i < hi; ++i) {                                                         \
        const T gr = g[i], xi = x[i];                                                           \
        DA_GRAD(T, gi, gr, xi)                                                                  \
        const T si = s[i];                                                                      \
        const T sn = si + cs * si + sw * gi;                                                    \
        a0 += (double)(gr * gr);                                                                \
        a1 += (double)(gi * ((has_x0 ? x0[i] : (T)0) - xi));                                    \
        a2 += (double)ABS(sn);                                                                  \
    }                                                                                           \
    acc[0] = a0; acc[1] = a1; acc[2] = a2;                                                      \
}                                                                                               \
DA_HAS1_STATS(NAME, 3)                                                                          \
DA_KERNELS(NAME, 3)

/* Prodigy update (prodigy_tensor_update); streams x, g, m, v, s;
   sc: d, dlr, s_weight, cwd, decay, c_m, c_v, c_s, d * eps; m and s may be NULL (as for
   DAdaptAdam: m_{k+1} = d g'; s updated elsewhere) */
#define DA_PRODIGY_UPDATE(NAME, T, SQRT)                                                        \
DA_INLINE void NAME##_loop(DA_UPDATE_ARGS, const int has_m, const int has_s) {                  \
    T* restrict x = DA_STREAM(T, 0); const T* restrict g = DA_STREAM(T, 1);                     \
    T* restrict m = DA_STREAM(T, 2); T* restrict v = DA_STREAM(T, 3);                           \
    T* restrict s = DA_STREAM(T, 4);                                                            \
    const T d = (T)sc[0], dlr = (T)sc[1], sw = (T)sc[2], cwd = (T)sc[3], decay = (T)sc[4];      \
    const T cm = (T)sc[5], cv = (T)sc[6], cs = (T)sc[7], deps = (T)sc[8];                       \
    _Pragma("omp simd")                                                                         \
    for (int64_t i = lo; i < hi; ++i) {                                                         \
        const T xi = x[i];                                                                      \
        DA_GRAD(T, gi, g[i], xi)                                                                \
        const T dg = d * gi;                                                                    \
        T vi = v[i];                                                                            \
        const T mi = has_m ? m[i] + cm * (dg - m[i]) : dg;                                      \
        vi = vi + cv * (dg * dg - vi);                                                          \
        if (has_s) s[i] = s[i] + cs * s[i] + sw * gi;                                           \
        x[i] = xi - decay * xi - dlr * (mi / (SQRT(vi) + deps));                                \
        if (has_m) m[i] = mi;                                                                   \
        v[i] = vi;                                                                              \
    }                                                                                           \
}                                                                                               \
DA_HAS2(NAME, 2, 4)                                                                             \
DA_UPDATE_KERNEL(NAME)

DA_ADAM_STATS(dadapt_adam_stats_f32, float, sqrtf, fabsf)
DA_ADAM_STATS(dadapt_adam_stats_f64, double, sqrt, fabs)
DA_ADAM_UPDATE(dadapt_adam_update_f32, float, sqrtf)
DA_ADAM_UPDATE(dadapt_adam_update_f64, double, sqrt)
DA_PRODIGY_STATS(prodigy_stats_f32, float, fabsf)
DA_PRODIGY_STATS(prodigy_stats_f64, double, fabs)
DA_PRODIGY_UPDATE(prodigy_update_f32, float, sqrtf)
DA_PRODIGY_UPDATE(prodigy_update_f64, double, sqrt)
/* DAdaptSGD statistics (dadapt_sgd_statistics); streams x, g, s; sc: cwd, lam.
   sums: ||g||^2, <g', s>, ||s + lam g'||^2, ||g'||^2 */
#define DA_SGD_STATS(NAME, T)                                                                   \
DA_INLINE void NAME##_body(DA_STATS_ARGS) {                                                     \
    const T* restrict x = DA_STREAM(T, 0); const T* restrict g = DA_STREAM(T, 1);               \
    const T* restrict s = DA_STREAM(T, 2);                                                      \
    const T cwd = (T)sc[0], lam = (T)sc[1];                                                     \
    double a0 = 0.0, a1 = 0.0, a2 = 0.0, a3 = 0.0;                                              \
    _Pragma("omp simd reduction(+:a0,a1,a2,a3)")                                                \
    for (int64_t i = lo; i < hi; ++i) {                                                         \
        const T gr = g[i];                                                                      \
        DA_GRAD(T, gi, gr, x[i])                                                                \
        const T si = s[i];                                                                      \
        const T sn = si + lam * gi;                                                             \
        a0 += (double)(gr * gr);                                                                \
        a1 += (double)(gi * si);                                                                \
        a2 += (double)(sn * sn);                                                                \
        a3 += (double)(gi * gi);                                                                \
    }                                                                                           \
    acc[0] = a0; acc[1] = a1; acc[2] = a2; acc[3] = a3;                                         \
}                                                                                               \
DA_KERNELS(NAME, 4)

/* DAdaptSGD update without momentum (dadapt_sgd_tensor_update); streams x, g, s;
   sc: lam, cwd, decay; a NULL s (slice_p > 1) leaves s out */
#define DA_SGD_UPDATE(NAME, T)                                                                  \
DA_INLINE void NAME##_loop(DA_UPDATE_ARGS, const int has_s) {                                   \
    T* restrict x = DA_STREAM(T, 0); const T* restrict g = DA_STREAM(T, 1);                     \
    T* restrict s = DA_STREAM(T, 2);                                                            \
    const T lam = (T)sc[0], cwd = (T)sc[1], decay = (T)sc[2];                                   \
    _Pragma("omp simd")                                                                         \
    for (int64_t i = lo; i < hi; ++i) {                                                         \
        const T xi = x[i];                                                                      \
        DA_GRAD(T, gi, g[i], xi)                                                                \
        x[i] = xi - decay * xi - lam * gi;                                                      \
        if (has_s) s[i] = s[i] + lam * gi;                                                      \
    }                                                                                           \
}                                                                                               \
DA_HAS1_UPDATE(NAME, 2)                                                                         \
DA_UPDATE_KERNEL(NAME)

/* DAdaptSGD update with momentum (dadapt_sgd_momentum_tensor_update); streams x, g, s, z;
   sc: lam, cwd, decay, average (1 - momentum); a NULL s (slice_p > 1) leaves s out */
#define DA_SGD_MOMENTUM_UPDATE(NAME, T)                                                         \
DA_INLINE void NAME##_loop(DA_UPDATE_ARGS, const int has_s) {                                   \
    T* restrict x = DA_STREAM(T, 0); const T* restrict g = DA_STREAM(T, 1);                     \
    T* restrict s = DA_STREAM(T, 2); T* restrict z = DA_STREAM(T, 3);                           \
    const T lam = (T)sc[0], cwd = (T)sc[1], decay = (T)sc[2], average = (T)sc[3];               \
    _Pragma("omp simd")                                                                         \
    for (int64_t i = lo; i < hi; ++i) {                                                         \
        const T xi = x[i], zi = z[i];                                                           \
        DA_GRAD(T, gi, g[i], xi)                                                                \
        const T zz = zi - decay * zi - lam * gi;                                                \
        x[i] = xi + average * (zz - xi);                                                        \
        if (has_s) s[i] = s[i] + lam * gi;                                                      \
        z[i] = zz;                                                                              \
    }                                                                                           \
}                                                                                               \
DA_HAS1_UPDATE(NAME, 2)                                                                         \
DA_UPDATE_KERNEL(NAME)

DA_SGD_STATS(dadapt_sgd_stats_f32, float)
DA_SGD_STATS(dadapt_sgd_stats_f64, double)
DA_SGD_UPDATE(dadapt_sgd_update_f32, float)
DA_SGD_UPDATE(dadapt_sgd_update_f64, double)
DA_SGD_MOMENTUM_UPDATE(dadapt_sgd_momentum_update_f32, float)
DA_SGD_MOMENTUM_UPDATE(dadapt_sgd_momentum_update_f64, double)
/* DAdaptAdaGrad statistics (dadapt_adagrad_statistics); streams x, g, alpha, s;
   sc: cwd, dlr, eps. sums: ||g||^2, the numerator's change
   (s^2 + 2 dlr g' s) / (sqrt(alpha + g'^2) + eps) - s^2 / (sqrt(alpha) + eps), and the change of
   ||s||_1, |s + dlr g'| - |s| */
#define DA_ADAGRAD_STATS(NAME, T, SQRT, ABS)                                                    \
DA_INLINE void NAME##_body(DA_STATS_ARGS) {                                                     \
    const T* restrict x = DA_STREAM(T, 0); const T* restrict g = DA_STREAM(T, 1);               \
    const T* restrict alpha = DA_STREAM(T, 2); const T* restrict s = DA_STREAM(T, 3);           \
    const T cwd = (T)sc[0], dlr = (T)sc[1], eps = (T)sc[2];                                     \
    double a0 = 0.0, a1 = 0.0, a2 = 0.0;                                                        \
    _Pragma("omp simd reduction(+:a0,a1,a2)")                                                   \
    for (int64_t i = lo; i < hi; ++i) {                                                         \
        const T gr = g[i];                                                                      \
        DA_GRAD(T, gi, gr, x[i])                                                                \
        const T a = alpha[i], si = s[i];                                                        \
        const T w_old = SQRT(a) + eps;                                                          \
        const T w_new = SQRT(a + gi * gi) + eps;                                                \
        const T dg = dlr * gi;                                                                  \
        const T s_sq = si * si;                                                                 \
        a0 += (double)(gr * gr);                                                                \
        a1 += (double)((s_sq + (T)2 * dg * si) / w_new - s_sq / w_old);                         \
        a2 += (double)(ABS(si + dg) - ABS(si));                                                 \
    }                                                                                           \
    acc[0] = a0; acc[1] = a1; acc[2] = a2;                                                      \
}                                                                                               \
DA_KERNELS(NAME, 3)

/* DAdaptAdaGrad update (dadapt_adagrad_tensor_update); streams x, g, alpha, s, x0;
   sc: dlr, cwd, average (1 - momentum), eps; flag 4: averaged (momentum > 0) */
#define DA_ADAGRAD_UPDATE(NAME, T, SQRT)                                                        \
DA_INLINE void NAME##_body(DA_UPDATE_ARGS) {                                                    \
    T* restrict x = DA_STREAM(T, 0); const T* restrict g = DA_STREAM(T, 1);                     \
    T* restrict alpha = DA_STREAM(T, 2); T* restrict s = DA_STREAM(T, 3);                       \
    const T* restrict x0 = DA_STREAM(T, 4);                                                     \
    const T dlr = (T)sc[0], cwd = (T)sc[1], average = (T)sc[2], eps = (T)sc[3];                 \
    const int averaged = flags & 4;                                                             \
    _Pragma("omp simd")                                                                         \
    for (int64_t i = lo; i < hi; ++i) {                                                         \
        const T xi = x[i];                                                                      \
        DA_GRAD(T, gi, g[i], xi)                                                                \
        const T a_new = alpha[i] + gi * gi;                                                     \
        const T s_new = s[i] + dlr * gi;                                                        \
        const T z = x0[i] - s_new / (SQRT(a_new) + eps);                                        \
        x[i] = averaged ? xi + average * (z - xi) : z;                                          \
        alpha[i] = a_new; s[i] = s_new;                                                         \
    }                                                                                           \
}                                                                                               \
DA_UPDATE_KERNEL(NAME)

DA_ADAGRAD_STATS(dadapt_adagrad_stats_f32, float, sqrtf, fabsf)
DA_ADAGRAD_STATS(dadapt_adagrad_stats_f64, double, sqrt, fabs)
DA_ADAGRAD_UPDATE(dadapt_adagrad_update_f32, float, sqrtf)
DA_ADAGRAD_UPDATE(dadapt_adagrad_update_f64, double, sqrt)
/* DAdaptAdam fused (statistics and update); streams x, g, m, v, s; the update's coefficients.
   Sums as dadapt_adam_stats but ||g||^2; its s_{k+1} is the update's (the same coefficients when
   ok). A NULL m: beta1 = 0, as in dadapt_adam_update. */
#define DA_ADAM_FUSED(NAME, T, SQRT, ABS)                                                       \
DA_INLINE void NAME##_loop(DA_STATS_ARGS, const int has_m) {                                    \
    T* restrict x = DA_STREAM(T, 0); const T* restrict g = DA_STREAM(T, 1);                     \
    T* restrict m = DA_STREAM(T, 2); T* restrict v = DA_STREAM(T, 3);                           \
    T* restrict s = DA_STREAM(T, 4);                                                            \
    const T dlr = (T)sc[0], cwd = (T)sc[1], decay = (T)sc[2], cm = (T)sc[3], cv = (T)sc[4];     \
    const T cs = (T)sc[5], eps = (T)sc[7];                                                      \
    double a1 = 0.0, a2 = 0.0;                                                                  \
    _Pragma("omp simd reduction(+:a1,a2)")                                                      \
    for (int64_t i = lo; i < hi; ++i) {                                                         \
        const T xi = x[i];                                                                      \
        DA_GRAD(T, gi, g[i], xi)                                                                \
        const T dg = dlr * gi;                                                                  \
        T vi = v[i], si = s[i];                                                                 \
        a1 += (double)(gi * si / (SQRT(vi) + eps));                                             \
        const T mi = has_m ? m[i] + cm * (dg - m[i]) : dg;                                      \
        vi = vi + cv * (gi * gi - vi);                                                          \
        si = si + cs * (dg - si);                                                               \
        a2 += (double)ABS(si);                                                                  \
        x[i] = xi - decay * xi - mi / (SQRT(vi) + eps);                                         \
        if (has_m) m[i] = mi;                                                                   \
        v[i] = vi; s[i] = si;                                                                   \
    }                                                                                           \
    acc[0] = a1; acc[1] = a2;                                                                   \
}                                                                                               \
DA_HAS1_STATS(NAME, 2)                                                                          \
DA_FUSED_KERNEL(NAME, 2)

DA_ADAM_FUSED(dadapt_adam_fused_f32, float, sqrtf, fabsf)
DA_ADAM_FUSED(dadapt_adam_fused_f64, double, sqrt, fabs)
/* Prodigy fused; streams x, g, m, v, s, x0; the update's coefficients. Sums as
   prodigy_stats but ||g||^2: <g', x0 - x> of the x before the step, ||s_{k+1}||_1 of the
   update's s. A NULL m (beta1 = 0) or x0 (implicit zero) as in prodigy_update and
   prodigy_stats. */
#define DA_PRODIGY_FUSED(NAME, T, SQRT, ABS)                                                    \
DA_INLINE void NAME##_loop(DA_STATS_ARGS, const int has_m, const int has_x0) {                  \
    T* restrict x = DA_STREAM(T, 0); const T* restrict g = DA_STREAM(T, 1);                     \
    T* restrict m = DA_STREAM(T, 2); T* restrict v = DA_STREAM(T, 3);                           \
    T* restrict s = DA_STREAM(T, 4); const T* restrict x0 = DA_STREAM(T, 5);                    \
    const T d = (T)sc[0], dlr = (T)sc[1], sw = (T)sc[2], cwd = (T)sc[3], decay = (T)sc[4];      \
    const T cm = (T)sc[5], cv = (T)sc[6], cs = (T)sc[7], deps = (T)sc[8];                       \
    double a1 = 0.0, a2 = 0.0;                                                                  \
    _Pragma("omp simd reduction(+:a1,a2)")                                                      \
    for (int64_t i = lo; i < hi; ++i) {                                                         \
        const T xi = x[i];                                                                      \
        DA_GRAD(T, gi, g[i], xi)                                                                \
        a1 += (double)(gi * ((has_x0 ? x0[i] : (T)0) - xi));                                    \
        const T dg = d * gi;                                                                    \
        T vi = v[i], si = s[i];                                                                 \
        const T mi = has_m ? m[i] + cm * (dg - m[i]) : dg;                                      \
        vi = vi + cv * (dg * dg - vi);                                                          \
        si = si + cs * si + sw * gi;                                                            \
        a2 += (double)ABS(si);                                                                  \
        x[i] = xi - decay * xi - dlr * (mi / (SQRT(vi) + deps));                                \
        if (has_m) m[i] = mi;                                                                   \
        v[i] = vi; s[i] = si;                                                                   \
    }                                                                                           \
    acc[0] = a1; acc[1] = a2;                                                                   \
}                                                                                               \
DA_HAS2_STATS(NAME, 2, 5)                                                                       \
DA_FUSED_KERNEL(NAME, 2)

/* DAdaptSGD fused, without momentum; streams x, g, s; the update's coefficients (lam, cwd,
   decay). Sums as dadapt_sgd_stats but ||g||^2. */
#define DA_SGD_FUSED(NAME, T)                                                                   \
DA_INLINE void NAME##_body(DA_STATS_ARGS) {                                                     \
    T* restrict x = DA_STREAM(T, 0); const T* restrict g = DA_STREAM(T, 1);                     \
    T* restrict s = DA_STREAM(T, 2);                                                            \
    const T lam = (T)sc[0], cwd = (T)sc[1], decay = (T)sc[2];                                   \
    double a1 = 0.0, a2 = 0.0, a3 = 0.0;                                                        \
    _Pragma("omp simd reduction(+:a1,a2,a3)")                                                   \
    for (int64_t i = lo; i < hi; ++i) {                                                         \
        const T xi = x[i];                                                                      \
        DA_GRAD(T, gi, g[i], xi)                                                                \
        const T si = s[i];                                                                      \
        const T sn = si + lam * gi;                                                             \
        a1 += (double)(gi * si);                                                                \
        a2 += (double)(sn * sn);                                                                \
        a3 += (double)(gi * gi);                                                                \
        x[i] = xi - decay * xi - lam * gi;                                                      \
        s[i] = sn;                                                                              \
    }                                                                                           \
    acc[0] = a1; acc[1] = a2; acc[2] = a3;                                                      \
}                                                                                               \
DA_FUSED_KERNEL(NAME, 3)

/* DAdaptSGD fused, with momentum; streams x, g, s, z; coefficients lam, cwd, decay, average. */
#define DA_SGD_MOMENTUM_FUSED(NAME, T)                                                          \
DA_INLINE void NAME##_body(DA_STATS_ARGS) {                                                     \
    T* restrict x = DA_STREAM(T, 0); const T* restrict g = DA_STREAM(T, 1);                     \
    T* restrict s = DA_STREAM(T, 2); T* restrict z = DA_STREAM(T, 3);                           \
    const T lam = (T)sc[0], cwd = (T)sc[1], decay = (T)sc[2], average = (T)sc[3];               \
    double a1 = 0.0, a2 = 0.0, a3 = 0.0;                                                        \
    _Pragma("omp simd reduction(+:a1,a2,a3)")                                                   \
    for (int64_t i = lo; i < hi; ++i) {                                                         \
        const T xi = x[i], zi = z[i];                                                           \
        DA_GRAD(T, gi, g[i], xi)                                                                \
        const T si = s[i];                                                                      \
        const T sn = si + lam * gi;                                                             \
        a1 += (double)(gi * si);                                                                \
        a2 += (double)(sn * sn);                                                                \
        a3 += (double)(gi * gi);                                                                \
        const T zz = zi - decay * zi - lam * gi;                                                \
        x[i] = xi + average * (zz - xi);                                                        \
        s[i] = sn;                                                                              \
        z[i] = zz;                                                                              \
    }                                                                                           \
    acc[0] = a1; acc[1] = a2; acc[2] = a3;                                                      \
}                                                                                               \
DA_FUSED_KERNEL(NAME, 3)

/* DAdaptAdaGrad fused; streams x, g, alpha, s, x0; coefficients dlr, cwd, average, eps; flag 4
   averaged. Sums as dadapt_adagrad_stats but ||g||^2 (its sqrt(alpha + g'^2) is the update's). */
#define DA_ADAGRAD_FUSED(NAME, T, SQRT, ABS)                                                    \
DA_INLINE void NAME##_body(DA_STATS_ARGS) {                                                     \
    T* restrict x = DA_STREAM(T, 0); const T* restrict g = DA_STREAM(T, 1);                     \
    T* restrict alpha = DA_STREAM(T, 2); T* restrict s = DA_STREAM(T, 3);                       \
    const T* restrict x0 = DA_STREAM(T, 4);                                                     \
    const T dlr = (T)sc[0], cwd = (T)sc[1], average = (T)sc[2], eps = (T)sc[3];                 \
    const int averaged = flags & 4;                                                             \
    double a1 = 0.0, a2 = 0.0;                                                                  \
    _Pragma("omp simd reduction(+:a1,a2)")                                                      \
    for (int64_t i = lo; i < hi; ++i) {                                                         \
        const T xi = x[i];                                                                      \
        DA_GRAD(T, gi, g[i], xi)                                                                \
        const T a = alpha[i], si = s[i];                                                        \
        const T a_new = a + gi * gi;                                                            \
        const T w_old = SQRT(a) + eps;                                                          \
        const T w_new = SQRT(a_new) + eps;                                                      \
        const T dg = dlr * gi;                                                                  \
        const T s_sq = si * si;                                                                 \
        const T s_new = si + dg;                                                                \
        a1 += (double)((s_sq + (T)2 * dg * si) / w_new - s_sq / w_old);                         \
        a2 += (double)(ABS(s_new) - ABS(si));                                                   \
        const T z = x0[i] - s_new / w_new;                                                      \
        x[i] = averaged ? xi + average * (z - xi) : z;                                          \
        alpha[i] = a_new; s[i] = s_new;                                                         \
    }                                                                                           \
    acc[0] = a1; acc[1] = a2;                                                                   \
}                                                                                               \
DA_FUSED_KERNEL(NAME, 2)

DA_PRODIGY_FUSED(prodigy_fused_f32, float, sqrtf, fabsf)
DA_PRODIGY_FUSED(prodigy_fused_f64, double, sqrt, fabs)
DA_SGD_FUSED(dadapt_sgd_fused_f32, float)
DA_SGD_FUSED(dadapt_sgd_fused_f64, double)
DA_SGD_MOMENTUM_FUSED(dadapt_sgd_momentum_fused_f32, float)
DA_SGD_MOMENTUM_FUSED(dadapt_sgd_momentum_fused_f64, double)
DA_ADAGRAD_FUSED(dadapt_adagrad_fused_f32, float, sqrtf, fabsf)
DA_ADAGRAD_FUSED(dadapt_adagrad_fused_f64, double, sqrt, fabs)
/* The guard of a fused step: ||g||^2 (accumulated in double like the statistics kernels' sums);
   streams g; no coefficients. */
#define DA_GRAD_SQ(NAME, T)                                                                     \
DA_INLINE void NAME##_body(DA_STATS_ARGS) {                                                     \
    const T* restrict g = DA_STREAM(T, 0);                                                      \
    double a0 = 0.0;                                                                            \
    _Pragma("omp simd reduction(+:a0)")                                                         \
    for (int64_t i = lo; i < hi; ++i) a0 += (double)(g[i] * g[i]);                              \
    acc[0] = a0;                                                                                \
}                                                                                               \
DA_KERNELS(NAME, 1)

DA_GRAD_SQ(dadapt_grad_sq_f32, float)
DA_GRAD_SQ(dadapt_grad_sq_f64, double)

/* ---- slice_p: fused kernels whose s (and Prodigy's x0) hold every STRIDE-th element only --------
   STRIDE = flags >> 8 (>= 2; the Python side checks the sliced streams' sizes against the same
   number). Per block: first the statistics and the new s on the kept elements i = 0, k, 2k, ...
   of the tensor that fall in the block (s index i / k), reading the state before the step; then
   the block's full update by the update kernel's loop with s left out (has_s = 0; the block is
   still in cache). Sums: as the fused kernels, over the kept elements. */
#define DA_STRIDE ((int64_t)(flags >> 8))
#define DA_KEPT_FROM(lo, kk) ((((lo) + (kk) - 1) / (kk)) * (kk))
/* DAdaptAdam, sliced; streams x, g, m (may be NULL), v, s (sliced); dadapt_adam_update's
   coefficients. sums: <g', s / (sqrt(v) + eps)>, ||s_{k+1}||_1 over the kept elements */
#define DA_ADAM_FUSED_SLICED(NAME, UPDATE, T, SQRT, ABS)                                        \
DA_INLINE void NAME##_body(DA_STATS_ARGS) {                                                     \
    const T* restrict x = DA_STREAM(T, 0); const T* restrict g = DA_STREAM(T, 1);               \
    const T* restrict v = DA_STREAM(T, 3); T* restrict s = DA_STREAM(T, 4);                     \
    const T dlr = (T)sc[0], cwd = (T)sc[1], cs = (T)sc[5], eps = (T)sc[7];                      \
    const int64_t kk = DA_STRIDE;                                                               \
    double a1 = 0.0, a2 = 0.0;                                                                  \
    for (int64_t i = DA_KEPT_FROM(lo, kk); i < hi; i += kk) {                                   \
        const T xi = x[i];                                                                      \
        DA_GRAD(T, gi, g[i], xi)                                                                \
        const int64_t j = i / kk;                                                               \
        const T sj = s[j];                                                                      \
        a1 += (double)(gi * sj / (SQRT(v[i]) + eps));                                           \
        const T sn = sj + cs * (dlr * gi - sj);                                                 \
        a2 += (double)ABS(sn);                                                                  \
        s[j] = sn;                                                                              \
    }                                                                                           \
    if (DA_HAS(2)) UPDATE##_loop(p, nt, k, lo, hi, sc, flags, maximize, coupled, 1, 0);         \
    else UPDATE##_loop(p, nt, k, lo, hi, sc, flags, maximize, coupled, 0, 0);                   \
    acc[0] = a1; acc[1] = a2;                                                                   \
}                                                                                               \
DA_FUSED_KERNEL(NAME, 2)

/* Prodigy, sliced; streams x, g, m (may be NULL), v, s (sliced), x0 (sliced, may be NULL);
   prodigy_update's coefficients. sums: <g', x0 - x>, ||s_{k+1}||_1 over the kept elements */
#define DA_PRODIGY_FUSED_SLICED(NAME, UPDATE, T, SQRT, ABS)                                     \
DA_INLINE void NAME##_body(DA_STATS_ARGS) {                                                     \
    const T* restrict x = DA_STREAM(T, 0); const T* restrict g = DA_STREAM(T, 1);               \
    T* restrict s = DA_STREAM(T, 4); const T* restrict x0 = DA_STREAM(T, 5);                    \
    const T sw = (T)sc[2], cwd = (T)sc[3], cs = (T)sc[7];                                       \
    const int64_t kk = DA_STRIDE;                                                               \
    const int has_x0 = DA_HAS(5);                                                               \
    double a1 = 0.0, a2 = 0.0;                                                                  \
    for (int64_t i = DA_KEPT_FROM(lo, kk); i < hi; i += kk) {                                   \
        const T xi = x[i];                                                                      \
        DA_GRAD(T, gi, g[i], xi)                                                                \
        const int64_t j = i / kk;                                                               \
        a1 += (double)(gi * ((has_x0 ? x0[j] : (T)0) - xi));                                    \
        const T sj = s[j];                                                                      \
        const T sn = sj + cs * sj + sw * gi;                                                    \
        a2 += (double)ABS(sn);                                                                  \
        s[j] = sn;                                                                              \
    }                                                                                           \
    if (DA_HAS(2)) UPDATE##_loop(p, nt, k, lo, hi, sc, flags, maximize, coupled, 1, 0);         \
    else UPDATE##_loop(p, nt, k, lo, hi, sc, flags, maximize, coupled, 0, 0);                   \
    acc[0] = a1; acc[1] = a2;                                                                   \
}                                                                                               \
DA_FUSED_KERNEL(NAME, 2)

/* DAdaptSGD (with or without momentum), sliced; streams x, g, s (sliced)[, z]; the update's
   coefficients (lam, cwd, ...). sums: <g', s>, ||s + lam g'||^2, ||g'||^2 over the kept
   elements (scaled by the stride on the Python side) */
#define DA_SGD_FUSED_SLICED(NAME, UPDATE, T)                                                    \
DA_INLINE void NAME##_body(DA_STATS_ARGS) {                                                     \
    const T* restrict x = DA_STREAM(T, 0); const T* restrict g = DA_STREAM(T, 1);               \
    T* restrict s = DA_STREAM(T, 2);                                                            \
    const T lam = (T)sc[0], cwd = (T)sc[1];                                                     \
    const int64_t kk = DA_STRIDE;                                                               \
    double a1 = 0.0, a2 = 0.0, a3 = 0.0;                                                        \
    for (int64_t i = DA_KEPT_FROM(lo, kk); i < hi; i += kk) {                                   \
        const T xi = x[i];                                                                      \
        DA_GRAD(T, gi, g[i], xi)                                                                \
        const int64_t j = i / kk;                                                               \
        const T sj = s[j];                                                                      \
        const T sn = sj + lam * gi;                                                             \
        a1 += (double)(gi * sj);                                                                \
        a2 += (double)(sn * sn);                                                                \
        a3 += (double)(gi * gi);                                                                \
        s[j] = sn;                                                                              \
    }                                                                                           \
    UPDATE##_loop(p, nt, k, lo, hi, sc, flags, maximize, coupled, 0);                           \
    acc[0] = a1; acc[1] = a2; acc[2] = a3;                                                      \
}                                                                                               \
DA_FUSED_KERNEL(NAME, 3)

DA_ADAM_FUSED_SLICED(dadapt_adam_fused_sliced_f32, dadapt_adam_update_f32, float, sqrtf, fabsf)
DA_ADAM_FUSED_SLICED(dadapt_adam_fused_sliced_f64, dadapt_adam_update_f64, double, sqrt, fabs)
DA_PRODIGY_FUSED_SLICED(prodigy_fused_sliced_f32, prodigy_update_f32, float, sqrtf, fabsf)
DA_PRODIGY_FUSED_SLICED(prodigy_fused_sliced_f64, prodigy_update_f64, double, sqrt, fabs)
DA_SGD_FUSED_SLICED(dadapt_sgd_fused_sliced_f32, dadapt_sgd_update_f32, float)
DA_SGD_FUSED_SLICED(dadapt_sgd_fused_sliced_f64, dadapt_sgd_update_f64, double)
DA_SGD_FUSED_SLICED(dadapt_sgd_momentum_fused_sliced_f32, dadapt_sgd_momentum_update_f32, float)
DA_SGD_FUSED_SLICED(dadapt_sgd_momentum_fused_sliced_f64, dadapt_sgd_momentum_update_f64, double)
