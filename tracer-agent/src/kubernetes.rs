//! The Kubernetes context: who this node's pods are, where the control plane's ENIs and the
//! cluster DNS are, and which zone every node is in — watched through the API server when the
//! agent runs in a pod, and published as plain data ([`ClusterFacts`]) that the agent reads
//! once per poll.
mod facts;
mod watchers;
pub mod workload;

use kube::config::InClusterError;
use log::info;

pub use facts::{ClusterFacts, PodRef, Workload, ZoneLabel};
pub use watchers::start;

use crate::cli::KubernetesMode;

/// Where the API server is, how to authenticate to it, and which node's pods to watch.
#[derive(Debug)]
pub struct Connection {
    pub config: kube::Config,
    pub node_name: String,
}

/// Why `--kubernetes on` cannot be honoured (a configuration error: exit code 2).
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error(
        "--kubernetes on, but there is no in-cluster configuration (run in a pod with a service account, or use --kubernetes auto|off)"
    )]
    NotInCluster(#[source] InClusterError),
    #[error(
        "--kubernetes on needs --node-name (NODE_NAME, from the downward API) to watch this node's pods"
    )]
    NoNodeName,
}

/// The connection `mode` asks for: the in-cluster configuration (the service account's token
/// and CA, `KUBERNETES_SERVICE_HOST`) when there is one; without it, `on` is an error and
/// `auto` carries on without the Kubernetes context.
pub fn connection(
    mode: KubernetesMode,
    node_name: Option<&str>,
) -> Result<Option<Connection>, ConfigError> {
    match mode {
        KubernetesMode::Off => Ok(None),
        KubernetesMode::Auto | KubernetesMode::On => {
            choose(mode, kube::Config::incluster(), node_name)
        }
    }
}

fn choose(
    mode: KubernetesMode,
    found: Result<kube::Config, InClusterError>,
    node_name: Option<&str>,
) -> Result<Option<Connection>, ConfigError> {
    let required = mode == KubernetesMode::On;
    match (found, node_name) {
        (Ok(config), Some(node_name)) => Ok(Some(Connection {
            config,
            node_name: node_name.to_owned(),
        })),
        (Err(error), _) if required => Err(ConfigError::NotInCluster(error)),
        (Ok(_), None) if required => Err(ConfigError::NoNodeName),
        (Err(error), _) => {
            info!("no Kubernetes context: not in a cluster ({error})");
            Ok(None)
        }
        (Ok(_), None) => {
            info!("no Kubernetes context: --node-name (NODE_NAME) is not set");
            Ok(None)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn in_cluster() -> Result<kube::Config, InClusterError> {
        Ok(kube::Config::new("https://10.100.0.1".parse().unwrap()))
    }

    fn not_in_cluster() -> Result<kube::Config, InClusterError> {
        Err(InClusterError::ReadEnvironmentVariable(
            std::env::VarError::NotPresent,
        ))
    }

    #[test]
    fn on_requires_what_auto_does_without() {
        use KubernetesMode::*;
        let node = Some("ip-10-0-1-1");
        let connected = choose(Auto, in_cluster(), node).unwrap().unwrap();
        assert_eq!(connected.node_name, "ip-10-0-1-1");
        assert!(choose(On, in_cluster(), node).unwrap().is_some());

        assert!(choose(Auto, not_in_cluster(), node).unwrap().is_none());
        assert!(choose(Auto, in_cluster(), None).unwrap().is_none());
        let error = choose(On, not_in_cluster(), node).unwrap_err();
        assert!(matches!(error, ConfigError::NotInCluster(_)), "{error}");
        assert!(error.to_string().contains("--kubernetes on"), "{error}");
        let error = choose(On, in_cluster(), None).unwrap_err();
        assert!(matches!(error, ConfigError::NoNodeName), "{error}");

        assert!(connection(Off, node).unwrap().is_none());
    }

    /// The in-cluster configuration is https: its TLS stack (rustls with ring) must build.
    #[tokio::test]
    async fn watches_start_over_tls() {
        let connection = Connection {
            config: kube::Config::new("https://127.0.0.1:1".parse().unwrap()),
            node_name: "ip-10-0-1-1".into(),
        };
        let facts = start(connection).expect("an https client");
        assert!(!facts.borrow().synced);
    }
}
