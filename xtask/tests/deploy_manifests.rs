//! The deployment as files: the Helm chart lints, and every kustomization and chart option
//! renders and validates strictly against the Kubernetes API schemas; the kustomize files are
//! the chart rendered; the DaemonSet keeps to least privilege and agrees with the agent's
//! flags, the PodMonitor and the image; the Dockerfile's `cargo xtask` steps exist.
//!
//! Tools come from `cargo xtask setup` (helm, kubectl and kubernetes-validate in
//! target/xtask-venv).
use std::collections::BTreeSet;

use serde_json::Value;
use tracer_lab::deploy::{self, GENERATED, KUBERNETES_VERSIONS, KUSTOMIZATIONS};

fn rendered(kustomization: &str) -> (String, Vec<Value>) {
    let yaml = deploy::render(kustomization)
        .unwrap_or_else(|error| panic!("rendering {kustomization}: {error:#}"));
    let objects = deploy::parse(&yaml).expect("parse the rendered YAML");
    (yaml, objects)
}

fn daemonset_pod(objects: &[Value]) -> &Value {
    &deploy::find(objects, "DaemonSet", "tracer-agent").expect("the DaemonSet")["spec"]["template"]
        ["spec"]
}

fn strings(value: &Value) -> Vec<&str> {
    value
        .as_array()
        .map(|items| items.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default()
}

/// Kinds the validator had no schema for, from its warnings.
fn unvalidated_kinds(report: &str) -> BTreeSet<String> {
    report
        .lines()
        .filter_map(|line| line.split("Couldn't find schema for kind ").nth(1))
        .filter_map(|rest| rest.split_whitespace().next())
        .map(str::to_owned)
        .collect()
}

#[test]
fn every_kustomization_renders_and_validates_against_the_api_schemas() {
    for kustomization in KUSTOMIZATIONS {
        let (yaml, objects) = rendered(kustomization);
        assert!(
            objects.len() >= 6,
            "{kustomization}: only {} objects",
            objects.len()
        );
        for version in KUBERNETES_VERSIONS {
            let report = deploy::validate(&yaml, version)
                .unwrap_or_else(|error| panic!("{kustomization}: {error:#}"));
            // Only the Prometheus Operator's CRD may go unchecked: a core kind with a mistyped
            // apiVersion would otherwise slip through as "no schema".
            let unchecked = unvalidated_kinds(&report);
            let expected: BTreeSet<String> = objects
                .iter()
                .filter(|object| object["apiVersion"] == "monitoring.coreos.com/v1")
                .filter_map(|object| object["kind"].as_str().map(str::to_owned))
                .collect();
            assert_eq!(
                unchecked, expected,
                "{kustomization} against {version}: kinds without a schema\n{report}"
            );
            eprintln!(
                "{kustomization}: {} objects valid against Kubernetes {version}; not schema-checked: {unchecked:?}",
                objects.len()
            );
        }
    }
}

#[test]
fn the_kustomize_files_are_the_chart_rendered() {
    for (file, flags) in GENERATED {
        let path = deploy::kubernetes_dir().join(file);
        let committed = std::fs::read_to_string(&path).expect("read a generated file");
        let rendered = deploy::generated(flags).expect("render the chart");
        assert!(
            committed == rendered,
            "{} differs from the chart rendered with {flags:?}: run `cargo xtask manifests`",
            path.display()
        );
    }
}

#[test]
fn the_chart_lints_and_every_option_renders_valid_manifests() {
    let lint = deploy::helm_lint().unwrap_or_else(|error| panic!("{error:#}"));
    assert!(lint.contains("0 chart(s) failed"), "{lint}");
    let endpoint = "EXAMPLED0C5A1A7E7D0.gr7.us-west-2.eks.amazonaws.com";
    let yaml = deploy::helm_template(&[
        "--set",
        &format!("clusterEndpoint={endpoint}"),
        "--set",
        "extraCapabilities={SYS_RESOURCE}",
        "--set",
        "extraArgs={--cluster-dns=10.100.0.10}",
        "--set",
        "podMonitor.enabled=true",
        "--set",
        "image.repository=registry.example/tracer,image.tag=1.2.3",
        "--set",
        "pinPath=/sys/fs/bpf/tracer",
        "--set",
        "metrics.tlsSecret=tracer-tls",
        "--set",
        "metrics.readers[0].name=prometheus,metrics.readers[0].namespace=monitoring",
    ])
    .expect("helm template");
    for version in KUBERNETES_VERSIONS {
        deploy::validate(&yaml, version).unwrap_or_else(|error| panic!("{error:#}"));
    }
    let objects = deploy::parse(&yaml).unwrap();
    let config = deploy::find(&objects, "ConfigMap", "tracer-agent").unwrap();
    assert_eq!(config["data"]["cluster-endpoint"], endpoint);
    deploy::find(&objects, "PodMonitor", "tracer-agent").unwrap();
    let container = &daemonset_pod(&objects)["containers"][0];
    assert_eq!(container["image"], "registry.example/tracer:1.2.3");
    assert!(strings(&container["args"]).contains(&"--cluster-dns=10.100.0.10"));
    let args = strings(&container["args"]);
    assert!(args.contains(&"--pin-path=/sys/fs/bpf/tracer"), "{args:?}");
    assert!(
        args.contains(&"--state-file=/var/run/tracer/state"),
        "{args:?}"
    );
    let volumes = &daemonset_pod(&objects)["volumes"];
    assert_eq!(volumes[0]["hostPath"]["path"], "/sys/fs/bpf/tracer");
    // The state outlives the pod, which a rolling update replaces.
    assert_eq!(volumes[1]["name"], "state");
    assert_eq!(volumes[1]["hostPath"]["path"], "/run/tracer");
    // Both are in memory on the node, gone after a reboot: made again before every start, by
    // an init container that can do nothing but give them to the agent's user.
    for volume in [&volumes[0], &volumes[1]] {
        assert_eq!(volume["hostPath"]["type"], "DirectoryOrCreate", "{volume}");
    }
    let prepare = &daemonset_pod(&objects)["initContainers"][0];
    assert_eq!(prepare["image"], container["image"]);
    assert_eq!(
        strings(&prepare["command"]),
        [
            "/tracer",
            "prepare",
            "--owner=65532:65532",
            "/sys/fs/bpf/tracer",
            "/var/run/tracer"
        ]
    );
    let mounts = |container: &Value| container["volumeMounts"].clone();
    assert_eq!(mounts(prepare)[0], mounts(container)[0]);
    assert_eq!(mounts(prepare)[1], mounts(container)[1]);
    // The HTTPS certificate from the secret, read by the agent where its flags say.
    assert!(
        args.contains(&"--tls-cert-file=/etc/tracer/tls/tls.crt"),
        "{args:?}"
    );
    assert!(
        args.contains(&"--tls-key-file=/etc/tracer/tls/tls.key"),
        "{args:?}"
    );
    assert_eq!(volumes[2]["secret"]["secretName"], "tracer-tls");
    let tls_mount = &mounts(container)[2];
    assert_eq!(tls_mount["name"], volumes[2]["name"]);
    assert_eq!(tls_mount["mountPath"], "/etc/tracer/tls");
    assert_eq!(tls_mount["readOnly"], true);
    let monitor = deploy::find(&objects, "PodMonitor", "tracer-agent").unwrap();
    let tls_config = &monitor["spec"]["podMetricsEndpoints"][0]["tlsConfig"];
    assert_eq!(tls_config["ca"]["secret"]["name"], "tracer-tls");
    assert_eq!(tls_config["serverName"], "tracer-agent.tracer.svc");
    let readers = deploy::find(&objects, "ClusterRoleBinding", "tracer-metrics-reader").unwrap();
    assert_eq!(readers["roleRef"]["name"], "tracer-metrics-reader");
    assert_eq!(
        readers["subjects"],
        serde_json::json!([{"kind": "ServiceAccount", "name": "prometheus", "namespace": "monitoring"}])
    );
    let security = &prepare["securityContext"];
    assert_eq!(security["runAsUser"], 0);
    assert_eq!(security["allowPrivilegeEscalation"], false);
    assert_eq!(security["readOnlyRootFilesystem"], true);
    assert_eq!(security["capabilities"]["drop"], serde_json::json!(["ALL"]));
    assert_eq!(
        security["capabilities"]["add"],
        serde_json::json!(["CHOWN"])
    );
    // The chart's option and the kustomize overlay for kernels before 5.11 agree.
    let (_, overlay) = rendered("overlays/kernel-5.10");
    let capabilities = |objects: &[Value]| {
        daemonset_pod(objects)["containers"][0]["securityContext"]["capabilities"]["add"].clone()
    };
    assert_eq!(capabilities(&objects), capabilities(&overlay));
}

#[test]
fn the_validator_rejects_a_broken_manifest() {
    let (yaml, _) = rendered("base");
    for (from, to) in [
        ("hostNetwork: true", "hostNetwrok: true"),
        ("containerPort: 9477", "containerPort: \"9477\""),
    ] {
        assert!(yaml.contains(from), "the rendered base lacks {from:?}");
        let broken = yaml.replace(from, to);
        assert!(
            deploy::validate(&broken, KUBERNETES_VERSIONS[1]).is_err(),
            "{to:?} passed validation"
        );
    }
}

#[test]
fn the_daemonset_keeps_to_least_privilege() {
    let (_, objects) = rendered("base");
    let pod = daemonset_pod(&objects);
    let container = &pod["containers"][0];
    let security = &container["securityContext"];
    assert_eq!(
        security["privileged"],
        Value::Null,
        "no privileged field at all"
    );
    assert_eq!(security["allowPrivilegeEscalation"], false);
    assert_eq!(security["readOnlyRootFilesystem"], true);
    assert_eq!(strings(&security["capabilities"]["drop"]), ["ALL"]);
    assert_eq!(
        strings(&security["capabilities"]["add"]),
        ["BPF", "NET_ADMIN", "PERFMON"],
        "the capabilities the lab test proves necessary and sufficient"
    );
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
    assert_ne!(pod["securityContext"]["runAsUser"], 0);
    assert_eq!(
        pod["securityContext"]["seccompProfile"]["type"],
        "RuntimeDefault"
    );
    assert_eq!(pod["hostNetwork"], true);
    assert_eq!(pod["dnsPolicy"], "ClusterFirstWithHostNet");
    assert_eq!(pod["hostPID"], Value::Null);
    assert_eq!(pod["priorityClassName"], "system-node-critical");
    assert!(
        pod["tolerations"].as_array().is_some_and(|t| t
            .iter()
            .any(|t| t["operator"] == "Exists" && t["key"].is_null())),
        "a toleration of every taint, so that every node runs the agent"
    );
    // Nothing from the host's filesystem: no pinning (bpffs), BTF is in the container's sysfs.
    assert_eq!(pod["volumes"], Value::Null, "no volumes");

    let resources = &container["resources"];
    for field in ["requests/cpu", "requests/memory", "limits/memory"] {
        let (kind, what) = field.split_once('/').unwrap();
        assert!(resources[kind][what].is_string(), "resources.{kind}.{what}");
    }

    // The node and the agent's own pod, from the downward API.
    for (name, field) in [
        ("NODE_NAME", "spec.nodeName"),
        ("POD_NAME", "metadata.name"),
        ("POD_NAMESPACE", "metadata.namespace"),
    ] {
        let var = container["env"]
            .as_array()
            .and_then(|env| env.iter().find(|var| var["name"] == name))
            .unwrap_or_else(|| panic!("{name} in the environment"));
        assert_eq!(var["valueFrom"]["fieldRef"]["fieldPath"], field, "{name}");
    }
}

#[test]
fn probes_ports_and_the_podmonitor_agree_with_the_agent() {
    let (_, objects) = rendered("overlays/prometheus-operator");
    let daemonset = deploy::find(&objects, "DaemonSet", "tracer-agent").unwrap();
    let pod = daemonset_pod(&objects);
    let container = &pod["containers"][0];
    let port = &container["ports"][0];
    let listen = strings(&container["args"])
        .into_iter()
        .find_map(|arg| arg.strip_prefix("--metrics-addr="))
        .expect("--metrics-addr in the args");
    assert!(
        listen.ends_with(&format!(":{}", port["containerPort"])),
        "--metrics-addr={listen} but containerPort {}",
        port["containerPort"]
    );
    for (probe, path) in [("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")] {
        assert_eq!(container[probe]["httpGet"]["path"], path, "{probe}");
        assert_eq!(container[probe]["httpGet"]["port"], port["name"], "{probe}");
    }

    let monitor = deploy::find(&objects, "PodMonitor", "tracer-agent").unwrap();
    assert_eq!(
        monitor["metadata"]["namespace"],
        daemonset["metadata"]["namespace"]
    );
    let labels = &daemonset["spec"]["template"]["metadata"]["labels"];
    let selector = monitor["spec"]["selector"]["matchLabels"]
        .as_object()
        .expect("PodMonitor matchLabels");
    for (key, value) in selector {
        assert_eq!(&labels[key], value, "the PodMonitor selects label {key}");
    }
    let endpoint = &monitor["spec"]["podMetricsEndpoints"][0];
    assert_eq!(endpoint["port"], port["name"]);
    assert_eq!(endpoint["path"], "/metrics");
}

#[test]
fn the_cluster_role_only_reads() {
    let (_, objects) = rendered("base");
    let role = deploy::find(&objects, "ClusterRole", "tracer-agent").unwrap();
    let mut resources = BTreeSet::new();
    for rule in role["rules"].as_array().expect("rules") {
        assert_eq!(strings(&rule["verbs"]), ["get", "list", "watch"]);
        resources.extend(strings(&rule["resources"]));
    }
    assert_eq!(
        resources,
        BTreeSet::from(["endpointslices", "nodes", "pods", "services"])
    );
}

/// Who may read the agents: the agent checks tokens through the API server (and may do
/// nothing else with that binding), readers get `get` on the agent's URLs and nothing else,
/// /metrics needs a token by default, and the PodMonitor scrapes over HTTPS with the token of
/// an identity bound to the reader role.
#[test]
fn tokens_are_checked_and_readers_bound_as_the_agent_expects() {
    let (_, objects) = rendered("overlays/prometheus-operator");
    let pod = daemonset_pod(&objects);
    let args = strings(&pod["containers"][0]["args"]);
    assert!(args.contains(&"--metrics-auth=token"), "{args:?}");
    let namespace =
        &deploy::find(&objects, "DaemonSet", "tracer-agent").unwrap()["metadata"]["namespace"];

    let delegator = deploy::find(
        &objects,
        "ClusterRoleBinding",
        "tracer-agent-auth-delegator",
    )
    .unwrap();
    assert_eq!(delegator["roleRef"]["kind"], "ClusterRole");
    assert_eq!(delegator["roleRef"]["name"], "system:auth-delegator");
    assert_eq!(
        delegator["subjects"],
        serde_json::json!([{"kind": "ServiceAccount", "name": pod["serviceAccountName"],
            "namespace": namespace}])
    );

    let reader = deploy::find(&objects, "ClusterRole", "tracer-metrics-reader").unwrap();
    assert_eq!(
        reader["rules"],
        serde_json::json!([{"nonResourceURLs": ["/metrics", "/api/v1/*"], "verbs": ["get"]}])
    );

    let endpoint = &deploy::find(&objects, "PodMonitor", "tracer-agent").unwrap()["spec"]["podMetricsEndpoints"]
        [0];
    assert_eq!(endpoint["scheme"], "https");
    assert_eq!(endpoint["tlsConfig"]["insecureSkipVerify"], true);
    let credentials = &endpoint["authorization"]["credentials"];
    let secret_name = credentials["name"].as_str().expect("a secret name");
    let secret = deploy::find(&objects, "Secret", secret_name).unwrap();
    assert_eq!(secret["type"], "kubernetes.io/service-account-token");
    assert_eq!(credentials["key"], "token");
    let scraper = &secret["metadata"]["annotations"]["kubernetes.io/service-account.name"];
    deploy::find(&objects, "ServiceAccount", scraper.as_str().unwrap()).unwrap();
    let binding = deploy::find(
        &objects,
        "ClusterRoleBinding",
        "tracer-metrics-reader-podmonitor",
    )
    .unwrap();
    assert_eq!(binding["roleRef"]["name"], reader["metadata"]["name"]);
    assert_eq!(
        binding["subjects"],
        serde_json::json!([{"kind": "ServiceAccount", "name": scraper, "namespace": namespace}])
    );
}

/// The handover at SIGTERM reads the agent's own DaemonSet: `get` of that one object, in its
/// namespace, through a Role rather than a wider ClusterRole.
#[test]
fn the_role_reads_only_the_agents_own_daemonset() {
    let (_, objects) = rendered("base");
    let daemonset = deploy::find(&objects, "DaemonSet", "tracer-agent").unwrap();
    let namespace = &daemonset["metadata"]["namespace"];
    let role = deploy::find(&objects, "Role", "tracer-agent").unwrap();
    assert_eq!(&role["metadata"]["namespace"], namespace);
    let rules = role["rules"].as_array().expect("rules");
    assert_eq!(rules.len(), 1, "{rules:?}");
    assert_eq!(strings(&rules[0]["apiGroups"]), ["apps"]);
    assert_eq!(strings(&rules[0]["resources"]), ["daemonsets"]);
    assert_eq!(strings(&rules[0]["verbs"]), ["get"]);
    assert_eq!(
        rules[0]["resourceNames"],
        serde_json::json!([daemonset["metadata"]["name"]])
    );
    let binding = deploy::find(&objects, "RoleBinding", "tracer-agent").unwrap();
    assert_eq!(&binding["metadata"]["namespace"], namespace);
    assert_eq!(binding["roleRef"]["kind"], "Role");
    assert_eq!(binding["roleRef"]["name"], role["metadata"]["name"]);
    let pod = daemonset_pod(&objects);
    assert_eq!(
        binding["subjects"],
        serde_json::json!([{"kind": "ServiceAccount", "name": pod["serviceAccountName"],
            "namespace": namespace}])
    );
}

#[test]
fn the_dockerfile_runs_real_xtask_steps_and_matches_the_manifests() {
    let dockerfile = deploy::dockerfile().expect("Dockerfile");
    let invocations = deploy::xtask_invocations(&dockerfile);
    assert!(
        invocations.iter().any(|args| args[0] == "setup")
            && invocations.iter().any(|args| args[0] == "build"),
        "the builder sets up the toolchain and builds with xtask: {invocations:?}"
    );
    // clap rejects an unknown subcommand or flag before it honours --help.
    for args in &invocations {
        let output = std::process::Command::new(env!("CARGO_BIN_EXE_xtask"))
            .args(args)
            .arg("--help")
            .output()
            .expect("run xtask");
        assert!(
            output.status.success(),
            "`cargo xtask {}` is not a valid xtask command: {}",
            args.join(" "),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    assert!(
        dockerfile.contains(r#"ENTRYPOINT ["/tracer", "agent"]"#),
        "the image runs the agent"
    );

    let file_caps = deploy::file_capabilities(&dockerfile).unwrap();
    let granted_by_file: BTreeSet<&str> = file_caps.trim_end_matches("+p").split(',').collect();
    assert!(
        file_caps.ends_with("+p"),
        "permitted only, no effective bit: {file_caps}"
    );
    for kustomization in KUSTOMIZATIONS {
        let (_, objects) = rendered(kustomization);
        let confinement = deploy::confinement(&objects, &dockerfile).unwrap();
        assert!(
            dockerfile.contains(&format!("USER {0}:{0}", confinement.uid)),
            "the image's USER is the DaemonSet's runAsUser {}",
            confinement.uid
        );
        for cap in &confinement.capabilities {
            let file_name = format!("cap_{}", cap.to_lowercase());
            assert!(
                granted_by_file.contains(file_name.as_str()),
                "{kustomization} grants {cap}, which the image's file capabilities ({file_caps}) lack"
            );
        }
    }
}
