//! DMA memory: page-aligned regions (2 MiB huge pages when the system has them) and the
//! per-core buffer pool carved out of one region.
//!
//! A region is mapped once at reactor start and registered with that core's io_uring as fixed
//! buffers. The pool hands out fixed-size buffers from a free stack: get and put are a push and
//! a pop on a `Vec` that never grows, so the I/O path never allocates. An empty pool is
//! back-pressure: `get` returns `None` and the caller waits for a buffer to come back.
//!
//! This module and the ring glue are the only places that turn raw addresses into slices, and
//! [`IoBuf`], the view that reaches io_uring, can only be made here: from a pool buffer, a
//! checked piece of another view, or an `unsafe fn` whose caller vouches for the memory.

use std::ptr::NonNull;

/// Size of one huge page on x86-64 and arm64 with 4 KiB base pages.
pub const HUGE_PAGE_BYTES: usize = 2 << 20;
/// Alignment every DMA buffer honours; enough for O_DIRECT on 4Kn and 512e devices.
pub const DMA_ALIGN_BYTES: usize = 4096;
/// io_uring refuses a single registered buffer larger than this.
pub const REGISTERED_BUFFER_MAX_BYTES: usize = 1 << 30;

#[derive(Debug, thiserror::Error)]
pub enum DmaError {
    #[error("buffer size {size_bytes} must be a non-zero multiple of {DMA_ALIGN_BYTES}")]
    BufferSize { size_bytes: u32 },
    #[error("buffer pool of {count} x {size_bytes} bytes exceeds the {REGISTERED_BUFFER_MAX_BYTES}-byte per-core limit")]
    PoolTooLarge { count: u32, size_bytes: u32 },
    #[error("buffer pool needs at least one buffer")]
    PoolEmpty,
    #[error("mapping {len_bytes} bytes of DMA memory failed: {source}")]
    Map {
        len_bytes: usize,
        source: std::io::Error,
    },
}

/// Which memory backs a region, reported in the log at start.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backing {
    HugePages,
    AnonymousPages,
}

impl std::fmt::Display for Backing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Backing::HugePages => "2 MiB huge pages",
            Backing::AnonymousPages => "anonymous 4 KiB pages",
        })
    }
}

/// A page-aligned anonymous mapping, unmapped on drop.
#[derive(Debug)]
pub struct Region {
    base: NonNull<u8>,
    len_bytes: usize,
    backing: Backing,
}

// SAFETY: the region is plain memory owned by this value; every access goes through raw
// pointers handed out by `BufPool` or the malloc bdev, which give each buffer one owner.
unsafe impl Send for Region {}
// SAFETY: as above; the region itself is never read or written through `&Region`.
unsafe impl Sync for Region {}

impl Region {
    /// Maps `len_bytes` (rounded up to whole pages). Huge pages are tried first when
    /// `try_huge` is set. `populate` faults every page in now, so the first I/O does not.
    pub fn map(len_bytes: usize, try_huge: bool, populate: bool) -> Result<Region, DmaError> {
        let populate = if populate { libc::MAP_POPULATE } else { 0 };
        let len_bytes = len_bytes.next_multiple_of(DMA_ALIGN_BYTES);
        if try_huge {
            let huge_len = len_bytes.next_multiple_of(HUGE_PAGE_BYTES);
            if let Ok(base) = mmap_anon(huge_len, libc::MAP_HUGETLB | populate) {
                return Ok(Region {
                    base,
                    len_bytes: huge_len,
                    backing: Backing::HugePages,
                });
            }
        }
        let base =
            mmap_anon(len_bytes, populate).map_err(|source| DmaError::Map { len_bytes, source })?;
        Ok(Region {
            base,
            len_bytes,
            backing: Backing::AnonymousPages,
        })
    }

    pub fn base(&self) -> *mut u8 {
        self.base.as_ptr()
    }

    pub fn len_bytes(&self) -> usize {
        self.len_bytes
    }

    pub fn backing(&self) -> Backing {
        self.backing
    }

    /// A view of `[offset_bytes, offset_bytes + len_bytes)` of this region for a request. A span
    /// outside the region is a programmer error and panics.
    ///
    /// # Safety
    /// The region outlives every request submitted with the view. While a request that fills
    /// the span (a read) is in flight nothing else reads or writes it; while one that only
    /// reads it (a write) is in flight nothing writes it.
    pub unsafe fn io_buf(&self, offset_bytes: usize, len_bytes: u32) -> IoBuf {
        assert!(
            offset_bytes
                .checked_add(len_bytes as usize)
                .is_some_and(|end| end <= self.len_bytes),
            "span at {offset_bytes} of {len_bytes} bytes outside a {}-byte region",
            self.len_bytes
        );
        IoBuf {
            // SAFETY: offset_bytes <= len_bytes (checked above), so the result stays inside the
            // mapping.
            ptr: unsafe { self.base.as_ptr().add(offset_bytes) },
            len_bytes,
            fixed_index: None,
        }
    }

    /// The iovec that registers this whole region with an io_uring as one fixed buffer.
    pub fn iovec(&self) -> libc::iovec {
        libc::iovec {
            iov_base: self.base.as_ptr().cast(),
            iov_len: self.len_bytes,
        }
    }
}

impl Drop for Region {
    fn drop(&mut self) {
        // SAFETY: `base` and `len_bytes` are exactly what mmap returned for this region, and
        // every user of the memory (pool buffers, malloc bdev) is gone by the time it drops.
        unsafe { libc::munmap(self.base.as_ptr().cast(), self.len_bytes) };
    }
}

fn mmap_anon(len: usize, extra_flags: libc::c_int) -> std::io::Result<NonNull<u8>> {
    // SAFETY: an anonymous private mapping with no address hint touches no existing memory.
    let ptr = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | extra_flags,
            -1,
            0,
        )
    };
    if ptr == libc::MAP_FAILED {
        return Err(std::io::Error::last_os_error());
    }
    NonNull::new(ptr.cast()).ok_or_else(|| std::io::Error::from_raw_os_error(libc::ENOMEM))
}

/// A view of I/O memory handed to a bdev: where the data lives and, when it lies inside a
/// registered region, the fixed-buffer index io_uring should use.
///
/// The fields are private so that safe code cannot aim the kernel at arbitrary memory: an
/// `IoBuf` comes from a pool buffer ([`DmaBuf::io_buf`]), from a piece of another `IoBuf`
/// ([`IoBuf::sub`]), or from an `unsafe` constructor whose caller vouches for the memory
/// ([`IoBuf::from_raw`], [`Region::io_buf`]). Invariant: `len_bytes` bytes at `ptr` are memory
/// the engine may hand to the kernel for as long as a request carrying the view is in flight.
///
/// Safe code cannot forge one, so it cannot make the kernel write anywhere:
///
/// ```compile_fail
/// let forged = cairn_engine::dma::IoBuf {
///     ptr: 0x1000 as *mut u8,
///     len_bytes: 4096,
///     fixed_index: None,
/// };
/// ```
///
/// nor point one at its own memory without `unsafe`:
///
/// ```compile_fail
/// let mut mine = vec![0u8; 4096];
/// let view = cairn_engine::dma::IoBuf::from_raw(mine.as_mut_ptr(), 4096);
/// ```
#[derive(Clone, Copy, Debug)]
pub struct IoBuf {
    ptr: *mut u8,
    len_bytes: u32,
    fixed_index: Option<u16>,
}

impl IoBuf {
    /// A view of memory that is not a pool buffer (a caller's buffer across the C ABI, a
    /// test's allocation). It never carries a fixed-buffer index.
    ///
    /// # Safety
    /// `len_bytes` bytes at `ptr` are one live, writable allocation that stays alive until every
    /// request submitted with this view (or a piece of it) has completed. While a request that
    /// fills the memory (a read) is in flight nothing else reads or writes it; while one that
    /// only reads it (a write) is in flight nothing writes it.
    pub unsafe fn from_raw(ptr: *mut u8, len_bytes: u32) -> IoBuf {
        IoBuf {
            ptr,
            len_bytes,
            fixed_index: None,
        }
    }

    /// Where the data starts; for validation and for the ring glue that fills an SQE.
    pub fn ptr(&self) -> *mut u8 {
        self.ptr
    }

    pub fn len_bytes(&self) -> u32 {
        self.len_bytes
    }

    /// The registered-buffer index io_uring should use, when the memory lies in one.
    pub fn fixed_index(&self) -> Option<u16> {
        self.fixed_index
    }

    /// The piece `[at_bytes, at_bytes + len_bytes)` of this view, for a bdev that splits a
    /// request. A piece outside the view is a programmer error and panics.
    pub fn sub(&self, at_bytes: u32, len_bytes: u32) -> IoBuf {
        let end = at_bytes.checked_add(len_bytes);
        assert!(
            end.is_some_and(|end| end <= self.len_bytes),
            "piece at {at_bytes} of {len_bytes} bytes outside a {}-byte buffer",
            self.len_bytes
        );
        IoBuf {
            // SAFETY: at_bytes <= self.len_bytes (checked above), so the result stays inside or
            // one past the end of the view's allocation.
            ptr: unsafe { self.ptr.add(at_bytes as usize) },
            len_bytes,
            fixed_index: self.fixed_index,
        }
    }

    /// The first `len_bytes` of the request's data, for a bdev that moves data by copying.
    ///
    /// # Safety
    /// The caller is the bdev this buffer was submitted to, the request has not completed yet
    /// (so the submitter keeps the memory alive and untouched), and `len_bytes <= self.len_bytes`.
    pub unsafe fn as_slice<'a>(&self, len_bytes: u32) -> &'a [u8] {
        debug_assert!(len_bytes <= self.len_bytes);
        // SAFETY: forwarded from this function's contract.
        unsafe { std::slice::from_raw_parts(self.ptr, len_bytes as usize) }
    }

    /// As [`IoBuf::as_slice`], writable, for reads completed by copying.
    ///
    /// # Safety
    /// As for [`IoBuf::as_slice`], and no other view of the memory is live.
    #[allow(clippy::mut_from_ref)]
    pub unsafe fn as_mut_slice<'a>(&self, len_bytes: u32) -> &'a mut [u8] {
        debug_assert!(len_bytes <= self.len_bytes);
        // SAFETY: forwarded from this function's contract.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, len_bytes as usize) }
    }
}

// SAFETY: an IoBuf is a plain address; the submitter keeps the memory alive and untouched until
// the request completes, which is the contract of every submit function that takes one.
unsafe impl Send for IoBuf {}

/// One buffer from a pool. It is owned by exactly one holder until put back.
#[derive(Debug)]
pub struct DmaBuf {
    ptr: NonNull<u8>,
    len_bytes: u32,
    index: u32,
    fixed_index: Option<u16>,
}

// SAFETY: a DmaBuf is the sole handle to its slice of a region that outlives it (see BufPool).
unsafe impl Send for DmaBuf {}

impl DmaBuf {
    pub fn len_bytes(&self) -> u32 {
        self.len_bytes
    }

    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: the pool gave this handle exclusive use of `len_bytes` bytes at `ptr`, inside
        // a region that lives as long as the pool and every buffer taken from it.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len_bytes as usize) }
    }

    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as in `as_slice`, and `&mut self` makes this the only live view.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len_bytes as usize) }
    }

    /// The view a bdev needs. The caller must not touch the buffer until the I/O completes.
    /// Safe because the view can only reach this buffer's slice of a pool region, which the
    /// reactor (or the one owner of a stand-alone pool) keeps mapped while I/O is in flight.
    pub fn io_buf(&mut self) -> IoBuf {
        IoBuf {
            ptr: self.ptr.as_ptr(),
            len_bytes: self.len_bytes,
            fixed_index: self.fixed_index,
        }
    }
}

/// A per-core pool of equal-sized buffers carved from one region.
#[derive(Debug)]
pub struct BufPool {
    region: std::sync::Arc<Region>,
    size_bytes: u32,
    count: u32,
    fixed_index: Option<u16>,
    free: Vec<u32>,
}

impl BufPool {
    /// Maps the pool's region; `try_huge` prefers 2 MiB pages.
    pub fn new(count: u32, size_bytes: u32, try_huge: bool) -> Result<BufPool, DmaError> {
        if size_bytes == 0 || !(size_bytes as usize).is_multiple_of(DMA_ALIGN_BYTES) {
            return Err(DmaError::BufferSize { size_bytes });
        }
        if count == 0 {
            return Err(DmaError::PoolEmpty);
        }
        let total = count as usize * size_bytes as usize;
        if total > REGISTERED_BUFFER_MAX_BYTES {
            return Err(DmaError::PoolTooLarge { count, size_bytes });
        }
        let region = std::sync::Arc::new(Region::map(total, try_huge, true)?);
        Ok(BufPool {
            region,
            size_bytes,
            count,
            fixed_index: None,
            free: (0..count).rev().collect(),
        })
    }

    pub fn region(&self) -> &std::sync::Arc<Region> {
        &self.region
    }

    /// Records that the region is registered with the core's ring at `index`, so buffers from
    /// now on carry it and bdevs can use READ_FIXED/WRITE_FIXED.
    pub fn set_fixed_index(&mut self, index: u16) {
        assert_eq!(
            self.free.len(),
            self.count as usize,
            "register before lending buffers"
        );
        self.fixed_index = Some(index);
    }

    pub fn buf_size_bytes(&self) -> u32 {
        self.size_bytes
    }

    pub fn available(&self) -> usize {
        self.free.len()
    }

    pub fn capacity(&self) -> u32 {
        self.count
    }

    /// Takes a buffer, or `None` when every buffer is lent out (back-pressure).
    #[inline]
    pub fn get(&mut self) -> Option<DmaBuf> {
        let index = self.free.pop()?;
        let offset = index as usize * self.size_bytes as usize;
        // SAFETY: index < count, so the offset lies inside the region mapped for count buffers.
        let ptr = unsafe { self.region.base().add(offset) };
        Some(DmaBuf {
            ptr: NonNull::new(ptr).expect("region base is non-null"),
            len_bytes: self.size_bytes,
            index,
            fixed_index: self.fixed_index,
        })
    }

    /// Returns a buffer taken from this pool.
    #[inline]
    pub fn put(&mut self, buf: DmaBuf) {
        let offset = buf.index as usize * self.size_bytes as usize;
        debug_assert_eq!(
            buf.ptr.as_ptr() as usize,
            self.region.base() as usize + offset,
            "buffer returned to a pool it did not come from"
        );
        debug_assert!(
            self.free.len() < self.count as usize,
            "buffer returned twice"
        );
        self.free.push(buf.index);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pool_lends_every_buffer_once_then_pushes_back() {
        let mut pool = BufPool::new(4, 4096, false).unwrap();
        let mut bufs: Vec<_> = (0..4).map(|_| pool.get().unwrap()).collect();
        assert!(
            pool.get().is_none(),
            "an empty pool is back-pressure, not an allocation"
        );
        for (i, b) in bufs.iter_mut().enumerate() {
            assert_eq!(b.as_slice().as_ptr() as usize % DMA_ALIGN_BYTES, 0);
            b.as_mut_slice().fill(i as u8);
        }
        for (i, b) in bufs.iter().enumerate() {
            assert!(
                b.as_slice().iter().all(|&x| x == i as u8),
                "buffers overlap"
            );
        }
        bufs.into_iter().for_each(|b| pool.put(b));
        assert_eq!(pool.available(), 4);
    }

    #[test]
    fn views_are_pieces_of_their_buffer_and_never_reach_past_it() {
        let mut pool = BufPool::new(1, 8192, false).unwrap();
        pool.set_fixed_index(3);
        let mut buf = pool.get().unwrap();
        let view = buf.io_buf();
        assert_eq!(view.fixed_index(), Some(3));
        let piece = view.sub(4096, 4096);
        assert_eq!(piece.ptr() as usize, view.ptr() as usize + 4096);
        assert_eq!(
            (piece.len_bytes(), piece.fixed_index()),
            (4096, Some(3)),
            "a piece keeps the registration of its buffer"
        );
        let past = std::panic::catch_unwind(|| view.sub(4096, 4097));
        assert!(past.is_err(), "a piece past the end is refused");
        let overflow = std::panic::catch_unwind(|| view.sub(u32::MAX, 2));
        assert!(overflow.is_err(), "an offset that overflows is refused");
        pool.put(buf);

        let region = Region::map(8192, false, false).unwrap();
        // SAFETY: the views are only inspected, never submitted.
        let tail = unsafe { region.io_buf(4096, 4096) };
        assert_eq!(tail.ptr() as usize, region.base() as usize + 4096);
        assert_eq!(tail.fixed_index(), None);
        // SAFETY: as above; the call panics before making a view.
        let past = std::panic::catch_unwind(|| unsafe { region.io_buf(4096, 8192) });
        assert!(past.is_err(), "a view past the region is refused");
    }

    #[test]
    fn rejects_bad_geometry() {
        assert!(matches!(
            BufPool::new(1, 100, false),
            Err(DmaError::BufferSize { .. })
        ));
        assert!(matches!(
            BufPool::new(0, 4096, false),
            Err(DmaError::PoolEmpty)
        ));
        assert!(matches!(
            BufPool::new(1 << 20, 1 << 20, false),
            Err(DmaError::PoolTooLarge { .. })
        ));
    }
}
