//! NUMA placement of a host region: which node its pages should come from, and why.
//!
//! A pinned arena is read by its GPU over PCIe. On a host with more than one NUMA node, pages
//! on the node the GPU hangs off cross one link fewer than pages on another node (the remote
//! path through the inter-socket link can halve host-to-device bandwidth). This module decides
//! the node; [`crate::pinned`] (the only module that maps memory) binds the pages to it with
//! `mbind` right after mapping them, before anything touches or pins them.
//!
//! What it reads, all from sysfs (text, read once per region):
//!
//! - `/sys/devices/system/node/online`: the online nodes as a CPU-list string (`0`, `0-1`,
//!   `0-3,8-11`); missing means a kernel without NUMA, i.e. one node;
//! - `/sys/bus/pci/devices/<bus id>/numa_node`: the node of a PCI device, `-1` when the
//!   firmware gives none; the bus id comes from `cudaDeviceGetPCIBusId` ([`crate::cuda`]),
//!   lowercased and with a 4-digit domain, as sysfs names it.
//!
//! The choice ([`plan`], pure apart from those reads):
//!
//! - [`NumaPlacement::None`]: no binding;
//! - [`NumaPlacement::Device`] (the default): only for a region pinned for a CUDA device on a
//!   host with more than one online node, bind to the device's node with `MPOL_PREFERRED`.
//!   Preferred, not strict: the node gets every page it has room for and the rest spills to
//!   the others, because an arena sized from the whole host's memory may not fit one node, and
//!   a placement that only saves bandwidth must not turn into a failed start-up (or an OOM
//!   kill on a later fault). Every reason for not placing (unpinned, no device, one node, no
//!   affinity, a failed lookup, a failed `mbind`) is reported, never an error;
//! - [`NumaPlacement::Node`]: the caller names the node. It must be online
//!   ([`FreeKvError::NumaNodeUnavailable`] otherwise), and the pages are bound with
//!   `MPOL_BIND`: exactly that node, as asked. A node short of memory then fails visibly,
//!   when `cudaHostRegister` faults the pages in (or, unpinned, on a later fault). A failed
//!   `mbind` is [`FreeKvError::NumaBind`]. The single-node rule does not apply: binding to
//!   the only node is allowed (and harmless).
//!
//! The outcome is a [`NumaReport`] kept on the region, for the one log line the Python side
//! writes when it builds a pool.

use std::path::Path;

use crate::cuda::CudaRuntime;
use crate::error::{FreeKvError, Result};

const ONLINE_NODES: &str = "/sys/devices/system/node/online";
const PCI_DEVICES: &str = "/sys/bus/pci/devices";

/// Where a region's pages should live.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum NumaPlacement {
    /// Leave placement to the kernel's default policy (first touch).
    None,
    /// The NUMA node of the CUDA device the region is pinned for, when the host has more
    /// than one node (`MPOL_PREFERRED`; failures are reported, not raised).
    #[default]
    Device,
    /// This node, strictly (`MPOL_BIND`; it must be online, and a failed bind is an error).
    Node(u32),
}

/// The memory policy a region was bound with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MemPolicy {
    /// `MPOL_BIND`: pages only from the node.
    Bind,
    /// `MPOL_PREFERRED`: pages from the node while it has free memory, else from others.
    Preferred,
}

impl MemPolicy {
    /// The kernel's name of the mode (`MPOL_BIND`, `MPOL_PREFERRED`).
    #[must_use]
    pub fn name(self) -> &'static str {
        match self {
            Self::Bind => "MPOL_BIND",
            Self::Preferred => "MPOL_PREFERRED",
        }
    }
    /// The `mode` argument of `mbind(2)` (unused under Miri, which makes no syscall).
    #[must_use]
    #[cfg_attr(miri, allow(dead_code))]
    pub(crate) fn mode(self) -> libc::c_int {
        match self {
            Self::Bind => libc::MPOL_BIND,
            Self::Preferred => libc::MPOL_PREFERRED,
        }
    }
}

/// What became of a region's placement: the node and policy it is bound with, or `None`,
/// and in words why (for a log line).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NumaReport {
    /// The node the pages are bound to, or `None` when no policy was set.
    pub node: Option<u32>,
    /// The policy of the binding (`None` when unbound).
    pub policy: Option<MemPolicy>,
    /// Why this node, or why none (e.g. "single NUMA node", "GPU 1 has no NUMA affinity").
    pub detail: String,
}

impl NumaReport {
    pub(crate) fn unplaced(detail: impl Into<String>) -> Self {
        Self {
            node: None,
            policy: None,
            detail: detail.into(),
        }
    }
}

/// What [`crate::pinned`] is to do with a fresh mapping.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Plan {
    /// Bind to `node` with `policy`; `strict` when a failure must fail the region.
    Bind {
        node: u32,
        policy: MemPolicy,
        strict: bool,
        detail: String,
    },
    /// Leave the mapping alone, for this reason.
    Skip(String),
}

/// A CUDA device's NUMA affinity as found through its PCI bus id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeviceNode {
    /// The device's node, and its sysfs bus id.
    Node(u32, String),
    /// The device has no affinity (sysfs says -1, or has no entry for the bus id), or the
    /// lookup failed; in words why.
    Unknown(String),
}

/// Parses a sysfs node or CPU list (`"0"`, `"0-1"`, `"0-3,8-11\n"`) into sorted, distinct
/// ids. `None` when the text is not such a list (empty counts as no ids).
#[must_use]
pub fn parse_node_list(text: &str) -> Option<Vec<u32>> {
    let mut ids = Vec::new();
    let text = text.trim();
    if text.is_empty() {
        return Some(ids);
    }
    for part in text.split(',') {
        let part = part.trim();
        let (lo, hi) = match part.split_once('-') {
            Some((lo, hi)) => (lo.parse::<u32>().ok()?, hi.parse::<u32>().ok()?),
            None => {
                let n = part.parse::<u32>().ok()?;
                (n, n)
            }
        };
        if lo > hi || hi - lo >= 1 << 16 {
            return None;
        }
        ids.extend(lo..=hi);
    }
    ids.sort_unstable();
    ids.dedup();
    Some(ids)
}

/// Parses a sysfs `numa_node` file: `Some(node)`, or `None` for `-1` (no affinity) and for
/// text that is not an integer.
#[must_use]
pub fn parse_numa_node(text: &str) -> Option<u32> {
    let n: i64 = text.trim().parse().ok()?;
    u32::try_from(n).ok()
}

/// The sysfs name of a PCI bus id as CUDA prints it (`"0000:3B:00.0"`, or with an 8-digit
/// domain `"00000000:3B:00.0"`): lowercase, domain as 4 hex digits when it fits. `None` when
/// the text is not `domain:bus:device.function` in hex.
#[must_use]
pub fn sysfs_bus_id(cuda_bus_id: &str) -> Option<String> {
    let text = cuda_bus_id.trim().trim_end_matches('\0');
    let (domain, rest) = text.split_once(':')?;
    let (bus, rest) = rest.split_once(':')?;
    let (dev, func) = rest.split_once('.')?;
    let hex = |s: &str, max_len: usize| {
        (!s.is_empty() && s.len() <= max_len && s.bytes().all(|b| b.is_ascii_hexdigit()))
            .then(|| u32::from_str_radix(s, 16).ok())
            .flatten()
    };
    let (domain, bus, dev, func) = (hex(domain, 8)?, hex(bus, 2)?, hex(dev, 2)?, hex(func, 1)?);
    Some(format!("{domain:04x}:{bus:02x}:{dev:02x}.{func:x}"))
}

// Miri runs with host isolation (no file system): the reads below find nothing, as on a
// kernel without sysfs.
#[cfg(not(miri))]
fn read_sysfs(path: &Path) -> std::io::Result<String> {
    std::fs::read_to_string(path)
}
#[cfg(miri)]
fn read_sysfs(_path: &Path) -> std::io::Result<String> {
    Err(std::io::ErrorKind::Unsupported.into())
}

/// The host's online NUMA nodes; `[0]` on a kernel without NUMA (no sysfs entry) or when the
/// entry cannot be parsed.
#[must_use]
pub fn online_nodes() -> Vec<u32> {
    read_sysfs(Path::new(ONLINE_NODES))
        .ok()
        .and_then(|t| parse_node_list(&t))
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| vec![0])
}

/// The NUMA node of the device whose sysfs bus id is `bus_id`, under `pci_root`.
fn node_of_bus_id(pci_root: &Path, bus_id: &str) -> std::result::Result<u32, String> {
    let path = pci_root.join(bus_id).join("numa_node");
    match read_sysfs(&path) {
        Ok(text) => parse_numa_node(&text).ok_or_else(|| format!("numa_node is {}", text.trim())),
        Err(e) => Err(format!("no sysfs numa_node ({e})")),
    }
}

/// The NUMA node of CUDA device `device`: `cudaDeviceGetPCIBusId`, then sysfs.
#[must_use]
pub fn device_node(rt: &CudaRuntime, device: i32) -> DeviceNode {
    let raw = match rt.pci_bus_id(device) {
        Ok(id) => id,
        Err(e) => return DeviceNode::Unknown(format!("GPU {device}'s PCI bus id: {e}")),
    };
    let Some(bus_id) = sysfs_bus_id(&raw) else {
        return DeviceNode::Unknown(format!("GPU {device}'s PCI bus id {raw:?} is not one"));
    };
    match node_of_bus_id(Path::new(PCI_DEVICES), &bus_id) {
        Ok(node) => DeviceNode::Node(node, bus_id),
        Err(why) => DeviceNode::Unknown(format!(
            "GPU {device} (PCI {bus_id}) has no NUMA affinity: {why}"
        )),
    }
}

/// Decides what to do with a region about to be mapped. `pinned_for` is the runtime and
/// device ordinal when the region will be registered with CUDA (else `None`); `online` the
/// host's online nodes; `find` looks up a device's node (only called when it matters).
///
/// # Errors
/// [`FreeKvError::NumaNodeUnavailable`] when an explicit node is not online.
pub(crate) fn plan<R>(
    placement: NumaPlacement,
    pinned_for: Option<(R, i32)>,
    online: &[u32],
    find: impl FnOnce(R, i32) -> DeviceNode,
) -> Result<Plan> {
    match placement {
        NumaPlacement::None => Ok(Plan::Skip("not requested".to_owned())),
        NumaPlacement::Node(node) => {
            if online.contains(&node) {
                Ok(Plan::Bind {
                    node,
                    policy: MemPolicy::Bind,
                    strict: true,
                    detail: "requested".to_owned(),
                })
            } else {
                Err(FreeKvError::NumaNodeUnavailable {
                    node,
                    online: format_node_list(online),
                })
            }
        }
        NumaPlacement::Device => {
            let Some((rt, device)) = pinned_for else {
                return Ok(Plan::Skip("not pinned for a CUDA device".to_owned()));
            };
            if online.len() <= 1 {
                return Ok(Plan::Skip("single NUMA node".to_owned()));
            }
            match find(rt, device) {
                DeviceNode::Node(node, bus_id) if online.contains(&node) => Ok(Plan::Bind {
                    node,
                    policy: MemPolicy::Preferred,
                    strict: false,
                    detail: format!("GPU {device}'s node, PCI {bus_id}"),
                }),
                DeviceNode::Node(node, bus_id) => Ok(Plan::Skip(format!(
                    "GPU {device} (PCI {bus_id}) is on node {node}, which is not online"
                ))),
                DeviceNode::Unknown(why) => Ok(Plan::Skip(why)),
            }
        }
    }
}

/// A node list in sysfs form (`0-1,4`).
#[must_use]
pub fn format_node_list(nodes: &[u32]) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut i = 0;
    while i < nodes.len() {
        let mut j = i;
        while j + 1 < nodes.len() && nodes[j + 1] == nodes[j] + 1 {
            j += 1;
        }
        parts.push(if i == j {
            nodes[i].to_string()
        } else {
            format!("{}-{}", nodes[i], nodes[j])
        });
        i = j + 1;
    }
    parts.join(",")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_lists_parse_like_sysfs() {
        assert_eq!(parse_node_list("0\n"), Some(vec![0]));
        assert_eq!(parse_node_list("0-1\n"), Some(vec![0, 1]));
        assert_eq!(
            parse_node_list("0-3,8-11"),
            Some(vec![0, 1, 2, 3, 8, 9, 10, 11])
        );
        assert_eq!(parse_node_list("2,0,1-2"), Some(vec![0, 1, 2]));
        assert_eq!(parse_node_list("\n"), Some(vec![]));
        for bad in ["a", "1-", "-1", "3-1", "0,,1", "0-70000"] {
            assert_eq!(parse_node_list(bad), None, "{bad}");
        }
        assert_eq!(format_node_list(&[0, 1, 2, 3, 8, 10, 11]), "0-3,8,10-11");
        assert_eq!(format_node_list(&[]), "");
    }

    #[test]
    fn numa_node_files_parse_with_minus_one_as_none() {
        assert_eq!(parse_numa_node("1\n"), Some(1));
        assert_eq!(parse_numa_node("0"), Some(0));
        assert_eq!(parse_numa_node("-1\n"), None);
        assert_eq!(parse_numa_node(""), None);
        assert_eq!(parse_numa_node("x"), None);
    }

    #[test]
    fn cuda_bus_ids_map_to_sysfs_names() {
        assert_eq!(
            sysfs_bus_id("0000:3B:00.0").as_deref(),
            Some("0000:3b:00.0")
        );
        assert_eq!(
            sysfs_bus_id("00000000:E1:1F.7\0").as_deref(),
            Some("0000:e1:1f.7")
        );
        assert_eq!(
            sysfs_bus_id("0001:af:00.1").as_deref(),
            Some("0001:af:00.1")
        );
        assert_eq!(
            sysfs_bus_id("10000:01:00.0").as_deref(),
            Some("10000:01:00.0")
        );
        for bad in [
            "",
            "3B:00.0",
            "0000:3B:00",
            "0000:3G:00.0",
            "0000:3B:00.10",
            "../x:1:1.1",
        ] {
            assert_eq!(sysfs_bus_id(bad), None, "{bad}");
        }
    }

    #[test]
    #[cfg_attr(miri, ignore = "reads sysfs, which Miri's isolation hides")]
    fn a_missing_sysfs_entry_is_no_affinity() {
        let dir = std::env::temp_dir().join(format!("freekv-numa-{}", std::process::id()));
        let dev = dir.join("0000:e1:00.0");
        std::fs::create_dir_all(&dev).unwrap();
        std::fs::write(dev.join("numa_node"), "1\n").unwrap();
        let other = dir.join("0000:e2:00.0");
        std::fs::create_dir_all(&other).unwrap();
        std::fs::write(other.join("numa_node"), "-1\n").unwrap();
        assert_eq!(node_of_bus_id(&dir, "0000:e1:00.0"), Ok(1));
        assert!(node_of_bus_id(&dir, "0000:e2:00.0")
            .unwrap_err()
            .contains("numa_node is -1"));
        assert!(node_of_bus_id(&dir, "0000:e3:00.0")
            .unwrap_err()
            .contains("no sysfs numa_node"));
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(!online_nodes().is_empty());
    }

    fn found(node: u32) -> impl FnOnce((), i32) -> DeviceNode {
        move |(), _| DeviceNode::Node(node, "0000:3b:00.0".to_owned())
    }

    #[test]
    fn the_device_default_places_only_pinned_regions_on_multi_node_hosts() {
        let skip = |p: Result<Plan>| match p {
            Ok(Plan::Skip(why)) => why,
            other => panic!("{other:?}"),
        };
        let none = NumaPlacement::None;
        let dev = NumaPlacement::Device;
        assert_eq!(
            skip(plan(none, Some(((), 1)), &[0, 1], found(1))),
            "not requested"
        );
        assert!(skip(plan(dev, None::<((), i32)>, &[0, 1], found(1))).contains("not pinned"));
        assert_eq!(
            skip(plan(dev, Some(((), 1)), &[0], found(0))),
            "single NUMA node"
        );
        assert_eq!(
            plan(dev, Some(((), 1)), &[0, 1], found(1)).unwrap(),
            Plan::Bind {
                node: 1,
                policy: MemPolicy::Preferred,
                strict: false,
                detail: "GPU 1's node, PCI 0000:3b:00.0".to_owned(),
            }
        );
        let unknown = |(), d| DeviceNode::Unknown(format!("GPU {d} has no NUMA affinity"));
        assert!(skip(plan(dev, Some(((), 2)), &[0, 1], unknown)).contains("GPU 2"));
        assert!(skip(plan(dev, Some(((), 1)), &[0, 1], found(3))).contains("not online"));
    }

    #[test]
    fn an_explicit_node_must_be_online_and_binds_strictly() {
        let never = |(), _| -> DeviceNode { panic!("no device lookup for an explicit node") };
        assert_eq!(
            plan(NumaPlacement::Node(0), None::<((), i32)>, &[0], never).unwrap(),
            Plan::Bind {
                node: 0,
                policy: MemPolicy::Bind,
                strict: true,
                detail: "requested".to_owned(),
            }
        );
        match plan(NumaPlacement::Node(2), Some(((), 0)), &[0, 1], never) {
            Err(FreeKvError::NumaNodeUnavailable { node: 2, online }) => assert_eq!(online, "0-1"),
            other => panic!("{other:?}"),
        }
    }
}
