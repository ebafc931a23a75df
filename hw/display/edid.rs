//! The EDID a display device offers (QEMU's `hw/display/edid-generate.c`): one base
//! block describing a monitor whose preferred mode is the device's configured size.
//! `virtio-gpu` answers GET_EDID with it; the std VGA shows it at the start of its MMIO
//! BAR, where Linux's bochs-drm reads it.

/// An EDID 1.4 base block for a `width` x `height` monitor at 75 Hz (QEMU's
/// `qemu_edid_generate` in short: vendor "RHT", the mode as the preferred timing, the
/// monitor's name, its range limits). A size of 0 is QEMU's default, 1280x800; the
/// preferred timing holds at most 4095x4095 (the extension QEMU adds beyond it is not
/// made).
pub fn edid_block(width: u32, height: u32) -> [u8; 128] {
    let width = if width == 0 { 1280 } else { width.min(4095) };
    let height = if height == 0 { 800 } else { height.min(4095) };
    let mut e = [0u8; 128];
    e[0..8].copy_from_slice(&[0x00, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x00]);
    // "RHT": three 5-bit letters, 'A' = 1.
    let id = (u16::from(b'R' - b'@') << 10) | (u16::from(b'H' - b'@') << 5) | u16::from(b'T' - b'@');
    e[8..10].copy_from_slice(&id.to_be_bytes());
    e[10..12].copy_from_slice(&0x1234u16.to_le_bytes());
    // Week 42 of 2014, EDID 1.4.
    e[16] = 42;
    e[17] = (2014 - 1990) as u8;
    e[18] = 1;
    e[19] = 4;
    // Digital, 8 bits per colour, DisplayPort; size from 100 dpi.
    e[20] = 0xa5;
    let dpi_cm = |px: u32| ((px * 254 / 100) / 100).clamp(1, 255) as u8;
    e[21] = dpi_cm(width);
    e[22] = dpi_cm(height);
    // Gamma 2.2; RGB 4:4:4, sRGB, preferred timing is native, continuous frequency.
    e[23] = 120;
    e[24] = 0x06 | 0x01;
    // sRGB's chromaticity.
    e[25..35].copy_from_slice(&[0xee, 0x91, 0xa3, 0x54, 0x4c, 0x99, 0x26, 0x0f, 0x50, 0x54]);
    // Established timings: 640x480, 800x600, 1024x768 at 60 Hz.
    e[35] = 0x20;
    e[36] = 0x08 | 0x01;
    e[37] = 0;
    // No standard timings.
    for i in 0..8 {
        e[38 + 2 * i] = 0x01;
        e[39 + 2 * i] = 0x01;
    }
    // The preferred mode, with QEMU's blanking proportions at 75 Hz.
    let (xfront, xsync, xblank) = (width * 25 / 100, width * 3 / 100, width * 35 / 100);
    let (yfront, ysync, yblank) = (height * 5 / 1000, height * 5 / 1000, height * 35 / 1000);
    let clock_10khz = 75 * u64::from(width + xblank) * u64::from(height + yblank) / 10_000;
    let d = &mut e[54..72];
    d[0..2].copy_from_slice(&(clock_10khz.min(0xffff) as u16).to_le_bytes());
    d[2] = width as u8;
    d[3] = xblank as u8;
    d[4] = (((width >> 8) & 0xf) << 4 | ((xblank >> 8) & 0xf)) as u8;
    d[5] = height as u8;
    d[6] = yblank as u8;
    d[7] = (((height >> 8) & 0xf) << 4 | ((yblank >> 8) & 0xf)) as u8;
    d[8] = xfront as u8;
    d[9] = xsync as u8;
    d[10] = (((yfront & 0xf) << 4) | (ysync & 0xf)) as u8;
    d[11] = (((xfront >> 8) & 3) << 6 | ((xsync >> 8) & 3) << 4 | ((yfront >> 4) & 3) << 2 | ((ysync >> 4) & 3)) as u8;
    let (wmm, hmm) = (u32::from(e[21]) * 10, u32::from(e[22]) * 10);
    let d = &mut e[54..72];
    d[12] = wmm as u8;
    d[13] = hmm as u8;
    d[14] = (((wmm >> 8) & 0xf) << 4 | ((hmm >> 8) & 0xf)) as u8;
    // Digital separate sync, both positive.
    d[17] = 0x18 | 0x06;
    // The monitor's name.
    let name = &mut e[72..90];
    name[3] = 0xfc;
    let text = b"QEMU Monitor\n     ";
    name[5..18].copy_from_slice(&text[..13]);
    // Range limits: 50-125 Hz vertical, 30-160 kHz horizontal, 10 * 255 MHz clock.
    let range = &mut e[90..108];
    range[3] = 0xfd;
    range[5..10].copy_from_slice(&[50, 125, 30, 160, 255]);
    range[10] = 0x01;
    range[11..18].copy_from_slice(&[0x0a, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20]);
    // A dummy descriptor.
    e[108 + 3] = 0x10;
    let sum = e[..127].iter().fold(0u8, |a, b| a.wrapping_add(*b));
    e[127] = 0u8.wrapping_sub(sum);
    e
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_edid_is_valid_and_prefers_the_configured_mode() {
        let e = edid_block(1280, 800);
        assert_eq!(&e[..8], &[0, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0]);
        assert_eq!(e.iter().fold(0u8, |a, b| a.wrapping_add(*b)), 0);
        let d = &e[54..72];
        assert_eq!(u32::from(d[2]) | (u32::from(d[4] >> 4) << 8), 1280);
        assert_eq!(u32::from(d[5]) | (u32::from(d[7] >> 4) << 8), 800);
        assert_eq!(&e[77..89], b"QEMU Monitor");
    }

    #[test]
    fn the_edid_of_odd_sizes_is_still_valid() {
        for (w, h) in [(0, 0), (100_000, 100_000), (u32::MAX, 1), (16, 16)] {
            let e = edid_block(w, h);
            assert_eq!(e.iter().fold(0u8, |a, b| a.wrapping_add(*b)), 0, "{w}x{h}");
            assert_ne!(u16::from_le_bytes([e[54], e[55]]), 0, "{w}x{h}: a timing, not a descriptor");
        }
    }
}
