//! The agentmesh node: composition of the mesh, the blob store and the HTTP API,
//! plus the command-line client. The binary (`main.rs`) is a thin shell over
//! [`cli`], [`node::run`] and [`client`].
//!
//! # Layout
//! - [`config`]: one [`config::NodeConfig`], from file, env and flags.
//! - [`network`]: the swarm task and its [`network::NetworkHandle`].
//! - [`blobs`]: local store, fetcher, server.
//! - [`api`]: the HTTP API.
//! - [`jobs`]: federated training jobs (worker, coordinator, verification).
//! - [`node`]: start-up, readiness, shutdown.

pub mod api;
pub mod blobs;
pub mod cli;
pub mod client;
pub mod config;
pub mod demo;
pub mod identity;
pub mod jobs;
pub mod metrics;
pub mod network;
pub mod node;
pub mod offline;
pub mod peers;
pub mod raft;
pub mod sealing;
