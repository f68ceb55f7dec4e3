//! Why the agent is not ready: a bounded reason for metrics and alerts, and the sentence that
//! tells an operator what to do, for `/readyz`, the JSON API and the log.

/// What keeps the agent from being ready, as a bounded label value: every reason is exported,
/// 0 or 1, so that an alert can name it and a dashboard can show it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Reason {
    Starting,
    Interfaces,
    VpcCidr,
    ApiServer,
    Contradiction,
    Conntrack,
    FlowTable,
    Kubernetes,
    StateFile,
}

impl Reason {
    pub const ALL: [Reason; 9] = [
        Reason::Starting,
        Reason::Interfaces,
        Reason::VpcCidr,
        Reason::ApiServer,
        Reason::Contradiction,
        Reason::Conntrack,
        Reason::FlowTable,
        Reason::Kubernetes,
        Reason::StateFile,
    ];

    pub const fn as_str(self) -> &'static str {
        match self {
            Reason::Starting => "starting",
            Reason::Interfaces => "interfaces",
            Reason::VpcCidr => "vpc_cidr",
            Reason::ApiServer => "apiserver_endpoint",
            Reason::Contradiction => "contradiction",
            Reason::Conntrack => "conntrack",
            Reason::FlowTable => "flow_table",
            Reason::Kubernetes => "kubernetes",
            Reason::StateFile => "state_file",
        }
    }
}

/// A reason the agent is not ready, with the sentence that tells an operator what to do.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Problem {
    pub reason: Reason,
    pub message: String,
}
