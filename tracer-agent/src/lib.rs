//! The tracer agent. Data flows one way: the kernel's flow table (`datapath`) is read every
//! poll, joined with conntrack's NAT facts and the node's context (`discovery`, `imds`),
//! classified (`classify`), summed per path (`aggregate`) into a `snapshot` by the
//! `pipeline`, and served (`server`: Prometheus text by `export`, the JSON `api`).
pub mod agent;
pub mod aggregate;
pub mod api;
pub mod cidr;
pub mod classify;
pub mod cli;
pub mod config;
pub mod conntrack;
pub mod context;
pub mod datapath;
pub mod discovery;
pub mod endpoint;
pub mod explain;
pub mod export;
pub mod imds;
pub mod kubernetes;
pub mod netlink;
pub mod pipeline;
pub mod prepare;
pub mod privileges;
pub mod process;
pub mod readiness;
pub mod restart;
pub mod server;
pub mod snapshot;
pub mod top;
