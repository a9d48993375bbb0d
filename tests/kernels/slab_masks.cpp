// How the tensor-core kernels cut a tile's box into slabs and mask them (kernels/fused_tc.cuh),
// against their definitions, over random boxes, slabs and ranges, for 64- and 32-column slabs:
//   - the cut (na_cut_box): its slabs take COLUMNS columns, no other shape of power-of-two
//     sides gives fewer slabs, and of those that give as few it takes the one its rule prefers
//     (which depends on the kernel size, NA_K0..2); walked by na_first_slab and na_next_slab and
//     numbered by na_column, the slabs' existing columns cover every column of the box exactly
//     once, and the additional tokens' slabs follow;
//   - the masks (na_slab_mask), column by column: bit na_seen_bit(kb, r, e) of lane t's mask is
//     set when column 8 kb + 2 t + e of the slab exists and row r's range holds its coordinates
//     (found by plain division), or, for a slab of additional tokens, when row r is valid;
//   - the shortcut (na_slab_seen): a slab it finds inside both rows' ranges is seen whole.
// A kernel of 1 along an axis (NA_K0 = 1: planar problems) makes it a unit axis, whose boxes and
// ranges are [0, 1), as the kernels take them (na_unit_axis).
// Built with kernels/host.h by test_cuda_host.py; prints the cases checked and exits nonzero on
// any difference.
#include "host.h"
#include "fused_tc.cuh"

#include <algorithm>
#include <cstdio>
#include <random>
#include <vector>

namespace {

std::mt19937 rng(2024);

int below(int n) { return (int)(rng() % (unsigned)n); }

int sides(int n, int shift) { return (n + (1 << shift) - 1) >> shift; }

// Slab n's column `n` by plain division: its coordinates from the box's start, and whether it
// lies in the box.
bool box_column(const NaTcTile& tl, const NaSlab& s, int n, int x[3]) {
    const int side1 = 1 << tl.slab_shift[1], side2 = 1 << tl.slab_shift[2];
    const int within[3] = {n / (side1 * side2), n / side2 % side1, n % side2};
    bool inside = true;
    for (int a = 0; a < 3; ++a) {
        x[a] = s.origin[a] + within[a];
        inside = inside && x[a] < tl.box_len[a];
    }
    return inside;
}

bool column_seen(const NaTcTile& tl, const NaSlab& s, const NaTcRow& row, int n) {
    if (!row.valid) {
        return false;
    }
    if (s.extra) {
        return n < s.count();
    }
    int x[3];
    if (!box_column(tl, s, n, x)) {
        return false;
    }
    for (int a = 0; a < 3; ++a) {
        const int c = x[a] + tl.box_first[a];
        if (c < row.start[a] || c >= row.end[a]) {
            return false;
        }
    }
    return true;
}

template <int BLOCKS>
int mask_differences(const NaTcTile& tl, const NaSlab& s, const NaTcRow rows[2]) {
    int wrong = 0;
    for (int t = 0; t < 4; ++t) {
        const unsigned mask = na_slab_mask<BLOCKS>(tl, s, rows, t);
        for (int kb = 0; kb < BLOCKS; ++kb) {
            for (int r = 0; r < 2; ++r) {
                for (int e = 0; e < 2; ++e) {
                    wrong += na_seen(mask, kb, r, e) !=
                             column_seen(tl, s, rows[r], 8 * kb + 2 * t + e);
                }
            }
        }
    }
    return wrong;
}

// Whether the shortcut's test (na_slab_within) holds only where the mask is all ones.
template <int BLOCKS>
int shortcut_differences(const NaTcTile& tl, const NaSlab& s, const NaTcRow rows[2],
                         int& shortcuts) {
    if (!na_slab_within(tl, s, rows)) {
        return 0;
    }
    ++shortcuts;
    int wrong = 0;
    for (int t = 0; t < 4; ++t) {
        wrong += na_slab_mask<BLOCKS>(tl, s, rows, t) != na_all_seen<BLOCKS>();
    }
    return wrong;
}

// Whether a shape of slabs fits inside a window: no side longer than the kernel along its axis.
bool fits_a_window(const int shift[3]) {
    const int kernel[3] = {NA_K0, NA_K1, NA_K2};
    for (int a = 0; a < 3; ++a) {
        if ((1 << shift[a]) > kernel[a]) {
            return false;
        }
    }
    return true;
}

int longest_side(const int shift[3]) {
    return std::max({shift[0], shift[1], shift[2]});
}

// The cut's slab count against every shape of power-of-two sides, its shape against the others
// of as few slabs that it considers (no side along the first two axes longer than the box
// rounded up): one that fits a window if any does, the most even of those, or else the longest
// along the last axis, then the middle one; and whether its slabs' existing columns cover the
// box once each (boxes of up to `most` columns).
template <int COLUMNS>
int cut_differences(const NaTcTile& tl, int most, int& fitting) {
    constexpr int total = na_log2(COLUMNS);
    int wrong = tl.slab_shift[0] + tl.slab_shift[1] + tl.slab_shift[2] != total;
    // (Counts past NA_RANKED_SLABS are as many to the cut.)
    auto count_of = [&](const int shift[3]) {
        const long long count = (long long)sides(tl.box_len[0], shift[0]) *
                                sides(tl.box_len[1], shift[1]) * sides(tl.box_len[2], shift[2]);
        return std::min(count, (long long)NA_RANKED_SLABS);
    };
    long long fewest = -1;
    for (int s0 = 0; s0 <= total; ++s0) {
        for (int s1 = 0; s0 + s1 <= total; ++s1) {
            const int shift[3] = {s0, s1, total - s0 - s1};
            fewest = fewest < 0 || count_of(shift) < fewest ? count_of(shift) : fewest;
        }
    }
    // The best of the considered shapes of the fewest slabs, by the rule above.
    bool any_fits = false;
    int evenest = total, best[3] = {-1, -1, -1};
    for (int s0 = 0; (1 << s0) < 2 * tl.box_len[0] && s0 <= total; ++s0) {
        for (int s1 = 0; (1 << s1) < 2 * tl.box_len[1] && s0 + s1 <= total; ++s1) {
            const int shift[3] = {s0, s1, total - s0 - s1};
            if (count_of(shift) != fewest) {
                continue;
            }
            if (fits_a_window(shift)) {
                any_fits = true;
                evenest = std::min(evenest, longest_side(shift));
            } else if (shift[2] > best[2] || (shift[2] == best[2] && shift[1] > best[1])) {
                best[0] = shift[0], best[1] = shift[1], best[2] = shift[2];
            }
        }
    }
    fitting += any_fits;
    wrong += fits_a_window(tl.slab_shift) != any_fits;
    if (any_fits) {
        wrong += longest_side(tl.slab_shift) != evenest;
    } else {
        for (int a = 0; a < 3; ++a) {
            wrong += tl.slab_shift[a] != best[a];
        }
    }
    const long long slabs = na_slab_count<COLUMNS>(tl, true, 0);
    wrong += std::min(slabs, (long long)NA_RANKED_SLABS) != fewest;
    const long long volume = (long long)tl.box_len[0] * tl.box_len[1] * tl.box_len[2];
    if (volume > most) {
        return wrong;
    }
    std::vector<int> hits(volume, 0);
    NaSlab s = na_first_slab<COLUMNS>(tl, true, 0);
    for (long long n = 0; n < slabs; ++n, s = na_next_slab<COLUMNS>(tl, s, 70)) {
        wrong += s.extra;
        for (int column = 0; column < COLUMNS; ++column) {
            int c[3], x[3];
            const bool exists = na_column(tl, s, column, c);
            wrong += exists != box_column(tl, s, column, x);
            if (exists) {
                for (int a = 0; a < 3; ++a) {
                    wrong += c[a] != x[a] + tl.box_first[a];
                }
                ++hits[(x[0] * tl.box_len[1] + x[1]) * tl.box_len[2] + x[2]];
            }
        }
    }
    for (int h : hits) {
        wrong += h != 1;
    }
    // Then the additional tokens' (70 of them).
    for (int first = 0; first < 70; first += COLUMNS, s = na_next_slab<COLUMNS>(tl, s, 70)) {
        wrong += !s.extra || s.first() != first || s.count() != min(COLUMNS, 70 - first);
    }
    return wrong;
}

NaTcRow random_row(const NaTcTile& tl) {
    NaTcRow row{};
    row.valid = below(6) != 0;
    const bool wide = below(3) == 0;  // most of the box: slabs inside it are likelier
    for (int a = 0; a < 3; ++a) {
        int x = below(tl.box_len[a]), y = below(tl.box_len[a]);
        if (wide) {
            x = below(1 + tl.box_len[a] / 8);
            y = tl.box_len[a] - 1 - below(1 + tl.box_len[a] / 8);
        }
        row.start[a] = tl.box_first[a] + (x < y ? x : y);
        row.end[a] = tl.box_first[a] + (x < y ? y : x) + 1;
        if (na_unit_axis(a)) {
            row.start[a] = 0;  // a unit axis's window: the whole axis (its box too)
            row.end[a] = 1;
        }
        if (below(8) == 0) {
            row.end[a] = 0x7fffffff;  // past the box
        }
    }
    return row;
}

// A slab of the cut box, or of the additional tokens.
template <int COLUMNS>
NaSlab random_slab(const NaTcTile& tl, int extras) {
    const long long count = na_slab_count<COLUMNS>(tl, true, extras);
    NaSlab s = na_first_slab<COLUMNS>(tl, true, extras);
    for (long long n = below((int)count); n > 0; --n) {
        s = na_next_slab<COLUMNS>(tl, s, extras);
    }
    return s;
}

// Boxes to cut, and their cuts into 64 and 32 columns.
struct Cuts {
    std::vector<NaTcTile> wide, narrow;
    int disagreements = 0;  // cuts on which a warp's lanes differ
};

// The cuts of `Cuts::wide`'s boxes (na_cut_box is a warp's: it runs on one).
void cut_on_a_warp(const void* p) {
    Cuts& cuts = **static_cast<Cuts* const*>(p);
    for (size_t i = 0; i < cuts.wide.size(); ++i) {
        NaTcTile wide = cuts.wide[i], narrow = wide;
        na_cut_box<64>(wide);
        na_cut_box<32>(narrow);
        bool same = true;
        for (int a = 0; a < 3; ++a) {
            same = same && __shfl_sync(0xffffffffu, wide.slab_shift[a], 0) == wide.slab_shift[a] &&
                   __shfl_sync(0xffffffffu, narrow.slab_shift[a], 0) == narrow.slab_shift[a];
        }
        const bool all_same = __all_sync(0xffffffffu, same) != 0;
        if (threadIdx.x == 0) {
            cuts.wide[i] = wide;
            cuts.narrow[i] = narrow;
            cuts.disagreements += !all_same;
        }
    }
}

Cuts cut(std::vector<NaTcTile> boxes) {
    Cuts cuts;
    cuts.wide = boxes;
    cuts.narrow = boxes;
    Cuts* const p = &cuts;
    if (na_host::launch(cut_on_a_warp, &p, 1, NA_WARP, 1, 0) != 0) {
        cuts.disagreements = -1;
    }
    return cuts;
}

}  // namespace

int main() {
    constexpr int kCases = 200000, kHuge = 2000;
    // Boxes of sides past a slab's too, some 2-D, and then some of more slabs than a rank counts.
    std::vector<NaTcTile> boxes(kCases + kHuge);
    for (int i = 0; i < kCases + kHuge; ++i) {
        for (int a = 0; a < 3; ++a) {
            boxes[i].box_first[a] = below(6);
            boxes[i].box_len[a] = 1 + (i < kCases ? below(below(4) == 0 ? 100 : 20) : below(30000));
        }
        if (below(3) == 0) {
            boxes[i].box_len[0] = 1;
        }
        for (int a = 0; a < 3; ++a) {
            if (na_unit_axis(a)) {  // (a kernel of 1: an axis that pads the rank)
                boxes[i].box_first[a] = 0;
                boxes[i].box_len[a] = 1;
            }
        }
    }
    const Cuts cuts = cut(boxes);
    int wrong = cuts.disagreements != 0, cases = 0, shortcuts = 0, fitting = 0;
    for (; cases < kCases + kHuge; ++cases) {
        const NaTcTile& wide = cuts.wide[cases];
        const NaTcTile& narrow = cuts.narrow[cases];
        const bool cover = cases % 50 == 0;
        wrong += cut_differences<64>(wide, cover ? 20000 : 0, fitting);
        wrong += cut_differences<32>(narrow, cover ? 20000 : 0, fitting);
        if (cases >= kCases) {
            continue;  // (the huge boxes' slabs are too many to pick one at random)
        }
        const int extras = below(3) * below(40);
        NaTcRow rows[2] = {random_row(wide), random_row(wide)};
        const NaSlab slab = random_slab<64>(wide, extras);
        const NaSlab narrow_slab = random_slab<32>(narrow, extras);
        wrong += mask_differences<8>(wide, slab, rows) +
                 mask_differences<4>(narrow, narrow_slab, rows);
        rows[0].valid = rows[1].valid = true;
        wrong += shortcut_differences<8>(wide, slab, rows, shortcuts) +
                 shortcut_differences<4>(narrow, narrow_slab, rows, shortcuts);
    }
    std::printf(
        "%d slab cases (%d inside the rows' common range; %d cuts of a shape that fits a window), "
        "%d differences\n",
        cases, shortcuts, fitting, wrong);
    // (Enough slabs taken whole that the shortcut is tested: thousands in 2-D and 3-D, about a
    // thousand in 1-D, whose rows share less of a slab.)
    return wrong == 0 && shortcuts >= 500 ? 0 : 1;
}
