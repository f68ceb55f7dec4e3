//! The tracer agent. Data flows one way, and the folders follow it:
//!
//! - [`datapath`]: the kernel programs, attaching them to interfaces (found over netlink),
//!   reading the flow table;
//! - [`context`]: what the node knows about itself and its cluster (flags, IMDS, the cluster
//!   endpoint's DNS answer, the Kubernetes API);
//! - [`classify`]: a connection and the context in, its path out — a pure function;
//! - [`aggregate`]: per-connection counters, joined with conntrack's NAT facts, summed per path;
//! - [`pipeline`]: one poll through all of the above, ending in a `Snapshot`;
//! - [`serve`]: the snapshot as Prometheus text and the JSON API;
//! - [`cmd`]: the subcommands (`agent`, `top`, `explain`, `prepare`), parsed by [`cli`].
pub mod aggregate;
pub mod classify;
pub mod cli;
pub mod cmd;
pub mod context;
pub mod datapath;
pub mod error;
pub mod logging;
pub mod pipeline;
pub mod serve;
