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
            Backend::Flex => Ok(Device::flex()),
            #[cfg(feature = "wgpu")]
            Backend::Wgpu => Ok(Device::wgpu(Default::default())),
            #[cfg(not(feature = "wgpu"))]
            Backend::Wgpu => anyhow::bail!(
                "this binary was built without wgpu support; rebuild with `cargo build --release --features wgpu`"
            ),
        }
    }
}
