//! Developer automation for the tracer, as a library so that integration tests share it. The
//! lab, and what drives it, is the `tracer_lab` crate.
pub mod bench;
pub mod demo;
pub mod setup;
pub mod test;
