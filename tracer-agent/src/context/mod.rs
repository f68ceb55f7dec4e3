//! The node's context as the flags give it: the part `agent` and `explain` share before the
//! sources that answer later (netlink, IMDS, DNS) fill in the rest.
pub mod cidr;
pub mod endpoint;
pub mod imds;
pub mod kubernetes;
use crate::{
    classify::{Contradiction, NodeContext},
    cli::ContextArgs,
    datapath::discovery::InterfacePatterns,
};

/// The context the flags state, or what in them cannot all be true.
pub fn from_flags(args: &ContextArgs) -> Result<NodeContext, Vec<Contradiction>> {
    let context = NodeContext {
        vpc_cidrs: args.vpc_cidrs.clone(),
        service_cidrs: args.service_cidrs.clone(),
        apiserver_ips: args.apiserver_ips.iter().copied().collect(),
        controlplane_ips: args.controlplane_ips.iter().copied().collect(),
        cluster_dns: args.cluster_dns,
        ..NodeContext::default()
    };
    let contradictions = context.contradictions();
    if contradictions.is_empty() {
        Ok(context)
    } else {
        Err(contradictions)
    }
}

/// One line per contradiction, for a configuration error.
pub fn describe(contradictions: &[Contradiction]) -> String {
    contradictions
        .iter()
        .map(Contradiction::to_string)
        .collect::<Vec<_>>()
        .join("; ")
}

pub fn interface_patterns(args: &ContextArgs) -> InterfacePatterns {
    InterfacePatterns {
        pod: args.pod_ifaces.clone(),
        node: args.node_ifaces.clone(),
    }
}
