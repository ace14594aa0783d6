// HotSketch locate and insert (with its maintenance) for the CPU, one pass per batch; mpcache's
// count-min sketch update and estimate.
//
// The same batch rule, float sums and tie-breaks as the vectorised PyTorch path in hotsketch.py, which
// stays the reference (tests/embeddings/test_hotsketch.py compares the two states after every batch).
// Plain C ABI on raw buffers: built with g++ alone (no PyTorch headers, no ninja) and called through
// ctypes by native.py, which registers the calls as torch.library ops.
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#include <unordered_map>
#include <vector>

namespace {

const uint64_t MIX1 = 0x9E3779B97F4A7C15ULL;
const uint64_t MIX2 = 0xBF58476D1CE4E5B9ULL;
const float INF = std::numeric_limits<float>::infinity();

// hotsketch.bucket_of: int64 products wrap, shifts are arithmetic, as torch's int64 ops.
inline int64_t bucket_of(int64_t id, int64_t w, int64_t seed_add) {
    int64_t z = (int64_t)((uint64_t)id + (uint64_t)seed_add);
    z = (int64_t)((uint64_t)z * MIX1);
    z ^= z >> 29;
    z = (int64_t)((uint64_t)z * MIX2);
    z >>= 33;
    z += (int64_t)1 << 30;
    return (z * w) >> 31;
}

struct Params {
    int64_t w, c, rows, seed_add;
    double threshold_d;  // as given; scores compare with it in float32, as torch compares a float32 tensor
    float threshold, decay;
    double decay_mass;
    int pressure_decay, preempt;
};

template <typename K>
struct Sketch {
    K* keys;
    float* scores;
    int32_t* hot;
    uint8_t* used;
    double* mass;
    const Params& p;

    // flat slot holding id in bucket b, or -1
    inline int64_t find(int64_t id, int64_t b) const {
        const int64_t base = b * p.c;
        for (int64_t j = 0; j < p.c; ++j)
            if ((int64_t)keys[base + j] == id) return base + j;
        return -1;
    }
};

// Output lists of what the hot set did (int64 ids and rows).
struct Changes {
    int64_t *prom_ids, *prom_rows, *dem_ids, *dem_rows;
    int64_t n_prom = 0, n_dem = 0;
};

// Waiting entries (non-hot, score >= T) left after the previous call: given when nothing else changed
// the sketch since, so that only they and the slots this batch touched need looking at (no scan).
struct Waiting {
    const int64_t* before = nullptr;  // ascending
    int64_t n_before = -1;  // -1: unknown, scan
    std::vector<int64_t> touched;
    int64_t* after = nullptr;  // out: the waiting entries left, ascending
    int64_t n_after = 0;
};

template <typename K>
void maintain(Sketch<K>& s, Changes& out, Waiting& waiting) {
    const Params& p = s.p;
    const int64_t total = p.w * p.c;
    std::vector<int64_t> wait, hot;  // waiting and hot slots
    bool hot_listed = false;
    auto scan = [&]() {
        wait.clear();
        hot.clear();
        hot.reserve(p.rows);
        for (int64_t f = 0; f < total; ++f) {
            if (s.hot[f] >= 0) hot.push_back(f);
            else if (s.scores[f] >= p.threshold) wait.push_back(f);
        }
        hot_listed = true;
    };
    auto list_hot = [&]() {
        hot.clear();
        for (int64_t f = 0; f < total; ++f)
            if (s.hot[f] >= 0) hot.push_back(f);
        hot_listed = true;
    };
    int64_t used = 0;
    if (waiting.n_before >= 0) {
        auto consider = [&](int64_t f) {
            if (s.hot[f] < 0 && s.scores[f] >= p.threshold) wait.push_back(f);
        };
        for (int64_t i = 0; i < waiting.n_before; ++i) consider(waiting.before[i]);
        for (int64_t f : waiting.touched) consider(f);
        std::sort(wait.begin(), wait.end());
        wait.erase(std::unique(wait.begin(), wait.end()), wait.end());
        for (int64_t r = 0; r < p.rows; ++r) used += s.used[r] != 0;
    } else {
        scan();
        used = (int64_t)hot.size();  // every used row belongs to one hot slot
    }
    bool decay = *s.mass > p.decay_mass * (double)p.w * p.threshold_d;
    if (!decay && p.pressure_decay && p.decay < 1) decay = (int64_t)wait.size() > p.rows - used;
    if (decay) {
        if (!hot_listed) list_hot();
        for (int64_t f = 0; f < total; ++f) s.scores[f] *= p.decay;
        *s.mass = 0;
        for (int64_t f : hot) {
            if (s.scores[f] < p.threshold) {
                out.dem_ids[out.n_dem] = (int64_t)s.keys[f];
                out.dem_rows[out.n_dem++] = s.hot[f];
                s.used[s.hot[f]] = 0;
                s.hot[f] = -1;
            }
        }
        scan();
        used = (int64_t)hot.size();
    }
    std::vector<int64_t> left;  // waiting entries after promotion and preemption
    if (!wait.empty()) {
        // highest score first, ties by slot position (wait is ascending)
        std::stable_sort(wait.begin(), wait.end(), [&](int64_t a, int64_t b) { return s.scores[a] > s.scores[b]; });
        size_t k = 0;
        for (int64_t r = 0; r < p.rows && k < wait.size() && used < p.rows; ++r) {  // free rows, smallest first
            if (s.used[r]) continue;
            const int64_t f = wait[k++];
            s.hot[f] = (int32_t)r;
            s.used[r] = 1;
            ++used;
            if (hot_listed) hot.push_back(f);  // preemption ranks hot entries by (score, slot): order is free
            out.prom_ids[out.n_prom] = (int64_t)s.keys[f];
            out.prom_rows[out.n_prom++] = r;
        }
        size_t swapped = 0;
        if (p.preempt && k < wait.size()) {
            // the i-th highest waiting entry against the i-th lowest-scored hot entry
            if (!hot_listed) list_hot();
            const size_t n = std::min(wait.size() - k, hot.size());
            auto lower = [&](int64_t a, int64_t b) {
                const float x = s.scores[a] + 0.0f, y = s.scores[b] + 0.0f;
                return x < y || (x == y && a < b);
            };
            std::partial_sort(hot.begin(), hot.begin() + n, hot.end(), lower);
            for (; swapped < n; ++swapped) {
                const int64_t win = wait[k + swapped], lose = hot[swapped];
                if (!(s.scores[win] * p.decay > s.scores[lose])) break;  // the swaps are a prefix
                const int32_t row = s.hot[lose];
                s.hot[lose] = -1;
                s.hot[win] = row;
                out.prom_ids[out.n_prom] = (int64_t)s.keys[win];
                out.prom_rows[out.n_prom++] = row;
                out.dem_ids[out.n_dem] = (int64_t)s.keys[lose];
                out.dem_rows[out.n_dem++] = row;
                if (s.scores[lose] >= p.threshold) left.push_back(lose);
            }
        }
        left.insert(left.end(), wait.begin() + k + swapped, wait.end());
    }
    if (waiting.after) {
        std::sort(left.begin(), left.end());
        std::copy(left.begin(), left.end(), waiting.after);
        waiting.n_after = (int64_t)left.size();
    }
}

struct Newcomer {
    int64_t bucket, id;
    float score;
};

template <typename K>
void insert(Sketch<K>& s, int64_t n, const int64_t* ids, const float* add, double mass_add,
            const int64_t* given_flat, const uint8_t* given_found, Changes& out, Waiting& waiting) {
    const Params& p = s.p;
    if (n > 0) {
        std::vector<int64_t> flat(n);  // slot of a found id; -1 - bucket for a newcomer
        for (int64_t i = 0; i < n; ++i) {
            if (given_flat) {
                flat[i] = given_found[i] ? given_flat[i] : -1 - given_flat[i] / p.c;
            } else {
                const int64_t b = bucket_of(ids[i], p.w, p.seed_add);
                const int64_t f = s.find(ids[i], b);
                flat[i] = f >= 0 ? f : -1 - b;
            }
        }
        // 1. scores of ids already in the sketch, in batch order
        for (int64_t i = 0; i < n; ++i) {
            if (i + 16 < n && flat[i + 16] >= 0) __builtin_prefetch(s.scores + flat[i + 16]);
            if (flat[i] >= 0) s.scores[flat[i]] += add ? add[i] : 1.0f;
        }
        if (waiting.n_before >= 0) {
            waiting.touched.reserve(n);
            for (int64_t i = 0; i < n; ++i)
                if (flat[i] >= 0) waiting.touched.push_back(flat[i]);
        }
        // 2. newcomers aggregated per id in an open-addressing table (sums in batch order)
        size_t size = 16;
        while (size < 2 * (size_t)n) size <<= 1;
        std::vector<int32_t> table(size, -1);  // index into comers
        std::vector<Newcomer> comers;
        for (int64_t i = 0; i < n; ++i) {
            if (flat[i] >= 0) continue;
            const int64_t id = ids[i];
            size_t h = (size_t)(((uint64_t)id * MIX1) >> 20) & (size - 1);
            while (table[h] >= 0 && comers[table[h]].id != id) h = (h + 1) & (size - 1);
            if (table[h] < 0) {
                table[h] = (int32_t)comers.size();
                comers.push_back({-1 - flat[i], id, 0.0f});
            }
            comers[table[h]].score += add ? add[i] : 1.0f;
        }
        // 3. per bucket (grouped by a radix sort on the bucket): newcomers by score (desc; ties: smaller
        // id) against the evictable slots
        const size_t m = comers.size();
        std::vector<int32_t> grouped(m), spare(m);
        for (size_t j = 0; j < m; ++j) grouped[j] = (int32_t)j;
        for (int64_t shift = 0; (p.w - 1) >> shift; shift += 8) {  // stable LSD passes, one per byte
            size_t count[257] = {0};
            for (int32_t j : grouped) ++count[((comers[j].bucket >> shift) & 255) + 1];
            for (int d = 0; d < 256; ++d) count[d + 1] += count[d];
            for (int32_t j : grouped) spare[count[(comers[j].bucket >> shift) & 255]++] = j;
            grouped.swap(spare);
        }
        std::vector<size_t> starts;  // first position of each bucket's run, then m
        for (size_t j = 0; j < m; ++j)
            if (j == 0 || comers[grouped[j]].bucket != comers[grouped[j - 1]].bucket) starts.push_back(j);
        starts.push_back(m);
        auto before = [&](int32_t a, int32_t b) {
            const float x = std::max(comers[a].score, 0.0f), y = std::max(comers[b].score, 0.0f);
            return x > y || (x == y && comers[a].id < comers[b].id);
        };
        std::vector<float> key(p.c);
        std::vector<int64_t> slot_order(p.c);
        const size_t ahead = 8;  // buckets are random: fetch the slots of later buckets
        for (size_t g = 0; g + 1 < starts.size(); ++g) {
            if (g + ahead + 1 < starts.size()) {
                const int64_t nb = comers[grouped[starts[g + ahead]]].bucket * p.c;
                __builtin_prefetch(s.keys + nb);
                __builtin_prefetch(s.scores + nb);
                __builtin_prefetch(s.hot + nb);
            }
            const size_t lo = starts[g], hi = starts[g + 1];
            const int64_t b = comers[grouped[lo]].bucket;
            if (hi - lo > 1) std::sort(grouped.begin() + lo, grouped.begin() + hi, before);
            const int64_t base = b * p.c;
            float min_hot = INF;
            for (int64_t j = 0; j < p.c; ++j)
                if (s.hot[base + j] >= 0) min_hot = std::min(min_hot, s.scores[base + j]);
            for (int64_t j = 0; j < p.c; ++j) {
                const bool empty = s.keys[base + j] < 0;
                const bool evictable = empty || (s.hot[base + j] < 0 && s.scores[base + j] <= min_hot);
                key[j] = evictable ? (empty ? -INF : s.scores[base + j]) : INF;
                slot_order[j] = j;
            }
            for (int64_t j = 1; j < p.c; ++j)  // stable insertion sort of the c slots by key
                for (int64_t i = j; i > 0 && key[slot_order[i - 1]] > key[slot_order[i]]; --i)
                    std::swap(slot_order[i - 1], slot_order[i]);
            for (size_t r = 0; r < hi - lo && (int64_t)r < p.c; ++r) {
                const Newcomer& nc = comers[grouped[lo + r]];
                const int64_t slot = slot_order[r];
                const float slot_score = key[slot];
                if (!(slot_score < INF) || !(r == 0 || nc.score > slot_score)) continue;
                s.keys[base + slot] = (K)nc.id;
                s.scores[base + slot] = std::max(slot_score, 0.0f) + nc.score;
                if (waiting.n_before >= 0) waiting.touched.push_back(base + slot);
            }
        }
        *s.mass += mass_add;
    }
    maintain(s, out, waiting);
}

template <typename K>
void locate(const Sketch<K>& s, int64_t n, const int64_t* ids, int64_t* bucket, int64_t* flat, uint8_t* found) {
    const int64_t ahead = 16;  // buckets are random: fetch the keys of later ids while comparing
    for (int64_t i = 0; i < n; ++i) bucket[i] = bucket_of(ids[i], s.p.w, s.p.seed_add);
    for (int64_t i = 0; i < n; ++i) {
        if (i + ahead < n) __builtin_prefetch(s.keys + bucket[i + ahead] * s.p.c);
        const int64_t f = s.find(ids[i], bucket[i]);
        found[i] = f >= 0;
        flat[i] = f >= 0 ? f : bucket[i] * s.p.c;
    }
}

}  // namespace

extern "C" {

// key_bytes: 8 (int64 keys) or 4 (int32). flat, found: from hotsketch_locate on this state, or null.
// wait_before (n_wait_before of them): the waiting entries wait_after returned by the previous call if
// nothing else changed the sketch since; n_wait_before = -1 when unknown. counts out: [promoted, demoted, waiting].
void hotsketch_insert(int key_bytes, void* keys, float* scores, int32_t* hot, uint8_t* used, double* mass,
                      int64_t w, int64_t c, int64_t rows, int64_t seed_add, double threshold, double decay,
                      double decay_mass, int pressure_decay, int preempt, int64_t n, const int64_t* ids,
                      const float* add, double mass_add, const int64_t* flat, const uint8_t* found,
                      const int64_t* wait_before, int64_t n_wait_before, int64_t* wait_after,
                      int64_t* prom_ids, int64_t* prom_rows, int64_t* dem_ids, int64_t* dem_rows, int64_t* counts) {
    Params p{w, c, rows, seed_add, threshold, (float)threshold, (float)decay, decay_mass, pressure_decay, preempt};
    Changes out{prom_ids, prom_rows, dem_ids, dem_rows};
    Waiting waiting;
    waiting.before = wait_before;
    waiting.n_before = n_wait_before;
    waiting.after = wait_after;
    if (key_bytes == 8) {
        Sketch<int64_t> s{(int64_t*)keys, scores, hot, used, mass, p};
        insert(s, n, ids, add, mass_add, flat, found, out, waiting);
    } else {
        Sketch<int32_t> s{(int32_t*)keys, scores, hot, used, mass, p};
        insert(s, n, ids, add, mass_add, flat, found, out, waiting);
    }
    counts[0] = out.n_prom;
    counts[1] = out.n_dem;
    counts[2] = waiting.n_after;
}

void hotsketch_locate(int key_bytes, void* keys, int64_t w, int64_t c, int64_t seed_add, int64_t n,
                      const int64_t* ids, int64_t* bucket, int64_t* flat, uint8_t* found) {
    Params p{w, c, 0, seed_add, 0, 0, 0, 0, 0, 0};
    if (key_bytes == 8) {
        Sketch<int64_t> s{(int64_t*)keys, nullptr, nullptr, nullptr, nullptr, p};
        locate(s, n, ids, bucket, flat, found);
    } else {
        Sketch<int32_t> s{(int32_t*)keys, nullptr, nullptr, nullptr, nullptr, p};
        locate(s, n, ids, bucket, flat, found);
    }
}

// HotSketch.query on located ids: hot row (-1 if not hot) and score (0 if absent).
void hotsketch_query(const int32_t* hot, const float* scores, int64_t n, const int64_t* flat, const uint8_t* found,
                     int64_t* rows, float* out_scores) {
    for (int64_t i = 0; i < n; ++i) {
        if (i + 16 < n) {
            __builtin_prefetch(hot + flat[i + 16]);
            __builtin_prefetch(scores + flat[i + 16]);
        }
        rows[i] = found[i] ? hot[flat[i]] : -1;
        out_scores[i] = found[i] ? scores[flat[i]] : 0.0f;
    }
}

}  // extern "C"

namespace {

// mpcache's count-min sketch (depth rows of width int32 counters): rows 2j and 2j+1 take the low 31 and
// the high 32 bits of ops.hash64(id, seed=j) modulo width.
inline int64_t hash64(int64_t x, int64_t seed) {
    uint64_t z = (uint64_t)x + (uint64_t)(seed + 1) * 0x9E3779B97F4A7C15ULL;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    z ^= z >> 31;
    return (int64_t)(z & 0x7FFFFFFFFFFFFFFFULL);
}

inline int64_t cms_column(int64_t h, int64_t r, int64_t width) {
    return ((r % 2 == 0) ? (h & 0x7FFFFFFF) : (h >> 31)) % width;
}

// Columns of ids[lo, hi) in each row, row-major in cols ((hi - lo) per row).
void cms_columns(int64_t depth, int64_t width, int64_t lo, int64_t hi, const int64_t* ids, int64_t* cols) {
    const int64_t m = hi - lo;
    for (int64_t i = lo; i < hi; ++i) {
        int64_t h = 0;
        for (int64_t r = 0; r < depth; ++r) {
            if (r % 2 == 0) h = hash64(ids[i], r / 2);
            cols[r * m + (i - lo)] = r * width + cms_column(h, r, width);
        }
    }
}

// Calls visit(counter, i) for each id i and row, walking the ids in blocks: the columns of a block first,
// then its counters, each fetched ahead.
template <typename Visit>
void cms_walk(int32_t* sketch, int64_t depth, int64_t width, int64_t n, const int64_t* ids, Visit visit) {
    const int64_t block = 4096, ahead = 16;
    std::vector<int64_t> cols(depth * block);
    for (int64_t lo = 0; lo < n; lo += block) {
        const int64_t hi = std::min(n, lo + block), m = hi - lo;
        cms_columns(depth, width, lo, hi, ids, cols.data());
        for (int64_t r = 0; r < depth; ++r) {
            const int64_t* c = cols.data() + r * m;
            for (int64_t i = 0; i < m; ++i) {
                if (i + ahead < m) __builtin_prefetch(sketch + c[i + ahead]);
                visit(sketch[c[i]], r, lo + i);
            }
        }
    }
}

}  // namespace

extern "C" {

void cms_add(int32_t* sketch, int64_t depth, int64_t width, int64_t n, const int64_t* ids, const int64_t* counts) {
    cms_walk(sketch, depth, width, n, ids, [&](int32_t& v, int64_t, int64_t i) { v += (int32_t)counts[i]; });
}

void cms_estimate(int32_t* sketch, int64_t depth, int64_t width, int64_t n, const int64_t* ids, int64_t* out) {
    cms_walk(sketch, depth, width, n, ids, [&](int32_t& v, int64_t r, int64_t i) {
        out[i] = r == 0 ? (int64_t)v : std::min(out[i], (int64_t)v);
    });
}

}  // extern "C"
