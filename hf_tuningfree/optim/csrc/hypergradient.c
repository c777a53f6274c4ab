#include "blocks.h"

/* ======================= hypergradient optimizers (optim/hypergradient/) ======================= */

/* A 0-dim tensor of the hyper dtype H (fp64 if f64, else fp32), and the scalar arithmetic the
   torch path does on such tensors, rounded in H (the result is then cast to the tensors' T). */
static inline double hg_read(const void* p, int f64) {
    return f64 ? *(const double*)p : (double)*(const float*)p;
}
/* Entry k of a vector of H values (a step size per tensor: flags & HG_LR_PER_TENSOR). */
static inline double hg_read_at(const void* p, int f64, int64_t k) {
    return f64 ? ((const double*)p)[k] : (double)((const float*)p)[k];
}
/* flags bit: lr_ptr holds one step size per tensor (nt values of H), else one for all */
#define HG_LR_PER_TENSOR 4
static inline double hg_sub(double a, double b, int f64) {
    return f64 ? a - b : (double)((float)a - (float)b);
}
static inline double hg_mul(double a, double b, int f64) {
    return f64 ? a * b : (double)((float)a * (float)b);
}

/* Per-block partial sums (nd per block) -> per-tensor sums out[k * nd + j], blocks in order. */
static void hg_gather(int64_t nt, int64_t nd, const int64_t* first, const double* partial,
                      double* out) {
    for (int64_t k = 0; k < nt; ++k)
        for (int64_t j = 0; j < nd; ++j) {
            double s = 0.0;
            for (int64_t b = first[k]; b < first[k + 1]; ++b) s += partial[b * nd + j];
            out[k * nd + j] = s;
        }
}

/* out[k * nd + j] <- sum_i g_k[i] * D_kj[i] for j < nd (ds tensor-major: ds[k * nd + j]), the
   stored derivatives of the last update (SGD: buf, buf_prev; AdaGrad, RMSProp: direction,
   d_decay). Products and sums in double, per block; the blocks of a tensor are added in a fixed
   order, so the result does not depend on the thread count. A NaN/Inf anywhere in g makes its
   tensor's sum NaN/Inf (0 * Inf is NaN): the non-finite check. */
#define HG_DIRECTION_DOTS(NAME, T)                                                             \
void NAME(int64_t nt, T** gs, T** ds, int64_t nd, const int64_t* ns, double* out,              \
          int nthreads) {                                                                      \
    if (nt <= 0) return;                                                                       \
    int64_t total;                                                                             \
    int64_t* first = block_starts(nt, ns, &total);                                             \
    const int64_t nb = first ? first[nt] : 0;                                                  \
    double* partial = first ? (double*)malloc((size_t)(nb * nd + 1) * sizeof(double)) : NULL;  \
    if (!partial) {                                                                            \
        for (int64_t q = 0; q < nt * nd; ++q) out[q] = NAN;                                    \
        free(first);                                                                           \
        return;                                                                                \
    }                                                                                          \
    _Pragma("omp parallel for schedule(static) num_threads(nthreads) if(total > 4 * BLOCK)")   \
    for (int64_t b = 0; b < nb; ++b) {                                                         \
        const int64_t k = block_owner(first, nt, b);                                           \
        const int64_t lo = (b - first[k]) * BLOCK;                                             \
        const int64_t hi = lo + BLOCK < ns[k] ? lo + BLOCK : ns[k];                            \
        const T* restrict g = gs[k];                                                           \
        const T* restrict d0 = ds[k * nd];                                                     \
        double a0 = 0.0, a1 = 0.0;                                                             \
        if (nd == 1) {                                                                         \
            _Pragma("omp simd reduction(+:a0)")                                                \
            for (int64_t i = lo; i < hi; ++i) a0 += (double)g[i] * (double)d0[i];              \
        } else {                   /* one loop: all three streams in flight at once */         \
            const T* restrict d1 = ds[k * nd + 1];                                             \
            _Pragma("omp simd reduction(+:a0, a1)")                                            \
            for (int64_t i = lo; i < hi; ++i) {                                                \
                const double gi = (double)g[i];                                                \
                a0 += gi * (double)d0[i];                                                      \
                a1 += gi * (double)d1[i];                                                      \
            }                                                                                  \
            partial[b * nd + 1] = a1;                                                          \
        }                                                                                      \
        partial[b * nd] = a0;                                                                  \
    }                                                                                          \
    hg_gather(nt, nd, first, partial, out);                                                    \
    free(partial);                                                                             \
    free(first);                                                                               \
}

HG_DIRECTION_DOTS(hg_direction_dots_f32, float)
HG_DIRECTION_DOTS(hg_direction_dots_f64, double)

/* Adam's step-size dot (hypergradient/kernels.py, _adam_dots) for every tensor k, with s_k its step
   count (fp32 state, the updates so far) and, where s_k > 0, bc1 = 1 - beta1^s_k,
   bc2 = 1 - beta2^s_k (else 1), in T as _adam_scalars forms them:
     out[k * nd]     <- (sum_i g_i * m_i / (sqrt(v_i) * (1 / sqrt(bc2)) + eps)) * (1 / bc1)
     out[k * nd + 1] <- sum_i g_i * x_i               (nd = 2: decoupled weight decay, xs != NULL)
   The direction is formed in T, products and sums in double (per block, fixed order). */
#define HG_ADAM_DOTS(NAME, T, SQRT, POW)                                                       \
void NAME(int64_t nt, T** gs, T** ms, T** vs, T** xs, const int64_t* ns, float** steps,        \
          double beta1, double beta2, double eps, double* out, int nthreads) {                 \
    if (nt <= 0) return;                                                                       \
    const int64_t nd = xs ? 2 : 1;                                                             \
    int64_t total;                                                                             \
    int64_t* first = block_starts(nt, ns, &total);                                             \
    const int64_t nb = first ? first[nt] : 0;                                                  \
    double* partial = first ? (double*)malloc((size_t)(nb * nd + 1) * sizeof(double)) : NULL;  \
    T* inv = (T*)malloc((size_t)(2 * nt) * sizeof(T));                                         \
    if (!partial || !inv) {                                                                    \
        for (int64_t q = 0; q < nt * nd; ++q) out[q] = NAN;                                    \
        free(first); free(partial); free(inv);                                                 \
        return;                                                                                \
    }                                                                                          \
    for (int64_t k = 0; k < nt; ++k) {                                                         \
        const T s = (T)*steps[k];                                                              \
        T bc1 = 1, bc2 = 1;                                                                    \
        if (s > 0) {                                                                           \
            bc1 = (T)1 - POW((T)beta1, s);                                                     \
            bc2 = (T)1 - POW((T)beta2, s);                                                     \
        }                                                                                      \
        inv[2 * k] = (T)1 / bc1;                                                               \
        inv[2 * k + 1] = (T)1 / SQRT(bc2);                                                     \
    }                                                                                          \
    const T e = (T)eps;                                                                        \
    _Pragma("omp parallel for schedule(static) num_threads(nthreads) if(total > 4 * BLOCK)")   \
    for (int64_t b = 0; b < nb; ++b) {                                                         \
        const int64_t k = block_owner(first, nt, b);                                           \
        const int64_t lo = (b - first[k]) * BLOCK;                                             \
        const int64_t hi = lo + BLOCK < ns[k] ? lo + BLOCK : ns[k];                            \
        const T* restrict g = gs[k];                                                           \
        const T* restrict m = ms[k];                                                           \
        const T* restrict v = vs[k];                                                           \
        const T c = inv[2 * k + 1];                                                            \
        double acc = 0.0, ax = 0.0;                                                            \
        if (!xs) {                                                                             \
            _Pragma("omp simd reduction(+:acc)")                                               \
            for (int64_t i = lo; i < hi; ++i) {                                                \
                const T d = m[i] / (SQRT(v[i]) * c + e);                                       \
                acc += (double)g[i] * (double)d;                                               \
            }                                                                                  \
        } else {                                                                               \
            const T* restrict x = xs[k];                                                       \
            _Pragma("omp simd reduction(+:acc, ax)")                                           \
            for (int64_t i = lo; i < hi; ++i) {                                                \
                const T d = m[i] / (SQRT(v[i]) * c + e);                                       \
                const double gi = (double)g[i];                                                \
                acc += gi * (double)d;                                                         \
                ax += gi * (double)x[i];                                                       \
            }                                                                                  \
            partial[b * nd + 1] = ax;                                                          \
        }                                                                                      \
        partial[b * nd] = acc;                                                                 \
    }                                                                                          \
    hg_gather(nt, nd, first, partial, out);                                                    \
    for (int64_t k = 0; k < nt; ++k) out[k * nd] *= (double)inv[2 * k];                        \
    free(inv);                                                                                 \
    free(partial);                                                                             \
    free(first);                                                                               \
}

HG_ADAM_DOTS(hg_adam_dots_f32, float, sqrtf, powf)
HG_ADAM_DOTS(hg_adam_dots_f64, double, sqrt, pow)

/* The updates below run only where *ok (else nothing is written), in one parallel loop over
   the blocks of every tensor of the bucket, with the per-element code's order of operations
   (hypergradient/kernels.py, _sgd_update / _adam_update / _adagrad_update / _rmsprop_update) and its
   roundings: scalars that the torch path forms from 0-dim tensors of the hyper dtype H
   (lr, momentum, decay, 1 - beta, lr * wd) are formed in H, then cast to T; Python floats
   (weight decay, eps) are cast to T. No fma contraction (-std=c99: -ffp-contract=off).
   flags: 1 maximize (g <- -g), 2 decoupled weight decay (Adam), 4 (HG_LR_PER_TENSOR) lr_ptr
   holds one step size per tensor (per_tensor=True). The coupled L2 term is g <- g + wd * x. */

/* SGD (torch's, dampening 0): buf_new = mu * buf + g;  x <- x - lr * buf_new;
   prev <- buf (learned momentum: d buf / d mu) when prevs != NULL. lr, mu: 0-dim H tensors. */
#define HG_SGD_UPDATE(NAME, T)                                                                 \
void NAME(int64_t nt, T** xs, T** gs, T** bufs, T** prevs, const int64_t* ns,                  \
          const void* lr_ptr, const void* mu_ptr, int f64, double wd, int flags,               \
          const uint8_t* ok, int nthreads) {                                                   \
    if (!*ok || nt <= 0) return;                                                               \
    const int maximize = flags & 1;                                                            \
    const int per = flags & HG_LR_PER_TENSOR;                                                  \
    const T mu = (T)hg_read(mu_ptr, f64), w = (T)wd;                                           \
    int64_t total;                                                                             \
    int64_t* first = block_starts(nt, ns, &total);                                             \
    if (!first) return;                                                                        \
    const int64_t nb = first[nt];                                                              \
    _Pragma("omp parallel for schedule(static) num_threads(nthreads) if(total > 4 * BLOCK)")   \
    for (int64_t b = 0; b < nb; ++b) {                                                         \
        const int64_t k = block_owner(first, nt, b);                                           \
        const int64_t lo = (b - first[k]) * BLOCK;                                             \
        const int64_t hi = lo + BLOCK < ns[k] ? lo + BLOCK : ns[k];                            \
        const T lr = (T)hg_read_at(lr_ptr, f64, per ? k : 0);                                  \
        T* restrict x = xs[k]; const T* restrict g = gs[k]; T* restrict buf = bufs[k];         \
        if (prevs) {                                                                           \
            T* restrict prev = prevs[k];                                                       \
            _Pragma("omp simd")                                                                \
            for (int64_t i = lo; i < hi; ++i) {                                                \
                const T xi = x[i], bo = buf[i];                                                \
                T gi = maximize ? -g[i] : g[i];                                                \
                if (wd != 0.0) gi = gi + w * xi;                                               \
                const T bn = mu * bo + gi;                                                     \
                x[i] = xi - lr * bn;                                                           \
                prev[i] = bo;                                                                  \
                buf[i] = bn;                                                                   \
            }                                                                                  \
        } else {                                                                               \
            _Pragma("omp simd")                                                                \
            for (int64_t i = lo; i < hi; ++i) {                                                \
                const T xi = x[i];                                                             \
                T gi = maximize ? -g[i] : g[i];                                                \
                if (wd != 0.0) gi = gi + w * xi;                                               \
                const T bn = mu * buf[i] + gi;                                                 \
                x[i] = xi - lr * bn;                                                           \
                buf[i] = bn;                                                                   \
            }                                                                                  \
        }                                                                                      \
    }                                                                                          \
    free(first);                                                                               \
}

HG_SGD_UPDATE(hg_sgd_update_f32, float)
HG_SGD_UPDATE(hg_sgd_update_f64, double)

/* Adam / AdamW (torch's formulation) with fixed betas; s_k the tensor's step counter (fp32,
   read here and incremented after the update), bc = 1 - beta^(s_k + 1) in T:
     m_new = m + (1 - beta1) * (g - m);   v_new = beta2 * v + (1 - beta2) * g^2
     x <- x - (lr * wd) * x (decoupled)
     x <- x - lr * ((m_new / bc1) / (sqrt(v_new / bc2) + eps)) */
#define HG_ADAM_UPDATE(NAME, T, SQRT, POW)                                                     \
void NAME(int64_t nt, T** xs, T** gs, T** ms, T** vs, const int64_t* ns, float** steps,        \
          const void* lr_ptr, int f64, double beta1, double beta2, double eps, double wd,      \
          int flags, const uint8_t* ok, int nthreads) {                                        \
    if (!*ok || nt <= 0) return;                                                               \
    const int maximize = flags & 1, decoupled = flags & 2;                                     \
    const int per = flags & HG_LR_PER_TENSOR;                                                  \
    const T w1 = (T)hg_sub(1.0, beta1, f64), w2 = (T)hg_sub(1.0, beta2, f64);                  \
    const T b2 = (T)beta2, e = (T)eps, cwd = (T)wd;                                            \
    const int coupled = !decoupled && wd != 0.0, decay = decoupled && wd != 0.0;               \
    int64_t total;                                                                             \
    int64_t* first = block_starts(nt, ns, &total);                                             \
    T* bc = (T*)malloc((size_t)(2 * nt) * sizeof(T));                                          \
    if (!first || !bc) { free(first); free(bc); return; }                                      \
    for (int64_t k = 0; k < nt; ++k) {                                                         \
        const T s1 = (T)*steps[k] + (T)1;                                                      \
        bc[2 * k] = (T)1 - POW((T)beta1, s1);                                                  \
        bc[2 * k + 1] = (T)1 - POW((T)beta2, s1);                                              \
    }                                                                                          \
    const int64_t nb = first[nt];                                                              \
    _Pragma("omp parallel for schedule(static) num_threads(nthreads) if(total > 4 * BLOCK)")   \
    for (int64_t b = 0; b < nb; ++b) {                                                         \
        const int64_t k = block_owner(first, nt, b);                                           \
        const int64_t lo = (b - first[k]) * BLOCK;                                             \
        const int64_t hi = lo + BLOCK < ns[k] ? lo + BLOCK : ns[k];                            \
        T* restrict x = xs[k]; const T* restrict g = gs[k];                                    \
        T* restrict m = ms[k]; T* restrict v = vs[k];                                          \
        const T c1 = bc[2 * k], c2 = bc[2 * k + 1];                                            \
        const double lr_h = hg_read_at(lr_ptr, f64, per ? k : 0);                              \
        const T lr = (T)lr_h, lr_wd = (T)hg_mul(lr_h, wd, f64);                                \
        _Pragma("omp simd")                                                                    \
        for (int64_t i = lo; i < hi; ++i) {                                                    \
            T xi = x[i];                                                                       \
            const T mo = m[i], vo = v[i];                                                      \
            T gi = maximize ? -g[i] : g[i];                                                    \
            if (coupled) gi = gi + cwd * xi;                                                   \
            const T mn = mo + w1 * (gi - mo);                                                  \
            const T vn = b2 * vo + w2 * (gi * gi);                                             \
            const T den = SQRT(vn / c2) + e;                                                   \
            const T mh = mn / c1;                                                              \
            if (decay) xi = xi - lr_wd * xi;                                                   \
            x[i] = xi - lr * (mh / den);                                                       \
            m[i] = mn;                                                                         \
            v[i] = vn;                                                                         \
        }                                                                                      \
    }                                                                                          \
    for (int64_t k = 0; k < nt; ++k) *steps[k] += 1.0f;                                        \
    free(bc);                                                                                  \
    free(first);                                                                               \
}

HG_ADAM_UPDATE(hg_adam_update_f32, float, sqrtf, powf)
HG_ADAM_UPDATE(hg_adam_update_f64, double, sqrt, pow)

/* AdaGrad (torch's, no lr decay): G_new = G + g^2;  d = g / (sqrt(G_new) + eps);  x <- x - lr * d;
   direction <- d when dirs != NULL (learned step size). */
#define HG_ADAGRAD_UPDATE(NAME, T, SQRT)                                                       \
void NAME(int64_t nt, T** xs, T** gs, T** sums, T** dirs, const int64_t* ns,                   \
          const void* lr_ptr, int f64, double eps, double wd, int flags, const uint8_t* ok,    \
          int nthreads) {                                                                      \
    if (!*ok || nt <= 0) return;                                                               \
    const int maximize = flags & 1;                                                            \
    const int per = flags & HG_LR_PER_TENSOR;                                                  \
    const T e = (T)eps, w = (T)wd;                                                             \
    int64_t total;                                                                             \
    int64_t* first = block_starts(nt, ns, &total);                                             \
    if (!first) return;                                                                        \
    const int64_t nb = first[nt];                                                              \
    _Pragma("omp parallel for schedule(static) num_threads(nthreads) if(total > 4 * BLOCK)")   \
    for (int64_t b = 0; b < nb; ++b) {                                                         \
        const int64_t k = block_owner(first, nt, b);                                           \
        const int64_t lo = (b - first[k]) * BLOCK;                                             \
        const int64_t hi = lo + BLOCK < ns[k] ? lo + BLOCK : ns[k];                            \
        const T lr = (T)hg_read_at(lr_ptr, f64, per ? k : 0);                                  \
        T* restrict x = xs[k]; const T* restrict g = gs[k]; T* restrict a = sums[k];           \
        T* restrict dir = dirs ? dirs[k] : NULL;                                               \
        _Pragma("omp simd")                                                                    \
        for (int64_t i = lo; i < hi; ++i) {                                                    \
            const T xi = x[i];                                                                 \
            T gi = maximize ? -g[i] : g[i];                                                    \
            if (wd != 0.0) gi = gi + w * xi;                                                   \
            const T an = a[i] + gi * gi;                                                       \
            const T d = gi / (SQRT(an) + e);                                                   \
            x[i] = xi - lr * d;                                                                \
            a[i] = an;                                                                         \
            if (dir) dir[i] = d;                                                               \
        }                                                                                      \
    }                                                                                          \
    free(first);                                                                               \
}

HG_ADAGRAD_UPDATE(hg_adagrad_update_f32, float, sqrtf)
HG_ADAGRAD_UPDATE(hg_adagrad_update_f64, double, sqrt)

/* RMSProp (torch's, no momentum, not centered), rho a 0-dim H tensor:
     v_new = rho * v + (1 - rho) * g^2;  d = g / (sqrt(v_new) + eps);  x <- x - lr * d
   direction <- d (dirs != NULL); d_decay <- -(g / den^2) * (v - g^2) / (2 sqrt(v_new)), 0 where
   sqrt(v_new) == 0 (dds != NULL, learned decay). */
#define HG_RMSPROP_UPDATE(NAME, T, SQRT)                                                       \
void NAME(int64_t nt, T** xs, T** gs, T** sqs, T** dirs, T** dds, const int64_t* ns,           \
          const void* lr_ptr, const void* rho_ptr, int f64, double eps, double wd, int flags,  \
          const uint8_t* ok, int nthreads) {                                                   \
    if (!*ok || nt <= 0) return;                                                               \
    const int maximize = flags & 1;                                                            \
    const double rho_h = hg_read(rho_ptr, f64);                                                \
    const int per = flags & HG_LR_PER_TENSOR;                                                  \
    const T rho = (T)rho_h, w_v = (T)hg_sub(1.0, rho_h, f64);                                  \
    const T e = (T)eps, w = (T)wd;                                                             \
    int64_t total;                                                                             \
    int64_t* first = block_starts(nt, ns, &total);                                             \
    if (!first) return;                                                                        \
    const int64_t nb = first[nt];                                                              \
    _Pragma("omp parallel for schedule(static) num_threads(nthreads) if(total > 4 * BLOCK)")   \
    for (int64_t b = 0; b < nb; ++b) {                                                         \
        const int64_t k = block_owner(first, nt, b);                                           \
        const int64_t lo = (b - first[k]) * BLOCK;                                             \
        const int64_t hi = lo + BLOCK < ns[k] ? lo + BLOCK : ns[k];                            \
        const T lr = (T)hg_read_at(lr_ptr, f64, per ? k : 0);                                  \
        T* restrict x = xs[k]; const T* restrict g = gs[k]; T* restrict sq = sqs[k];           \
        T* restrict dir = dirs ? dirs[k] : NULL;                                               \
        T* restrict dd = dds ? dds[k] : NULL;                                                  \
        _Pragma("omp simd")                                                                    \
        for (int64_t i = lo; i < hi; ++i) {                                                    \
            const T xi = x[i], vo = sq[i];                                                     \
            T gi = maximize ? -g[i] : g[i];                                                    \
            if (wd != 0.0) gi = gi + w * xi;                                                   \
            const T vn = rho * vo + w_v * (gi * gi);                                           \
            const T sv = SQRT(vn);                                                             \
            const T den = sv + e;                                                              \
            const T d = gi / den;                                                              \
            x[i] = xi - lr * d;                                                                \
            if (dir) dir[i] = d;                                                               \
            if (dd) dd[i] = sv > 0 ? -(gi / (den * den)) * (vo - gi * gi) / ((T)2 * sv) : (T)0; \
            sq[i] = vn;                                                                        \
        }                                                                                      \
    }                                                                                          \
    free(first);                                                                               \
}

HG_RMSPROP_UPDATE(hg_rmsprop_update_f32, float, sqrtf)
HG_RMSPROP_UPDATE(hg_rmsprop_update_f64, double, sqrt)
