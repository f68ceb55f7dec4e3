//! What more than one lab test needs and only tests do: the Kubernetes API stand-in served
//! where the agent in the lab node reaches it; a foreign TC program (the policy stand-in) on
//! an interface of the lab node.
use std::{
    io,
    net::{SocketAddr, TcpListener},
    sync::{Arc, mpsc},
    thread::JoinHandle,
    time::Duration,
};

use aya::{
    EbpfLoader,
    programs::{
        SchedClassifier, TcAttachType,
        links::LinkOrder,
        tc::{self, NlOptions, TcAttachOptions},
    },
};
use kube_standin::StandIn;
use tracer_agent::datapath::{
    POLICY_STANDIN_OBJECT, POLICY_STANDIN_PORT_GLOBAL, POLICY_STANDIN_PROGRAM,
};
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

/// Where a foreign program goes on a hook.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) enum Placement {
    /// A tcx link ahead of every other: it runs first, and its final verdict hides the packet
    /// from what comes after.
    TcxFirst,
    /// A tcx link appended after what is there.
    TcxLast,
    /// A direct-action filter on the clsact qdisc where the VPC CNI's network-policy agent
    /// puts its own: [`POLICY_PRIORITY`], [`POLICY_HANDLE`].
    Clsact,
}

/// The priority and handle of the VPC CNI network-policy agent's clsact filters.
pub(crate) const POLICY_PRIORITY: u16 = 1;
pub(crate) const POLICY_HANDLE: u32 = 1;

/// The stand-in policy program (`policy_standin`: drops TCP to `denied_port`, 0 for none, and
/// ends the chain with `TC_ACT_OK` for everything else) attached to both hooks of one
/// interface of the lab node, held by a thread that lives in the node's namespace: links are made and removed there, never in
/// the test's own namespace (a clsact filter is removed by interface index, which the root
/// namespace reuses).
pub(crate) struct PolicyStandin {
    detach: Option<mpsc::Sender<()>>,
    thread: Option<JoinHandle<anyhow::Result<()>>>,
}

impl PolicyStandin {
    pub(crate) fn attach(
        ns: String,
        interface: String,
        placement: Placement,
        denied_port: u16,
    ) -> Self {
        let (attached_tx, attached_rx) = mpsc::channel();
        let (detach_tx, detach_rx) = mpsc::channel::<()>();
        let thread = std::thread::spawn(move || {
            exec::within(&ns, move || {
                let mut ebpf = EbpfLoader::new()
                    .override_global(POLICY_STANDIN_PORT_GLOBAL, &denied_port, true)
                    .load(POLICY_STANDIN_OBJECT)?;
                let program: &mut SchedClassifier = ebpf
                    .program_mut(POLICY_STANDIN_PROGRAM)
                    .expect("the stand-in object has its program")
                    .try_into()?;
                program.load()?;
                if placement == Placement::Clsact {
                    // Already there is fine: the agent may have added it.
                    let _ = tc::qdisc_add_clsact(&interface);
                }
                for hook in [TcAttachType::Ingress, TcAttachType::Egress] {
                    let options = match placement {
                        Placement::TcxFirst => TcAttachOptions::TcxOrder(LinkOrder::first()),
                        Placement::TcxLast => TcAttachOptions::TcxOrder(LinkOrder::last()),
                        Placement::Clsact => TcAttachOptions::Netlink(NlOptions {
                            priority: POLICY_PRIORITY,
                            handle: POLICY_HANDLE.into(),
                            ..NlOptions::default()
                        }),
                    };
                    program.attach_with_options(&interface, hook, options)?;
                }
                let _ = attached_tx.send(());
                // Until told, or until the test is gone.
                let _ = detach_rx.recv();
                // Dropping the program removes its links, here in the node's namespace.
                drop(ebpf);
                Ok(())
            })
        });
        let mut standin = Self {
            detach: Some(detach_tx),
            thread: Some(thread),
        };
        if attached_rx.recv_timeout(Duration::from_secs(10)).is_err() {
            let error = standin.finish().err();
            panic!("attaching the policy stand-in failed: {error:?}");
        }
        standin
    }

    /// Detaches the program and waits until it is gone.
    fn finish(&mut self) -> anyhow::Result<()> {
        self.detach.take();
        match self.thread.take() {
            Some(thread) => thread
                .join()
                .map_err(|_| anyhow::anyhow!("the stand-in's thread panicked"))?,
            None => Ok(()),
        }
    }

    pub(crate) fn detach(mut self) {
        self.finish().expect("detaching the policy stand-in");
    }
}

impl Drop for PolicyStandin {
    fn drop(&mut self) {
        let _ = self.finish();
    }
}
