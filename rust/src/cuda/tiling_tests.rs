use super::*;

/// `n / d` and `n % d` as `na_divide` forms them (kernels/common.cuh).
fn divide(d: &Divider, n: u32) -> (u32, u32) {
    let high = ((u64::from(n << 1) * u64::from(d.magic)) >> 32) as u32;
    let quot = high >> d.shift;
    (quot, n.wrapping_sub(quot.wrapping_mul(d.divisor)))
}

/// Numbers below 2^31 that a divisor `d` is likeliest to get wrong: around its multiples, near
/// the top of the range, and a spread in between.
fn hard_numerators(d: u32) -> Vec<u32> {
    const TOP: u32 = i32::MAX as u32;
    let mut ns: Vec<u32> = (0..64).chain(TOP - 64..=TOP).collect();
    let last = TOP / d;
    for k in [1, 2, 3, 7, 1000, last / 2, last.saturating_sub(1), last] {
        let at = u64::from(k) * u64::from(d);
        for n in [at.saturating_sub(1), at, at + 1] {
            if n <= u64::from(TOP) {
                ns.push(n as u32);
            }
        }
    }
    // A deterministic spread (an odd multiplier walks every residue).
    ns.extend((0..2000u32).map(|i| i.wrapping_mul(0x9e37_79b1) & TOP));
    ns
}

#[test]
fn dividers_divide_every_number_below_2_31_exactly() {
    let mut divisors: Vec<u32> = (1..=4096).collect();
    for k in 12..=31 {
        let p = 1u32 << k;
        divisors.extend([p - 1, p, p + 1, p / 3 * 2 + 1]);
    }
    divisors.extend((0..3000u32).map(|i| (i.wrapping_mul(0x85eb_ca6b) >> 1).max(1)));
    for d in divisors.into_iter().filter(|&d| d <= 1 << 31) {
        let divider = Divider::new(d as usize);
        assert_eq!(divider.divisor, d);
        for n in hard_numerators(d) {
            assert_eq!(
                divide(&divider, n),
                (n / d, n % d),
                "{n} / {d}: {divider:?}"
            );
        }
    }
}

#[test]
fn small_divisors_divide_every_number_up_to_a_million() {
    for d in 1..=64u32 {
        let divider = Divider::new(d as usize);
        for n in 0..1 << 20 {
            assert_eq!(divide(&divider, n), (n / d, n % d), "{n} / {d}");
        }
    }
}

#[test]
fn a_magic_number_one_short_divides_wrongly() {
    // The rounding up matters: one less and some quotient drops, for divisors whose magic
    // number is not exact.
    for d in [3u32, 7, 56, 1000, 12345] {
        let short = Divider {
            magic: Divider::new(d as usize).magic - 1,
            ..Divider::new(d as usize)
        };
        let wrong = hard_numerators(d)
            .into_iter()
            .any(|n| divide(&short, n) != (n / d, n % d));
        assert!(wrong, "{d}");
    }
}

#[test]
fn the_zero_divider_stands_for_an_empty_count() {
    assert_eq!(Divider::new(0), Divider::default());
    assert_eq!(TcTiling::of_rows(0, 4).tasks(3), 0);
    let result = std::panic::catch_unwind(|| Divider::new((1 << 31) + 1));
    assert!(result.is_err(), "a divisor over 2^31");
}

fn axis(length: usize, dilation: usize) -> Axis {
    Axis {
        length,
        kernel: 3,
        stride: 1,
        dilation,
        causal: false,
    }
}

#[test]
fn an_axis_cut_counts_the_tiles_of_its_long_and_short_groups() {
    for (length, dilation) in [(1, 1), (3, 5), (7, 2), (19, 3), (20, 2), (56, 4), (1000, 7)] {
        let a = axis(length, dilation);
        for tile in [1, 2, 8, 64] {
            let cut = AxisTiling::new(&a, tile);
            let groups = dilation.min(length);
            assert_eq!(cut.quot as usize * dilation + cut.rem as usize, length);
            assert_eq!(1 << cut.tile_shift, tile);
            // The first group is long where any is; the last group counted is short where any
            // is.
            let tiles_of = |group: usize| a.group_len(group).div_ceil(tile) as u32;
            if cut.rem > 0 {
                assert_eq!(cut.long_tiles.divisor, tiles_of(0));
            }
            if groups > cut.rem as usize {
                assert_eq!(cut.short_tiles.divisor, tiles_of(groups - 1));
            }
            let counted = cut.rem as usize * cut.long_tiles.divisor as usize
                + (groups - cut.rem as usize) * cut.short_tiles.divisor as usize;
            assert_eq!(
                counted,
                tiles_along(&a, tile),
                "{length} / {dilation}, tile {tile}"
            );
        }
    }
}

#[test]
fn a_tiling_numbers_the_tasks_of_every_batch_head_and_tile() {
    let axes = [Axis::UNIT, axis(20, 2), axis(19, 3)];
    let tiling = TcTiling::new(&axes, 64, 6);
    assert_eq!((tiling.tile(), tiling.tiles()), ([1, 8, 8], [1, 4, 3]));
    assert_eq!((tiling.heads.divisor, tiling.per_head.divisor), (6, 12));
    assert_eq!(tiling.tasks(5), 5 * 6 * 12);
    // Additional tokens: tiles of 64 along the last axis.
    let extras = TcTiling::of_rows(130, 2);
    assert_eq!((extras.tiles(), extras.tasks(3)), ([1, 1, 3], 3 * 2 * 3));
}

#[test]
fn task_numbers_must_fit_31_bits() {
    let axes = |length| [Axis::UNIT, Axis::UNIT, axis(length, 1)];
    let limit = i32::MAX as usize;
    // 64 tokens: one tile per (batch, head).
    assert!(tasks_fit_31_bits(limit, 1, &axes(64), 0));
    assert!(!tasks_fit_31_bits(limit, 2, &axes(64), 0));
    assert!(!tasks_fit_31_bits(limit, 1, &axes(65), 0));
    // 2^20 batches x 2^3 heads x 2^7 tiles of 64 tokens is 2^30; 2^8 tiles of additional
    // tokens make it 2^31.
    assert!(tasks_fit_31_bits(1 << 20, 1 << 3, &axes(1 << 13), 1 << 13));
    assert!(!tasks_fit_31_bits(1 << 20, 1 << 3, &axes(1 << 13), 1 << 14));
    assert!(!tasks_fit_31_bits(usize::MAX, 2, &axes(1), 0));
}
