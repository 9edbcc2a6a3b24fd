//! A stand-in for `cubecl-llvm` 0.11.3 without LLVM: see README.md. `cubecl-cuda`, built with
//! its `cpp` feature (mpcformer's `cuda` feature does that), compiles kernels to CUDA C++ with
//! NVRTC and only names these items; the LLVM compiler itself is not here.

use cubecl_core::CompilationError;
use cubecl_core::environment::backtrace::BackTrace;
use cubecl_core::ir::attributes::BufferIOAttr;
use cubecl_core::ir::nvidia::SmArch;
use cubecl_core::prelude::KernelDefinition;

const NOT_BUILT: &str = "cubecl's LLVM backend is not built into this binary (mpcformer replaces \
     cubecl-llvm with a stand-in, third_party/cubecl-llvm): build cubecl-cuda with its `cpp` \
     feature, as mpcformer's `cuda` feature does, so that kernels go through NVRTC";

pub mod nvptx {
    pub mod ptx_version {
        //! The PTX ISA version emitted for the installed driver (verbatim from cubecl-llvm
        //! 0.11.3, MIT OR Apache-2.0).

        use core::fmt;
        use std::ffi::CString;

        /// A PTX ISA version, as the NVPTX target feature spells it: 8.7 is `87`.
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        pub struct PtxVersion(u32);

        impl PtxVersion {
            /// The newest version a driver of CUDA `driver` loads, as `cuDriverGetVersion`
            /// reports it (12.8 is `12080`). `None` below CUDA 10.0.
            pub fn for_driver(driver: i32) -> Option<Self> {
                DRIVER_PTX
                    .iter()
                    .find(|(first_driver, _)| driver >= *first_driver)
                    .map(|(_, ptx)| Self(*ptx))
            }

            /// The NVPTX target feature that selects this version.
            pub fn target_feature(self) -> CString {
                CString::new(format!("+{self}")).expect("the feature has no NUL")
            }
        }

        impl fmt::Display for PtxVersion {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "ptx{}", self.0)
            }
        }

        /// The first CUDA release to load each PTX version, newest first.
        const DRIVER_PTX: &[(i32, u32)] = &[
            (13030, 93),
            (13020, 92),
            (13010, 91),
            (13000, 90),
            (12090, 88),
            (12080, 87),
            (12050, 85),
            (12040, 84),
            (12030, 83),
            (12020, 82),
            (12010, 81),
            (12000, 80),
            (11080, 78),
            (11070, 77),
            (11060, 76),
            (11050, 75),
            (11040, 74),
            (11030, 73),
            (11020, 72),
            (11010, 71),
            (11000, 70),
            (10020, 65),
            (10010, 64),
            (10000, 63),
        ];

        #[cfg(test)]
        mod tests {
            use super::*;

            #[test]
            fn a_driver_gets_the_newest_version_it_loads() {
                assert_eq!(PtxVersion::for_driver(12080), Some(PtxVersion(87)));
                assert_eq!(PtxVersion::for_driver(12060), Some(PtxVersion(85)));
                assert_eq!(PtxVersion::for_driver(13050), Some(PtxVersion(93)));
                assert_eq!(PtxVersion::for_driver(8000), None);
            }
        }
    }
}

pub mod shared {
    pub mod lowered_features {
        use cubecl_core::ir::DeviceProperties;

        /// The GPU target a device's features would be narrowed for.
        #[derive(Clone, Copy, Debug, PartialEq, Eq)]
        pub enum GpuTarget {
            Nvptx,
        }

        /// Upstream narrows `props` to what the LLVM backend lowers. `cubecl-cuda` calls it only
        /// when that backend is its default; with `cpp` it never is, so reaching this is a
        /// build-configuration error, reported as such rather than left to fail per kernel.
        pub fn restrict_features(_props: &mut DeviceProperties, _target: GpuTarget) {
            panic!("{}", super::super::NOT_BUILT);
        }
    }
}

/// LLVM compilation targets (upstream's names; only the GPU one `cubecl-cuda` picks matters).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum LlvmTarget {
    #[default]
    Cpu,
    Nvptx,
}

/// Options `cubecl-cuda` fills in for the LLVM backend; kept only so its code compiles.
#[derive(Clone, Debug, Default)]
pub struct PlironOptions {
    /// AMDGPU architecture upstream; no AMD target exists in this stand-in.
    pub arch: Option<core::convert::Infallible>,
    pub sm_arch: Option<SmArch>,
    pub ptx_version: Option<nvptx::ptx_version::PtxVersion>,
    pub grid_constants: bool,
}

/// Compiled PTX module (upstream's fields, which `cubecl-cuda` reads when loading one).
#[derive(Clone, Debug)]
pub struct NvptxModule {
    pub ptx: Vec<core::ffi::c_char>,
    pub entrypoint: String,
    pub ir: String,
    pub shared_memory_size: usize,
    pub io: Vec<BufferIOAttr>,
}

/// Compiled kernel artifact.
#[derive(Clone, Debug)]
pub enum PlironArtifact {
    NvptxCode(NvptxModule),
}

/// The LLVM kernel compiler's handle. Compiling with it is an error: see [`NOT_BUILT`].
#[derive(Clone, Debug, Default)]
pub struct PlironCompiler {
    pub target: LlvmTarget,
}

impl PlironCompiler {
    pub fn compile(
        &mut self,
        _kernel: KernelDefinition,
        _options: &PlironOptions,
    ) -> Result<PlironArtifact, CompilationError> {
        Err(CompilationError::Generic {
            reason: NOT_BUILT.to_string(),
            backtrace: BackTrace::capture(),
        })
    }

    pub fn lang_tag(&self) -> &'static str {
        match self.target {
            LlvmTarget::Cpu => "mlir",
            LlvmTarget::Nvptx => "llvm",
        }
    }
}
