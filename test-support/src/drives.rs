//! Image files and drives for tests that plug disks into a machine in the test's process.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use block::{BlockBackend, DiscardMode, Format, OpenOptions};

/// A sparse file of `size` bytes named `name` in this process's scratch folder for
/// `suite` (under the system's temporary directory).
pub fn temp_image(suite: &str, name: &str, size: u64) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("qomvm-{suite}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("the scratch folder can be made");
    let path = dir.join(name);
    std::fs::File::create(&path)
        .and_then(|f| f.set_len(size))
        .expect("the image can be made");
    path
}

/// Opens `path` as raw drive `id` (as `-drive if=none,id=ID,format=raw`, with
/// `readonly=on` and `discard=unmap` as asked) and adds it to the block layer.
pub fn add_raw_drive(id: &str, path: &Path, read_only: bool, discard: bool) -> Arc<BlockBackend> {
    let mut opts = OpenOptions::new(path);
    opts.format = Some(Format::Raw);
    opts.read_only = read_only;
    if discard {
        opts.discard = DiscardMode::Unmap;
    }
    let backend =
        BlockBackend::open(id, &block::auto_node_name(), opts, |_| {}).expect("the image opens");
    block::add_backend(backend).expect("the drive's name is free")
}
