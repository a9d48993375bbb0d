use super::*;

fn keys(a: &Axis, i: usize) -> Vec<usize> {
    let w = a.window(i);
    (0..w.count).map(|n| w.first + n * a.dilation).collect()
}

/// Every axis configuration the spec allows with `L <= 32`.
fn all_axes() -> impl Iterator<Item = Axis> {
    (1..=32usize).flat_map(|l| {
        (1..=l).flat_map(move |k| {
            (1..=l / k).flat_map(move |d| {
                (1..=k).flat_map(move |s| [false, true].map(|c| axis(l, k, s, d, c)))
            })
        })
    })
}

#[test]
fn worked_examples_of_the_spec() {
    let cases: &[(Axis, &[&[usize]])] = &[
        (
            axis(7, 3, 1, 1, false),
            &[
                &[0, 1, 2],
                &[0, 1, 2],
                &[1, 2, 3],
                &[2, 3, 4],
                &[3, 4, 5],
                &[4, 5, 6],
                &[4, 5, 6],
            ],
        ),
        (
            axis(7, 4, 1, 1, false),
            &[
                &[0, 1, 2, 3],
                &[0, 1, 2, 3],
                &[0, 1, 2, 3],
                &[1, 2, 3, 4],
                &[2, 3, 4, 5],
                &[3, 4, 5, 6],
                &[3, 4, 5, 6],
            ],
        ),
        (
            axis(8, 4, 2, 1, false),
            &[
                &[0, 1, 2, 3],
                &[0, 1, 2, 3],
                &[1, 2, 3, 4],
                &[1, 2, 3, 4],
                &[3, 4, 5, 6],
                &[3, 4, 5, 6],
                &[4, 5, 6, 7],
                &[4, 5, 6, 7],
            ],
        ),
        (
            axis(8, 4, 4, 1, false),
            &[
                &[0, 1, 2, 3],
                &[0, 1, 2, 3],
                &[0, 1, 2, 3],
                &[0, 1, 2, 3],
                &[4, 5, 6, 7],
                &[4, 5, 6, 7],
                &[4, 5, 6, 7],
                &[4, 5, 6, 7],
            ],
        ),
        (
            axis(7, 3, 1, 1, true),
            &[
                &[0],
                &[0, 1],
                &[0, 1, 2],
                &[1, 2, 3],
                &[2, 3, 4],
                &[3, 4, 5],
                &[4, 5, 6],
            ],
        ),
        (
            axis(8, 3, 2, 1, true),
            &[
                &[0],
                &[0, 1],
                &[1, 2],
                &[1, 2, 3],
                &[3, 4],
                &[3, 4, 5],
                &[5, 6],
                &[5, 6, 7],
            ],
        ),
        (
            axis(10, 3, 1, 3, false),
            &[
                &[0, 3, 6],
                &[1, 4, 7],
                &[2, 5, 8],
                &[0, 3, 6],
                &[1, 4, 7],
                &[2, 5, 8],
                &[3, 6, 9],
                &[1, 4, 7],
                &[2, 5, 8],
                &[3, 6, 9],
            ],
        ),
        (
            axis(10, 3, 1, 3, true),
            &[
                &[0],
                &[1],
                &[2],
                &[0, 3],
                &[1, 4],
                &[2, 5],
                &[0, 3, 6],
                &[1, 4, 7],
                &[2, 5, 8],
                &[3, 6, 9],
            ],
        ),
        (
            axis(9, 2, 2, 2, false),
            &[
                &[0, 2],
                &[1, 3],
                &[0, 2],
                &[1, 3],
                &[4, 6],
                &[5, 7],
                &[4, 6],
                &[5, 7],
                &[6, 8],
            ],
        ),
    ];
    for (a, expected) in cases {
        for (i, want) in expected.iter().enumerate() {
            assert_eq!(keys(a, i), *want, "{a:?} query {i}");
        }
    }
}

#[test]
fn windows_stay_in_range_and_in_the_query_group() {
    for a in all_axes() {
        for i in 0..a.length {
            let w = a.window(i);
            assert!(
                w.count >= 1 && w.count <= a.kernel,
                "{a:?} query {i}: {w:?}"
            );
            assert_eq!(w.first % a.dilation, i % a.dilation, "{a:?} query {i}");
            assert!(
                w.first + (w.count - 1) * a.dilation < a.length,
                "{a:?} query {i}"
            );
        }
    }
}

#[test]
fn non_causal_windows_are_full_and_causal_ones_end_at_the_query() {
    for a in all_axes() {
        for i in 0..a.length {
            let ks = keys(&a, i);
            if a.causal {
                assert_eq!(
                    *ks.last().unwrap(),
                    i,
                    "{a:?} query {i} must see itself last"
                );
            } else {
                assert_eq!(ks.len(), a.kernel, "{a:?} query {i}");
                if a.stride == 1 {
                    assert!(ks.contains(&i), "{a:?} query {i} must see itself");
                }
            }
        }
    }
}

#[test]
fn windows_move_monotonically_within_a_group() {
    for a in all_axes() {
        for i in a.dilation..a.length {
            let (prev, next) = (a.window(i - a.dilation), a.window(i));
            assert!(prev.first <= next.first, "{a:?} query {i}");
            assert!(prev.first + prev.count * a.dilation <= next.first + next.count * a.dilation);
        }
    }
}

#[test]
fn inverse_windows_match_brute_force() {
    for a in all_axes() {
        for (j, run) in a.inverse_windows().into_iter().enumerate() {
            let seen_by: Vec<usize> = (0..a.length)
                .filter(|&i| keys(&a, i).contains(&j))
                .collect();
            let listed: Vec<usize> = (0..run.count).map(|n| run.first + n * a.dilation).collect();
            assert_eq!(listed, seen_by, "{a:?} key {j}");
        }
    }
}

#[test]
fn full_kernel_is_self_attention_and_stride_kernel_is_blocked() {
    for l in 1..=32 {
        for i in 0..l {
            assert_eq!(
                keys(&axis(l, l, 1, 1, false), i),
                (0..l).collect::<Vec<_>>()
            );
        }
        for k in (1..=l).filter(|k| l % k == 0) {
            for i in 0..l {
                let block = (i / k) * k;
                assert_eq!(
                    keys(&axis(l, k, k, 1, false), i),
                    (block..block + k).collect::<Vec<_>>()
                );
            }
        }
    }
}

#[test]
fn bias_index_covers_the_window_offsets() {
    for a in all_axes().filter(|a| a.stride == 1) {
        for i in 0..a.length {
            for j in keys(&a, i) {
                let idx = a.bias_index(i, j);
                assert!(idx < 2 * a.kernel - 1, "{a:?} {i}->{j}");
                assert_eq!(
                    idx as isize - (a.kernel as isize - 1),
                    (j as isize - i as isize) / a.dilation as isize
                );
            }
        }
    }
}

#[test]
fn unit_axis_is_a_single_self_window() {
    assert_eq!(Axis::UNIT.window(0), Span { first: 0, count: 1 });
    assert_eq!(
        Axis::UNIT.inverse_windows(),
        vec![Span { first: 0, count: 1 }]
    );
}
