// The slab masks of the tensor-core kernels (na_slab_mask, kernels/fused_tc.cuh) against their
// definition, column by column: bit na_seen_bit(kb, r, e) of lane t's mask is set when column
// 8 kb + 2 t + e of the slab exists and row r's range holds its box coordinates (found by plain
// division), or, for a slab of additional tokens, when row r is valid. Random boxes, slabs and
// ranges (ranges may reach past the box, as the additional tokens' do), for 64- and 32-column
// slabs; and the box dividers (na_quotient) against division. Built with kernels/host.h by
// test_cuda_host.py; prints the cases checked and exits nonzero on any difference.
#include "host.h"
#include "fused_tc.cuh"

#include <cstdio>
#include <random>

namespace {

std::mt19937 rng(2024);

int below(int n) { return (int)(rng() % (unsigned)n); }

bool column_seen(const NaTcTile& tl, const NaSlab& s, const NaTcRow& row, int n) {
    if (!row.valid || n >= s.count) {
        return false;
    }
    if (s.extra) {
        return true;
    }
    const int m = (int)s.first + n;
    const int c[3] = {m / (tl.box_len[1] * tl.box_len[2]) + tl.box_first[0],
                      m / tl.box_len[2] % tl.box_len[1] + tl.box_first[1],
                      m % tl.box_len[2] + tl.box_first[2]};
    for (int a = 0; a < 3; ++a) {
        if (c[a] < row.start[a] || c[a] >= row.end[a]) {
            return false;
        }
    }
    return true;
}

template <int BLOCKS>
int differences(const NaTcTile& tl, const NaSlab& s, const NaTcRow rows[2]) {
    int wrong = 0;
    for (int t = 0; t < 4; ++t) {
        const unsigned mask = na_slab_mask<BLOCKS>(tl, s, rows, t);
        for (int kb = 0; kb < BLOCKS; ++kb) {
            for (int r = 0; r < 2; ++r) {
                for (int e = 0; e < 2; ++e) {
                    wrong += na_seen(mask, kb, r, e) != column_seen(tl, s, rows[r], 8 * kb + 2 * t + e);
                }
            }
        }
    }
    return wrong;
}

NaTcRow random_row(const NaTcTile& tl) {
    NaTcRow row{};
    row.valid = below(6) != 0;
    for (int a = 0; a < 3; ++a) {
        const int x = below(tl.box_len[a]), y = below(tl.box_len[a]);
        row.start[a] = tl.box_first[a] + (x < y ? x : y);
        row.end[a] = tl.box_first[a] + (x < y ? y : x) + 1;
        if (below(8) == 0) {
            row.end[a] = 0x7fffffff;  // past the box
        }
    }
    return row;
}

}  // namespace

int main() {
    int wrong = 0, cases = 0;
    for (; cases < 200000; ++cases) {
        NaTcTile tl{};
        for (int a = 0; a < 3; ++a) {
            tl.box_first[a] = below(6);
            tl.box_len[a] = 1 + below(below(4) == 0 ? 100 : 20);  // lines longer than a slab too
        }
        if (below(3) == 0) {
            tl.box_len[0] = 1;  // a 2-D box
        }
        na_set_box_dividers(tl);
        const long long volume = (long long)tl.box_len[0] * tl.box_len[1] * tl.box_len[2];
        const int extras = below(3) * below(40);
        const NaTcRow rows[2] = {random_row(tl), random_row(tl)};
        const NaSlab wide = na_slab<64>(below((int)na_slab_count<64>(volume, extras)), volume, extras);
        const NaSlab narrow =
            na_slab<32>(below((int)na_slab_count<32>(volume, extras)), volume, extras);
        wrong += differences<8>(tl, wide, rows) + differences<4>(tl, narrow, rows);
    }
    int quotients = 0;
    for (int d = 1; d < 3000; ++d) {
        const NaFastDiv div = na_fast_div(d);
        for (int i = 0; i < 200; ++i, ++quotients) {
            const int n = i < 100 ? i * d + below(d) : (int)(rng() >> 1);
            wrong += na_quotient(n, div) != n / d;
        }
    }
    std::printf("%d slab cases, %d quotients, %d differences\n", cases, quotients, wrong);
    return wrong == 0 ? 0 : 1;
}
