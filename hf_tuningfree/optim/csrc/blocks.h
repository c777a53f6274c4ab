/* Shared by the C kernels of hf_tuningfree.optim (see the _native package): the includes, the
   block size and the block bookkeeping of a bucket (a list of tensors split into BLOCK-element
   blocks that the threads share). Every kernel file includes it; the helpers are static, one copy
   per file. */
#ifndef HF_TUNINGFREE_BLOCKS_H
#define HF_TUNINGFREE_BLOCKS_H
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#define BLOCK 8192

/* The blocks of a bucket: tensor k owns blocks first[k] .. first[k+1]-1 (BLOCK elements each,
   the last one shorter); first[nt] is the number of blocks and *total the number of elements.
   NULL if out of memory; the caller frees the array. */
static inline int64_t* block_starts(int64_t nt, const int64_t* ns, int64_t* total) {
    int64_t* first = (int64_t*)malloc((size_t)(nt + 1) * sizeof(int64_t));
    *total = 0;
    if (!first) return NULL;
    first[0] = 0;
    for (int64_t k = 0; k < nt; ++k) {
        first[k + 1] = first[k] + (ns[k] + BLOCK - 1) / BLOCK;
        *total += ns[k];
    }
    return first;
}

/* The tensor that owns block b: the largest k with first[k] <= b (empty tensors own none). */
static inline int64_t block_owner(const int64_t* first, int64_t nt, int64_t b) {
    int64_t lo = 0, hi = nt - 1;
    while (lo < hi) {
        const int64_t mid = (lo + hi + 1) / 2;
        if (first[mid] <= b) lo = mid; else hi = mid - 1;
    }
    return lo;
}

#endif /* HF_TUNINGFREE_BLOCKS_H */
