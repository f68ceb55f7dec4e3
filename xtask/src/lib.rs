//! Developer automation for the tracer, as a library so that integration tests share it.
pub mod agent;
pub mod bench;
pub mod build;
pub mod churn;
pub mod dashboards;
pub mod demo;
pub mod deploy;
pub mod figures;
pub mod lab;
pub mod prometheus;
pub mod run;
pub mod scrape;
pub mod setup;
pub mod test;
pub mod testing;
pub mod tmux;
