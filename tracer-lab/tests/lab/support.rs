//! What more than one lab test needs and only tests do: the Kubernetes API stand-in served
//! where the agent in the lab node reaches it.
use std::{
    io,
    net::{SocketAddr, TcpListener},
    sync::Arc,
};

use kube_standin::StandIn;
use tracer_lab::lab::{Lab, exec};

/// Serves the stand-in on loopback in the lab's node namespace, where the agent runs.
pub(crate) fn stand_in_in(lab: &Lab, runtime: &tokio::runtime::Runtime) -> StandIn {
    let ns = lab.ns("node");
    let bind = Arc::new(move |address: SocketAddr| {
        exec::within(&ns, move || Ok(TcpListener::bind(address)?))
            .map_err(|error| io::Error::other(format!("{error:#}")))
    });
    let loopback = SocketAddr::from(([127, 0, 0, 1], 0));
    runtime.block_on(StandIn::start_with(loopback, bind))
}

/// A kubeconfig for the stand-in, in the lab's state directory (removed with the lab).
pub(crate) fn kubeconfig(lab: &Lab, stand_in: &StandIn) -> String {
    let path = lab.state_dir().join("kubeconfig");
    let text = format!(
        "apiVersion: v1
kind: Config
current-context: lab
clusters:
- name: lab
  cluster:
    server: {}
users:
- name: tracer
  user: {{}}
contexts:
- name: lab
  context: {{cluster: lab, user: tracer}}
",
        stand_in.url()
    );
    std::fs::write(&path, text).expect("write the kubeconfig");
    path.display().to_string()
}
