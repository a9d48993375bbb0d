//! natten_rs: neighborhood attention kernels with a Python front.
//!
//! The core (window math, validation, kernels) knows nothing of Python; `bindings` (feature
//! `python`) is the only module that does.

#[cfg(feature = "python")]
mod bindings;
pub mod cpu;
pub mod cuda;
pub mod dlpack;
pub mod error;
pub mod layout;
pub mod problem;
pub mod window;
