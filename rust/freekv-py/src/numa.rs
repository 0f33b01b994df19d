//! The ``numa`` argument of ``HostPagePool`` and ``StagingBuffer`` (``"device"``, a node
//! number, or ``None``) as a core `NumaPlacement`, and the reported policy's name.

use freekv_core::{NumaPlacement, NumaReport};
use pyo3::prelude::*;

/// The ``numa`` argument of a pool or buffer: ``"device"`` (the default), a node number, or
/// ``None``.
#[derive(FromPyObject)]
pub enum NumaArg {
    Node(i64),
    Name(String),
}

impl NumaArg {
    /// The default: the node of the pool's device.
    pub fn device() -> Option<Self> {
        Some(Self::Name("device".to_owned()))
    }
}

/// The core placement of a ``numa`` argument: ``ValueError`` for another string,
/// ``NumaNodeError`` for a negative node.
pub fn numa_placement(arg: Option<NumaArg>) -> PyResult<NumaPlacement> {
    match arg {
        None => Ok(NumaPlacement::None),
        Some(NumaArg::Name(name)) if name == "device" => Ok(NumaPlacement::Device),
        Some(NumaArg::Name(name)) => Err(pyo3::exceptions::PyValueError::new_err(format!(
            "numa must be \"device\", a node number or None, got {name:?}"
        ))),
        Some(NumaArg::Node(n)) => u32::try_from(n).map(NumaPlacement::Node).map_err(|_| {
            crate::errors::NumaNodeError::new_err(format!("{n} is not a NUMA node number"))
        }),
    }
}

/// The kernel's name of a report's memory policy, or None when unbound.
pub fn numa_policy(report: &NumaReport) -> Option<&'static str> {
    report.policy.map(freekv_core::MemPolicy::name)
}
