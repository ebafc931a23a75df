//! The virtio GPU device in its 2D mode (QEMU's `hw/display/virtio-gpu.c` and
//! `virtio-gpu-base.c`; the virtio spec's section 5.7): the driver creates resources (2D
//! images of 32-bit pixels in host memory), attaches guest pages to them as backing,
//! copies rectangles from the backing into a resource (`TRANSFER_TO_HOST_2D`), shows a
//! resource on a scanout (`SET_SCANOUT`) and says which part changed (`RESOURCE_FLUSH`).
//! Each scanout is a graphic console, so the VNC server and `screendump` show what the
//! guest shows. The cursor queue's updates are taken and kept, not drawn (QEMU hands them
//! to user interfaces that draw a cursor of their own).
//!
//! Commands run on the machine's main loop, never on a vCPU thread, each to the end
//! before the next (2D has no fences to wait for), so nothing is in flight at a stop and
//! the resources migrate as they are. A resource's pixels count against `max_hostmem`, as
//! QEMU's do; a guest asking for more gets `ERR_OUT_OF_MEMORY`.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Weak};

use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use virtio_queue::{Queue, QueueT, Reader, Writer};
use vmm_sys_util::eventfd::EventFd;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use crate::core::console::{GraphicHwOps, Redraw, Surface};
use crate::core::dirty_log::DirtyTracker;
use crate::core::iothread::{AioContext, AioHandlerId, Interest};
use crate::core::vmstate::{VmStateError, VmStateSection};
use crate::virtio::virtio::{
    bit, drain_kick, feature, mark_chain_written, next_chain, ActivateError, Activation, QueuePosition, RateLimitedLog,
    RingError, VirtioDevice, VirtioTransport,
};

/// The virtio device ID of GPUs.
pub const VIRTIO_ID_GPU: u16 = 16;
const CONTROLQ: u16 = 0;
const CURSORQ: u16 = 1;
/// QEMU's queue sizes in 2D (its 3D mode has a control queue of 256).
const CONTROLQ_SIZE: u16 = 64;
const CURSORQ_SIZE: u16 = 16;
/// `VIRTIO_GPU_F_EDID`: the driver may ask for each scanout's EDID.
pub const F_EDID: u32 = 1;
/// The most scanouts the protocol has (`VIRTIO_GPU_MAX_SCANOUTS`).
pub const MAX_SCANOUTS: u32 = 16;
/// QEMU's limit on one resource's backing entries.
const MAX_BACKING_ENTRIES: u32 = 16384;
/// The control header: type, flags, fence_id, ctx_id, ring_idx and padding.
const HDR_SIZE: usize = 24;
/// `VIRTIO_GPU_FLAG_FENCE`.
const FLAG_FENCE: u32 = 1;
/// A resource's pixels are 32 bits in every format the 2D mode has.
const BYTES_PER_PIXEL: u64 = 4;
/// What a disabled scanout's console shows (QEMU's placeholder surface).
const PLACEHOLDER: (u32, u32) = (640, 480);
/// Requests served in one pass of the loop: a guest that keeps posting more waits for
/// the loop's other handlers (VNC, the monitor, a stop) between passes.
const PASS_REQUESTS: usize = 64;
/// The bytes of a request the device reads at most: an attach with the most entries.
const MAX_REQUEST: usize = HDR_SIZE + 8 + MAX_BACKING_ENTRIES as usize * 16;

/// Command types (`VIRTIO_GPU_CMD_*`).
mod cmd {
    pub const GET_DISPLAY_INFO: u32 = 0x0100;
    pub const RESOURCE_CREATE_2D: u32 = 0x0101;
    pub const RESOURCE_UNREF: u32 = 0x0102;
    pub const SET_SCANOUT: u32 = 0x0103;
    pub const RESOURCE_FLUSH: u32 = 0x0104;
    pub const TRANSFER_TO_HOST_2D: u32 = 0x0105;
    pub const RESOURCE_ATTACH_BACKING: u32 = 0x0106;
    pub const RESOURCE_DETACH_BACKING: u32 = 0x0107;
    pub const GET_EDID: u32 = 0x010a;
    pub const RESOURCE_CREATE_BLOB: u32 = 0x010c;
    pub const SET_SCANOUT_BLOB: u32 = 0x010d;
    pub const MOVE_CURSOR: u32 = 0x0301;
}

/// Response types (`VIRTIO_GPU_RESP_*`).
mod resp {
    pub const OK_NODATA: u32 = 0x1100;
    pub const OK_DISPLAY_INFO: u32 = 0x1101;
    pub const OK_EDID: u32 = 0x1104;
    pub const ERR_UNSPEC: u32 = 0x1200;
    pub const ERR_OUT_OF_MEMORY: u32 = 0x1201;
    pub const ERR_INVALID_SCANOUT_ID: u32 = 0x1202;
    pub const ERR_INVALID_RESOURCE_ID: u32 = 0x1203;
    pub const ERR_INVALID_PARAMETER: u32 = 0x1205;
}

/// Where each colour byte of a pixel is in memory (`VIRTIO_GPU_FORMAT_*`, named in
/// memory order): red, green and blue byte offsets.
fn format_layout(format: u32) -> Option<[usize; 3]> {
    Some(match format {
        // B8G8R8A8, B8G8R8X8
        1 | 2 => [2, 1, 0],
        // A8R8G8B8, X8R8G8B8
        3 | 4 => [1, 2, 3],
        // R8G8B8A8, R8G8B8X8
        67 | 134 => [0, 1, 2],
        // X8B8G8R8, A8B8G8R8
        68 | 121 => [3, 2, 1],
        _ => return None,
    })
}

/// How the transport configured the device (QEMU's `virtio-gpu` properties).
#[derive(Clone)]
pub struct VirtioGpuConf {
    /// `max_outputs`: scanouts (1-16).
    pub max_outputs: u32,
    /// `xres` x `yres`: the mode each output offers.
    pub xres: u32,
    /// See `xres`.
    pub yres: u32,
    /// `edid`: offer `VIRTIO_GPU_F_EDID`.
    pub edid: bool,
    /// `max_hostmem`: the bytes all resources' pixels may take.
    pub max_hostmem: u64,
    /// Where the queues are served.
    pub context: Arc<AioContext>,
}

/// A rectangle (`virtio_gpu_rect`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
struct Rect {
    x: u32,
    y: u32,
    width: u32,
    height: u32,
}

impl Rect {
    fn parse(b: &[u8]) -> Rect {
        Rect {
            x: le32(b, 0),
            y: le32(b, 4),
            width: le32(b, 8),
            height: le32(b, 12),
        }
    }

    /// QEMU's check for flushes and transfers: inside a `width` x `height` image.
    fn inside(&self, width: u32, height: u32) -> bool {
        u64::from(self.x) + u64::from(self.width) <= u64::from(width)
            && u64::from(self.y) + u64::from(self.height) <= u64::from(height)
    }
}

/// A 2D resource: its pixels as the driver last transferred them, and its backing.
#[derive(Serialize, Deserialize)]
struct Resource {
    format: u32,
    width: u32,
    height: u32,
    #[serde(skip)]
    pixels: Vec<u8>,
    /// The guest pages it is copied from; `None` while detached.
    backing: Option<Backing>,
}

/// A resource's backing: guest-physical (address, length) pieces, in order, with where
/// each ends in the whole, so a copy finds its first piece at once.
#[derive(Clone, Serialize, Deserialize)]
#[serde(try_from = "Vec<(u64, u32)>", into = "Vec<(u64, u32)>")]
struct Backing {
    pieces: Vec<(u64, u32)>,
    ends: Vec<u64>,
}

impl Backing {
    fn total(&self) -> u64 {
        self.ends.last().copied().unwrap_or(0)
    }

    /// Copies the backing's bytes from `offset` into `out`, as far as the backing reaches
    /// (QEMU's `iov_to_buf`); pieces that left guest memory read as nothing.
    fn read(&self, mem: &GuestMemoryMmap, offset: u64, out: &mut [u8]) {
        let mut i = self.ends.partition_point(|&end| end <= offset);
        let mut done = 0usize;
        while done < out.len() && i < self.pieces.len() {
            let (addr, len) = self.pieces[i];
            let start = self.ends[i] - u64::from(len);
            let skip = offset.saturating_sub(start);
            let n = ((u64::from(len) - skip) as usize).min(out.len() - done);
            if let Some(at) = addr.checked_add(skip) {
                let _ = mem.read_slice(&mut out[done..done + n], GuestAddress(at));
            }
            done += n;
            i += 1;
        }
    }
}

impl TryFrom<Vec<(u64, u32)>> for Backing {
    type Error = String;

    /// The pieces of a migration stream, checked as an attach checks their shape.
    fn try_from(pieces: Vec<(u64, u32)>) -> Result<Self, String> {
        if pieces.len() > MAX_BACKING_ENTRIES as usize {
            return Err(format!("{} backing pieces", pieces.len()));
        }
        if pieces.iter().any(|&(addr, len)| len == 0 || addr.checked_add(u64::from(len)).is_none()) {
            return Err("a backing piece that is empty or wraps".into());
        }
        Ok(Backing::new(pieces))
    }
}

impl From<Backing> for Vec<(u64, u32)> {
    fn from(b: Backing) -> Self {
        b.pieces
    }
}

impl Backing {
    fn new(pieces: Vec<(u64, u32)>) -> Backing {
        let mut end = 0u64;
        let ends = pieces
            .iter()
            .map(|&(_, len)| {
                end += u64::from(len);
                end
            })
            .collect();
        Backing { pieces, ends }
    }
}

impl Resource {
    fn stride(&self) -> u64 {
        u64::from(self.width) * BYTES_PER_PIXEL
    }

    /// The pixel at (`x`, `y`) as `0x00RRGGBB`.
    fn rgb(&self, x: u32, y: u32) -> u32 {
        let at = (u64::from(y) * self.stride() + u64::from(x) * BYTES_PER_PIXEL) as usize;
        let [r, g, b] = format_layout(self.format).unwrap_or([0, 1, 2]);
        let p = &self.pixels[at..at + 4];
        (u32::from(p[r]) << 16) | (u32::from(p[g]) << 8) | u32::from(p[b])
    }
}

/// A scanout: the resource it shows (0: none) and which part of it, and its cursor.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize)]
struct Scanout {
    resource_id: u32,
    rect: Rect,
    cursor: Cursor,
    /// Rows of the picture the next refresh redraws (`None`: all of it).
    #[serde(skip)]
    dirty: Option<DirtyRows>,
}

/// Rows to redraw, merged.
#[derive(Clone, Copy, Debug, Default)]
struct DirtyRows {
    /// The console must redraw everything (a new resource or size).
    full: bool,
    rows: Option<(u32, u32)>,
}

/// A scanout's cursor as the driver last set it (QEMU's `virtio_gpu_scanout` cursor).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
struct Cursor {
    x: u32,
    y: u32,
    resource_id: u32,
    hot_x: u32,
    hot_y: u32,
}

/// Everything the driver made: resources, scanouts, the cursor.
#[derive(Default)]
struct GpuState {
    resources: BTreeMap<u32, Resource>,
    /// Bytes the resources' pixels take.
    hostmem: u64,
    scanouts: Vec<Scanout>,
    /// QEMU's `VirtIOGPUBase::enable`: the driver has shown a resource on some output
    /// since the last reset (virtio-vga shows its VGA until then).
    enabled: bool,
}

/// Guest errors of every virtio-gpu share one log budget.
static GUEST_ERRORS: std::sync::LazyLock<RateLimitedLog> = std::sync::LazyLock::new(RateLimitedLog::default);

/// QEMU's `VirtIOGPU` (2D).
pub struct VirtioGpu {
    conf: VirtioGpuConf,
    /// `events_read`: what the driver has yet to look at (apart from the state, so a
    /// vCPU's configuration read never waits for a command).
    events_read: AtomicU32,
    /// Itself, for the handlers it registers.
    this: Weak<VirtioGpu>,
    state: Mutex<GpuState>,
    handlers: Mutex<Vec<AioHandlerId>>,
    running: Mutex<Option<Arc<Running>>>,
}

fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn le64(b: &[u8], at: usize) -> u64 {
    u64::from(le32(b, at)) | (u64::from(le32(b, at + 4)) << 32)
}

impl VirtioGpu {
    /// A device over `conf`, showing nothing yet.
    pub fn new(conf: VirtioGpuConf) -> Arc<Self> {
        let outputs = conf.max_outputs as usize;
        Arc::new_cyclic(|this| VirtioGpu {
            conf,
            events_read: AtomicU32::new(0),
            this: this.clone(),
            state: Mutex::new(GpuState {
                scanouts: vec![Scanout::default(); outputs],
                ..GpuState::default()
            }),
            handlers: Mutex::new(Vec::new()),
            running: Mutex::new(None),
        })
    }

    /// Head `head`'s console view (one per scanout).
    pub fn console_ops(self: &Arc<Self>, head: u32) -> Arc<dyn GraphicHwOps> {
        Arc::new(GpuHead {
            gpu: Arc::downgrade(self),
            head,
        })
    }

    /// Whether the driver has set a scanout since the device's last reset (QEMU's
    /// `enable`): virtio-vga shows its VGA until then.
    pub fn enabled(&self) -> bool {
        self.state.lock().enabled
    }

    fn stop(&self) -> Option<Arc<Running>> {
        self.conf.context.remove_fds(&self.handlers);
        let running = self.running.lock().take()?;
        running.queues.lock().stopped = true;
        Some(running)
    }

    /// One control command: the response to write.
    fn control(&self, mem: &GuestMemoryMmap, req: &[u8]) -> Vec<u8> {
        let ty = le32(req, 0);
        let mut st = self.state.lock();
        let body = &req[HDR_SIZE..];
        let need = |n: usize| body.len() >= n;
        let result = match ty {
            cmd::GET_DISPLAY_INFO => Ok(self.display_info()),
            cmd::GET_EDID if need(8) => self.edid(le32(body, 0)),
            cmd::RESOURCE_CREATE_2D if need(16) => {
                self.create_2d(&mut st, le32(body, 0), le32(body, 4), le32(body, 8), le32(body, 12))
            }
            cmd::RESOURCE_UNREF if need(8) => Self::unref(&mut st, le32(body, 0)),
            cmd::SET_SCANOUT if need(24) => self.set_scanout(&mut st, Rect::parse(body), le32(body, 16), le32(body, 20)),
            cmd::RESOURCE_FLUSH if need(24) => Self::flush(&mut st, Rect::parse(body), le32(body, 16)),
            cmd::TRANSFER_TO_HOST_2D if need(32) => {
                Self::transfer(&mut st, mem, Rect::parse(body), le64(body, 16), le32(body, 24))
            }
            cmd::RESOURCE_ATTACH_BACKING if need(8) => Self::attach(&mut st, mem, le32(body, 0), le32(body, 4), &body[8..]),
            cmd::RESOURCE_DETACH_BACKING if need(8) => Self::detach(&mut st, le32(body, 0)),
            cmd::GET_EDID
            | cmd::RESOURCE_CREATE_2D
            | cmd::RESOURCE_UNREF
            | cmd::SET_SCANOUT
            | cmd::RESOURCE_FLUSH
            | cmd::TRANSFER_TO_HOST_2D
            | cmd::RESOURCE_ATTACH_BACKING
            | cmd::RESOURCE_DETACH_BACKING => {
                // QEMU answers OK_NODATA without running it (its VIRTIO_GPU_FILL_CMD leaves
                // no error set); an error tells the driver the truth.
                GUEST_ERRORS.warn(|| format!("virtio-gpu: command {ty:#x} of {} bytes is too short", req.len()));
                Err(resp::ERR_UNSPEC)
            }
            // Blob resources are not offered (QEMU's `blob=off`).
            cmd::RESOURCE_CREATE_BLOB | cmd::SET_SCANOUT_BLOB => {
                GUEST_ERRORS.warn(|| format!("virtio-gpu: blob command {ty:#x} without blob resources"));
                Err(resp::ERR_INVALID_PARAMETER)
            }
            _ => {
                GUEST_ERRORS.warn(|| format!("virtio-gpu: unknown command {ty:#x}"));
                Err(resp::ERR_UNSPEC)
            }
        };
        let mut out = match result {
            Ok(payload) => payload,
            Err(code) => header(code),
        };
        log::trace!("virtio-gpu: command {ty:#x}: {:#x}", le32(&out, 0));
        // A fenced command's response carries its fence (QEMU's virtio_gpu_ctrl_response).
        let flags = le32(req, 4);
        if flags & FLAG_FENCE != 0 {
            let with_fence = le32(&out, 4) | FLAG_FENCE;
            out[4..8].copy_from_slice(&with_fence.to_le_bytes());
            out[8..24].copy_from_slice(&req[8..24]);
        }
        out
    }

    /// QEMU's `virtio_gpu_base_fill_display_info`: output 0 enabled at `xres` x `yres`.
    fn display_info(&self) -> Vec<u8> {
        let mut out = header(resp::OK_DISPLAY_INFO);
        for i in 0..MAX_SCANOUTS {
            let mut one = [0u8; 24];
            if i == 0 && self.conf.max_outputs > 0 {
                one[8..12].copy_from_slice(&self.conf.xres.to_le_bytes());
                one[12..16].copy_from_slice(&self.conf.yres.to_le_bytes());
                one[16..20].copy_from_slice(&1u32.to_le_bytes());
            }
            out.extend_from_slice(&one);
        }
        out
    }

    fn edid(&self, scanout: u32) -> Result<Vec<u8>, u32> {
        if scanout >= self.conf.max_outputs {
            return Err(resp::ERR_INVALID_PARAMETER);
        }
        // Only output 0 has a requested size (QEMU's req_state); the others get the
        // EDID's default mode.
        let (width, height) = if scanout == 0 { (self.conf.xres, self.conf.yres) } else { (0, 0) };
        let blob = crate::display::edid::edid_block(width, height);
        let mut out = header(resp::OK_EDID);
        out.extend_from_slice(&(blob.len() as u32).to_le_bytes());
        out.extend_from_slice(&[0; 4]);
        let mut edid = [0u8; 1024];
        edid[..blob.len()].copy_from_slice(&blob);
        out.extend_from_slice(&edid);
        Ok(out)
    }

    fn create_2d(&self, st: &mut GpuState, id: u32, format: u32, width: u32, height: u32) -> Result<Vec<u8>, u32> {
        if id == 0 || st.resources.contains_key(&id) {
            GUEST_ERRORS.warn(|| format!("virtio-gpu: resource id {id} is taken or 0"));
            return Err(resp::ERR_INVALID_RESOURCE_ID);
        }
        if format_layout(format).is_none() {
            GUEST_ERRORS.warn(|| format!("virtio-gpu: resource format {format} is not a 2D format"));
            return Err(resp::ERR_INVALID_PARAMETER);
        }
        let size = u64::from(width)
            .checked_mul(u64::from(height))
            .and_then(|n| n.checked_mul(BYTES_PER_PIXEL))
            .unwrap_or(u64::MAX);
        if st.hostmem.saturating_add(size) >= self.conf.max_hostmem {
            GUEST_ERRORS.warn(|| format!("virtio-gpu: a {width}x{height} resource exceeds max_hostmem"));
            return Err(resp::ERR_OUT_OF_MEMORY);
        }
        let mut pixels = Vec::new();
        if pixels.try_reserve_exact(size as usize).is_err() {
            return Err(resp::ERR_OUT_OF_MEMORY);
        }
        pixels.resize(size as usize, 0);
        st.hostmem += size;
        st.resources.insert(
            id,
            Resource {
                format,
                width,
                height,
                pixels,
                backing: None,
            },
        );
        Ok(header(resp::OK_NODATA))
    }

    /// QEMU's `virtio_gpu_resource_destroy`: scanouts that show it go blank.
    fn unref(st: &mut GpuState, id: u32) -> Result<Vec<u8>, u32> {
        let Some(res) = st.resources.remove(&id) else {
            GUEST_ERRORS.warn(|| format!("virtio-gpu: unref of unknown resource {id}"));
            return Err(resp::ERR_INVALID_RESOURCE_ID);
        };
        st.hostmem -= res.pixels.len() as u64;
        for s in st.scanouts.iter_mut().filter(|s| s.resource_id == id) {
            disable(s);
        }
        Ok(header(resp::OK_NODATA))
    }

    fn set_scanout(&self, st: &mut GpuState, rect: Rect, scanout_id: u32, id: u32) -> Result<Vec<u8>, u32> {
        if scanout_id >= self.conf.max_outputs {
            GUEST_ERRORS.warn(|| format!("virtio-gpu: scanout {scanout_id} does not exist"));
            return Err(resp::ERR_INVALID_SCANOUT_ID);
        }
        if id == 0 {
            disable(&mut st.scanouts[scanout_id as usize]);
            return Ok(header(resp::OK_NODATA));
        }
        let Some(res) = st.resources.get(&id) else {
            GUEST_ERRORS.warn(|| format!("virtio-gpu: scanout of unknown resource {id}"));
            return Err(resp::ERR_INVALID_RESOURCE_ID);
        };
        if res.backing.is_none() {
            // QEMU's virtio_gpu_find_check_resource with its backing required.
            GUEST_ERRORS.warn(|| format!("virtio-gpu: scanout of resource {id} without backing"));
            return Err(resp::ERR_UNSPEC);
        }
        if rect.width < 16 || rect.height < 16 || !rect.inside(res.width, res.height) {
            GUEST_ERRORS.warn(|| format!("virtio-gpu: scanout rectangle {rect:?} outside resource {id}"));
            return Err(resp::ERR_INVALID_PARAMETER);
        }
        let s = &mut st.scanouts[scanout_id as usize];
        *s = Scanout {
            resource_id: id,
            rect,
            cursor: s.cursor,
            dirty: Some(DirtyRows { full: true, rows: None }),
        };
        st.enabled = true;
        Ok(header(resp::OK_NODATA))
    }

    /// QEMU's `virtio_gpu_resource_flush`: the scanouts showing the resource redraw the
    /// rows of the rectangle that they show.
    fn flush(st: &mut GpuState, rect: Rect, id: u32) -> Result<Vec<u8>, u32> {
        let Some(res) = st.resources.get(&id) else {
            GUEST_ERRORS.warn(|| format!("virtio-gpu: flush of unknown resource {id}"));
            return Err(resp::ERR_INVALID_RESOURCE_ID);
        };
        if !rect.inside(res.width, res.height) {
            GUEST_ERRORS.warn(|| format!("virtio-gpu: flush rectangle {rect:?} outside resource {id}"));
            return Err(resp::ERR_INVALID_PARAMETER);
        }
        for s in st.scanouts.iter_mut().filter(|s| s.resource_id == id) {
            let top = rect.y.max(s.rect.y);
            let bottom = (rect.y + rect.height).min(s.rect.y + s.rect.height);
            let overlaps_x = rect.x < s.rect.x + s.rect.width && s.rect.x < rect.x + rect.width;
            if top >= bottom || !overlaps_x {
                continue;
            }
            let rows = (top - s.rect.y, bottom - s.rect.y);
            let dirty = s.dirty.get_or_insert_with(DirtyRows::default);
            dirty.rows = Some(match dirty.rows {
                Some((a, b)) => (a.min(rows.0), b.max(rows.1)),
                None => rows,
            });
        }
        Ok(header(resp::OK_NODATA))
    }

    /// QEMU's `virtio_gpu_transfer_to_host_2d`: from the backing at `offset`, a row of
    /// the resource's stride apart for each row of the rectangle; a rectangle as wide as
    /// the resource from x 0 as one run.
    fn transfer(st: &mut GpuState, mem: &GuestMemoryMmap, rect: Rect, offset: u64, id: u32) -> Result<Vec<u8>, u32> {
        let Some(res) = st.resources.get_mut(&id) else {
            GUEST_ERRORS.warn(|| format!("virtio-gpu: transfer to unknown resource {id}"));
            return Err(resp::ERR_INVALID_RESOURCE_ID);
        };
        let Some(backing) = res.backing.as_ref() else {
            GUEST_ERRORS.warn(|| format!("virtio-gpu: transfer to resource {id} without backing"));
            return Err(resp::ERR_UNSPEC);
        };
        if !rect.inside(res.width, res.height) {
            GUEST_ERRORS.warn(|| format!("virtio-gpu: transfer rectangle {rect:?} outside resource {id}"));
            return Err(resp::ERR_INVALID_PARAMETER);
        }
        let stride = res.stride();
        let dst = u64::from(rect.y) * stride + u64::from(rect.x) * BYTES_PER_PIXEL;
        if rect.x != 0 || rect.width != res.width {
            let row = (u64::from(rect.width) * BYTES_PER_PIXEL) as usize;
            for h in 0..u64::from(rect.height) {
                // Rows whose source lies past the backing copy nothing, as in QEMU.
                let Some(src) = offset.checked_add(stride * h).filter(|&src| src < backing.total()) else {
                    break;
                };
                let at = (dst + h * stride) as usize;
                backing.read(mem, src, &mut res.pixels[at..at + row]);
            }
        } else {
            let len = (stride * u64::from(rect.height)) as usize;
            let at = dst as usize;
            backing.read(mem, offset, &mut res.pixels[at..at + len]);
        }
        Ok(header(resp::OK_NODATA))
    }

    /// QEMU's `virtio_gpu_resource_attach_backing`: every piece must be guest RAM.
    fn attach(st: &mut GpuState, mem: &GuestMemoryMmap, id: u32, count: u32, entries: &[u8]) -> Result<Vec<u8>, u32> {
        let Some(res) = st.resources.get_mut(&id) else {
            GUEST_ERRORS.warn(|| format!("virtio-gpu: backing for unknown resource {id}"));
            return Err(resp::ERR_INVALID_RESOURCE_ID);
        };
        if res.backing.is_some() {
            GUEST_ERRORS.warn(|| format!("virtio-gpu: resource {id} has a backing already"));
            return Err(resp::ERR_UNSPEC);
        }
        if count > MAX_BACKING_ENTRIES {
            GUEST_ERRORS.warn(|| format!("virtio-gpu: {count} backing entries, more than {MAX_BACKING_ENTRIES}"));
            return Err(resp::ERR_UNSPEC);
        }
        if count == 0 {
            // QEMU's mapping of no pieces is no mapping: the resource stays without one.
            return Ok(header(resp::OK_NODATA));
        }
        let count = count as usize;
        if entries.len() < count * 16 {
            GUEST_ERRORS.warn(|| format!("virtio-gpu: {count} backing entries announced, fewer given"));
            return Err(resp::ERR_UNSPEC);
        }
        let mut backing = Vec::with_capacity(count);
        for e in entries[..count * 16].chunks_exact(16) {
            let (addr, len) = (le64(e, 0), le32(e, 8));
            if !ram_range(mem, addr, len) {
                GUEST_ERRORS.warn(|| format!("virtio-gpu: backing {addr:#x}+{len:#x} is not guest RAM"));
                return Err(resp::ERR_UNSPEC);
            }
            backing.push((addr, len));
        }
        res.backing = Some(Backing::new(backing));
        Ok(header(resp::OK_NODATA))
    }

    fn detach(st: &mut GpuState, id: u32) -> Result<Vec<u8>, u32> {
        let Some(res) = st.resources.get_mut(&id) else {
            GUEST_ERRORS.warn(|| format!("virtio-gpu: detach of unknown resource {id}"));
            return Err(resp::ERR_INVALID_RESOURCE_ID);
        };
        if res.backing.take().is_none() {
            GUEST_ERRORS.warn(|| format!("virtio-gpu: resource {id} has no backing to detach"));
            return Err(resp::ERR_UNSPEC);
        }
        Ok(header(resp::OK_NODATA))
    }

    /// QEMU's `update_cursor`: a scanout's cursor image, hot spot and position are kept
    /// (`MOVE_CURSOR` moves it; any other type sets it all).
    fn cursor(&self, req: &[u8]) {
        const UPDATE_CURSOR_SIZE: usize = HDR_SIZE + 32;
        if req.len() < UPDATE_CURSOR_SIZE {
            GUEST_ERRORS.warn(|| format!("virtio-gpu: cursor command of {} bytes", req.len()));
            return;
        }
        let body = &req[HDR_SIZE..];
        let scanout = le32(body, 0);
        let mut st = self.state.lock();
        let Some(s) = st.scanouts.get_mut(scanout as usize) else {
            GUEST_ERRORS.warn(|| format!("virtio-gpu: cursor on scanout {scanout}"));
            return;
        };
        let c = &mut s.cursor;
        (c.x, c.y) = (le32(body, 4), le32(body, 8));
        if le32(req, 0) != cmd::MOVE_CURSOR {
            (c.resource_id, c.hot_x, c.hot_y) = (le32(body, 16), le32(body, 20), le32(body, 24));
        }
    }

    /// Head `head`'s picture: the part of the resource its scanout shows, or the blank
    /// placeholder.
    fn picture(&self, head: u32, surface: &mut Arc<Surface>) -> Redraw {
        let mut st = self.state.lock();
        let st = &mut *st;
        let Some(s) = st.scanouts.get_mut(head as usize) else {
            return Redraw::Nothing;
        };
        let dirty = s.dirty.take();
        let Some(res) = st.resources.get(&s.resource_id).filter(|_| s.resource_id != 0) else {
            if (surface.width, surface.height) != PLACEHOLDER || dirty.is_some() {
                *surface = Arc::new(Surface::new(PLACEHOLDER.0, PLACEHOLDER.1));
                return Redraw::Full;
            }
            return Redraw::Nothing;
        };
        let r = s.rect;
        let full = (surface.width, surface.height) != (r.width, r.height) || dirty.is_some_and(|d| d.full);
        if full {
            *surface = Arc::new(render(res, r));
            return Redraw::Full;
        }
        match dirty.and_then(|d| d.rows) {
            Some((top, bottom)) => {
                let pic = Arc::make_mut(surface);
                for y in top..bottom.min(r.height) {
                    draw_row(res, r, pic, y);
                }
                Redraw::Rows(std::iter::once(top..bottom).collect())
            }
            None => Redraw::Nothing,
        }
    }

    /// Head `head`'s whole picture now, leaving what the console redraws next as it is.
    fn snapshot(&self, head: u32) -> Surface {
        let st = self.state.lock();
        let shown = st
            .scanouts
            .get(head as usize)
            .and_then(|s| Some((st.resources.get(&s.resource_id).filter(|_| s.resource_id != 0)?, s.rect)));
        match shown {
            Some((res, rect)) => render(res, rect),
            None => Surface::new(PLACEHOLDER.0, PLACEHOLDER.1),
        }
    }
}

/// Row `y` of the picture of `rect` of `res`.
fn draw_row(res: &Resource, rect: Rect, dst: &mut Surface, y: u32) {
    for (x, px) in dst.row_mut(y).iter_mut().enumerate() {
        *px = res.rgb(rect.x + x as u32, rect.y + y);
    }
}

/// The picture of `rect` of `res`; the blank placeholder when the host has no memory for
/// it (the resource's own pixels were counted against `max_hostmem`, its pictures not).
fn render(res: &Resource, rect: Rect) -> Surface {
    let n = rect.width as usize * rect.height as usize;
    let mut pixels = Vec::new();
    if pixels.try_reserve_exact(n).is_err() {
        GUEST_ERRORS.warn(|| format!("virtio-gpu: no memory for a {}x{} picture", rect.width, rect.height));
        return Surface::new(PLACEHOLDER.0, PLACEHOLDER.1);
    }
    pixels.resize(n, 0);
    let mut pic = Surface {
        width: rect.width,
        height: rect.height,
        pixels,
    };
    for y in 0..rect.height {
        draw_row(res, rect, &mut pic, y);
    }
    pic
}

/// A blank scanout (QEMU's `virtio_gpu_disable_scanout`).
fn disable(s: &mut Scanout) {
    *s = Scanout {
        cursor: s.cursor,
        dirty: Some(DirtyRows { full: true, rows: None }),
        ..Scanout::default()
    };
}

/// Whether `[addr, addr + len)` is one piece of guest RAM (QEMU maps each backing piece
/// with `dma_memory_map`, which gives nothing for an empty piece and less than asked
/// for one that leaves RAM).
fn ram_range(mem: &GuestMemoryMmap, addr: u64, len: u32) -> bool {
    len != 0
        && mem
            .find_region(GuestAddress(addr))
            .is_some_and(|r| u64::from(len) <= r.len() - (addr - r.start_addr().0))
}

/// A response header of `code` (flags and fence filled in by the caller).
fn header(code: u32) -> Vec<u8> {
    let mut h = vec![0u8; HDR_SIZE];
    h[0..4].copy_from_slice(&code.to_le_bytes());
    h
}

/// A scanout's console.
struct GpuHead {
    gpu: Weak<VirtioGpu>,
    head: u32,
}

impl GraphicHwOps for GpuHead {
    fn gfx_update(&self) -> Surface {
        match self.gpu.upgrade() {
            Some(gpu) => gpu.snapshot(self.head),
            None => Surface::new(PLACEHOLDER.0, PLACEHOLDER.1),
        }
    }

    fn gfx_refresh(&self, surface: &mut Arc<Surface>) -> Redraw {
        match self.gpu.upgrade() {
            Some(gpu) => gpu.picture(self.head, surface),
            None => Redraw::Nothing,
        }
    }
}

impl VirtioDevice for VirtioGpu {
    fn device_type(&self) -> u16 {
        VIRTIO_ID_GPU
    }

    fn name(&self) -> &'static str {
        "virtio-gpu"
    }

    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![CONTROLQ_SIZE, CURSORQ_SIZE]
    }

    fn device_features(&self) -> u64 {
        let edid = if self.conf.edid { bit(F_EDID) } else { 0 };
        bit(feature::VERSION_1) | bit(feature::RING_INDIRECT_DESC) | bit(feature::RING_EVENT_IDX) | edid
    }

    fn config_size(&self) -> usize {
        16
    }

    /// events_read, events_clear (reads 0), num_scanouts, num_capsets (0).
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let mut config = [0u8; 16];
        config[0..4].copy_from_slice(&self.events_read.load(Ordering::Relaxed).to_le_bytes());
        config[8..12].copy_from_slice(&self.conf.max_outputs.to_le_bytes());
        crate::virtio::virtio::read_config_bytes(&config, offset, data);
    }

    /// `events_clear`: the bits written clear `events_read`.
    fn write_config(&self, offset: u64, data: &[u8]) {
        let mut clear = 0u32;
        for (i, &b) in data.iter().enumerate() {
            if let Some(byte @ 4..=7) = offset.checked_add(i as u64) {
                clear |= u32::from(b) << (8 * (byte - 4));
            }
        }
        self.events_read.fetch_and(!clear, Ordering::Relaxed);
    }

    fn activate(&self, activation: Activation) -> Result<(), ActivateError> {
        let Activation { mem, queues, transport, dirty, .. } = activation;
        let mut controlq = None;
        let mut cursorq = None;
        let mut kicks = Vec::new();
        for q in queues {
            match q.index {
                CONTROLQ => controlq = Some(q.queue),
                CURSORQ => cursorq = Some(q.queue),
                _ => continue,
            }
            kicks.push((q.index, q.kick));
        }
        let running = Arc::new(Running {
            mem,
            dirty,
            transport,
            // Stopped until every handler is in place: a handler that runs before then
            // returns at once, so a failed activation can take them all away without
            // waiting for one that calls into the transport the caller holds.
            queues: Mutex::new(RunQueues {
                controlq,
                cursorq,
                broken: false,
                stopped: true,
            }),
            kicks: kicks.iter().map(|(i, k)| (*i, k.clone())).collect(),
        });
        let gpu = self.this.clone();
        let mut rekick = Vec::new();
        for (index, kick) in kicks {
            rekick.push(kick.clone());
            let on_kick = running.clone();
            let gpu = gpu.clone();
            let fd = kick.as_raw_fd();
            let id = self
                .conf
                .context
                .add_fd_with(
                    fd,
                    Interest::READ,
                    Box::new(move || {
                        drain_kick(&kick);
                        if let Some(gpu) = gpu.upgrade() {
                            on_kick.serve(&gpu, index);
                        }
                    }),
                )
                .map_err(|e| ActivateError::Io {
                    device: "virtio-gpu",
                    reason: e.to_string(),
                });
            match id {
                Ok(id) => self.handlers.lock().push(id),
                Err(e) => {
                    self.conf.context.remove_fds(&self.handlers);
                    return Err(e);
                }
            }
        }
        running.queues.lock().stopped = false;
        *self.running.lock() = Some(running);
        // Requests the driver queued before DRIVER_OK, or before a migration or a stop,
        // are served on the loop as if just notified.
        for kick in rekick {
            let _ = kick.write(1);
        }
        Ok(())
    }

    /// QEMU's `virtio_gpu_reset`: every resource goes and every scanout is blank.
    fn reset(&self) {
        self.stop();
        let mut st = self.state.lock();
        st.resources.clear();
        st.hostmem = 0;
        st.enabled = false;
        for s in st.scanouts.iter_mut() {
            disable(s);
            s.cursor = Cursor::default();
        }
    }

    /// Commands run to their end on the loop: nothing is in flight.
    fn park(&self) -> Option<Vec<QueuePosition>> {
        let running = self.stop()?;
        let q = running.queues.lock();
        let mut positions = Vec::new();
        if let Some(c) = &q.controlq {
            positions.push(QueuePosition::of(CONTROLQ, c, 0));
        }
        if let Some(c) = &q.cursorq {
            positions.push(QueuePosition::of(CURSORQ, c, 0));
        }
        Some(positions)
    }

    /// QEMU's `virtio_gpu_save`: each resource with its pixels and backing, the scanouts.
    fn save_device(&self, section: &mut VmStateSection) -> Result<(), VmStateError> {
        let st = self.state.lock();
        let mut ids = Vec::new();
        for (id, res) in &st.resources {
            section.put(&format!("gpu.resource.{id}"), res);
            section.put_bytes(&format!("gpu.resource.{id}.pixels"), &res.pixels);
            ids.push(*id);
        }
        section.put("gpu.resources", ids);
        section.put("gpu.scanouts", &st.scanouts);
        section.put("gpu.enabled", st.enabled);
        section.put("gpu.events_read", self.events_read.load(Ordering::Relaxed));
        Ok(())
    }

    /// QEMU's `virtio_gpu_load`, with its checks: formats, sizes, backing in guest RAM
    /// and scanouts within their resources.
    fn load_device(&self, section: &VmStateSection) -> Result<(), VmStateError> {
        let bad = |field: &str, reason: String| VmStateError::BadField {
            field: field.to_string(),
            reason,
        };
        let ids: Vec<u32> = section.get("gpu.resources")?;
        let mut resources = BTreeMap::new();
        let mut hostmem = 0u64;
        for id in ids {
            let field = format!("gpu.resource.{id}");
            let mut res: Resource = section.get(&field)?;
            res.pixels = section.get_bytes(&format!("{field}.pixels"))?;
            let size = u64::from(res.width)
                .checked_mul(u64::from(res.height))
                .and_then(|n| n.checked_mul(BYTES_PER_PIXEL));
            if id == 0 || format_layout(res.format).is_none() || size != Some(res.pixels.len() as u64) {
                return Err(bad(&field, format!("resource {id}: bad id, format or size")));
            }
            hostmem = hostmem.saturating_add(res.pixels.len() as u64);
            if hostmem >= self.conf.max_hostmem {
                return Err(bad(&field, "the resources exceed max_hostmem".into()));
            }
            if resources.insert(id, res).is_some() {
                return Err(bad(&field, format!("resource {id} twice")));
            }
        }
        let mut scanouts: Vec<Scanout> = section.get("gpu.scanouts")?;
        if scanouts.len() != self.conf.max_outputs as usize {
            return Err(bad("gpu.scanouts", format!("{} scanouts, not {}", scanouts.len(), self.conf.max_outputs)));
        }
        for (i, s) in scanouts.iter_mut().enumerate() {
            let fits = s.resource_id == 0
                || resources
                    .get(&s.resource_id)
                    .is_some_and(|r: &Resource| r.backing.is_some() && s.rect.inside(r.width, r.height));
            if !fits {
                return Err(bad("gpu.scanouts", format!("scanout {i} shows what is not there")));
            }
            s.dirty = Some(DirtyRows { full: true, rows: None });
        }
        let events_read: u32 = section.get("gpu.events_read")?;
        self.events_read.store(events_read, Ordering::Relaxed);
        // QEMU's `vmstate_virtio_gpu_scanouts` carries `enable`; a stream without it
        // (an older qomvm's) had it set if a scanout was shown.
        let enabled = match section.get::<bool>("gpu.enabled") {
            Ok(enabled) => enabled,
            Err(VmStateError::MissingField(_)) => scanouts.iter().any(|s| s.resource_id != 0),
            Err(e) => return Err(e),
        };
        *self.state.lock() = GpuState {
            resources,
            hostmem,
            scanouts,
            enabled,
        };
        Ok(())
    }
}

/// The device while its driver runs it.
struct Running {
    mem: Arc<GuestMemoryMmap>,
    dirty: Arc<DirtyTracker>,
    transport: Arc<dyn VirtioTransport>,
    queues: Mutex<RunQueues>,
    /// Each queue's notifier, to come back for the rest after a full pass.
    kicks: Vec<(u16, Arc<EventFd>)>,
}

struct RunQueues {
    controlq: Option<Queue>,
    cursorq: Option<Queue>,
    broken: bool,
    stopped: bool,
}

impl Running {
    /// Every request the driver posted on `index`, each answered before the next.
    fn serve(&self, gpu: &VirtioGpu, index: u16) {
        let mut q = self.queues.lock();
        if q.broken || q.stopped {
            return;
        }
        let result = (|| -> Result<bool, RingError> {
            let mem = &*self.mem;
            let queue = match index {
                CONTROLQ => q.controlq.as_mut(),
                _ => q.cursorq.as_mut(),
            };
            let Some(queue) = queue else { return Ok(false) };
            let mut used = false;
            queue.disable_notification(mem)?;
            let mut served = 0;
            loop {
                if served == PASS_REQUESTS {
                    if let Some((_, kick)) = self.kicks.iter().find(|(i, _)| *i == index) {
                        let _ = kick.write(1);
                    }
                    break;
                }
                let Some(chain) = next_chain(queue, &self.mem)? else {
                    break;
                };
                served += 1;
                let head = chain.head_index();
                let written = chain.clone();
                let mut reader = Reader::new(mem, chain.clone()).map_err(|e| RingError::Chain(e.to_string()))?;
                let mut req = vec![0u8; reader.available_bytes().min(MAX_REQUEST)];
                reader
                    .read_exact(&mut req)
                    .map_err(|_| RingError::Chain("cannot read the request".into()))?;
                let mut len = 0u32;
                if req.len() < HDR_SIZE {
                    GUEST_ERRORS.warn(|| format!("virtio-gpu: a request of {} bytes", req.len()));
                } else if index == CURSORQ {
                    gpu.cursor(&req);
                } else {
                    let response = gpu.control(mem, &req);
                    let mut writer = Writer::new(mem, chain).map_err(|e| RingError::Chain(e.to_string()))?;
                    let n = writer.available_bytes().min(response.len());
                    if n < response.len() {
                        GUEST_ERRORS.warn(|| format!("virtio-gpu: a response of {} bytes cut to {n}", response.len()));
                    }
                    writer
                        .write_all(&response[..n])
                        .map_err(|_| RingError::Chain("cannot write the response".into()))?;
                    mark_chain_written(&self.dirty, &written);
                    len = n as u32;
                }
                queue.add_used(mem, head, len)?;
                used = true;
            }
            Ok(used && queue.needs_notification(mem)?)
        })();
        match result {
            Ok(true) => self.transport.signal_used_queue(index),
            Ok(false) => {}
            Err(e) => {
                if !q.broken {
                    q.broken = true;
                    GUEST_ERRORS.warn(|| format!("virtio-gpu: queue {index}: {e}: device needs reset"));
                    self.transport.mark_broken();
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_put_each_colour_where_its_name_says() {
        let pixel = |format: u32, bytes: [u8; 4]| Resource {
            format,
            width: 1,
            height: 1,
            pixels: bytes.to_vec(),
            backing: None,
        }
        .rgb(0, 0);
        assert_eq!(pixel(2, [0x33, 0x22, 0x11, 0xff]), 0x112233, "B8G8R8X8");
        assert_eq!(pixel(4, [0xff, 0x11, 0x22, 0x33]), 0x112233, "X8R8G8B8");
        assert_eq!(pixel(67, [0x11, 0x22, 0x33, 0xff]), 0x112233, "R8G8B8A8");
        assert_eq!(pixel(121, [0xff, 0x33, 0x22, 0x11]), 0x112233, "A8B8G8R8");
        assert!(format_layout(5).is_none());
    }

    fn gpu() -> Arc<VirtioGpu> {
        VirtioGpu::new(VirtioGpuConf {
            max_outputs: 1,
            xres: 1280,
            yres: 800,
            edid: true,
            max_hostmem: 256 << 20,
            context: AioContext::new("virtio-gpu-test").unwrap(),
        })
    }

    /// A stream with one resource as `resource` describes it and `pixels`.
    fn stream(resource: serde_json::Value, pixels: &[u8], ids: &[u32]) -> VmStateSection {
        let mut section = VmStateSection::new(1);
        section.put("gpu.resources", ids);
        section.put("gpu.resource.1", resource);
        section.put_bytes("gpu.resource.1.pixels", pixels);
        section.put("gpu.scanouts", [Scanout::default()]);
        section.put("gpu.events_read", 0u32);
        section
    }

    #[test]
    fn a_corrupt_migration_stream_is_refused_not_obeyed() {
        let gpu = gpu();
        let good = serde_json::json!({"format": 2, "width": 2, "height": 2, "backing": [[4096, 16]]});
        assert!(gpu.load_device(&stream(good.clone(), &[0; 16], &[1])).is_ok());
        let cases = [
            // 2^31 x 2^31 pixels: the size overflows; no pixels to match it.
            (serde_json::json!({"format": 2, "width": 1u64 << 31, "height": 1u64 << 31, "backing": null}), &[][..], &[1][..]),
            (good.clone(), &[0; 12][..], &[1][..]),
            (good.clone(), &[0; 16][..], &[1, 1][..]),
            (serde_json::json!({"format": 2, "width": 2, "height": 2, "backing": [[4096, 0]]}), &[0; 16][..], &[1][..]),
            (serde_json::json!({"format": 2, "width": 2, "height": 2, "backing": [[u64::MAX, 16]]}), &[0; 16][..], &[1][..]),
            (serde_json::json!({"format": 9, "width": 2, "height": 2, "backing": null}), &[0; 16][..], &[1][..]),
        ];
        for (resource, pixels, ids) in cases {
            assert!(gpu.load_device(&stream(resource.clone(), pixels, ids)).is_err(), "{resource} {ids:?}");
        }
    }

    #[test]
    fn a_copy_starts_at_the_piece_holding_its_offset() {
        let b = Backing::new(vec![(0x1000, 16), (0x3000, 8), (0x5000, 4)]);
        assert_eq!(b.total(), 28);
        assert_eq!(b.ends.partition_point(|&e| e <= 16), 1);
        assert_eq!(b.ends.partition_point(|&e| e <= 27), 2);
        assert_eq!(b.ends.partition_point(|&e| e <= 28), 3);
    }

    #[test]
    fn rectangles_stay_inside_without_overflow() {
        let r = Rect { x: u32::MAX, y: 0, width: 2, height: 1 };
        assert!(!r.inside(100, 100));
        assert!(Rect { x: 10, y: 10, width: 90, height: 90 }.inside(100, 100));
    }
}
