//! Screendumps (QEMU's `ui/console.c`: `qmp_screendump`, `ppm_save`, `png_save`): the
//! picture of a graphic console written as PPM (P6) or PNG (8-bit RGB).

use std::io::Write;

use hw::core::console::Surface;
use hw::core::machine::MachineState;

/// QAPI's `ImageFormat` values.
pub const IMAGE_FORMATS: &[&str] = &["ppm", "png"];

/// Why a screendump failed, in QEMU's words.
#[derive(Debug, thiserror::Error)]
pub enum ScreendumpError {
    /// `head` without `device`.
    #[error("'head' must be specified together with 'device'")]
    HeadWithoutDevice,
    /// `device` names no device (QMP class `DeviceNotFound`).
    #[error("Device '{0}' not found")]
    DeviceNotFound(String),
    /// The device has no console at that head.
    #[error("Device {device} (head {head}) is not bound to a QemuConsole")]
    NotAConsole {
        /// The device's id.
        device: String,
        /// The head.
        head: i64,
    },
    /// No display device at all.
    #[error("There is no console to take a screendump from")]
    NoConsole,
    /// The file cannot be created.
    #[error("failed to open file '{path}': {reason}")]
    Open {
        /// The file.
        path: String,
        /// `strerror` of the failure.
        reason: String,
    },
    /// The file cannot be written.
    #[error("failed to write file '{path}': {reason}")]
    Write {
        /// The file.
        path: String,
        /// Why.
        reason: String,
    },
}

/// QEMU's `qmp_screendump`: the picture of `device`'s console `head` (or of the first
/// console) into `filename` as `format` (`ppm` unless `png`).
pub fn screendump(
    ms: &MachineState,
    filename: &str,
    device: Option<&str>,
    head: Option<i64>,
    format: Option<&str>,
) -> Result<(), ScreendumpError> {
    let consoles = ms.services().consoles();
    let console = match device {
        Some(id) => {
            let head = head.unwrap_or(0);
            let dev = qom::resolve_path(
                &qom::object_get_root(),
                &format!("/machine/peripheral/{id}"),
            )
            .map_err(|_| ScreendumpError::DeviceNotFound(id.to_string()))?;
            u32::try_from(head)
                .ok()
                .and_then(|h| consoles.by_device(&dev, h))
                .ok_or_else(|| ScreendumpError::NotAConsole {
                    device: id.to_string(),
                    head,
                })?
        }
        None => {
            if head.is_some() {
                return Err(ScreendumpError::HeadWithoutDevice);
            }
            consoles.first().ok_or(ScreendumpError::NoConsole)?
        }
    };
    let surface = console.update();
    let file = std::fs::File::create(filename).map_err(|e| ScreendumpError::Open {
        path: filename.to_string(),
        reason: hw::core::os_error::strerror(&e),
    })?;
    let mut out = std::io::BufWriter::new(file);
    let written = match format {
        Some("png") => write_png(&surface, &mut out),
        _ => write_ppm(&surface, &mut out),
    };
    written
        .and_then(|()| out.flush())
        .map_err(|e| ScreendumpError::Write {
            path: filename.to_string(),
            reason: e.to_string(),
        })
}

/// The surface's pixels as R, G, B bytes.
fn rgb_bytes(surface: &Surface) -> Vec<u8> {
    surface
        .pixels
        .iter()
        .flat_map(|p| [(p >> 16) as u8, (p >> 8) as u8, *p as u8])
        .collect()
}

/// QEMU's `ppm_save`: binary PPM, 255 levels.
pub fn write_ppm(surface: &Surface, out: &mut impl Write) -> std::io::Result<()> {
    write!(out, "P6\n{} {}\n255\n", surface.width, surface.height)?;
    out.write_all(&rgb_bytes(surface))
}

/// QEMU's `png_save`: 8-bit RGB PNG.
pub fn write_png(surface: &Surface, out: &mut impl Write) -> std::io::Result<()> {
    let mut encoder = png::Encoder::new(out, surface.width, surface.height);
    encoder.set_color(png::ColorType::Rgb);
    encoder.set_depth(png::BitDepth::Eight);
    let mut writer = encoder.write_header().map_err(std::io::Error::other)?;
    writer
        .write_image_data(&rgb_bytes(surface))
        .map_err(std::io::Error::other)?;
    writer.finish().map_err(std::io::Error::other)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn surface() -> Surface {
        let mut s = Surface::new(3, 2);
        s.pixels = vec![0xff0000, 0x00ff00, 0x0000ff, 0x123456, 0, 0xffffff];
        s
    }

    #[test]
    fn ppm_is_a_p6_header_and_rgb_triplets() {
        let mut out = Vec::new();
        write_ppm(&surface(), &mut out).unwrap();
        let header = b"P6\n3 2\n255\n";
        assert_eq!(&out[..header.len()], header);
        assert_eq!(
            &out[header.len()..],
            &[255, 0, 0, 0, 255, 0, 0, 0, 255, 0x12, 0x34, 0x56, 0, 0, 0, 255, 255, 255]
        );
    }

    #[test]
    fn png_decodes_to_the_same_pixels() {
        let mut out = Vec::new();
        write_png(&surface(), &mut out).unwrap();
        let decoder = png::Decoder::new(std::io::Cursor::new(out));
        let mut reader = decoder.read_info().unwrap();
        let mut buf = vec![0; reader.output_buffer_size().unwrap()];
        let info = reader.next_frame(&mut buf).unwrap();
        assert_eq!((info.width, info.height), (3, 2));
        assert_eq!(info.color_type, png::ColorType::Rgb);
        assert_eq!(&buf[..info.buffer_size()], rgb_bytes(&surface()).as_slice());
    }
}
