//! The `tracer` binary's answers to bad usage and bad environments: one line naming the
//! problem and the fix, exit code 2 for usage/configuration, 1 for the runtime.
//!
//! Each case runs in a fresh network namespace (`unshare --net`), so the host's interfaces are
//! never seen, let alone attached to.
use std::process::{Command, Output};

fn require_root() {
    // SAFETY: geteuid has no preconditions.
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "these tests need root to create network namespaces (unshare --net)"
    );
}

/// Runs `script` with `sh -c` in a new network namespace; `$TRACER` is the binary.
fn in_fresh_netns(script: &str) -> Output {
    require_root();
    Command::new("unshare")
        .args(["--net", "sh", "-c", script])
        .env("TRACER", env!("CARGO_BIN_EXE_tracer"))
        .output()
        .expect("unshare (util-linux) runs")
}

fn assert_failure(output: &Output, code: i32, message: &str) {
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(code), "stderr: {stderr}");
    assert!(
        stderr.contains(message),
        "expected {message:?} in: {stderr}"
    );
}

#[test]
fn no_matching_interface_is_a_configuration_error() {
    let output = in_fresh_netns("$TRACER agent --metrics-addr 127.0.0.1:0");
    assert_failure(&output, 2, "no interface matches --pod-iface");
}

#[test]
fn a_malformed_flag_names_the_flag() {
    let output = in_fresh_netns("$TRACER agent --metrics-addr not-an-address");
    assert_failure(&output, 2, "--metrics-addr");
    let output = in_fresh_netns("$TRACER agent --vpc-cidr 10.0.1.7/16");
    assert_failure(&output, 2, "host bits set");
    let output = in_fresh_netns("$TRACER agent --no-such-flag");
    assert_failure(&output, 2, "--no-such-flag");
}

#[test]
fn an_address_already_in_use_names_the_flag() {
    // A listener holds the port while the agent starts.
    let output = in_fresh_netns(
        "ip link set lo up; ip link add eth0 type veth peer name eni0; \
         python3 -c 'import socket,time; s=socket.socket(); s.bind((\"127.0.0.1\",9477)); s.listen(); time.sleep(5)' & \
         sleep 0.5; $TRACER agent --metrics-addr 127.0.0.1:9477; code=$?; kill $!; exit $code",
    );
    assert_failure(&output, 2, "cannot listen on --metrics-addr 127.0.0.1:9477");
}

#[test]
fn missing_privileges_are_a_runtime_error_that_says_what_is_needed() {
    let output = in_fresh_netns(
        "ip link add eth0 type veth peer name eni0 && \
         setpriv --reuid 65534 --regid 65534 --clear-groups --inh-caps=-all \
         $TRACER agent --metrics-addr 127.0.0.1:0",
    );
    assert_failure(&output, 1, "CAP_BPF");
}

#[test]
fn a_config_file_sets_flags_and_its_mistakes_are_named() {
    let dir = std::env::temp_dir().join(format!("tracer-cli-config-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let good = dir.join("good.toml");
    std::fs::write(
        &good,
        "vpc-cidr = [\"10.0.0.0/16\"]\nservice-cidr = \"10.100.0.0/16\"\njson = true\n",
    )
    .expect("write config");
    let output = in_fresh_netns(&format!(
        "$TRACER explain 10.0.1.7 10.100.0.1:443 --config {}",
        good.display()
    ));
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(stdout.contains("10.0.0.0/16 (--vpc-cidr)"), "{stdout}");
    assert!(stdout.contains("\"path\": \"unknown\""), "{stdout}");

    let bad = dir.join("bad.toml");
    std::fs::write(&bad, "vpc-cidr = [\"10.0.0.1/16\"]\n").expect("write config");
    let output = in_fresh_netns(&format!("$TRACER agent --config {}", bad.display()));
    assert_failure(&output, 2, "--vpc-cidr");
    assert_failure(&output, 2, &format!("--config {}", bad.display()));

    let output = in_fresh_netns(&format!(
        "$TRACER agent --config {}",
        dir.join("none.toml").display()
    ));
    assert_failure(&output, 2, "cannot read --config");
    std::fs::remove_dir_all(&dir).expect("remove temp dir");
}
