use super::*;

const F32: DType = DType::F32;

fn t(shape: &[usize]) -> TensorRef {
    TensorRef::meta(shape, F32, Device::Cpu)
}

fn nbhd(kernel: &[i64], dilation: &[i64], causal: &[bool]) -> Neighborhood {
    Neighborhood {
        kernel: kernel.to_vec(),
        dilation: dilation.to_vec(),
        causal: causal.to_vec(),
        ..Default::default()
    }
}

fn arg_of(e: Error) -> &'static str {
    match e {
        Error::Invalid { arg, .. } => arg,
        other => panic!("expected Error::Invalid, got {other:?}"),
    }
}

fn qk_err(q: &[usize], k: &[usize], n: &Neighborhood) -> &'static str {
    arg_of(Problem::for_qk(&t(q), &t(k), None, None, n).unwrap_err())
}

#[test]
fn valid_2d_problem_is_padded_to_rank_3() {
    let p = Problem::for_qk(
        &t(&[2, 3, 9, 10, 8]),
        &t(&[2, 3, 9, 10, 8]),
        None,
        None,
        &nbhd(&[3, 5], &[2, 1], &[true, false]),
    )
    .unwrap();
    assert_eq!(p.rank, 2);
    assert_eq!(p.axes[0], Axis::UNIT);
    assert_eq!(
        p.axes[1],
        Axis {
            length: 9,
            kernel: 3,
            stride: 1,
            dilation: 2,
            causal: true
        }
    );
    assert_eq!(
        p.axes[2],
        Axis {
            length: 10,
            kernel: 5,
            stride: 1,
            dilation: 1,
            causal: false
        }
    );
    assert_eq!((p.batch, p.heads, p.dim, p.slots()), (2, 3, 8, 15));
    assert_eq!(p.attn_shape(), vec![2, 3, 9, 10, 15]);
    assert_eq!(p.rpb_shape(), vec![3, 5, 9]);
}

#[test]
fn kernel_rules() {
    let shape = [1, 1, 16, 4];
    for bad in [[1], [2], [4], [0], [-3]] {
        assert_eq!(
            qk_err(&shape, &shape, &nbhd(&bad, &[1], &[false])),
            "kernel_size"
        );
    }
    assert_eq!(
        qk_err(&shape, &shape, &nbhd(&[17], &[1], &[false])),
        "kernel_size",
        "k > L"
    );
    assert_eq!(
        qk_err(&shape, &shape, &nbhd(&[5], &[4], &[false])),
        "kernel_size",
        "k*d > L"
    );
    assert!(Problem::for_qk(
        &t(&shape),
        &t(&shape),
        None,
        None,
        &nbhd(&[5], &[3], &[false])
    )
    .is_ok());
    assert_eq!(
        qk_err(&shape, &shape, &nbhd(&[], &[], &[])),
        "kernel_size",
        "rank 0"
    );
    let r4 = [1, 1, 5, 5, 5, 5, 4];
    assert_eq!(
        qk_err(&r4, &r4, &nbhd(&[3; 4], &[1; 4], &[false; 4])),
        "kernel_size",
        "rank 4"
    );
}

#[test]
fn dilation_and_causal_rules() {
    let shape = [1, 1, 16, 4];
    assert_eq!(
        qk_err(&shape, &shape, &nbhd(&[3], &[0], &[false])),
        "dilation"
    );
    assert_eq!(
        qk_err(&shape, &shape, &nbhd(&[3], &[1, 1], &[false])),
        "dilation"
    );
    assert_eq!(
        qk_err(&shape, &shape, &nbhd(&[3], &[1], &[false, true])),
        "is_causal"
    );
}

#[test]
fn tensor_shape_rules() {
    let n = nbhd(&[3, 3], &[1, 1], &[false, false]);
    assert_eq!(
        qk_err(&[1, 1, 8, 4], &[1, 1, 8, 4], &n),
        "query",
        "rank mismatch"
    );
    assert_eq!(qk_err(&[1, 1, 8, 8, 4], &[1, 1, 8, 9, 4], &n), "key");
    assert_eq!(qk_err(&[1, 1, 8, 8, 4], &[1, 2, 8, 8, 4], &n), "key");
    let (q, k) = (t(&[2, 2, 8, 8, 4]), t(&[2, 2, 8, 8, 4]));
    let qk = |rpb: Option<&TensorRef>, extra: Option<&TensorRef>| {
        Problem::for_qk(&q, &k, rpb, extra, &n)
    };
    assert!(qk(Some(&t(&[2, 5, 5])), None).is_ok());
    for bad_rpb in [t(&[2, 5, 7]), t(&[1, 5, 5]), t(&[2, 5]), t(&[2, 3, 3])] {
        assert_eq!(
            arg_of(qk(Some(&bad_rpb), None).unwrap_err()),
            "rpb",
            "{:?}",
            bad_rpb.shape
        );
    }
    assert_eq!(qk(None, Some(&t(&[2, 2, 3, 4]))).unwrap().extra, 3);
    for bad in [
        t(&[2, 2, 3, 5]),
        t(&[1, 2, 3, 4]),
        t(&[2, 2, 3]),
        t(&[2, 1, 3, 4]),
    ] {
        assert_eq!(
            arg_of(qk(None, Some(&bad)).unwrap_err()),
            "additional_keys",
            "{:?}",
            bad.shape
        );
    }
}

#[test]
fn attn_must_match_kernel_and_extra_tokens() {
    let n = nbhd(&[3], &[1], &[false]);
    let v = t(&[1, 2, 8, 4]);
    assert!(Problem::for_av(&t(&[1, 2, 8, 3]), &v, None, &n).is_ok());
    assert!(Problem::for_av(&t(&[1, 2, 8, 5]), &v, Some(&t(&[1, 2, 2, 4])), &n).is_ok());
    assert_eq!(
        arg_of(Problem::for_av(&t(&[1, 2, 8, 4]), &v, None, &n).unwrap_err()),
        "attn"
    );
    assert_eq!(
        arg_of(Problem::for_av(&t(&[1, 2, 8, 3]), &v, Some(&t(&[1, 2, 2, 4])), &n).unwrap_err()),
        "attn"
    );
}

#[test]
fn dtype_and_device_rules() {
    let n = nbhd(&[3], &[1], &[false]);
    let q = t(&[1, 1, 8, 4]);
    let k64 = TensorRef::meta(&[1, 1, 8, 4], DType::F64, Device::Cpu);
    assert_eq!(
        arg_of(Problem::for_qk(&q, &k64, None, None, &n).unwrap_err()),
        "key"
    );
    let k_gpu = TensorRef::meta(&[1, 1, 8, 4], F32, Device::Cuda(0));
    assert_eq!(
        arg_of(Problem::for_qk(&q, &k_gpu, None, None, &n).unwrap_err()),
        "key"
    );
    let mut q_int = q.clone();
    q_int.dtype.code = 0;
    assert_eq!(
        arg_of(Problem::for_qk(&q_int, &q, None, None, &n).unwrap_err()),
        "query"
    );
}

#[test]
fn output_rules() {
    let n = nbhd(&[3], &[1], &[false]);
    let q = TensorRef {
        data: 4096,
        ..t(&[1, 1, 8, 4])
    };
    let p = Problem::for_qk(&q, &q, None, None, &n).unwrap();
    let out = TensorRef {
        data: 1 << 20,
        ..t(&[1, 1, 8, 3])
    };
    assert!(p
        .expect_output("attn", &out, &p.attn_shape(), &[&q])
        .is_ok());
    let wrong_shape = TensorRef {
        data: 1 << 20,
        ..t(&[1, 1, 8, 4])
    };
    assert_eq!(
        arg_of(
            p.expect_output("attn", &wrong_shape, &p.attn_shape(), &[&q])
                .unwrap_err()
        ),
        "attn"
    );
    let strided = TensorRef {
        strides: vec![24, 24, 1, 8],
        ..out.clone()
    };
    assert_eq!(
        arg_of(
            p.expect_output("attn", &strided, &p.attn_shape(), &[&q])
                .unwrap_err()
        ),
        "attn"
    );
    let aliased = TensorRef {
        data: 4096 + 16,
        ..out.clone()
    };
    assert_eq!(
        arg_of(
            p.expect_output("attn", &aliased, &p.attn_shape(), &[&q])
                .unwrap_err()
        ),
        "attn"
    );
    let read_only = TensorRef {
        read_only: true,
        ..out
    };
    assert_eq!(
        arg_of(
            p.expect_output("attn", &read_only, &p.attn_shape(), &[&q])
                .unwrap_err()
        ),
        "attn"
    );
}

#[test]
fn kernel_shapes_for_precompiling_follow_the_unfused_rules() {
    let shape = Problem::kernel_shape(vec![3, 7], vec![true, false]).unwrap();
    assert_eq!(shape, ([1, 3, 7], [false, true, false]));
    let err = |kernel: Vec<i64>, causal: Vec<bool>| {
        arg_of(Problem::kernel_shape(kernel, causal).unwrap_err())
    };
    assert_eq!(err(vec![4], vec![false]), "kernel_size");
    assert_eq!(err(vec![1], vec![false]), "kernel_size");
    assert_eq!(err(vec![-3], vec![false]), "kernel_size");
    assert_eq!(err(vec![3, 3, 3, 3], vec![false; 4]), "kernel_size");
    assert_eq!(err(vec![3, 3], vec![false]), "is_causal");
}
