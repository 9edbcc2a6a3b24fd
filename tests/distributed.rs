//! What Burn 0.22's `burn::tensor::distributed` does on the backends this crate builds. Neither
//! can reduce gradients across devices, which is why training runs on one device
//! (docs/src/gpu.md, "More than one device"). These tests pin the failures down so that a Burn
//! upgrade that lifts them shows up here: each one is the smallest program that hits its limit.

use burn::module::ParamId;
use burn::prelude::*;
use burn::tensor::distributed::{
    DistributedConfig, DistributedContext, ReduceOperation, all_reduce,
};

fn mean() -> DistributedConfig {
    DistributedConfig {
        all_reduce_op: ReduceOperation::Mean,
    }
}

/// Flex is not in the dispatch's list of collective-capable backends
/// (burn-backend-extension 0.22.1 src/catalog.rs: `distributed: false`), so starting the
/// gradient-sync server on Flex devices panics in burn-dispatch's device match.
#[test]
#[should_panic(expected = "Distributed operations are not supported for device")]
fn a_distributed_context_refuses_flex_devices() {
    let d = Device::flex().autodiff();
    let _ctx = DistributedContext::init(vec![d.clone(), d], mean());
}

/// Marking a parameter for gradient sync (what burn-train's DDP does to every parameter) panics
/// on Flex, although `Tensor::set_distributed` documents that it "does nothing when autodiff or
/// distributed is not enabled".
#[test]
#[should_panic(expected = "Distributed operations are not supported for tensor kind")]
fn marking_a_flex_parameter_distributed_panics() {
    let d = Device::flex().autodiff();
    let p = Tensor::<1>::ones([4], &d).require_grad();
    let _ = p.set_distributed(ParamId::new());
}

/// The explicit collective panics on Flex too.
#[test]
#[should_panic(expected = "Distributed operations are not supported for tensor kind")]
fn all_reduce_refuses_a_flex_tensor() {
    let d = Device::flex();
    let _ = all_reduce(Tensor::<1>::ones([4], &d), ReduceOperation::Mean, vec![d]);
}

/// wgpu is a CubeCL runtime, which the dispatch lets through, but CubeCL implements collectives
/// on CUDA (NCCL) only. The refusal (cubecl-runtime 0.11.3 src/client.rs:956) happens on the
/// device's worker thread, which catches it: `all_reduce(..).resolve()` returns, and the error
/// comes out of the first read of the result. Needs a Vulkan driver (lavapipe will do):
/// `cargo test --release --features wgpu --test distributed`.
#[cfg(feature = "wgpu")]
#[test]
fn all_reduce_on_wgpu_fails_at_the_first_read() {
    let d = Device::wgpu(Default::default());
    let r = all_reduce(Tensor::<1>::ones([4], &d), ReduceOperation::Mean, vec![d]).resolve();
    let err = format!("{:?}", r.try_into_data().unwrap_err());
    assert!(
        err.contains("has no transport between its devices"),
        "{err}"
    );
}

/// The DDP path itself on wgpu, reduced to one device and one parameter: `backward()` hands the
/// gradient to the sync server, whose all-reduce is refused as above; `backward()` returns
/// normally and the gradient cannot be read.
#[cfg(feature = "wgpu")]
#[test]
fn ddp_backward_on_wgpu_leaves_an_unreadable_gradient() {
    let d = Device::wgpu(Default::default()).autodiff();
    let _ctx = DistributedContext::init(vec![d.clone()], mean());
    let p = Tensor::<1>::ones([4], &d)
        .require_grad()
        .set_distributed(ParamId::new());
    let grads = (p.clone() * 2.0).sum().backward();
    let g = p.grad(&grads).expect("a gradient is registered");
    let err = format!("{:?}", g.try_into_data().unwrap_err());
    assert!(
        err.contains("has no transport between its devices"),
        "{err}"
    );
}
