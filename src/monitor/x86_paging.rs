//! The x86 page-table walks of the human monitor's `info tlb` and `info mem` (QEMU's
//! `target/i386/monitor.c`): from a CPU's paging registers and guest-physical memory,
//! every mapping (`info tlb`) or every range of like protection (`info mem`), in QEMU's
//! formats for 32-bit, PAE, 4-level and 5-level paging.
//!
//! Pure functions over a memory reader, so they can be checked without a guest; they
//! follow QEMU's walks entry for entry, its quirks included (which bits go into the
//! printed address, the 5-level `info mem` walk's inverted presence tests), since the
//! point is to print what QEMU prints.

use std::fmt::Write as _;

use hw::core::accel_ops::PagingRegisters;

const PG_PRESENT: u64 = 1 << 0;
const PG_RW: u64 = 1 << 1;
const PG_USER: u64 = 1 << 2;
const PG_PWT: u64 = 1 << 3;
const PG_PCD: u64 = 1 << 4;
const PG_ACCESSED: u64 = 1 << 5;
const PG_DIRTY: u64 = 1 << 6;
const PG_PSE: u64 = 1 << 7;
const PG_GLOBAL: u64 = 1 << 8;
const PG_NX: u64 = 1 << 63;
/// The bits `info mem` compares: user, writable, present.
const PROT_MASK: u64 = PG_USER | PG_RW | PG_PRESENT;
/// QEMU's mask of a table's address in an entry (52-bit physical addresses).
const ADDR_MASK: u64 = 0x3_ffff_ffff_f000;

const CR0_PG: u64 = 1 << 31;
const CR4_PSE: u64 = 1 << 4;
const CR4_PAE: u64 = 1 << 5;
const CR4_LA57: u64 = 1 << 12;
const EFER_LMA: u64 = 1 << 10;

/// Reads guest-physical memory (QEMU's `cpu_physical_memory_read`).
pub type ReadPhys<'a> = &'a dyn Fn(u64, &mut [u8]);

/// The paging mode the registers select, or QEMU's message when paging is off.
enum Mode {
    Bits32,
    Pae32,
    La48,
    La57,
}

fn mode(regs: &PagingRegisters) -> Option<Mode> {
    if regs.cr0 & CR0_PG == 0 {
        return None;
    }
    Some(if regs.cr4 & CR4_PAE == 0 {
        Mode::Bits32
    } else if regs.efer & EFER_LMA == 0 {
        Mode::Pae32
    } else if regs.cr4 & CR4_LA57 != 0 {
        Mode::La57
    } else {
        Mode::La48
    })
}

/// A page table of 8-byte entries (`count` of them) at `addr`.
fn table64(read: ReadPhys, addr: u64, count: usize) -> Vec<u64> {
    let mut bytes = vec![0u8; count * 8];
    read(addr, &mut bytes);
    bytes
        .chunks_exact(8)
        .map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes")))
        .collect()
}

/// A 32-bit paging table (1024 4-byte entries) at `addr`.
fn table32(read: ReadPhys, addr: u64) -> Vec<u64> {
    let mut bytes = vec![0u8; 4096];
    read(addr, &mut bytes);
    bytes
        .chunks_exact(4)
        .map(|c| u64::from(u32::from_le_bytes(c.try_into().expect("4 bytes"))))
        .collect()
}

/// QEMU's `addr_canonical`: sign-extends a linear address from bit 47 (bit 56 with LA57).
fn canonical(regs: &PagingRegisters, addr: u64) -> u64 {
    let bit = if regs.cr4 & CR4_LA57 != 0 { 56 } else { 47 };
    if addr & (1 << bit) != 0 {
        addr | (u64::MAX << (bit + 1))
    } else {
        addr
    }
}

/// QEMU's `print_pte`: `VADDR: PADDR XGPDACTUW`.
fn print_pte(out: &mut String, regs: &PagingRegisters, addr: u64, pte: u64, mask: u64) {
    let flag = |bit: u64, c: char| if pte & bit != 0 { c } else { '-' };
    let _ = writeln!(
        out,
        "{:016x}: {:016x} {}{}{}{}{}{}{}{}{}",
        canonical(regs, addr),
        pte & mask,
        flag(PG_NX, 'X'),
        flag(PG_GLOBAL, 'G'),
        flag(PG_PSE, 'P'),
        flag(PG_DIRTY, 'D'),
        flag(PG_ACCESSED, 'A'),
        flag(PG_PCD, 'C'),
        flag(PG_PWT, 'T'),
        flag(PG_USER, 'U'),
        flag(PG_RW, 'W'),
    );
}

/// QEMU's `hmp_info_tlb` once it has the CPU: every present mapping.
pub fn info_tlb(regs: &PagingRegisters, read: ReadPhys) -> String {
    let mut out = String::new();
    match mode(regs) {
        None => out.push_str("PG disabled\n"),
        Some(Mode::Bits32) => tlb_32(&mut out, regs, read),
        Some(Mode::Pae32) => tlb_pae32(&mut out, regs, read),
        Some(Mode::La48) => tlb_la48(&mut out, regs, read, 0, regs.cr3 & ADDR_MASK),
        Some(Mode::La57) => {
            for (l0, pml5e) in table64(read, regs.cr3 & ADDR_MASK, 512)
                .into_iter()
                .enumerate()
            {
                if pml5e & PG_PRESENT != 0 {
                    tlb_la48(&mut out, regs, read, l0 as u64, pml5e & ADDR_MASK);
                }
            }
        }
    }
    out
}

fn tlb_32(out: &mut String, regs: &PagingRegisters, read: ReadPhys) {
    let pgd = regs.cr3 & 0xffff_f000;
    for (l1, pde) in table32(read, pgd).into_iter().enumerate() {
        let l1 = l1 as u64;
        if pde & PG_PRESENT == 0 {
            continue;
        }
        if pde & PG_PSE != 0 && regs.cr4 & CR4_PSE != 0 {
            // 4M pages: QEMU masks with ~((1 << 21) - 1).
            print_pte(out, regs, l1 << 22, pde, !((1 << 21) - 1));
            continue;
        }
        for (l2, pte) in table32(read, pde & 0xffff_f000).into_iter().enumerate() {
            if pte & PG_PRESENT != 0 {
                let addr = (l1 << 22) + ((l2 as u64) << 12);
                print_pte(out, regs, addr, pte & !PG_PSE, !0xfff);
            }
        }
    }
}

fn tlb_pae32(out: &mut String, regs: &PagingRegisters, read: ReadPhys) {
    for (l1, pdpe) in table64(read, regs.cr3 & !0x1f, 4).into_iter().enumerate() {
        let l1 = l1 as u64;
        if pdpe & PG_PRESENT == 0 {
            continue;
        }
        for (l2, pde) in table64(read, pdpe & ADDR_MASK, 512).into_iter().enumerate() {
            let l2 = l2 as u64;
            if pde & PG_PRESENT == 0 {
                continue;
            }
            if pde & PG_PSE != 0 {
                // 2M pages (CR4.PSE does not matter with PAE): QEMU's ~((1 << 20) - 1).
                print_pte(out, regs, (l1 << 30) + (l2 << 21), pde, !((1 << 20) - 1));
                continue;
            }
            for (l3, pte) in table64(read, pde & ADDR_MASK, 512).into_iter().enumerate() {
                if pte & PG_PRESENT != 0 {
                    let addr = (l1 << 30) + (l2 << 21) + ((l3 as u64) << 12);
                    print_pte(out, regs, addr, pte & !PG_PSE, !0xfff);
                }
            }
        }
    }
}

fn tlb_la48(out: &mut String, regs: &PagingRegisters, read: ReadPhys, l0: u64, pml4: u64) {
    for (l1, pml4e) in table64(read, pml4, 512).into_iter().enumerate() {
        let l1 = l1 as u64;
        if pml4e & PG_PRESENT == 0 {
            continue;
        }
        for (l2, pdpe) in table64(read, pml4e & ADDR_MASK, 512)
            .into_iter()
            .enumerate()
        {
            let l2 = l2 as u64;
            if pdpe & PG_PRESENT == 0 {
                continue;
            }
            let base = (l0 << 48) + (l1 << 39) + (l2 << 30);
            if pdpe & PG_PSE != 0 {
                print_pte(out, regs, base, pdpe, 0x3_ffff_c000_0000);
                continue;
            }
            for (l3, pde) in table64(read, pdpe & ADDR_MASK, 512).into_iter().enumerate() {
                let l3 = l3 as u64;
                if pde & PG_PRESENT == 0 {
                    continue;
                }
                if pde & PG_PSE != 0 {
                    print_pte(out, regs, base + (l3 << 21), pde, 0x3_ffff_ffe0_0000);
                    continue;
                }
                for (l4, pte) in table64(read, pde & ADDR_MASK, 512).into_iter().enumerate() {
                    if pte & PG_PRESENT != 0 {
                        let addr = base + (l3 << 21) + ((l4 as u64) << 12);
                        print_pte(out, regs, addr, pte & !PG_PSE, ADDR_MASK);
                    }
                }
            }
        }
    }
}

/// QEMU's `mem_print`'s state: the range being gathered and its protection.
struct MemRanges<'a> {
    out: &'a mut String,
    regs: &'a PagingRegisters,
    start: u64,
    last_prot: u64,
}

impl MemRanges<'_> {
    /// QEMU's `mem_print`: a change of protection at `end` ends the range before it.
    fn at(&mut self, end: u64, prot: u64) {
        if prot == self.last_prot {
            return;
        }
        if self.start != u64::MAX {
            let c = |a: u64| canonical(self.regs, a);
            let _ = writeln!(
                self.out,
                "{:016x}-{:016x} {:016x} {}r{}",
                c(self.start),
                c(end),
                c(end.wrapping_sub(self.start)),
                if self.last_prot & PG_USER != 0 {
                    'u'
                } else {
                    '-'
                },
                if self.last_prot & PG_RW != 0 {
                    'w'
                } else {
                    '-'
                },
            );
        }
        self.start = if prot != 0 { end } else { u64::MAX };
        self.last_prot = prot;
    }
}

/// QEMU's `hmp_info_mem` once it has the CPU: the mapped ranges and their protection.
pub fn info_mem(regs: &PagingRegisters, read: ReadPhys) -> String {
    let mut out = String::new();
    let Some(mode) = mode(regs) else {
        out.push_str("PG disabled\n");
        return out;
    };
    let mut m = MemRanges {
        out: &mut out,
        regs,
        start: u64::MAX,
        last_prot: 0,
    };
    match mode {
        Mode::Bits32 => mem_32(&mut m, read),
        Mode::Pae32 => mem_pae32(&mut m, read),
        Mode::La48 => mem_la48(&mut m, read),
        Mode::La57 => mem_la57(&mut m, read),
    }
    out
}

fn mem_32(m: &mut MemRanges, read: ReadPhys) {
    let pgd = m.regs.cr3 & 0xffff_f000;
    for (l1, pde) in table32(read, pgd).into_iter().enumerate() {
        let l1 = l1 as u64;
        if pde & PG_PRESENT == 0 {
            m.at(l1 << 22, 0);
        } else if pde & PG_PSE != 0 && m.regs.cr4 & CR4_PSE != 0 {
            m.at(l1 << 22, pde & PROT_MASK);
        } else {
            for (l2, pte) in table32(read, pde & 0xffff_f000).into_iter().enumerate() {
                let prot = if pte & PG_PRESENT != 0 {
                    pte & pde & PROT_MASK
                } else {
                    0
                };
                m.at((l1 << 22) + ((l2 as u64) << 12), prot);
            }
        }
    }
    m.at(1 << 32, 0);
}

fn mem_pae32(m: &mut MemRanges, read: ReadPhys) {
    for (l1, pdpe) in table64(read, m.regs.cr3 & !0x1f, 4).into_iter().enumerate() {
        let l1 = l1 as u64;
        if pdpe & PG_PRESENT == 0 {
            m.at(l1 << 30, 0);
            continue;
        }
        for (l2, pde) in table64(read, pdpe & ADDR_MASK, 512).into_iter().enumerate() {
            let end = (l1 << 30) + ((l2 as u64) << 21);
            if pde & PG_PRESENT == 0 {
                m.at(end, 0);
            } else if pde & PG_PSE != 0 {
                m.at(end, pde & PROT_MASK);
            } else {
                for (l3, pte) in table64(read, pde & ADDR_MASK, 512).into_iter().enumerate() {
                    let prot = if pte & PG_PRESENT != 0 {
                        pte & pde & PROT_MASK
                    } else {
                        0
                    };
                    m.at(end + ((l3 as u64) << 12), prot);
                }
            }
        }
    }
    m.at(1 << 32, 0);
}

fn mem_la48(m: &mut MemRanges, read: ReadPhys) {
    for (l1, pml4e) in table64(read, m.regs.cr3 & ADDR_MASK, 512)
        .into_iter()
        .enumerate()
    {
        let l1 = l1 as u64;
        if pml4e & PG_PRESENT == 0 {
            m.at(l1 << 39, 0);
            continue;
        }
        for (l2, pdpe) in table64(read, pml4e & ADDR_MASK, 512)
            .into_iter()
            .enumerate()
        {
            let base = (l1 << 39) + ((l2 as u64) << 30);
            if pdpe & PG_PRESENT == 0 {
                m.at(base, 0);
                continue;
            }
            if pdpe & PG_PSE != 0 {
                m.at(base, pdpe & PROT_MASK & pml4e);
                continue;
            }
            for (l3, pde) in table64(read, pdpe & ADDR_MASK, 512).into_iter().enumerate() {
                let end = base + ((l3 as u64) << 21);
                if pde & PG_PRESENT == 0 {
                    m.at(end, 0);
                } else if pde & PG_PSE != 0 {
                    m.at(end, pde & PROT_MASK & pml4e & pdpe);
                } else {
                    for (l4, pte) in table64(read, pde & ADDR_MASK, 512).into_iter().enumerate() {
                        let prot = if pte & PG_PRESENT != 0 {
                            pte & PROT_MASK & pml4e & pdpe & pde
                        } else {
                            0
                        };
                        m.at(end + ((l4 as u64) << 12), prot);
                    }
                }
            }
        }
    }
    m.at(1 << 48, 0);
}

/// QEMU's `mem_info_la57`, whose presence tests below the PML4 are inverted (it skips
/// present PDPT and PD entries and walks absent ones): kept, to print what QEMU prints.
fn mem_la57(m: &mut MemRanges, read: ReadPhys) {
    for (l0, pml5e) in table64(read, m.regs.cr3 & ADDR_MASK, 512)
        .into_iter()
        .enumerate()
    {
        let l0 = l0 as u64;
        if pml5e & PG_PRESENT == 0 {
            m.at(l0 << 48, 0);
            continue;
        }
        for (l1, pml4e) in table64(read, pml5e & ADDR_MASK, 512)
            .into_iter()
            .enumerate()
        {
            let l1 = l1 as u64;
            if pml4e & PG_PRESENT == 0 {
                m.at((l0 << 48) + (l1 << 39), 0);
                continue;
            }
            for (l2, pdpe) in table64(read, pml4e & ADDR_MASK, 512)
                .into_iter()
                .enumerate()
            {
                let base = (l0 << 48) + (l1 << 39) + ((l2 as u64) << 30);
                if pdpe & PG_PRESENT != 0 {
                    m.at(base, 0);
                    continue;
                }
                if pdpe & PG_PSE != 0 {
                    m.at(base, pdpe & PROT_MASK & pml5e & pml4e);
                    continue;
                }
                for (l3, pde) in table64(read, pdpe & ADDR_MASK, 512).into_iter().enumerate() {
                    let end = base + ((l3 as u64) << 21);
                    if pde & PG_PRESENT != 0 {
                        m.at(end, 0);
                        continue;
                    }
                    if pde & PG_PSE != 0 {
                        m.at(end, pde & PROT_MASK & pml5e & pml4e & pdpe);
                        continue;
                    }
                    for (l4, pte) in table64(read, pde & ADDR_MASK, 512).into_iter().enumerate() {
                        let prot = if pte & PG_PRESENT != 0 {
                            pte & PROT_MASK & pml5e & pml4e & pdpe & pde
                        } else {
                            0
                        };
                        m.at(end + ((l4 as u64) << 12), prot);
                    }
                }
            }
        }
    }
    m.at(1 << 57, 0);
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    /// Guest memory holding `entries` (address, value, width in bytes), zero elsewhere.
    fn memory(entries: &[(u64, u64, usize)]) -> HashMap<u64, u8> {
        let mut bytes = HashMap::new();
        for &(addr, value, width) in entries {
            for (i, b) in value.to_le_bytes()[..width].iter().enumerate() {
                bytes.insert(addr + i as u64, *b);
            }
        }
        bytes
    }

    fn reader(bytes: &HashMap<u64, u8>) -> impl Fn(u64, &mut [u8]) + '_ {
        move |addr, buf: &mut [u8]| {
            for (i, b) in buf.iter_mut().enumerate() {
                *b = bytes.get(&(addr + i as u64)).copied().unwrap_or(0);
            }
        }
    }

    fn regs(cr4: u64, efer: u64) -> PagingRegisters {
        PagingRegisters {
            cr0: CR0_PG | 0x11,
            cr3: 0x10_1000,
            cr4,
            efer,
        }
    }

    #[test]
    fn paging_off_is_qemus_message() {
        let none = HashMap::new();
        let regs = PagingRegisters::default();
        assert_eq!(info_tlb(&regs, &reader(&none)), "PG disabled\n");
        assert_eq!(info_mem(&regs, &reader(&none)), "PG disabled\n");
    }

    // The expected lines are QEMU 7.2's (TCG) for the same tables, set up by a multiboot
    // kernel that loads CR3 = 0x101000 and turns paging on.

    #[test]
    fn four_level_paging_as_qemu_prints_it() {
        let m = memory(&[
            (0x10_1000, 0x10_2007, 8),
            (0x10_1000 + 511 * 8, 0x10_5003, 8),
            (0x10_2000, 0x10_3007, 8),
            (0x10_3000, 0xa3, 8),
            (0x10_3008, 0x10_4007, 8),
            (0x10_4000, 0x30_0067, 8),
            (0x10_4008, (1 << 63) | 0x30_1025, 8),
            (0x10_4000 + 5 * 8, 0x30_5019, 8),
            (0x10_5000 + 511 * 8, 0x4000_0183, 8),
        ]);
        let regs = regs(CR4_PAE, EFER_LMA | (1 << 8));
        assert_eq!(
            info_tlb(&regs, &reader(&m)),
            "0000000000000000: 0000000000000000 --P-A---W\n\
             0000000000200000: 0000000000300000 ---DA--UW\n\
             0000000000201000: 0000000000301000 X---A--U-\n\
             0000000000205000: 0000000000305000 -----CT--\n\
             ffffffffc0000000: 0000000040000000 -GP-----W\n"
        );
        assert_eq!(
            info_mem(&regs, &reader(&m)),
            "0000000000000000-0000000000200000 0000000000200000 -rw\n\
             0000000000200000-0000000000201000 0000000000001000 urw\n\
             0000000000201000-0000000000202000 0000000000001000 ur-\n\
             0000000000205000-0000000000206000 0000000000001000 -r-\n\
             ffffffffc0000000-0001000000000000 0000000040000000 -rw\n"
        );
    }

    #[test]
    fn thirty_two_bit_paging_as_qemu_prints_it() {
        let m = memory(&[
            (0x10_1000, 0xa3, 4),
            (0x10_1004, 0x10_2007, 4),
            (0x10_2000, 0x30_0067, 4),
            (0x10_2000 + 3 * 4, 0x30_3005, 4),
            (0x10_1000 + 768 * 4, 0x40_0083, 4),
        ]);
        let regs = regs(CR4_PSE, 0);
        assert_eq!(
            info_tlb(&regs, &reader(&m)),
            "0000000000000000: 0000000000000000 --P-A---W\n\
             0000000000400000: 0000000000300000 ---DA--UW\n\
             0000000000403000: 0000000000303000 -------U-\n\
             00000000c0000000: 0000000000400000 --P-----W\n"
        );
        assert_eq!(
            info_mem(&regs, &reader(&m)),
            "0000000000000000-0000000000400000 0000000000400000 -rw\n\
             0000000000400000-0000000000401000 0000000000001000 urw\n\
             0000000000403000-0000000000404000 0000000000001000 ur-\n\
             00000000c0000000-00000000c0400000 0000000000400000 -rw\n"
        );
    }

    #[test]
    fn pae_paging_as_qemu_prints_it() {
        let m = memory(&[
            (0x10_1000, 0x10_2001, 8),
            (0x10_2000, 0xa3, 8),
            (0x10_2008, 0x10_3007, 8),
            (0x10_3000, 0x30_0067, 8),
            (0x10_3008, (1 << 63) | 0x30_1025, 8),
            (0x10_1018, 0x10_4001, 8),
            (0x10_4000 + 511 * 8, 0xffe0_0081, 8),
        ]);
        let regs = regs(CR4_PAE, 0);
        // QEMU keeps the NX bit in a PAE 4 KiB page's address.
        assert_eq!(
            info_tlb(&regs, &reader(&m)),
            "0000000000000000: 0000000000000000 --P-A---W\n\
             0000000000200000: 0000000000300000 ---DA--UW\n\
             0000000000201000: 8000000000301000 X---A--U-\n\
             00000000ffe00000: 00000000ffe00000 --P------\n"
        );
        assert_eq!(
            info_mem(&regs, &reader(&m)),
            "0000000000000000-0000000000200000 0000000000200000 -rw\n\
             0000000000200000-0000000000201000 0000000000001000 urw\n\
             0000000000201000-0000000000202000 0000000000001000 ur-\n\
             00000000ffe00000-0000000100000000 0000000000200000 -r-\n"
        );
    }
}
