//! The x86 interrupt controllers as the human monitor shows them: `info lapic` (QEMU's
//! `x86_cpu_dump_local_apic_state` in `target/i386/cpu-dump.c`) and `info pic` (the
//! `print_info` of `hw/intc/i8259_common.c` and `hw/intc/ioapic_common.c`), in QEMU
//! 7.2's formats, from the state the accelerator reads (`KVM_GET_LAPIC`,
//! `KVM_GET_IRQCHIP`).
//!
//! Pure functions over that state, so they can be checked without a guest; QEMU's quirks
//! are kept (a logical ICR destination in neither flat nor cluster model ends without a
//! newline, an xAPIC physical destination prints only its low 4 bits), since the point
//! is to print what QEMU prints.

use std::fmt::Write as _;

use hw::core::accel_ops::{IoapicState, IrqchipState, LocalApicState, PicState};

// Local APIC register offsets in the xAPIC page.
const APIC_TPR: usize = 0x80;
const APIC_APR: usize = 0x90;
const APIC_LDR: usize = 0xd0;
const APIC_DFR: usize = 0xe0;
const APIC_SPIV: usize = 0xf0;
const APIC_ISR: usize = 0x100;
const APIC_TMR: usize = 0x180;
const APIC_IRR: usize = 0x200;
const APIC_ESR: usize = 0x280;
const APIC_ICR: usize = 0x300;
const APIC_ICR2: usize = 0x310;
const APIC_LVTT: usize = 0x320;
const APIC_LVTTHMR: usize = 0x330;
const APIC_LVTPC: usize = 0x340;
const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const APIC_LVTERR: usize = 0x370;
const APIC_TMICT: usize = 0x380;
const APIC_TMCCT: usize = 0x390;
const APIC_TDCR: usize = 0x3e0;

// LVT bits.
const LVT_VECTOR: u32 = 0xff;
const LVT_DELIV_STS: u32 = 1 << 12;
const LVT_POLARITY: u32 = 1 << 13;
const LVT_LEVEL: u32 = 1 << 15;
const LVT_MASKED: u32 = 1 << 16;
const LVT_TIMER_PERIODIC: u32 = 1 << 17;
const LVT_TIMER_TSCDEADLINE: u32 = 1 << 18;
const DM_NMI: u32 = 4;

// ICR bits.
const ICR_DEST_LOGICAL: u32 = 1 << 11;
const ICR_LEVEL_ASSERT: u32 = 1 << 14;
const ICR_TRIGGER_LEVEL: u32 = 1 << 15;

// SPIV bits.
const SPIV_ENABLED: u32 = 1 << 8;
const SPIV_FOCUS: u32 = 1 << 9;

/// QEMU's `dm2str`.
fn delivery_mode(dm: u32) -> &'static str {
    ["Fixed", "...", "SMI", "...", "NMI", "INIT", "...", "ExtINT"][(dm & 7) as usize]
}

/// QEMU's `dump_apic_lvt`.
fn lvt_line(out: &mut String, name: &str, lvt: u32, is_timer: bool) {
    let dm = (lvt >> 8) & 7;
    let mode = if !is_timer {
        ""
    } else if lvt & LVT_TIMER_PERIODIC != 0 {
        "periodic"
    } else if lvt & LVT_TIMER_TSCDEADLINE != 0 {
        "tsc-deadline"
    } else {
        "one-shot"
    };
    let _ = write!(
        out,
        "{name}\t 0x{lvt:08x} {} {:<5} {:<6} {:<7} {mode:<12} {:<6}",
        if lvt & LVT_POLARITY != 0 {
            "active-lo"
        } else {
            "active-hi"
        },
        if lvt & LVT_LEVEL != 0 {
            "level"
        } else {
            "edge"
        },
        if lvt & LVT_MASKED != 0 { "masked" } else { "" },
        if lvt & LVT_DELIV_STS != 0 {
            "pending"
        } else {
            ""
        },
        delivery_mode(dm),
    );
    if dm != DM_NMI {
        let _ = writeln!(out, " (vec {})", lvt & LVT_VECTOR);
    } else {
        out.push('\n');
    }
}

/// QEMU's `mask2str`: the low `bits` bits of `v`, most significant first.
fn mask_bits(v: u32, bits: u32) -> String {
    (0..bits)
        .rev()
        .map(|i| if (v >> i) & 1 != 0 { '1' } else { '0' })
        .collect()
}

/// QEMU's `dump_apic_icr`.
fn icr_lines(out: &mut String, apic: &LocalApicState, dest_mode: u32) {
    let icr = apic.reg(APIC_ICR);
    let icr2 = apic.reg(APIC_ICR2);
    let shorthand = (icr >> 18) & 3;
    let logical = icr & ICR_DEST_LOGICAL != 0;
    let _ = writeln!(
        out,
        "ICR\t 0x{icr:08x} {} {} {} {}",
        if logical { "logical" } else { "physical" },
        if icr & ICR_TRIGGER_LEVEL != 0 {
            "level"
        } else {
            "edge"
        },
        if icr & ICR_LEVEL_ASSERT != 0 {
            "assert"
        } else {
            "de-assert"
        },
        ["no-shorthand", "self", "all-self", "all"][shorthand as usize],
    );
    let _ = write!(out, "ICR2\t 0x{icr2:08x}");
    if shorthand != 0 {
        out.push('\n');
        return;
    }
    let x2apic = apic.x2apic_cpuid;
    let dest = if x2apic { icr2 } else { icr2 >> 24 };
    if !logical {
        if x2apic {
            let _ = writeln!(out, " cpu {dest} (X2APIC ID)");
        } else {
            let _ = writeln!(out, " cpu {} (APIC ID)", dest & 0xf);
        }
        return;
    }
    if dest_mode == 0xf {
        let _ = writeln!(out, " mask {} (APIC ID)", mask_bits(icr2 >> 24, 8));
    } else if dest_mode == 0 {
        if x2apic {
            let _ = writeln!(
                out,
                " cluster {} mask {} (X2APIC ID)",
                dest >> 16,
                mask_bits(dest & 0xffff, 16)
            );
        } else {
            let _ = writeln!(
                out,
                " cluster {} mask {} (APIC ID)",
                dest >> 4,
                mask_bits(dest & 0xf, 4)
            );
        }
    }
}

/// Bit `n` of the 256-bit register whose first word is at `base`.
fn vector_bit(apic: &LocalApicState, base: usize, n: usize) -> bool {
    apic.reg(base + (n / 32) * 0x10) & (1 << (n % 32)) != 0
}

/// QEMU's `dump_apic_interrupt`.
fn interrupt_line(out: &mut String, apic: &LocalApicState, name: &str, base: usize) {
    let _ = write!(out, "{name}\t ");
    let mut empty = true;
    for v in 0..256 {
        if vector_bit(apic, base, v) {
            let level = if vector_bit(apic, APIC_TMR, v) {
                "(level)"
            } else {
                ""
            };
            let _ = write!(out, "{v}{level} ");
            empty = false;
        }
    }
    let _ = writeln!(out, "{}", if empty { "(none)" } else { "" });
}

/// QEMU's `apic_get_ppr`: the TPR, or the class of the highest vector in service if
/// that is higher.
fn ppr(apic: &LocalApicState) -> u32 {
    let tpr = apic.reg(APIC_TPR);
    let isrv = (0..256usize)
        .rev()
        .find(|&v| vector_bit(apic, APIC_ISR, v))
        .unwrap_or(0) as u32;
    if (tpr >> 4) >= (isrv >> 4) {
        tpr
    } else {
        isrv & 0xf0
    }
}

/// QEMU's `divider_conf`: the timer's divisor from its divide configuration.
fn divisor(dcr: u32) -> u32 {
    let v = ((dcr & 0x8) >> 1) | (dcr & 0x3);
    if v == 7 {
        1
    } else {
        2 << v
    }
}

/// QEMU's `x86_cpu_dump_local_apic_state` for CPU `cpu_index`. The timer's current count
/// is the one the accelerator keeps (KVM's TMCCT); QEMU recomputes it from a load time it
/// sets when it reads the state, which makes it the initial count less the few ticks
/// since.
pub fn lapic_dump(cpu_index: u32, apic: &LocalApicState) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "dumping local APIC state for CPU {cpu_index:<2}\n");
    for (name, reg) in [
        ("LVT0", APIC_LVT0),
        ("LVT1", APIC_LVT1),
        ("LVTPC", APIC_LVTPC),
        ("LVTERR", APIC_LVTERR),
        ("LVTTHMR", APIC_LVTTHMR),
    ] {
        lvt_line(&mut out, name, apic.reg(reg), false);
    }
    lvt_line(&mut out, "LVTT", apic.reg(APIC_LVTT), true);
    let dcr = apic.reg(APIC_TDCR);
    let _ = writeln!(
        out,
        "Timer\t DCR=0x{:x} (divide by {}) initial_count = {} current_count = {}",
        dcr & 0xf,
        divisor(dcr),
        apic.reg(APIC_TMICT),
        apic.reg(APIC_TMCCT),
    );
    let spiv = apic.reg(APIC_SPIV);
    let _ = writeln!(
        out,
        "SPIV\t 0x{spiv:08x} APIC {}, focus={}, spurious vec {}",
        if spiv & SPIV_ENABLED != 0 {
            "enabled"
        } else {
            "disabled"
        },
        if spiv & SPIV_FOCUS != 0 { "on" } else { "off" },
        spiv & 0xff,
    );
    let dest_mode = apic.reg(APIC_DFR) >> 28;
    let log_dest = apic.reg(APIC_LDR) >> 24;
    icr_lines(&mut out, apic, dest_mode);
    let _ = writeln!(out, "ESR\t 0x{:08x}", apic.reg(APIC_ESR));
    interrupt_line(&mut out, apic, "ISR", APIC_ISR);
    interrupt_line(&mut out, apic, "IRR", APIC_IRR);
    let _ = write!(
        out,
        "\nAPR 0x{:02x} TPR 0x{:02x} DFR 0x{dest_mode:02x} LDR 0x{log_dest:02x}",
        apic.reg(APIC_APR),
        apic.reg(APIC_TPR),
    );
    if dest_mode == 0 {
        let _ = write!(out, "(cluster {}: id {})", log_dest >> 4, log_dest & 0xf);
    }
    let _ = writeln!(out, " PPR 0x{:02x}", ppr(apic));
    out
}

/// QEMU's `pic_print_info` for the master (`pic0`) or the slave (`pic1`).
fn pic_line(out: &mut String, master: bool, p: &PicState) {
    let _ = writeln!(
        out,
        "pic{}: irr={:02x} imr={:02x} isr={:02x} hprio={} irq_base={:02x} rr_sel={} \
         elcr={:02x} fnm={}",
        if master { 0 } else { 1 },
        p.irr,
        p.imr,
        p.isr,
        p.priority_add,
        p.irq_base,
        p.read_reg_select,
        p.elcr,
        p.special_fully_nested_mode,
    );
}

// IOAPIC redirection entry bits.
const IOAPIC_DEST_LOGICAL: u64 = 1 << 11;
const IOAPIC_POLARITY: u64 = 1 << 13;
const IOAPIC_REMOTE_IRR: u64 = 1 << 14;
const IOAPIC_TRIGGER_LEVEL: u64 = 1 << 15;
const IOAPIC_MASKED: u64 = 1 << 16;
/// The first redirection table register.
const IOAPIC_REG_REDTBL_BASE: i32 = 0x10;

/// QEMU's `ioapic_irr_dump`.
fn irr_line(out: &mut String, name: &str, bitmap: u32) {
    let _ = write!(out, "{name:<10} ");
    if bitmap == 0 {
        out.push_str("(none)\n");
        return;
    }
    for pin in 0..24 {
        if bitmap & (1 << pin) != 0 {
            let _ = write!(out, "{pin:<2} ");
        }
    }
    out.push('\n');
}

/// QEMU's `ioapic_print_redtbl`.
fn ioapic_lines(out: &mut String, s: &IoapicState) {
    // QEMU keeps the register select in 8 bits.
    let sel = s.ioregsel as u8;
    let _ = write!(
        out,
        "ioapic0: ver=0x{:x} id=0x{:02x} sel=0x{sel:02x}",
        s.version, s.id
    );
    if sel != 0 {
        // QEMU's int arithmetic printed with %u: a select below the table wraps.
        let redir = ((i32::from(sel) - IOAPIC_REG_REDTBL_BASE) >> 1) as u32;
        let _ = writeln!(out, " (redir[{redir}])");
    } else {
        out.push('\n');
    }
    let mut remote_irr = 0u32;
    for (pin, &entry) in s.redirtbl.iter().enumerate() {
        let dm = ((entry >> 8) & 7) as usize;
        let dest_mask = if entry & IOAPIC_DEST_LOGICAL != 0 {
            0xff
        } else {
            0xf
        };
        let _ = writeln!(
            out,
            "  pin {pin:<2} 0x{entry:016x} dest={:x} vec={:<3} {} {:<5} {:<6} {:<6} {}",
            (entry >> 56) & dest_mask,
            entry & 0xff,
            if entry & IOAPIC_POLARITY != 0 {
                "active-lo"
            } else {
                "active-hi"
            },
            if entry & IOAPIC_TRIGGER_LEVEL != 0 {
                "level"
            } else {
                "edge"
            },
            if entry & IOAPIC_MASKED != 0 {
                "masked"
            } else {
                ""
            },
            ["fixed", "lowest", "SMI", "...", "NMI", "INIT", "...", "extINT"][dm],
            if entry & IOAPIC_DEST_LOGICAL != 0 {
                "logical"
            } else {
                "physical"
            },
        );
        if entry & IOAPIC_TRIGGER_LEVEL != 0 && entry & IOAPIC_REMOTE_IRR != 0 {
            remote_irr |= 1 << pin;
        }
    }
    irr_line(out, "  IRR", s.irr);
    irr_line(out, "  Remote IRR", remote_irr);
}

/// `info pic` for a pc's kvm-ioapic and kvm-i8259 pair, in the order QEMU 7.2 visits
/// them (the IOAPIC, then the slave, then the master).
pub fn pic_dump(state: &IrqchipState) -> String {
    let mut out = String::new();
    ioapic_lines(&mut out, &state.ioapic);
    pic_line(&mut out, false, &state.slave);
    pic_line(&mut out, true, &state.master);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn apic(regs: &[(usize, u32)], x2apic_cpuid: bool) -> LocalApicState {
        let mut page = vec![0u8; 1024];
        for &(at, v) in regs {
            page[at..at + 4].copy_from_slice(&v.to_le_bytes());
        }
        LocalApicState {
            regs: page,
            x2apic_cpuid,
        }
    }

    /// QEMU 7.2's `info lapic` on KVM (`-M pc -accel kvm -kernel` of a multiboot kernel
    /// that halted after SeaBIOS): the same registers give the same text.
    #[test]
    fn lapic_after_seabios_as_qemu_prints_it() {
        let a = apic(
            &[
                (APIC_LVT0, 0x8700),
                (APIC_LVT1, 0x8400),
                (APIC_LVTPC, 0x10000),
                (APIC_LVTERR, 0x10000),
                (APIC_LVTTHMR, 0x10000),
                (APIC_LVTT, 0x10000),
                (APIC_SPIV, 0x1ff),
                (APIC_ICR, 0xc4610),
                (APIC_DFR, 0xffff_ffff),
            ],
            true,
        );
        assert_eq!(
            lapic_dump(0, &a),
            "dumping local APIC state for CPU 0 \n\n\
             LVT0\t 0x00008700 active-hi level                             ExtINT (vec 0)\n\
             LVT1\t 0x00008400 active-hi level                             NMI   \n\
             LVTPC\t 0x00010000 active-hi edge  masked                      Fixed  (vec 0)\n\
             LVTERR\t 0x00010000 active-hi edge  masked                      Fixed  (vec 0)\n\
             LVTTHMR\t 0x00010000 active-hi edge  masked                      Fixed  (vec 0)\n\
             LVTT\t 0x00010000 active-hi edge  masked         one-shot     Fixed  (vec 0)\n\
             Timer\t DCR=0x0 (divide by 2) initial_count = 0 current_count = 0\n\
             SPIV\t 0x000001ff APIC enabled, focus=off, spurious vec 255\n\
             ICR\t 0x000c4610 physical edge assert all\n\
             ICR2\t 0x00000000\n\
             ESR\t 0x00000000\n\
             ISR\t (none)\n\
             IRR\t (none)\n\
             \n\
             APR 0x00 TPR 0x00 DFR 0x0f LDR 0x00 PPR 0x00\n"
        );
    }

    #[test]
    fn lapic_vectors_timer_and_destinations() {
        let a = apic(
            &[
                (APIC_LVTT, 0x2_00ef),
                (APIC_TDCR, 0xb),
                (APIC_TMICT, 1000),
                (APIC_TMCCT, 400),
                (APIC_ICR, 0x0000_4830),
                (APIC_ICR2, 0x0500_0000),
                (APIC_DFR, 0x0fff_ffff),
                (APIC_LDR, 0x2100_0000),
                (APIC_TPR, 0x20),
                (APIC_ISR + 0x10, 1 << 17), // vector 49
                (APIC_TMR + 0x10, 1 << 17),
                (APIC_IRR + 0x70, 1 << 31), // vector 255
                (APIC_IRR + 0x10, 1 << 16), // vector 48
            ],
            false,
        );
        let text = lapic_dump(12, &a);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], "dumping local APIC state for CPU 12");
        assert_eq!(
            lines[7],
            "LVTT\t 0x000200ef active-hi edge                 periodic     Fixed  (vec 239)"
        );
        assert_eq!(
            lines[8],
            "Timer\t DCR=0xb (divide by 1) initial_count = 1000 current_count = 400"
        );
        assert_eq!(
            lines[10],
            "ICR\t 0x00004830 logical edge assert no-shorthand"
        );
        // Cluster model, xAPIC: the destination's top nibble is the cluster.
        assert_eq!(lines[11], "ICR2\t 0x05000000 cluster 0 mask 0101 (APIC ID)");
        assert_eq!(lines[13], "ISR\t 49(level) ");
        assert_eq!(lines[14], "IRR\t 48 255 ");
        assert_eq!(
            lines[16],
            "APR 0x00 TPR 0x20 DFR 0x00 LDR 0x21(cluster 2: id 1) PPR 0x30"
        );
    }

    #[test]
    fn icr_destinations_follow_the_model_and_x2apic() {
        let icr2 = |icr: u32, icr2: u32, dfr: u32, x2: bool| {
            let a = apic(&[(APIC_ICR, icr), (APIC_ICR2, icr2), (APIC_DFR, dfr)], x2);
            let text = lapic_dump(0, &a);
            text.lines()
                .find(|l| l.starts_with("ICR2"))
                .unwrap()
                .to_string()
        };
        assert_eq!(
            icr2(0, 0x0300_0000, 0xffff_ffff, false),
            "ICR2\t 0x03000000 cpu 3 (APIC ID)"
        );
        assert_eq!(
            icr2(0, 0x0300_0000, 0xffff_ffff, true),
            "ICR2\t 0x03000000 cpu 50331648 (X2APIC ID)"
        );
        assert_eq!(
            icr2(0x800, 0x0300_0000, 0xffff_ffff, false),
            "ICR2\t 0x03000000 mask 00000011 (APIC ID)"
        );
        assert_eq!(
            icr2(0x800, 0x0002_0005, 0x0fff_ffff, true),
            "ICR2\t 0x00020005 cluster 2 mask 0000000000000101 (X2APIC ID)"
        );
    }

    /// QEMU 7.2's `info pic` on `-M pc -accel kvm` after SeaBIOS programmed the PICs.
    #[test]
    fn pic_as_qemu_prints_it() {
        let mut s = IrqchipState::default();
        s.ioapic.version = 0x11;
        s.ioapic.redirtbl = [1 << 16; 24];
        s.slave = PicState {
            imr: 0x8e,
            irq_base: 0x70,
            elcr: 0x0c,
            ..Default::default()
        };
        s.master = PicState {
            irr: 0x01,
            imr: 0xb8,
            irq_base: 0x08,
            ..Default::default()
        };
        let text = pic_dump(&s);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 1 + 24 + 2 + 2);
        assert_eq!(lines[0], "ioapic0: ver=0x11 id=0x00 sel=0x00");
        assert_eq!(
            lines[1],
            "  pin 0  0x0000000000010000 dest=0 vec=0   active-hi edge  masked fixed  physical"
        );
        assert_eq!(
            lines[24],
            "  pin 23 0x0000000000010000 dest=0 vec=0   active-hi edge  masked fixed  physical"
        );
        assert_eq!(lines[25], "  IRR      (none)");
        assert_eq!(lines[26], "  Remote IRR (none)");
        assert_eq!(
            lines[27],
            "pic1: irr=00 imr=8e isr=00 hprio=0 irq_base=70 rr_sel=0 elcr=0c fnm=0"
        );
        assert_eq!(
            lines[28],
            "pic0: irr=01 imr=b8 isr=00 hprio=0 irq_base=08 rr_sel=0 elcr=00 fnm=0"
        );
    }

    #[test]
    fn ioapic_entries_select_and_irr() {
        let mut s = IrqchipState::default();
        s.ioapic.ioregsel = 0x13;
        s.ioapic.irr = (1 << 2) | (1 << 11);
        // Pin 2: level, remote IRR, active-low, logical, lowest priority, dest 0x83.
        s.ioapic.redirtbl[2] =
            (0x83 << 56) | (1 << 15) | (1 << 14) | (1 << 13) | (1 << 11) | (1 << 8) | 0x31;
        // Pin 11: physical destination 0x83 shows its low 4 bits; edge with remote IRR set
        // does not count.
        s.ioapic.redirtbl[11] = (0x83 << 56) | (1 << 14) | (7 << 8) | 0xef;
        let text = pic_dump(&s);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], "ioapic0: ver=0x0 id=0x00 sel=0x13 (redir[1])");
        assert_eq!(
            lines[3],
            "  pin 2  0x830000000000e931 dest=83 vec=49  active-lo level        lowest logical"
        );
        assert_eq!(
            lines[12],
            "  pin 11 0x83000000000047ef dest=3 vec=239 active-hi edge         extINT physical"
        );
        assert_eq!(lines[25], "  IRR      2  11 ");
        assert_eq!(lines[26], "  Remote IRR 2  ");
        s.ioapic.ioregsel = 1;
        assert!(pic_dump(&s).starts_with("ioapic0: ver=0x0 id=0x00 sel=0x01 (redir[4294967288])\n"));
    }
}
