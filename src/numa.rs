//! Pinning a rank next to its GPU. The NUMA nodes with CPUs are read from sysfs (or, built with
//! the `hwloc` feature, discovered by hwloc); the rank binds its threads (sched_setaffinity) and
//! its memory (set_mempolicy, MPOL_BIND) to the chosen node and reports where it actually
//! landed. Binding that the machine refuses (one node, containers) is a warning, never an error.
//! Threads and allocations made after pinning inherit it, so ranks pin before starting workers.

use std::fmt;

/// A NUMA node that has CPUs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NumaNode {
    pub id: usize,
    pub cpus: Vec<usize>,
}

/// Where a rank runs.
#[derive(Clone, Debug, Default)]
pub struct Placement {
    pub node: Option<usize>,
    pub nodes_total: usize,
    pub cpus: String,
    pub gpu: Option<usize>,
    pub warnings: Vec<String>,
}

impl fmt::Display for Placement {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let node = self.node.map_or("unbound".to_string(), |n| format!("NUMA node {n} of {}", self.nodes_total));
        let gpu = self.gpu.map_or("no GPU".to_string(), |g| format!("GPU {g}"));
        write!(f, "{node}, cpus {}, {gpu}", self.cpus)
    }
}

/// Parses a kernel CPU list such as "0-3,8,10-11".
pub fn parse_cpulist(s: &str) -> Vec<usize> {
    let mut out = Vec::new();
    for part in s.trim().split(',').filter(|p| !p.is_empty()) {
        match part.split_once('-') {
            Some((a, b)) => {
                if let (Ok(a), Ok(b)) = (a.trim().parse::<usize>(), b.trim().parse::<usize>()) {
                    out.extend(a..=b);
                }
            }
            None => out.extend(part.trim().parse::<usize>()),
        }
    }
    out
}

/// Formats CPUs compactly ("0-15,32-47").
pub fn format_cpulist(cpus: &[usize]) -> String {
    let mut out = Vec::new();
    let mut i = 0;
    while i < cpus.len() {
        let mut j = i;
        while j + 1 < cpus.len() && cpus[j + 1] == cpus[j] + 1 {
            j += 1;
        }
        out.push(if i == j { cpus[i].to_string() } else { format!("{}-{}", cpus[i], cpus[j]) });
        i = j + 1;
    }
    out.join(",")
}

/// NUMA nodes with CPUs (GPU-memory nodes have none and are skipped).
#[cfg(not(feature = "hwloc"))]
pub fn nodes() -> Vec<NumaNode> {
    let mut nodes: Vec<NumaNode> = std::fs::read_dir("/sys/devices/system/node")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let id = name.strip_prefix("node")?.parse::<usize>().ok()?;
            let cpus = parse_cpulist(&std::fs::read_to_string(e.path().join("cpulist")).ok()?);
            (!cpus.is_empty()).then_some(NumaNode { id, cpus })
        })
        .collect();
    nodes.sort_by_key(|n| n.id);
    nodes
}

/// NUMA nodes with CPUs, as hwloc sees them.
#[cfg(feature = "hwloc")]
pub fn nodes() -> Vec<NumaNode> {
    use hwlocality::object::types::ObjectType;
    let Ok(topo) = hwlocality::Topology::new() else { return vec![] };
    let mut nodes: Vec<NumaNode> = topo
        .objects_with_type(ObjectType::NUMANode)
        .filter_map(|n| {
            let cpus: Vec<usize> = n.cpuset()?.iter_set().map(usize::from).collect();
            (!cpus.is_empty()).then_some(NumaNode { id: n.os_index()?, cpus })
        })
        .collect();
    nodes.sort_by_key(|n| n.id);
    nodes
}

/// The CPUs this thread may run on.
pub fn current_cpus() -> String {
    let Ok(set) = nix::sched::sched_getaffinity(nix::unistd::Pid::from_raw(0)) else { return "?".into() };
    let cpus: Vec<usize> = (0..nix::sched::CpuSet::count()).filter(|&c| set.is_set(c).unwrap_or(false)).collect();
    format_cpulist(&cpus)
}

/// The NUMA node of a GPU, from its PCI address in sysfs.
pub fn gpu_node(gpu: usize) -> Option<usize> {
    use cudarc::driver::sys::CUdevice_attribute_enum as A;
    if !unsafe { cudarc::driver::sys::is_culib_present() } {
        return None;
    }
    cudarc::driver::result::init().ok()?;
    let dev = cudarc::driver::result::device::get(gpu as i32).ok()?;
    let attr = |a| unsafe { cudarc::driver::result::device::get_attribute(dev, a) }.ok();
    let (domain, bus, device) = (attr(A::CU_DEVICE_ATTRIBUTE_PCI_DOMAIN_ID)?, attr(A::CU_DEVICE_ATTRIBUTE_PCI_BUS_ID)?, attr(A::CU_DEVICE_ATTRIBUTE_PCI_DEVICE_ID)?);
    let path = format!("/sys/bus/pci/devices/{domain:04x}:{bus:02x}:{device:02x}.0/numa_node");
    std::fs::read_to_string(path).ok()?.trim().parse::<i64>().ok().filter(|n| *n >= 0).map(|n| n as usize)
}

/// Binds this thread (and what it starts later) to a NUMA node: the one asked for, else the
/// GPU's, else `rank` modulo the nodes with CPUs.
pub fn pin(rank: usize, numa_node: Option<usize>, gpu: Option<usize>) -> Placement {
    let mut p = Placement { gpu, ..Default::default() };
    let nodes = nodes();
    p.nodes_total = nodes.len();
    if nodes.is_empty() {
        p.warnings.push("no NUMA node with CPUs found; not pinned".into());
    } else {
        let wanted = numa_node.or_else(|| gpu.and_then(gpu_node));
        let fallback = &nodes[rank % nodes.len()];
        let target = match wanted {
            Some(w) => nodes.iter().find(|n| n.id == w).unwrap_or_else(|| {
                p.warnings.push(format!("NUMA node {w} does not exist or has no CPUs; using node {}", fallback.id));
                fallback
            }),
            None => fallback,
        };
        p.node = Some(target.id);
        bind(target, &mut p);
    }
    p.cpus = current_cpus();
    for w in &p.warnings {
        tracing::warn!("rank {rank}: {w}");
    }
    p
}

fn bind(node: &NumaNode, p: &mut Placement) {
    let mut set = nix::sched::CpuSet::new();
    for &c in &node.cpus {
        let _ = set.set(c);
    }
    if let Err(e) = nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set) {
        p.warnings.push(format!("cannot bind CPUs to node {}: {e}", node.id));
    }
    if let Err(e) = set_memory_policy(node.id, None) {
        p.warnings.push(format!("cannot bind memory to node {}: {e}", node.id));
    }
}

/// Binds future allocations of this process (`region` None, set_mempolicy) or the pages of one
/// mapping (mbind) to NUMA node `node`.
pub fn set_memory_policy(node: usize, region: Option<(*mut u8, usize)>) -> std::io::Result<()> {
    if node >= 64 {
        return Err(std::io::Error::other("node ids above 63 are not supported"));
    }
    let mask: u64 = 1 << node;
    const MPOL_BIND: i64 = 2;
    // Safety: plain syscalls with a valid mask pointer and its size in bits (+1, as the kernel
    // wants); mbind only changes the policy of a mapping the caller owns.
    let rc = unsafe {
        match region {
            None => libc::syscall(libc::SYS_set_mempolicy, MPOL_BIND, &mask as *const u64, 65usize),
            Some((addr, len)) => libc::syscall(libc::SYS_mbind, addr as usize, len, MPOL_BIND, &mask as *const u64, 65usize, 0usize),
        }
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpulists() {
        assert_eq!(parse_cpulist("0-3,8,10-11\n"), vec![0, 1, 2, 3, 8, 10, 11]);
        assert_eq!(format_cpulist(&[0, 1, 2, 3, 8, 10, 11]), "0-3,8,10-11");
        assert!(parse_cpulist("").is_empty());
    }

    #[test]
    fn pinning_never_fails() {
        let p = pin(0, None, None);
        assert!(!p.cpus.is_empty());
    }
}
