//! Keeping the node's context current, one step of every poll: the sources that answer after
//! the flags (IMDS for the VPC's blocks, the cluster endpoint's DNS answer, the Kubernetes API,
//! the node's routes and addresses) are applied to the [`NodeContext`] the classifier reads.
//! Each gap or contradiction comes back as a [`Problem`]; no I/O happens here — the sources
//! publish on watch channels — so the step is tested on its own.
use std::{collections::HashSet, net::IpAddr, sync::Arc};

use tokio::sync::watch;
use tracing::{info, warn};

use crate::{
    cli::ContextArgs,
    context::{NodeContext, endpoint::Resolution, imds, imds::VpcCidrs, kubernetes::ClusterFacts},
    pipeline::readiness::{Problem, Reason},
};

/// The node's context and the sources that keep it current.
pub(crate) struct ContextFeed {
    flags: ContextArgs,
    context: NodeContext,
    /// IMDS's answer, until it gives the VPC CIDRs (only when no `--vpc-cidr` is given).
    vpc_from_imds: Option<watch::Receiver<VpcCidrs>>,
    /// The cluster endpoint's DNS answers (only with `--cluster-endpoint`).
    apiserver_from_dns: Option<watch::Receiver<Resolution>>,
    /// Whether the resolver ever answered: only never having had an answer is a gap.
    apiserver_resolved: bool,
    resolver_outage: Outage,
    /// The Kubernetes context's facts, once the agent follows it.
    cluster: Option<watch::Receiver<ClusterFacts>>,
    cluster_outage: Outage,
}

impl ContextFeed {
    /// `context` is what the flags say (`context::from_flags`); the receivers are the sources
    /// the flags left open.
    pub(crate) fn new(
        flags: ContextArgs,
        context: NodeContext,
        vpc_from_imds: Option<watch::Receiver<VpcCidrs>>,
        apiserver_from_dns: Option<watch::Receiver<Resolution>>,
    ) -> Self {
        Self {
            flags,
            context,
            vpc_from_imds,
            apiserver_from_dns,
            apiserver_resolved: false,
            resolver_outage: Outage::default(),
            cluster: None,
            cluster_outage: Outage::default(),
        }
    }

    /// Takes the Kubernetes context's facts into account from the next refresh on.
    pub(crate) fn follow_cluster(&mut self, facts: watch::Receiver<ClusterFacts>) {
        self.cluster = Some(facts);
    }

    pub(crate) fn context(&self) -> &NodeContext {
        &self.context
    }

    /// The node's own addresses and its pods, as the latest scan of routes and addresses found.
    pub(crate) fn set_addresses(&mut self, node_ips: HashSet<IpAddr>, local_pods: HashSet<IpAddr>) {
        self.context.node_ips = node_ips;
        self.context.local_pods = local_pods;
    }

    /// Applies every source's latest answer; returns what is missing or cannot all be true.
    pub(crate) fn refresh(&mut self) -> Vec<Problem> {
        let mut problems = Vec::new();
        let mut problem = |reason, message| problems.push(Problem { reason, message });
        if let Err(message) = self.receive_imds() {
            problem(Reason::VpcCidr, message);
        }
        if let Err(message) = self.receive_apiserver_addresses() {
            problem(Reason::ApiServer, message);
        }
        if let Err(message) = self.receive_cluster_facts() {
            problem(Reason::Kubernetes, message);
        }
        for contradiction in self.context.contradictions() {
            problem(
                Reason::Contradiction,
                format!(
                    "{contradiction}; classification of the addresses involved cannot be trusted"
                ),
            );
        }
        problems
    }

    /// The VPC CIDRs once IMDS gives them; until then, the latest cause.
    fn receive_imds(&mut self) -> Result<(), String> {
        let Some(receiver) = &self.vpc_from_imds else {
            return Ok(());
        };
        let answer = receiver.borrow().clone();
        match answer {
            Ok(cidrs) => {
                info!(cidrs = ?cidrs, "VPC CIDR blocks from IMDS");
                self.context.vpc_cidrs = cidrs;
                self.vpc_from_imds = None;
                Ok(())
            }
            Err(cause) => Err(imds::vpc_cidrs_missing(self.flags.imds_addr, &cause)),
        }
    }

    /// The API server addresses: those given by flag and the cluster endpoint's latest answer.
    fn receive_apiserver_addresses(&mut self) -> Result<(), String> {
        let Some(receiver) = self.apiserver_from_dns.as_mut() else {
            return Ok(());
        };
        let changed = receiver.has_changed().unwrap_or(false);
        let resolution = receiver.borrow_and_update().clone();
        match resolution {
            Ok(addresses) => {
                self.apiserver_resolved = true;
                self.resolver_outage = Outage::default();
                if changed {
                    info!(addresses = ?addresses, "cluster endpoint resolved");
                    self.context.apiserver_ips = self
                        .flags
                        .apiserver_ips
                        .iter()
                        .copied()
                        .chain(addresses)
                        .collect();
                }
                Ok(())
            }
            // Only never having had an answer is a gap; after one, a resolver outage leaves the
            // agent ready with the last answer, as a Kubernetes API outage does (a node-wide
            // resolver failure must not make every agent unready).
            Err(error) if !self.apiserver_resolved => Err(format!(
                "{error}; API server traffic to addresses not given by --apiserver-ip is not recognised"
            )),
            Err(error) => {
                let kept = &self.context.apiserver_ips;
                self.resolver_outage.update(Some(&error), |error| {
                    warn!(kept = ?kept, "{error}; the last answer stays in use");
                });
                Ok(())
            }
        }
    }

    /// The Kubernetes context's latest facts, added to what the flags say: control-plane ENIs
    /// join `--controlplane-ip`, the cluster DNS stands in for a missing `--cluster-dns`.
    fn receive_cluster_facts(&mut self) -> Result<(), String> {
        let Some(receiver) = self.cluster.as_mut() else {
            return Ok(());
        };
        let facts = receiver.borrow_and_update().clone();
        let synced = facts.synced;
        // An API server outage does not make the agent unready: the last facts stay in use.
        self.cluster_outage
            .update(facts.last_error.as_deref(), |error| {
                warn!("Kubernetes API: {error}; the last facts stay in use");
            });
        let flags = &self.flags;
        self.context.controlplane_ips = flags
            .controlplane_ips
            .iter()
            .chain(&facts.controlplane_ips)
            .copied()
            .collect();
        self.context.cluster_dns = flags.cluster_dns.or(facts.cluster_dns);
        self.context.cluster = Arc::new(facts);
        if synced {
            Ok(())
        } else {
            Err("the Kubernetes context has not listed pods, nodes and endpoints yet".to_owned())
        }
    }
}

/// The failure of a source whose last answer stays in use (the resolver, the Kubernetes API):
/// logged when it appears or its cause changes, not at every poll.
#[derive(Default)]
struct Outage(Option<String>);

impl Outage {
    /// `failure` is the source's now, `None` once it answers; `log` words a new one.
    fn update(&mut self, failure: Option<&str>, log: impl FnOnce(&str)) {
        if failure != self.0.as_deref() {
            if let Some(failure) = failure {
                log(failure);
            }
            self.0 = failure.map(str::to_owned);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;
    use clap::Parser as _;

    use crate::{
        cli::{Cli, Command},
        context::cidr::Cidr,
    };

    fn ip(text: &str) -> IpAddr {
        text.parse().expect("address")
    }

    /// What `tracer agent --apiserver-ip 10.0.1.5 --controlplane-ip 10.0.1.200` gives.
    fn flags() -> ContextArgs {
        let argv = "tracer agent --apiserver-ip 10.0.1.5 --controlplane-ip 10.0.1.200";
        match Cli::try_parse_from(argv.split(' '))
            .expect("valid flags")
            .command
        {
            Command::Agent(args) => args.pipeline.context,
            _ => unreachable!("an agent command line"),
        }
    }

    fn feed_with(
        vpc: Option<watch::Receiver<VpcCidrs>>,
        dns: Option<watch::Receiver<Resolution>>,
    ) -> ContextFeed {
        let flags = flags();
        let context = crate::context::from_flags(&flags).expect("consistent flags");
        ContextFeed::new(flags, context, vpc, dns)
    }

    fn reasons(problems: &[Problem]) -> Vec<Reason> {
        problems.iter().map(|problem| problem.reason).collect()
    }

    #[test]
    fn imds_fills_the_vpc_cidrs_once_it_answers() {
        let (sender, receiver) = watch::channel(Err("connection refused".to_owned()));
        let mut feed = feed_with(Some(receiver), None);
        let problems = feed.refresh();
        assert_eq!(reasons(&problems), [Reason::VpcCidr]);
        assert!(problems[0].message.contains("connection refused"));
        assert!(feed.context().vpc_cidrs.is_empty());

        let vpc: Cidr = "10.0.0.0/16".parse().expect("cidr");
        sender
            .send(Ok(vec![vpc]))
            .expect("the feed holds the receiver");
        assert_eq!(feed.refresh(), []);
        assert_eq!(feed.context().vpc_cidrs, [vpc]);
        // Once answered, the lookup is no longer followed: its thread may end.
        assert!(sender.is_closed(), "the feed let go of the IMDS lookup");
    }

    #[test]
    fn the_resolver_is_a_gap_only_until_its_first_answer() {
        let (sender, receiver) = watch::channel(Err("no answer yet".to_owned()));
        let mut feed = feed_with(None, Some(receiver));
        assert_eq!(reasons(&feed.refresh()), [Reason::ApiServer]);
        assert_eq!(
            feed.context().apiserver_ips,
            HashSet::from([ip("10.0.1.5")])
        );

        sender
            .send(Ok(BTreeSet::from([ip("192.0.2.10")])))
            .expect("the feed holds the receiver");
        assert_eq!(feed.refresh(), []);
        let both = HashSet::from([ip("10.0.1.5"), ip("192.0.2.10")]);
        assert_eq!(feed.context().apiserver_ips, both);

        sender
            .send(Err("timed out".to_owned()))
            .expect("the feed holds the receiver");
        assert_eq!(
            feed.refresh(),
            [],
            "an outage after an answer keeps the agent ready"
        );
        assert_eq!(
            feed.context().apiserver_ips,
            both,
            "the last answer stays in use"
        );
    }

    #[test]
    fn cluster_facts_join_the_flags_and_say_when_not_listed_yet() {
        let mut feed = feed_with(None, None);
        let (sender, receiver) = watch::channel(ClusterFacts::default());
        feed.follow_cluster(receiver);
        assert_eq!(reasons(&feed.refresh()), [Reason::Kubernetes]);

        sender
            .send(ClusterFacts {
                synced: true,
                controlplane_ips: BTreeSet::from([ip("10.0.2.200")]),
                cluster_dns: Some(ip("10.100.0.10")),
                ..ClusterFacts::default()
            })
            .expect("the feed holds the receiver");
        assert_eq!(feed.refresh(), []);
        let context = feed.context();
        assert_eq!(
            context.controlplane_ips,
            HashSet::from([ip("10.0.1.200"), ip("10.0.2.200")])
        );
        assert_eq!(context.cluster_dns, Some(ip("10.100.0.10")));
    }

    #[test]
    fn contradictions_are_problems_of_every_refresh() {
        let (sender, receiver) = watch::channel(Err("no answer yet".to_owned()));
        let mut feed = feed_with(Some(receiver), None);
        // The control-plane ENI of the flags lies outside the VPC that IMDS reports.
        sender
            .send(Ok(vec!["172.16.0.0/16".parse().expect("cidr")]))
            .expect("the feed holds the receiver");
        assert_eq!(reasons(&feed.refresh()), [Reason::Contradiction]);
        assert_eq!(reasons(&feed.refresh()), [Reason::Contradiction]);
    }
}
