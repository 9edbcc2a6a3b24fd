//! Training: optimisers, schedules, and (next) recipes, the loop and run directories.

pub mod checkpoint;
pub mod fit;
pub mod optim;
pub mod precision;
pub mod recipe;
pub mod run;
pub mod schedule;
