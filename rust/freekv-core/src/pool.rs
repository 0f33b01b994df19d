//! `HostPagePool`: the host arena of offloaded KV pages, page ids, and reference counts.
//!
//! The arena is one [`PinnedRegion`] of `capacity_pages * page_bytes` bytes; slot `i` is the
//! page at byte `i * page_bytes`. A [`PageId`] packs `(generation << 32) | slot`; a slot's
//! generation advances every time the slot is freed, so an id kept past its release fails
//! loudly ([`FreeKvError::StaleHandle`]) instead of reading a page that now belongs to
//! another request. Generations run from 1 to 2^31 - 1 and wrap to 1: the packed id 0 is
//! never valid, and every id is a positive `int64` (engine code keeps ids in int64 tensors).
//!
//! Reference counts: `alloc` returns pages with count 1; `retain` adds a holder (the prefix
//! cache sharing a page between requests, or a conversion job in flight); `release` drops
//! one, and the slot returns to the free list when the count reaches zero.
//!
//! Concurrency: all bookkeeping is in [`PageTable`] behind one `Mutex` (each call is a few
//! hundred nanoseconds; batch calls take the lock once). Page *bytes* are not protected by
//! the lock: the contract is that one (page, layer) has one writer at a time (the
//! conversion job that fills it) and no reader until that job's ticket has completed.
//! Every batch call validates all ids before changing anything, so a failed call leaves
//! the pool unchanged.
//!
//! Page bytes: Rust code reaches them only through [`LayerWrite`] / [`LayerRead`] guards,
//! which claim one (slot, layer) in a per-layer atomic (one writer, or any number of
//! readers). A conflicting claim is an error, never a wait, so two jobs that touch the same
//! (page, layer) at once fail loudly instead of racing. Torch views handed to Python
//! (`arena_view`, `page_view` in the binding) alias the same bytes outside these claims: the
//! engine must not read a page layer before the ticket of the job writing it has completed.

use std::ptr::NonNull;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, MutexGuard};

use crate::error::{FreeKvError, Result};
use crate::layout::PageGeometry;
use crate::pinned::{PinOptions, PinnedRegion};

/// Largest generation issued (ids stay below 2^63).
pub const MAX_GENERATION: u32 = (1 << 31) - 1;

/// A generation-checked handle to a host page, packed as `(generation << 32) | slot`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PageId(u64);

impl PageId {
    fn new(slot: u32, generation: u32) -> Self {
        Self((u64::from(generation) << 32) | u64::from(slot))
    }
    /// Rebuilds an id from its packed form (as held by Python). Validity is checked by the
    /// pool on use, not here.
    #[must_use]
    pub const fn from_raw(raw: u64) -> Self {
        Self(raw)
    }
    /// The packed form.
    #[must_use]
    pub const fn raw(self) -> u64 {
        self.0
    }
    /// Slot index in the arena (unchecked: use [`HostPagePool::index_of`] to validate).
    #[must_use]
    pub const fn slot(self) -> u32 {
        // Truncation keeps the low 32 bits: the slot by construction.
        #[allow(clippy::cast_possible_truncation)]
        let s = self.0 as u32;
        s
    }
    /// Generation the id was issued with.
    #[must_use]
    pub const fn generation(self) -> u32 {
        (self.0 >> 32) as u32
    }
}

/// Free list, generations and reference counts of `capacity` slots (no memory behind them).
/// Separate from the arena so it can be tested exhaustively (and under Miri).
#[derive(Debug, Clone)]
pub struct PageTable {
    generation: Vec<u32>,
    refcount: Vec<u32>,
    free: Vec<u32>,
}

impl PageTable {
    /// A table of `capacity` free slots.
    ///
    /// # Errors
    /// [`FreeKvError::Allocation`] when `capacity` does not fit the 32-bit slot field.
    pub fn new(capacity: usize) -> Result<Self> {
        let cap = u32::try_from(capacity).map_err(|_| {
            FreeKvError::Allocation(format!("{capacity} pages exceed the 2^32 slot limit"))
        })?;
        Ok(Self {
            generation: vec![1; capacity],
            refcount: vec![0; capacity],
            // Popped from the back: slot 0 first.
            free: (0..cap).rev().collect(),
        })
    }

    /// Slots in the table.
    #[must_use]
    pub fn capacity(&self) -> usize {
        self.refcount.len()
    }
    /// Slots on the free list.
    #[must_use]
    pub fn free_pages(&self) -> usize {
        self.free.len()
    }
    /// Slots with at least one holder.
    #[must_use]
    pub fn used_pages(&self) -> usize {
        self.capacity() - self.free.len()
    }

    /// Validates `id` and returns its slot.
    ///
    /// # Errors
    /// [`FreeKvError::StaleHandle`] when the slot is out of range, free, or reissued.
    pub fn slot_of(&self, id: PageId) -> Result<usize> {
        let slot = id.slot() as usize;
        let stale = |reason: String| FreeKvError::StaleHandle {
            id: id.raw(),
            reason,
        };
        let Some(&generation) = self.generation.get(slot) else {
            return Err(stale(format!(
                "slot {slot} out of range for {} pages",
                self.capacity()
            )));
        };
        if generation != id.generation() {
            return Err(stale(format!(
                "generation {} but slot {slot} is at generation {generation}",
                id.generation()
            )));
        }
        if self.refcount[slot] == 0 {
            return Err(stale(format!("slot {slot} is free")));
        }
        Ok(slot)
    }

    /// Takes `n` free slots, each with reference count 1; all or nothing.
    ///
    /// # Errors
    /// [`FreeKvError::PoolExhausted`] when fewer than `n` are free (nothing is taken).
    pub fn alloc(&mut self, n: usize) -> Result<Vec<PageId>> {
        if n > self.free.len() {
            return Err(FreeKvError::PoolExhausted {
                requested: n,
                free: self.free.len(),
                capacity: self.capacity(),
            });
        }
        let start = self.free.len() - n;
        let ids = self.free[start..]
            .iter()
            .rev()
            .map(|&s| {
                let slot = s as usize;
                debug_assert_eq!(self.refcount[slot], 0);
                self.refcount[slot] = 1;
                PageId::new(s, self.generation[slot])
            })
            .collect();
        self.free.truncate(start);
        Ok(ids)
    }

    /// Slots of `ids` with how often each occurs, after validating every id.
    fn validated_counts(&self, ids: &[PageId]) -> Result<Vec<(usize, u32)>> {
        let mut slots = ids
            .iter()
            .map(|&id| self.slot_of(id))
            .collect::<Result<Vec<_>>>()?;
        slots.sort_unstable();
        let mut counts: Vec<(usize, u32)> = Vec::with_capacity(slots.len());
        for s in slots {
            match counts.last_mut() {
                Some((last, c)) if *last == s => *c += 1,
                _ => counts.push((s, 1)),
            }
        }
        Ok(counts)
    }

    /// Adds one holder to each id (an id listed twice gains two).
    ///
    /// # Errors
    /// [`FreeKvError::StaleHandle`] for any invalid id; [`FreeKvError::InvariantViolation`]
    /// if a count would overflow. Nothing changes on error.
    pub fn retain(&mut self, ids: &[PageId]) -> Result<()> {
        let counts = self.validated_counts(ids)?;
        for &(s, c) in &counts {
            if self.refcount[s].checked_add(c).is_none() {
                return Err(FreeKvError::InvariantViolation(format!(
                    "reference count of slot {s} overflows"
                )));
            }
        }
        for (s, c) in counts {
            self.refcount[s] += c;
        }
        Ok(())
    }

    /// Drops one holder from each id; returns how many slots were freed.
    ///
    /// # Errors
    /// [`FreeKvError::StaleHandle`] for any invalid id, or an id listed more often than it
    /// has holders. Nothing changes on error.
    pub fn release(&mut self, ids: &[PageId]) -> Result<usize> {
        let counts = self.validated_counts(ids)?;
        if let Some(&(s, c)) = counts.iter().find(|&&(s, c)| self.refcount[s] < c) {
            let id = ids
                .iter()
                .find(|id| id.slot() as usize == s)
                .map_or(0, |id| id.raw());
            return Err(FreeKvError::StaleHandle {
                id,
                reason: format!(
                    "released {c} times but slot {s} has {} holder(s)",
                    self.refcount[s]
                ),
            });
        }
        let mut freed = 0;
        for (s, c) in counts {
            self.refcount[s] -= c;
            if self.refcount[s] == 0 {
                // Wrap within 1..2^31 so ids stay positive int64 and 0 stays invalid.
                let next = self.generation[s] + 1;
                self.generation[s] = if next > MAX_GENERATION { 1 } else { next };
                #[allow(clippy::cast_possible_truncation)] // slots < 2^32 (checked in new)
                self.free.push(s as u32);
                freed += 1;
            }
        }
        Ok(freed)
    }

    /// Current holder count of a live id.
    ///
    /// # Errors
    /// [`FreeKvError::StaleHandle`] for an invalid id.
    pub fn refcount(&self, id: PageId) -> Result<u32> {
        Ok(self.refcount[self.slot_of(id)?])
    }

    /// Checks: the free list has no duplicates and holds exactly the slots with count 0,
    /// and every generation is non-zero.
    ///
    /// # Errors
    /// [`FreeKvError::InvariantViolation`] describing the first inconsistency.
    pub fn check_invariants(&self) -> Result<()> {
        let bad = |m: String| Err(FreeKvError::InvariantViolation(m));
        let mut on_free = vec![false; self.capacity()];
        for &s in &self.free {
            let Some(seen) = on_free.get_mut(s as usize) else {
                return bad(format!("free list holds out-of-range slot {s}"));
            };
            if *seen {
                return bad(format!("slot {s} is on the free list twice"));
            }
            *seen = true;
        }
        for (s, (&free, &rc)) in on_free.iter().zip(&self.refcount).enumerate() {
            if free != (rc == 0) {
                return bad(format!("slot {s}: on free list = {free}, refcount = {rc}"));
            }
            if self.generation[s] == 0 || self.generation[s] > MAX_GENERATION {
                return bad(format!("slot {s} has generation {}", self.generation[s]));
            }
        }
        Ok(())
    }
}

/// The host page arena with its page table. Shared between threads as `Arc<HostPagePool>`.
#[derive(Debug)]
pub struct HostPagePool {
    geometry: PageGeometry,
    region: PinnedRegion,
    capacity: usize,
    table: Mutex<PageTable>,
    /// One per (slot, layer): 0 idle, `WRITER` claimed by a writer, else the reader count.
    claims: Vec<AtomicU32>,
}

const WRITER: u32 = u32::MAX;

/// Exclusive access to one layer of one page; released on drop.
#[derive(Debug)]
pub struct LayerWrite<'a> {
    claim: &'a AtomicU32,
    bytes: &'a mut [u8],
}

/// Shared access to one layer of one page; released on drop.
#[derive(Debug)]
pub struct LayerRead<'a> {
    claim: &'a AtomicU32,
    bytes: &'a [u8],
}

impl std::ops::Deref for LayerWrite<'_> {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        self.bytes
    }
}
impl std::ops::DerefMut for LayerWrite<'_> {
    fn deref_mut(&mut self) -> &mut [u8] {
        self.bytes
    }
}
impl Drop for LayerWrite<'_> {
    fn drop(&mut self) {
        self.claim.store(0, Ordering::Release);
    }
}
impl std::ops::Deref for LayerRead<'_> {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        self.bytes
    }
}
impl Drop for LayerRead<'_> {
    fn drop(&mut self) {
        self.claim.fetch_sub(1, Ordering::Release);
    }
}

impl HostPagePool {
    /// Maps an arena of `capacity_bytes / page_bytes` whole pages.
    ///
    /// # Errors
    /// [`FreeKvError::Allocation`] when the size holds no page or cannot be mapped;
    /// [`FreeKvError::Cuda`] when a device is present and pinning fails.
    pub fn new(geometry: PageGeometry, capacity_bytes: usize, opts: PinOptions) -> Result<Self> {
        let capacity = capacity_bytes / geometry.page_bytes();
        if capacity == 0 {
            return Err(FreeKvError::Allocation(format!(
                "capacity of {capacity_bytes} bytes holds no page of {} bytes",
                geometry.page_bytes()
            )));
        }
        let table = PageTable::new(capacity)?;
        let region = PinnedRegion::new(capacity * geometry.page_bytes(), opts)?;
        let claims = (0..capacity * geometry.num_layers())
            .map(|_| AtomicU32::new(0))
            .collect();
        Ok(Self {
            geometry,
            region,
            capacity,
            table: Mutex::new(table),
            claims,
        })
    }

    fn table(&self) -> MutexGuard<'_, PageTable> {
        // A panic while holding the lock cannot leave the table half-updated (every method
        // validates first, then mutates infallibly), so a poisoned lock is still consistent.
        self.table
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The page geometry.
    #[must_use]
    pub fn geometry(&self) -> &PageGeometry {
        &self.geometry
    }
    /// Pages in the arena.
    #[must_use]
    pub fn capacity_pages(&self) -> usize {
        self.capacity
    }
    /// Pages with at least one holder.
    #[must_use]
    pub fn used_pages(&self) -> usize {
        self.table().used_pages()
    }
    /// Pages on the free list.
    #[must_use]
    pub fn free_pages(&self) -> usize {
        self.table().free_pages()
    }
    /// Whether the arena is registered with CUDA.
    #[must_use]
    pub fn is_pinned(&self) -> bool {
        self.region.is_pinned()
    }
    /// CUDA device ordinal of the pool ([`PinOptions::device`]): current while the arena
    /// is registered and unregistered, and while conversion workers wait on job events.
    #[must_use]
    pub fn device(&self) -> i32 {
        self.region.device()
    }
    /// The arena's NUMA placement ([`PinOptions::numa`]): node and policy, or why none.
    #[must_use]
    pub fn numa(&self) -> &crate::NumaReport {
        self.region.numa()
    }
    /// Base of the arena (slot 0).
    #[must_use]
    pub fn arena_ptr(&self) -> NonNull<u8> {
        self.region.ptr()
    }
    /// Bytes of the arena (`capacity_pages * page_bytes`).
    #[must_use]
    pub fn arena_len(&self) -> usize {
        self.capacity * self.geometry.page_bytes()
    }

    /// See [`PageTable::alloc`].
    ///
    /// # Errors
    /// [`FreeKvError::PoolExhausted`].
    pub fn alloc(&self, n: usize) -> Result<Vec<PageId>> {
        self.table().alloc(n)
    }
    /// See [`PageTable::retain`].
    ///
    /// # Errors
    /// [`FreeKvError::StaleHandle`].
    pub fn retain(&self, ids: &[PageId]) -> Result<()> {
        self.table().retain(ids)
    }
    /// See [`PageTable::release`].
    ///
    /// # Errors
    /// [`FreeKvError::StaleHandle`].
    pub fn release(&self, ids: &[PageId]) -> Result<usize> {
        self.table().release(ids)
    }
    /// See [`PageTable::refcount`].
    ///
    /// # Errors
    /// [`FreeKvError::StaleHandle`].
    pub fn refcount(&self, id: PageId) -> Result<u32> {
        self.table().refcount(id)
    }
    /// Slot of a live id.
    ///
    /// # Errors
    /// [`FreeKvError::StaleHandle`].
    pub fn index_of(&self, id: PageId) -> Result<usize> {
        self.table().slot_of(id)
    }
    /// Slots of live ids, validated under one lock.
    ///
    /// # Errors
    /// [`FreeKvError::StaleHandle`] for the first invalid id.
    pub fn indices_of(&self, ids: &[PageId]) -> Result<Vec<usize>> {
        let t = self.table();
        ids.iter().map(|&id| t.slot_of(id)).collect()
    }
    /// See [`PageTable::check_invariants`].
    ///
    /// # Errors
    /// [`FreeKvError::InvariantViolation`].
    pub fn check_invariants(&self) -> Result<()> {
        self.table().check_invariants()
    }

    /// Byte offset of a live page in the arena.
    ///
    /// # Errors
    /// [`FreeKvError::StaleHandle`].
    pub fn page_offset(&self, id: PageId) -> Result<usize> {
        Ok(self.index_of(id)? * self.geometry.page_bytes())
    }

    fn layer_range(&self, slot: usize, layer: usize) -> Result<(usize, &AtomicU32)> {
        self.geometry.check_layer(layer)?;
        if slot >= self.capacity {
            return Err(FreeKvError::LayoutMismatch(format!(
                "slot {slot} out of range for {} pages",
                self.capacity
            )));
        }
        let off = slot * self.geometry.page_bytes() + layer * self.geometry.layer_bytes();
        Ok((off, &self.claims[slot * self.geometry.num_layers() + layer]))
    }

    fn busy(slot: usize, layer: usize, what: &str) -> FreeKvError {
        FreeKvError::JobFailed(format!(
            "page slot {slot} layer {layer} is {what} by another job at the same time"
        ))
    }

    /// Claims `layer` of arena slot `slot` for writing. Slots are not generation-checked
    /// here: callers hold a reference to the page (see [`HostPagePool::retain`]).
    ///
    /// # Errors
    /// [`FreeKvError::LayoutMismatch`] for an out-of-range slot or layer;
    /// [`FreeKvError::JobFailed`] when another guard holds the same (slot, layer).
    pub fn write_layer(&self, slot: usize, layer: usize) -> Result<LayerWrite<'_>> {
        let (off, claim) = self.layer_range(slot, layer)?;
        claim
            .compare_exchange(0, WRITER, Ordering::Acquire, Ordering::Relaxed)
            .map_err(|_| Self::busy(slot, layer, "in use"))?;
        // SAFETY: [1] `off + layer_bytes <= arena_len` (slot and layer checked above), so the
        // slice lies inside the live mapping owned by `self.region`, which outlives `'_`;
        // [2] the writer claim just taken excludes every other guard on these bytes until
        // the returned guard drops, so this is the only Rust reference to them.
        let bytes = unsafe {
            std::slice::from_raw_parts_mut(
                self.region.ptr().as_ptr().add(off),
                self.geometry.layer_bytes(),
            )
        };
        Ok(LayerWrite { claim, bytes })
    }

    /// Claims `layer` of arena slot `slot` for reading (shared with other readers).
    ///
    /// # Errors
    /// [`FreeKvError::LayoutMismatch`] for an out-of-range slot or layer;
    /// [`FreeKvError::JobFailed`] when a writer holds the same (slot, layer).
    pub fn read_layer(&self, slot: usize, layer: usize) -> Result<LayerRead<'_>> {
        let (off, claim) = self.layer_range(slot, layer)?;
        claim
            .fetch_update(Ordering::Acquire, Ordering::Relaxed, |c| {
                (c < WRITER - 1).then(|| c + 1)
            })
            .map_err(|_| Self::busy(slot, layer, "being written"))?;
        // SAFETY: [1] in bounds of the live mapping, as in `write_layer`; [2] the reader
        // claim excludes writers until the guard drops, so the bytes do not change under
        // this shared reference (other readers only read).
        let bytes = unsafe {
            std::slice::from_raw_parts(
                self.region.ptr().as_ptr().add(off),
                self.geometry.layer_bytes(),
            )
        };
        Ok(LayerRead { claim, bytes })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generations_reject_stale_ids() {
        let mut t = PageTable::new(2).unwrap();
        let a = t.alloc(1).unwrap()[0];
        assert_eq!(t.release(&[a]).unwrap(), 1);
        let b = t.alloc(1).unwrap()[0];
        assert_eq!(a.slot(), b.slot());
        assert_ne!(a, b);
        assert!(matches!(
            t.refcount(a),
            Err(FreeKvError::StaleHandle { .. })
        ));
        assert!(matches!(
            t.release(&[a]),
            Err(FreeKvError::StaleHandle { .. })
        ));
        assert!(matches!(
            t.slot_of(PageId::from_raw(0)),
            Err(FreeKvError::StaleHandle { .. })
        ));
        t.check_invariants().unwrap();
    }

    #[test]
    fn failed_batches_change_nothing() {
        let mut t = PageTable::new(3).unwrap();
        let ids = t.alloc(2).unwrap();
        assert!(matches!(
            t.alloc(2),
            Err(FreeKvError::PoolExhausted {
                requested: 2,
                free: 1,
                capacity: 3
            })
        ));
        // Releasing an id twice with one holder fails as a whole.
        assert!(matches!(
            t.release(&[ids[0], ids[1], ids[0]]),
            Err(FreeKvError::StaleHandle { .. })
        ));
        assert_eq!(t.used_pages(), 2);
        t.retain(&[ids[0], ids[0]]).unwrap();
        assert_eq!(t.refcount(ids[0]).unwrap(), 3);
        assert_eq!(t.release(&[ids[0], ids[0], ids[1]]).unwrap(), 1);
        assert_eq!(t.release(&[ids[0]]).unwrap(), 1);
        assert_eq!(t.free_pages(), 3);
        t.check_invariants().unwrap();
    }

    #[test]
    fn pool_capacity_and_errors() {
        let g = PageGeometry::new(2, 2, 4, 8, crate::layout::DType::Float16).unwrap();
        let opts = PinOptions {
            pin: false,
            huge_pages: false,
            device: 0,
            numa: crate::NumaPlacement::None,
        };
        assert!(matches!(
            HostPagePool::new(g, g.page_bytes() - 1, opts),
            Err(FreeKvError::Allocation(_))
        ));
        let p = HostPagePool::new(g, 3 * g.page_bytes() + 5, opts).unwrap();
        assert_eq!(p.capacity_pages(), 3);
        assert_eq!(p.arena_len(), 3 * g.page_bytes());
        let ids = p.alloc(3).unwrap();
        assert_eq!(p.indices_of(&ids).unwrap(), vec![0, 1, 2]);
        assert_eq!(p.page_offset(ids[2]).unwrap(), 2 * g.page_bytes());
        assert!(matches!(p.alloc(1), Err(FreeKvError::PoolExhausted { .. })));
        {
            let mut w = p.write_layer(1, 1).unwrap();
            w.fill(7);
            assert!(matches!(
                p.write_layer(1, 1),
                Err(FreeKvError::JobFailed(_))
            ));
            assert!(matches!(p.read_layer(1, 1), Err(FreeKvError::JobFailed(_))));
            assert!(matches!(
                p.write_layer(1, 2),
                Err(FreeKvError::LayoutMismatch(_))
            ));
            assert!(matches!(
                p.write_layer(3, 0),
                Err(FreeKvError::LayoutMismatch(_))
            ));
            let _other = p.write_layer(1, 0).unwrap();
        }
        let r1 = p.read_layer(1, 1).unwrap();
        let r2 = p.read_layer(1, 1).unwrap();
        assert!(r1.iter().chain(r2.iter()).all(|&b| b == 7));
        assert!(matches!(
            p.write_layer(1, 1),
            Err(FreeKvError::JobFailed(_))
        ));
        drop((r1, r2));
        drop(p.write_layer(1, 1).unwrap());
        p.release(&ids).unwrap();
        p.check_invariants().unwrap();
    }
}
