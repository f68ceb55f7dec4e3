//! Why the agent is not ready: a bounded reason for metrics and alerts, and the sentence that
//! tells an operator what to do, for `/readyz`, the JSON API and the log.
use std::{collections::BTreeSet, fmt};

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
    pub const ALL: [Self; 9] = [
        Self::Starting,
        Self::Interfaces,
        Self::VpcCidr,
        Self::ApiServer,
        Self::Contradiction,
        Self::Conntrack,
        Self::FlowTable,
        Self::Kubernetes,
        Self::StateFile,
    ];

    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Starting => "starting",
            Self::Interfaces => "interfaces",
            Self::VpcCidr => "vpc_cidr",
            Self::ApiServer => "apiserver_endpoint",
            Self::Contradiction => "contradiction",
            Self::Conntrack => "conntrack",
            Self::FlowTable => "flow_table",
            Self::Kubernetes => "kubernetes",
            Self::StateFile => "state_file",
        }
    }
}

/// A reason the agent is not ready, with the sentence that tells an operator what to do.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Problem {
    pub reason: Reason,
    pub message: String,
}

/// `reason: message`: the sentence, led by the label value an alert names.
impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.reason.as_str(), self.message)
    }
}

/// How the problems changed from one poll to the next, as the log tells it.
#[derive(Debug, PartialEq, Eq)]
pub enum Change<'a> {
    /// A new problem, or a new cause of one that lasts (a new message for the same reason).
    Appeared(&'a Problem),
    Resolved(&'a Problem),
}

/// What changed from `before` to `after`, so that a problem is logged when it appears and when
/// its cause changes, and once when it is resolved, never every poll. A problem that went away
/// while another with the same reason appeared is not resolved: the reason lasts, its cause
/// changed.
pub fn changes<'a>(before: &'a BTreeSet<Problem>, after: &'a BTreeSet<Problem>) -> Vec<Change<'a>> {
    let appeared: Vec<&Problem> = after.difference(before).collect();
    let resolved = before
        .difference(after)
        .filter(|gone| appeared.iter().all(|new| new.reason != gone.reason));
    appeared
        .iter()
        .copied()
        .map(Change::Appeared)
        .chain(resolved.map(Change::Resolved))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn problems(list: &[(Reason, &str)]) -> BTreeSet<Problem> {
        list.iter()
            .map(|(reason, message)| Problem {
                reason: *reason,
                message: (*message).to_owned(),
            })
            .collect()
    }

    /// The changes as log lines, for comparison.
    fn logged(before: &[(Reason, &str)], after: &[(Reason, &str)]) -> Vec<String> {
        let (before, after) = (problems(before), problems(after));
        changes(&before, &after)
            .into_iter()
            .map(|change| match change {
                Change::Appeared(problem) => format!("{problem}"),
                Change::Resolved(problem) => format!("resolved: {problem}"),
            })
            .collect()
    }

    #[test]
    fn problems_lead_with_their_reason() {
        let problem = Problem {
            reason: Reason::VpcCidr,
            message: "IMDS is down".to_owned(),
        };
        assert_eq!(problem.to_string(), "vpc_cidr: IMDS is down");
    }

    #[test]
    fn a_problem_is_logged_when_it_appears_changes_cause_and_is_resolved() {
        let refused = [(Reason::VpcCidr, "IMDS: connection refused")];
        let timed_out = [(Reason::VpcCidr, "IMDS: timed out after 1 s")];
        assert_eq!(
            logged(&[], &refused),
            ["vpc_cidr: IMDS: connection refused"]
        );
        assert!(logged(&refused, &refused).is_empty(), "logged every poll");
        assert_eq!(
            logged(&refused, &timed_out),
            ["vpc_cidr: IMDS: timed out after 1 s"],
            "a new cause is not a resolution"
        );
        assert_eq!(
            logged(&timed_out, &[]),
            ["resolved: vpc_cidr: IMDS: timed out after 1 s"]
        );
    }

    #[test]
    fn problems_of_other_reasons_come_and_go_on_their_own() {
        let before = [
            (Reason::VpcCidr, "IMDS: connection refused"),
            (Reason::Interfaces, "eni1 failed"),
        ];
        let after = [
            (Reason::Interfaces, "eni1 failed"),
            (Reason::ApiServer, "no answer"),
        ];
        assert_eq!(
            logged(&before, &after),
            [
                "apiserver_endpoint: no answer",
                "resolved: vpc_cidr: IMDS: connection refused"
            ]
        );
    }
}
