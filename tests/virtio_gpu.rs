//! `virtio-gpu-pci` (the 2D virtio-gpu) on the pc board under the qtest accelerator, driven
//! by a virtio 1.x driver as Linux's virtio-gpu driver drives it
//! ([`test_support::virtio_gpu`], shared with `tests/virtio_vga.rs`): QEMU 7.2's IDs,
//! queues and configuration, display information and EDID, resources created, backed,
//! transferred (QEMU's copy rules, offset and partial rectangles included), set on scanouts
//! and flushed to the console in every 32-bit format, pixel for pixel, QEMU's error codes,
//! fences, the cursor queue, hostile chains that neither panic nor hang, a broken ring that
//! marks the device broken, and a migration that keeps the resources, their backing and the
//! picture.
//!
//! Expected values come from QEMU 7.2 (`hw/display/virtio-gpu.c`, `virtio-gpu-base.c`)
//! and the virtio 1.2 specification (5.7 "GPU Device"), not from the device's code.

use std::time::Duration;

use hw::core::machine::machine_state;
use hw::core::migration::{load_vm, save_vm, Progress};
use hw::core::runstate::{vm_start, vm_stop, RunStatus};
use qom::ObjectRef;
use test_support::qtest::with_deadline;
use test_support::virtio::{VirtioPciDevice, NEEDS_RESET};
use test_support::virtio_gpu::{
    assert_picture, backing, command, encode, fenced, le32, le64, pattern, solid, try_pc_with,
    Code, Gpu, Rect, B8G8R8A8, B8G8R8X8, CMD, CTX_CREATE, ERR_INVALID_PARAMETER,
    ERR_INVALID_RESOURCE_ID, ERR_INVALID_SCANOUT_ID, ERR_OUT_OF_MEMORY, ERR_UNSPEC, FLAG_FENCE,
    FORMATS, F_EDID, F_RESOURCE_BLOB, F_VIRGL, GET_CAPSET_INFO, GET_DISPLAY_INFO, GET_EDID,
    MOVE_CURSOR, OK_DISPLAY_INFO, OK_EDID, OK_NODATA, R8G8B8A8, R8G8B8X8, RAM,
    RESOURCE_ATTACH_BACKING, RESOURCE_CREATE_2D, RESOURCE_CREATE_BLOB, RESOURCE_FLUSH,
    RESOURCE_UNREF, RESP, SET_SCANOUT, SET_SCANOUT_BLOB, TRANSFER_TO_HOST_2D, UPDATE_CURSOR,
    VERSION_1, WAIT, X8B8G8R8,
};
use vm_memory::{Bytes, GuestAddress};

/// 04.0, where the tests plug the device.
const DEVFN: u32 = 4 << 3;
/// Where the cursor commands are (after the driver's [`RESP`]).
const CURSOR_BUF: u64 = 0x2c_0000;

/// A pc with `virtio-gpu-pci,addr=04.0,props...`: the machine and the device, or the error
/// text.
fn try_machine(props: &[(&str, &str)]) -> Result<(ObjectRef, ObjectRef), String> {
    try_pc_with("virtio-gpu-pci", "04.0", props)
}

fn machine(props: &[(&str, &str)]) -> (ObjectRef, ObjectRef) {
    try_machine(props).unwrap()
}

/// The driver started on a new machine with `virtio-gpu-pci,props...`.
fn new_gpu(props: &[(&str, &str)]) -> Gpu {
    let (m, dev) = machine(props);
    Gpu::start(&m, &dev, DEVFN)
}

/// GET_EDID for `scanout`: the response type and the EDID bytes (`size` of them).
fn edid(gpu: &mut Gpu, scanout: u32) -> (Code, Vec<u8>) {
    let resp = gpu.request(&command(GET_EDID, &[scanout, 0]), 1056);
    let code = Code(le32(&resp, 0));
    if code != OK_EDID {
        return (code, Vec::new());
    }
    assert_eq!(resp.len(), 1056, "virtio_gpu_resp_edid is 1056 bytes");
    let size = le32(&resp, 24) as usize;
    assert!((128..=1024).contains(&size), "EDID size {size}");
    (code, resp[32..32 + size].to_vec())
}

/// Checks `e` is a valid EDID 1.x whose preferred timing is `w` x `h`.
fn assert_edid(e: &[u8], w: u32, h: u32) {
    assert_eq!(e[..8], [0, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0], "header");
    assert_eq!(e[18], 1, "EDID version 1.x");
    let blocks = 1 + usize::from(e[126]);
    assert!(
        blocks * 128 <= e.len(),
        "{} extension blocks in {} bytes",
        e[126],
        e.len()
    );
    for b in 0..blocks {
        let sum = e[b * 128..(b + 1) * 128]
            .iter()
            .fold(0u8, |s, &x| s.wrapping_add(x));
        assert_eq!(sum, 0, "block {b}'s checksum");
    }
    // The first detailed timing descriptor (byte 54) is the preferred mode.
    let dtd = &e[54..72];
    assert_ne!(
        u16::from_le_bytes([dtd[0], dtd[1]]),
        0,
        "a detailed timing, not a display descriptor"
    );
    let hactive = u32::from(dtd[2]) | u32::from(dtd[4] >> 4) << 8;
    let vactive = u32::from(dtd[5]) | u32::from(dtd[7] >> 4) << 8;
    assert_eq!((hactive, vactive), (w, h), "the preferred timing");
}

#[test]
fn ids_queues_features_and_configuration_are_qemus() {
    with_deadline("gpu-ids", || {
        let (m, _dev) = machine(&[]);
        let pci = VirtioPciDevice::probe(&m, DEVFN);
        assert_eq!(pci.config.read(0, 4), 0x1050_1af4, "virtio 1.0 only GPU");
        assert_eq!(pci.config.read(0x08, 1), 1, "revision 1");
        assert_eq!(pci.config.read(0x0a, 2), 0x0380, "display, other");
        assert_eq!(pci.config.read(0x2c, 4), 0x1100_1af4, "subsystem");
        assert_eq!(pci.config.read(0x3d, 1), 1, "INTA");
        assert_eq!(pci.config.read(0x10, 4) & 1, 0, "no legacy I/O BAR");
        let msix = pci
            .config
            .capabilities()
            .into_iter()
            .find(|&(id, _)| id == 0x11)
            .expect("MSI-X")
            .1;
        assert_eq!(pci.config.read(msix + 2, 2) & 0x7ff, 2, "vectors=3");
        assert_eq!(pci.num_queues(), 2);
        // QEMU's 2D device: a control queue of 64 (256 is virtio-gpu-gl's), a cursor
        // queue of 16.
        for (q, size) in [(0u64, 64), (1, 16)] {
            pci.common_write(0x16, q, 2);
            assert_eq!(pci.common_read(0x18, 2), size, "queue {q}'s size");
        }
        let features = pci.device_features();
        assert_ne!(features & VERSION_1, 0);
        assert_ne!(features & F_EDID, 0, "edid is on by default");
        assert_eq!(
            features & (F_VIRGL | F_RESOURCE_BLOB),
            0,
            "no virgl, no blob"
        );
        // events_read, events_clear, num_scanouts, num_capsets.
        let config: Vec<u64> = (0..4).map(|i| pci.device_config(4 * i, 4)).collect();
        assert_eq!(config, [0, 0, 1, 0]);
        // Only events_clear is the driver's; it clears and reads back as zero.
        pci.write_device_config(8, 5, 4);
        pci.write_device_config(4, 0xffff_ffff, 4);
        let config: Vec<u64> = (0..4).map(|i| pci.device_config(4 * i, 4)).collect();
        assert_eq!(config, [0, 0, 1, 0]);

        let (m, _dev) = machine(&[("edid", "off"), ("max_outputs", "4")]);
        let pci = VirtioPciDevice::probe(&m, DEVFN);
        assert_eq!(pci.device_features() & F_EDID, 0, "edid=off");
        assert_eq!(pci.device_config(8, 4), 4, "num_scanouts = max_outputs");
        assert_eq!(pci.device_config(12, 4), 0, "no capsets");

        let (m, _dev) = machine(&[("vectors", "5")]);
        let pci = VirtioPciDevice::probe(&m, DEVFN);
        let msix = pci
            .config
            .capabilities()
            .into_iter()
            .find(|&(id, _)| id == 0x11)
            .unwrap()
            .1;
        assert_eq!(pci.config.read(msix + 2, 2) & 0x7ff, 4, "vectors=5");

        let err = try_machine(&[("max_outputs", "17")]).unwrap_err();
        assert!(err.contains("invalid max_outputs > 16"), "{err}");
        assert!(try_machine(&[("max_outputs", "16")]).is_ok());
    });
}

#[test]
fn display_info_and_edid_describe_the_configured_mode() {
    with_deadline("gpu-display-info", || {
        let mut gpu = new_gpu(&[]);
        let (code, modes) = gpu.display_info();
        assert_eq!(code, OK_DISPLAY_INFO);
        assert_eq!(modes[0], [0, 0, 1280, 800, 1, 0], "output 0: 1280x800");
        assert!(modes[1..].iter().all(|m| *m == [0; 6]), "{modes:?}");
        let (code, e) = edid(&mut gpu, 0);
        assert_eq!(code, OK_EDID);
        assert_edid(&e, 1280, 800);
        assert_eq!(
            gpu.code(&command(GET_EDID, &[1, 0])),
            ERR_INVALID_PARAMETER,
            "scanout 1 of 1"
        );

        let mut gpu = new_gpu(&[("xres", "1024"), ("yres", "768"), ("max_outputs", "2")]);
        let (_, modes) = gpu.display_info();
        assert_eq!(modes[0], [0, 0, 1024, 768, 1, 0]);
        assert_eq!(modes[1], [0; 6], "only output 0 starts enabled");
        assert!(modes[2..].iter().all(|m| *m == [0; 6]));
        let (code, e) = edid(&mut gpu, 0);
        assert_eq!(code, OK_EDID);
        assert_edid(&e, 1024, 768);
        let (code, e) = edid(&mut gpu, 1);
        assert_eq!(code, OK_EDID, "scanout 1 of 2 has an EDID too");
        assert_eq!(e[..8], [0, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0]);
        assert_eq!(gpu.code(&command(GET_EDID, &[2, 0])), ERR_INVALID_PARAMETER);
        assert_eq!(
            gpu.code(&command(GET_EDID, &[u32::MAX, 0])),
            ERR_INVALID_PARAMETER
        );
        // Two outputs, two consoles.
        gpu.console(0);
        gpu.console(1);
    });
}

#[test]
fn every_format_shows_its_colours_on_the_console() {
    with_deadline("gpu-formats", || {
        let mut gpu = new_gpu(&[]);
        // An odd size, so a wrong stride or swapped axes show.
        let (w, h) = (37, 19);
        for (i, format) in FORMATS.into_iter().enumerate() {
            let id = i as u32 + 1;
            let image = pattern(id);
            gpu.resource(id, format, w, h, image);
            assert_eq!(gpu.set_scanout(0, id, [0, 0, w, h]), OK_NODATA);
            assert_eq!(gpu.flush(id, [0, 0, w, h]), OK_NODATA);
            assert_picture(&gpu.screen(0), w, h, image, &format!("format {format}"));
        }
        // Exact values of two formats, spelled out: B8G8R8X8 and R8G8B8A8.
        gpu.write(backing(20), &[0x11, 0x22, 0x33, 0xff].repeat(16 * 16));
        assert_eq!(gpu.create(20, B8G8R8X8, 16, 16), OK_NODATA);
        assert_eq!(gpu.attach(20, &[(backing(20), 1024)]), OK_NODATA);
        assert_eq!(gpu.transfer(20, [0, 0, 16, 16], 0), OK_NODATA);
        assert_eq!(gpu.set_scanout(0, 20, [0, 0, 16, 16]), OK_NODATA);
        assert_eq!(gpu.flush(20, [0, 0, 16, 16]), OK_NODATA);
        assert_picture(&gpu.screen(0), 16, 16, solid(0x33_2211), "B8G8R8X8");
        gpu.write(backing(21), &[0x11, 0x22, 0x33, 0x00].repeat(16 * 16));
        assert_eq!(gpu.create(21, R8G8B8A8, 16, 16), OK_NODATA);
        assert_eq!(gpu.attach(21, &[(backing(21), 1024)]), OK_NODATA);
        assert_eq!(gpu.transfer(21, [0, 0, 16, 16], 0), OK_NODATA);
        assert_eq!(gpu.set_scanout(0, 21, [0, 0, 16, 16]), OK_NODATA);
        assert_eq!(gpu.flush(21, [0, 0, 16, 16]), OK_NODATA);
        assert_picture(
            &gpu.screen(0),
            16,
            16,
            solid(0x11_2233),
            "R8G8B8A8, alpha 0",
        );
    });
}

/// A framebuffer as Linux's fbdev makes one: the whole mode in B8G8R8X8, its backing
/// one entry per page, the pages scattered (here in reverse order): the resource's bytes
/// run through the entries in their order.
#[test]
fn a_full_screen_framebuffer_in_scattered_pages() {
    with_deadline("gpu-framebuffer", || {
        let mut gpu = new_gpu(&[]);
        let (w, h) = (1280, 800);
        let image = pattern(9);
        let mut bytes = Vec::with_capacity((w * h * 4) as usize);
        for y in 0..h {
            for x in 0..w {
                bytes.extend_from_slice(&encode(B8G8R8X8, image(x, y), 0));
            }
        }
        let n = bytes.len() as u64 / 4096;
        let pages: Vec<(u64, u32)> = (0..n)
            .map(|k| (backing(1) + (n - 1 - k) * 4096, 4096))
            .collect();
        for (chunk, &(addr, _)) in bytes.chunks(4096).zip(&pages) {
            gpu.write(addr, chunk);
        }
        assert_eq!(gpu.create(1, B8G8R8X8, w, h), OK_NODATA);
        assert_eq!(gpu.attach(1, &pages), OK_NODATA, "{n} entries");
        assert_eq!(gpu.transfer(1, [0, 0, w, h], 0), OK_NODATA);
        assert_eq!(gpu.set_scanout(0, 1, [0, 0, w, h]), OK_NODATA);
        assert_eq!(gpu.flush(1, [0, 0, w, h]), OK_NODATA);
        assert_picture(&gpu.screen(0), w, h, image, "the framebuffer");
        // Completions raise the legacy interrupt (no MSI-X enabled): ISR bit 0.
        assert_eq!(gpu.pci.read_isr() & 1, 1);
        // The display information is the requested mode, whatever the scanouts show.
        assert_eq!(gpu.set_scanout(0, 1, [0, 0, 640, 480]), OK_NODATA);
        assert_eq!(gpu.display_info().1[0], [0, 0, 1280, 800, 1, 0]);
    });
}

/// QEMU's `virtio_gpu_transfer_to_host_2d`: row `i` of the rectangle comes from
/// `offset + i * stride` of the backing (stride: the resource's), to (x, y + i).
#[test]
fn transfers_follow_qemus_copy_rules_for_offsets_and_partial_rectangles() {
    with_deadline("gpu-transfer", || {
        let mut gpu = new_gpu(&[]);
        let (w, h) = (32, 16);
        let stride = w * 4;
        let old = pattern(1);
        let new = pattern(2);
        gpu.show(0, 1, w, h, old);
        assert_picture(&gpu.screen(0), w, h, old, "first transfer");
        gpu.fill(backing(1), B8G8R8X8, w, h, new);
        let mut expect: Vec<u32> = (0..w * h).map(|i| old(i % w, i / w)).collect();
        let copy = |expect: &mut Vec<u32>, r: Rect, offset: u32| {
            let [x, y, rw, rh] = r;
            for i in 0..rh {
                for j in 0..rw {
                    // The source pixel at byte offset + i * stride + j * 4 of the backing.
                    let src = (offset + i * stride + j * 4) / 4;
                    expect[((y + i) * w + x + j) as usize] = new(src % w, src / w);
                }
            }
        };
        let flush_and_check = |gpu: &mut Gpu, expect: &[u32], what: &str| {
            assert_eq!(gpu.flush(1, [0, 0, w, h]), OK_NODATA);
            assert_picture(
                &gpu.screen(0),
                w,
                h,
                |x, y| expect[(y * w + x) as usize],
                what,
            );
        };
        // Linux's partial update: the offset of the rectangle's first pixel.
        let r = [4, 2, 8, 3];
        assert_eq!(gpu.transfer(1, r, u64::from(2 * stride + 4 * 4)), OK_NODATA);
        copy(&mut expect, r, 2 * stride + 4 * 4);
        flush_and_check(&mut gpu, &expect, "rect (4,2) 8x3, offset at the rect");
        // An offset that is not the rectangle's: the rows come from the offset.
        let r = [20, 10, 4, 2];
        assert_eq!(gpu.transfer(1, r, 0), OK_NODATA);
        copy(&mut expect, r, 0);
        flush_and_check(&mut gpu, &expect, "rect (20,10) 4x2 from offset 0");
        let r = [1, 12, 5, 3];
        assert_eq!(gpu.transfer(1, r, u64::from(3 * 4 + stride)), OK_NODATA);
        copy(&mut expect, r, 3 * 4 + stride);
        flush_and_check(&mut gpu, &expect, "rect (1,12) 5x3 from pixel (3,1)");
        // Whole rows below the top, from offset 0.
        let r = [0, 5, w, 2];
        assert_eq!(gpu.transfer(1, r, 0), OK_NODATA);
        copy(&mut expect, r, 0);
        flush_and_check(&mut gpu, &expect, "rows 5 and 6 from offset 0");
        // Whole rows at an offset.
        let r = [0, 14, w, 2];
        assert_eq!(gpu.transfer(1, r, u64::from(stride)), OK_NODATA);
        copy(&mut expect, r, stride);
        flush_and_check(&mut gpu, &expect, "rows 14 and 15 from row 1");
        // An empty rectangle copies nothing.
        assert_eq!(gpu.transfer(1, [3, 3, 0, 0], 0), OK_NODATA);
        flush_and_check(&mut gpu, &expect, "empty rectangle");
        // Everything.
        assert_eq!(gpu.transfer(1, [0, 0, w, h], 0), OK_NODATA);
        flush_and_check(
            &mut gpu,
            &(0..w * h).map(|i| new(i % w, i / w)).collect::<Vec<_>>(),
            "all",
        );
    });
}

/// The console shows the scanout's rectangle of its resource; a flush redraws the rows
/// it covers there and nothing else (QEMU's `dpy_gfx_update` of the flushed region), and
/// an idle refresh redraws nothing.
#[test]
// Row ranges are what is compared here: one range.
#[allow(clippy::single_range_in_vec_init)]
fn the_console_shows_the_scanout_rectangle_and_flushed_rows() {
    with_deadline("gpu-scanout-rect", || {
        let mut gpu = new_gpu(&[]);
        let (w, h) = (64, 48);
        let old = pattern(3);
        gpu.resource(1, B8G8R8X8, w, h, old);
        assert_eq!(gpu.set_scanout(0, 1, [8, 4, 32, 20]), OK_NODATA);
        assert_eq!(gpu.flush(1, [0, 0, w, h]), OK_NODATA);
        assert_picture(
            &gpu.screen(0),
            32,
            20,
            |x, y| old(x + 8, y + 4),
            "the scanout's rect",
        );
        let console = gpu.console(0);
        let base = console.refresh(None).generation;
        let idle = console.refresh(Some(base));
        assert!(
            idle.changed_rows.is_empty(),
            "an idle refresh changed rows {:?}",
            idle.changed_rows
        );
        // New pixels in resource rows 10..14, flushed: console rows 6..10.
        let new = pattern(4);
        gpu.fill(backing(1), B8G8R8X8, w, h, new);
        assert_eq!(
            gpu.transfer(1, [0, 10, w, 4], u64::from(10 * w * 4)),
            OK_NODATA
        );
        assert_eq!(gpu.flush(1, [0, 10, w, 4]), OK_NODATA);
        let update = console.refresh(Some(base));
        assert_eq!(update.changed_rows, vec![6..10], "the flushed rows");
        let expect = |x: u32, y: u32| {
            if (6..10).contains(&y) {
                new(x + 8, y + 4)
            } else {
                old(x + 8, y + 4)
            }
        };
        assert_picture(&update.surface, 32, 20, expect, "after the partial flush");
        // A flush outside the scanout's rect changes nothing there.
        assert_eq!(
            gpu.transfer(1, [0, 30, w, 4], u64::from(30 * w * 4)),
            OK_NODATA
        );
        assert_eq!(gpu.flush(1, [0, 30, w, 4]), OK_NODATA);
        let since = update.generation;
        let update = console.refresh(Some(since));
        assert!(
            update.changed_rows.is_empty(),
            "rows {:?} changed",
            update.changed_rows
        );
        assert_picture(&update.surface, 32, 20, expect, "after a flush outside");
    });
}

#[test]
fn resource_creation_gets_qemus_errors_and_counts_host_memory() {
    with_deadline("gpu-create", || {
        let mut gpu = new_gpu(&[]);
        assert_eq!(
            gpu.create(0, B8G8R8X8, 16, 16),
            ERR_INVALID_RESOURCE_ID,
            "id 0"
        );
        assert_eq!(gpu.create(1, B8G8R8X8, 16, 16), OK_NODATA);
        assert_eq!(
            gpu.create(1, B8G8R8A8, 32, 32),
            ERR_INVALID_RESOURCE_ID,
            "id 1 again"
        );
        for format in [0, 5, 66, 100, 135, u32::MAX] {
            assert_eq!(
                gpu.create(2, format, 16, 16),
                ERR_INVALID_PARAMETER,
                "format {format}"
            );
        }
        // The resource was not made by the failures.
        assert_eq!(gpu.create(2, R8G8B8X8, 16, 16), OK_NODATA);
        // 8192 x 8192 x 4 is 256 MiB: not below max_hostmem.
        assert_eq!(gpu.create(3, B8G8R8X8, 8192, 8192), ERR_OUT_OF_MEMORY);
        assert_eq!(gpu.create(3, B8G8R8X8, 65536, 65536), ERR_OUT_OF_MEMORY);
        assert_eq!(
            gpu.create(3, B8G8R8X8, u32::MAX, u32::MAX),
            ERR_OUT_OF_MEMORY
        );
        assert_eq!(gpu.create(3, B8G8R8X8, u32::MAX, 1), ERR_OUT_OF_MEMORY);
        assert_eq!(gpu.create(3, B8G8R8X8, 16, 16), OK_NODATA);

        // Four 256 KiB resources under max_hostmem=1M: the fourth would reach it.
        let mut gpu = new_gpu(&[("max_hostmem", "1M")]);
        for id in 1..=3 {
            assert_eq!(
                gpu.create(id, B8G8R8X8, 256, 256),
                OK_NODATA,
                "resource {id}"
            );
        }
        assert_eq!(gpu.create(4, B8G8R8X8, 256, 256), ERR_OUT_OF_MEMORY);
        assert_eq!(gpu.create(4, B8G8R8X8, 256, 255), OK_NODATA, "just below");
        assert_eq!(gpu.unref(4), OK_NODATA);
        // Unreferencing gives the memory back.
        assert_eq!(gpu.unref(2), OK_NODATA);
        assert_eq!(gpu.create(5, B8G8R8X8, 256, 256), OK_NODATA);
        assert_eq!(gpu.unref(2), ERR_INVALID_RESOURCE_ID, "unref twice");
        assert_eq!(gpu.unref(0), ERR_INVALID_RESOURCE_ID);
    });
}

#[test]
fn backing_commands_get_qemus_errors() {
    with_deadline("gpu-backing", || {
        let mut gpu = new_gpu(&[]);
        let b = backing(1);
        assert_eq!(
            gpu.attach(1, &[(b, 4096)]),
            ERR_INVALID_RESOURCE_ID,
            "no resource"
        );
        assert_eq!(gpu.detach(1), ERR_INVALID_RESOURCE_ID, "no resource");
        assert_eq!(gpu.create(1, B8G8R8X8, 32, 32), OK_NODATA);
        // Nothing attached: no transfer, no scanout, no detach (QEMU's
        // virtio_gpu_find_check_resource: "no backing storage", ERR_UNSPEC).
        assert_eq!(
            gpu.transfer(1, [0, 0, 32, 32], 0),
            ERR_UNSPEC,
            "transfer without backing"
        );
        assert_eq!(
            gpu.set_scanout(0, 1, [0, 0, 32, 32]),
            ERR_UNSPEC,
            "scanout without backing"
        );
        assert_eq!(gpu.detach(1), ERR_UNSPEC, "detach without backing");
        // A flush needs no backing.
        assert_eq!(gpu.flush(1, [0, 0, 32, 32]), OK_NODATA);
        // More entries than QEMU takes, or than the command holds.
        assert_eq!(gpu.attach_raw(1, 16385, &[(b, 4096)]), ERR_UNSPEC);
        assert_eq!(gpu.attach_raw(1, u32::MAX, &[(b, 4096)]), ERR_UNSPEC);
        assert_eq!(
            gpu.attach_raw(1, 3, &[(b, 4096), (b + 4096, 4096)]),
            ERR_UNSPEC
        );
        // Entries outside guest RAM (several pages, so that not even QEMU's one-page
        // bounce buffer maps them).
        assert_eq!(gpu.attach(1, &[(1 << 40, 0x10000)]), ERR_UNSPEC, "at 1 TiB");
        assert_eq!(
            gpu.attach(1, &[(b, 4096), (RAM - 4096, 0x4000)]),
            ERR_UNSPEC,
            "across the end of RAM"
        );
        assert_eq!(
            gpu.attach(1, &[(b, u32::MAX)]),
            ERR_UNSPEC,
            "4 GiB from 16 MiB"
        );
        // None of those attached anything.
        assert_eq!(gpu.transfer(1, [0, 0, 32, 32], 0), ERR_UNSPEC);
        assert_eq!(gpu.attach(1, &[(b, 4096)]), OK_NODATA);
        assert_eq!(gpu.attach(1, &[(b, 4096)]), ERR_UNSPEC, "already attached");
        assert_eq!(gpu.transfer(1, [0, 0, 32, 32], 0), OK_NODATA);
        assert_eq!(gpu.detach(1), OK_NODATA);
        assert_eq!(gpu.transfer(1, [0, 0, 32, 32], 0), ERR_UNSPEC, "detached");
        assert_eq!(gpu.detach(1), ERR_UNSPEC, "detached twice");
        assert_eq!(gpu.attach(1, &[(b, 4096)]), OK_NODATA, "attached again");
        assert_eq!(gpu.transfer(1, [0, 0, 32, 32], 0), OK_NODATA);
    });
}

#[test]
fn scanout_transfer_and_flush_get_qemus_errors() {
    with_deadline("gpu-rects", || {
        let mut gpu = new_gpu(&[]);
        let (w, h) = (64, 48);
        gpu.resource(1, B8G8R8X8, w, h, pattern(1));
        // Scanout ids and resources.
        assert_eq!(gpu.set_scanout(1, 1, [0, 0, w, h]), ERR_INVALID_SCANOUT_ID);
        assert_eq!(
            gpu.set_scanout(u32::MAX, 0, [0, 0, w, h]),
            ERR_INVALID_SCANOUT_ID
        );
        assert_eq!(gpu.set_scanout(0, 9, [0, 0, w, h]), ERR_INVALID_RESOURCE_ID);
        // Scanout rectangles: at least 16 x 16, inside the resource.
        for r in [
            [0, 0, 15, 16],
            [0, 0, 16, 15],
            [0, 0, w + 1, h],
            [0, 0, w, h + 1],
            [49, 0, 16, 16],
            [0, 33, 16, 16],
            [w + 1, 0, 16, 16],
            [u32::MAX, 0, 16, 16],
            [0, u32::MAX - 15, 16, 16],
            [16, 0, u32::MAX - 15, 16],
        ] {
            assert_eq!(gpu.set_scanout(0, 1, r), ERR_INVALID_PARAMETER, "{r:?}");
        }
        assert_eq!(
            gpu.set_scanout(0, 1, [48, 32, 16, 16]),
            OK_NODATA,
            "the corner"
        );
        assert_eq!(gpu.set_scanout(0, 1, [0, 0, w, h]), OK_NODATA);
        // Transfer and flush rectangles: inside the resource.
        for r in [
            [0, 0, w + 1, h],
            [0, 0, w, h + 1],
            [1, 0, w, 1],
            [0, 1, 1, h],
            [w + 1, 0, 0, 0],
            [0, h + 1, 0, 0],
            [u32::MAX, 0, 2, 1],
            [2, 0, u32::MAX, 1],
        ] {
            assert_eq!(
                gpu.transfer(1, r, 0),
                ERR_INVALID_PARAMETER,
                "transfer {r:?}"
            );
            assert_eq!(gpu.flush(1, r), ERR_INVALID_PARAMETER, "flush {r:?}");
        }
        assert_eq!(gpu.transfer(9, [0, 0, 1, 1], 0), ERR_INVALID_RESOURCE_ID);
        assert_eq!(gpu.flush(9, [0, 0, 1, 1]), ERR_INVALID_RESOURCE_ID);
        assert_eq!(gpu.flush(0, [0, 0, 1, 1]), ERR_INVALID_RESOURCE_ID);
        // The picture survived it all.
        assert_eq!(gpu.flush(1, [0, 0, w, h]), OK_NODATA);
        assert_picture(&gpu.screen(0), w, h, pattern(1), "after the errors");
    });
}

#[test]
fn unknown_and_unsupported_commands_get_qemus_errors() {
    with_deadline("gpu-unknown", || {
        let mut gpu = new_gpu(&[]);
        for ty in [
            0,
            0xff,
            GET_CAPSET_INFO,
            0x109,
            0x10b,
            0x10e,
            CTX_CREATE,
            UPDATE_CURSOR,
            0x1100,
            u32::MAX,
        ] {
            assert_eq!(
                gpu.code(&command(ty, &[0; 16])),
                ERR_UNSPEC,
                "command {ty:#x}"
            );
        }
        // Blob commands without the blob property.
        for ty in [RESOURCE_CREATE_BLOB, SET_SCANOUT_BLOB] {
            assert_eq!(
                gpu.code(&command(ty, &[0; 16])),
                ERR_INVALID_PARAMETER,
                "command {ty:#x}"
            );
        }
    });
}

#[test]
fn fences_are_echoed_with_every_response() {
    with_deadline("gpu-fences", || {
        let mut gpu = new_gpu(&[]);
        let fence = 0x1122_3344_5566_7788;
        let resp = gpu.request(
            &fenced(
                RESOURCE_CREATE_2D,
                FLAG_FENCE,
                fence,
                7,
                &[1, B8G8R8X8, 16, 16],
            ),
            24,
        );
        assert_eq!(Code(le32(&resp, 0)), OK_NODATA);
        assert_eq!(le32(&resp, 4) & FLAG_FENCE, FLAG_FENCE, "flags");
        assert_eq!(le64(&resp, 8), fence, "fence_id");
        assert_eq!(le32(&resp, 16), 7, "ctx_id");
        // An error carries the fence too.
        let resp = gpu.request(
            &fenced(
                RESOURCE_CREATE_2D,
                FLAG_FENCE,
                fence + 1,
                0,
                &[1, B8G8R8X8, 16, 16],
            ),
            24,
        );
        assert_eq!(Code(le32(&resp, 0)), ERR_INVALID_RESOURCE_ID);
        assert_eq!(
            (le32(&resp, 4) & FLAG_FENCE, le64(&resp, 8)),
            (FLAG_FENCE, fence + 1)
        );
        // And a response with data.
        let resp = gpu.request(&fenced(GET_DISPLAY_INFO, FLAG_FENCE, 42, 0, &[]), 408);
        assert_eq!(Code(le32(&resp, 0)), OK_DISPLAY_INFO);
        assert_eq!(
            (le32(&resp, 4) & FLAG_FENCE, le64(&resp, 8)),
            (FLAG_FENCE, 42)
        );
        // Without the flag, no fence comes back.
        let resp = gpu.request(&fenced(RESOURCE_UNREF, 0, 99, 0, &[1, 0]), 24);
        assert_eq!(Code(le32(&resp, 0)), OK_NODATA);
        assert_eq!((le32(&resp, 4), le64(&resp, 8)), (0, 0));
        // Several fenced commands in one notification complete in order.
        let mut heads = Vec::new();
        for i in 0..3u32 {
            let cmd = fenced(
                RESOURCE_CREATE_2D,
                FLAG_FENCE,
                100 + u64::from(i),
                0,
                &[10 + i, B8G8R8X8, 16, 16],
            );
            gpu.write(CMD + 64 * u64::from(i), &cmd);
            let head = gpu.ctrl.add_chain(
                &gpu.pci.mem,
                &[
                    (CMD + 64 * u64::from(i), cmd.len() as u32, false),
                    (RESP + 64 * u64::from(i), 24, true),
                ],
            );
            heads.push(u32::from(head));
        }
        gpu.pci.notify(0);
        let used = gpu.pci.wait_used(&mut gpu.ctrl, 3, WAIT);
        assert_eq!(used, heads.iter().map(|&h| (h, 24)).collect::<Vec<_>>());
        for i in 0..3 {
            let resp = gpu.read(RESP + 64 * i, 24);
            assert_eq!(Code(le32(&resp, 0)), OK_NODATA);
            assert_eq!(le64(&resp, 8), 100 + i, "fence of command {i}");
        }
    });
}

#[test]
fn unreferencing_a_scanouts_resource_disables_the_scanout() {
    with_deadline("gpu-unref-scanout", || {
        let mut gpu = new_gpu(&[]);
        let red = 0xff_0000;
        gpu.show(0, 1, 32, 32, solid(red));
        assert_picture(&gpu.screen(0), 32, 32, solid(red), "shown");
        assert_eq!(gpu.unref(1), OK_NODATA);
        assert!(
            !gpu.screen(0).pixels.contains(&red),
            "the console still shows the unreferenced resource"
        );
        assert_eq!(gpu.flush(1, [0, 0, 32, 32]), ERR_INVALID_RESOURCE_ID);
        // Resource 2 replaces resource 3 on the scanout: unreferencing 2 then leaves it.
        let green = 0x00_ff00;
        let blue = 0x00_00ff;
        gpu.show(0, 2, 32, 32, solid(green));
        gpu.show(0, 3, 16, 16, solid(blue));
        assert_eq!(gpu.unref(2), OK_NODATA);
        assert_eq!(gpu.flush(3, [0, 0, 16, 16]), OK_NODATA);
        assert_picture(&gpu.screen(0), 16, 16, solid(blue), "resource 3 stays");
        // Resource 0 disables the scanout; the resource stays.
        assert_eq!(gpu.set_scanout(0, 0, [0, 0, 0, 0]), OK_NODATA);
        assert!(!gpu.screen(0).pixels.contains(&blue), "disabled");
        assert_eq!(gpu.flush(3, [0, 0, 16, 16]), OK_NODATA);
        assert!(
            !gpu.screen(0).pixels.contains(&blue),
            "a flush does not bring it back"
        );
        assert_eq!(
            gpu.set_scanout(0, 0, [0, 0, 0, 0]),
            OK_NODATA,
            "disabled twice"
        );
        assert_eq!(gpu.set_scanout(0, 3, [0, 0, 16, 16]), OK_NODATA);
        assert_eq!(gpu.flush(3, [0, 0, 16, 16]), OK_NODATA);
        assert_picture(&gpu.screen(0), 16, 16, solid(blue), "shown again");
        // Detaching the backing leaves the resource's pixels: the scanout still shows them.
        assert_eq!(gpu.detach(3), OK_NODATA);
        assert_eq!(gpu.flush(3, [0, 0, 16, 16]), OK_NODATA);
        assert_picture(&gpu.screen(0), 16, 16, solid(blue), "detached");
    });
}

#[test]
fn two_outputs_show_their_own_resources() {
    with_deadline("gpu-two-outputs", || {
        let mut gpu = new_gpu(&[("max_outputs", "2")]);
        gpu.show(0, 1, 32, 16, pattern(1));
        gpu.resource(2, B8G8R8X8, 48, 32, pattern(2));
        assert_eq!(gpu.set_scanout(1, 2, [16, 16, 32, 16]), OK_NODATA);
        assert_eq!(gpu.flush(2, [0, 0, 48, 32]), OK_NODATA);
        assert_picture(&gpu.screen(0), 32, 16, pattern(1), "head 0");
        assert_picture(
            &gpu.screen(1),
            32,
            16,
            |x, y| pattern(2)(x + 16, y + 16),
            "head 1",
        );
        assert_eq!(
            gpu.set_scanout(2, 2, [0, 0, 16, 16]),
            ERR_INVALID_SCANOUT_ID
        );
        // One resource on both heads: one flush updates both, one unref disables both.
        assert_eq!(gpu.set_scanout(0, 2, [0, 0, 48, 32]), OK_NODATA);
        gpu.fill(backing(2), B8G8R8X8, 48, 32, solid(0x12_3456));
        assert_eq!(gpu.transfer(2, [0, 0, 48, 32], 0), OK_NODATA);
        assert_eq!(gpu.flush(2, [0, 0, 48, 32]), OK_NODATA);
        assert_picture(&gpu.screen(0), 48, 32, solid(0x12_3456), "head 0");
        assert_picture(&gpu.screen(1), 32, 16, solid(0x12_3456), "head 1");
        assert_eq!(gpu.unref(2), OK_NODATA);
        for head in 0..2 {
            assert!(!gpu.screen(head).pixels.contains(&0x12_3456), "head {head}");
        }
        // Resource 1 lost head 0 to resource 2 before: unreferencing it touches nothing.
        assert_eq!(gpu.unref(1), OK_NODATA);
    });
}

#[test]
fn the_cursor_queue_takes_commands_and_returns_empty_buffers() {
    with_deadline("gpu-cursor", || {
        let mut gpu = new_gpu(&[]);
        gpu.show(0, 1, 32, 32, pattern(5));
        gpu.resource(2, B8G8R8A8, 64, 64, solid(0xff_ffff));
        let before = gpu.screen(0);
        let cursor = |ty, scanout, x, y, id| command(ty, &[scanout, x, y, 0, id, 3, 4, 0]);
        let update = cursor(UPDATE_CURSOR, 0, 10, 20, 2);
        assert_eq!(update.len(), 56, "virtio_gpu_update_cursor");
        gpu.write(CURSOR_BUF, &update);
        assert_eq!(gpu.cursor_cmd(&[(CURSOR_BUF, 56, false)]), 0, "update");
        gpu.write(CURSOR_BUF, &cursor(MOVE_CURSOR, 0, 11, 21, 2));
        assert_eq!(gpu.cursor_cmd(&[(CURSOR_BUF, 56, false)]), 0, "move");
        // A writable buffer gets nothing written either.
        gpu.write(CURSOR_BUF + 0x100, &[0xee; 64]);
        assert_eq!(
            gpu.cursor_cmd(&[(CURSOR_BUF, 56, false), (CURSOR_BUF + 0x100, 64, true)]),
            0
        );
        assert_eq!(gpu.read(CURSOR_BUF + 0x100, 64), [0xee; 64]);
        // Hostile ones: a short command, a bad scanout, a missing resource, no buffer.
        assert_eq!(gpu.cursor_cmd(&[(CURSOR_BUF, 8, false)]), 0, "short");
        gpu.write(CURSOR_BUF, &cursor(UPDATE_CURSOR, 7, 0, 0, 2));
        assert_eq!(gpu.cursor_cmd(&[(CURSOR_BUF, 56, false)]), 0, "scanout 7");
        gpu.write(CURSOR_BUF, &cursor(UPDATE_CURSOR, 0, 0, 0, 99));
        assert_eq!(gpu.cursor_cmd(&[(CURSOR_BUF, 56, false)]), 0, "resource 99");
        gpu.write(CURSOR_BUF, &cursor(UPDATE_CURSOR, 0, 0, 0, 0));
        assert_eq!(gpu.cursor_cmd(&[(CURSOR_BUF, 56, false)]), 0, "hidden");
        assert_eq!(
            gpu.cursor_cmd(&[(CURSOR_BUF + 0x100, 64, true)]),
            0,
            "write-only"
        );
        // Several at once.
        for _ in 0..5 {
            gpu.cursor
                .add_chain(&gpu.pci.mem, &[(CURSOR_BUF, 56, false)]);
        }
        gpu.pci.notify(1);
        assert_eq!(gpu.pci.wait_used(&mut gpu.cursor, 5, WAIT).len(), 5);
        // The cursor is not drawn into the picture, and the control queue goes on.
        assert_eq!(gpu.screen(0), before);
        assert_eq!(gpu.pci.status() & NEEDS_RESET, 0);
        assert_eq!(gpu.display_info().0, OK_DISPLAY_INFO);
    });
}

/// Short commands, short or missing response buffers, absurd sizes and addresses: no
/// panic, no hang, and the device goes on.
#[test]
fn hostile_chains_neither_panic_nor_hang() {
    with_deadline("gpu-hostile", || {
        let mut gpu = new_gpu(&[]);
        // A response buffer shorter than the response: the device writes what fits.
        let resp = gpu.request(&command(GET_DISPLAY_INFO, &[]), 24);
        assert_eq!(Code(le32(&resp, 0)), OK_DISPLAY_INFO, "24 of 408 bytes");
        let resp = gpu.request(&command(GET_EDID, &[0, 0]), 40);
        assert_eq!((resp.len(), Code(le32(&resp, 0))), (40, OK_EDID));
        let resp = gpu.request(&command(RESOURCE_CREATE_2D, &[1, B8G8R8X8, 16, 16]), 4);
        assert_eq!(resp, 0x1100u32.to_le_bytes(), "4 bytes of OK_NODATA");
        assert_eq!(
            gpu.create(1, B8G8R8X8, 16, 16),
            ERR_INVALID_RESOURCE_ID,
            "it was made"
        );
        // No response buffer at all: the command still runs, nothing is written.
        let cmd = command(RESOURCE_CREATE_2D, &[2, B8G8R8X8, 16, 16]);
        gpu.write(CMD, &cmd);
        assert_eq!(gpu.submit(&[(CMD, cmd.len() as u32, false)]), 0);
        assert_eq!(
            gpu.create(2, B8G8R8X8, 16, 16),
            ERR_INVALID_RESOURCE_ID,
            "it was made"
        );
        // A command split over several buffers is one command.
        let cmd = command(RESOURCE_CREATE_2D, &[3, B8G8R8X8, 16, 16]);
        gpu.write(CMD, &cmd[..10]);
        gpu.write(CMD + 0x100, &cmd[10..30]);
        gpu.write(CMD + 0x200, &cmd[30..]);
        assert_eq!(
            gpu.submit(&[
                (CMD, 10, false),
                (CMD + 0x100, 20, false),
                (CMD + 0x200, 10, false),
                (RESP, 24, true)
            ]),
            24
        );
        assert_eq!(
            Code(le32(&gpu.read(RESP, 24), 0)),
            OK_NODATA,
            "split command"
        );
        // A response split over two buffers.
        gpu.write(CMD, &command(GET_DISPLAY_INFO, &[]));
        gpu.write(RESP, &[0xee; 408]);
        assert_eq!(
            gpu.submit(&[(CMD, 24, false), (RESP, 100, true), (RESP + 100, 308, true)]),
            408
        );
        let resp = gpu.read(RESP, 408);
        assert_eq!(Code(le32(&resp, 0)), OK_DISPLAY_INFO);
        assert_eq!(
            le32(&resp, 24 + 8),
            1280,
            "mode 0's width, in the first buffer"
        );
        assert_eq!(le32(&resp, 24 + 16), 1, "mode 0 enabled, in the second");
        // A command body shorter than its type needs: nothing is made (QEMU answers
        // OK_NODATA without running it).
        let resp = gpu.request(&command(RESOURCE_CREATE_2D, &[4, B8G8R8X8]), 24);
        let code = Code(le32(&resp, 0));
        assert!(
            code == OK_NODATA || code == ERR_UNSPEC,
            "short create: {code:?}"
        );
        assert_eq!(
            gpu.attach(4, &[(backing(4), 1024)]),
            ERR_INVALID_RESOURCE_ID
        );
        for ty in [
            SET_SCANOUT,
            RESOURCE_FLUSH,
            TRANSFER_TO_HOST_2D,
            RESOURCE_ATTACH_BACKING,
            GET_EDID,
        ] {
            let resp = gpu.request(&command(ty, &[1]), 24);
            assert_eq!(resp.len(), 24, "short command {ty:#x}");
        }
        // Shorter than a header, or no command at all: QEMU never answers; either way
        // the device goes on.
        gpu.write(CMD, &command(GET_DISPLAY_INFO, &[])[..10]);
        gpu.ctrl
            .add_chain(&gpu.pci.mem, &[(CMD, 10, false), (RESP + 0x400, 24, true)]);
        gpu.ctrl
            .add_chain(&gpu.pci.mem, &[(RESP + 0x800, 24, true)]);
        gpu.pci.notify(0);
        assert_eq!(gpu.display_info().0, OK_DISPLAY_INFO);
        // A transfer from short backing copies what there is: 16 rows of 64 bytes.
        gpu.fill(backing(5), B8G8R8X8, 16, 16, solid(0x40_5060));
        assert_eq!(gpu.create(5, B8G8R8X8, 16, 32), OK_NODATA);
        assert_eq!(gpu.attach(5, &[(backing(5), 1024)]), OK_NODATA);
        assert_eq!(gpu.transfer(5, [0, 0, 16, 32], 0), OK_NODATA);
        assert_eq!(
            gpu.transfer(5, [0, 0, 16, 32], 1 << 40),
            OK_NODATA,
            "offset past the end"
        );
        assert_eq!(
            gpu.transfer(5, [0, 20, 16, 12], u64::MAX - 8),
            OK_NODATA,
            "offset wraps"
        );
        assert_eq!(gpu.set_scanout(0, 5, [0, 0, 16, 32]), OK_NODATA);
        assert_eq!(gpu.flush(5, [0, 0, 16, 32]), OK_NODATA);
        let s = gpu.screen(0);
        assert_eq!((s.width, s.height), (16, 32));
        assert!(
            s.pixels[..256].iter().all(|&p| p == 0x40_5060),
            "the backed rows"
        );
        // Backing entries that wrap the address space or lie at its very end.
        for entries in [
            vec![(u64::MAX - 0xfff, 0x2000)],
            vec![(u64::MAX, u32::MAX)],
            vec![(u64::MAX - 0xfff, 0x1000), (0, 0x1000)],
            vec![(backing(6), 0)],
        ] {
            assert_eq!(gpu.create(6, B8G8R8X8, 32, 32), OK_NODATA);
            let code = gpu.attach(6, &entries);
            assert!(
                code == OK_NODATA || code == ERR_UNSPEC,
                "{entries:x?}: {code:?}"
            );
            // Whatever came of it (the code without backing is checked elsewhere).
            let code = gpu.transfer(6, [0, 0, 32, 32], 0);
            assert!(
                [OK_NODATA, ERR_UNSPEC, ERR_INVALID_RESOURCE_ID].contains(&code),
                "{entries:x?}: {code:?}"
            );
            assert_eq!(gpu.unref(6), OK_NODATA);
        }
        // Many resources and many entries.
        for id in 100..164 {
            assert_eq!(gpu.create(id, B8G8R8X8, 16, 16), OK_NODATA);
        }
        let entries: Vec<(u64, u32)> = (0..16384).map(|i| (backing(7) + i * 16, 16)).collect();
        assert_eq!(gpu.create(7, B8G8R8X8, 256, 256), OK_NODATA);
        assert_eq!(gpu.attach(7, &entries), OK_NODATA, "16384 entries");
        assert_eq!(gpu.transfer(7, [0, 0, 256, 256], 0), OK_NODATA);
        assert_eq!(gpu.pci.status() & NEEDS_RESET, 0);
        assert_eq!(gpu.display_info().0, OK_DISPLAY_INFO);
    });
}

#[test]
fn a_broken_ring_marks_the_device_broken_until_reset() {
    with_deadline("gpu-broken", || {
        let (m, dev) = machine(&[]);
        let mut gpu = Gpu::start(&m, &dev, DEVFN);
        gpu.show(0, 1, 16, 16, solid(0x12_3456));
        // A command buffer far outside guest memory.
        gpu.ctrl.add_chain(
            &gpu.pci.mem,
            &[(0xdead_0000_0000, 0x2000, false), (RESP, 24, true)],
        );
        gpu.pci.notify(0);
        gpu.wait_broken("a buffer outside RAM");
        // A broken device serves nothing more, and does not panic being asked.
        gpu.write(CMD, &command(GET_DISPLAY_INFO, &[]));
        gpu.ctrl
            .add_chain(&gpu.pci.mem, &[(CMD, 24, false), (RESP, 408, true)]);
        gpu.pci.notify(0);
        std::thread::sleep(Duration::from_millis(100));
        assert!(gpu.ctrl.take_used(&gpu.pci.mem).is_empty());
        // The available index jumping past the ring's size.
        let mut gpu = Gpu::start(&m, &dev, DEVFN);
        gpu.ctrl.publish_raw_idx(&gpu.pci.mem, 200);
        gpu.pci.notify(0);
        gpu.wait_broken("avail index 200 in a ring of 64");
        // The cursor queue breaks the device too.
        let mut gpu = Gpu::start(&m, &dev, DEVFN);
        gpu.cursor
            .add_chain(&gpu.pci.mem, &[(0xdead_0000_0000, 0x2000, false)]);
        gpu.pci.notify(1);
        gpu.wait_broken("a cursor buffer outside RAM");
        // A reset makes it work again, its resources gone.
        let mut gpu = Gpu::start(&m, &dev, DEVFN);
        assert_eq!(
            gpu.flush(1, [0, 0, 16, 16]),
            ERR_INVALID_RESOURCE_ID,
            "reset frees"
        );
        assert!(
            !gpu.screen(0).pixels.contains(&0x12_3456),
            "and disables the scanout"
        );
        gpu.show(0, 1, 16, 16, solid(0x65_4321));
        assert_picture(&gpu.screen(0), 16, 16, solid(0x65_4321), "after the reset");
    });
}

#[test]
fn resources_backing_and_picture_move_with_a_migration() {
    with_deadline("gpu-migration", || {
        let props = [("max_outputs", "2"), ("max_hostmem", "1M")];
        let (src, src_dev) = machine(&props);
        let ms = machine_state(&src).unwrap();
        vm_start(ms).unwrap();
        let mut gpu = Gpu::start(&src, &src_dev, DEVFN);
        // Three 256 KiB resources: one shown on head 0, one backed, one bare; a fourth
        // on head 1.
        gpu.show(0, 1, 256, 256, pattern(1));
        gpu.resource(2, R8G8B8A8, 256, 256, pattern(2));
        assert_eq!(gpu.create(3, B8G8R8X8, 256, 256), OK_NODATA);
        gpu.resource(4, X8B8G8R8, 32, 32, pattern(4));
        assert_eq!(gpu.set_scanout(1, 4, [0, 0, 32, 32]), OK_NODATA);
        assert_eq!(gpu.flush(4, [0, 0, 32, 32]), OK_NODATA);
        let (head0, head1) = (gpu.screen(0), gpu.screen(1));
        assert_picture(&head0, 256, 256, pattern(1), "source head 0");
        assert_picture(&head1, 32, 32, pattern(4), "source head 1");
        vm_stop(ms, RunStatus::FinishMigrate).unwrap();
        let mut stream = Vec::new();
        save_vm(&src, &mut stream, &mut Progress::default()).unwrap();

        // max_outputs must match.
        let (other, _) = machine(&[("max_hostmem", "1M")]);
        assert!(
            load_vm(&other, &mut stream.as_slice(), None).is_err(),
            "1 output, 2 saved"
        );

        let (dst, dst_dev) = machine(&props);
        load_vm(&dst, &mut stream.as_slice(), None).unwrap();
        vm_start(machine_state(&dst).unwrap()).unwrap();
        let mut gpu = gpu.moved_to(&dst, &dst_dev);
        assert_eq!(gpu.screen(0), head0, "head 0 on the destination");
        assert_eq!(gpu.screen(1), head1, "head 1 on the destination");
        // The resources are there, with their backing, and their host memory counted.
        for id in 1..=4 {
            assert_eq!(
                gpu.create(id, B8G8R8X8, 16, 16),
                ERR_INVALID_RESOURCE_ID,
                "{id}"
            );
        }
        assert_eq!(
            gpu.attach(1, &[(backing(1), 4096)]),
            ERR_UNSPEC,
            "1 is backed"
        );
        assert_eq!(
            gpu.attach(2, &[(backing(2), 4096)]),
            ERR_UNSPEC,
            "2 is backed"
        );
        assert_eq!(gpu.transfer(3, [0, 0, 16, 16], 0), ERR_UNSPEC, "3 is not");
        assert_eq!(
            gpu.create(5, B8G8R8X8, 256, 256),
            ERR_OUT_OF_MEMORY,
            "768 + 4 KiB used"
        );
        // A new picture through the same backing reaches the console.
        gpu.fill(backing(1), B8G8R8X8, 256, 256, pattern(7));
        assert_eq!(gpu.transfer(1, [0, 0, 256, 256], 0), OK_NODATA);
        assert_eq!(gpu.flush(1, [0, 0, 256, 256]), OK_NODATA);
        assert_picture(&gpu.screen(0), 256, 256, pattern(7), "new picture");
        // Resource 2's pixels came along too: shown on head 0 without a new transfer.
        assert_eq!(gpu.set_scanout(0, 2, [0, 0, 256, 256]), OK_NODATA);
        assert_eq!(gpu.flush(2, [0, 0, 256, 256]), OK_NODATA);
        assert_picture(&gpu.screen(0), 256, 256, pattern(2), "resource 2");
        // The used index went on from the source's.
        let used_idx: u16 = gpu
            .pci
            .mem
            .read_obj(GuestAddress(gpu.ctrl.used + 2))
            .unwrap();
        assert_eq!(used_idx, 14 + 12, "14 requests on the source, 12 here");
    });
}
