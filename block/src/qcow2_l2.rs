//! Crash safety for qcow2 images written through imago 0.2.
//!
//! When a write lands in a part of the disk that has no L2 table yet, imago 0.2.6
//! (`Qcow2::ensure_l2`) allocates the table's cluster (raising its refcount in the
//! refcount-block *cache*), writes the table, then writes the L1 entry pointing at it to
//! disk at once, without first writing back the refcount. Killed in between (`kill -9`, a
//! host crash), the image has an L2 table whose refcount is 0 on disk: `qemu-img check`
//! reports corruption (`ERROR cluster N refcount=0 reference=1`). QEMU writes the refcount
//! first (its `l2_allocate` flushes the refcount-block cache before updating L1).
//!
//! Data-cluster allocations are ordered correctly by imago (refcounts before L2 entries); only
//! new L2 tables are exposed. So before the guest runs, [`prepare_l2_tables`] gives every
//! region of a writable qcow2 image its L2 table and writes all metadata back: afterwards a
//! guest write never allocates an L2 table, and a crash leaves at worst leaked clusters, as
//! with QEMU. The window moves from the guest's lifetime to the open.

use std::fs::File as StdFile;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;

use imago::file::File;
use imago::FormatAccess;

/// Reads the L1 table of the qcow2 image at `path`: (bytes of guest disk one L2 table
/// covers, for each L1 index whether it has an L2 table).
fn l1_coverage(path: &Path) -> io::Result<(u64, Vec<bool>)> {
    let file = StdFile::open(path)?;
    let mut header = [0u8; 104];
    file.read_exact_at(&mut header, 0)?;
    let be32 = |at: usize| u32::from_be_bytes(header[at..at + 4].try_into().unwrap_or_default());
    let be64 = |at: usize| u64::from_be_bytes(header[at..at + 8].try_into().unwrap_or_default());
    let version = be32(4);
    let cluster_bits = be32(20);
    let l1_size = be32(36) as usize;
    let l1_offset = be64(40);
    // Extended L2 entries (incompatible feature bit 4, version 3) are 16 bytes.
    let extended_l2 = version >= 3 && be64(72) & (1 << 4) != 0;
    if !(9..=21).contains(&cluster_bits) || l1_size > (1 << 25) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "implausible qcow2 header",
        ));
    }
    let entry_bytes = if extended_l2 { 16 } else { 8 };
    let coverage = (1u64 << cluster_bits) / entry_bytes * (1u64 << cluster_bits);
    let mut l1 = vec![0u8; l1_size * 8];
    file.read_exact_at(&mut l1, l1_offset)?;
    let present = l1
        .chunks_exact(8)
        .map(|e| u64::from_be_bytes(e.try_into().unwrap_or_default()) & 0x00ff_ffff_ffff_fe00 != 0)
        .collect();
    Ok((coverage, present))
}

/// Checks that the refcount table of the qcow2 image at `path` and every refcount block
/// it names are inside the file, as QEMU checks a refcount block before using it. imago
/// 0.2.6 checks their alignment but not that: allocating a cluster through a refcount block beyond the
/// end of the file allocates a cluster for a new block, which allocates again, until the
/// stack overflows (found by `tests/fuzz_loaders.rs`).
fn check_refcount_table(path: &Path) -> io::Result<()> {
    let file = StdFile::open(path)?;
    let file_len = file.metadata()?.len();
    let mut header = [0u8; 104];
    file.read_exact_at(&mut header, 0)?;
    let be32 = |at: usize| u32::from_be_bytes(header[at..at + 4].try_into().unwrap_or_default());
    let be64 = |at: usize| u64::from_be_bytes(header[at..at + 8].try_into().unwrap_or_default());
    let cluster_size = 1u64 << be32(20).clamp(9, 21);
    let table_offset = be64(48);
    let table_len = u64::from(be32(56)).saturating_mul(cluster_size);
    let corrupt = |what: String| io::Error::new(io::ErrorKind::InvalidData, what);
    if table_len == 0 {
        return Err(corrupt(
            "Image does not contain a reference count table".to_string(),
        ));
    }
    if table_offset % cluster_size != 0
        || table_offset.saturating_add(table_len) > file_len
        || table_len > 1 << 26
    {
        return Err(corrupt(format!(
            "qcow2 refcount table at {table_offset:#x} ({table_len:#x} bytes) is outside the image"
        )));
    }
    let mut table = vec![0u8; table_len as usize];
    file.read_exact_at(&mut table, table_offset)?;
    // The clusters one refcount block covers (refcount_order is 4, 16-bit counts, before
    // version 3).
    let refcount_order = if be32(4) >= 3 { be32(96).min(6) } else { 4 };
    let block_covers = (cluster_size * 8) >> refcount_order;
    let blocks_in_use = file_len.div_ceil(cluster_size).div_ceil(block_covers);
    for (index, entry) in table.chunks_exact(8).enumerate() {
        let offset = u64::from_be_bytes(entry.try_into().unwrap_or_default()) & !0x1ff;
        if offset == 0 {
            // The clusters of the file (the header first) have counts: their blocks exist.
            if (index as u64) < blocks_in_use {
                return Err(corrupt(format!(
                    "qcow2 refcount table: no refcount block for clusters in use (reftable index: {index:#x})"
                )));
            }
            continue;
        }
        if offset.saturating_add(cluster_size) > file_len {
            return Err(corrupt(format!(
                "Refblock at {offset:#x} is beyond the end of the image (reftable index: {index:#x})"
            )));
        }
    }
    Ok(())
}

/// Gives every region of the writable qcow2 image `access` (the file at `path`) an L2
/// table, then writes the metadata back (see the module's comment). Returns how many tables
/// were added.
pub fn prepare_l2_tables(access: &FormatAccess<File>, path: &Path) -> io::Result<usize> {
    check_refcount_table(path)?;
    let (coverage, present) = l1_coverage(path)?;
    let size = access.size();
    // QEMU's qcow2_open refuses an L1 table too small for the disk's size; imago 0.2.6
    // does not, and walking such a disk (a corrupt size of 2^48 bytes) would add L2 tables
    // until the host's disk is full (found by `tests/fuzz_loaders.rs`).
    if (present.len() as u64) < size.div_ceil(coverage) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "L1 table is too small",
        ));
    }
    let mut added = 0;
    let mut offset = 0;
    let mut index = 0;
    while offset < size {
        if !present.get(index).copied().unwrap_or(false) {
            // Preparing a one-byte mapping allocates the region's L2 table; dropping the
            // preparation uncommitted gives back its data cluster, so the guest sees no change.
            drop(access.prepare_data_mapping(offset, 1, false)?);
            added += 1;
        }
        index += 1;
        offset = offset.saturating_add(coverage);
    }
    if added > 0 {
        access.flush()?;
    }
    Ok(added)
}
