//! The EKS-node lab and what drives it (the agent in the node, pod churn, Prometheus, tmux),
//! with what its tests check the agent against (the manifests, the dashboards). A library of
//! its own so that xtask's `lab`, `demo` and `bench` and the lab tests share it.
pub mod agent;
pub mod build;
pub mod churn;
pub mod dashboards;
pub mod deploy;
pub mod figures;
pub mod hostile;
pub mod lab;
pub mod prometheus;
pub mod run;
pub mod scrape;
pub mod testing;
pub mod tmux;
