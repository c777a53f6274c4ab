/* DoG's update and squared norms, ADOPT's update and the guard's sum of squares
   (hf_tuningfree.optim._native: dog_update, grad_sq, adopt_update, sum_sq). */
#include "blocks.h"

/* For every tensor k of a bucket, if *ok:
     x <- x - s_k * (g + wd * x)        (s_k = steps[k * step_stride])
     out[k] <- sum_i (x_new_i - x0_i)^2 (accumulated per block in T, then in double)
   with q = x0_strides[k] saying what x0s[k] holds (optim/dog/, "state"):
     q == 1: x0 of every element (the sum runs over every element);
     q == 0: nothing (x0s[k] may be NULL): x0 is implicitly 0, out[k] <- sum_i x_new_i^2;
     q > 1:  x0 of elements o, o + q, o + 2q, ... only (o = x0_offsets[k] < q; x0s[k][j] for
             element o + j*q): the sum runs over those elements (the caller scales it), read
             back from the block just written.
   If !*ok nothing is written. */
#define DOG_UPDATE(NAME, T)                                                                    \
void NAME(int64_t ntensors, T** xs, T** gs, T** x0s, const int64_t* x0_strides,                \
          const int64_t* x0_offsets, const int64_t* ns, const T* steps, int64_t step_stride, double wd, const uint8_t* ok, \
          double* out, int nthreads) {                                                         \
    if (!*ok) return;                                                                          \
    const T w = (T)wd;                                                                         \
    for (int64_t k = 0; k < ntensors; ++k) {                                                   \
        T* x = xs[k]; const T* g = gs[k]; const T* x0 = x0s[k];                                \
        const int64_t n = ns[k];                                                               \
        const int64_t q = x0 ? x0_strides[k] : 0, o = x0_offsets[k];                           \
        const T s = steps[k * step_stride];                                                    \
        double total = 0.0;                                                                    \
        if (q == 1) {                                                                          \
            _Pragma("omp parallel for reduction(+:total) num_threads(nthreads) if(n > 4 * BLOCK)") \
            for (int64_t b = 0; b < n; b += BLOCK) {                                           \
                const int64_t e = b + BLOCK < n ? b + BLOCK : n;                               \
                T acc = 0;                                                                     \
                _Pragma("omp simd reduction(+:acc)")                                           \
                for (int64_t i = b; i < e; ++i) {                                              \
                    const T xi = x[i];                                                         \
                    const T xn = xi - s * (g[i] + w * xi);                                     \
                    x[i] = xn;                                                                 \
                    const T d = xn - x0[i];                                                    \
                    acc += d * d;                                                              \
                }                                                                              \
                total += (double)acc;                                                          \
            }                                                                                  \
        } else if (q == 0) {                                                                   \
            _Pragma("omp parallel for reduction(+:total) num_threads(nthreads) if(n > 4 * BLOCK)") \
            for (int64_t b = 0; b < n; b += BLOCK) {                                           \
                const int64_t e = b + BLOCK < n ? b + BLOCK : n;                               \
                T acc = 0;                                                                     \
                _Pragma("omp simd reduction(+:acc)")                                           \
                for (int64_t i = b; i < e; ++i) {                                              \
                    const T xi = x[i];                                                         \
                    const T xn = xi - s * (g[i] + w * xi);                                     \
                    x[i] = xn;                                                                 \
                    acc += xn * xn;                                                            \
                }                                                                              \
                total += (double)acc;                                                          \
            }                                                                                  \
        } else {                                                                               \
            _Pragma("omp parallel for reduction(+:total) num_threads(nthreads) if(n > 4 * BLOCK)") \
            for (int64_t b = 0; b < n; b += BLOCK) {                                           \
                const int64_t e = b + BLOCK < n ? b + BLOCK : n;                               \
                _Pragma("omp simd")                                                            \
                for (int64_t i = b; i < e; ++i) {                                              \
                    const T xi = x[i];                                                         \
                    x[i] = xi - s * (g[i] + w * xi);                                           \
                }                                                                              \
                const int64_t r = (b - o) % q;               /* in (-q, q): C rounds to 0 */   \
                int64_t i = r > 0 ? b - r + q : b - r;       /* first i >= b, i = o (mod q) */ \
                int64_t j = (i - o) / q;                                                       \
                T a0 = 0, a1 = 0, a2 = 0, a3 = 0;      /* four chains: no add-latency stall */ \
                for (; i + 3 * q < e; i += 4 * q, j += 4) {                                    \
                    const T d0 = x[i] - x0[j], d1 = x[i + q] - x0[j + 1];                      \
                    const T d2 = x[i + 2 * q] - x0[j + 2], d3 = x[i + 3 * q] - x0[j + 3];      \
                    a0 += d0 * d0; a1 += d1 * d1; a2 += d2 * d2; a3 += d3 * d3;                \
                }                                                                              \
                for (; i < e; i += q, ++j) {                                                   \
                    const T d = x[i] - x0[j];                                                  \
                    a0 += d * d;                                                               \
                }                                                                              \
                total += (double)((a0 + a1) + (a2 + a3));                                      \
            }                                                                                  \
        }                                                                                      \
        out[k] = total;                                                                        \
    }                                                                                          \
}

DOG_UPDATE(dog_update_f32, float)
DOG_UPDATE(dog_update_f64, double)

/* For every tensor k: out[2k] <- sum g^2, out[2k+1] <- sum (g + wd * x)^2 (x is not read when
   wd == 0). */
#define DOG_GRAD_SQ(NAME, T)                                                                   \
void NAME(int64_t ntensors, T** xs, T** gs, const int64_t* ns, double wd, double* out,         \
          int nthreads) {                                                                      \
    const T w = (T)wd;                                                                         \
    for (int64_t k = 0; k < ntensors; ++k) {                                                   \
        const T* x = xs[k]; const T* g = gs[k];                                                \
        const int64_t n = ns[k];                                                               \
        double s1 = 0.0, s2 = 0.0;                                                             \
        if (wd == 0.0) {                                                                       \
            _Pragma("omp parallel for reduction(+:s1) num_threads(nthreads) if(n > 4 * BLOCK)") \
            for (int64_t b = 0; b < n; b += BLOCK) {                                           \
                const int64_t e = b + BLOCK < n ? b + BLOCK : n;                               \
                T acc = 0;                                                                     \
                _Pragma("omp simd reduction(+:acc)")                                           \
                for (int64_t i = b; i < e; ++i) acc += g[i] * g[i];                            \
                s1 += (double)acc;                                                             \
            }                                                                                  \
            s2 = s1;                                                                           \
        } else {                                                                               \
            _Pragma("omp parallel for reduction(+:s1,s2) num_threads(nthreads) if(n > 4 * BLOCK)") \
            for (int64_t b = 0; b < n; b += BLOCK) {                                           \
                const int64_t e = b + BLOCK < n ? b + BLOCK : n;                               \
                T a1 = 0, a2 = 0;                                                              \
                _Pragma("omp simd reduction(+:a1,a2)")                                         \
                for (int64_t i = b; i < e; ++i) {                                              \
                    const T gi = g[i];                                                         \
                    const T ei = gi + w * x[i];                                                \
                    a1 += gi * gi;                                                             \
                    a2 += ei * ei;                                                             \
                }                                                                              \
                s1 += (double)a1;                                                              \
                s2 += (double)a2;                                                              \
            }                                                                                  \
        }                                                                                      \
        out[2 * k] = s1;                                                                       \
        out[2 * k + 1] = s2;                                                                   \
    }                                                                                          \
}

DOG_GRAD_SQ(dog_grad_sq_f32, float)
DOG_GRAD_SQ(dog_grad_sq_f64, double)

/* torch's vectorised lerp (aten/src/ATen/native/cpu/LerpKernel.cpp, lerp_vec):
   start + w (end - start) for |w| < 0.5, else end - (1 - w) (end - start), each as one fma. */
#define LERP(FMA, start, end, w, small) \
    ((small) ? FMA((w), (end) - (start), (start)) : FMA((w) - 1, (end) - (start), (end)))

/* ADOPT (adopt.py, adopt_tensor_update), for every tensor k of a bucket, if *ok, with s_k the
   tensor's step counter (fp32, read and incremented here):
     g <- -g if maximize;  g <- g + cwd * x (coupled decay)
     s_k == 0:  v <- g^2                                   (x and m unchanged)
     s_k >= 1:  d = max(sqrt(v), eps);  v <- lerp(v, g^2, 1 - beta2)
                u = clamp(g / d, -c, c) (c = s_k^e, or no clip);  m <- lerp(m, u, 1 - beta1)
                x <- x - x * lr * wd (decoupled decay);  x <- x - lr * m
     s_k <- s_k + 1
   The scalars are formed as the torch path forms them in the tensors' dtype T (1 - beta2 as
   1 - (T)beta2, 1 - beta1 rounded once), so both paths agree to the rounding of single ops.
   lr is *lr_ptr when lr_ptr is not NULL (a tensor learning rate), else lr_value.
   ms NULL (beta1 == 0, no first-moment buffer): x <- x - lr * u, which is what the lerp gives
   with w_m == 1 (fma(0, u - m, u) == u), so the numbers are those of a zero-initialised m.
   One parallel loop over the blocks of all tensors. If !*ok nothing is written. */
#define ADOPT_UPDATE(NAME, T, SQRT, FMA, POW)                                                  \
void NAME(int64_t ntensors, T** xs, T** gs, T** ms, T** vs, const int64_t* ns, float** steps,  \
          const double* lr_ptr, double lr_value, double beta1, double beta2, double eps,       \
          double weight_decay, double coupled_wd, double clip_exponent, int flags,             \
          const uint8_t* ok, int nthreads) {                                                   \
    if (!*ok || ntensors <= 0) return;                                                         \
    const int clipped = flags & 1, maximize = flags & 2, decoupled = flags & 4;                \
    const T lr = (T)(lr_ptr ? *lr_ptr : lr_value);                                             \
    const T lr_wd = lr * (T)weight_decay;                                                      \
    const T w_m = (T)(1.0 - beta1), w_v = (T)1 - (T)beta2;                                     \
    const int small_m = w_m < (T)0.5 && w_m > (T)-0.5, small_v = w_v < (T)0.5;                 \
    const T e = (T)eps, cwd = (T)coupled_wd;                                                   \
    int64_t* first = (int64_t*)malloc((size_t)(ntensors + 1) * sizeof(int64_t));               \
    T* clips = (T*)malloc((size_t)ntensors * sizeof(T));                                       \
    if (!first || !clips) { free(first); free(clips); return; }                                \
    int64_t total = 0;                                                                         \
    first[0] = 0;                                                                              \
    for (int64_t k = 0; k < ntensors; ++k) {                                                   \
        const T s = (T)*steps[k];                                                              \
        clips[k] = s > 0 ? (clipped ? POW(s, (T)clip_exponent) : (T)INFINITY) : (T)0;          \
        first[k + 1] = first[k] + (ns[k] + BLOCK - 1) / BLOCK;                                 \
        total += ns[k];                                                                        \
    }                                                                                          \
    const int64_t nblocks = first[ntensors];                                                   \
    _Pragma("omp parallel for schedule(static) num_threads(nthreads) if(total > 4 * BLOCK)")   \
    for (int64_t b = 0; b < nblocks; ++b) {                                                    \
        const int64_t k = block_owner(first, ntensors, b);                                     \
        const int64_t lo = (b - first[k]) * BLOCK;                                             \
        const int64_t hi = lo + BLOCK < ns[k] ? lo + BLOCK : ns[k];                            \
        T* restrict x = xs[k]; const T* restrict g = gs[k];                                    \
        T* restrict m = ms ? ms[k] : NULL; T* restrict v = vs[k];                              \
        const T c = clips[k];                                                                  \
        if (!(*steps[k] > 0)) {                                                                \
            _Pragma("omp simd")                                                                \
            for (int64_t i = lo; i < hi; ++i) {                                                \
                T gi = maximize ? -g[i] : g[i];                                                \
                if (cwd != 0) gi = FMA(x[i], cwd, gi);                                         \
                v[i] = gi * gi;                                                                \
            }                                                                                  \
            continue;                                                                          \
        }                                                                                      \
        if (!m) {                                                                              \
            _Pragma("omp simd")                                                                \
            for (int64_t i = lo; i < hi; ++i) {                                                \
                const T xi = x[i], vi = v[i];                                                  \
                T gi = maximize ? -g[i] : g[i];                                                \
                if (cwd != 0) gi = FMA(xi, cwd, gi);                                           \
                T d = SQRT(vi);                                                                \
                d = d < e ? e : d;                                                             \
                v[i] = LERP(FMA, vi, gi * gi, w_v, small_v);                                   \
                T u = gi / d;                                                                  \
                u = u < -c ? -c : u;                                                           \
                u = u > c ? c : u;                                                             \
                T xn = decoupled ? xi - xi * lr_wd : xi;                                       \
                x[i] = xn - u * lr;                                                            \
            }                                                                                  \
            continue;                                                                          \
        }                                                                                      \
        _Pragma("omp simd")                                                                    \
        for (int64_t i = lo; i < hi; ++i) {                                                    \
            const T xi = x[i], vi = v[i];                                                      \
            T gi = maximize ? -g[i] : g[i];                                                    \
            if (cwd != 0) gi = FMA(xi, cwd, gi);                                               \
            T d = SQRT(vi);                                                                    \
            d = d < e ? e : d;                                                                 \
            v[i] = LERP(FMA, vi, gi * gi, w_v, small_v);                                       \
            T u = gi / d;                                                                      \
            u = u < -c ? -c : u;                                                               \
            u = u > c ? c : u;                                                                 \
            const T mi = LERP(FMA, m[i], u, w_m, small_m);                                     \
            m[i] = mi;                                                                         \
            T xn = decoupled ? xi - xi * lr_wd : xi;                                           \
            x[i] = xn - mi * lr;                                                               \
        }                                                                                      \
    }                                                                                          \
    for (int64_t k = 0; k < ntensors; ++k) *steps[k] += 1.0f;                                  \
    free(first);                                                                               \
    free(clips);                                                                               \
}

ADOPT_UPDATE(adopt_update_f32, float, sqrtf, fmaf, powf)
ADOPT_UPDATE(adopt_update_f64, double, sqrt, fma, pow)

/* *out <- sum over every tensor k and element i of g_k[i]^2: per block of BLOCK elements in T,
   blocks added in double in a fixed order (the result does not depend on the thread count).
   One parallel loop over the blocks of all tensors: the non-finite guard's pass. */
#define SUM_SQ(NAME, T)                                                                        \
void NAME(int64_t ntensors, T** gs, const int64_t* ns, double* out, int nthreads) {            \
    *out = 0.0;                                                                                \
    if (ntensors <= 0) return;                                                                 \
    int64_t total;                                                                             \
    int64_t* first = block_starts(ntensors, ns, &total);                                       \
    if (!first) { *out = NAN; return; }                                                        \
    const int64_t nblocks = first[ntensors];                                                   \
    double* partial = (double*)malloc((size_t)(nblocks > 0 ? nblocks : 1) * sizeof(double));   \
    if (!partial) { free(first); *out = NAN; return; }                                         \
    _Pragma("omp parallel for schedule(static) num_threads(nthreads) if(total > 4 * BLOCK)")   \
    for (int64_t b = 0; b < nblocks; ++b) {                                                    \
        const int64_t lo_k = block_owner(first, ntensors, b);                                  \
        const int64_t lo = (b - first[lo_k]) * BLOCK;                                          \
        const int64_t hi = lo + BLOCK < ns[lo_k] ? lo + BLOCK : ns[lo_k];                      \
        const T* restrict g = gs[lo_k];                                                        \
        T acc = 0;                                                                             \
        _Pragma("omp simd reduction(+:acc)")                                                   \
        for (int64_t i = lo; i < hi; ++i) acc += g[i] * g[i];                                  \
        partial[b] = (double)acc;                                                              \
    }                                                                                          \
    double s = 0.0;                                                                            \
    for (int64_t b = 0; b < nblocks; ++b) s += partial[b];                                     \
    *out = s;                                                                                  \
    free(partial);                                                                             \
    free(first);                                                                               \
}

SUM_SQ(sum_sq_f32, float)
SUM_SQ(sum_sq_f64, double)
