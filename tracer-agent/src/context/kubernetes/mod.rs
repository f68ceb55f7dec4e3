//! The Kubernetes context: who this node's pods are, where the control plane's ENIs and the
//! cluster DNS are, and which zone every node is in — watched through the API server when the
//! agent runs in a pod, and published as plain data ([`ClusterFacts`]) that the agent reads
//! once per poll.
mod facts;
mod watchers;

use std::path::{Path, PathBuf};

use kube::config::{InClusterError, KubeConfigOptions, Kubeconfig, KubeconfigError};
use tracing::info;

pub use facts::{ClusterFacts, PodRef, Workload, ZoneLabel};
pub use watchers::start;

use crate::cli::{KubernetesArgs, KubernetesMode};

/// Where the API server is, how to authenticate to it, and which node's pods to watch.
#[derive(Debug)]
pub struct Connection {
    pub config: kube::Config,
    pub node_name: String,
}

/// Why the Kubernetes context cannot be had as configured (a configuration error: exit code 2).
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error(
        "--kubernetes on, but there is no in-cluster configuration (run in a pod with a service account, give --kubeconfig, or use --kubernetes auto|off)"
    )]
    NotInCluster(#[source] InClusterError),
    #[error(
        "watching the Kubernetes API (--kubernetes on, or --kubeconfig) needs --node-name (NODE_NAME, from the downward API) to select this node's pods"
    )]
    NoNodeName,
    /// The kube error already says what its cause says: it is shown, not chained.
    #[error("--kubeconfig {}: {error}", path.display())]
    Kubeconfig {
        path: PathBuf,
        error: KubeconfigError,
    },
    #[error("--kubeconfig asks for the Kubernetes context, --kubernetes off refuses it: drop one")]
    KubeconfigButOff,
}

/// The connection the flags ask for. `--kubeconfig` names the API server and the credentials
/// (and makes the context required); otherwise the in-cluster configuration (the service
/// account's token and CA, `KUBERNETES_SERVICE_HOST`) is used when there is one, and without
/// it `on` is an error while `auto` carries on without the Kubernetes context.
pub async fn connection(
    args: &KubernetesArgs,
    node_name: Option<&str>,
) -> Result<Option<Connection>, ConfigError> {
    match (args.mode, &args.kubeconfig) {
        (KubernetesMode::Off, None) => Ok(None),
        (KubernetesMode::Off, Some(_)) => Err(ConfigError::KubeconfigButOff),
        (_, Some(path)) => {
            let config = from_kubeconfig(path).await?;
            choose(KubernetesMode::On, Ok(config), node_name)
        }
        (mode, None) => choose(mode, kube::Config::incluster(), node_name),
    }
}

/// The client configuration of a kubeconfig file's current context.
async fn from_kubeconfig(path: &Path) -> Result<kube::Config, ConfigError> {
    let error = |error| ConfigError::Kubeconfig {
        path: path.to_owned(),
        error,
    };
    let kubeconfig = Kubeconfig::read_from(path).map_err(error)?;
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .map_err(error)?;
    info!(
        url = %config.cluster_url,
        kubeconfig = %path.display(),
        "Kubernetes API from --kubeconfig"
    );
    Ok(config)
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
    }

    fn args(mode: KubernetesMode, kubeconfig: Option<&Path>) -> KubernetesArgs {
        KubernetesArgs {
            mode,
            kubeconfig: kubeconfig.map(Path::to_owned),
            workload_metrics: None,
        }
    }

    #[tokio::test]
    async fn a_kubeconfig_names_the_api_server_and_makes_the_context_required() {
        use KubernetesMode::*;
        let node = Some("ip-10-0-1-1");
        assert!(connection(&args(Off, None), node).await.unwrap().is_none());

        let dir = std::env::temp_dir().join(format!("tracer-kubeconfig-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("config");
        std::fs::write(
            &file,
            "apiVersion: v1\nkind: Config\ncurrent-context: lab\n\
             clusters: [{name: lab, cluster: {server: 'http://127.0.0.1:6443'}}]\n\
             users: [{name: agent, user: {}}]\n\
             contexts: [{name: lab, context: {cluster: lab, user: agent}}]\n",
        )
        .unwrap();
        let garbage = dir.join("garbage");
        std::fs::write(&garbage, "<html>not a kubeconfig</html>\n").unwrap();

        let connected = connection(&args(Auto, Some(&file)), node).await;
        let connected = connected.unwrap().expect("a connection");
        assert_eq!(connected.config.cluster_url, "http://127.0.0.1:6443/");
        let error = connection(&args(Auto, Some(&file)), None)
            .await
            .unwrap_err();
        assert!(matches!(error, ConfigError::NoNodeName), "{error}");
        let error = connection(&args(Off, Some(&file)), node).await.unwrap_err();
        assert!(matches!(error, ConfigError::KubeconfigButOff), "{error}");
        for bad in [dir.join("missing"), garbage] {
            let error = connection(&args(On, Some(&bad)), node).await.unwrap_err();
            let message = error.to_string();
            assert!(
                message.starts_with(&format!("--kubeconfig {}: ", bad.display())),
                "{message}"
            );
        }
        std::fs::remove_dir_all(&dir).unwrap();
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
