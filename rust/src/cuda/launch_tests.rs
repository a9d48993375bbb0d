use super::*;
use crate::dlpack::{contiguous_strides, DType, Device};
use crate::problem::Neighborhood;

fn tensor(shape: &[usize], data: usize) -> TensorRef {
    TensorRef {
        data,
        ..TensorRef::meta(shape, DType::F32, Device::Cuda(0))
    }
}

/// A 2-D problem: batch 2, heads 3, 9 x 8 tokens, dim 4, kernel 3 x 5, 2 extra tokens.
fn problem() -> (Problem, [TensorRef; 4]) {
    let q = tensor(&[2, 3, 9, 8, 4], 0x1000);
    let k = tensor(&[2, 3, 9, 8, 4], 0x2000);
    let rpb = tensor(&[3, 5, 9], 0x3000);
    let extra = tensor(&[2, 3, 2, 4], 0x4000);
    let nbhd = Neighborhood::unfused(vec![3, 5], vec![2, 1], vec![false, true]);
    let p = Problem::for_qk(&q, &k, Some(&rpb), Some(&extra), &nbhd).unwrap();
    (p, [q, k, rpb, extra])
}

#[test]
fn token_views_pad_ranks_with_leading_zero_strides() {
    let t = tensor(&[2, 3, 7, 5], 0x10);
    let v = View::tokens(&t);
    assert_eq!(v.data, 0x10);
    assert_eq!(v.stride, [105, 35, 0, 0, 5, 1]);
    let t = tensor(&[2, 3, 4, 7, 6, 5], 0);
    assert_eq!(View::tokens(&t).stride, [2520, 840, 210, 30, 5, 1]);
}

#[test]
fn views_keep_arbitrary_strides() {
    // A heads-first view of heads-last memory [B, H, W, heads, D].
    let mut t = tensor(&[2, 3, 9, 8, 4], 0);
    t.strides = vec![864, 4, 96, 12, 1];
    assert_eq!(View::tokens(&t).stride, [864, 4, 0, 96, 12, 1]);
    let mut e = tensor(&[2, 3, 5, 4], 0);
    e.strides = vec![0, 20, 4, 1];
    assert_eq!(View::extras(&e).stride, [0, 20, 4, 0, 0, 1]);
}

#[test]
fn bias_views_right_align_the_offset_axes() {
    assert_eq!(View::bias(&tensor(&[3, 5], 0)).stride, [5, 0, 0, 1, 0, 0]);
    assert_eq!(
        View::bias(&tensor(&[3, 5, 9], 0)).stride,
        [45, 0, 9, 1, 0, 0]
    );
    let strides: Vec<i64> = contiguous_strides(&[3, 5, 7, 9])
        .iter()
        .map(|&s| s as i64)
        .collect();
    assert_eq!(
        View::bias(&tensor(&[3, 5, 7, 9], 0)).stride[..4],
        strides[..]
    );
}

#[test]
fn qk_is_one_pairwise_launch_covering_every_logit() {
    let (p, [q, k, rpb, extra]) = problem();
    let attn = tensor(&p.attn_shape(), 0x5000);
    let t = QkTensors {
        query: &q,
        key: &k,
        rpb: Some(&rpb),
        additional_keys: Some(&extra),
    };
    let launches = qk(&p, &t, &attn, false);
    assert_eq!(launches.len(), 1);
    let l = launches[0];
    assert_eq!(l.function, Function::Pairwise);
    let rows: usize = 2 * 3 * 9 * 8; // a thread per query row, for its 15 + 2 logits
    assert_eq!(l.config.grid as usize, rows.div_ceil(BLOCK as usize));
    let pr = l.params;
    assert_eq!(
        (pr.out.data, pr.a.data, pr.b.data),
        (0x5000, 0x1000, 0x2000)
    );
    assert_eq!((pr.bias.data, pr.extra.data), (0x3000, 0x4000));
    assert_eq!((pr.has_bias, pr.has_extra, pr.neg_inf_fill), (1, 1, 1));
    assert_eq!((pr.batch, pr.heads, pr.dim, pr.extra_count), (2, 3, 4, 2));
    assert_eq!(pr.length, [1, 9, 8]);
    assert_eq!(pr.dilation, [1, 2, 1]);
}

#[test]
fn backward_plans_launch_every_requested_gradient() {
    let (p, [q, k, rpb, extra]) = problem();
    let d_attn = tensor(&p.attn_shape(), 0x5000);
    let t = QkTensors {
        query: &q,
        key: &k,
        rpb: None,
        additional_keys: Some(&extra),
    };
    let g = QkGrads {
        d_query: &q,
        d_key: &k,
        d_rpb: Some(&rpb),
        d_additional_keys: Some(&extra),
        bias_scratch: None,
    };
    let functions: Vec<Function> = qk_backward(&p, &d_attn, &t, &g, false)
        .iter()
        .map(|l| l.function)
        .collect();
    use Function::*;
    assert_eq!(functions, [Gather, Scatter, ExtraGrad, BiasGrad]);
    let plain = QkGrads {
        d_rpb: None,
        d_additional_keys: None,
        ..g
    };
    assert_eq!(qk_backward(&p, &d_attn, &t, &plain, false).len(), 2);
    let bias = qk_backward(&p, &d_attn, &t, &g, false)[3];
    assert_eq!(bias.config.grid, 3 * 5 * 9);
    assert_eq!(bias.config.block, (REDUCE_THREADS, 1));
    let extra_grad = qk_backward(&p, &d_attn, &t, &g, false)[2];
    assert_eq!(extra_grad.config.grid, 2 * 3 * 2);
    assert_eq!(extra_grad.config.block, (32, EXTRA_ROWS));
    // With a scratch, d_rpb takes two passes: a block per tile of 256 query rows of every
    // (batch, head) (72 tokens: one), then a block per 32 entries of every head (45 entries:
    // two); both find the scratch at the bias's address.
    let scratch = tensor(&[bias_scratch_len(&p)], 0x6000);
    assert_eq!(scratch.numel(), 2 * 3 * 45);
    let tiled = QkGrads {
        bias_scratch: Some(&scratch),
        ..g
    };
    let launches = qk_backward(&p, &d_attn, &t, &tiled, false);
    let functions: Vec<Function> = launches.iter().map(|l| l.function).collect();
    assert_eq!(
        functions,
        [Gather, Scatter, ExtraGrad, BiasGradTiles, BiasGradSum]
    );
    let (tiles, sum) = (launches[3], launches[4]);
    assert_eq!(
        (tiles.config.grid, tiles.config.block),
        (2 * 3, (REDUCE_THREADS, 1))
    );
    assert_eq!(
        (sum.config.grid, sum.config.block),
        (3 * 2, (REDUCE_THREADS, 1))
    );
    assert!([tiles, sum].iter().all(|l| l.params.bias.data == 0x6000));
    assert!([tiles, sum].iter().all(|l| l.params.out.data == 0x3000));
}

#[test]
fn bias_grads_take_tiles_where_a_table_per_warp_fits_static_shared_memory() {
    // 8 warps of 4-byte accumulators fit tables of 1536 entries (2-D kernels up to 19), of
    // 8-byte ones 768 (2-D up to 13); past that d_rpb takes one block per entry, with no scratch.
    let with = |kernel: i64, dtype: DType| {
        let q = TensorRef::meta(&[2, 3, 40, 40, 8], dtype, Device::Cuda(0));
        let nbhd = Neighborhood::unfused(vec![kernel; 2], vec![1; 2], vec![false; 2]);
        let p = Problem::for_qk(&q, &q, None, None, &nbhd).unwrap();
        (bias_grad_takes_tiles(&p), bias_scratch_len(&p))
    };
    // 1600 tokens: 7 tiles of 256 rows per (batch, head).
    assert_eq!(with(19, DType::F32), (true, 2 * 3 * 7 * 37 * 37));
    assert_eq!(with(21, DType::F32), (false, 0));
    assert_eq!(with(13, DType::F64), (true, 2 * 3 * 7 * 25 * 25));
    assert_eq!(with(15, DType::F64), (false, 0));
}

#[test]
fn av_backward_fills_empty_slots_with_zero() {
    let (p, [q, k, _, extra]) = problem();
    let attn = tensor(&p.attn_shape(), 0x5000);
    let t = AvTensors {
        attn: &attn,
        value: &k,
        additional_values: Some(&extra),
    };
    let g = AvGrads {
        d_attn: &attn,
        d_value: &k,
        d_additional_values: None,
    };
    let launches = av_backward(&p, &q, &t, &g, false);
    assert_eq!(launches.len(), 2);
    assert_eq!(launches[0].function, Function::Pairwise);
    assert_eq!(launches[0].params.neg_inf_fill, 0);
    assert_eq!(launches[0].params.has_extra, 1);
    // d_value, over dense aligned rows, by 4-channel runs.
    assert_eq!(launches[1].function, Function::Scatter);
    assert_eq!(launches[1].params.run, 4);
}

/// The `av` launch of the test problem with `value` in place of its key tensor.
fn av_launch(value: &TensorRef) -> Launch {
    let (p, [q, _, _, extra]) = problem();
    let attn = tensor(&p.attn_shape(), 0x5000);
    let t = AvTensors {
        attn: &attn,
        value,
        additional_values: Some(&extra),
    };
    av(&p, &t, &q, false)[0]
}

#[test]
fn gathers_take_sixteen_byte_runs_only_where_every_row_allows() {
    let rows: usize = 2 * 3 * 9 * 8;
    // Dense float32 rows of 4 channels at aligned addresses: a thread per 4-channel run.
    let dense = av_launch(&tensor(&[2, 3, 9, 8, 4], 0x2000));
    assert_eq!(dense.function, Function::Gather);
    assert_eq!(dense.params.run, 4);
    assert_eq!(dense.config.grid as usize, rows.div_ceil(BLOCK as usize));
    // A value tensor 4 bytes off alignment, or with channels 2 apart: a thread per channel.
    let shifted = av_launch(&tensor(&[2, 3, 9, 8, 4], 0x2004));
    let mut strided = tensor(&[2, 3, 9, 8, 4], 0x2000);
    strided.strides = vec![1728, 576, 64, 8, 2];
    for one in [shifted, av_launch(&strided)] {
        assert_eq!(one.params.run, 1);
        assert_eq!(
            one.config.grid as usize,
            (rows * 4).div_ceil(BLOCK as usize)
        );
    }
    // Rows whose starts are not all 16-byte aligned (a stride of 6 elements).
    let mut ragged = tensor(&[2, 3, 9, 8, 4], 0x2000);
    ragged.strides = vec![2592, 864, 48, 6, 1];
    assert_eq!(av_launch(&ragged).params.run, 1);
}

#[test]
fn empty_problems_launch_nothing() {
    let q = tensor(&[0, 3, 9, 4], 0);
    let nbhd = Neighborhood::unfused(vec![3], vec![1], vec![false]);
    let p = Problem::for_qk(&q, &q, None, None, &nbhd).unwrap();
    let attn = tensor(&p.attn_shape(), 0);
    let t = QkTensors {
        query: &q,
        key: &q,
        rpb: None,
        additional_keys: None,
    };
    assert!(qk(&p, &t, &attn, false).is_empty());
}

/// A 2-D bfloat16 problem without extra tokens: batch 2, heads 3, 20 x 12 tokens, `dim`
/// channels, kernel `kernel`.
fn half_problem(dim: usize, kernel: Vec<i64>, extra: usize) -> (Problem, [TensorRef; 2]) {
    let meta = |shape: &[usize]| TensorRef::meta(shape, DType::BF16, Device::Cuda(0));
    let q = meta(&[2, 3, 20, 12, dim]);
    let e = meta(&[2, 3, extra, dim]);
    let rank = kernel.len();
    let nbhd = Neighborhood::unfused(kernel, vec![1; rank], vec![false; rank]);
    let extra = (extra > 0).then_some(&e);
    let p = Problem::for_qk(&q, &q, None, extra, &nbhd).unwrap();
    (p, [q, e])
}

#[test]
fn window_products_take_tensor_cores_only_where_the_bias_offsets_fit_32_bits() {
    let meta = |shape: &[usize]| TensorRef::meta(shape, DType::BF16, Device::Cuda(0));
    let q = meta(&[2, 3, 20, 12, 32]);
    let nbhd = Neighborhood::unfused(vec![7, 7], vec![1; 2], vec![false; 2]);
    let takes = |strides: Vec<isize>| {
        let rpb = TensorRef {
            strides,
            ..meta(&[3, 13, 13])
        };
        takes_tensor_cores(&Problem::for_qk(&q, &q, Some(&rpb), None, &nbhd).unwrap())
    };
    assert!(takes(vec![169, 13, 1]));
    // The last offset is 2 s0 + 12 13 + 12 1: 2^32 for s0 = 2^31 - 84.
    assert!(takes(vec![(1 << 31) - 85, 13, 1]));
    assert!(!takes(vec![(1 << 31) - 84, 13, 1]));
    // Offsets below the first element are never taken in 32 bits; an empty view has none.
    let view = |shape: &[usize], strides: Vec<isize>| TensorRef {
        strides,
        ..meta(shape)
    };
    assert!(!view(&[3, 13, 13], vec![169, -13, 1]).offsets_fit_32_bits());
    assert!(view(&[0, 13, 13], vec![1 << 40, 13, 1]).offsets_fit_32_bits());
}

#[test]
fn window_products_take_tensor_cores_where_the_kernels_fit() {
    let takes =
        |dim, kernel: Vec<i64>, extra| takes_tensor_cores(&half_problem(dim, kernel, extra).0);
    assert!(takes(32, vec![7, 7], 0));
    assert!(takes(128, vec![5, 7], 0));
    // Additional tokens, head dims off the eights or past 128, and slot tiles that do not fit
    // beside the slabs take the one-thread-per-row kernels.
    assert!(!takes(32, vec![7, 7], 2));
    assert!(!takes(12, vec![7, 7], 0));
    assert!(!takes(136, vec![3, 3], 0));
    assert!(!takes(128, vec![11, 11], 0));
    assert!(takes(16, vec![11, 11], 0));
    // 2^31 tokens per (batch, head) are past the kernels' 32-bit indices; one row fewer is not.
    let tokens = |rows: usize| {
        let q = TensorRef::meta(&[1, 1, rows, 1 << 15, 32], DType::BF16, Device::Cuda(0));
        let nbhd = Neighborhood::unfused(vec![7, 7], vec![1; 2], vec![false; 2]);
        takes_tensor_cores(&Problem::for_qk(&q, &q, None, None, &nbhd).unwrap())
    };
    assert!(tokens((1 << 16) - 1) && !tokens(1 << 16));
    // The limit is the static shared memory: 2 slabs of 64 rows of 136 elements and a 4-byte
    // key number, 64 rows of 105 slots, in 2-byte elements, and a bias table's 65 words is 49028
    // bytes; 121 slots would be 51076.
    assert_eq!(tensor_core_shared_bytes(DType::BF16, 128, 105), 49028);
    assert!(tensor_core_shared_bytes(DType::BF16, 128, 121) > STATIC_SHARED_BYTES);
    assert!(!products_take_tensor_cores(DType::F32, 32, 49, 0));
}

#[test]
fn tensor_core_products_launch_a_block_per_query_tile() {
    let (p, [q, _]) = half_problem(32, vec![7, 7], 0);
    let attn = TensorRef::meta(&p.attn_shape(), DType::BF16, Device::Cuda(0));
    let t = QkTensors {
        query: &q,
        key: &q,
        rpb: None,
        additional_keys: None,
    };
    let l = qk(&p, &t, &attn, true)[0];
    assert_eq!(l.function, Function::PairwiseTc);
    assert_eq!(l.config.block, (TC_THREADS, 1));
    // 8 x 8 query tiles over 20 x 12 tokens: 3 x 2 tiles per (batch, head).
    let tiling = l.params.tiling;
    assert_eq!((tiling.tile(), tiling.tiles()), ([1, 8, 8], [1, 3, 2]));
    assert_eq!((tiling.heads.divisor, tiling.per_head.divisor), (3, 6));
    assert_eq!(l.config.grid, 2 * 3 * 3 * 2);
    assert_eq!(l.params.neg_inf_fill, 1);
    let g = QkGrads {
        d_query: &q,
        d_key: &q,
        d_rpb: None,
        d_additional_keys: None,
        bias_scratch: None,
    };
    let backward: Vec<Function> = qk_backward(&p, &attn, &t, &g, true)
        .iter()
        .map(|l| l.function)
        .collect();
    assert_eq!(backward, [Function::GatherTc, Function::Scatter]);
    let a = AvTensors {
        attn: &attn,
        value: &q,
        additional_values: None,
    };
    assert_eq!(av(&p, &a, &q, true)[0].function, Function::GatherTc);
    let grads = AvGrads {
        d_attn: &attn,
        d_value: &q,
        d_additional_values: None,
    };
    let d_attn = av_backward(&p, &q, &a, &grads, true)[0];
    assert_eq!(d_attn.function, Function::PairwiseTc);
    assert_eq!(d_attn.params.neg_inf_fill, 0);
}

#[test]
fn huge_problems_cap_the_grid() {
    assert_eq!(
        Config::covering(1 << 45, 256, (256, 1)).grid as u64,
        MAX_GRID
    );
    assert_eq!(Config::covering(257, 256, (256, 1)).grid, 2);
}
