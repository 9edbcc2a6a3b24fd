//! Backend selection. Always explicit: with both Flex and wgpu compiled in, Burn's
//! `Device::default()` would silently pick wgpu.

use burn::prelude::*;

#[derive(
    Clone,
    Copy,
    Debug,
    Default,
    PartialEq,
    Eq,
    clap::ValueEnum,
    serde::Serialize,
    serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    /// Burn's pure-Rust CPU backend (default).
    #[default]
    Flex,
    /// GPU through wgpu (build with `--features wgpu`).
    Wgpu,
}

impl Backend {
    pub fn device(self) -> anyhow::Result<Device> {
        match self {
            Backend::Flex => {
                keep_freed_memory();
                Ok(Device::flex())
            }
            #[cfg(feature = "wgpu")]
            Backend::Wgpu => Ok(Device::wgpu(Default::default())),
            #[cfg(not(feature = "wgpu"))]
            Backend::Wgpu => anyhow::bail!(
                "this binary was built without wgpu support; rebuild with `cargo build --release --features wgpu`"
            ),
        }
    }
}

/// How far batches are padded on `device`, as a multiple of positions, when the recipe or
/// command does not say: Flex runs any shape at no extra cost, so to the longest example (1);
/// GPU backends compile (and autotune) kernels for every new shape, which on wgpu costs seconds
/// per shape, so to the maximum length: one shape per batch size.
pub fn default_pad_multiple(device: &Device, max_len: usize) -> usize {
    if device.clone().inner() == Device::flex() {
        1
    } else {
        max_len
    }
}

/// Makes glibc's malloc keep and reuse freed blocks instead of returning them to the kernel.
///
/// Flex allocates a fresh buffer for almost every op's output (a MiniLM layer's activations are
/// 3–13 MB each). Above glibc's default 128 KiB mmap threshold each of those is a new `mmap`, so
/// every op pays page faults and the kernel zeroing the pages, and `free` unmaps them again: a
/// third of an inference step here (BENCHMARKS.md, "allocator"). Serving them from the heap and
/// never trimming it makes the buffers recycle. glibc caps the threshold at 32 MiB on 64-bit.
pub fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        static ONCE: std::sync::Once = std::sync::Once::new();
        ONCE.call_once(|| {
            // SAFETY: mallopt only changes allocator tunables; it is called once, before the
            // backend allocates, and glibc ignores values it does not accept (returns 0).
            unsafe {
                libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
                libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
                libc::mallopt(libc::M_TOP_PAD, 256 << 20);
            }
        });
    }
}
