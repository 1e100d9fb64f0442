// Paged attention and KV-cache writes for gym-serve, compiled at run time by
// NVRTC (see paged_attention.rs). No headers: bf16 is carried as its 16 raw
// bits, so the source compiles without the toolkit's include directory (a
// GPU machine with only the driver and the runtime libraries has none).
//
// Layouts (all contiguous):
//   q      [rows, heads, head_dim]             f32 or bf16, after RoPE
//   pool   [kv_heads, slots, head_dim]         f32 or bf16, keys or values
//   meta   [rows] table start, [rows] visible, then the block tables (u32)
//   out    [rows, heads * head_dim]            q's dtype
//
// One thread block per (query row, head); each warp walks every
// `warps`-th visible position of the row's sequence through its block table
// with an online softmax, and the warps' partial results are merged at the
// end. The causal mask is the row's visible count: nothing is built on the
// host, nothing is gathered.

typedef unsigned short bf16_bits;

#define MAX_HEAD_DIM 256
#define PER_LANE (MAX_HEAD_DIM / 32)
#define MAX_WARPS 8
// math.h's INFINITY is not available without headers.
#define NEG_INF __int_as_float(0xff800000u)

__device__ __forceinline__ float widen(float x) { return x; }
__device__ __forceinline__ float widen(bf16_bits x) {
    return __uint_as_float(((unsigned int)x) << 16);
}

__device__ __forceinline__ void narrow(float x, float* out) { *out = x; }
// Round to nearest even, as candle's (and PyTorch's) f32 -> bf16 does; NaN
// stays NaN.
__device__ __forceinline__ void narrow(float x, bf16_bits* out) {
    unsigned int u = __float_as_uint(x);
    if ((u & 0x7fffffffu) > 0x7f800000u) {
        *out = (bf16_bits)((u >> 16) | 0x40u);
        return;
    }
    u += 0x7fffu + ((u >> 16) & 1u);
    *out = (bf16_bits)(u >> 16);
}

__device__ __forceinline__ float warp_sum(float x) {
    for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
    return x;
}

template <typename Q, typename KV>
__device__ void paged_attention(const Q* __restrict__ q, const KV* __restrict__ keys,
                                const KV* __restrict__ values,
                                const unsigned int* __restrict__ meta, Q* __restrict__ out,
                                int rows, int heads, int kv_heads, int head_dim,
                                int block_size, long long slots, float scale) {
    const int row = blockIdx.x, head = blockIdx.y;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int warps = blockDim.x / 32;
    const int kv_head = head / (heads / kv_heads);
    const unsigned int* table = meta + 2 * rows + meta[row];
    const unsigned int visible = meta[rows + row];

    float qv[PER_LANE];
    const Q* q_row = q + ((long long)row * heads + head) * head_dim;
#pragma unroll
    for (int i = 0; i < PER_LANE; i++) {
        const int d = lane + 32 * i;
        qv[i] = d < head_dim ? widen(q_row[d]) * scale : 0.f;
    }
    const KV* k_head = keys + (long long)kv_head * slots * head_dim;
    const KV* v_head = values + (long long)kv_head * slots * head_dim;

    float m = NEG_INF, l = 0.f, acc[PER_LANE];
#pragma unroll
    for (int i = 0; i < PER_LANE; i++) acc[i] = 0.f;
    for (unsigned int p = warp; p < visible; p += warps) {
        const long long slot =
            (long long)table[p / block_size] * block_size + p % block_size;
        const KV* k = k_head + slot * head_dim;
        float s = 0.f;
#pragma unroll
        for (int i = 0; i < PER_LANE; i++) {
            const int d = lane + 32 * i;
            if (d < head_dim) s += qv[i] * widen(k[d]);
        }
        s = warp_sum(s);
        const float m_new = fmaxf(m, s);
        const float correction = expf(m - m_new);
        const float weight = expf(s - m_new);
        l = l * correction + weight;
        const KV* v = v_head + slot * head_dim;
#pragma unroll
        for (int i = 0; i < PER_LANE; i++) {
            const int d = lane + 32 * i;
            if (d < head_dim) acc[i] = acc[i] * correction + weight * widen(v[d]);
        }
        m = m_new;
    }

    __shared__ float warp_max[MAX_WARPS], warp_sum_exp[MAX_WARPS];
    __shared__ float warp_acc[MAX_WARPS * MAX_HEAD_DIM];
    if (lane == 0) {
        warp_max[warp] = m;
        warp_sum_exp[warp] = l;
    }
#pragma unroll
    for (int i = 0; i < PER_LANE; i++) {
        const int d = lane + 32 * i;
        if (d < head_dim) warp_acc[warp * MAX_HEAD_DIM + d] = acc[i];
    }
    __syncthreads();
    float total_max = NEG_INF;
    for (int w = 0; w < warps; w++) total_max = fmaxf(total_max, warp_max[w]);
    float total = 0.f;
    for (int w = 0; w < warps; w++) {
        // A warp that saw no position has l = 0 and max -inf: weight 0.
        if (warp_sum_exp[w] > 0.f) total += warp_sum_exp[w] * expf(warp_max[w] - total_max);
    }
    Q* o = out + ((long long)row * heads + head) * head_dim;
    for (int d = threadIdx.x; d < head_dim; d += blockDim.x) {
        float x = 0.f;
        for (int w = 0; w < warps; w++) {
            if (warp_sum_exp[w] > 0.f)
                x += warp_acc[w * MAX_HEAD_DIM + d] * expf(warp_max[w] - total_max);
        }
        narrow(total > 0.f ? x / total : 0.f, &o[d]);
    }
}

// pool[h, slots[i], :] = rows[i, h, :], converted to the pool's dtype.
template <typename R, typename KV>
__device__ void write_rows(const R* __restrict__ rows, const unsigned int* __restrict__ slot_of,
                           KV* __restrict__ pool, int n, int kv_heads, int head_dim,
                           long long slots) {
    const long long total = (long long)n * kv_heads * head_dim;
    for (long long e = (long long)blockIdx.x * blockDim.x + threadIdx.x; e < total;
         e += (long long)gridDim.x * blockDim.x) {
        const long long i = e / ((long long)kv_heads * head_dim);
        const int h = (int)((e / head_dim) % kv_heads), d = (int)(e % head_dim);
        narrow(widen(rows[e]), &pool[((long long)h * slots + slot_of[i]) * head_dim + d]);
    }
}

#define PAGED(NAME, Q, KV)                                                                \
    extern "C" __global__ void NAME(const Q* q, const KV* k, const KV* v,                 \
                                    const unsigned int* meta, Q* out, int rows, int heads, \
                                    int kv_heads, int head_dim, int block_size,            \
                                    long long slots, float scale) {                       \
        paged_attention<Q, KV>(q, k, v, meta, out, rows, heads, kv_heads, head_dim,       \
                               block_size, slots, scale);                                 \
    }
PAGED(paged_attention_f32_f32, float, float)
PAGED(paged_attention_f32_bf16, float, bf16_bits)
PAGED(paged_attention_bf16_f32, bf16_bits, float)
PAGED(paged_attention_bf16_bf16, bf16_bits, bf16_bits)

#define WRITE(NAME, R, KV)                                                                 \
    extern "C" __global__ void NAME(const R* rows, const unsigned int* slot_of, KV* pool,   \
                                    int n, int kv_heads, int head_dim, long long slots) {   \
        write_rows<R, KV>(rows, slot_of, pool, n, kv_heads, head_dim, slots);               \
    }
WRITE(write_rows_f32_f32, float, float)
WRITE(write_rows_f32_bf16, float, bf16_bits)
WRITE(write_rows_bf16_f32, bf16_bits, float)
WRITE(write_rows_bf16_bf16, bf16_bits, bf16_bits)
