//! Real network isolation for multi-node tests: each node in its own Linux network namespace,
//! its interface on a bridge in the test's namespace, partitions made with iptables rules
//! inside the node namespaces (so the test itself still reaches every node's API).
//!
//! Needs root (CAP_NET_ADMIN), `ip` and `iptables`. [`Netns::available`] tells whether this
//! machine can; tests skip with a message when not, unless `AGENTMESH_REQUIRE_NETNS` is set
//! (CI sets it), in which case they fail.

use anyhow::{bail, Context, Result};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

/// Subnets handed out to the namespaces of one test process: 10.213.N.0/24.
static NEXT_SUBNET: AtomicU32 = AtomicU32::new(0);

fn run(args: &[&str]) -> Result<()> {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .with_context(|| format!("running {}", args.join(" ")))?;
    if !out.status.success() {
        bail!(
            "`{}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// A set of node namespaces on one bridge. Dropping it removes everything it made.
pub struct Netns {
    subnet: u32,
    bridge: String,
    namespaces: Vec<String>,
    forward_rule: bool,
}

impl Netns {
    /// Whether this machine lets the tests make namespaces; `Err` says why not.
    pub fn available() -> Result<()> {
        let uid = Command::new("id")
            .arg("-u")
            .output()
            .context("running id -u")?;
        if String::from_utf8_lossy(&uid.stdout).trim() != "0" {
            bail!("network namespace tests need root");
        }
        for tool in ["ip", "iptables"] {
            let found = Command::new(tool).arg("-V").output().is_ok();
            if !found {
                bail!("`{tool}` is not installed");
            }
        }
        let probe = format!("amprobe{}", std::process::id());
        run(&["ip", "netns", "add", &probe])?;
        let _ = run(&["ip", "netns", "del", &probe]);
        Ok(())
    }

    /// Whether a test that needs namespaces should run (`true`), skip (`false`, with the reason
    /// printed), or fail (when `AGENTMESH_REQUIRE_NETNS` is set and they are not available).
    pub fn should_run() -> Result<bool> {
        match Self::available() {
            Ok(()) => Ok(true),
            Err(e) if std::env::var_os("AGENTMESH_REQUIRE_NETNS").is_some() => {
                Err(e.context("AGENTMESH_REQUIRE_NETNS is set"))
            }
            Err(e) => {
                eprintln!("skipped: {e:#}");
                Ok(false)
            }
        }
    }

    /// Makes `n` namespaces with addresses 10.213.S.1 … 10.213.S.n, bridged together with the
    /// test's namespace (10.213.S.254).
    pub fn create(n: usize) -> Result<Self> {
        if n == 0 || n > 200 {
            bail!("1 to 200 namespaces");
        }
        // A subnet no other test process is using: try until the bridge name is free.
        let base = std::process::id() % 200;
        for _ in 0..250 {
            let subnet = (base + NEXT_SUBNET.fetch_add(1, Ordering::Relaxed)) % 250 + 1;
            let bridge = format!("amb{subnet}");
            if run(&["ip", "link", "add", &bridge, "type", "bridge"]).is_err() {
                continue;
            }
            let mut net = Self {
                subnet,
                bridge,
                namespaces: Vec::new(),
                forward_rule: false,
            };
            net.build(n)?;
            return Ok(net);
        }
        bail!("no free subnet for the test namespaces")
    }

    fn build(&mut self, n: usize) -> Result<()> {
        let s = self.subnet;
        let bridge = self.bridge.clone();
        run(&[
            "ip",
            "addr",
            "add",
            &format!("10.213.{s}.254/24"),
            "dev",
            &bridge,
        ])?;
        run(&["ip", "link", "set", &bridge, "up"])?;
        // Docker sets the FORWARD policy to DROP and bridged frames pass through iptables:
        // let our bridge forward.
        run(&[
            "iptables", "-I", "FORWARD", "-i", &bridge, "-o", &bridge, "-j", "ACCEPT",
        ])?;
        self.forward_rule = true;
        for i in 0..n {
            let ns = format!("am{s}n{i}");
            let veth = format!("am{s}v{i}");
            run(&["ip", "netns", "add", &ns])?;
            self.namespaces.push(ns.clone());
            run(&[
                "ip", "link", "add", &veth, "type", "veth", "peer", "name", "eth0", "netns", &ns,
            ])?;
            run(&["ip", "link", "set", &veth, "master", &bridge, "up"])?;
            let addr = format!("{}/24", self.ip(i));
            run(&[
                "ip", "netns", "exec", &ns, "ip", "addr", "add", &addr, "dev", "eth0",
            ])?;
            run(&[
                "ip", "netns", "exec", &ns, "ip", "link", "set", "eth0", "up",
            ])?;
            run(&["ip", "netns", "exec", &ns, "ip", "link", "set", "lo", "up"])?;
        }
        Ok(())
    }

    /// Node `i`'s address.
    pub fn ip(&self, i: usize) -> String {
        format!("10.213.{}.{}", self.subnet, i + 1)
    }

    /// The command prefix that runs a program in node `i`'s namespace.
    pub fn prefix(&self, i: usize) -> Vec<String> {
        ["ip", "netns", "exec", &self.namespaces[i]]
            .iter()
            .map(|s| s.to_string())
            .collect()
    }

    /// Cuts the network into `groups`: a node reaches only the nodes of its own group (and
    /// the test). Nodes in no group keep reaching everyone.
    pub fn partition(&self, groups: &[&[usize]]) -> Result<()> {
        for group in groups {
            for &i in *group {
                let ns = &self.namespaces[i];
                for j in 0..self.namespaces.len() {
                    if group.contains(&j) {
                        continue;
                    }
                    let other = self.ip(j);
                    run(&[
                        "ip", "netns", "exec", ns, "iptables", "-A", "INPUT", "-s", &other, "-j",
                        "DROP",
                    ])?;
                    run(&[
                        "ip", "netns", "exec", ns, "iptables", "-A", "OUTPUT", "-d", &other, "-j",
                        "DROP",
                    ])?;
                }
            }
        }
        Ok(())
    }

    /// Ends every partition.
    pub fn heal(&self) -> Result<()> {
        for ns in &self.namespaces {
            run(&["ip", "netns", "exec", ns, "iptables", "-F"])?;
        }
        Ok(())
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        for ns in &self.namespaces {
            let _ = run(&["ip", "netns", "del", ns]);
        }
        if self.forward_rule {
            let _ = run(&[
                "iptables",
                "-D",
                "FORWARD",
                "-i",
                &self.bridge,
                "-o",
                &self.bridge,
                "-j",
                "ACCEPT",
            ]);
        }
        let _ = run(&["ip", "link", "del", &self.bridge]);
    }
}
