use super::*;
use crate::cuda::kernels::{KernelKey, Source};
use crate::cuda::tiling::{query_tile, TcTiling};
use crate::cuda::tma::MapPlan;
use crate::dlpack::{DType, Device};
use crate::problem::{FusedInputs, Neighborhood, Problem};

fn tensor(shape: &[usize], data: usize) -> TensorRef {
    TensorRef {
        data,
        ..TensorRef::meta(shape, DType::BF16, Device::Cuda(0))
    }
}

fn nbhd(kernel: Vec<i64>, stride: Vec<i64>, dilation: Vec<i64>, causal: Vec<bool>) -> Neighborhood {
    Neighborhood {
        kernel,
        stride,
        dilation,
        causal,
    }
}

/// A 2-D GQA problem: batch 2, 9 x 8 tokens, 6 query heads over 2 kv heads, D 16, Dv 24,
/// kernel 3 x 4, stride 1 x 2, dilation 2 x 1, causal on the last axis, 5 extra tokens.
fn problem() -> (FusedProblem, [TensorRef; 5]) {
    let q = tensor(&[2, 9, 8, 6, 16], 0x1000);
    let k = tensor(&[2, 9, 8, 2, 16], 0x2000);
    let v = tensor(&[2, 9, 8, 2, 24], 0x3000);
    let ek = tensor(&[2, 5, 2, 16], 0x4000);
    let ev = tensor(&[2, 5, 2, 24], 0x5000);
    let inputs = FusedInputs {
        query: Some(&q),
        key: Some(&k),
        value: Some(&v),
        additional_keys: Some(&ek),
        additional_values: Some(&ev),
        rpb: None,
    };
    let n = nbhd(vec![3, 4], vec![1, 2], vec![2, 1], vec![false, true]);
    let p = FusedProblem::new(&inputs, &n, 0.25).unwrap();
    (p, [q, k, v, ek, ev])
}

fn tensors<'a>(t: &'a [TensorRef; 5]) -> FusedTensors<'a> {
    FusedTensors {
        query: &t[0],
        key: Some(&t[1]),
        value: Some(&t[2]),
        additional_keys: Some(&t[3]),
        additional_values: Some(&t[4]),
        rpb: None,
    }
}

#[test]
fn heads_last_views_put_heads_second_and_right_align_space() {
    let t = tensor(&[2, 9, 8, 6, 16], 0);
    assert_eq!(
        View::heads_last(&t, 2, true).stride,
        [6912, 16, 0, 768, 96, 1]
    );
    let lse = tensor(&[2, 7, 3], 0);
    assert_eq!(View::heads_last(&lse, 1, false).stride, [21, 1, 0, 0, 3, 0]);
    let e = tensor(&[2, 5, 2, 16], 0);
    assert_eq!(View::extras_heads_last(&e).stride, [160, 16, 32, 0, 0, 1]);
}

#[test]
fn forward_is_one_warp_per_query_row() {
    let (p, t) = problem();
    let out = tensor(&p.out_shape(), 0x6000);
    let lse = TensorRef {
        data: 0x7000,
        ..TensorRef::meta(&p.lse_shape(), DType::F32, Device::Cuda(0))
    };
    let l = forward(&p, &tensors(&t), &out, &lse).unwrap();
    assert_eq!(l.function, Function::FusedForward);
    let rows = 2 * 9 * 8 * 6;
    assert_eq!(l.config.block, (BLOCK, 1));
    assert_eq!(l.config.grid, (rows as u32).div_ceil(BLOCK / WARP));
    let pr = l.params;
    assert_eq!(
        (pr.out.data, pr.lse.data, pr.query.data),
        (0x6000, 0x7000, 0x1000)
    );
    assert_eq!((pr.key.data, pr.value.data), (0x2000, 0x3000));
    assert_eq!((pr.extra_key.data, pr.extra_value.data), (0x4000, 0x5000));
    assert_eq!((pr.batch, pr.heads, pr.group, pr.extra_count), (2, 6, 3, 5));
    assert_eq!((pr.has_window, pr.has_bias, pr.scale), (1, 0, 0.25));
    assert_eq!(pr.length, [1, 9, 8]);
    assert_eq!(pr.dilation, [1, 2, 1]);
    assert_eq!(pr.lse.stride[5], 0);
}

#[test]
fn the_key_specialises_stride_causality_and_head_dims() {
    let (p, _) = problem();
    let key = KernelKey::for_fused(Source::FusedFwd, &p);
    assert_eq!(key.kernel, [1, 3, 4]);
    assert_eq!(key.stride, [1, 1, 2]);
    assert_eq!(key.causal, [false, false, true]);
    assert_eq!(key.dims, (16, 24));
}

#[test]
fn empty_problems_launch_nothing() {
    let q = tensor(&[0, 7, 2, 8], 0);
    let inputs = FusedInputs {
        query: Some(&q),
        key: Some(&q),
        value: Some(&q),
        ..FusedInputs::default()
    };
    let n = nbhd(vec![3], vec![1], vec![1], vec![false]);
    let p = FusedProblem::new(&inputs, &n, 1.0).unwrap();
    let t = FusedTensors {
        query: &q,
        key: Some(&q),
        value: Some(&q),
        additional_keys: None,
        additional_values: None,
        rpb: None,
    };
    let lse = tensor(&p.lse_shape(), 0);
    assert!(forward(&p, &t, &q, &lse).is_none());
}

fn grads_for(p: &FusedProblem, base: usize) -> [TensorRef; 5] {
    [
        tensor(&p.token_shape(p.heads, p.dim), base),
        tensor(&p.token_shape(p.heads_kv, p.dim), base + 0x100),
        tensor(&p.token_shape(p.heads_kv, p.dim_v), base + 0x200),
        tensor(&p.extra_shape(p.dim), base + 0x300),
        tensor(&p.extra_shape(p.dim_v), base + 0x400),
    ]
}

#[test]
fn backward_launches_queries_then_keys_then_extras_one_warp_per_row() {
    let (p, t) = problem();
    let out = tensor(&p.out_shape(), 0x6000);
    let d_out = tensor(&p.out_shape(), 0x7000);
    let lse_at = |data| TensorRef {
        data,
        ..TensorRef::meta(&p.lse_shape(), DType::F32, Device::Cuda(0))
    };
    let (lse, d_lse) = (lse_at(0x5000), lse_at(0x8000));
    let g = grads_for(&p, 0x10000);
    let stats = TensorRef {
        data: 0x9000,
        ..TensorRef::meta(&[backward_stats_len(&p)], DType::F32, Device::Cuda(0))
    };
    let saved = Saved {
        out: &out,
        lse: &lse,
        d_out: &d_out,
        d_lse: Some(&d_lse),
    };
    let grads = FusedGrads {
        d_query: &g[0],
        d_key: Some(&g[1]),
        d_value: Some(&g[2]),
        d_additional_keys: Some(&g[3]),
        d_additional_values: Some(&g[4]),
        d_rpb: None,
    };
    let launches = backward(&p, &tensors(&t), &saved, &grads, &stats, (false, false));
    let functions: Vec<Function> = launches.iter().map(|l| l.function).collect();
    assert_eq!(
        functions,
        [
            Function::FusedBackwardQuery,
            Function::FusedBackwardKeys,
            Function::FusedBackwardExtras
        ]
    );
    let per_block = BLOCK / WARP;
    let rows = [2 * 9 * 8 * 6, 2 * 9 * 8 * 2, 2 * 2 * 5];
    for (l, rows) in launches.iter().zip(rows) {
        assert_eq!(
            l.config.grid,
            (rows as u32).div_ceil(per_block),
            "{:?}",
            l.function
        );
    }
    assert_eq!(backward_stats_len(&p), 2 * 2 * 6 * 9 * 8);
    let pr = launches[0].params;
    assert_eq!(
        (pr.forward.out.data, pr.d_out.data, pr.d_lse.data),
        (0x6000, 0x7000, 0x8000)
    );
    assert_eq!(pr.forward.lse.data, 0x5000, "the forward's lse");
    assert_eq!((pr.stats, pr.has_d_lse, pr.d_bias.data), (0x9000, 1, 0));
    assert_eq!(
        [pr.d_query.data, pr.d_key.data, pr.d_value.data],
        [0x10000, 0x10100, 0x10200]
    );
    assert_eq!(
        [pr.d_extra_key.data, pr.d_extra_value.data],
        [0x10300, 0x10400]
    );
    assert_eq!((pr.forward.group, pr.forward.extra_count), (3, 5));
    assert_eq!(
        pr.tiling,
        TcTiling::default(),
        "the warp kernels are not tiled"
    );
    // Without d_lse, and with neither key-side nor extra gradients, only the query kernel runs.
    let bare = Saved {
        d_lse: None,
        ..saved
    };
    let only_query = FusedGrads {
        d_key: None,
        d_value: None,
        d_additional_keys: None,
        d_additional_values: None,
        ..grads
    };
    let launches = backward(&p, &tensors(&t), &bare, &only_query, &stats, (false, false));
    assert_eq!(launches.len(), 1);
    assert_eq!(launches[0].params.has_d_lse, 0);
}

/// On tensor cores, `d_query`, `d_key`/`d_value` and the additional tokens' gradients take a
/// block of 128 threads per tile of queries (every head), keys (every kv head, tiled as the
/// forward's queries) or 64 additional tokens (every kv head); the bias's gradient then sums
/// the query tiles' shares in two passes, in the same order.
#[test]
fn tensor_core_backward_launches_a_block_per_tile_then_the_bias_sums() {
    let (p, t) = problem();
    // A problem with a bias, as the plan sees it (its variants are the biased ones).
    let p = FusedProblem { rpb: true, ..p };
    let rows = |shape: &[usize], base| tensor(shape, base);
    let (out, d_out) = (rows(&p.out_shape(), 0x6000), rows(&p.out_shape(), 0x7000));
    let stats = TensorRef::meta(&[backward_stats_len(&p)], DType::F32, Device::Cuda(0));
    let lse = TensorRef::meta(&p.lse_shape(), DType::F32, Device::Cuda(0));
    let saved = Saved {
        out: &out,
        lse: &lse,
        d_out: &d_out,
        d_lse: None,
    };
    let g = grads_for(&p, 0x10000);
    let bias_grad = tensor(&[6, 5, 7], 0x20000);
    let grads = FusedGrads {
        d_query: &g[0],
        d_key: Some(&g[1]),
        d_value: Some(&g[2]),
        d_additional_keys: Some(&g[3]),
        d_additional_values: Some(&g[4]),
        d_rpb: Some(&bias_grad),
    };
    let launches = backward(&p, &tensors(&t), &saved, &grads, &stats, (true, false));
    let functions: Vec<Function> = launches.iter().map(|l| l.function).collect();
    assert_eq!(
        functions,
        [
            Function::FusedBackwardQueryTc,
            Function::FusedBackwardKeysTc,
            Function::FusedBackwardExtrasTc,
            Function::FusedBackwardBiasSlicesTc,
            Function::FusedBackwardBiasTc,
        ]
    );
    let pr = launches[0].params;
    // Axis 1 (9 tokens, dilation 2) has groups of 5 and 4, one tile of 8 each; axis 2 (8
    // tokens) one tile of 8.
    let queries = pr.tiling;
    assert_eq!(queries.tile(), query_tile(&p.axes, TC_ROWS));
    assert_eq!((queries.tile(), queries.tiles()), ([1, 8, 8], [1, 2, 1]));
    // Tiles of queries over the 6 heads, of keys over the 2 kv heads, and of the 5 additional
    // tokens (one tile) over the kv heads, per batch.
    let tasks = [(6, [1, 2, 1]), (2, [1, 2, 1]), (2, [1, 1, 1])];
    for (l, (heads, tiles)) in launches.iter().zip(tasks) {
        let tiling = l.params.tiling;
        assert_eq!(
            (tiling.heads.divisor, tiling.tiles()),
            (heads, tiles),
            "{:?}",
            l.function
        );
        let blocks = (2 * heads * tiles.iter().product::<usize>() as u32, (128, 1));
        assert_eq!((l.config.grid, l.config.block), blocks);
    }
    assert_eq!(
        launches[1].params.tiling.axes, queries.axes,
        "keys tiled as queries"
    );
    // The bias table (3 x 4: 5 x 7 entries) is summed over the 2 x 2 tiles of each head in one
    // slice: a block per (head, 32 entries), then a thread per (head, entry).
    let sums = [(6 * 2, (256, 1)), ((6 * 35u32).div_ceil(256), (256, 1))];
    for (l, sums) in launches[3..].iter().zip(sums) {
        assert_eq!((l.config.grid, l.config.block), sums, "{:?}", l.function);
    }
    assert!(
        launches.iter().all(|l| FusedBackwardParams {
            tiling: pr.tiling,
            ..l.params
        } == pr),
        "one parameter block but for the tiling"
    );
    assert!(
        launches[3..].iter().all(|l| l.params.tiling == queries),
        "the bias sums follow the query tiles"
    );
    assert!(launches
        .iter()
        .all(|l| l.params.tma == TmaParams::default()));
    // With bulk copies, the d_query kernel takes the keys' and values' maps and the key kernel
    // the queries' and output gradients', each its slabs of the shape they were planned for.
    let launches = backward(&p, &tensors(&t), &saved, &grads, &stats, (true, true));
    let staged = [
        (Slabs::Keys, [pr.forward.key.data, pr.forward.value.data]),
        (Slabs::Queries, [pr.forward.query.data, pr.d_out.data]),
    ];
    for (launch, (slabs, addresses)) in launches.iter().zip(staged) {
        let maps = launch.params.tma;
        let shift = tma::slab_shift(&p, slabs, TC_ROWS).unwrap();
        assert_eq!(maps.slab_shift, shift.map(|s| s as i32));
        let planned = maps.maps.map(|m| MapPlan::from_host(&m).address);
        assert_eq!(planned, addresses, "{:?}", launch.function);
    }
    assert!(launches[2..]
        .iter()
        .all(|l| l.params.tma == TmaParams::default()));
}

/// A self-attention problem with a bias of `bias` entries per head.
fn biased(shape: &[usize], kernel: Vec<i64>, bias: &[usize]) -> FusedProblem {
    biased_by(
        shape,
        kernel,
        &TensorRef::meta(bias, DType::F16, Device::Cuda(0)),
    )
}

/// A float16 self-attention problem with bias `rpb`.
fn biased_by(shape: &[usize], kernel: Vec<i64>, rpb: &TensorRef) -> FusedProblem {
    let q = TensorRef::meta(shape, DType::F16, Device::Cuda(0));
    let inputs = FusedInputs {
        query: Some(&q),
        key: Some(&q),
        value: Some(&q),
        rpb: Some(rpb),
        ..FusedInputs::default()
    };
    let rank = kernel.len();
    let n = nbhd(kernel, vec![1; rank], vec![1; rank], vec![false; rank]);
    FusedProblem::new(&inputs, &n, 1.0).unwrap()
}

/// The bias's gradient is summed on tensor cores where its table fits the d_query kernel's
/// shared memory (512 entries up to head dim 64, 256 past it), with scratch for the tiles' and
/// slices' sums; larger tables keep the warp kernel, and no scratch for it.
#[test]
fn tensor_cores_sum_the_bias_gradient_of_small_tables() {
    let plan = |p: &FusedProblem| -> Vec<Function> {
        let g = grads_for(p, 0x10000);
        let d_rpb = tensor(&[2, 1], 0x20000);
        let grads = FusedGrads {
            d_query: &g[0],
            d_key: Some(&g[1]),
            d_value: Some(&g[2]),
            d_additional_keys: None,
            d_additional_values: None,
            d_rpb: Some(&d_rpb),
        };
        let plan = backward_plan(p, &grads, true);
        plan.into_iter().skip(2).map(|(f, _)| f).collect()
    };
    let on_tensor_cores = [
        Function::FusedBackwardBiasSlicesTc,
        Function::FusedBackwardBiasTc,
    ];
    // 2-D, kernel 11 (441 entries), head dim 64: 2 batches x 19 x 16 tiles of 8 x 8 queries
    // per head (the last row of tiles part-full), in 5 slices of 128.
    let shape = [2, 150, 128, 3, 64];
    let p = biased(&shape, vec![11, 11], &[3, 21, 21]);
    assert_eq!(plan(&p), on_tensor_cores);
    let tokens = 150 * 128;
    let stats = 2 * 2 * 3 * tokens;
    assert_eq!(backward_stats_len(&p), stats + 3 * (608 + 5) * 441);
    // Kernel 13 (625 entries), or kernel 9 (289) at head dim 72, is past the limit.
    let large = [
        biased(&shape, vec![13, 13], &[3, 25, 25]),
        biased(&[2, 150, 128, 3, 72], vec![9, 9], &[3, 17, 17]),
    ];
    for p in large {
        assert_eq!(plan(&p), [Function::FusedBackwardBias]);
        let tokens = 150 * 128;
        assert_eq!(backward_stats_len(&p), 2 * 2 * 3 * tokens);
    }
    // Past head dim 64, kernel 7 (169 entries) still fits.
    let wide = biased(&[1, 20, 20, 2, 128], vec![7, 7], &[2, 13, 13]);
    assert_eq!(plan(&wide), on_tensor_cores);
}

#[test]
fn backward_head_dims_have_their_own_limit() {
    let q = tensor(&[1, 8, 2, 264], 0);
    let inputs = FusedInputs {
        query: Some(&q),
        key: Some(&q),
        value: Some(&q),
        ..FusedInputs::default()
    };
    let p = FusedProblem::new(&inputs, &nbhd(vec![3], vec![1], vec![1], vec![false]), 1.0).unwrap();
    assert!(crate::cuda::fused_key(Source::FusedFwd, &p).is_ok());
    let refused = crate::cuda::fused_key(Source::FusedBwd, &p)
        .unwrap_err()
        .to_string();
    assert!(
        refused.contains("backward on CUDA with a head dim above 256"),
        "{refused}"
    );
}

/// The one tensor of `self_attention`: contiguous, at an aligned address.
pub(crate) fn self_attention_tensor(shape: &[usize], dtype: DType) -> TensorRef {
    TensorRef {
        data: 0x1000,
        ..TensorRef::meta(shape, dtype, Device::Cuda(0))
    }
}

/// A self-attention problem (query, key and value alike) of `shape` `[B, *spatial, heads, D]`,
/// window `kernel` and `dilation` per spatial axis.
pub(crate) fn self_attention(
    shape: &[usize],
    dtype: DType,
    kernel: Vec<i64>,
    dilation: Vec<i64>,
) -> FusedProblem {
    let q = self_attention_tensor(shape, dtype);
    let inputs = FusedInputs {
        query: Some(&q),
        key: Some(&q),
        value: Some(&q),
        ..FusedInputs::default()
    };
    let rank = kernel.len();
    let n = nbhd(kernel, vec![1; rank], dilation, vec![false; rank]);
    FusedProblem::new(&inputs, &n, 1.0).unwrap()
}

#[test]
fn query_tiles_are_as_square_as_the_grid_allows() {
    type Case = (&'static [usize], Vec<i64>, Vec<i64>, [usize; 3]);
    let cases: [Case; 5] = [
        (&[2, 56, 56, 2, 32], vec![7, 7], vec![1, 1], [1, 8, 8]),
        (&[1, 8192, 2, 64], vec![127], vec![8], [1, 1, 64]),
        (
            &[1, 16, 32, 32, 2, 64],
            vec![7, 7, 7],
            vec![1, 1, 1],
            [4, 4, 4],
        ),
        // A short axis (dilation groups of 3) stops growing once the long one is relatively
        // shorter.
        (&[1, 6, 90, 2, 16], vec![3, 5], vec![2, 1], [1, 2, 32]),
        // Fewer queries than a tile.
        (&[1, 5, 2, 16], vec![3], vec![1], [1, 1, 8]),
    ];
    for (shape, kernel, dilation, tile) in cases {
        let p = self_attention(shape, DType::F16, kernel, dilation);
        assert_eq!(query_tile(&p.axes, TC_ROWS), tile, "{shape:?}");
        assert!(tile.iter().product::<usize>() <= TC_ROWS);
    }
    // Tiles of two warpgroups (128 rows) double the relatively longest side again.
    let rows_128: [Case; 3] = [
        (&[2, 56, 56, 2, 32], vec![7, 7], vec![1, 1], [1, 16, 8]),
        (&[1, 6, 90, 2, 16], vec![3, 5], vec![2, 1], [1, 2, 64]),
        (&[1, 5, 2, 16], vec![3], vec![1], [1, 1, 8]),
    ];
    for (shape, kernel, dilation, tile) in rows_128 {
        let p = self_attention(shape, DType::F16, kernel, dilation);
        assert_eq!(query_tile(&p.axes, 128), tile, "{shape:?}");
    }
    // Every side is a power of two: the kernels find a row's coordinates in a tile by shifts.
    for (length, dilation) in [(3, 1), (7, 2), (16, 5), (56, 1), (90, 4), (1000, 7)] {
        let p = self_attention(
            &[1, 5, length, 2, 16],
            DType::F16,
            vec![3, 3],
            vec![1, dilation],
        );
        for rows in [TC_ROWS, 128] {
            let tile = query_tile(&p.axes, rows);
            assert!(tile.iter().all(|side| side.is_power_of_two()), "{tile:?}");
        }
    }
}

#[test]
fn tensor_core_tiles_cover_every_dilation_group() {
    // 2-D, dilation 2 x 3 over 20 x 19: axis 1 has groups of 7, 6, 6 (tile 8: one tile each),
    // axis 0 groups of 10 and 10 (tile 8: two tiles each).
    let p = self_attention(&[2, 20, 19, 4, 16], DType::BF16, vec![3, 3], vec![2, 3]);
    let t = [TensorRef::meta(
        &[2, 20, 19, 4, 16],
        DType::BF16,
        Device::Cuda(0),
    )];
    let tensors = FusedTensors {
        query: &t[0],
        key: Some(&t[0]),
        value: Some(&t[0]),
        additional_keys: None,
        additional_values: None,
        rpb: None,
    };
    let out = TensorRef::meta(&[2, 20, 19, 4, 16], DType::BF16, Device::Cuda(0));
    let lse = TensorRef::meta(&[2, 20, 19, 4], DType::F32, Device::Cuda(0));
    let key = KernelKey::for_fused(Source::FusedTc, &p);
    assert_eq!(key.tensor_core_warps(), TC_WARPS);
    let launch = tensor_core_forward(&p, &tensors, &out, &lse, &key).unwrap();
    assert_eq!(launch.function, Function::FusedForwardTc);
    let tiling = launch.params.tiling;
    assert_eq!((tiling.tile(), tiling.tiles()), ([1, 8, 8], [1, 4, 3]));
    assert_eq!((tiling.heads.divisor, tiling.per_head.divisor), (4, 12));
    // Axis 1: 20 = 10 x 2, two groups of 10 (no long group), two tiles each; axis 2: 19 = 6 x 3
    // + 1, a group of 7 then two of 6, one tile each.
    let cut = |a: usize| {
        let axis = tiling.axes[a];
        (
            axis.quot,
            axis.rem,
            axis.long_tiles.divisor,
            axis.short_tiles.divisor,
        )
    };
    assert_eq!([cut(1), cut(2)], [(10, 0, 2, 2), (6, 1, 1, 1)]);
    assert_eq!(launch.config.grid, 2 * 4 * 12);
    assert_eq!(launch.config.block, (128, 1));
    // Blocks of eight warps take tiles of 128 queries: 16 x 8, one tile per group of axis 0.
    let wide = KernelKey {
        wgmma: true,
        dims: (64, 64),
        ..key
    };
    assert_eq!(wide.tensor_core_warps(), 8);
    let launch = tensor_core_forward(&p, &tensors, &out, &lse, &wide).unwrap();
    let tiling = launch.params.tiling;
    assert_eq!((tiling.tile(), tiling.tiles()), ([1, 16, 8], [1, 2, 3]));
    assert_eq!(launch.config.grid, 2 * 4 * 6);
    assert_eq!(launch.config.block, (256, 1));
}

#[test]
fn tensor_cores_take_half_types_with_head_dims_in_eights() {
    let forward = |dtype, dims| takes_tensor_cores(Source::FusedTc, dtype, dims);
    let takes = |dtype, dim| forward(dtype, (dim, dim));
    assert!(takes(DType::F16, 64) && takes(DType::BF16, 8) && takes(DType::BF16, 256));
    assert!(!takes(DType::F32, 64) && !takes(DType::F64, 64));
    assert!(!takes(DType::F16, 12) && !takes(DType::F16, 264));
    assert!(!forward(DType::F16, (64, 12)) && forward(DType::F16, (64, 200)));
    // The backward's tensor-core kernels stop at 128.
    let backward = |dtype, dims| takes_tensor_cores(Source::FusedBwdTc, dtype, dims);
    assert!(backward(DType::BF16, (128, 8)) && backward(DType::F16, (32, 128)));
    assert!(!backward(DType::F16, (136, 64)) && !backward(DType::BF16, (64, 200)));
    assert!(!backward(DType::F32, (64, 64)));
}

/// `precompile`'s fused variants are the keys the problems they stand for look up at launch:
/// the tensor-core forward and backward for half types on sm_80 and later (beside the warp
/// backward, whose module holds the extras' and bias's gradients), the warp kernels otherwise;
/// and beside the unfused ops' two sources, their tensor-core one where it runs.
#[test]
fn precompiled_fused_variants_are_the_ones_problems_launch() {
    let arch = |name| crate::cuda::Arch::parse(name).unwrap();
    let tensor_cores = [Source::FusedTc, Source::FusedBwdTc, Source::FusedBwd];
    let warp = [Source::FusedFwd, Source::FusedBwd];
    let cases: [(DType, &str, &[Source]); 4] = [
        (DType::F16, "sm_80", &tensor_cores),
        (DType::BF16, "sm_90a", &tensor_cores),
        (DType::F16, "sm_75", &warp),
        (DType::F32, "sm_80", &warp),
    ];
    for (dtype, name, sources) in cases {
        let p = self_attention(&[1, 12, 16, 2, 32], dtype, vec![3, 5], vec![1, 1]);
        let shapes = [(p.axes.map(|a| a.kernel), p.axes.map(|a| a.causal))];
        let keys =
            crate::cuda::variants(&[dtype], &shapes, &[(32, 32)], false, arch(name)).unwrap();
        for &source in sources {
            let key = KernelKey::for_fused(source, &p);
            assert!(
                keys.contains(&key),
                "{dtype:?} {name}: {key:?} not in {keys:?}"
            );
        }
        let unfused_tensor_cores = KernelKey {
            stride: [1; 3],
            ..KernelKey::for_fused(Source::UnfusedTc, &p)
        };
        let on_tensor_cores = sources == tensor_cores;
        assert_eq!(keys.contains(&unfused_tensor_cores), on_tensor_cores);
        assert_eq!(
            keys.len(),
            2 + usize::from(on_tensor_cores) + sources.len(),
            "the unfused sources and {sources:?}"
        );
    }
}

/// Problems with an index past 32 bits (batch, heads, additional tokens, or tokens of one
/// (batch, head)) keep the kernels that index in 64 bits, and allocate no scratch for the
/// tensor-core bias sums.
#[test]
fn tensor_cores_take_only_problems_whose_indices_fit_32_bits() {
    let axes = |lengths: [usize; 3]| {
        lengths.map(|length| Axis {
            length,
            kernel: 1,
            stride: 1,
            dilation: 1,
            causal: false,
        })
    };
    let limit = i32::MAX as usize;
    let fit =
        |batch, heads, lengths, extra| indices_fit_32_bits(batch, heads, &axes(lengths), extra);
    assert!(fit(limit, 1, [1, 1, 64], 64));
    assert!(fit(1, limit, [1, 1, 1], 0));
    assert!(fit(1, 1, [1, 1, limit], limit));
    assert!(fit(1, 1, [1 << 10, 1 << 10, (1 << 11) - 1], 0));
    // Task numbers (batch, head, tile of 64 queries) are divided in 31 bits.
    assert!(!fit(limit, 2, [1, 1, 64], 0));
    assert!(!fit(limit, 1, [1, 1, 64], 65));
    assert!(!fit(limit + 1, 1, [1, 1, 1], 0));
    assert!(!fit(1, limit + 1, [1, 1, 1], 0));
    assert!(!fit(1, 1, [1, 1, 1], limit + 1));
    assert!(!fit(1, 1, [1 << 10, 1 << 11, 1 << 10], 0));
    assert!(!fit(1, 1, [usize::MAX, 2, 1], 0));
    // 2^31 tokens: the bias's gradient is the warp kernel's, with no scratch beside the stats.
    let huge = biased(&[1, 1 << 16, 1 << 15, 1, 64], vec![3, 3], &[1, 5, 5]);
    assert_eq!(backward_stats_len(&huge), 2 << 31);
    let under = biased(&[1, 1 << 16, (1 << 15) - 1, 1, 64], vec![3, 3], &[1, 5, 5]);
    assert!(backward_stats_len(&under) > 2 * (1 << 16) * ((1 << 15) - 1));
}

#[test]
fn tensor_cores_take_only_biases_whose_offsets_fit_32_bits() {
    // The kernels address the bias in 32 bits: a view whose last element lies 2^32 elements or
    // more from its first takes the warp kernels (a head stride of 2^31, say).
    let with_bias_strides = |strides: [isize; 3]| {
        let rpb = TensorRef {
            strides: strides.to_vec(),
            ..TensorRef::meta(&[3, 5, 5], DType::F16, Device::Cuda(0))
        };
        fused_indices_fit_32_bits(&biased_by(&[1, 10, 10, 3, 16], vec![3, 3], &rpb))
    };
    assert!(with_bias_strides([25, 5, 1]));
    // The last offset is 2 s0 + 4 5 + 4 1: 2^32 for s0 = 2^31 - 12, 2^32 - 2 for one less.
    assert!(!with_bias_strides([(1 << 31) - 12, 5, 1]));
    assert!(with_bias_strides([(1 << 31) - 13, 5, 1]));
}

#[test]
fn rows_are_dense_and_aligned_with_unit_channel_strides_and_16_byte_steps() {
    let laid_out = |data: usize, strides: Vec<isize>| TensorRef {
        data,
        strides,
        ..TensorRef::meta(&[2, 5, 3, 8], DType::BF16, Device::Cuda(0))
    };
    assert!(laid_out(0x1000, vec![120, 24, 8, 1]).rows_dense_and_aligned());
    // Heads-first buffers (DiNAT's permuted views) and a storage offset of whole rows.
    assert!(laid_out(0x1010, vec![120, 8, 40, 1]).rows_dense_and_aligned());
    // Every other channel, an address 8 bytes off, a token step of 4 elements (8 bytes).
    assert!(!laid_out(0x1000, vec![240, 48, 16, 2]).rows_dense_and_aligned());
    assert!(!laid_out(0x1008, vec![120, 24, 8, 1]).rows_dense_and_aligned());
    assert!(!laid_out(0x1000, vec![120, 4, 40, 1]).rows_dense_and_aligned());
    // Axes of one element take any stride; negative whole-row steps stay aligned.
    let single = TensorRef {
        strides: vec![3, 24, 8, 1],
        ..TensorRef::meta(&[1, 5, 3, 8], DType::BF16, Device::Cuda(0))
    };
    assert!(single.rows_dense_and_aligned());
    assert!(laid_out(0x1000, vec![120, -24, 8, 1]).rows_dense_and_aligned());
}

/// The fused tensor-core variants stage by 16-byte copies alone only where every row they stage
/// is dense and aligned: the query, key, value and additional tokens' rows, and for a backward
/// the output gradient's.
#[test]
fn tensor_core_variants_take_dense_rows_only_where_every_staged_row_is() {
    let q = TensorRef::meta(&[1, 10, 10, 2, 16], DType::F16, Device::Cuda(0));
    let sliced = TensorRef {
        shape: vec![1, 10, 10, 2, 16],
        strides: vec![6400, 640, 64, 32, 2],
        ..TensorRef::meta(&[1, 10, 10, 2, 32], DType::F16, Device::Cuda(0))
    };
    let extras = TensorRef::meta(&[1, 4, 2, 16], DType::F16, Device::Cuda(0));
    let shifted = TensorRef {
        data: 8,
        ..extras.clone()
    };
    let n = nbhd(vec![3, 3], vec![1, 1], vec![1, 1], vec![false, false]);
    let problem = |query: &TensorRef, key: &TensorRef, extra: Option<&TensorRef>| {
        let inputs = FusedInputs {
            query: Some(query),
            key: Some(key),
            value: Some(&q),
            additional_keys: extra,
            additional_values: extra,
            ..FusedInputs::default()
        };
        FusedProblem::new(&inputs, &n, 1.0).unwrap()
    };
    let dense = problem(&q, &q, Some(&extras));
    for source in [Source::FusedTc, Source::FusedBwdTc] {
        let key = KernelKey::for_fused(source, &dense);
        assert!(key.dense_rows && key.defines().contains(&"-DNA_DENSE_ROWS=1".to_string()));
        assert!(!key.name().contains("any rows"));
    }
    let others = [
        problem(&sliced, &q, None),
        problem(&q, &sliced, None),
        problem(&q, &q, Some(&shifted)),
        // An output gradient of zero strides (the gradient of a sum).
        dense.clone().with_output_gradient(&TensorRef {
            strides: vec![0; 5],
            ..q.clone()
        }),
    ];
    for p in &others {
        for source in [Source::FusedTc, Source::FusedBwdTc] {
            let key = KernelKey::for_fused(source, p);
            assert!(!key.dense_rows, "{}", key.name());
            assert!(key.defines().contains(&"-DNA_DENSE_ROWS=0".to_string()));
            assert!(key.name().contains(", any rows"));
        }
    }
    assert!(dense.clone().with_output_gradient(&q).rows_dense);
    // The warp kernels have one staging.
    let warp = KernelKey::for_fused(Source::FusedBwd, &dense);
    assert!(!warp.dense_rows && !warp.defines().iter().any(|d| d.contains("DENSE_ROWS")));
}

/// The unfused tensor-core variants stage by 16-byte copies alone where the rows they stage are
/// dense and aligned: the keys of `qk` (and of its backward's d_query), the values of `av` (and
/// of its backward's d_attn). The query-side rows, read straight into registers, do not count.
#[test]
fn unfused_tensor_core_variants_take_dense_rows_where_the_staged_rows_are() {
    let meta = |shape: &[usize]| TensorRef::meta(shape, DType::BF16, Device::Cuda(0));
    let tokens = meta(&[2, 3, 20, 12, 32]);
    // Every other channel of rows twice as wide.
    let sliced = TensorRef {
        strides: vec![46080, 15360, 768, 64, 2],
        ..tokens.clone()
    };
    let attn = meta(&[2, 3, 20, 12, 49]);
    let n = Neighborhood::unfused(vec![7, 7], vec![1; 2], vec![false; 2]);
    let qk = |query: &TensorRef, key: &TensorRef| Problem::for_qk(query, key, None, None, &n);
    let av = |value: &TensorRef| Problem::for_av(&attn, value, None, &n);
    let dense_rows = |p: crate::error::Result<Problem>| {
        let key = KernelKey::for_problem(Source::UnfusedTc, &p.unwrap());
        let flag = format!("-DNA_DENSE_ROWS={}", u8::from(key.dense_rows));
        assert!(key.defines().contains(&flag), "{}", key.name());
        assert_eq!(key.name().contains(", any rows"), !key.dense_rows);
        key.dense_rows
    };
    assert!(dense_rows(qk(&tokens, &tokens)));
    assert!(dense_rows(qk(&sliced, &tokens)));
    assert!(!dense_rows(qk(&tokens, &sliced)));
    assert!(dense_rows(av(&tokens)));
    assert!(!dense_rows(av(&sliced)));
    // The warp kernels have one staging.
    let warp = KernelKey::for_problem(Source::Qk, &qk(&tokens, &tokens).unwrap());
    assert!(!warp.dense_rows && !warp.defines().iter().any(|d| d.contains("DENSE_ROWS")));
}

/// The tensor-core variants of problems with a bias are compiled apart from those without, which
/// compile no bias path; precompile builds one or the other.
#[test]
fn tensor_core_variants_are_specialised_by_the_bias() {
    let with = biased(&[1, 10, 10, 3, 16], vec![3, 3], &[3, 5, 5]);
    let without = FusedProblem {
        rpb: false,
        ..with.clone()
    };
    for source in [Source::FusedTc, Source::FusedBwdTc] {
        let (on, off) = (
            KernelKey::for_fused(source, &with),
            KernelKey::for_fused(source, &without),
        );
        assert!(on.biased && on.defines().contains(&"-DNA_BIASED=1".to_string()));
        assert!(!off.biased && off.defines().contains(&"-DNA_BIASED=0".to_string()));
        assert!(on.name().contains(", rpb") && !off.name().contains("rpb"));
    }
    // Only a biased backward sums the bias's gradient on tensor cores.
    assert!(KernelKey::for_fused(Source::FusedBwdTc, &with).bias_grads_on_tensor_cores());
    assert!(!KernelKey::for_fused(Source::FusedBwdTc, &without).bias_grads_on_tensor_cores());
    // The warp kernels take a bias at run time.
    let warp = KernelKey::for_fused(Source::FusedBwd, &with);
    assert!(!warp.biased && !warp.defines().iter().any(|d| d.contains("NA_BIASED")));
    // The unfused window products: the bias of `attn = q . k^T`.
    let meta = |shape: &[usize]| TensorRef::meta(shape, DType::BF16, Device::Cuda(0));
    let q = meta(&[2, 3, 20, 12, 32]);
    let n = Neighborhood::unfused(vec![7, 7], vec![1; 2], vec![false; 2]);
    let rpb = meta(&[3, 13, 13]);
    let qk = |rpb| Problem::for_qk(&q, &q, rpb, None, &n).unwrap();
    assert!(KernelKey::for_problem(Source::UnfusedTc, &qk(Some(&rpb))).biased);
    assert!(!KernelKey::for_problem(Source::UnfusedTc, &qk(None)).biased);
    assert!(!KernelKey::for_problem(Source::Qk, &qk(Some(&rpb))).biased);
    let shapes = [([1, 7, 7], [false; 3])];
    for rpb in [false, true] {
        let sm_80 = crate::cuda::Arch::parse("sm_80").unwrap();
        let keys = crate::cuda::variants(&[DType::BF16], &shapes, &[(32, 32)], rpb, sm_80).unwrap();
        let fused: Vec<bool> = keys
            .iter()
            .filter(|k| matches!(k.source, Source::FusedTc | Source::FusedBwdTc))
            .map(|k| k.biased)
            .collect();
        assert_eq!(fused, [rpb; 2], "{keys:?}");
        // The window products (qk) take the bias, the weighted sums (av) never.
        let unfused: Vec<bool> = keys
            .iter()
            .filter(|k| k.source == Source::UnfusedTc)
            .map(|k| k.biased)
            .collect();
        assert_eq!(unfused, if rpb { vec![true, false] } else { vec![false] });
    }
}
