// mpcache's lookup outside training for the CPU: every id read once, in one pass, whether its row is
// cached (a float32 cache row) or stored (an INT8 or INT4 row in FBGEMM's fused layout).
//
// A cached row's stored row holds its cache slot and has the sign bit of its scale set (mpcache.py,
// "_mark"), so one read of the stored row tells which kind of row an id has. The decode is
// code * scale + bias in float32, as quant.dequantize_rows computes it; the PyTorch path in mpcache.py
// stays the reference (tests/embeddings/test_mpcache.py compares the two).
// Plain C ABI on raw buffers: built with g++ alone (no PyTorch headers) and called through ctypes.
//
// The kernel below MPCACHE_KERNEL is compiled twice, this file including itself: for the baseline ISA,
// and on x86-64 with GCC for AVX2 (picked at run time when the CPU has it), so the build flags stay
// portable. Neither version contracts a multiply and an add (no FMA), so both round as PyTorch does.
#ifndef MPCACHE_KERNEL
#include <cstdint>
#include <cstring>

namespace {

// IEEE half -> float (normal, subnormal, zero, inf/nan), without F16C.
inline float half_to_float(uint16_t h) {
    const uint32_t sign = (uint32_t)(h & 0x8000) << 16;
    uint32_t exp = (h >> 10) & 0x1F, mant = h & 0x3FF, bits;
    if (exp == 0x1F) {
        bits = sign | 0x7F800000u | (mant << 13);
    } else if (exp) {
        bits = sign | ((exp + 112) << 23) | (mant << 13);
    } else if (mant) {  // subnormal: normalise
        int e = -1;
        do { ++e; mant <<= 1; } while (!(mant & 0x400));
        bits = sign | ((uint32_t)(112 - e) << 23) | ((mant & 0x3FF) << 13);
    } else {
        bits = sign;
    }
    float f;
    std::memcpy(&f, &bits, 4);
    return f;
}

struct Call {
    const uint8_t* codes;
    int64_t rows, row_bytes, dim, bits;
    const float* cache;
    int64_t marker_byte, slot_at;
    uint32_t slot_mask;
    int id_bytes;
    int64_t n;
    const void* ids;
    int64_t bags;
    const int64_t* offsets;
    const float* weights;
    int mean;
    float* out;
};

}  // namespace

#define MPCACHE_KERNEL
#ifdef __FILE_NAME__  // this file, found beside itself however the compiler was given its path
#define MPCACHE_SELF __FILE_NAME__
#else
#define MPCACHE_SELF __FILE__
#endif
namespace baseline {
#include MPCACHE_SELF
}  // namespace baseline
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define MPCACHE_AVX2
#pragma GCC push_options
#pragma GCC target("avx2")
namespace avx2 {
#include MPCACHE_SELF
}  // namespace avx2
#pragma GCC pop_options
#endif

static int baseline_only = 0;

extern "C" {

// Tests: 1 makes mpcache_lookup run the baseline version on every CPU, 0 the best one the CPU has.
void mpcache_baseline_only(int on) { baseline_only = on; }

// Rows of ids (int32 or int64: id_bytes) of a table of `rows` stored rows of `bits` (8 or 4), pooled
// into bags (offsets: each bag's first id, non-decreasing, within [0, n]; nullptr: one id per bag), each
// id's row times its weight (weights: nullptr for 1), divided by the bag's length when mean is set. A
// stored row with bit 7 of byte marker_byte set is cached: the little-endian slot_bytes (1-4; 0: no row
// is) at slot_at name its row of cache. out: (bags, dim) float32.
// Returns -1; or, with out partly written, the position of an id outside [0, rows) (whose row is never
// read), or -2 for bad offsets (nothing read).
int64_t mpcache_lookup(const uint8_t* codes, int64_t rows, int64_t row_bytes, int64_t dim, int64_t bits,
                       const float* cache, int64_t marker_byte, int64_t slot_at, int64_t slot_bytes, int id_bytes,
                       int64_t n, const void* ids, int64_t bags, const int64_t* offsets, const float* weights,
                       int mean, float* out) {
    const uint32_t mask = slot_bytes >= 4 ? 0xFFFFFFFFu : (uint32_t)((1ull << (8 * slot_bytes)) - 1);
    const Call a{codes, rows, row_bytes, dim, bits, cache, marker_byte, slot_at, mask, id_bytes, n, ids, bags,
                 offsets, weights, mean, out};
#ifdef MPCACHE_AVX2
    if (!baseline_only && __builtin_cpu_supports("avx2")) return avx2::run_any(a);
#endif
    return baseline::run_any(a);
}

// Training's backward of a gather (rows[index]): out[index[i]] += grad[i] for i = 0, 1, ..., n - 1 in
// that order, so each row's sum rounds exactly as index_add_ rounds it (the float adds of one row are
// done in the same order; no FMA, no reassociation). out: (rows, dim) float32, zeroed by the caller;
// grad: n rows of dim float32, row i at grad + i * grad_stride (stride 0: one row broadcast). index
// entries must lie in [0, rows) (the caller's own deduplication makes them).
void mpcache_accumulate(float* out, int64_t dim, int64_t n, const int64_t* index, const float* grad,
                        int64_t grad_stride) {
    for (int64_t i = 0; i < n; ++i) {
        float* o = out + index[i] * dim;
        const float* g = grad + i * grad_stride;
        for (int64_t j = 0; j < dim; ++j) o[j] += g[j];
    }
}

}  // extern "C"

#else  // MPCACHE_KERNEL: the kernel, compiled once per ISA

// Bits 8 or 4; Dim > 0 fixes the row width at compile time (the common widths), 0 reads it from dim.
template <int Bits, int Dim>
struct Table {
    const uint8_t* codes;  // (N, row_bytes)
    int64_t row_bytes, dim_;
    const float* cache;  // (C + S, dim): the cache slots first
    int64_t marker_byte, slot_at;  // where a cached row keeps its marker and (little-endian) slot
    uint32_t slot_mask;  // the slot's bytes of the 4 read at slot_at; 0: no row is marked
    int64_t sb_at;  // offset of the scale (then the bias)

    inline int64_t dim() const { return Dim ? Dim : dim_; }
    inline const uint8_t* row(int64_t id) const { return codes + id * row_bytes; }

    // cache row of a stored row, or nullptr
    inline const float* cached(const uint8_t* r) const {
        if (!(r[marker_byte] & 0x80) || !slot_mask) return nullptr;
        uint32_t slot;
        std::memcpy(&slot, r + slot_at, 4);  // within the row: slot_at + 4 <= row_bytes
        return cache + (int64_t)(slot & slot_mask) * dim();
    }

    inline void prefetch(int64_t id) const {
        const uint8_t* r = row(id);
        __builtin_prefetch(r);
        __builtin_prefetch(r + row_bytes - 1);
    }

    // out[0:dim] (=, or += w *) the row of a stored, uncached row r
    template <bool Add>
    inline void decode(const uint8_t* r, float w, float* out) const {
        const int64_t d = dim();
        if (Bits == 8) {
            float scale, bias;
            std::memcpy(&scale, r + sb_at, 4);
            std::memcpy(&bias, r + sb_at + 4, 4);
            for (int64_t j = 0; j < d; ++j) {
                const float v = (float)r[j] * scale + bias;
                out[j] = Add ? out[j] + w * v : v;
            }
        } else {
            uint16_t s, b;
            std::memcpy(&s, r + sb_at, 2);
            std::memcpy(&b, r + sb_at + 2, 2);
            const float scale = half_to_float(s), bias = half_to_float(b);
            for (int64_t j = 0; j < d; ++j) {
                const uint8_t byte = r[j >> 1];
                const float v = (float)((j & 1) ? byte >> 4 : byte & 0x0F) * scale + bias;
                out[j] = Add ? out[j] + w * v : v;
            }
        }
    }

    template <bool Add>
    inline void read(const uint8_t* r, const float* c, float w, float* out) const {
        const int64_t d = dim();
        if (c) {
            if (Add) {
                for (int64_t j = 0; j < d; ++j) out[j] += w * c[j];
            } else {
                std::memcpy(out, c, (size_t)d * sizeof(float));
            }
        } else {
            decode<Add>(r, w, out);
        }
    }
};

// The ids are read in chunks, software-pipelined: resolving chunk k + 1 (each id's stored row, and
// whether and where it is cached; its cache row prefetched) overlaps writing chunk k, so the two reads
// an id may need, one depending on the other, are in flight for many ids at once. Stored rows are
// prefetched AHEAD ids before they are resolved: ids come from all over the table.
const int64_t CHUNK = 32;
const int64_t AHEAD = 96;

// Calls emit(i, stored row, cache row or nullptr) for i in [lo, n), in order, and returns -1; or stops
// at the first id outside [0, rows), a chunk before it would be emitted, and returns its position.
template <int Bits, int Dim, typename I, typename Emit>
int64_t pipeline(const Table<Bits, Dim>& t, int64_t rows, int64_t lo, int64_t n, const I* ids, Emit emit) {
    const uint8_t* stored[2][CHUNK];
    const float* cached[2][CHUNK];
    for (int64_t i = lo; i < lo + AHEAD && i < n; ++i) t.prefetch((int64_t)ids[i]);  // (a prefetch never faults)
    auto resolve = [&](int64_t base, int k) -> int64_t {
        for (int64_t j = 0; j < CHUNK && base + j < n; ++j) {
            if (base + j + AHEAD < n) t.prefetch((int64_t)ids[base + j + AHEAD]);
            const int64_t id = (int64_t)ids[base + j];
            if ((uint64_t)id >= (uint64_t)rows) return base + j;
            const uint8_t* r = t.row(id);
            const float* c = t.cached(r);
            stored[k][j] = r;
            cached[k][j] = c;
            if (c) {
                __builtin_prefetch(c);
                __builtin_prefetch(c + t.dim() - 1);
            }
        }
        return -1;
    };
    int64_t bad = lo < n ? resolve(lo, 0) : -1;
    for (int64_t base = lo, k = 0; base < n && bad < 0; base += CHUNK, k ^= 1) {
        if (base + CHUNK < n) bad = resolve(base + CHUNK, k ^ 1);
        for (int64_t j = 0; j < CHUNK && base + j < n; ++j) emit(base + j, stored[k][j], cached[k][j]);
    }
    return bad;
}

// Returns -1; or (out then partly written) the position of an id outside [0, rows), which no row is
// read for, or -2 for offsets that are not non-decreasing within [0, n].
template <int Bits, int Dim, typename I>
int64_t lookup(const Table<Bits, Dim>& t, int64_t rows, int64_t n, const I* ids, int64_t bags,
               const int64_t* offsets, const float* weights, int mean, float* out) {
    for (int64_t b = 0; offsets && b < bags; ++b)
        if (offsets[b] < 0 || offsets[b] > (b + 1 < bags ? offsets[b + 1] : n)) return -2;
    const int64_t d = t.dim();
    const size_t row_size = (size_t)d * sizeof(float);
    if (!offsets && !weights) {  // one id per bag, as the models look up
        return pipeline(t, rows, 0, n, ids, [&](int64_t i, const uint8_t* r, const float* c) {
            t.template read<false>(r, c, 1.0f, out + i * d);
        });
    }
    if (!offsets) {
        return pipeline(t, rows, 0, n, ids, [&](int64_t i, const uint8_t* r, const float* c) {
            std::memset(out + i * d, 0, row_size);
            t.template read<true>(r, c, weights[i], out + i * d);
        });
    }
    std::memset(out, 0, (size_t)bags * row_size);
    int64_t b = 0, end = bags > 1 ? offsets[1] : n;
    const int64_t bad = pipeline(t, rows, bags ? offsets[0] : n, n, ids, [&](int64_t i, const uint8_t* r, const float* c) {
        while (i >= end) end = ++b + 1 < bags ? offsets[b + 1] : n;
        t.template read<true>(r, c, weights ? weights[i] : 1.0f, out + b * d);
    });
    for (int64_t k = 0; mean && bad < 0 && k < bags; ++k) {
        const int64_t len = (k + 1 < bags ? offsets[k + 1] : n) - offsets[k];
        for (int64_t j = 0; len > 1 && j < d; ++j) out[k * d + j] /= (float)len;
    }
    return bad;
}

template <int Bits, int Dim>
int64_t run(const Call& a) {
    const int64_t sb_at = Bits == 8 ? a.dim : (a.dim + 1) / 2;
    const Table<Bits, Dim> t{a.codes, a.row_bytes, a.dim, a.cache, a.marker_byte, a.slot_at, a.slot_mask, sb_at};
    if (a.id_bytes == 4)
        return lookup(t, a.rows, a.n, static_cast<const int32_t*>(a.ids), a.bags, a.offsets, a.weights, a.mean, a.out);
    return lookup(t, a.rows, a.n, static_cast<const int64_t*>(a.ids), a.bags, a.offsets, a.weights, a.mean, a.out);
}

template <int Bits>
int64_t run_bits(const Call& a) {
    switch (a.dim) {
        case 8: return run<Bits, 8>(a);
        case 16: return run<Bits, 16>(a);
        case 32: return run<Bits, 32>(a);
        case 64: return run<Bits, 64>(a);
        case 128: return run<Bits, 128>(a);
        default: return run<Bits, 0>(a);
    }
}

int64_t run_any(const Call& a) { return a.bits == 8 ? run_bits<8>(a) : run_bits<4>(a); }

#endif  // MPCACHE_KERNEL
