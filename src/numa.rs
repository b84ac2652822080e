//! Pinning a rank next to its GPU: hwloc finds the NUMA nodes; the rank binds its threads and
//! memory to the chosen node and reports where it actually landed. Binding that the machine
//! refuses (one node, containers) is a warning, never an error.

use std::fmt;

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

/// The CPUs this process may run on, as a compact list ("0-15,32-47").
pub fn current_cpus() -> String {
    let Ok(set) = nix::sched::sched_getaffinity(nix::unistd::Pid::from_raw(0)) else { return "?".into() };
    let cpus: Vec<usize> = (0..nix::sched::CpuSet::count()).filter(|&c| set.is_set(c).unwrap_or(false)).collect();
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

/// Binds this process to a NUMA node: the one asked for, else the GPU's, else `rank` modulo the
/// nodes that have CPUs.
pub fn pin(rank: usize, numa_node: Option<usize>, gpu: Option<usize>) -> Placement {
    let mut p = Placement { gpu, ..Default::default() };
    let wanted = numa_node.or_else(|| gpu.and_then(gpu_node));
    bind(rank, wanted, &mut p);
    p.cpus = current_cpus();
    for w in &p.warnings {
        tracing::warn!("rank {rank}: {w}");
    }
    p
}

#[cfg(feature = "hwloc")]
fn bind(rank: usize, wanted: Option<usize>, p: &mut Placement) {
    use hwlocality::cpu::binding::CpuBindingFlags;
    use hwlocality::memory::binding::{MemoryBindingFlags, MemoryBindingPolicy};
    use hwlocality::object::types::ObjectType;
    use hwlocality::Topology;

    let topo = match Topology::new() {
        Ok(t) => t,
        Err(e) => {
            p.warnings.push(format!("hwloc cannot read the topology ({e}); not pinned"));
            return;
        }
    };
    let nodes: Vec<_> = topo.objects_with_type(ObjectType::NUMANode).filter(|n| n.cpuset().is_some_and(|c| !c.is_empty())).collect();
    p.nodes_total = nodes.len();
    if nodes.is_empty() {
        p.warnings.push("no NUMA node with CPUs found; not pinned".into());
        return;
    }
    let target = match wanted {
        Some(w) => match nodes.iter().find(|n| n.os_index() == Some(w)) {
            Some(n) => *n,
            None => {
                p.warnings.push(format!("NUMA node {w} does not exist or has no CPUs; using node {}", nodes[rank % nodes.len()].os_index().unwrap_or(0)));
                nodes[rank % nodes.len()]
            }
        },
        None => nodes[rank % nodes.len()],
    };
    p.node = target.os_index();
    if let Some(cpus) = target.cpuset() {
        if let Err(e) = topo.bind_cpu(&*cpus, CpuBindingFlags::PROCESS) {
            p.warnings.push(format!("cannot bind CPUs to node {:?}: {e}", p.node));
        }
    }
    if let Some(nodeset) = target.nodeset() {
        // Linux binds memory per thread: bind this (main) thread before the workers start.
        let r = topo
            .bind_memory(nodeset, MemoryBindingPolicy::Bind, MemoryBindingFlags::PROCESS)
            .or_else(|_| topo.bind_memory(nodeset, MemoryBindingPolicy::Bind, MemoryBindingFlags::THREAD));
        if let Err(e) = r {
            p.warnings.push(format!("cannot bind memory to node {:?}: {e}", p.node));
        }
    }
}

#[cfg(not(feature = "hwloc"))]
fn bind(_rank: usize, wanted: Option<usize>, p: &mut Placement) {
    p.node = None;
    p.warnings.push(format!("built without hwloc: not pinned (wanted node {wanted:?})"));
}
