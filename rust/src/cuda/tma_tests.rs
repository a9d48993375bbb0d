use super::*;
use crate::cuda::fused_launch::tests::{self_attention, self_attention_tensor};
use crate::dlpack::{DType, Device, TensorRef};
use crate::problem::{FusedInputs, Neighborhood};

/// Self attention over a contiguous bfloat16 tensor of `shape` (at an aligned address), window
/// `kernel` and `dilation` per spatial axis; and that tensor.
fn problem(shape: &[usize], kernel: Vec<i64>, dilation: Vec<i64>) -> (FusedProblem, TensorRef) {
    let p = self_attention(shape, DType::BF16, kernel, dilation);
    (p, self_attention_tensor(shape, DType::BF16))
}

fn axis(length: usize, kernel: usize, dilation: usize) -> Axis {
    Axis {
        length,
        kernel,
        dilation,
        ..Axis::UNIT
    }
}

#[test]
fn the_longest_box_is_an_inner_tiles() {
    // Tiles of 8 over 56 positions, window 7: the first tile's box runs from key 0 to the
    // window end of query 7 (11 keys); inner tiles' from query 8's start (5) to query 15's end
    // (19): 14 keys, the tile plus the window less one.
    assert_eq!(longest_box(&axis(56, 7, 1), 8, Slabs::Keys), 14);
    // Dilation 4: groups of 14, tiles of 8 then 6: the first spans 11 keys of its group, the
    // second 9 (from query 8's start, 5, to the group's end).
    assert_eq!(longest_box(&axis(56, 7, 4), 8, Slabs::Keys), 11);
    // A unit axis has boxes of one key.
    assert_eq!(longest_box(&Axis::UNIT, 1, Slabs::Keys), 1);
}

#[test]
fn query_boxes_span_the_queries_that_see_some_key_of_a_tile() {
    // Against the inverse windows, every dilation group and tile: strides, causal, dilations.
    let axes = [
        axis(56, 7, 1),
        axis(56, 7, 4),
        axis(23, 5, 3),
        Axis {
            stride: 3,
            ..axis(40, 6, 2)
        },
        Axis {
            causal: true,
            ..axis(30, 4, 1)
        },
        Axis {
            causal: true,
            stride: 2,
            ..axis(33, 5, 3)
        },
        Axis::UNIT,
    ];
    for a in axes {
        let d = a.dilation;
        let inverse = a.inverse_windows();
        for tile in [1, 4, 8] {
            let mut longest = 0;
            for group in 0..d.min(a.length) {
                let len = a.group_len(group);
                for first in (0..len).step_by(tile) {
                    let runs = (first..(first + tile).min(len))
                        .map(|k| inverse[k * d + group])
                        .filter(|run| run.count > 0);
                    let start = runs.clone().map(|run| run.first / d).min();
                    let end = runs.map(|run| run.first / d + run.count).max();
                    if let (Some(start), Some(end)) = (start, end) {
                        longest = longest.max(end - start);
                    }
                }
            }
            assert_eq!(
                longest_box(&a, tile, Slabs::Queries),
                longest,
                "{a:?}, tiles of {tile}"
            );
        }
    }
    // Tiles of 8 over 56, window 7: keys 8 to 15 are seen by queries 5 (window 2 to 8) to 18
    // (window 15 to 21): 14, as the keys of a tile of queries.
    assert_eq!(longest_box(&axis(56, 7, 1), 8, Slabs::Queries), 14);
}

#[test]
fn query_slabs_take_the_key_kernels_columns() {
    // The key kernel's slabs on warpgroup products: 64 queries for rows up to 32 channels (a
    // shape of 8 x 8 over the 14 x 14 boxes of the vision problem), 32 past them.
    let (p, _) = problem(&[2, 56, 56, 4, 32], vec![7, 7], vec![1, 1]);
    assert_eq!(slab_shift(&p, Slabs::Queries, 64), Some([0, 3, 3]));
    let (p, _) = problem(&[2, 56, 56, 4, 64], vec![7, 7], vec![1, 1]);
    let shift = slab_shift(&p, Slabs::Queries, 64).unwrap();
    assert_eq!(shift.iter().sum::<u32>(), 5);
    // The maps of queries span every query head.
    let (p, q) = problem(&[2, 20, 19, 4, 16], vec![3, 3], vec![2, 3]);
    let v = View::heads_last(&q, 2, true);
    let tma = params(&p, Slabs::Queries, [&v, &v], 64).unwrap();
    assert_eq!(MapPlan::from_host(&tma.maps[1]).dims[0], 4 * 16);
}

#[test]
fn slab_shapes_are_the_fewest_and_most_even_boxes_take() {
    // Vision: 56 x 56, window 7, tiles of 8 x 8 (64 rows): boxes of 14 x 14, cut 8 x 8 into
    // four slabs (4 x 16 and 16 x 4 also take four, less evenly).
    let (p, _) = problem(&[2, 56, 56, 4, 32], vec![7, 7], vec![1, 1]);
    assert_eq!(slab_shift(&p, Slabs::Keys, 64), Some([0, 3, 3]));
    // 1-D: one axis takes all 64 keys.
    let (p, _) = problem(&[1, 300, 2, 32], vec![33], vec![1]);
    assert_eq!(slab_shift(&p, Slabs::Keys, 64), Some([0, 0, 6]));
    // 3-D 12 x 12 x 12, window 5: tiles of 4 x 4 x 4, boxes of 8 x 8 x 8: eight slabs of
    // 4 x 4 x 4 (as few as 2 x 4 x 8 and the like, and the most even).
    let (p, _) = problem(&[1, 12, 12, 12, 2, 16], vec![5, 5, 5], vec![1, 1, 1]);
    assert_eq!(slab_shift(&p, Slabs::Keys, 64), Some([2, 2, 2]));
}

#[test]
fn dilations_past_the_drivers_limits_refuse_the_copies() {
    // A box side spans the slab's side times the dilation (at most 256 elements), and an
    // element stride is at most 8: 64 keys along one axis take dilations up to 4.
    let (p, _) = problem(&[1, 1000, 2, 32], vec![7], vec![4]);
    assert_eq!(slab_shift(&p, Slabs::Keys, 64), Some([0, 0, 6]));
    let (p, _) = problem(&[1, 1000, 2, 32], vec![7], vec![5]);
    assert_eq!(slab_shift(&p, Slabs::Keys, 64), None);
    // In 2-D, dilation 8 on both axes: groups of 12, tiles of 8 x 8, boxes of 11 x 11: three
    // slabs of 4 x 16 (boxes of 32 x 128 elements) or 16 x 4, the longer along the last axis.
    // Beyond dilation 8, a side of one key (its element stride then 1) along that axis.
    let (p, _) = problem(&[1, 96, 96, 2, 32], vec![7, 7], vec![8, 8]);
    assert_eq!(slab_shift(&p, Slabs::Keys, 64), Some([0, 2, 4]));
    let (p, _) = problem(&[1, 96, 960, 2, 32], vec![7, 65], vec![9, 2]);
    let shift = slab_shift(&p, Slabs::Keys, 64).unwrap();
    assert_eq!((shift[1], shift[2]), (0, 6));
}

#[test]
fn maps_list_channels_then_axes_from_the_last_then_the_batch() {
    // [2, 20, 19, 4 heads, 16 channels], dilation 2 x 3, slabs 8 x 8.
    let (p, q) = problem(&[2, 20, 19, 4, 16], vec![3, 3], vec![2, 3]);
    let v = View::heads_last(&q, 2, true);
    let plan = map_of(&p, &v, (4, 16), [0, 3, 3]).unwrap();
    assert_eq!(plan.address, 0x1000);
    assert_eq!(plan.dims, [64, 19, 20, 1, 2]);
    // Rows of 64 channels (128 bytes); the unit axis 0 takes the packed stride.
    assert_eq!(plan.strides, [128, 128 * 19, 128 * 19 * 20, 128 * 19 * 20]);
    // Boxes of 8 channels by 8 keys of one dilation group: 8 x 3 and 8 x 2 elements.
    assert_eq!(plan.boxes, [8, 24, 16, 1, 1]);
    assert_eq!(plan.element_strides, [1, 3, 2, 1, 1]);
    assert_eq!((plan.element_bytes, plan.rank), (2, 5));
    // The host encoding holds the plan.
    assert_eq!(MapPlan::from_host(&plan.host_encoding()), plan);
    // The parameters take that cut for every tile, and both maps.
    let tma = params(&p, Slabs::Keys, [&v, &v], 64).unwrap();
    assert_eq!(
        tma.slab_shift,
        slab_shift(&p, Slabs::Keys, 64).unwrap().map(|s| s as i32)
    );
    assert_eq!(MapPlan::from_host(&tma.maps[0]).dims, plan.dims);
}

/// A bfloat16 tensor of `shape` with element strides `strides` at `data`.
fn laid_out(shape: &[usize], strides: Vec<isize>, data: usize) -> TensorRef {
    TensorRef {
        data,
        strides,
        ..TensorRef::meta(shape, DType::BF16, Device::Cuda(0))
    }
}

#[test]
fn tensor_maps_take_heads_dense_with_channels_and_strides_growing_outwards() {
    let shape = [2, 10, 4, 16];
    // Contiguous.
    assert!(laid_out(&shape, vec![640, 64, 16, 1], 0x1000).fits_tensor_maps());
    // A slice of a fused projection [2, 10, 3, 4, 16]: rows 192 apart.
    assert!(laid_out(&shape, vec![1920, 192, 16, 1], 0x1080).fits_tensor_maps());
    // Heads not dense with channels (channels-first heads, transposed).
    assert!(!laid_out(&shape, vec![640, 64, 1, 4], 0x1000).fits_tensor_maps());
    // Positions closer than a row of every head (heads outermost).
    assert!(!laid_out(&shape, vec![640, 16, 160, 1], 0x1000).fits_tensor_maps());
    // A misaligned address, a negative stride, a broadcast batch.
    assert!(!laid_out(&shape, vec![640, 64, 16, 1], 0x1008).fits_tensor_maps());
    assert!(!laid_out(&shape, vec![640, -64, 16, 1], 0x1000).fits_tensor_maps());
    assert!(!laid_out(&shape, vec![0, 64, 16, 1], 0x1000).fits_tensor_maps());
    // A stride past the driver's 2^40 bytes.
    assert!(!laid_out(&shape, vec![1 << 40, 64, 16, 1], 0x1000).fits_tensor_maps());
    // Axes of one element take any stride.
    let single = [1, 10, 1, 16];
    assert!(laid_out(&single, vec![0, 16, 7, 1], 0x1000).fits_tensor_maps());
}

#[test]
fn problems_take_maps_only_where_the_staged_tensors_fit_them() {
    let shape = [2, 10, 4, 16];
    let q = laid_out(&shape, vec![640, 64, 16, 1], 0x1000);
    let heads_apart = laid_out(&shape, vec![640, 16, 160, 1], 0x2000);
    let nbhd = Neighborhood {
        kernel: vec![3],
        stride: vec![1],
        dilation: vec![1],
        causal: vec![false],
    };
    let problem = |query: &TensorRef, value: &TensorRef| {
        let inputs = FusedInputs {
            query: Some(query),
            key: Some(&q),
            value: Some(value),
            ..FusedInputs::default()
        };
        FusedProblem::new(&inputs, &nbhd, 1.0).unwrap()
    };
    // Keys and values (the forward's and the d_query kernel's slabs): both must fit.
    assert!(problem(&q, &q).kv_tensor_maps);
    assert!(!problem(&q, &heads_apart).kv_tensor_maps);
    // Queries and the output gradient (the key kernel's).
    assert!(problem(&q, &q).query_tensor_maps);
    assert!(!problem(&heads_apart, &q).query_tensor_maps);
    let backward = |d_out: &TensorRef| problem(&q, &q).with_output_gradient(d_out);
    assert!(backward(&q).query_tensor_maps);
    assert!(!backward(&heads_apart).query_tensor_maps);
}
