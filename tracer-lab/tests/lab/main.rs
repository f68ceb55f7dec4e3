//! The lab tests, as one binary (one link of the agent instead of one per file), a module per
//! area. They need root, and run one at a time
//! (`cargo test -p tracer-lab --test lab -- --test-threads=1`, or one module:
//! `… -- agent_lab::`): they drive real traffic and time it.
mod agent_capabilities;
mod agent_lab;
mod api_lab;
mod auth_lab;
mod blind_lab;
mod coexistence_lab;
mod context_lab;
mod dashboards;
mod explain_lab;
mod hotplug_lab;
mod lab_smoke;
mod listener_lab;
mod restart_lab;
mod support;
mod table_full_lab;
mod top_lab;
