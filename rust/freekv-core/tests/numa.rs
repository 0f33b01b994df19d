//! NUMA placement of a region, checked in the kernel's own view: an explicit node binds the
//! pages there (`get_mempolicy` of a touched page), a node that is not online is refused with
//! the named error, and a region placed nowhere says why.

use freekv_core::{FreeKvError, MemPolicy, NumaPlacement, NumaReport, PinOptions, PinnedRegion};

const MPOL_F_NODE: libc::c_ulong = 1;
const MPOL_F_ADDR: libc::c_ulong = 2;

/// `get_mempolicy(2)` of the page at `addr`: `MPOL_F_ADDR` gives the range's mode and
/// node mask, `MPOL_F_NODE | MPOL_F_ADDR` the node the (present) page lives on.
fn mempolicy(addr: *mut u8, flags: libc::c_ulong) -> (libc::c_int, Vec<u32>) {
    let mut mode: libc::c_int = -1;
    let mut mask = [0 as libc::c_ulong; 16];
    let bits = mask.len() * libc::c_ulong::BITS as usize;
    // SAFETY: [1] `mode` and `mask` are writable for the call (the kernel writes at most
    // `bits` bits of the mask); [2] `addr` lies in a live mapping of the caller's;
    // [3] get_mempolicy changes no memory but those outputs.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_get_mempolicy,
            &raw mut mode,
            mask.as_mut_ptr(),
            bits,
            addr,
            flags,
        )
    };
    assert_eq!(rc, 0, "get_mempolicy: {}", std::io::Error::last_os_error());
    let nodes = (0..bits)
        .filter(|&b| mask[b / 64] & (1 << (b % 64)) != 0)
        .map(|b| u32::try_from(b).unwrap())
        .collect();
    (mode, nodes)
}

#[test]
#[cfg_attr(
    miri,
    ignore = "mbind and get_mempolicy are syscalls Miri does not run"
)]
fn an_explicit_node_binds_the_pages_there() {
    for huge_pages in [false, true] {
        let opts = PinOptions {
            pin: false,
            huge_pages,
            numa: NumaPlacement::Node(0),
            ..PinOptions::default()
        };
        let r = PinnedRegion::new(3 << 20, opts).unwrap();
        assert_eq!(r.numa().node, Some(0));
        assert_eq!(r.numa().policy, Some(MemPolicy::Bind));
        assert_eq!(r.numa().detail, "requested, MPOL_BIND");
        let last = r.ptr().as_ptr().wrapping_add(r.len() - 1);
        assert_eq!(mempolicy(last, MPOL_F_ADDR), (libc::MPOL_BIND, vec![0]));
        // SAFETY: [1] `last` is the region's last byte; [2] nothing else aliases it.
        unsafe { last.write(7) };
        let (node, _) = mempolicy(last, MPOL_F_NODE | MPOL_F_ADDR);
        assert_eq!(node, 0);
    }
}

#[test]
#[cfg_attr(miri, ignore = "reads sysfs, which Miri's isolation hides")]
fn a_node_that_is_not_online_is_refused() {
    let missing = freekv_core::numa::online_nodes().last().unwrap() + 1;
    let opts = PinOptions {
        pin: false,
        numa: NumaPlacement::Node(missing),
        ..PinOptions::default()
    };
    match PinnedRegion::new(4096, opts) {
        Err(e @ FreeKvError::NumaNodeUnavailable { .. }) => {
            assert!(e
                .to_string()
                .starts_with(&format!("NUMA node {missing} is not online")));
        }
        other => panic!("{other:?}"),
    }
}

fn unplaced(detail: &str) -> NumaReport {
    NumaReport {
        node: None,
        policy: None,
        detail: detail.to_owned(),
    }
}

#[test]
fn unplaced_regions_say_why() {
    let opts = PinOptions {
        pin: false,
        ..PinOptions::default()
    };
    let r = PinnedRegion::new(4096, opts).unwrap();
    assert_eq!(r.numa(), &unplaced("not pinned for a CUDA device"));
    let opts = PinOptions {
        numa: NumaPlacement::None,
        ..opts
    };
    let r = PinnedRegion::new(4096, opts).unwrap();
    assert_eq!(r.numa(), &unplaced("not requested"));
}
