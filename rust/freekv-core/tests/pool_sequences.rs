//! Sequence fuzzing of the real `HostPagePool` (arena, page table and layer claims together)
//! against a plain model, checked after every operation.
//!
//! Each case runs a random sequence of batch calls: allocations (sometimes larger than what
//! is free), retains and releases of batches with repeated ids, batches that mix live ids
//! with a stale, forged or over-released one (which must fail and change nothing), layer
//! writes that stamp a page with its owner, and read-backs of those stamps. After every
//! operation the pool's counts, every live id's holder count and slot, the rejection of
//! every dead id and `check_invariants` are compared with the model. A final test runs the
//! same calls from several threads on one shared pool and checks the pool ends empty.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;

use freekv_core::pool::MAX_GENERATION;
use freekv_core::{DType, FreeKvError, HostPagePool, PageGeometry, PageId, PinOptions};
use proptest::prelude::*;

const LAYERS: usize = 2;

fn geometry() -> PageGeometry {
    PageGeometry::new(LAYERS, 1, 2, 4, DType::Float16).unwrap()
}

fn pool(capacity: usize) -> HostPagePool {
    let g = geometry();
    let opts = PinOptions {
        pin: false,
        huge_pages: false,
        device: 0,
        numa: freekv_core::NumaPlacement::None,
    };
    HostPagePool::new(g, capacity * g.page_bytes(), opts).unwrap()
}

#[derive(Debug, Clone)]
enum Op {
    /// Allocate `n` pages (may exceed what is free).
    Alloc(usize),
    /// Retain the live ids picked by these indices (repeats allowed).
    Retain(Vec<usize>),
    /// Release the live ids picked by these indices (repeats allowed; may over-release).
    Release(Vec<usize>),
    /// A batch of live ids plus one dead id: retain or release must fail as a whole.
    MixedWithStale(Vec<usize>, usize, bool),
    /// A batch of live ids plus one forged id (out-of-range slot, generation 0, or a live
    /// slot under a wrong generation): must fail as a whole.
    MixedWithForged(Vec<usize>, u8, usize, bool),
    /// Stamp layer `layer` of a live page with a byte derived from its id.
    Write(usize, usize),
    /// Read every live page's stamped layers back.
    ReadBack,
}

fn picks() -> impl Strategy<Value = Vec<usize>> {
    prop::collection::vec(any::<usize>(), 0..5)
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0usize..7).prop_map(Op::Alloc),
        2 => picks().prop_map(Op::Retain),
        4 => picks().prop_map(Op::Release),
        1 => (picks(), any::<usize>(), any::<bool>())
            .prop_map(|(v, d, r)| Op::MixedWithStale(v, d, r)),
        1 => (picks(), 0u8..3, any::<usize>(), any::<bool>())
            .prop_map(|(v, k, i, r)| Op::MixedWithForged(v, k, i, r)),
        2 => (any::<usize>(), 0usize..LAYERS).prop_map(|(i, l)| Op::Write(i, l)),
        1 => Just(Op::ReadBack),
    ]
}

/// The model: live id -> holders, stamped (id, layer) -> byte, and every id ever freed.
#[derive(Default)]
struct Model {
    live: BTreeMap<PageId, u32>,
    stamps: BTreeMap<(PageId, usize), u8>,
    dead: Vec<PageId>,
}

impl Model {
    fn pick(&self, picks: &[usize]) -> Vec<PageId> {
        let keys: Vec<PageId> = self.live.keys().copied().collect();
        if keys.is_empty() {
            return Vec::new();
        }
        picks.iter().map(|&i| keys[i % keys.len()]).collect()
    }

    fn drop_holders(&mut self, ids: &[PageId]) -> usize {
        let mut freed = 0;
        for id in ids {
            let rc = self.live.get_mut(id).unwrap();
            *rc -= 1;
            if *rc == 0 {
                self.live.remove(id);
                self.stamps.retain(|(i, _), _| i != id);
                self.dead.push(*id);
                freed += 1;
            }
        }
        freed
    }
}

fn stamp(id: PageId, layer: usize) -> u8 {
    // Distinct for pages that share a slot across generations and for the two layers.
    #[allow(clippy::cast_possible_truncation)]
    let b = (id.raw() ^ (id.raw() >> 29) ^ (layer as u64 * 0x55)) as u8;
    b | 1
}

fn over_released(model: &Model, ids: &[PageId]) -> bool {
    let mut n: BTreeMap<PageId, u32> = BTreeMap::new();
    for id in ids {
        *n.entry(*id).or_default() += 1;
    }
    n.iter().any(|(id, c)| model.live[id] < *c)
}

fn is_stale<T: std::fmt::Debug>(r: &freekv_core::Result<T>) -> bool {
    matches!(r, Err(FreeKvError::StaleHandle { .. }))
}

fn check(p: &HostPagePool, m: &Model, capacity: usize) -> Result<(), TestCaseError> {
    p.check_invariants().unwrap();
    prop_assert_eq!(p.used_pages(), m.live.len());
    prop_assert_eq!(p.free_pages(), capacity - m.live.len());
    let ids: Vec<PageId> = m.live.keys().copied().collect();
    let slots = p.indices_of(&ids).unwrap();
    prop_assert_eq!(slots.iter().collect::<HashSet<_>>().len(), ids.len());
    for ((&id, &rc), &slot) in m.live.iter().zip(&slots) {
        prop_assert_eq!(p.refcount(id).unwrap(), rc);
        prop_assert_eq!(slot, id.slot() as usize);
        prop_assert!(slot < capacity);
        prop_assert_eq!(p.page_offset(id).unwrap(), slot * geometry().page_bytes());
    }
    for &id in &m.dead {
        prop_assert!(is_stale(&p.refcount(id)));
        prop_assert!(is_stale(&p.index_of(id)));
    }
    Ok(())
}

fn run(capacity: usize, ops: Vec<Op>) -> Result<(), TestCaseError> {
    let p = pool(capacity);
    let mut m = Model::default();
    for op in ops {
        match op {
            Op::Alloc(n) => match p.alloc(n) {
                Ok(ids) => {
                    prop_assert!(n <= capacity - m.live.len());
                    prop_assert_eq!(ids.len(), n);
                    for id in ids {
                        prop_assert!(id.raw() > 0 && i64::try_from(id.raw()).is_ok());
                        prop_assert!((1..=MAX_GENERATION).contains(&id.generation()));
                        prop_assert!(!m.live.keys().any(|l| l.slot() == id.slot()));
                        prop_assert!(!m.dead.contains(&id), "reissued a dead id");
                        m.live.insert(id, 1);
                    }
                }
                Err(FreeKvError::PoolExhausted {
                    requested,
                    free,
                    capacity: c,
                }) => {
                    prop_assert_eq!((requested, free, c), (n, capacity - m.live.len(), capacity));
                    prop_assert!(n > free);
                }
                Err(e) => prop_assert!(false, "unexpected {e}"),
            },
            Op::Retain(picks) => {
                let ids = m.pick(&picks);
                p.retain(&ids).unwrap();
                for id in ids {
                    *m.live.get_mut(&id).unwrap() += 1;
                }
            }
            Op::Release(picks) => {
                let ids = m.pick(&picks);
                let r = p.release(&ids);
                if over_released(&m, &ids) {
                    prop_assert!(is_stale(&r), "over-release accepted: {r:?}");
                } else {
                    let freed = m.drop_holders(&ids);
                    prop_assert_eq!(r.unwrap(), freed);
                }
            }
            Op::MixedWithStale(picks, d, retain) => {
                if m.dead.is_empty() {
                    continue;
                }
                let mut ids = m.pick(&picks);
                let pos = d % (ids.len() + 1);
                ids.insert(pos, m.dead[d % m.dead.len()]);
                if retain {
                    prop_assert!(is_stale(&p.retain(&ids)));
                } else {
                    prop_assert!(is_stale(&p.release(&ids)));
                }
                prop_assert!(is_stale(&p.indices_of(&ids)));
            }
            Op::MixedWithForged(picks, kind, i, retain) => {
                let mut ids = m.pick(&picks);
                let forged = match kind {
                    0 => PageId::from_raw((1u64 << 32) | (capacity as u64 + (i % 1000) as u64)),
                    1 => PageId::from_raw((i % capacity) as u64),
                    _ => match ids.first() {
                        Some(id) => PageId::from_raw(
                            (u64::from(id.generation() % MAX_GENERATION + 1) << 32)
                                | u64::from(id.slot()),
                        ),
                        None => PageId::from_raw(0),
                    },
                };
                ids.push(forged);
                if retain {
                    prop_assert!(is_stale(&p.retain(&ids)));
                } else {
                    prop_assert!(is_stale(&p.release(&ids)));
                }
            }
            Op::Write(i, layer) => {
                let Some(&id) = m.pick(&[i]).first() else {
                    continue;
                };
                let slot = p.index_of(id).unwrap();
                let b = stamp(id, layer);
                p.write_layer(slot, layer).unwrap().fill(b);
                m.stamps.insert((id, layer), b);
            }
            Op::ReadBack => {
                for (&(id, layer), &b) in &m.stamps {
                    let slot = p.index_of(id).unwrap();
                    let r = p.read_layer(slot, layer).unwrap();
                    prop_assert!(
                        r.iter().all(|&x| x == b),
                        "page {id:?} layer {layer} changed"
                    );
                }
            }
        }
        check(&p, &m, capacity)?;
    }
    // Releasing every holder empties the pool.
    let all: Vec<PageId> = m
        .live
        .iter()
        .flat_map(|(&id, &rc)| std::iter::repeat_n(id, rc as usize))
        .collect();
    prop_assert_eq!(p.release(&all).unwrap(), m.live.len());
    prop_assert_eq!(p.used_pages(), 0);
    p.check_invariants().unwrap();
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 3000, ..ProptestConfig::default() })]

    #[test]
    fn pool_matches_model_after_every_op(
        capacity in 1usize..10,
        ops in prop::collection::vec(op(), 1..60),
    ) {
        run(capacity, ops)?;
    }
}

#[test]
fn threads_sharing_one_pool_end_empty() {
    let capacity = 64;
    let p = Arc::new(pool(capacity));
    let handles: Vec<_> = (0..4u64)
        .map(|t| {
            let p = Arc::clone(&p);
            std::thread::spawn(move || {
                // A small deterministic generator per thread (xorshift).
                let mut x = 0x9E37_79B9_7F4A_7C15 ^ (t + 1);
                let mut next = move || {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x
                };
                let mut held: Vec<PageId> = Vec::new();
                for _ in 0..4000 {
                    match next() % 4 {
                        0 | 1 => {
                            #[allow(clippy::cast_possible_truncation)]
                            let n = (next() % 4) as usize;
                            if let Ok(ids) = p.alloc(n) {
                                for &id in &ids {
                                    let slot = p.index_of(id).unwrap();
                                    #[allow(clippy::cast_possible_truncation)]
                                    p.write_layer(slot, 0).unwrap().fill(t as u8 + 1);
                                }
                                held.extend(ids);
                            }
                        }
                        2 if !held.is_empty() => {
                            #[allow(clippy::cast_possible_truncation)]
                            let i = (next() % held.len() as u64) as usize;
                            let id = held.swap_remove(i);
                            let slot = p.index_of(id).unwrap();
                            // No other thread wrote into a page this thread holds.
                            #[allow(clippy::cast_possible_truncation)]
                            let mine = t as u8 + 1;
                            assert!(p.read_layer(slot, 0).unwrap().iter().all(|&b| b == mine));
                            assert_eq!(p.release(&[id]).unwrap(), 1);
                            assert!(p.refcount(id).is_err());
                        }
                        _ => {
                            if let Some(&id) = held.first() {
                                p.retain(&[id]).unwrap();
                                assert_eq!(p.release(&[id]).unwrap(), 0);
                            }
                        }
                    }
                }
                p.release(&held).unwrap();
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    assert_eq!(p.used_pages(), 0);
    assert_eq!(p.free_pages(), capacity);
    p.check_invariants().unwrap();
}
