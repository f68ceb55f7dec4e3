//! The subcommands of `tracer`, each a way of running the same pipeline.
pub mod agent;
pub mod explain;
pub(crate) mod handover;
pub mod prepare;
pub mod top;
