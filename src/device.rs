//! Backend selection. Always explicit: with Flex and a GPU backend compiled in, Burn's
//! `Device::default()` would silently pick the GPU one.

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
    /// NVIDIA GPU through CUDA (build with `--features cuda`); the first GPU.
    Cuda,
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
            #[cfg(feature = "cuda")]
            Backend::Cuda => {
                cuda_driver_present()?;
                Ok(Device::cuda(0))
            }
            #[cfg(not(feature = "cuda"))]
            Backend::Cuda => anyhow::bail!(
                "this binary was built without CUDA support; rebuild with `cargo build --release --features cuda`"
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

/// Fails with a plain message where no NVIDIA driver is installed. Burn's CUDA device is lazy and
/// cudarc loads `libcuda` on the first kernel, where a missing driver is a panic deep in a
/// worker; asking the dynamic loader first turns the common case into an error at `--device`.
#[cfg(feature = "cuda")]
fn cuda_driver_present() -> anyhow::Result<()> {
    #[cfg(target_os = "linux")]
    {
        // SAFETY: dlopen/dlclose on a constant NUL-terminated name; the handle is closed at once
        // and no symbol from it is used. libcuda's initialisers only register the library.
        let handle = unsafe { libc::dlopen(c"libcuda.so.1".as_ptr(), libc::RTLD_LAZY) };
        if handle.is_null() {
            anyhow::bail!(
                "--device cuda: the NVIDIA driver library libcuda.so.1 is not installed on this \
                 machine (no NVIDIA GPU driver); use --device flex"
            );
        }
        // SAFETY: `handle` came from the successful dlopen above.
        unsafe { libc::dlclose(handle) };
    }
    Ok(())
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

#[cfg(test)]
mod tests {
    use super::*;

    /// `--device cuda` and a recipe's `device = "cuda"` name the same backend.
    #[test]
    fn cuda_is_named_the_same_on_the_cli_and_in_recipes() {
        use clap::ValueEnum;
        assert_eq!(Backend::from_str("cuda", false), Ok(Backend::Cuda));
        #[derive(serde::Deserialize)]
        struct R {
            device: Backend,
        }
        let r: R = toml::from_str("device = \"cuda\"").unwrap();
        assert_eq!(r.device, Backend::Cuda);
    }

    #[cfg(not(feature = "cuda"))]
    #[test]
    fn cuda_without_the_feature_says_how_to_rebuild() {
        let e = Backend::Cuda.device().unwrap_err().to_string();
        assert!(e.contains("--features cuda"), "{e}");
    }

    /// Where no NVIDIA driver is installed (this project's machines and CI), `--device cuda` is
    /// an error at once rather than a panic on the first kernel.
    #[cfg(feature = "cuda")]
    #[test]
    fn cuda_without_a_driver_is_an_error() {
        // SAFETY: as in `cuda_driver_present`.
        let present = unsafe {
            let h = libc::dlopen(c"libcuda.so.1".as_ptr(), libc::RTLD_LAZY);
            if !h.is_null() {
                libc::dlclose(h);
            }
            !h.is_null()
        };
        if present {
            eprintln!("SKIPPED: libcuda.so.1 is installed here; nothing to check");
            return;
        }
        let e = Backend::Cuda.device().unwrap_err().to_string();
        assert!(e.contains("libcuda.so.1"), "{e}");
    }
}
