//! mpcformer: MPC-friendly Transformers in Rust.
//!
//! BERT and RoBERTa with MPCFormer's approximations (Quad GeLU, 2Quad / 2ReLU attention) as
//! configuration of one encoder, Hugging Face checkpoint and tokenizer loading, and the tools
//! around them (inspection, benchmarks).

pub mod bench;
pub mod data;
pub mod device;
pub mod distill;
pub mod error;
pub mod eval;
pub mod export;
pub mod hub;
pub mod io;
pub mod loss;
pub mod metric;
pub mod model;
pub mod mpc;
pub mod report;
pub mod tokenize;
pub mod train;

pub use error::LoadError;
