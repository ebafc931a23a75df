//! Issue 15's CPU acceptance: named x86 models, `-cpu` feature options and the CPU model
//! queries, seen from inside KVM guests (which execute CPUID and report the registers
//! through a port) and through the `qomvm` binary. KVM runs skip, saying why, where
//! `/dev/kvm` is not usable.
//!
//! The host's KVM decides which features a guest can have (a PVM host offers fewer than
//! its CPU has), so the tests ask it (`KVM_GET_SUPPORTED_CPUID`) which features to expect.
//! Feature bits are checked in leaf 0x80000001: a PVM host shows guests its own bits of
//! leaves 1 and 7 whatever `KVM_SET_CPUID2` says (a `qemu64` guest there reads the host's
//! leaf 7), while every KVM takes leaf 0x80000001 from the VMM.

use std::io::Write;
use std::process::{Command, Output, Stdio};

use accel::kvm::x86::{feature_supported, host_supported_cpuid, CpuId};
use hw::core::runstate::RunRequest;
use hw::i386::x86_cpu::{feature_by_name, Feature, X86CpuModel};
use test_support::vm::{TestVm, EXIT_PORT, RECORD_PORT};
use test_support::{guest, require_kvm};

/// The seed 001_c0d96986192e56ac.txt's `-cpu`.
const SEED_CPU: &str = "SandyBridge,+erms,+smep,+fsgsbase,+pdpe1gb,+rdrand,+f16c,+osxsave,\
+dca,+pcid,+pdcm,+xtpr,+tm2,+est,+smx,+vmx,+ds_cpl,+monitor,+dtes64,+pbe,+tm,+ht,+ss,+acpi,+ds,+vme";

/// What a guest read from CPUID: `(leaf, subleaf) -> [eax, ebx, ecx, edx]`.
struct GuestCpuid(Vec<((u32, u32), [u32; 4])>);

impl GuestCpuid {
    fn regs(&self, leaf: u32, subleaf: u32) -> [u32; 4] {
        self.0
            .iter()
            .find(|(q, _)| *q == (leaf, subleaf))
            .map(|(_, r)| *r)
            .unwrap_or_else(|| panic!("leaf {leaf:#x}.{subleaf} was not queried"))
    }
    fn vendor(&self) -> String {
        let [_, ebx, ecx, edx] = self.regs(0, 0);
        let bytes: Vec<u8> = [ebx, edx, ecx]
            .iter()
            .flat_map(|r| r.to_le_bytes())
            .collect();
        String::from_utf8_lossy(&bytes).into_owned()
    }
    fn family_model_stepping(&self) -> (u32, u32, u32) {
        let eax = self.regs(1, 0)[0];
        let base = (eax >> 8) & 0xf;
        let family = base + if base == 0xf { (eax >> 20) & 0xff } else { 0 };
        (
            family,
            ((eax >> 4) & 0xf) | (((eax >> 16) & 0xf) << 4),
            eax & 0xf,
        )
    }
    fn brand(&self) -> String {
        let bytes: Vec<u8> = (0x8000_0002..=0x8000_0004)
            .flat_map(|leaf| self.regs(leaf, 0))
            .flat_map(u32::to_le_bytes)
            .take_while(|&b| b != 0)
            .collect();
        String::from_utf8_lossy(&bytes).into_owned()
    }
    fn has(&self, feature: &Feature) -> bool {
        let regs = self.regs(feature.leaf(), feature.subleaf());
        let value = match feature.reg() {
            hw::i386::x86_cpu::Reg::Eax => regs[0],
            hw::i386::x86_cpu::Reg::Ebx => regs[1],
            hw::i386::x86_cpu::Reg::Ecx => regs[2],
            hw::i386::x86_cpu::Reg::Edx => regs[3],
        };
        value & (1 << feature.bit) != 0
    }
}

const QUERIES: &[(u32, u32)] = &[
    (0, 0),
    (1, 0),
    (7, 0),
    (7, 0),
    (7, 1),
    (0x8000_0000, 0),
    (0x8000_0001, 0),
    (0x8000_0002, 0),
    (0x8000_0003, 0),
    (0x8000_0004, 0),
];

/// Runs a guest with `-cpu cpu` that reports [`QUERIES`].
fn guest_cpuid(cpu: &str) -> GuestCpuid {
    guest_cpuid_of(cpu, QUERIES)
}

/// Runs a guest with `-cpu cpu` that reports `queries`.
fn guest_cpuid_of(cpu: &str, queries: &[(u32, u32)]) -> GuestCpuid {
    let image = guest::cpuid_reporter(queries, RECORD_PORT, EXIT_PORT, 0x15);
    let vm = TestVm::new(&image, 1, cpu);
    assert_eq!(
        vm.run(),
        Some(RunRequest::DebugExit((0x15 << 1) | 1)),
        "{cpu}"
    );
    let words: Vec<u32> = vm
        .ports
        .log
        .lock()
        .iter()
        .map(|(_, v, _, _)| *v as u32)
        .collect();
    assert_eq!(words.len(), queries.len() * 4, "{cpu}: {words:x?}");
    GuestCpuid(
        queries
            .iter()
            .zip(words.chunks(4))
            .map(|(q, r)| (*q, [r[0], r[1], r[2], r[3]]))
            .collect(),
    )
}

fn host() -> &'static CpuId {
    host_supported_cpuid().expect("KVM answers KVM_GET_SUPPORTED_CPUID")
}

/// The host CPU's vendor string.
fn host_vendor() -> String {
    let r = std::arch::x86_64::__cpuid(0);
    let bytes: Vec<u8> = [r.ebx, r.edx, r.ecx]
        .iter()
        .flat_map(|r| r.to_le_bytes())
        .collect();
    String::from_utf8_lossy(&bytes).into_owned()
}

fn feature(name: &str) -> &'static Feature {
    feature_by_name(name).unwrap_or_else(|| panic!("{name} is a feature"))
}

/// Where a model's feature bits are checked (see the module docs).
fn checked(f: &Feature) -> bool {
    f.leaf() == 0x8000_0001
}

/// The resolved model of a `-cpu` name.
fn model(name: &str) -> &'static X86CpuModel {
    qom::object_class_by_name(&format!("{name}-x86_64-cpu"))
        .and_then(|c| c.get::<hw::i386::x86_cpu::X86CpuClass>()?.model)
        .unwrap_or_else(|| panic!("{name} is a model"))
}

/// A feature the model has that the host can give, and one the host can give that the
/// model lacks (if the host has one): the guest must see the first and not the second.
fn has_and_lacks(m: &X86CpuModel) -> (&'static Feature, Option<&'static Feature>) {
    let host = host();
    let usable = |f: &&'static Feature| checked(f) && feature_supported(host, f);
    let has = hw::i386::x86_cpu::features()
        .iter()
        .filter(usable)
        .find(|f| m.features.contains(f.name))
        .unwrap_or_else(|| panic!("{} has a feature this host supports", m.name));
    let lacks = hw::i386::x86_cpu::features()
        .iter()
        .filter(usable)
        .find(|f| !m.features.contains(f.name));
    (has, lacks)
}

#[test]
fn named_models_give_the_guest_their_vendor_family_model_and_features() {
    require_kvm!();
    accel::init().unwrap();
    let mut lacks_checked = 0;
    for (name, vendor, fms, brand) in [
        (
            "SandyBridge",
            "GenuineIntel",
            (6, 42, 1),
            "Intel Xeon E312xx (Sandy Bridge)",
        ),
        (
            "Skylake-Server-v4",
            "GenuineIntel",
            (6, 85, 4),
            "Intel Xeon Processor (Skylake, IBRS, no TSX)",
        ),
        ("EPYC", "AuthenticAMD", (23, 1, 2), "AMD EPYC Processor"),
        (
            "Opteron_G1",
            "AuthenticAMD",
            (15, 6, 1),
            "AMD Opteron 240 (Gen 1 Class Opteron)",
        ),
        (
            "Conroe",
            "GenuineIntel",
            (6, 15, 3),
            "Intel Celeron_4x0 (Conroe/Merom Class Core 2)",
        ),
        ("kvm64", "GenuineIntel", (15, 6, 1), "Common KVM processor"),
        (
            "Dhyana",
            "HygonGenuine",
            (24, 0, 1),
            "Hygon Dhyana Processor",
        ),
        (
            "SapphireRapids",
            "GenuineIntel",
            (6, 143, 4),
            "Intel Xeon Processor (SapphireRapids)",
        ),
        (
            "GraniteRapids-v2",
            "GenuineIntel",
            (6, 173, 1),
            "Intel Xeon Processor (GraniteRapids)",
        ),
        (
            "SierraForest-v2",
            "GenuineIntel",
            (6, 175, 3),
            "Intel Xeon Processor (SierraForest)",
        ),
        (
            "EPYC-Genoa",
            "AuthenticAMD",
            (25, 17, 0),
            "AMD EPYC-Genoa Processor",
        ),
        (
            "EPYC-Rome-v4",
            "AuthenticAMD",
            (23, 49, 0),
            "AMD EPYC-Rome-v4 Processor (no XSAVES)",
        ),
    ] {
        // Under KVM a model shows the host's vendor (QEMU's host_cpu_instance_init) unless
        // vendor= says otherwise.
        assert_eq!(guest_cpuid(name).vendor(), host_vendor(), "{name}");
        let seen = guest_cpuid(&format!("{name},vendor={vendor}"));
        assert_eq!(seen.vendor(), vendor, "{name}");
        assert_eq!(seen.family_model_stepping(), fms, "{name}");
        assert_eq!(seen.brand(), brand, "{name}");
        let m = model(name);
        // GraniteRapids-v2's AVX10 lives in leaf 0x24, which raises its level 0x20.
        let level = if name == "GraniteRapids-v2" {
            0x24
        } else {
            m.level
        };
        assert_eq!(seen.regs(0, 0)[0], level, "{name}: level");
        assert_eq!(seen.regs(0x8000_0000, 0)[0], m.xlevel, "{name}: xlevel");
        let (has, lacks) = has_and_lacks(m);
        assert!(seen.has(has), "{name}: the guest lacks {}", has.name);
        if let Some(lacks) = lacks {
            assert!(!seen.has(lacks), "{name}: the guest has {}", lacks.name);
            lacks_checked += 1;
        }
    }
    // A version that adds leaf-0x80000021 features raises the model's xlevel to reach them
    // (QEMU's automatic minimum level), and the table's newer versions reach the guest.
    let milan = guest_cpuid("EPYC-Milan-v2");
    assert_eq!(milan.brand(), "AMD EPYC-Milan-v2 Processor");
    assert_eq!(model("EPYC-Milan-v2").xlevel, 0x8000_001e);
    assert_eq!(milan.regs(0x8000_0000, 0)[0], 0x8000_0021);
    let epyc4 = guest_cpuid("EPYC-v4");
    assert_eq!(epyc4.brand(), "AMD EPYC-v4 Processor");
    // SandyBridge, Conroe, kvm64 lack 3dnowprefetch, which KVM offers everywhere.
    assert!(
        lacks_checked >= 3,
        "{lacks_checked} models checked for a missing feature"
    );
}

#[test]
fn vendor_family_model_and_model_id_options_override_the_model() {
    require_kvm!();
    accel::init().unwrap();
    let seen = guest_cpuid(
        "Opteron_G1,vendor=GenuineIntel,family=6,model=0x3a,stepping=9,model-id=Test CPU",
    );
    assert_eq!(seen.vendor(), "GenuineIntel");
    assert_eq!(seen.family_model_stepping(), (6, 0x3a, 9));
    assert_eq!(seen.brand(), "Test CPU");
    let seen = guest_cpuid("qemu64,level=7,xlevel=0x80000004");
    assert_eq!(seen.regs(0, 0)[0], 7);
    assert_eq!(seen.regs(0x8000_0000, 0)[0], 0x8000_0004);
}

#[test]
fn plus_and_minus_features_reach_the_guest() {
    require_kvm!();
    accel::init().unwrap();
    let m = model("qemu64");
    let (has, lacks) = has_and_lacks(m);
    let lacks = lacks.expect("this host's KVM offers a feature qemu64 lacks (3dnowprefetch)");
    let baseline = guest_cpuid("qemu64");
    assert!(baseline.has(has) && !baseline.has(lacks));
    // Both spellings: +f/-f and f=on/off, with `_` for `-`.
    for options in [
        format!("qemu64,+{},-{}", lacks.name, has.name),
        format!(
            "qemu64,{}=on,{}=off",
            lacks.name.replace('-', "_"),
            has.name
        ),
    ] {
        let seen = guest_cpuid(&options);
        assert!(seen.has(lacks), "{options}: {} still off", lacks.name);
        assert!(!seen.has(has), "{options}: {} still on", has.name);
    }
    // -feat wins over +feat whatever the order, as in QEMU.
    let seen = guest_cpuid(&format!("qemu64,-{0},+{0}", lacks.name));
    assert!(!seen.has(lacks));
    // AMD models repeat leaf 1's EDX bits in 0x80000001 (QEMU's AMD aliases).
    let amd = guest_cpuid("Opteron_G1,vendor=AuthenticAMD");
    assert!(amd.has(feature("fpu")));
    assert_ne!(
        amd.regs(0x8000_0001, 0)[3] & 1,
        0,
        "fpu alias in 0x80000001.EDX"
    );
}

fn qomvm(args: &[&str], stdin: &str) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_qomvm"))
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("qomvm runs");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    child.wait_with_output().unwrap()
}

const QMP_QUIT: &str = "{\"execute\":\"qmp_capabilities\"}\n{\"execute\":\"quit\"}\n";

#[test]
fn the_seeds_cpu_string_is_accepted_with_warnings_and_refused_with_enforce() {
    require_kvm!();
    accel::init().unwrap();
    let host = host();
    let lacking: Vec<&Feature> = SEED_CPU
        .split(',')
        .filter_map(|o| o.strip_prefix('+'))
        .filter_map(feature_by_name)
        .filter(|f| !feature_supported(host, f))
        .collect();
    let args = [
        "-M",
        "pc",
        "-nodefaults",
        "-display",
        "none",
        "-S",
        "-qmp",
        "stdio",
        "-cpu",
        SEED_CPU,
    ];
    let out = qomvm(&args, QMP_QUIT);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{}: {stderr}", out.status);
    for f in &lacking {
        let line = format!(
            "qomvm: warning: host doesn't support requested feature: {}",
            f.describe()
        );
        assert!(stderr.contains(&line), "missing {line:?} in:\n{stderr}");
    }
    let enforced = format!("{SEED_CPU},enforce");
    let args = [
        "-M",
        "pc",
        "-nodefaults",
        "-display",
        "none",
        "-S",
        "-qmp",
        "stdio",
        "-cpu",
        &enforced,
    ];
    let out = qomvm(&args, QMP_QUIT);
    let stderr = String::from_utf8_lossy(&out.stderr);
    if lacking.is_empty() {
        assert!(out.status.success(), "{stderr}");
    } else {
        assert_eq!(out.status.code(), Some(1), "{stderr}");
        assert!(
            stderr.contains("Host doesn't support requested features"),
            "{stderr}"
        );
        assert!(!stderr.contains("panicked"), "{stderr}");
    }
}

#[test]
fn enforce_refuses_one_missing_feature_and_check_off_is_silent() {
    require_kvm!();
    accel::init().unwrap();
    let host = host();
    // smx: KVM never offers it to guests.
    let smx = feature("smx");
    assert!(!feature_supported(host, smx));
    let base = [
        "-M",
        "pc",
        "-nodefaults",
        "-display",
        "none",
        "-S",
        "-qmp",
        "stdio",
        "-cpu",
    ];
    let run = |cpu: &str| {
        let mut args = base.to_vec();
        args.push(cpu);
        qomvm(&args, QMP_QUIT)
    };
    let out = run("qemu64,+smx,enforce");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr
            .contains("warning: host doesn't support requested feature: CPUID.01H:ECX.smx [bit 6]"),
        "{stderr}"
    );
    let out = run("qemu64,+smx,check=off");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(!stderr.contains("smx"), "{stderr}");
    // base asks for nothing, so enforce has nothing to refuse.
    let out = run("base,enforce");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn qmp_replies(commands: &[&str]) -> Vec<serde_json::Value> {
    let mut input = String::from("{\"execute\":\"qmp_capabilities\"}\n");
    for c in commands {
        input.push_str(c);
        input.push('\n');
    }
    input.push_str("{\"execute\":\"quit\"}\n");
    let out = qomvm(&["-M", "none", "-display", "none", "-qmp", "stdio"], &input);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v.get("return").is_some() || v.get("error").is_some())
        .skip(1)
        .collect()
}

#[test]
fn cpu_model_expansion_answers_for_max_and_named_models() {
    require_kvm!();
    accel::init().unwrap();
    let replies = qmp_replies(&[
        r#"{"execute":"query-cpu-model-expansion","arguments":{"type":"full","model":{"name":"max"}}}"#,
        r#"{"execute":"query-cpu-model-expansion","arguments":{"type":"static","model":{"name":"Skylake-Server-v4","props":{"avx512f":false}}}}"#,
        r#"{"execute":"query-cpu-model-expansion","arguments":{"type":"full","model":{"name":"Skylake-Server-IBRS"}}}"#,
        r#"{"execute":"query-cpu-model-expansion","arguments":{"type":"full","model":{"name":"Nope"}}}"#,
        r#"{"execute":"query-cpu-model-expansion","arguments":{"type":"partial","model":{"name":"max"}}}"#,
        r#"{"execute":"query-cpu-definitions"}"#,
        r#"{"execute":"query-cpu-model-expansion","arguments":{"type":"full","model":{"name":"max","props":{"migratable":false}}}}"#,
    ]);
    let host = host();
    let max = &replies[0]["return"]["model"];
    assert_eq!(max["name"], "max");
    for f in hw::i386::x86_cpu::features() {
        // A named bit is on for max exactly when KVM supports every bit of its name, and
        // a migration can keep it (not invtsc: QEMU's migratable=on), except topoext,
        // which max never turns on by itself (QEMU's no_autoenable_flags).
        let all = hw::i386::x86_cpu::feature_bits(f.name).all(|b| feature_supported(host, b))
            && f.name != "invtsc"
            && f.name != "topoext";
        assert_eq!(max["props"][f.name], all, "max: {}", f.name);
    }
    // migratable=off: invtsc too, where KVM has it.
    let invtsc = hw::i386::x86_cpu::feature_bits("invtsc").all(|b| feature_supported(host, b));
    assert_eq!(replies[6]["return"]["model"]["props"]["invtsc"], invtsc);
    let sky = &replies[1]["return"]["model"];
    assert_eq!(sky["name"], "base");
    assert_eq!(sky["props"]["family"], 6);
    assert_eq!(sky["props"]["model"], 85);
    // Under KVM the host's vendor (QEMU's host_cpu_instance_init).
    assert_eq!(sky["props"]["vendor"], host_vendor().as_str());
    assert_eq!(sky["props"]["avx512f"], false);
    assert_eq!(sky["props"]["avx512bw"], true);
    assert_eq!(sky["props"]["hle"], false, "v3 and later have no TSX");
    assert_eq!(sky["props"]["x2apic"], true, "KVM's default");
    let ibrs = &replies[2]["return"]["model"];
    assert_eq!(ibrs["name"], "Skylake-Server-IBRS");
    assert_eq!(ibrs["props"]["spec-ctrl"], true);
    assert_eq!(ibrs["props"]["hle"], true);
    assert_eq!(replies[3]["error"]["desc"], "CPU model 'Nope' not found");
    assert_eq!(
        replies[4]["error"]["desc"],
        "Parameter 'type' does not accept value 'partial'"
    );
    let defs = replies[5]["return"].as_array().unwrap();
    let def = |name: &str| {
        defs.iter()
            .find(|d| d["name"] == name)
            .unwrap_or_else(|| panic!("{name} listed"))
    };
    assert_eq!(def("Skylake-Server-IBRS")["alias-of"], "Skylake-Server-v2");
    assert_eq!(def("Skylake-Server")["alias-of"], "Skylake-Server-v1");
    assert_eq!(def("base")["static"], true);
    assert_eq!(def("max")["migration-safe"], false);
    assert_eq!(def("EPYC-v1")["typename"], "EPYC-v1-x86_64-cpu");
    for name in [
        "SapphireRapids-v3",
        "GraniteRapids",
        "EPYC-Genoa-v1",
        "EPYC-v4",
    ] {
        assert_eq!(def(name)["typename"], format!("{name}-x86_64-cpu"));
    }
    assert_eq!(def("SapphireRapids")["alias-of"], "SapphireRapids-v1");
    // unavailable-features: what SandyBridge asks for that KVM here cannot give.
    let m = model("SandyBridge-v1");
    let expected: Vec<&str> = hw::i386::x86_cpu::features()
        .iter()
        .filter(|f| m.features.contains(f.name) && !feature_supported(host, f))
        .map(|f| f.name)
        .collect();
    let listed: Vec<&str> = def("SandyBridge-v1")["unavailable-features"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert_eq!(listed, expected);
}

#[test]
fn cpu_help_lists_models_and_flags_in_qemus_layout() {
    let out = qomvm(&["-cpu", "help"], "");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success());
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines[0], "Available CPUs:");
    for expected in [
        "x86 Skylake-Server        (alias configured by machine type)",
        "x86 Skylake-Server-IBRS   (alias of Skylake-Server-v2)",
        "x86 Skylake-Server-v1     Intel Xeon Processor (Skylake)",
        "x86 Cascadelake-Server-v2  Intel Xeon Processor (Cascadelake) [ARCH_CAPABILITIES]",
        "x86 EPYC-Rome-v1          AMD EPYC-Rome Processor",
        "x86 Dhyana-v2             Hygon Dhyana Processor [XSAVES]",
        "x86 SapphireRapids        (alias configured by machine type)",
        "x86 SapphireRapids-v3     Intel Xeon Processor (SapphireRapids)",
        "x86 GraniteRapids-v2      Intel Xeon Processor (GraniteRapids)",
        "x86 SierraForest-v2       Intel Xeon Processor (SierraForest)",
        "x86 ClearwaterForest-v1   Intel Xeon Processor (ClearwaterForest)",
        "x86 EPYC-Genoa-v1         AMD EPYC-Genoa Processor",
        "x86 EPYC-Milan-v2         AMD EPYC-Milan-v2 Processor",
        "x86 Icelake-Server-v7     Intel Xeon Processor (Icelake) [TSX, taa-no]",
        "x86 EPYC-Rome-v4          AMD EPYC-Rome-v4 Processor (no XSAVES)",
        "x86 486-v1                ",
        "x86 max                   Enables all features supported by the accelerator in the current host",
    ] {
        assert!(lines.contains(&expected), "{expected:?} not in:\n{text}");
    }
    let flags = text
        .split("\nRecognized CPUID flags:\n")
        .nth(1)
        .expect("flags section");
    assert!(
        flags.ends_with("\n\n"),
        "QEMU ends the list with a blank line"
    );
    for line in flags.lines().filter(|l| !l.is_empty()) {
        assert!(line.starts_with("  ") && line.len() <= 75, "{line:?}");
    }
    let names: Vec<&str> = flags.split_whitespace().collect();
    for name in [
        "kvmclock",
        "kvm-pv-eoi",
        "sse4.1",
        "avx512-vp2intersect",
        "xcrypt",
        "perfmon-v2",
    ] {
        assert!(names.contains(&name), "{name}");
    }
    let mut sorted = names.clone();
    sorted.sort_unstable();
    assert_eq!(names, sorted);
}

/// The 12-character signature in EBX, ECX, EDX of a hypervisor leaf.
fn signature(regs: [u32; 4]) -> String {
    let bytes: Vec<u8> = regs[1..].iter().flat_map(|r| r.to_le_bytes()).collect();
    String::from_utf8_lossy(&bytes).into_owned()
}

const HV_QUERIES: &[(u32, u32)] = &[
    (0x4000_0000, 0),
    (0x4000_0003, 0),
    (0x4000_0004, 0),
    (0x4000_0100, 0),
];

#[test]
fn hv_passthrough_is_accepted_and_the_kvm_leaves_follow_qemus_layout() {
    require_kvm!();
    accel::init().unwrap();
    // Both spellings, as libvirt and test suites write them.
    for cpu in ["host,hv_passthrough", "host,hv-passthrough=on"] {
        let seen = guest_cpuid_of(cpu, HV_QUERIES);
        if accel::kvm::hyperv::kernel_has_hyperv() {
            // Hyper-V's leaves at 0x40000000, KVM's moved to 0x40000100.
            assert_eq!(
                seen.regs(0x4000_0000, 0)[0] & 0xffff_fff0,
                0x4000_0000,
                "{cpu}"
            );
            let sig = signature(seen.regs(0x4000_0100, 0));
            assert_eq!(sig, "KVMKVMKVM\0\0\0", "{cpu}");
            assert_eq!(seen.regs(0x4000_0100, 0)[0], 0x4000_0101, "{cpu}");
            // Every enlightenment needs the hypercall page.
            assert_ne!(seen.regs(0x4000_0003, 0)[0] & (1 << 5), 0, "{cpu}");
        } else {
            // No Hyper-V in this kernel: QEMU gives nothing, and KVM keeps 0x40000000.
            let sig = signature(seen.regs(0x4000_0000, 0));
            assert_eq!(sig, "KVMKVMKVM\0\0\0", "{cpu}");
        }
    }
}

#[test]
fn hv_enlightenments_reach_the_guest_or_are_refused_in_qemus_words() {
    require_kvm!();
    accel::init().unwrap();
    if accel::kvm::hyperv::kernel_has_hyperv() {
        let seen = guest_cpuid_of("qemu64,hv-relaxed,hv_vapic,hv-spinlocks=0x1fff", HV_QUERIES);
        let hv = seen.regs(0x4000_0000, 0);
        assert_eq!(hv[0], 0x4000_0005);
        assert_eq!(signature(hv), "Microsoft Hv");
        let info = seen.regs(0x4000_0004, 0);
        assert_eq!(info[0] & (1 << 5), 1 << 5, "relaxed timing recommended");
        assert_eq!(
            info[0] & (1 << 3),
            1 << 3,
            "APIC access recommended (hv-vapic)"
        );
        assert_eq!(info[1], 0x1fff, "spinlock retries");
        assert_ne!(
            seen.regs(0x4000_0003, 0)[0] & (1 << 4),
            0,
            "APIC access MSRs"
        );
        assert_eq!(signature(seen.regs(0x4000_0100, 0)), "KVMKVMKVM\0\0\0");
    } else {
        println!(
            "this host's KVM has no KVM_CAP_HYPERV: guest Hyper-V leaves not checked, \
             QEMU's refusals are"
        );
    }
    let base = [
        "-M",
        "pc",
        "-nodefaults",
        "-display",
        "none",
        "-S",
        "-qmp",
        "stdio",
        "-cpu",
    ];
    for (cpu, desc) in [
        ("qemu64,hv-relaxed", "relaxed timing (hv-relaxed)"),
        ("qemu64,hv_vapic", "virtual APIC (hv-vapic)"),
        // QEMU's order: hv-time is checked first of these.
        (
            "qemu64,hv-stimer,hv-synic,hv-vpindex,hv-time",
            "clocksources (hv-time)",
        ),
        (
            "qemu64,hv-spinlocks=0x1fff",
            "spinlock retries (hv-spinlocks)",
        ),
    ] {
        let mut args = base.to_vec();
        args.push(cpu);
        let out = qomvm(&args, QMP_QUIT);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!stderr.contains("panicked"), "{stderr}");
        if accel::kvm::hyperv::kernel_has_hyperv() {
            // A kernel with Hyper-V may support these; the guest check above ran instead.
            continue;
        }
        assert_eq!(out.status.code(), Some(1), "{cpu}: {stderr}");
        let expected = format!("Hyper-V {desc} is not supported by kernel");
        assert!(stderr.contains(&expected), "{cpu}: {stderr}");
        let line = stderr.lines().find(|l| l.contains(&expected)).unwrap();
        assert!(line.ends_with(&expected), "{cpu}: {line}");
    }
}

/// CPUID `leaf`'s registers as qomvm gives CPU 0 of a `cpus`-core package of `cpu`.
fn package_cpuid(cpus: u32, cpu: &str, leaf: u32) -> [u32; 4] {
    let vm = TestVm::bare(cpus, cpu, 2 << 20);
    let ms = hw::core::machine::machine_state(&vm.machine).unwrap();
    let cpu0 = ms.cpus()[0].clone();
    let cpuid = accel::kvm::x86::vcpu_cpuid(&vm.machine, &cpu0).expect("on KVM");
    let e = cpuid
        .as_slice()
        .iter()
        .find(|e| e.function == leaf && e.index == 0)
        .unwrap_or_else(|| panic!("{cpu}: no leaf {leaf:#x}"));
    [e.eax, e.ebx, e.ecx, e.edx]
}

#[test]
fn the_package_topology_is_the_guests_not_the_hosts() {
    require_kvm!();
    // 4 cores: leaf 1 counts 4 logical processors; 0x8000_0008 says 4 threads in a
    // package whose APIC IDs use 2 bits; the AMD-vendor qemu64 sets CmpLegacy so Linux
    // counts them as cores (QEMU's cpu_x86_cpuid).
    let amd = "qemu64,vendor=AuthenticAMD";
    assert_eq!((package_cpuid(4, amd, 1)[1] >> 16) & 0xff, 4);
    assert_eq!(package_cpuid(4, amd, 0x8000_0008)[2], (2 << 12) | 3);
    assert_ne!(package_cpuid(4, amd, 0x8000_0001)[2] & (1 << 1), 0);
    // Not for Intel, whose Linux code would then drop the thread count.
    assert_eq!(
        package_cpuid(4, "qemu64,vendor=GenuineIntel", 0x8000_0001)[2] & (1 << 1),
        0
    );
    // One CPU: no count and no CmpLegacy, whatever the host's package has.
    assert_eq!(package_cpuid(1, amd, 0x8000_0008)[2], 0);
    assert_eq!(package_cpuid(1, amd, 0x8000_0001)[2] & (1 << 1), 0);
    assert_eq!((package_cpuid(1, amd, 1)[1] >> 16) & 0xff, 0);
}

/// The CPUID leaves QEMU computes itself rather than take from KVM: identity, topology,
/// caches, address sizes. A firmware image reads them and prints them on isa-debugcon.
const COMPARED: &[(u32, u32)] = &[
    (0, 0),
    (1, 0),
    (2, 0),
    (4, 0),
    (4, 1),
    (4, 2),
    (4, 3),
    (4, 4),
    (5, 0),
    (0xb, 0),
    (0xb, 1),
    (0xb, 2),
    (0x1f, 0),
    (7, 0),
    (7, 1),
    (0x8000_0000, 0),
    (0x8000_0001, 0),
    (0x8000_0005, 0),
    (0x8000_0006, 0),
    (0x8000_0008, 0),
    (0x8000_001d, 0),
    (0x8000_001d, 1),
    (0x8000_001d, 2),
    (0x8000_001d, 3),
    (0x8000_001d, 4),
    (0x8000_001e, 0),
];

/// A 64 KiB BIOS whose reset vector runs CPUID for each of `queries` and writes the four
/// registers byte by byte to isa-debugcon (port 0xe9), then leaves through isa-debug-exit.
fn cpuid_bios(queries: &[(u32, u32)]) -> Vec<u8> {
    // out dx, al; shr eax, 8 — four times: a register, little-endian.
    let out_eax: Vec<u8> = [0xee, 0x66, 0xc1, 0xe8, 0x08].repeat(4);
    let mut code = Vec::new();
    for &(leaf, subleaf) in queries {
        code.extend([0x66, 0xb8]); // mov eax, leaf
        code.extend(leaf.to_le_bytes());
        code.extend([0x66, 0xb9]); // mov ecx, subleaf
        code.extend(subleaf.to_le_bytes());
        code.extend([0x0f, 0xa2]); // cpuid
        code.extend([0x66, 0x89, 0xd7]); // mov edi, edx
        code.extend([0xba, 0xe9, 0x00]); // mov dx, 0xe9
        code.extend(&out_eax);
        for mov_eax_from in [0xd8, 0xc8, 0xf8] {
            code.extend([0x66, 0x89, mov_eax_from]); // mov eax, ebx / ecx / edi
            code.extend(&out_eax);
        }
    }
    // mov dx, 0x501; mov al, 0; out dx, al; hlt
    code.extend([0xba, 0x01, 0x05, 0xb0, 0x00, 0xee, 0xf4]);
    let mut bios = vec![0xffu8; 0x1_0000];
    bios[..code.len()].copy_from_slice(&code);
    // Reset vector: jmp far f000:0000.
    bios[0xfff0..0xfff5].copy_from_slice(&[0xea, 0x00, 0x00, 0x00, 0xf0]);
    bios
}

/// Boots `vmm` (qomvm or QEMU) on the CPUID firmware and returns the registers it printed,
/// or why it could not run.
fn firmware_cpuid(
    vmm: &[&str],
    cpu: &str,
    smp: &str,
    dir: &std::path::Path,
) -> Result<Vec<[u32; 4]>, String> {
    let bios = dir.join("cpuid.bin");
    let out = dir.join(format!("{}.out", vmm[0].rsplit('/').next().unwrap()));
    let _ = std::fs::remove_file(&out);
    let output = Command::new(vmm[0])
        .args(&vmm[1..])
        .args([
            "-M",
            "pc",
            "-cpu",
            cpu,
            "-smp",
            smp,
            "-display",
            "none",
            "-nodefaults",
        ])
        .arg("-bios")
        .arg(&bios)
        .arg("-chardev")
        .arg(format!("file,id=dbg,path={}", out.display()))
        .args(["-device", "isa-debugcon,iobase=0xe9,chardev=dbg"])
        .args(["-device", "isa-debug-exit,iobase=0x501"])
        .stdin(Stdio::null())
        .output()
        .map_err(|e| e.to_string())?;
    // isa-debug-exit with 0: status (0 << 1) | 1.
    if output.status.code() != Some(1) {
        return Err(format!(
            "{} exited with {}: {}",
            vmm[0],
            output.status,
            String::from_utf8_lossy(&output.stderr)
        ));
    }
    let bytes = std::fs::read(&out).map_err(|e| e.to_string())?;
    Ok(bytes
        .chunks_exact(16)
        .map(|c| {
            let word = |i: usize| u32::from_le_bytes(c[i..i + 4].try_into().unwrap());
            [word(0), word(4), word(8), word(12)]
        })
        .collect())
}

/// What a guest reads from the leaves QEMU builds itself (identity, topology, caches,
/// address sizes) is what it reads under QEMU 7.2 on the same KVM, for Intel and AMD
/// vendors, SMT, a model whose basic leaves end at 5, `host`, and the EPYC generations with
/// caches of their own.
#[test]
fn the_leaves_qemu_computes_match_qemus() {
    require_kvm!();
    if Command::new("qemu-system-x86_64")
        .arg("--version")
        .output()
        .is_err()
    {
        test_support::skip::skip("qemu-system-x86_64 (package qemu-system-x86) is not installed");
        return;
    }
    let dir = std::env::temp_dir().join(format!("qomvm-cpuid-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("cpuid.bin"), cpuid_bios(COMPARED)).unwrap();
    let qemu = ["qemu-system-x86_64", "-accel", "kvm"];
    let qomvm = [env!("CARGO_BIN_EXE_qomvm")];
    let mut differences = Vec::new();
    for (cpu, smp) in [
        ("qemu64", "4,threads=2"),
        ("qemu64,vendor=AuthenticAMD", "4"),
        ("qemu64,l3-cache=off", "2"),
        ("Skylake-Client", "8,sockets=2,threads=2"),
        ("Opteron_G1", "1"),
        ("Conroe", "2"),
        ("host", "4,threads=2"),
        ("host,host-cache-info=on", "2"),
        // QEMU 7.2's EPYC generations, with their own caches and TOPOEXT.
        ("EPYC", "4,threads=2"),
        ("EPYC-Rome,vendor=AuthenticAMD", "8,sockets=2"),
        ("EPYC-Milan", "2"),
        ("Dhyana", "2"),
    ] {
        let theirs =
            match firmware_cpuid(&qemu, cpu, smp, &dir) {
                Ok(regs) => regs,
                // Only the first run may find that QEMU cannot use this KVM; a later failure
                // is a failure.
                Err(why) if cpu == "qemu64" => {
                    test_support::skip::skip(format!("QEMU cannot run a KVM guest here: {why}"));
                    std::fs::remove_dir_all(&dir).ok();
                    return;
                }
                // QEMU 7.2 gives -cpu host the host's IA32_ARCH_CAPABILITIES and aborts where
                // the host's KVM refuses to set it (seen on a PVM host): QEMU's limit, not a
                // difference to find; the other models are still compared.
                Err(why) if cpu.starts_with("host") && why.contains("failed to set MSR") => {
                    test_support::skip::skip(format!(
                    "QEMU cannot run -cpu {cpu} on this KVM, so its leaves are not compared: {}",
                    why.lines().find(|l| l.contains("failed to set MSR")).unwrap_or(&why)
                ));
                    continue;
                }
                Err(why) => panic!("QEMU, -cpu {cpu}: {why}"),
            };
        let ours = firmware_cpuid(&qomvm, cpu, smp, &dir).unwrap();
        assert_eq!(theirs.len(), COMPARED.len(), "QEMU, -cpu {cpu}");
        assert_eq!(ours.len(), COMPARED.len(), "qomvm, -cpu {cpu}");
        for ((leaf, subleaf), (q, o)) in COMPARED.iter().zip(theirs.iter().zip(&ours)) {
            // host passes on the host's leaf-7.1 features that have names; qomvm's table
            // names some QEMU 7.2's does not (fzrm, fsrs, fsrc: QEMU 8.0).
            let newer_names = cpu.starts_with("host") && (*leaf, *subleaf) == (7, 1);
            if q != o && !newer_names {
                differences.push(format!(
                    "-cpu {cpu} -smp {smp}: leaf {leaf:#x}.{subleaf}: QEMU {q:08x?}, qomvm {o:08x?}"
                ));
            }
        }
    }
    std::fs::remove_dir_all(&dir).ok();
    assert!(differences.is_empty(), "{}", differences.join("\n"));
}
