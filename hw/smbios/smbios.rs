//! SMBIOS (QEMU's `hw/smbios/smbios.c`): the `-smbios` options and the tables built from
//! them and the machine (system, chassis, processors, memory), with a 2.8 (`_SM_`) entry
//! point. Firmware gets them through fw_cfg (`etc/smbios/smbios-tables`,
//! `etc/smbios/smbios-anchor`: SeaBIOS places them and fixes the anchor's address and
//! checksums); a directly booted kernel finds them where the board writes them, in the F
//! segment, which Linux scans for the anchor.

use std::collections::BTreeSet;

use crate::core::uuid::Uuid;

/// The highest structure type `-smbios` may name.
const SMBIOS_MAX_TYPE: u8 = 127;

/// A bad `-smbios` option, in QEMU's words.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SmbiosError {
    /// Neither `type=` nor `file=`.
    #[error("Must specify type= or file=")]
    NoType,
    /// `type=` above 127.
    #[error("out of range!")]
    TypeOutOfRange,
    /// A type qomvm (like QEMU) builds no fields for.
    #[error("Don't know how to build fields for SMBIOS type {0}")]
    UnknownType(u64),
    /// A key the type does not take.
    #[error("Invalid parameter '{0}'")]
    InvalidParameter(String),
    /// A number that does not parse.
    #[error("Parameter '{0}' expects a number")]
    NotANumber(String),
    /// `type=1,uuid=` malformed.
    #[error("Invalid UUID")]
    InvalidUuid,
    /// `type=0,release=` not `MAJOR.MINOR`.
    #[error("Invalid release")]
    InvalidRelease,
    /// `type=4,max-speed=`/`current-speed=` above 65535.
    #[error("SMBIOS CPU speed is too large (> 65535)")]
    SpeedTooLarge,
    /// Fields for a type a `file=` already supplied.
    #[error("can't add fields, binary file already loaded!")]
    BinaryLoaded,
    /// A `file=` for a type whose fields were given.
    #[error("can't load type {0} struct, fields already specified!")]
    FieldsGiven(u8),
    /// A `file=` that cannot be read, or is shorter than a structure header.
    #[error("Cannot read SMBIOS file {0}")]
    CannotRead(String),
    /// A `type=11,path=` that cannot be read.
    #[error("Unable to read from {path}: {reason}")]
    CannotReadPath {
        /// The file.
        path: String,
        /// Why.
        reason: String,
    },
    /// `file=` type 4 structures that do not match the sockets.
    #[error("Expected {expected} SMBIOS Type 4 tables, got {got} instead")]
    Type4Count {
        /// Sockets.
        expected: u32,
        /// Structures given.
        got: u32,
    },
}

/// Type 0, BIOS information (only built when a field is given: the firmware has its own).
#[derive(Clone, Debug, Default)]
struct Type0 {
    vendor: Option<String>,
    version: Option<String>,
    date: Option<String>,
    release: Option<(u8, u8)>,
    uefi: bool,
}

/// Type 1, system information.
#[derive(Clone, Debug, Default)]
struct Type1 {
    manufacturer: Option<String>,
    product: Option<String>,
    version: Option<String>,
    serial: Option<String>,
    sku: Option<String>,
    family: Option<String>,
}

/// Type 2, baseboard (only built when a field is given).
#[derive(Clone, Debug, Default)]
struct Type2 {
    manufacturer: Option<String>,
    product: Option<String>,
    version: Option<String>,
    serial: Option<String>,
    asset: Option<String>,
    location: Option<String>,
}

/// Type 3, chassis.
#[derive(Clone, Debug, Default)]
struct Type3 {
    manufacturer: Option<String>,
    version: Option<String>,
    serial: Option<String>,
    asset: Option<String>,
    sku: Option<String>,
}

/// Type 4, one per socket.
#[derive(Clone, Debug, Default)]
struct Type4 {
    sock_pfx: Option<String>,
    manufacturer: Option<String>,
    version: Option<String>,
    serial: Option<String>,
    asset: Option<String>,
    part: Option<String>,
    max_speed: Option<u16>,
    current_speed: Option<u16>,
    processor_id: Option<u64>,
}

/// Type 17, one per 16 GiB DIMM.
#[derive(Clone, Debug, Default)]
struct Type17 {
    loc_pfx: Option<String>,
    bank: Option<String>,
    manufacturer: Option<String>,
    serial: Option<String>,
    asset: Option<String>,
    part: Option<String>,
    speed: Option<u16>,
}

/// Everything `-smbios` said, in order (QEMU's `smbios_entry_add`).
#[derive(Clone, Debug, Default)]
pub struct SmbiosConfig {
    type0: Type0,
    type1: Type1,
    type1_uuid: Option<Uuid>,
    type2: Type2,
    type3: Type3,
    type4: Type4,
    /// Type 11, OEM strings.
    oem_strings: Vec<String>,
    type17: Type17,
    /// Structures from `file=`, whole, in order.
    blobs: Vec<Vec<u8>>,
    have_fields: BTreeSet<u8>,
    have_blob: BTreeSet<u8>,
}

/// The machine's side of the tables: its names and what it has.
#[derive(Clone, Debug)]
pub struct SmbiosMachine {
    /// Type 1/2/3/4/17 manufacturer default (QEMU: "QEMU").
    pub manufacturer: String,
    /// Type 1/2 product default: the machine's description.
    pub product: String,
    /// Type 1/2/3/4 version default: the machine's name.
    pub version: String,
    /// `-uuid` (type 1's UUID unless `-smbios type=1,uuid=` gave one).
    pub uuid: Option<Uuid>,
    /// Sockets, cores per socket, threads per core.
    pub sockets: u32,
    /// Cores per socket.
    pub cores: u32,
    /// Threads per core.
    pub threads: u32,
    /// CPUID leaf 1 EAX and EDX of the first CPU.
    pub cpuid: (u32, u32),
    /// Guest RAM in bytes.
    pub ram_size: u64,
    /// The RAM ranges (start, length) type 19 describes.
    pub memory_areas: Vec<(u64, u64)>,
}

/// The built structures and their entry point.
#[derive(Clone, Debug)]
pub struct SmbiosTables {
    /// The structures, back to back, ending with type 127.
    pub tables: Vec<u8>,
    count: u16,
    max_size: u16,
}

impl SmbiosConfig {
    /// Parses every `-smbios` in order.
    pub fn from_options<'a>(options: impl IntoIterator<Item = &'a str>) -> Result<Self, SmbiosError> {
        let mut config = SmbiosConfig::default();
        for option in options {
            config.add_option(option)?;
        }
        Ok(config)
    }

    /// `-smbios type=1,uuid=`, if given.
    pub fn uuid(&self) -> Option<Uuid> {
        self.type1_uuid
    }

    /// One `-smbios` option string.
    pub fn add_option(&mut self, text: &str) -> Result<(), SmbiosError> {
        let pairs: Vec<(String, Option<String>)> = crate::core::qemu_opts::split_commas(text)
            .into_iter()
            .filter(|item| !item.is_empty())
            .map(|item| match item.split_once('=') {
                Some((k, v)) => (k.to_string(), Some(v.to_string())),
                None => (item, None),
            })
            .collect();
        let get = |key: &str| -> Option<String> {
            pairs
                .iter()
                .rev()
                .find(|(k, _)| k == key)
                .map(|(_, v)| v.clone().unwrap_or_else(|| "on".into()))
        };
        let allow = |keys: &[&str]| -> Result<(), SmbiosError> {
            match pairs.iter().find(|(k, _)| !keys.contains(&k.as_str())) {
                Some((k, _)) => Err(SmbiosError::InvalidParameter(k.clone())),
                None => Ok(()),
            }
        };
        if let Some(path) = get("file") {
            allow(&["file"])?;
            return self.add_file(&path);
        }
        let Some(type_text) = get("type") else {
            return Err(SmbiosError::NoType);
        };
        let ty = parse_number(&type_text).ok_or_else(|| SmbiosError::NotANumber("type".into()))?;
        if ty > u64::from(SMBIOS_MAX_TYPE) {
            return Err(SmbiosError::TypeOutOfRange);
        }
        let ty8 = ty as u8;
        if self.have_blob.contains(&ty8) {
            return Err(SmbiosError::BinaryLoaded);
        }
        let number = |key: &str| -> Result<Option<u64>, SmbiosError> {
            get(key)
                .map(|v| parse_number(&v).ok_or_else(|| SmbiosError::NotANumber(key.into())))
                .transpose()
        };
        match ty {
            0 => {
                allow(&["type", "vendor", "version", "date", "release", "uefi"])?;
                let t = &mut self.type0;
                set(&mut t.vendor, get("vendor"));
                set(&mut t.version, get("version"));
                set(&mut t.date, get("date"));
                if let Some(release) = get("release") {
                    let (major, minor) = release.split_once('.').ok_or(SmbiosError::InvalidRelease)?;
                    let major = major.parse().map_err(|_| SmbiosError::InvalidRelease)?;
                    let minor = minor.parse().map_err(|_| SmbiosError::InvalidRelease)?;
                    t.release = Some((major, minor));
                }
                if let Some(uefi) = get("uefi") {
                    t.uefi = match uefi.as_str() {
                        "on" | "yes" | "true" | "y" => true,
                        "off" | "no" | "false" | "n" => false,
                        _ => return Err(SmbiosError::InvalidParameter("uefi".into())),
                    };
                }
            }
            1 => {
                allow(&["type", "manufacturer", "product", "version", "serial", "uuid", "sku", "family"])?;
                let t = &mut self.type1;
                set(&mut t.manufacturer, get("manufacturer"));
                set(&mut t.product, get("product"));
                set(&mut t.version, get("version"));
                set(&mut t.serial, get("serial"));
                set(&mut t.sku, get("sku"));
                set(&mut t.family, get("family"));
                if let Some(uuid) = get("uuid") {
                    self.type1_uuid = Some(uuid.parse().map_err(|_| SmbiosError::InvalidUuid)?);
                }
            }
            2 => {
                allow(&["type", "manufacturer", "product", "version", "serial", "asset", "location"])?;
                let t = &mut self.type2;
                set(&mut t.manufacturer, get("manufacturer"));
                set(&mut t.product, get("product"));
                set(&mut t.version, get("version"));
                set(&mut t.serial, get("serial"));
                set(&mut t.asset, get("asset"));
                set(&mut t.location, get("location"));
            }
            3 => {
                allow(&["type", "manufacturer", "version", "serial", "asset", "sku"])?;
                let t = &mut self.type3;
                set(&mut t.manufacturer, get("manufacturer"));
                set(&mut t.version, get("version"));
                set(&mut t.serial, get("serial"));
                set(&mut t.asset, get("asset"));
                set(&mut t.sku, get("sku"));
            }
            4 => {
                allow(&[
                    "type", "sock_pfx", "manufacturer", "version", "serial", "asset", "part",
                    "max-speed", "current-speed", "processor-id",
                ])?;
                let speed = |key: &str| -> Result<Option<u16>, SmbiosError> {
                    number(key)?
                        .map(|v| u16::try_from(v).map_err(|_| SmbiosError::SpeedTooLarge))
                        .transpose()
                };
                let (max_speed, current_speed) = (speed("max-speed")?, speed("current-speed")?);
                let processor_id = number("processor-id")?;
                let t = &mut self.type4;
                set(&mut t.sock_pfx, get("sock_pfx"));
                set(&mut t.manufacturer, get("manufacturer"));
                set(&mut t.version, get("version"));
                set(&mut t.serial, get("serial"));
                set(&mut t.asset, get("asset"));
                set(&mut t.part, get("part"));
                t.max_speed = max_speed.or(t.max_speed);
                t.current_speed = current_speed.or(t.current_speed);
                t.processor_id = processor_id.or(t.processor_id);
            }
            11 => {
                allow(&["type", "value", "path"])?;
                // Every value= and path=, in order (a list option in QEMU).
                for (key, value) in &pairs {
                    let value = value.clone().unwrap_or_else(|| "on".into());
                    match key.as_str() {
                        "value" => self.oem_strings.push(value),
                        "path" => {
                            let text = std::fs::read(&value).map_err(|e| SmbiosError::CannotReadPath {
                                path: value.clone(),
                                reason: crate::core::os_error::strerror(&e),
                            })?;
                            self.oem_strings.push(String::from_utf8_lossy(&text).into_owned());
                        }
                        _ => {}
                    }
                }
            }
            17 => {
                allow(&["type", "loc_pfx", "bank", "manufacturer", "serial", "asset", "part", "speed"])?;
                let speed = number("speed")?
                    .map(|v| u16::try_from(v).map_err(|_| SmbiosError::NotANumber("speed".into())))
                    .transpose()?;
                let t = &mut self.type17;
                set(&mut t.loc_pfx, get("loc_pfx"));
                set(&mut t.bank, get("bank"));
                set(&mut t.manufacturer, get("manufacturer"));
                set(&mut t.serial, get("serial"));
                set(&mut t.asset, get("asset"));
                set(&mut t.part, get("part"));
                t.speed = speed.or(t.speed);
            }
            other => return Err(SmbiosError::UnknownType(other)),
        }
        self.have_fields.insert(ty8);
        Ok(())
    }

    /// `file=`: one structure, as the file holds it (QEMU checks only its size).
    fn add_file(&mut self, path: &str) -> Result<(), SmbiosError> {
        let data = std::fs::read(path).map_err(|_| SmbiosError::CannotRead(path.into()))?;
        if data.len() < 4 {
            return Err(SmbiosError::CannotRead(path.into()));
        }
        let ty = data[0];
        if ty <= SMBIOS_MAX_TYPE {
            if self.have_fields.contains(&ty) {
                return Err(SmbiosError::FieldsGiven(ty));
            }
            self.have_blob.insert(ty);
        }
        self.blobs.push(data);
        Ok(())
    }

    /// QEMU's `smbios_skip_table`: a file replaces a type; fields or a required type build it.
    fn builds(&self, ty: u8, required: bool) -> bool {
        if self.have_blob.contains(&ty) {
            return false;
        }
        self.have_fields.contains(&ty) || required
    }

    /// QEMU's `smbios_get_tables`: the files' structures, then types 0-4, 11, 16, 17, 19,
    /// 32 and 127 as the machine and the options describe them.
    pub fn build(&self, m: &SmbiosMachine) -> Result<SmbiosTables, SmbiosError> {
        let mut out = SmbiosTables {
            tables: Vec::new(),
            count: 0,
            max_size: 0,
        };
        let mut type4_blobs = 0;
        for blob in &self.blobs {
            if blob[0] == 4 {
                type4_blobs += 1;
            }
            out.push(blob.clone());
        }
        let or = |v: &Option<String>, d: &str| v.clone().unwrap_or_else(|| d.to_string());
        if self.builds(0, false) {
            let t = &self.type0;
            let mut s = Structure::new(0, 0x000);
            s.string(t.vendor.as_deref());
            s.string(t.version.as_deref());
            s.u16(0xe800); // starting segment, as SeaBIOS has it
            s.string(t.date.as_deref());
            s.u8(0); // ROM size: SeaBIOS hard-codes it too
            s.u64(0x08); // characteristics not supported
            s.u8(0);
            s.u8(0x14 | if t.uefi { 0x08 } else { 0 }); // targeted content distribution, VM
            let (major, minor) = t.release.unwrap_or((0, 0));
            s.u8(major);
            s.u8(minor);
            s.u8(0xff); // embedded controller: none
            s.u8(0xff);
            out.push(s.finish());
        }
        let uuid = self.type1_uuid.or(m.uuid);
        if self.builds(1, true) {
            let t = &self.type1;
            let mut s = Structure::new(1, 0x100);
            s.string(Some(&or(&t.manufacturer, &m.manufacturer)));
            s.string(Some(&or(&t.product, &m.product)));
            s.string(Some(&or(&t.version, &m.version)));
            s.string(t.serial.as_deref());
            s.bytes(&uuid.map(smbios_uuid).unwrap_or([0; 16]));
            s.u8(0x06); // woken by the power switch
            s.string(t.sku.as_deref());
            s.string(t.family.as_deref());
            out.push(s.finish());
        }
        if self.builds(2, false) {
            let t = &self.type2;
            let mut s = Structure::new(2, 0x200);
            s.string(Some(&or(&t.manufacturer, &m.manufacturer)));
            s.string(Some(&or(&t.product, &m.product)));
            s.string(Some(&or(&t.version, &m.version)));
            s.string(t.serial.as_deref());
            s.string(t.asset.as_deref());
            s.u8(0x01); // a motherboard
            s.string(t.location.as_deref());
            s.u16(0x300); // in the type 3 chassis
            s.u8(0x0a); // motherboard
            s.u8(0);
            out.push(s.finish());
        }
        if self.builds(3, true) {
            let t = &self.type3;
            let mut s = Structure::new(3, 0x300);
            s.string(Some(&or(&t.manufacturer, &m.manufacturer)));
            s.u8(0x01); // other
            s.string(Some(&or(&t.version, &m.version)));
            s.string(t.serial.as_deref());
            s.string(t.asset.as_deref());
            s.u8(0x03); // boot-up, power supply and thermal states: safe
            s.u8(0x03);
            s.u8(0x03);
            s.u8(0x02); // security: unknown
            s.u32(0); // OEM-defined
            s.u8(0); // height
            s.u8(0); // power cords
            s.u8(0); // contained elements
            s.u8(0); // their record length
            s.string(t.sku.as_deref());
            out.push(s.finish());
        }
        let sockets = m.sockets.max(1);
        if type4_blobs > 0 && type4_blobs != sockets {
            return Err(SmbiosError::Type4Count {
                expected: sockets,
                got: type4_blobs,
            });
        }
        if self.builds(4, true) {
            let t = &self.type4;
            for socket in 0..sockets {
                let mut s = Structure::new(4, 0x400 + socket as u16);
                s.string(Some(&format!("{}{socket:2x}", or(&t.sock_pfx, "CPU"))));
                s.u8(0x03); // central processor
                s.u8(0x01); // family: other
                s.string(Some(&or(&t.manufacturer, &m.manufacturer)));
                let id = t
                    .processor_id
                    .unwrap_or(u64::from(m.cpuid.0) | u64::from(m.cpuid.1) << 32);
                s.u64(id);
                s.string(Some(&or(&t.version, &m.version)));
                s.u8(0); // voltage
                s.u16(0); // external clock: unknown
                s.u16(t.max_speed.unwrap_or(2000));
                s.u16(t.current_speed.unwrap_or(2000));
                s.u8(0x41); // socket populated, CPU enabled
                s.u8(0x01); // upgrade: other
                s.u16(0xffff); // no L1, L2, L3 cache structures
                s.u16(0xffff);
                s.u16(0xffff);
                s.string(t.serial.as_deref());
                s.string(t.asset.as_deref());
                s.string(t.part.as_deref());
                s.u8(m.cores.min(255) as u8);
                s.u8(m.cores.min(255) as u8);
                s.u8((m.cores * m.threads).min(255) as u8);
                s.u16(0x02); // characteristics: unknown
                s.u16(0x01); // family 2: other
                out.push(s.finish());
            }
        }
        if !self.oem_strings.is_empty() && self.builds(11, true) {
            let mut s = Structure::new(11, 0xe00);
            s.u8(self.oem_strings.len().min(255) as u8);
            for value in &self.oem_strings {
                s.listed_string(value);
            }
            out.push(s.finish());
        }
        const DIMM_MAX: u64 = 16 << 30;
        let dimms = m.ram_size.div_ceil(DIMM_MAX).max(1);
        if self.builds(16, true) {
            let mut s = Structure::new(16, 0x1000);
            s.u8(0x01); // location: other
            s.u8(0x03); // system memory
            s.u8(0x06); // multi-bit ECC (what Windows wants, per SeaBIOS)
            let kib = m.ram_size.div_ceil(1024);
            if kib < 0x8000_0000 {
                s.u32(kib as u32);
            } else {
                s.u32(0x8000_0000);
            }
            s.u16(0xfffe); // no error information
            s.u16(dimms as u16);
            s.u64(if kib < 0x8000_0000 { 0 } else { m.ram_size });
            out.push(s.finish());
        }
        if self.builds(17, true) {
            let t = &self.type17;
            for i in 0..dimms {
                let size = if i + 1 < dimms {
                    DIMM_MAX
                } else {
                    (m.ram_size.max(1) - 1) % DIMM_MAX + 1
                };
                let mut s = Structure::new(17, 0x1100 + i as u16);
                s.u16(0x1000); // in the type 16 array
                s.u16(0xfffe);
                s.u16(0xffff); // total and data width unknown
                s.u16(0xffff);
                let mib = size.div_ceil(1 << 20);
                s.u16(if mib < 0x7fff { mib as u16 } else { 0x7fff });
                s.u8(0x09); // DIMM
                s.u8(0); // not in a set
                s.string(Some(&format!("{} {i}", or(&t.loc_pfx, "DIMM"))));
                s.string(t.bank.as_deref());
                s.u8(0x07); // RAM
                s.u16(0x02); // type detail: other
                s.u16(t.speed.unwrap_or(0));
                s.string(Some(&or(&t.manufacturer, &m.manufacturer)));
                s.string(t.serial.as_deref());
                s.string(t.asset.as_deref());
                s.string(t.part.as_deref());
                s.u8(0); // attributes unknown
                s.u32(if mib < 0x7fff { 0 } else { mib as u32 });
                s.u16(t.speed.unwrap_or(0)); // configured speed
                s.u16(0); // voltages unknown
                s.u16(0);
                s.u16(0);
                out.push(s.finish());
            }
        }
        if self.builds(19, true) {
            for (i, &(start, length)) in m.memory_areas.iter().enumerate() {
                let end = start + length - 1;
                let mut s = Structure::new(19, 0x1300 + i as u16);
                let (start_kib, end_kib) = (start / 1024, end / 1024);
                if start_kib < u64::from(u32::MAX) && end_kib < u64::from(u32::MAX) {
                    s.u32(start_kib as u32);
                    s.u32(end_kib as u32);
                } else {
                    s.u32(u32::MAX);
                    s.u32(u32::MAX);
                }
                s.u16(0x1000);
                s.u8(1); // one device per row
                if start_kib < u64::from(u32::MAX) && end_kib < u64::from(u32::MAX) {
                    s.u64(0);
                    s.u64(0);
                } else {
                    s.u64(start);
                    s.u64(end);
                }
                out.push(s.finish());
            }
        }
        if self.builds(32, true) {
            let mut s = Structure::new(32, 0x2000);
            s.bytes(&[0; 6]);
            s.u8(0); // no errors detected
            out.push(s.finish());
        }
        out.push(Structure::new(127, 0x7f00).finish());
        Ok(out)
    }
}

impl SmbiosTables {
    fn push(&mut self, structure: Vec<u8>) {
        self.max_size = self.max_size.max(structure.len().min(usize::from(u16::MAX)) as u16);
        self.count += 1;
        self.tables.extend_from_slice(&structure);
    }

    /// The SMBIOS 2.8 entry point (31 bytes) for the tables at `address`, checksummed;
    /// firmware gets it with address 0 and fills it in itself.
    pub fn anchor(&self, address: u32) -> Vec<u8> {
        let mut ep = Vec::with_capacity(31);
        ep.extend_from_slice(b"_SM_");
        ep.push(0); // checksum
        ep.push(31); // length
        ep.extend_from_slice(&[2, 8]); // SMBIOS 2.8
        ep.extend_from_slice(&self.max_size.to_le_bytes());
        ep.push(0); // entry point revision
        ep.extend_from_slice(&[0; 5]);
        ep.extend_from_slice(b"_DMI_");
        ep.push(0); // intermediate checksum
        ep.extend_from_slice(&(self.tables.len().min(usize::from(u16::MAX)) as u16).to_le_bytes());
        ep.extend_from_slice(&address.to_le_bytes());
        ep.extend_from_slice(&self.count.to_le_bytes());
        ep.push(0x28); // BCD revision
        if address != 0 {
            ep[0x15] = checksum(&ep[0x10..31]);
            ep[4] = checksum(&ep);
        }
        ep
    }
}

/// The byte that makes `bytes` sum to zero.
fn checksum(bytes: &[u8]) -> u8 {
    0u8.wrapping_sub(bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b)))
}

/// SMBIOS 2.6's UUID wire format: the first three fields little-endian.
fn smbios_uuid(uuid: Uuid) -> [u8; 16] {
    let mut b = uuid.0;
    b[0..4].reverse();
    b[4..6].reverse();
    b[6..8].reverse();
    b
}

/// QEMU's string options: an empty value leaves the field unset.
fn set(field: &mut Option<String>, value: Option<String>) {
    if let Some(v) = value {
        *field = Some(v);
    }
}

/// QEMU's `parse_option_number`: decimal, `0x` hex or leading-zero octal.
fn parse_number(text: &str) -> Option<u64> {
    if let Some(hex) = text.strip_prefix("0x").or_else(|| text.strip_prefix("0X")) {
        u64::from_str_radix(hex, 16).ok()
    } else if text.len() > 1 && text.starts_with('0') {
        u64::from_str_radix(&text[1..], 8).ok()
    } else {
        text.parse().ok()
    }
}

/// One structure being built: the formatted part, then its strings.
struct Structure {
    formatted: Vec<u8>,
    strings: Vec<u8>,
    count: u8,
}

impl Structure {
    fn new(ty: u8, handle: u16) -> Self {
        let mut formatted = vec![ty, 0];
        formatted.extend_from_slice(&handle.to_le_bytes());
        Structure {
            formatted,
            strings: Vec::new(),
            count: 0,
        }
    }
    fn u8(&mut self, v: u8) {
        self.formatted.push(v);
    }
    fn u16(&mut self, v: u16) {
        self.formatted.extend_from_slice(&v.to_le_bytes());
    }
    fn u32(&mut self, v: u32) {
        self.formatted.extend_from_slice(&v.to_le_bytes());
    }
    fn u64(&mut self, v: u64) {
        self.formatted.extend_from_slice(&v.to_le_bytes());
    }
    fn bytes(&mut self, v: &[u8]) {
        self.formatted.extend_from_slice(v);
    }
    /// A string field: its number in the string set, 0 for none (or empty). A NUL inside
    /// would end the string early, so it ends there.
    fn string(&mut self, value: Option<&str>) {
        let value = value.map(|v| v.split('\0').next().unwrap_or(""));
        match value {
            Some(v) if !v.is_empty() && self.count < u8::MAX => {
                self.strings.extend_from_slice(v.as_bytes());
                self.strings.push(0);
                self.count += 1;
                self.formatted.push(self.count);
            }
            _ => self.formatted.push(0),
        }
    }
    /// A string numbered by its place in the set, with no field naming it (type 11's).
    fn listed_string(&mut self, value: &str) {
        let value = value.split('\0').next().unwrap_or("");
        if self.count < u8::MAX {
            // An empty string would end the set (QEMU leaves it out but still counts
            // it, shifting the numbers): a space keeps the numbering.
            self.strings.extend_from_slice(if value.is_empty() { b" " } else { value.as_bytes() });
            self.strings.push(0);
            self.count += 1;
        }
    }
    fn finish(mut self) -> Vec<u8> {
        self.formatted[1] = self.formatted.len() as u8;
        if self.strings.is_empty() {
            self.strings.push(0);
        }
        self.strings.push(0);
        self.formatted.extend_from_slice(&self.strings);
        self.formatted
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn machine() -> SmbiosMachine {
        SmbiosMachine {
            manufacturer: "QEMU".into(),
            product: "Standard PC (i440FX + PIIX, 1996)".into(),
            version: "pc-i440fx-10.0".into(),
            uuid: Some("12345678-9abc-def0-1122-334455667788".parse().unwrap()),
            sockets: 2,
            cores: 2,
            threads: 1,
            cpuid: (0x663, 0x0781_abfd),
            ram_size: 512 << 20,
            memory_areas: vec![(0, 512 << 20)],
        }
    }

    /// (type, formatted length, strings) of each structure.
    fn walk(tables: &[u8]) -> Vec<(u8, usize, Vec<String>)> {
        let mut out = Vec::new();
        let mut at = 0;
        while at < tables.len() {
            let (ty, len) = (tables[at], tables[at + 1] as usize);
            let mut end = at + len;
            let mut strings = Vec::new();
            while tables[end] != 0 {
                let s = end;
                while tables[end] != 0 {
                    end += 1;
                }
                strings.push(String::from_utf8_lossy(&tables[s..end]).into_owned());
                end += 1;
            }
            if strings.is_empty() {
                end += 1;
            }
            out.push((ty, len, strings));
            at = end + 1;
        }
        out
    }

    #[test]
    fn the_tables_have_qemus_structures_and_lengths() {
        let config = SmbiosConfig::from_options(["type=1,serial=abc,,1", "type=11,value=hello"]).unwrap();
        let t = config.build(&machine()).unwrap();
        let walked = walk(&t.tables);
        let shape: Vec<(u8, usize)> = walked.iter().map(|(ty, len, _)| (*ty, *len)).collect();
        assert_eq!(
            shape,
            [(1, 27), (3, 22), (4, 42), (4, 42), (11, 5), (16, 23), (17, 40), (19, 31), (32, 11), (127, 4)]
        );
        assert_eq!(walked[0].2, ["QEMU", "Standard PC (i440FX + PIIX, 1996)", "pc-i440fx-10.0", "abc,1"]);
        assert_eq!(walked[2].2[0], "CPU 0");
        assert_eq!(walked[4].2, ["hello"]);
        // The UUID in SMBIOS 2.6 wire order.
        assert_eq!(&t.tables[8..12], &[0x78, 0x56, 0x34, 0x12]);
        let ep = t.anchor(0xf0020);
        assert_eq!(ep.len(), 31);
        assert_eq!(ep.iter().fold(0u8, |a, b| a.wrapping_add(*b)), 0);
        assert_eq!(ep[0x10..31].iter().fold(0u8, |a, b| a.wrapping_add(*b)), 0);
        assert_eq!(u16::from_le_bytes([ep[0x1c], ep[0x1d]]), 10);
    }

    #[test]
    fn bad_options_get_qemus_errors() {
        let err = |o: &str| SmbiosConfig::from_options([o]).unwrap_err().to_string();
        assert_eq!(err("serial=x"), "Must specify type= or file=");
        assert_eq!(err("type=200"), "out of range!");
        assert_eq!(err("type=5"), "Don't know how to build fields for SMBIOS type 5");
        assert_eq!(err("type=1,colour=red"), "Invalid parameter 'colour'");
        assert_eq!(err("type=1,uuid=nope"), "Invalid UUID");
        assert_eq!(err("type=0,release=1"), "Invalid release");
        assert_eq!(err("type=4,max-speed=70000"), "SMBIOS CPU speed is too large (> 65535)");
        assert_eq!(err("type=x"), "Parameter 'type' expects a number");
        assert_eq!(err("file=/nonexistent/smbios.bin"), "Cannot read SMBIOS file /nonexistent/smbios.bin");
    }

    #[test]
    fn a_file_replaces_its_type_and_type4_files_must_match_the_sockets() {
        let dir = std::env::temp_dir().join(format!("qomvm-smbios-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("t3.bin");
        std::fs::write(&file, [3u8, 4, 0, 3, 0, 0]).unwrap();
        let opt = format!("file={}", file.display());
        let config = SmbiosConfig::from_options([opt.as_str()]).unwrap();
        let types: Vec<u8> = walk(&config.build(&machine()).unwrap().tables).iter().map(|w| w.0).collect();
        assert_eq!(types.iter().filter(|&&t| t == 3).count(), 1);
        assert_eq!(types[0], 3);
        let err = SmbiosConfig::from_options([opt.as_str(), "type=3,serial=x"]).unwrap_err();
        assert_eq!(err, SmbiosError::BinaryLoaded);
        let t4 = dir.join("t4.bin");
        std::fs::write(&t4, [4u8, 4, 0, 4, 0, 0]).unwrap();
        let opt = format!("file={}", t4.display());
        let config = SmbiosConfig::from_options([opt.as_str()]).unwrap();
        assert_eq!(
            config.build(&machine()).unwrap_err(),
            SmbiosError::Type4Count { expected: 2, got: 1 }
        );
        let _ = std::fs::remove_dir_all(dir);
    }
}
